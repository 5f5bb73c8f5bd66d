//! The read commands: `tandem stat` and `tandem status`, talking to the
//! control plane's HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where the control plane's API is and the admin credential it takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ApiArgs {
    /// Control-plane API address.
    #[arg(long, default_value = tandem_control::DEFAULT_API, env = "TANDEM_API")]
    pub api: SocketAddr,
    /// The control plane's data directory, where its admin credential is
    /// (`admin.token`). Default: the one `tandem up` uses.
    #[arg(long, env = "TANDEM_DATA")]
    pub data: Option<PathBuf>,
    /// A file holding the admin credential (taken before --data).
    #[arg(long, env = "TANDEM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// The API and the credential to present.
#[derive(Clone, Debug)]
pub struct Target {
    pub api: SocketAddr,
    /// The credential and the file it came from (for error messages).
    credential: Option<(String, PathBuf)>,
}

impl ApiArgs {
    /// Reads the credential: from --admin-token-file, else from --data's
    /// `admin.token`, else from the data directory `tandem up` uses by
    /// default, if there is one.
    pub fn target(&self) -> anyhow::Result<Target> {
        let file = match (&self.admin_token_file, &self.data) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(d)) => Some(d.join(tandem_control::api::ADMIN_CREDENTIAL)),
            (None, None) => {
                let f = crate::up::default_state_dir()
                    .join("data")
                    .join(tandem_control::api::ADMIN_CREDENTIAL);
                f.exists().then_some(f)
            }
        };
        let credential = match file {
            Some(f) => {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read the admin credential {}", f.display()))?;
                Some((text.trim().to_string(), f))
            }
            None => None,
        };
        Ok(Target {
            api: self.api,
            credential,
        })
    }
}

impl Target {
    /// The API of a control plane whose data directory is `data`.
    pub fn local(api: SocketAddr, data: &Path) -> anyhow::Result<Target> {
        ApiArgs {
            api,
            data: Some(data.to_path_buf()),
            admin_token_file: None,
        }
        .target()
    }

    /// The dashboard's address with its login token.
    pub fn dashboard_url(&self) -> anyhow::Result<String> {
        let Some((credential, _)) = &self.credential else {
            anyhow::bail!(
                "the dashboard's login token comes from the admin credential: pass the control plane's data directory (--data or TANDEM_DATA) or --admin-token-file"
            );
        };
        Ok(format!(
            "http://{}/dashboard?token={}",
            self.api,
            tandem_control::api::dashboard_token(credential)
        ))
    }
}

pub async fn get_json(api: &Target, path: &str) -> anyhow::Result<serde_json::Value> {
    call_json(api, hyper::Method::GET, path).await
}

pub async fn call_json(
    target: &Target,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    send_json(target, method, path, None).await
}

/// A call with a JSON body (`POST /api/v1/explain`), or none.
pub async fn send_json(
    target: &Target,
    method: hyper::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let api = target.api;
    let client: Client<_, Full<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"));
    if let Some((credential, _)) = &target.credential {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {credential}"));
    }
    let req = match body {
        Some(b) => req
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(serde_json::to_vec(b)?.into()))?,
        None => req.body(Full::default())?,
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .context("the control plane did not answer in 5s")?
        .with_context(|| format!("cannot reach the control plane API at {api} (is `tandem control` or `tandem up` running? set --api)"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status == hyper::StatusCode::UNAUTHORIZED {
        match &target.credential {
            Some((_, f)) => anyhow::bail!(
                "the control plane at {api} refused the admin credential in {} (is it this control plane's data directory?)",
                f.display()
            ),
            None => anyhow::bail!(
                "the control plane at {api} needs its admin credential: pass its data directory (--data or TANDEM_DATA) or --admin-token-file"
            ),
        }
    }
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        anyhow::bail!("control plane answered {status}: {msg}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// `GET path` whose answer is read as it comes (a tap): the response, once
/// its status says the call was taken.
pub async fn get_stream(
    target: &Target,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let api = target.api;
    let client: Client<_, Full<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().uri(format!("http://{api}{path}"));
    if let Some((credential, _)) = &target.credential {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {credential}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(req.body(Full::default())?),
    )
    .await
    .context("the control plane did not answer in 5s")?
    .with_context(|| format!("cannot reach the control plane API at {api}"))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    anyhow::bail!("control plane answered {status}: {msg}")
}

pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

pub use tandem_control::stats::PairStat as StatRow;

pub fn stat_table(rows: &[StatRow]) -> String {
    let mut out = format!(
        "{:<14} {:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13}\n",
        "SOURCE",
        "DESTINATION",
        "RPS",
        "SUCCESS",
        "P50(ms)",
        "P95(ms)",
        "P99(ms)",
        "REQUESTS",
        "RETRIES",
        "RAW",
        "PROXY P99(ms)"
    );
    if rows.is_empty() {
        out.push_str("(no traffic in this window)\n");
    }
    for r in rows {
        let raw = match r.raw_success_rate {
            Some(x) => format!("{:.2}%", x * 100.0),
            None => "-".to_string(),
        };
        // The time the two sidecars took themselves: the caller's, then
        // the destination's.
        let side = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let proxy = format!("{}+{}", side(r.proxy_p99_ms), side(r.dst_proxy_p99_ms));
        out.push_str(&format!(
            "{:<14} {:<14} {:>9.1} {:>8.2}% {:>9.2} {:>9.2} {:>9.2} {:>9} {:>9} {:>9} {:>13}\n",
            r.source,
            r.destination,
            r.rps,
            r.success_rate * 100.0,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.requests,
            r.retries,
            raw,
            proxy
        ));
    }
    out
}

pub async fn fetch_stats(api: &Target, window: Duration) -> anyhow::Result<Vec<StatRow>> {
    let v = get_json(
        api,
        &format!("/api/v1/stats?window={}ms", window.as_millis().max(1)),
    )
    .await?;
    Ok(serde_json::from_value(v)?)
}

pub fn stat(api: &ApiArgs, window: Duration, json: bool) -> anyhow::Result<()> {
    let api = &api.target()?;
    block_on(async {
        if json {
            let v = get_json(
                api,
                &format!("/api/v1/stats?window={}ms", window.as_millis().max(1)),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", stat_table(&fetch_stats(api, window).await?));
        }
        Ok(())
    })
}

pub fn status(api: &ApiArgs, json: bool) -> anyhow::Result<()> {
    let api = &api.target()?;
    block_on(async {
        let v = get_json(api, "/api/v1/proxies").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!(
            "{:<12} {:<14} {:<14} {:<21} {:>8} {:<6} {:<9} {:<50} {:<16} {:<16}",
            "NAMESPACE",
            "SERVICE",
            "INSTANCE",
            "INBOUND",
            "VERSION",
            "ACKED",
            "CONNECTED",
            "IDENTITY",
            "CERT EXPIRES IN",
            "SIGNED BY"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
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
            let expires = match p.get("cert_not_after").and_then(|x| x.as_u64()) {
                Some(t) if t > now => human(t - now),
                Some(_) => "EXPIRED".to_string(),
                None => "-".to_string(),
            };
            println!(
                "{:<12} {:<14} {:<14} {:<21} {:>8} {:<6} {:<9} {:<50} {:<16} {:<16}",
                s("namespace"),
                s("service"),
                s("instance"),
                s("inbound"),
                p.get("config_version")
                    .and_then(|x| x.as_u64())
                    .unwrap_or(0),
                if acked { "yes" } else { "NO" },
                if connected { "yes" } else { "no" },
                s("spiffe_id"),
                expires,
                s("cert_signer"),
            );
            if let Some(reason) = p.get("nack_reason").and_then(|x| x.as_str()) {
                println!("    refused its config: {reason}");
            }
        }
        // Weights a rollout put in force instead of the routes' own.
        let rollouts: Vec<tandem_control::rollout::View> =
            serde_json::from_value(get_json(api, "/api/v1/rollouts").await?)?;
        if !rollouts.is_empty() {
            println!("\nROLLOUTS (weights in force on the rules they drive, and why)");
            for r in &rollouts {
                println!("  {}", crate::rollout::summary(r));
            }
        }
        store_section(&get_json(api, "/api/v1/store").await?, now);
        clusters_section(&get_json(api, "/api/v1/clusters").await?, now);
        Ok(())
    })
}

/// What this cluster exports and what it imports from other clusters
/// (nothing when it does neither).
fn clusters_section(v: &serde_json::Value, now: u64) {
    let exports = v["exports"]["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let remotes = v["remotes"].as_array().cloned().unwrap_or_default();
    if exports.is_empty() && remotes.is_empty() {
        return;
    }
    println!("\nCLUSTER {}", v["cluster"].as_str().unwrap_or("-"));
    for s in &exports {
        println!(
            "  exports {}/{} ({} endpoints)",
            s["namespace"].as_str().unwrap_or(""),
            s["service"].as_str().unwrap_or(""),
            s["endpoints"].as_array().map_or(0, Vec::len)
        );
    }
    for r in &remotes {
        let name = r["name"].as_str().unwrap_or("-");
        let age = match r["fetched"].as_u64() {
            Some(0) | None => "never read".to_string(),
            Some(t) => format!("read {} ago", human(now.saturating_sub(t))),
        };
        println!(
            "  remote {name} at {} ({age})",
            r["api"].as_str().unwrap_or("-")
        );
        if let Some(e) = r["error"].as_str() {
            println!("    UNREACHABLE: {e}");
        }
        for s in r["services"].as_array().into_iter().flatten() {
            println!(
                "    imports {} ({} endpoints)",
                s[0].as_str().unwrap_or(""),
                s[1].as_u64().unwrap_or(0)
            );
        }
    }
}

/// The replicas sharing etcd and the health of its members (nothing for
/// a control plane alone on its data directory).
fn store_section(v: &serde_json::Value, now: u64) {
    if v["kind"] != "etcd" {
        return;
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!(
        "\nSTORE {} (this replica: {}; leader: {})",
        s(&v["location"]),
        s(&v["replica"]),
        s(&v["leader"])
    );
    if let Some(e) = v["error"].as_str() {
        println!("  UNREACHABLE: {e}");
    }
    println!(
        "  {:<24} {:<10} {:<7} {:>10}  STATUS",
        "MEMBER", "VERSION", "LEADER", "DB SIZE"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        let status = m["error"]
            .as_str()
            .map_or("ok".to_string(), |e| format!("DOWN: {e}"));
        println!(
            "  {:<24} {:<10} {:<7} {:>10}  {status}",
            s(&m["endpoint"]),
            s(&m["version"]),
            if m["leader"] == true { "yes" } else { "" },
            format!("{} KiB", m["db_size"].as_i64().unwrap_or(0) / 1024),
        );
    }
    println!("\nREPLICAS");
    println!(
        "  {:<24} {:<24} {:<24} {:<10} UP FOR",
        "NAME", "GRPC", "API", "VERSION"
    );
    for r in v["replicas"].as_array().into_iter().flatten() {
        let up = r["started"]
            .as_u64()
            .map_or("-".to_string(), |t| human(now.saturating_sub(t)));
        println!(
            "  {:<24} {:<24} {:<24} {:<10} {up}",
            s(&r["name"]),
            s(&r["grpc"]),
            s(&r["api"]),
            s(&r["version"]),
        );
    }
}

/// `3h12m`, `45s`: a duration for people.
pub fn human(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86400, (secs % 86400) / 3600),
    }
}
