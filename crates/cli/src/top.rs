//! `tandem top`: a live table of the busiest service pairs and routes,
//! redrawn every `--interval` from the control plane's stats.

use std::io::Write;
use std::time::Duration;

use tandem_control::stats::{PairStat, RouteStat};

use crate::api;

#[derive(clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    api: api::ApiArgs,
    /// The window each refresh's figures cover.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    window: Duration,
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    interval: Duration,
    /// Rows per table.
    #[arg(long, default_value_t = 15)]
    limit: usize,
    /// Stop after this many refreshes (0: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// `json`: one object per refresh (`pairs`, `routes`), one per line.
    #[arg(short, long, value_enum, default_value = "table")]
    output: crate::Output,
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let target = args.api.target()?;
    let json = args.output == crate::Output::Json;
    let tty = !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    api::block_on(async {
        let mut tick = tokio::time::interval(args.interval.max(Duration::from_millis(200)));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            let pairs = api::fetch_stats(&target, args.window).await?;
            let routes: Vec<RouteStat> = serde_json::from_value(
                api::get_json(
                    &target,
                    &format!(
                        "/api/v1/stats/routes?window={}ms",
                        args.window.as_millis().max(1)
                    ),
                )
                .await?,
            )?;
            let mut out = std::io::stdout().lock();
            if json {
                let v = serde_json::json!({
                    "pairs": busiest(pairs, args.limit),
                    "routes": routes.into_iter().take(args.limit).collect::<Vec<_>>(),
                });
                writeln!(out, "{v}")?;
            } else {
                if tty {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                write!(
                    out,
                    "{}",
                    render(&busiest(pairs, args.limit), &routes, &args)
                )?;
            }
            out.flush()?;
            n += 1;
            if args.count > 0 && n >= args.count {
                return Ok(());
            }
        }
    })
}

/// The pairs with the most requests per second, first.
fn busiest(mut pairs: Vec<PairStat>, limit: usize) -> Vec<PairStat> {
    pairs.sort_by(|a, b| {
        b.rps
            .total_cmp(&a.rps)
            .then_with(|| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)))
    });
    pairs.truncate(limit);
    pairs
}

fn render(pairs: &[PairStat], routes: &[RouteStat], args: &TopArgs) -> String {
    let mut s = format!(
        "tandem top — busiest first, last {:?} (every {:?}; Ctrl-C to stop)\n\n",
        args.window, args.interval
    );
    s.push_str(&format!(
        "{:<16} {:<16} {:>8} {:>9} {:>9} {:>9} {:>13}\n",
        "SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50(ms)", "P99(ms)", "PROXY P99(ms)"
    ));
    if pairs.is_empty() {
        s.push_str("(no traffic in this window)\n");
    }
    let side = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    for p in pairs {
        s.push_str(&format!(
            "{:<16} {:<16} {:>8.1} {:>8.2}% {:>9.2} {:>9.2} {:>13}\n",
            p.source,
            p.destination,
            p.rps,
            p.success_rate * 100.0,
            p.p50_ms,
            p.p99_ms,
            format!("{}+{}", side(p.proxy_p99_ms), side(p.dst_proxy_p99_ms))
        ));
    }
    s.push_str(&format!(
        "\n{:<28} {:<16} {:>8} {:>9} {:>9} {:>9}\n",
        "ROUTE", "BACKEND", "RPS", "SUCCESS", "P50(ms)", "P99(ms)"
    ));
    if routes.is_empty() {
        s.push_str("(no routed traffic in this window)\n");
    }
    for r in routes.iter().take(args.limit) {
        s.push_str(&format!(
            "{:<28} {:<16} {:>8.1} {:>8.2}% {:>9.2} {:>9.2}\n",
            r.route,
            r.backend,
            r.rps,
            r.success_rate * 100.0,
            r.p50_ms,
            r.p99_ms
        ));
    }
    s
}
