//! `tandem explain`: what the mesh would do with one request, from the
//! control plane's config in force (with the rollouts' weights), or
//! offline from a config directory.

use std::path::PathBuf;
use std::process::ExitCode;

use tandem_config::explain::{ExplainRequest, Explanation};
use tandem_identity::ca::DEFAULT_TRUST_DOMAIN;

use crate::api;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The calling service (`name` or `name.namespace`).
    #[arg(long)]
    from: String,
    /// The request method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// A request header, `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Explain from this config directory instead of asking the control
    /// plane (no rollout is in progress offline).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The mesh's trust domain, for identity patterns (offline only).
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(short, long, value_enum, default_value = "table")]
    output: crate::Output,
    #[command(flatten)]
    api: api::ApiArgs,
    /// The request: `http://catalog:8080/items?x=1`, `catalog:8080/items` or
    /// `catalog/items`, as the app would address it.
    url: String,
}

pub fn run(args: ExplainArgs) -> ExitCode {
    match explain(&args) {
        Ok(e) => {
            if args.output == crate::Output::Json {
                match serde_json::to_string_pretty(&e) {
                    Ok(j) => println!("{j}"),
                    Err(err) => eprintln!("error: {err}"),
                }
            } else {
                print!("{}", render(&e));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn explain(args: &ExplainArgs) -> anyhow::Result<Explanation> {
    let req = request(args)?;
    match &args.config {
        Some(dir) => {
            let set = tandem_config::load_dir(dir).map_err(|diags| {
                for d in &diags {
                    eprintln!("{d}");
                }
                anyhow::anyhow!("{} problem(s) found in {}", diags.len(), dir.display())
            })?;
            tandem_config::explain::explain(
                &set,
                &tandem_config::rollout::Splits::new(),
                &args.trust_domain,
                &req,
            )
            .map_err(anyhow::Error::msg)
        }
        None => {
            let target = args.api.target()?;
            let body = serde_json::to_value(&req)?;
            api::block_on(async {
                let v =
                    api::send_json(&target, hyper::Method::POST, "/api/v1/explain", Some(&body))
                        .await?;
                Ok(serde_json::from_value(v)?)
            })
        }
    }
}

fn request(args: &ExplainArgs) -> anyhow::Result<ExplainRequest> {
    let url = args
        .url
        .strip_prefix("http://")
        .or_else(|| args.url.strip_prefix("https://"))
        .unwrap_or(&args.url);
    let (authority, path) = match url.find(['/', '?']) {
        Some(i) if url.as_bytes()[i] == b'/' => (&url[..i], url[i..].to_string()),
        Some(i) => (&url[..i], format!("/{}", &url[i..])),
        None => (url, "/".to_string()),
    };
    if authority.is_empty() {
        anyhow::bail!("`{}` names no host", args.url);
    }
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else {
            anyhow::bail!("--header `{h}`: write `name: value`");
        };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(ExplainRequest {
        source: args.from.clone(),
        method: args.method.to_ascii_uppercase(),
        authority: authority.to_string(),
        path,
        headers,
    })
}

/// The explanation as the lines a person reads.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<15} {v}\n"));
    line("from", &e.source);
    let to = match (&e.destination, e.port) {
        (Some(d), Some(p)) => format!("{d} port {p}"),
        (Some(d), None) => d.clone(),
        (None, _) => "(not a service of the mesh)".to_string(),
    };
    line("to", &to);
    if let Some(r) = &e.rule {
        line("rule", r);
    } else if e.destination.is_some() && e.answer.is_none() {
        line("rule", "(no routes: to the service itself)");
    }
    if let Some(a) = &e.answer {
        line("answer", &format!("{a} (made by the caller's sidecar)"));
    }
    if let Some(r) = &e.rollout {
        line("rollout", r);
    }
    for c in &e.request_changes {
        line("request", c);
    }
    for c in &e.response_changes {
        line("response", c);
    }
    for (m, pct) in &e.mirrors {
        line("mirror", &format!("{pct}% copied to {m} (answers ignored)"));
    }
    if let Some(f) = &e.fault {
        line("fault", f);
    }
    if let Some(p) = &e.policy {
        line("policy", p);
    }
    let ms = |v: Option<u64>| v.map_or("none".to_string(), |m| format!("{m} ms"));
    if e.answer.is_none() && e.destination.is_some() {
        line("timeout", &ms(e.timeout_ms));
        if e.per_try_timeout_ms.is_some() {
            line("per try", &ms(e.per_try_timeout_ms));
        }
        line("retries", e.retries.as_deref().unwrap_or("none"));
        if let Some(lb) = &e.load_balancer {
            line("balancing", lb);
        }
        if let Some(cb) = &e.circuit_breaker {
            line("circuit", cb);
        }
    }
    for b in &e.backends {
        line(
            "backend",
            &format!("{} weight {} ({}%)", b.service, b.weight, b.percent),
        );
        for c in &b.changes {
            line("  request", c);
        }
        if let Some(rl) = &b.rate_limit {
            line("  rate limit", rl);
        }
        let verdict = match b.verdict.as_str() {
            "deny" if !b.decided_by.starts_with(|c: char| c.is_ascii_digit()) => {
                "deny (403 forbidden)"
            }
            v => v,
        };
        line("  access", &format!("{verdict}: {}", b.decided_by));
        for a in &b.audit {
            line("  audit", &format!("would deny: {a}"));
        }
    }
    out
}
