//! `tandem tap SERVICE`: a live stream of summaries of the requests a
//! service's sidecars handle, as the control plane relays them.

use std::io::Write;
use std::time::Duration;

use http_body_util::BodyExt;

use crate::api;

#[derive(clap::Args)]
pub struct TapArgs {
    /// The service to tap (`name` or `name.namespace`).
    service: String,
    /// Only requests whose path is under this prefix.
    #[arg(long, default_value = "/")]
    path: String,
    /// Only requests with this method.
    #[arg(long)]
    method: Option<String>,
    /// Summaries a second, at most, from each sidecar (1 to 1000).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Show header values (credentials stay redacted).
    #[arg(long)]
    reveal_headers: bool,
    /// Stop after this many requests.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = crate::parse_duration)]
    duration: Option<Duration>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: crate::Output,
    #[command(flatten)]
    api: api::ApiArgs,
}

pub fn run(args: TapArgs) -> anyhow::Result<()> {
    let target = args.api.target()?;
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut path = format!(
        "/api/v1/tap?service={}&path={}&rate={}",
        enc(&args.service),
        enc(&args.path),
        args.rate
    );
    if let Some(m) = &args.method {
        path.push_str(&format!("&method={}", enc(m)));
    }
    if args.reveal_headers {
        path.push_str("&headers=reveal");
    }
    if let Some(n) = args.count {
        path.push_str(&format!("&max={n}"));
    }
    let json = args.output == crate::Output::Json;
    api::block_on(async {
        let resp = api::get_stream(&target, &path).await?;
        let mut body = resp.into_body();
        let until = args.duration.map(|d| tokio::time::Instant::now() + d);
        let mut buf: Vec<u8> = Vec::new();
        let mut first = true;
        loop {
            let frame = match until {
                Some(t) => match tokio::time::timeout_at(t, body.frame()).await {
                    Ok(f) => f,
                    Err(_) => return Ok(()),
                },
                None => tokio::select! {
                    f = body.frame() => f,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                },
            };
            let Some(frame) = frame else { return Ok(()) };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                let mut out = std::io::stdout().lock();
                if first {
                    first = false;
                    if !json {
                        let v: serde_json::Value = serde_json::from_str(&line)?;
                        writeln!(
                            out,
                            "tapping {} on {} sidecar(s); Ctrl-C to stop",
                            v["service"].as_str().unwrap_or("?"),
                            v["proxies"]
                        )?;
                    }
                    continue;
                }
                if json {
                    writeln!(out, "{line}")?;
                } else {
                    let v: serde_json::Value = serde_json::from_str(&line)?;
                    writeln!(out, "{}", summary_line(&v))?;
                }
                out.flush()?;
            }
        }
    })
}

/// `14:13:41.507 inbound client → web GET web:8080/items 200 1.82ms (0.09ms) trace 5bf9…`
fn summary_line(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let time = s("time");
    let time = time.get(11..23).unwrap_or(&time);
    let flag = v["flag"]
        .as_str()
        .map(|f| format!(" {f}"))
        .unwrap_or_default();
    format!(
        "{time} {:<8} {} -> {} {} {}{} {}{flag} {:.2}ms (own {:.2}ms) trace {}",
        s("direction"),
        s("src_service"),
        s("dst_service"),
        s("method"),
        s("authority"),
        s("path"),
        v["status"],
        v["duration_ms"].as_f64().unwrap_or(0.0),
        v["proxy_ms"].as_f64().unwrap_or(0.0),
        s("trace_id"),
    )
}
