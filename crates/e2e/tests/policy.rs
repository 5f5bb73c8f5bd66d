//! TrafficPolicy end to end: retries, budgets, replay rules and timeouts,
//! with real sidecars in front of demo apps that fail on purpose.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use tandem_e2e::{
    curl, http_get, metric, metric_sum, patience, settled_rss, wait_for, Instance, KeepAlive, Mesh,
    TempDir,
};

fn policy(service: &str, spec: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {service}}}\nspec:\n  targetRef: {{kind: Service, name: {service}}}\n{spec}---\n"
    )
}

/// Requests the web sidecar passed to its app, by status.
fn inbound_requests(web: &Instance) -> f64 {
    web.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("tandem_requests_total{")
                && l.contains(r#"direction="inbound""#)
                && l.contains(r#"src_service="client""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn retries(client: &Instance) -> f64 {
    metric(
        &client.metrics(),
        r#"tandem_retries_total{src_service="client",dst_service="web"}"#,
    )
    .unwrap_or(0.0)
}

/// `curl -x client http://web<path>` with extra args; (status line + headers, body).
fn via_client(client: &Instance, path: &str, extra: &[&str]) -> (String, String) {
    let proxy = format!("http://{}", client.http_proxy);
    let url = format!("http://web{path}");
    let mut args = vec!["-s", "-D", "-", "-x", proxy.as_str()];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    let out = curl(&args);
    match out.stdout.split_once("\r\n\r\n") {
        Some((h, b)) => (h.to_string(), b.to_string()),
        None => (out.stdout, String::new()),
    }
}

#[test]
fn retries_turn_a_flaky_upstream_into_success() {
    let mut config = common::config();
    // A budget that never binds here, so the figures below are the
    // failure rate's alone.
    config.push_str(&policy(
        "web",
        "  retry: {attempts: 4, on: [5xx], budget: {percent: 100}}\n",
    ));
    let mesh = Mesh::start(&config);
    let _web1 = mesh.instance("web", "web-1", &["--failure-rate", "0.2"], &[]);
    let _web2 = mesh.instance("web", "web-2", &["--failure-rate", "0.2"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let total = 1000;
    let ok = (0..total)
        .filter(|_| matches!(http_get(client.http_proxy, "web", "/"), Some((200, _))))
        .count();
    // A request fails only if all four tries do: 0.2^4, 1.6 expected in
    // 1000; more than 10 has a chance of about 1e-6.
    assert!(ok >= total - 10, "{ok} of {total} succeeded");
    // Retries per request: 0.2 + 0.04 + 0.008 expected (248 in 1000), sd
    // 0.55 per request (17 in 1000); the bounds are 5 sd.
    let r = retries(&client);
    assert!((160.0..=340.0).contains(&r), "{r} retries");
    // `tandem stat` shows both sides: what the caller got, and the raw
    // answers of the two instances.
    let row = wait_for("client->web stats", Duration::from_secs(10), || {
        let rows = mesh.api_json("/api/v1/stats?window=60s")?;
        let row = rows
            .as_array()?
            .iter()
            .find(|r| r["source"] == "client" && r["destination"] == "web")?
            .clone();
        // The first scrape may come after the first requests.
        (row["requests"].as_u64()? >= total as u64 * 9 / 10).then_some(row)
    });
    assert!(row["success_rate"].as_f64().unwrap() >= 0.99, "{row}");
    assert!(row["retries"].as_u64().unwrap() >= 90, "{row}");
    let raw = row["raw_success_rate"].as_f64().unwrap();
    assert!((0.7..0.9).contains(&raw), "{row}");
}

#[test]
fn the_retry_budget_stops_a_storm() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  retry: {attempts: 3, on: [5xx], budget: {percent: 20, minPerSecond: 0}}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &["--failure-rate", "1.0"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let total = 200;
    let mut flags = std::collections::HashMap::new();
    for _ in 0..total {
        let (head, _) = via_client(&client, "/", &[]);
        assert!(head.starts_with("HTTP/1.1 500"), "{head}");
        let flag = head
            .lines()
            .find_map(|l| l.strip_prefix("tandem-error: "))
            .unwrap_or("none")
            .to_string();
        *flags.entry(flag).or_insert(0) += 1;
    }
    // Retries stay within 20 % of the requests: no storm.
    let seen = wait_for("inbound metrics", Duration::from_secs(5), || {
        let n = inbound_requests(&web);
        (n >= total as f64).then_some(n)
    });
    assert!(
        seen <= 1.2 * total as f64 + 1.0,
        "upstream saw {seen} requests for {total}"
    );
    // Every answer says why it was not retried further.
    assert!(
        flags.get("retry-budget-exhausted").copied().unwrap_or(0) > total / 2,
        "{flags:?}"
    );
    assert_eq!(flags.get("none"), None, "{flags:?}");
}

#[test]
fn small_bodies_are_replayed_large_ones_never() {
    let mut config = common::config();
    config.push_str(&policy("web", "  retry: {attempts: 2, on: [\"503\"]}\n"));
    let mesh = Mesh::start(&config);
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let scratch = TempDir::new("bodies");
    let fnv = |b: &[u8]| {
        format!(
            "{:016x}",
            b.iter()
                .fold(0xcbf29ce484222325u64, |h, x| (h ^ u64::from(*x))
                    .wrapping_mul(0x100000001b3))
        )
    };
    // A small POST that fails once is retried, and the app gets the same body.
    let small: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let small_file = scratch.0.join("small");
    std::fs::write(&small_file, &small).unwrap();
    let data = format!("@{}", small_file.display());
    let (head, body) = via_client(
        &client,
        "/flaky?key=small&fails=1",
        &["-H", "Expect:", "--data-binary", &data],
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["attempt"], 2, "{v}");
    assert_eq!(v["body_len"], small.len(), "{v}");
    assert_eq!(v["body_fnv1a"], fnv(&small), "{v}");
    assert_eq!(retries(&client), 1.0);
    // A 1 MiB POST is never buffered for replay: its failure comes back.
    let big: Vec<u8> = (0..(1 << 20) as u32).map(|i| (i % 253) as u8).collect();
    let big_file = scratch.0.join("big");
    std::fs::write(&big_file, &big).unwrap();
    let data = format!("@{}", big_file.display());
    let (head, body) = via_client(
        &client,
        "/flaky?key=big&fails=1",
        &["-H", "Expect:", "--data-binary", &data],
    );
    assert!(head.starts_with("HTTP/1.1 503"), "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["attempt"].as_u64(), v["body_len"].as_u64()),
        (Some(1), Some(1 << 20))
    );
    assert_eq!(retries(&client), 1.0);
    // Without a length (chunked), the body streams to the first try while
    // a copy is kept: a small one is replayed byte for byte ...
    let chunked = ["-H", "Expect:", "-H", "Transfer-Encoding: chunked"];
    let data = format!("@{}", small_file.display());
    let mut args = chunked.to_vec();
    args.extend(["--data-binary", data.as_str()]);
    let (head, body) = via_client(&client, "/flaky?key=small-chunked&fails=1", &args);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["attempt"], 2, "{v}");
    assert_eq!(v["body_len"], small.len(), "{v}");
    assert_eq!(v["body_fnv1a"], fnv(&small), "{v}");
    assert_eq!(retries(&client), 2.0);
    // ... and one that outgrows the copy is not retried.
    let data = format!("@{}", big_file.display());
    let mut args = chunked.to_vec();
    args.extend(["--data-binary", data.as_str()]);
    let (head, body) = via_client(&client, "/flaky?key=big-chunked&fails=1", &args);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["attempt"].as_u64(), v["body_len"].as_u64()),
        (Some(1), Some(1 << 20))
    );
    assert_eq!(retries(&client), 2.0);
}

/// gRPC clients send no `content-length`: the call's body is kept while it
/// streams, so a call failing with UNAVAILABLE is retried.
#[test]
fn grpc_calls_are_retried() {
    use tandem_api::v1::echo_client::EchoClient;
    use tandem_api::v1::EchoRequest;
    let mut config = common::config();
    config.push_str(&policy(
        "grpc-echo",
        "  retry: {attempts: 2, on: [unavailable]}\n",
    ));
    let mesh = Mesh::start(&config);
    let _grpc = mesh.instance("grpc-echo", "grpc-echo-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["grpc-echo"]);
    let grpc_retries = || {
        metric(
            &client.metrics(),
            r#"tandem_retries_total{src_service="client",dst_service="grpc-echo"}"#,
        )
        .unwrap_or(0.0)
    };
    let payload: String = (0..8192u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    tandem_e2e::rt().block_on(async {
        let mut c = EchoClient::connect(format!("http://{}", client.upstream("grpc-echo")))
            .await
            .unwrap();
        // Fails once, then the second call gets the very same message.
        let m = format!("flaky:once:1:{payload}");
        let r = c
            .unary(EchoRequest {
                message: m.clone(),
                count: 0,
            })
            .await
            .unwrap();
        assert_eq!(r.get_ref().message, format!("call 2: {m}"));
        // Failing every time: three calls, then the last status, flagged.
        let e = c
            .unary(EchoRequest {
                message: "flaky:always:9:x".into(),
                count: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert_eq!(e.message(), "call 3 fails on purpose");
        assert_eq!(
            e.metadata()
                .get("tandem-error")
                .and_then(|v| v.to_str().ok()),
            Some("retry-limit-exhausted")
        );
        // A message larger than the 64 KiB copy gets one call.
        let big: String = payload.repeat(10);
        let e = c
            .unary(EchoRequest {
                message: format!("flaky:big:1:{big}"),
                count: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert_eq!(e.message(), "call 1 fails on purpose");
    });
    assert_eq!(grpc_retries(), 3.0);
}

#[test]
fn timeouts_fire_on_time_with_a_504() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  timeout: 1s\n  retry: {attempts: 5, on: [5xx], perTryTimeout: 300ms}\n",
    ));
    config.push_str(&policy(
        "lonely",
        "  retry: {attempts: 1, on: [gateway-error], perTryTimeout: 300ms, backoff: {base: 10ms, max: 10ms}}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let lonely = mesh.instance("lonely", "lonely-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // A fast answer is untouched.
    let (head, _) = via_client(&client, "/slow?ms=10&key=fast", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(web.counters("fast")["completed"], 1);
    // The whole request: bounded by the 1 s timeout although each try has
    // 300 ms and could be retried five times. Three tries fit (a fourth
    // may start and is cut at the deadline); none is let run past it.
    let retried = retries(&client);
    let start = Instant::now();
    let (head, body) = via_client(&client, "/slow?ms=2000&key=whole", &[]);
    let took = start.elapsed();
    assert!(head.starts_with("HTTP/1.1 504"), "{head}\n{body}");
    assert!(head.contains("tandem-error: upstream-timeout"), "{head}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let tries = retries(&client) - retried + 1.0;
    assert!((3.0..=4.0).contains(&tries), "{tries} tries");
    // Every try given up on was cancelled at the app too: none answered.
    // A fourth try that starts just before the deadline may be cut before
    // it reaches the app, so the app saw three tries or all of them.
    let c = web.wait_settled("whole", Duration::from_secs(10));
    let started = c["started"].as_u64().unwrap_or(0);
    assert!(
        (3..=tries as u64).contains(&started),
        "{c} for {tries} tries"
    );
    assert_eq!(c["cancelled"], started, "{c}");
    assert_eq!(c["completed"], 0, "{c}");
    // Per try only: two tries of 300 ms, then the timeout answers.
    let start = Instant::now();
    let proxy = format!("http://{}", client.http_proxy);
    let out = curl(&[
        "-s",
        "-D",
        "-",
        "-x",
        &proxy,
        "http://lonely/slow?ms=5000&key=tries",
    ]);
    let took = start.elapsed();
    assert!(out.stdout.starts_with("HTTP/1.1 504"), "{}", out.stdout);
    assert!(out.stdout.contains("after 2 tries"), "{}", out.stdout);
    assert!(took >= Duration::from_millis(600), "{took:?}");
    let c = lonely.wait_settled("tries", Duration::from_secs(10));
    assert_eq!(c["started"], 2, "{c}");
    assert_eq!(c["cancelled"], 2, "{c}");
}

#[test]
fn a_policy_edit_applies_without_restart() {
    let mesh = Mesh::start(&common::config());
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let pid = client.proxy().pid();
    // No policy: the failure reaches the caller.
    let (head, _) = via_client(&client, "/flaky?key=before&fails=1", &[]);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let before = client.config_version();
    mesh.write_config(
        "policy.yaml",
        &policy("web", "  retry: {attempts: 2, on: [\"503\"]}\n"),
    );
    wait_for("the policy to arrive", Duration::from_secs(10), || {
        (client.config_version() > before).then_some(())
    });
    let (head, body) = via_client(&client, "/flaky?key=after&fails=1", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert_eq!(client.proxy().pid(), pid);
    // And it goes away again.
    std::fs::remove_file(mesh.config_dir.join("policy.yaml")).unwrap();
    let with = client.config_version();
    wait_for("the policy to go", Duration::from_secs(10), || {
        (client.config_version() > with).then_some(())
    });
    let (head, _) = via_client(&client, "/flaky?key=gone&fails=1", &[]);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
}

/// Requests `inst`'s sidecar passed to its app from `src`.
fn inbound_from(inst: &Instance, src: &str) -> f64 {
    inst.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("tandem_requests_total{")
                && l.contains(r#"direction="inbound""#)
                && l.contains(&format!(r#"src_service="{src}""#))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn an_inner_hop_does_not_multiply_retries() {
    let mut config = common::config();
    config.push_str(&common::orders_service());
    config.push_str(&policy("web", "  retry: {attempts: 2, on: [5xx]}\n"));
    config.push_str(&policy("orders", "  retry: {attempts: 2, on: [5xx]}\n"));
    let mesh = Mesh::start(&config);
    let orders = mesh.instance("orders", "orders-1", &["--failure-rate", "1.0"], &[]);
    let web = mesh.instance("web", "web-1", &["--call", "orders"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let n = 20;
    for _ in 0..n {
        let (head, _) = via_client(&client, "/", &[]);
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    }
    // The outer sidecar tried each request three times; each try of web
    // called orders once: 3n, where nested retries would have made 9n.
    assert_eq!(retries(&client), 2.0 * n as f64);
    assert_eq!(inbound_from(&web, "client"), 3.0 * n as f64);
    assert_eq!(inbound_from(&orders, "web"), 3.0 * n as f64);
    assert!(
        !web.metrics().contains("tandem_retries_total{"),
        "{}",
        web.metrics()
    );
}

#[test]
fn the_callers_deadline_travels_and_is_kept() {
    let mut config = common::config();
    config.push_str(&common::orders_service());
    config.push_str(&policy("web", "  timeout: 1s\n"));
    let mesh = Mesh::start(&config);
    let orders = mesh.instance("orders", "orders-1", &["--latency", "3s"], &[]);
    let web = mesh.instance("web", "web-1", &["--call", "orders"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // A deadline set by the calling app is honoured by its own sidecar:
    // the app would answer in 3 s, the caller gets a 504 at its deadline.
    let start = Instant::now();
    let (head, body) = via_client(
        &client,
        "/slow?ms=3000&key=own",
        &["-H", "tandem-ctx-deadline-ms: 300"],
    );
    assert!(head.starts_with("HTTP/1.1 504"), "{head}\n{body}");
    assert!(body.contains("deadline"), "{body}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    let c = web.wait_settled("own", Duration::from_secs(10));
    assert_eq!(c["completed"], 0, "{c}");
    // The policy's 1 s travels with the request, to the app and on.
    let (head, body) = via_client(&client, "/headers", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The app gets it as an absolute time, to pass on unchanged.
    assert!(h.get("tandem-ctx-deadline-ms").is_none(), "{h}");
    let at: u64 = h["tandem-ctx-deadline-at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(at > now && at <= now + 1000, "{h} (now {now})");
    // When it passes, the whole chain stops: web's call to orders (3 s
    // away) is abandoned, and orders' app never finishes it.
    let start = Instant::now();
    let (head, _) = via_client(&client, "/", &[]);
    // 504 from the caller's sidecar, or web's 502 for its failed call.
    assert!(head.starts_with("HTTP/1.1 50"), "{head}");
    assert!(start.elapsed() >= Duration::from_millis(1000));
    let c = orders.wait_settled("", Duration::from_secs(10));
    assert_eq!(c["started"], 1, "{c}");
    assert_eq!(c["completed"], 0, "{c}");
    assert_eq!(c["cancelled"], 1, "{c}");
    // Orders' sidecar either saw the call cancelled (nothing recorded) or
    // stopped it itself at the deadline it was given.
    let answered = metric_sum(
        &orders.metrics(),
        "tandem_requests_total",
        &[("direction", "inbound"), ("status_code", "200")],
    );
    assert_eq!(answered, 0.0, "{}", orders.metrics());
}

/// Which instance answered `GET /` (the demo app names itself).
fn answered_by(client: &Instance, header: Option<(&str, &str)>) -> String {
    let h;
    let mut extra: Vec<&str> = Vec::new();
    if let Some((k, v)) = header {
        h = format!("{k}: {v}");
        extra.extend(["-H", h.as_str()]);
    }
    let (head, body) = via_client(client, "/", &extra);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["instance"].as_str().unwrap().to_string()
}

#[test]
fn load_balancer_choices() {
    let mut config = common::config();
    config.push_str(&policy("web", "  loadBalancer: {type: round-robin}\n"));
    config.push_str(&policy(
        "catalog-v1",
        "  loadBalancer: {type: ring-hash, hashHeader: x-user}\n",
    ));
    let mesh = Mesh::start(&config);
    let _w: Vec<Instance> = (1..=3)
        .map(|i| mesh.instance("web", &format!("web-{i}"), &[], &[]))
        .collect();
    let _c: Vec<Instance> = (1..=3)
        .map(|i| mesh.instance("catalog-v1", &format!("catalog-v1-{i}"), &[], &[]))
        .collect();
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for("all endpoints known", Duration::from_secs(10), || {
        let _ = http_get(client.http_proxy, "web", "/");
        let w = client.endpoints("web", "web");
        (w.map(|e| e.len()) == Some(3)).then_some(())
    });
    // Round-robin: an even spread.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..300 {
        *counts.entry(answered_by(&client, None)).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|c| (95..=105).contains(c)),
        "{counts:?}"
    );
    // Ring-hash: one key, one endpoint; keys spread over the endpoints.
    let proxy = format!("http://{}", client.http_proxy);
    let by_key = |user: &str| {
        let h = format!("x-user: {user}");
        let out = curl(&["-s", "-x", &proxy, "-H", &h, "http://catalog-v1/"]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["instance"].as_str().unwrap().to_string()
    };
    wait_for("catalog endpoints known", Duration::from_secs(10), || {
        let _ = by_key("warm-up");
        (client
            .endpoints("catalog-v1", "catalog-v1")
            .map(|e| e.len())
            == Some(3))
        .then_some(())
    });
    let mut used = std::collections::HashSet::new();
    for k in 0..20 {
        let user = format!("user-{k}");
        let first = by_key(&user);
        for _ in 0..4 {
            assert_eq!(by_key(&user), first, "{user} moved");
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "20 keys all on {used:?}");
}

#[test]
fn peak_ewma_keeps_traffic_away_from_a_ten_times_slower_endpoint() {
    let mesh = Mesh::start(&common::config());
    let _fast = mesh.instance("web", "web-fast", &["--latency", "5ms"], &[]);
    let _slow = mesh.instance("web", "web-slow", &["--latency", "50ms"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for("both endpoints known", Duration::from_secs(10), || {
        let _ = http_get(client.http_proxy, "web", "/");
        (client.endpoints("web", "web").map(|e| e.len()) == Some(2)).then_some(())
    });
    let addr = client.http_proxy;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut slow = 0;
                for _ in 0..100 {
                    if let Some((200, body)) = http_get(addr, "web", "/") {
                        if body.contains("web-slow") {
                            slow += 1;
                        }
                    }
                }
                slow
            })
        })
        .collect();
    let slow: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(slow < 100, "the slow endpoint got {slow} of 400");
}

#[test]
fn a_caller_over_its_rate_gets_429_and_others_do_not() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  rateLimit: {requestsPerSecond: 2, burst: 5, per: caller}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let other = mesh.instance("catalog", "catalog-1", &[], &[]);
    let (mut ok, mut limited) = (0, 0);
    let start = Instant::now();
    for _ in 0..20 {
        let (head, _) = via_client(&client, "/", &[]);
        if head.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 429"), "{head}");
            assert!(head.contains("tandem-error: rate-limited"), "{head}");
            assert!(
                head.to_ascii_lowercase().contains("retry-after: 1"),
                "{head}"
            );
            limited += 1;
        }
    }
    // The burst, plus what the rate (2/s) refilled while the loop ran.
    let refilled = (2.0 * start.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (5..=5 + refilled).contains(&ok) && limited > 0,
        "{ok} passed, {limited} limited in {:?}",
        start.elapsed()
    );
    // Another caller has its own bucket.
    for _ in 0..3 {
        let (head, _) = via_client(&other, "/", &[]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert!(web.metrics().contains(
        r#"tandem_requests_total{direction="inbound",src_service="client",dst_service="web",status_code="429",tandem_error="rate-limited",route=""}"#
    ));
}

/// A request counts against `--max-requests` until its response body has
/// been sent, not only until the response headers.
#[test]
fn a_streaming_response_keeps_its_place_until_it_ends() {
    use std::io::{Read, Write};
    let mesh = Mesh::start(&common::config());
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &["--max-requests", "2"]);
    // Two echo requests whose bodies (and so their answers) are still going.
    let open = |n: usize| {
        let mut s = std::net::TcpStream::connect(client.http_proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST http://web/echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("hello") {
            let k = s.read(&mut buf).unwrap();
            assert!(
                k > 0,
                "stream {n} closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..k]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        s
    };
    let mut streams = vec![open(1), open(2)];
    // Their headers are long sent, yet a third request is shed.
    let third = http_get(client.http_proxy, "web", "/headers");
    assert_eq!(third.as_ref().map(|r| r.0), Some(503), "{third:?}");
    assert!(third.unwrap().1.contains("overloaded"));
    // Once they end, there is room again.
    for s in &mut streams {
        s.write_all(b"0\r\n\r\n").unwrap();
        let mut rest = Vec::new();
        let mut buf = [0u8; 1024];
        while !rest.ends_with(b"0\r\n\r\n") {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            rest.extend_from_slice(&buf[..k]);
        }
    }
    wait_for(
        "room after the streams ended",
        Duration::from_secs(5),
        || (http_get(client.http_proxy, "web", "/headers").map(|r| r.0) == Some(200)).then_some(()),
    );
}

#[test]
fn stalled_http2_clients_cost_bounded_memory_that_goes_back() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    wait_for("web through the sidecars", Duration::from_secs(20), || {
        let (s, body) = http_get(up, "web", "/bytes?n=10")?;
        (s == 200 && body == "xxxxxxxxxx").then_some(())
    });
    let idle = (client.proxy().rss_kib(), web.proxy().rss_kib());
    // 200 HTTP/2 streams ask for 1 MiB each and never open their window:
    // nothing of any body can leave the client sidecar.
    let n = 200;
    let rt = tandem_e2e::rt();
    let stalled = rt.block_on(tandem_e2e::Stalled::open(
        up,
        "web",
        "/bytes?n=1048576",
        n,
        100,
    ));
    assert_eq!(stalled.heads, n);
    let (c, w) = settled_rss(&client, &web);
    // Each stream holds its connections' capped buffers, not its body
    // (before the caps the web sidecar grew by 355 KiB a stream).
    let per_stream = |now: u64, before: u64| now.saturating_sub(before) / n as u64;
    assert!(
        per_stream(c, idle.0) <= 150,
        "client sidecar: {} KiB a stream",
        per_stream(c, idle.0)
    );
    assert!(
        per_stream(w, idle.1) <= 150,
        "web sidecar: {} KiB a stream",
        per_stream(w, idle.1)
    );
    // Closed: connections go, and the memory goes back to the system.
    drop(stalled);
    wait_for("RSS back near idle", Duration::from_secs(40), || {
        let (c, w) = (client.proxy().rss_kib(), web.proxy().rss_kib());
        (c <= idle.0 + 5 * 1024 && w <= idle.1 + 5 * 1024).then_some(())
    });
}

/// Requests to an HTTP/2 destination share one connection between the
/// sidecars. Streams whose client stopped reading must not hold that
/// connection's flow-control window or its stream slots: other callers'
/// requests still go through.
#[test]
fn stalled_http2_streams_do_not_starve_the_shared_connection() {
    let mesh = Mesh::start(&common::config());
    let h2 = mesh.instance("h2svc", "h2svc-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["h2svc"]);
    let up = client.upstream("h2svc");
    wait_for(
        "h2svc through the sidecars",
        Duration::from_secs(20),
        || {
            let (s, body) = http_get(up, "h2svc", "/bytes?n=10")?;
            (s == 200 && body == "xxxxxxxxxx").then_some(())
        },
    );
    let rt = tandem_e2e::rt();
    let answered = |what: &str| {
        let got = http_get(up, "h2svc", "/bytes?n=10");
        assert_eq!(
            got,
            Some((200, "xxxxxxxxxx".to_string())),
            "a request behind {what}"
        );
    };
    // More unread response data than one connection window holds.
    let a = rt.block_on(tandem_e2e::Stalled::open(
        up,
        "h2svc",
        "/bytes?n=1048576",
        8,
        100,
    ));
    assert_eq!(a.heads, 8);
    answered("8 stalled 1 MiB responses");
    // More requests in flight than one HTTP/2 connection between the
    // sidecars may carry (each sidecar allows a peer 100 streams).
    let held: Vec<_> = (0..150)
        .map(|_| std::thread::spawn(move || http_get(up, "h2svc", "/hold?key=many")))
        .collect();
    h2.wait_held("many", 150, Duration::from_secs(20));
    answered("150 requests in flight");
    h2.open("many");
    for t in held {
        assert_eq!(t.join().expect("thread").map(|r| r.0), Some(200));
    }
    drop(a);
}

#[test]
fn overload_is_shed_and_memory_stays_bounded() {
    use std::io::Read;
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance(
        "client",
        "client-1",
        &[],
        &["--max-requests", "20", "--max-connections", "100"],
    );
    // Request headers: 50 KiB pass, 70 KiB get 431.
    let big = |n: usize| format!("x-big: {}", "a".repeat(n));
    let (head, _) = via_client(&client, "/", &["-H", &big(50 * 1024)]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = via_client(&client, "/", &["-H", &big(70 * 1024)]);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let rss_before = client.proxy().rss_kib();
    let addr = client.http_proxy;
    // 20 requests held at the app: the sidecar is at its request limit.
    let held: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || http_get(addr, "web", "/hold?key=full")))
        .collect();
    web.wait_held("full", 20, Duration::from_secs(20));
    // The next ones are refused at once, on a connection that stays open.
    let mut conn = KeepAlive::connect(addr).expect("connect");
    for _ in 0..10 {
        let r = conn
            .send("GET", "web", "/hold?key=full", &[], b"")
            .expect("answer");
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header("tandem-error"), Some("overloaded"), "{r:?}");
    }
    client.wait_metric(
        r#"tandem_overload_rejections_total{what="request"}"#,
        Duration::from_secs(5),
        |v| v == 10.0,
    );
    // 21 connections are open: 79 more fill the connection limit, and
    // the one after is closed without an answer.
    let idle: Vec<std::net::TcpStream> = (0..79)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut over = std::net::TcpStream::connect(addr).expect("connect");
    over.set_read_timeout(Some(patience(Duration::from_secs(10))))
        .unwrap();
    let mut buf = [0u8; 64];
    match over.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection over the limit was not closed: {other:?}"),
    }
    client.wait_metric(
        r#"tandem_overload_rejections_total{what="connection"}"#,
        Duration::from_secs(5),
        |v| v == 1.0,
    );
    // A burst from 100 more clients while full: nothing gets through to
    // the app, nothing grows.
    let burst: Vec<_> = (0..100)
        .map(|_| {
            std::thread::spawn(move || {
                (0..2)
                    .map(|_| http_get(addr, "web", "/hold?key=full").map(|r| r.0))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Option<u16>> = burst.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(
        results.iter().all(|r| r.is_none()),
        "every burst connection is over the limit: {results:?}"
    );
    assert_eq!(web.held("full")["arrived"], 20);
    let m = client.metrics();
    assert!(m.contains(r#"tandem_error="overloaded""#), "{m}");
    // Memory did not run away (the most it ever held, not a sample).
    let peak = client.proxy().peak_rss_kib();
    assert!(
        peak < rss_before + 20 * 1024,
        "RSS {rss_before} KiB -> peak {peak} KiB"
    );
    // Released: the held ones are answered, and the sidecar serves
    // normally again.
    drop((idle, over, conn));
    web.open("full");
    for h in held {
        assert_eq!(h.join().unwrap().map(|r| r.0), Some(200));
    }
    let (head, _) = via_client(&client, "/", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

fn failures(client: &Instance, n: usize) -> usize {
    (0..n)
        .filter(|_| !matches!(http_get(client.http_proxy, "web", "/"), Some((200, _))))
        .count()
}

fn ejections(client: &Instance) -> f64 {
    client
        .metrics()
        .lines()
        .filter(|l| l.starts_with("tandem_outlier_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An endpoint that never answers in time is ejected like one that fails:
/// tries cut off by the per-try timeout count as gateway errors.
#[test]
fn tries_that_time_out_count_towards_ejection() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  loadBalancer: {type: round-robin}\n  retry: {attempts: 1, on: [gateway-error], perTryTimeout: 300ms}\n  circuitBreaker: {consecutiveGatewayErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}\n",
    ));
    let mesh = Mesh::start(&config);
    let _good = mesh.instance("web", "web-good", &[], &[]);
    let stuck = mesh.instance("web", "web-stuck", &["--latency", "5s"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for("both endpoints known", Duration::from_secs(10), || {
        let _ = http_get(client.http_proxy, "web", "/headers");
        (client.endpoints("web", "web").map(|e| e.len()) == Some(2)).then_some(())
    });
    // Every request succeeds (a timed-out try is retried on the other);
    // the second timeout in a row ejects the stuck one.
    assert_eq!(failures(&client, 6), 0);
    assert_eq!(ejections(&client), 1.0);
    // From then on nothing is sent to it.
    let sent = stuck.counters("")["started"].clone();
    assert_eq!(failures(&client, 10), 0);
    assert_eq!(stuck.counters("")["started"], sent);
}

/// Sends requests until `stop` says so; returns when each failed one was
/// sent and when its answer came.
fn failures_until(
    client: &Instance,
    mut stop: impl FnMut(usize) -> bool,
) -> Vec<(Instant, Instant)> {
    let mut failed = Vec::new();
    wait_for("the failures expected", Duration::from_secs(30), || {
        let sent = Instant::now();
        if !matches!(http_get(client.http_proxy, "web", "/"), Some((200, _))) {
            failed.push((sent, Instant::now()));
        }
        stop(failed.len()).then_some(())
    });
    failed
}

#[test]
fn a_failing_endpoint_is_ejected_then_brought_back() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  loadBalancer: {type: round-robin}\n  circuitBreaker: {consecutiveErrors: 3, baseEjectionTime: 2s, maxEjectionPercent: 50}\n",
    ));
    let mesh = Mesh::start(&config);
    let _good: Vec<Instance> = (1..=2)
        .map(|i| mesh.instance("web", &format!("web-{i}"), &[], &[]))
        .collect();
    let _bad = mesh.instance("web", "web-bad", &["--failure-rate", "1.0"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for("all endpoints known", Duration::from_secs(10), || {
        let _ = http_get(client.http_proxy, "web", "/headers");
        (client.endpoints("web", "web").map(|e| e.len()) == Some(3)).then_some(())
    });
    // Every third request meets the bad one, until its third failure in a
    // row ejects it.
    let failed = failures_until(&client, |n| n == 3);
    assert_eq!(ejections(&client), 1.0);
    client
        .proxy()
        .wait_log("ejected_for=2s", Duration::from_secs(5));
    // Then the others carry everything for at least the 2 s (the ejection
    // began after the request that caused it was sent; the next failure
    // was answered after it ended), until it is tried again, fails, and is
    // ejected for longer each time.
    let mut ejected_at = failed[2].0;
    for (round, length) in [(1, 2), (2, 4)] {
        let failed = failures_until(&client, |n| n == 3);
        let back = failed[0].1.duration_since(ejected_at) + Duration::from_millis(10);
        assert!(back >= Duration::from_secs(length), "back after {back:?}");
        assert_eq!(ejections(&client), 1.0 + round as f64);
        ejected_at = failed[2].0;
    }
    let log = client.proxy().log_text();
    assert!(log.contains("ejected_for=4s"), "{log}");
    assert!(log.contains("ejected_for=6s"), "{log}");
}

#[test]
fn never_more_than_the_maximum_share_is_ejected() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  loadBalancer: {type: round-robin}\n  circuitBreaker: {consecutiveErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 34}\n",
    ));
    let mesh = Mesh::start(&config);
    let _good = mesh.instance("web", "web-1", &[], &[]);
    let _bad: Vec<Instance> = (1..=2)
        .map(|i| {
            mesh.instance(
                "web",
                &format!("web-bad-{i}"),
                &["--failure-rate", "1.0"],
                &[],
            )
        })
        .collect();
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for("all endpoints known", Duration::from_secs(10), || {
        let _ = http_get(client.http_proxy, "web", "/headers");
        (client.endpoints("web", "web").map(|e| e.len()) == Some(3)).then_some(())
    });
    let _ = failures(&client, 12);
    // One of three may be out: the second bad one keeps taking its share.
    assert_eq!(ejections(&client), 1.0);
    let f = failures(&client, 40);
    assert!((15..=25).contains(&f), "{f} of 40 failed");
    assert_eq!(ejections(&client), 1.0);
}

#[test]
fn a_destination_at_its_connection_cap_queues_then_overflows() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  circuitBreaker: {maxConnections: 2, maxPendingRequests: 3}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // Connections the client's sidecar opened to web's: each is one
    // handshake there.
    let opened = || {
        metric(
            &web.metrics(),
            r#"tandem_tls_handshakes_total{direction="inbound",result="ok"}"#,
        )
        .unwrap_or(0.0)
    };
    // Eight requests held at the app: two go on the two connections,
    // three wait for them, three are refused at once.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = client_view(&client);
            std::thread::spawn(move || via_client(&c, "/hold?key=cap", &[]).0)
        })
        .collect();
    web.wait_held("cap", 2, Duration::from_secs(20));
    let overflowed = wait_for("three refused", Duration::from_secs(20), || {
        let done = threads.iter().filter(|t| t.is_finished()).count();
        (done == 3).then_some(done)
    });
    assert_eq!(overflowed, 3);
    assert_eq!(web.held("cap")["waiting"], 2);
    web.open("cap");
    let heads: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 200"))
        .count();
    let overflow = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 503") && h.contains("tandem-error: overflow"))
        .count();
    assert_eq!((ok, overflow), (5, 3), "{heads:#?}");
    // Never more than two at the app at once: the waiting ones went on
    // the same two connections.
    let held = web.held("cap");
    assert_eq!(
        (held["arrived"].as_u64(), held["max_waiting"].as_u64()),
        (Some(5), Some(2)),
        "{held}"
    );
    assert_eq!(opened(), 2.0);
    // The connections are reused afterwards; no more are opened.
    for _ in 0..5 {
        let (head, _) = via_client(&client, "/", &[]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert_eq!(opened(), 2.0);
}

/// A retry at the connection cap reuses the connection of the answer it
/// replaces (read first), rather than waiting behind it.
#[test]
fn a_retry_at_the_connection_cap_reuses_the_connection() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  retry: {attempts: 2, on: [\"503\"]}\n  circuitBreaker: {maxConnections: 1}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // Failures with bodies larger than a connection buffers on its own.
    let (head, body) = via_client(&client, "/flaky?key=capped&fails=2&pad=40000", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["attempt"], 3, "{v}");
    assert_eq!(
        metric(
            &web.metrics(),
            r#"tandem_tls_handshakes_total{direction="inbound",result="ok"}"#,
        ),
        Some(1.0)
    );
}

#[test]
fn a_destination_over_its_max_requests_overflows() {
    let mut config = common::config();
    config.push_str(&policy(
        "web",
        "  circuitBreaker: {consecutiveErrors: 0, maxRequests: 3}\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let (head, _) = via_client(&client, "/", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Three held at the app; the next seven are refused at once.
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let c = client_view(&client);
            std::thread::spawn(move || via_client(&c, "/hold?key=max", &[]).0)
        })
        .collect();
    web.wait_held("max", 3, Duration::from_secs(20));
    wait_for("seven refused", Duration::from_secs(20), || {
        (threads.iter().filter(|t| t.is_finished()).count() == 7).then_some(())
    });
    assert_eq!(web.held("max")["arrived"], 3);
    web.open("max");
    let heads: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 200"))
        .count();
    let overflow = heads
        .iter()
        .filter(|h| h.starts_with("HTTP/1.1 503") && h.contains("tandem-error: overflow"))
        .count();
    assert_eq!((ok, overflow), (3, 7), "{heads:#?}");
    // Once they are done, the destination takes requests again.
    let (head, _) = via_client(&client, "/", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// A copy of an instance's addresses, to use from another thread.
fn client_view(i: &Instance) -> Instance {
    Instance {
        service: i.service.clone(),
        instance: i.instance.clone(),
        app_addr: i.app_addr,
        inbound: i.inbound,
        admin: i.admin,
        http_proxy: i.http_proxy,
        upstreams: i.upstreams.clone(),
        tcp_echo: i.tcp_echo,
        app: None,
        proxy: None,
    }
}

#[test]
fn route_rules_override_the_policy() {
    let mut config = common::config();
    config.push_str(&policy("web", "  timeout: 5s\n"));
    config.push_str(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 8080}]\n  rules:\n    - matches: [{path: {type: PathPrefix, value: /slow}}]\n      timeouts: {request: 300ms}\n      backendRefs: [{name: web, port: 8080}]\n    - matches: [{path: {type: PathPrefix, value: /flaky}}]\n      retry: {codes: [503], attempts: 1, backoff: 10ms}\n      backendRefs: [{name: web, port: 8080}]\n    - backendRefs: [{name: web, port: 8080}]\n---\n",
    );
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // The rule's 300 ms, not the policy's 5 s (the app would answer after
    // 2 s; it is cut before).
    let (head, body) = via_client(&client, "/slow?ms=2000&key=rule", &[]);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}\n{body}");
    assert!(body.contains("HTTPRoute default/web rule 0"), "{body}");
    assert!(body.contains("300ms"), "{body}");
    let c = web.wait_settled("rule", Duration::from_secs(10));
    assert_eq!(
        (c["started"].as_u64(), c["cancelled"].as_u64()),
        (Some(1), Some(1)),
        "{c}"
    );
    // The rule's retry, where the policy has none.
    let (head, body) = via_client(&client, "/flaky?key=r&fails=1", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    // Elsewhere the policy holds: no retry.
    let (head, _) = via_client(&client, "/other?x=1", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = via_client(&client, "/slow?ms=600", &[]);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
}
