//! The read commands: `tandem stat` and `tandem status`, talking to the
//! control plane's HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub async fn get_json(api: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let client: Client<_, Empty<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = format!("http://{api}{path}").parse()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
        .await
        .context("the control plane did not answer in 5s")?
        .with_context(|| format!("cannot reach the control plane API at {api} (is `tandem control` or `tandem up` running? set --api)"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "control plane answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub use tandem_control::stats::PairStat as StatRow;

pub fn stat_table(rows: &[StatRow]) -> String {
    let mut out = format!(
        "{:<14} {:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50(ms)", "P95(ms)", "P99(ms)", "REQUESTS"
    );
    if rows.is_empty() {
        out.push_str("(no traffic in this window)\n");
    }
    for r in rows {
        out.push_str(&format!(
            "{:<14} {:<14} {:>9.1} {:>8.2}% {:>9.2} {:>9.2} {:>9.2} {:>9}\n",
            r.source,
            r.destination,
            r.rps,
            r.success_rate * 100.0,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.requests
        ));
    }
    out
}

pub async fn fetch_stats(api: SocketAddr, window: Duration) -> anyhow::Result<Vec<StatRow>> {
    let v = get_json(
        api,
        &format!("/api/v1/stats?window={}", window.as_secs_f64()),
    )
    .await?;
    Ok(serde_json::from_value(v)?)
}

pub fn stat(api: SocketAddr, window: Duration, json: bool) -> anyhow::Result<()> {
    block_on(async {
        if json {
            let v = get_json(
                api,
                &format!("/api/v1/stats?window={}", window.as_secs_f64()),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", stat_table(&fetch_stats(api, window).await?));
        }
        Ok(())
    })
}

pub fn status(api: SocketAddr, json: bool) -> anyhow::Result<()> {
    block_on(async {
        let v = get_json(api, "/api/v1/proxies").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!(
            "{:<12} {:<14} {:<14} {:<21} {:<21} {:>8} {:<6} {:<9}",
            "NAMESPACE", "SERVICE", "INSTANCE", "INBOUND", "ADMIN", "VERSION", "ACKED", "CONNECTED"
        );
        for p in v.as_array().into_iter().flatten() {
            let s = |k: &str| p.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
            let acked = p
                .get("config_acked")
                .and_then(|x| x.as_bool())
                .unwrap_or(false);
            let connected = p
                .get("connected")
                .and_then(|x| x.as_bool())
                .unwrap_or(false);
            println!(
                "{:<12} {:<14} {:<14} {:<21} {:<21} {:>8} {:<6} {:<9}",
                s("namespace"),
                s("service"),
                s("instance"),
                s("inbound"),
                s("admin"),
                p.get("config_version")
                    .and_then(|x| x.as_u64())
                    .unwrap_or(0),
                if acked { "yes" } else { "NO" },
                if connected { "yes" } else { "no" },
            );
            if let Some(reason) = p.get("nack_reason").and_then(|x| x.as_str()) {
                println!("    refused its config: {reason}");
            }
        }
        Ok(())
    })
}
