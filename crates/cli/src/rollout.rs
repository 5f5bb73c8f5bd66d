//! `tandem rollout`: a rollout's step, the canary's measured signals and
//! the decisions so far; and pause, resume, abort, promote for people.

use clap::Subcommand;
use tandem_control::rollout::{Decision, View};

use crate::api::{block_on, call_json, get_json, ApiArgs};

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// A rollout's phase, step, weights in force, the canary's signals and
    /// its history (every rollout, briefly, without a name).
    Status {
        name: Option<String>,
        #[arg(short, long, default_value = tandem_config::model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: crate::Output,
    },
    /// Stop walking the steps; the weights in force stay.
    Pause(Act),
    /// Go on after a pause (the step's hold starts again); after the
    /// rollout ended (succeeded, rolled back, aborted), start it over.
    Resume(Act),
    /// Send all traffic back to the stable backend, and stop.
    Abort(Act),
    /// Go to the next step now, without waiting for the hold.
    Promote(Act),
}

#[derive(clap::Args)]
pub struct Act {
    name: String,
    #[arg(short, long, default_value = tandem_config::model::DEFAULT_NAMESPACE)]
    namespace: String,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    let (act, action) = match cmd {
        RolloutCommand::Status {
            name,
            namespace,
            api,
            output,
        } => {
            return status(
                &api,
                name.as_deref(),
                &namespace,
                output == crate::Output::Json,
            )
        }
        RolloutCommand::Pause(a) => (a, "pause"),
        RolloutCommand::Resume(a) => (a, "resume"),
        RolloutCommand::Abort(a) => (a, "abort"),
        RolloutCommand::Promote(a) => (a, "promote"),
    };
    let target = act.api.target()?;
    let path = format!("/api/v1/rollouts/{}/{}/{action}", act.namespace, act.name);
    let v = block_on(call_json(&target, hyper::Method::POST, &path))?;
    let view: View = serde_json::from_value(v)?;
    print!("{}", detail(&view));
    Ok(())
}

fn status(api: &ApiArgs, name: Option<&str>, ns: &str, json: bool) -> anyhow::Result<()> {
    let target = api.target()?;
    let path = match name {
        Some(n) => format!("/api/v1/rollouts/{ns}/{n}"),
        None => "/api/v1/rollouts".to_string(),
    };
    let v = block_on(get_json(&target, &path))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if name.is_some() {
        let view: View = serde_json::from_value(v)?;
        print!("{}", detail(&view));
        return Ok(());
    }
    let views: Vec<View> = serde_json::from_value(v)?;
    if views.is_empty() {
        println!("no Rollout in the config");
    }
    for v in &views {
        println!("{}", summary(v));
    }
    Ok(())
}

fn phase(v: &View) -> String {
    match &v.state {
        Some(s) => serde_json::to_value(s.phase)
            .ok()
            .and_then(|p| p.as_str().map(String::from))
            .unwrap_or_default(),
        None => "not started".into(),
    }
}

/// The weights in force on the rules the rollout drives.
pub fn weights(v: &View) -> String {
    match &v.state {
        Some(s) => format!(
            "{} {} % / {} {} %",
            v.stable,
            f64::from(1000 - s.canary_permille.min(1000)) / 10.0,
            v.canary,
            f64::from(s.canary_permille) / 10.0
        ),
        None => "the route's own weights".into(),
    }
}

/// One line: what a rollout does to its Service now.
pub fn summary(v: &View) -> String {
    let step = v
        .state
        .as_ref()
        .map(|s| format!("step {} of {}", s.step + 1, v.steps.len()))
        .unwrap_or_default();
    format!(
        "{}/{}: {}: {} ({step}, {})",
        v.namespace,
        v.name,
        v.service,
        weights(v),
        phase(v)
    )
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn decision_line(d: &Decision) -> String {
    let numbers = d
        .signals
        .as_ref()
        .map(|s| {
            format!(
                " [{} requests, success {:.2} %, p99 {:.1} ms]",
                s.requests,
                s.success_rate * 100.0,
                s.p99_ms
            )
        })
        .unwrap_or_default();
    format!(
        "  {} UTC  {:<9} step {:<2} {:>5.1} %  {}{}{}",
        clock(d.at_ms),
        d.action,
        d.step + 1,
        d.canary_percent,
        d.reason,
        numbers,
        if d.manual { " (by a person)" } else { "" }
    )
}

fn detail(v: &View) -> String {
    let mut out = format!(
        "Rollout {}/{}: Service {} from {} to {}\n",
        v.namespace, v.name, v.service, v.stable, v.canary
    );
    let steps: Vec<String> = v.steps.iter().map(|s| format!("{s}")).collect();
    out.push_str(&format!(
        "steps (canary %): {}; hold {}s; thresholds: success >= {:.2} %{}, at least {} requests per step\n",
        steps.join(", "),
        v.hold_ms / 1000,
        v.min_success_rate * 100.0,
        v.max_p99_ms
            .map(|p| format!(", p99 <= {p} ms"))
            .unwrap_or_default(),
        v.min_requests
    ));
    out.push_str(&format!("phase: {}", phase(v)));
    if let Some(s) = &v.state {
        out.push_str(&format!(", step {} of {}", s.step + 1, v.steps.len()));
    }
    out.push('\n');
    out.push_str(&format!("weights in force: {}\n", weights(v)));
    if let Some(w) = &v.waiting {
        out.push_str(&format!("now: {w}\n"));
    }
    if let Some(m) = v.state.as_ref().and_then(|s| s.measured.as_ref()) {
        out.push_str(&format!(
            "canary this step: {} requests, success {:.2} %, p99 {:.1} ms\n",
            m.requests,
            m.success_rate * 100.0,
            m.p99_ms
        ));
    }
    if let Some(s) = &v.state {
        out.push_str("history:\n");
        for d in &s.history {
            out.push_str(&decision_line(d));
            out.push('\n');
        }
    }
    out
}
