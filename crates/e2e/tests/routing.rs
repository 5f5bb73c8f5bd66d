//! Routing and live config: weighted splits, header matches, blue-green
//! switches applied without restarts or failed requests, broken edits
//! refused.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tandem_e2e::*;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET through a sidecar's HTTP proxy port; returns (status, version field).
async fn get(
    c: &HttpClient,
    proxy: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut req = http::Request::get(format!("http://{proxy}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::new()).expect("request");
    match c.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            (status, v["version"].as_str().unwrap_or("").to_string())
        }
        Err(_) => (0, String::new()),
    }
}

/// Sends `n` requests for `catalog`, 16 at a time; counts answers by version.
async fn spread(
    proxy: std::net::SocketAddr,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    spread_to(proxy, "catalog", n, headers).await
}

async fn spread_to(
    proxy: std::net::SocketAddr,
    host: &'static str,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    let c = http_client();
    let mut counts = HashMap::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, sem) = (c.clone(), sem.clone());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.expect("permit");
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            get(&c, proxy, host, "/", &h).await
        }));
    }
    for t in tasks {
        let (status, version) = t.await.expect("task");
        let key = if status == 200 {
            version
        } else {
            format!("status {status}")
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Requests answered by either catalog version.
fn served(counts: &HashMap<String, usize>) -> usize {
    counts.get("v1").copied().unwrap_or(0) + counts.get("v2").copied().unwrap_or(0)
}

fn catalog_mesh() -> (Mesh, Instance, Instance, Instance) {
    let mesh = Mesh::start(&common::config());
    let v1 = mesh.instance("catalog-v1", "catalog-v1-a", &["--version", "v1"], &[]);
    let v2 = mesh.instance("catalog-v2", "catalog-v2-a", &["--version", "v2"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // The first request makes the client's sidecar discover `catalog`.
    let warm = rt().block_on(spread(client.http_proxy, 10, &[]));
    assert_eq!(warm.values().sum::<usize>(), served(&warm), "{warm:?}");
    (mesh, v1, v2, client)
}

#[test]
fn weighted_split_and_header_match() {
    let (_mesh, _v1, _v2, client) = catalog_mesh();
    let rt = rt();
    // 90/10 over 3000 requests: v2 expects 300, sd ~16.4; ±5 sd bounds.
    let counts = rt.block_on(spread(client.http_proxy, 3000, &[]));
    let v1 = counts.get("v1").copied().unwrap_or(0);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 3000, "{counts:?}");
    assert!((218..=382).contains(&v2), "v2 got {v2} of 3000: {counts:?}");

    // The header rule sends everything to v2.
    let counts = rt.block_on(spread(client.http_proxy, 200, &[("x-canary", "1")]));
    assert_eq!(counts.get("v2"), Some(&200), "{counts:?}");
}

/// Applies `(v1, v2)` weights to the catalog split and waits until the
/// client's sidecar runs them.
fn apply_split(mesh: &Mesh, client: &Instance, v1: u32, v2: u32) {
    let before = client.config_version();
    mesh.write_config("mesh.yaml", &common::config_with_split(v1, v2));
    wait_for("client to apply the edit", Duration::from_secs(10), || {
        (client.config_version() > before).then_some(())
    });
}

/// Blue-green: all traffic from v1 (blue) to v2 (green) and back, under
/// steady load, with requests in progress across both switches.
#[test]
fn blue_green_switches_live_without_failed_requests() {
    let (mesh, v1, v2, client) = catalog_mesh();
    let pid = client.proxy().pid();
    apply_split(&mesh, &client, 100, 0);
    let rt = rt();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let proxy = client.http_proxy;
    // Steady traffic...
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(rt.spawn(async move {
            let c = http_client();
            while !stop.load(Ordering::Relaxed) {
                let (status, _) = get(&c, proxy, "catalog", "/", &[]).await;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed)
                } else {
                    failed.fetch_add(1, Ordering::Relaxed)
                };
            }
        }));
    }
    // ...and two requests held at blue while traffic moves to green and
    // back.
    let held: Vec<_> = (0..2)
        .map(|_| {
            rt.spawn(
                async move { get(&http_client(), proxy, "catalog", "/hold?key=edit", &[]).await },
            )
        })
        .collect();
    wait_for("two requests held at blue", Duration::from_secs(20), || {
        (v1.held("edit")["waiting"] == 2).then_some(())
    });
    let progress = |more: u64| {
        let target = ok.load(Ordering::Relaxed) + more;
        wait_for("requests answered", Duration::from_secs(20), || {
            (ok.load(Ordering::Relaxed) >= target).then_some(())
        });
    };
    progress(20);
    apply_split(&mesh, &client, 0, 100);
    progress(20);
    let counts = rt.block_on(spread(client.http_proxy, 100, &[]));
    assert_eq!(counts.get("v2"), Some(&100), "green: {counts:?}");
    apply_split(&mesh, &client, 100, 0);
    progress(20);
    let counts = rt.block_on(spread(client.http_proxy, 100, &[]));
    assert_eq!(counts.get("v1"), Some(&100), "blue again: {counts:?}");
    // The held requests finish where they started.
    v1.open("edit");
    for h in held {
        let (status, version) = rt.block_on(h).expect("held request");
        assert_eq!((status, version.as_str()), (200, "v1"), "held request");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        rt.block_on(w).expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the switches"
    );
    assert_eq!(v2.held("edit")["arrived"], 0);
    // Same process throughout.
    assert_eq!(client.proxy().pid(), pid);
    mesh.wait_converged(3);
}

#[test]
fn broken_config_is_refused_and_traffic_keeps_flowing() {
    let (mesh, _v1, _v2, client) = catalog_mesh();
    mesh.wait_converged(3);
    let version = client.config_version();
    mesh.write_config(
        "broken.yaml",
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: broken}\nspec:\n  ports: [{port: 80, protocl: http}]\n",
    );
    let errors = wait_for(
        "the control plane to refuse the edit",
        Duration::from_secs(10),
        || {
            let v = mesh.api_json("/api/v1/config")?;
            let e = v["errors"].as_array()?.clone();
            (!e.is_empty()).then_some(e)
        },
    );
    let first = errors[0].as_str().unwrap_or("");
    assert!(first.contains("broken.yaml:5:"), "{errors:?}");
    assert!(first.contains("protocl"), "{errors:?}");
    assert!(mesh
        .control
        .as_ref()
        .map(|c| c.log_text())
        .unwrap_or_default()
        .contains("broken.yaml:5:"));
    // The last good config keeps serving.
    let rt = rt();
    let counts = rt.block_on(spread(client.http_proxy, 200, &[]));
    assert_eq!(served(&counts), 200, "{counts:?}");
    assert_eq!(client.config_version(), version);
    // Fixing the file clears the error.
    mesh.write_config(
        "broken.yaml",
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: broken}\nspec:\n  ports: [{port: 80, protocol: http}]\n",
    );
    wait_for("the fix to be accepted", Duration::from_secs(10), || {
        let v = mesh.api_json("/api/v1/config")?;
        (v["errors"].as_array()?.is_empty() && v["services"] == 10).then_some(())
    });
}

#[test]
fn control_plane_down_then_back() {
    let (mut mesh, _v1, _v2, client) = catalog_mesh();
    mesh.wait_converged(3);
    if let Some(c) = mesh.control.as_mut() {
        c.kill();
    }
    wait_for("proxy to notice", Duration::from_secs(10), || {
        client
            .metrics()
            .contains("tandem_control_plane_connected 0")
            .then_some(())
    });
    // A destination it never needed cannot be discovered now: a clear 503.
    let r = curl(&[
        "-x",
        &format!("http://{}", client.http_proxy),
        "-D",
        "-",
        "http://web/",
    ]);
    assert!(r.stdout.starts_with("HTTP/1.1 503"), "{}", r.stdout);
    assert!(
        r.stdout.contains("tandem-error: discovery-unavailable"),
        "{}",
        r.stdout
    );
    // Traffic flows on the last config.
    let rt = rt();
    let counts = rt.block_on(spread(client.http_proxy, 200, &[]));
    assert_eq!(served(&counts), 200, "{counts:?}");

    // A new control plane (same addresses) gets every proxy back.
    mesh.write_config("mesh.yaml", &common::config_with_split(0, 100));
    let before = client.config_version();
    mesh.start_control();
    // While the proxies reconnect one by one, none gets a snapshot that
    // lacks the endpoints of those not back yet: traffic keeps flowing
    // until every proxy runs the config the new control plane found.
    wait_for(
        "every proxy back on the new config",
        Duration::from_secs(30),
        || {
            let counts = rt.block_on(spread(client.http_proxy, 40, &[]));
            assert_eq!(served(&counts), 40, "during reconnection: {counts:?}");
            let ps = mesh.proxies();
            let back = ps.len() == 3
                && ps
                    .iter()
                    .all(|p| p["connected"] == true && p["config_acked"] == true);
            (back && client.config_version() > before).then_some(())
        },
    );
    assert_eq!(
        metric(&client.metrics(), "tandem_control_plane_connected"),
        Some(1.0)
    );
    let counts = rt.block_on(spread(client.http_proxy, 50, &[]));
    assert_eq!(counts.get("v2"), Some(&50), "{counts:?}");
}

#[test]
fn endpoints_follow_instances() {
    let (mesh, _v1, mut v2, client) = catalog_mesh();
    // A second v1 instance joins and gets traffic.
    let _v1b = mesh.instance("catalog-v1", "catalog-v1-b", &["--version", "v1"], &[]);
    wait_for("two v1 endpoints", Duration::from_secs(10), || {
        (client.endpoints("catalog", "catalog-v1")?.len() == 2).then_some(())
    });
    // The v2 sidecar goes away: after the grace period it is no longer an
    // endpoint, and v2's share gets a clear 503 instead of a hang.
    v2.proxy_mut().kill();
    wait_for("v2 removed", Duration::from_secs(10), || {
        client
            .endpoints("catalog", "catalog-v2")?
            .is_empty()
            .then_some(())
    });
    let rt = rt();
    let counts = rt.block_on(spread(client.http_proxy, 300, &[]));
    assert_eq!(counts.get("v2"), None, "{counts:?}");
    assert!(
        counts.get("status 503").copied().unwrap_or(0) > 0,
        "{counts:?}"
    );
    assert!(counts.get("v1").copied().unwrap_or(0) > 200, "{counts:?}");
}

#[test]
fn slow_endpoint_gets_little_traffic() {
    let mesh = Mesh::start(&common::config());
    let _fast = mesh.instance("catalog-v1", "fast", &["--version", "fast"], &[]);
    let _slow = mesh.instance(
        "catalog-v1",
        "slow",
        &["--version", "slow", "--latency", "100ms"],
        &[],
    );
    let client = mesh.instance("client", "client-1", &[], &[]);
    let rt = rt();
    wait_for("both endpoints", Duration::from_secs(10), || {
        rt.block_on(spread_to(client.http_proxy, "catalog-v1", 1, &[]));
        (client.endpoints("catalog-v1", "catalog-v1")?.len() == 2).then_some(())
    });
    // Peak-EWMA with power of two choices: the endpoint that is 100x slower
    // gets a small share, where round-robin would give it half.
    let counts = rt.block_on(spread_to(client.http_proxy, "catalog-v1", 600, &[]));
    let slow = counts.get("slow").copied().unwrap_or(0);
    let fast = counts.get("fast").copied().unwrap_or(0);
    eprintln!("peak-EWMA spread: {counts:?}");
    assert_eq!(slow + fast, 600, "{counts:?}");
    assert!(slow < 120, "slow endpoint got {slow} of 600: {counts:?}");
    assert!(slow > 0, "the slow endpoint is still tried: {counts:?}");
}
