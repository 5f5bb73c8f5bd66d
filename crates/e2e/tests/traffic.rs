//! Traffic management through real sidecars: HTTPRoute filters (header
//! modifiers, URL rewrite, redirect), fault injection, mirroring, fine
//! weighted splits, and the authority an HTTP/2 app sees.

mod common;

use std::time::{Duration, Instant};

use tandem_e2e::*;

const ROUTE_HEAD: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop}\nspec:\n  parentRefs: [{name: shop, port: 8080}]\n  rules:\n";

/// `client`, `shop` and `shadow` Services, and `extra` (more resources).
fn config(extra: &str) -> String {
    let mut s = String::new();
    for name in ["client", "shop", "shadow"] {
        s.push_str(&service_yaml(name, "http"));
    }
    s.push_str(extra);
    s
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_default()
}

#[test]
fn filters_edit_headers_rewrite_paths_and_redirect() {
    let route = format!(
        "{ROUTE_HEAD}{}",
        r#"    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
    - matches: [{path: {type: PathPrefix, value: /to-https}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: shop.example}
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs: [{name: shop, port: 8080}]
    - matches: [{path: {type: Exact, value: /h}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-env, value: prod}]
            add: [{name: x-trail, value: mesh}]
            remove: [x-debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served-via, value: tandem}]}
        - type: URLRewrite
          urlRewrite: {hostname: shop.internal, path: {type: ReplaceFullPath, replaceFullPath: /headers}}
      backendRefs:
        - name: shop
          port: 8080
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier: {set: [{name: x-backend, value: shop}]}
    - backendRefs: [{name: shop, port: 8080}]
"#
    );
    let mesh = Mesh::start(&config(&route));
    let _shop = mesh.instance("shop", "shop-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");
    let mut send = |path: &str, headers: &[(&str, &str)]| {
        c.send("GET", "shop:8080", path, headers, b"")
            .unwrap_or_else(|| panic!("GET {path}: connection broke"))
    };

    // A redirect is answered by the caller's sidecar: path prefix replaced,
    // query kept, the port the request named kept.
    let r = send("/old/page?x=1", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("http://shop:8080/new/page?x=1"));
    assert_eq!(r.header("tandem-error"), None);
    // A scheme change drops the port (443 is https's own).
    let r = send("/to-https/a", &[]);
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://shop.example/to-https/a")
    );

    // The app sees the rewritten path; the query stays.
    let r = send("/api/items?id=3", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(json(&r.body)["path"], "/v2/items");
    // `/apix` is not under the `/api` prefix: the catch-all rule, untouched.
    let r = send("/apix", &[]);
    assert_eq!(json(&r.body)["path"], "/apix");

    // Header modifiers of the rule and of its backend, the host rewrite,
    // and the answer's own header.
    let r = send(
        "/h",
        &[("x-debug", "1"), ("x-trail", "app"), ("x-env", "dev")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let h = json(&r.body);
    assert_eq!(h["x-env"], "prod", "{h}");
    assert_eq!(h["x-trail"], "app, mesh", "{h}");
    assert_eq!(h["x-backend"], "shop", "{h}");
    assert_eq!(h["host"], "shop.internal", "{h}");
    assert!(h.get("x-debug").is_none(), "{h}");
    assert_eq!(r.header("x-served-via"), Some("tandem"));
    // Other rules are not touched by those filters.
    let r = send("/headers", &[("x-debug", "1")]);
    let h = json(&r.body);
    assert_eq!(h["x-debug"], "1", "{h}");
    assert!(
        h.get("x-env").is_none() && h.get("x-backend").is_none(),
        "{h}"
    );
    assert_eq!(r.header("x-served-via"), None);
}

/// Binomial bounds at 99.9 % (z = 3.29) for `n` draws of probability `p`.
fn bounds(n: f64, p: f64) -> (f64, f64) {
    let sd = (n * p * (1.0 - p)).sqrt();
    (n * p - 3.29 * sd, n * p + 3.29 * sd)
}

#[test]
fn faults_are_injected_at_their_share_only_for_matching_requests() {
    let route = format!(
        "{ROUTE_HEAD}{}",
        r#"    - matches: [{path: {type: PathPrefix, value: /abort}}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: abort-half}
      backendRefs: [{name: shop, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /delay}}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: slow}
      backendRefs: [{name: shop, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /late}}]
      timeouts: {request: 100ms}
      filters:
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: slow}
      backendRefs: [{name: shop, port: 8080}]
    - backendRefs: [{name: shop, port: 8080}]
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: abort-half}
spec:
  match: {headers: [{name: x-chaos, value: "on"}]}
  abort: {httpStatus: 418, percent: 50}
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: slow}
spec:
  delay: {duration: 300ms, percent: 100}
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop}
spec:
  targetRef: {kind: Service, name: shop}
  circuitBreaker: {consecutiveErrors: 1}
"#
    );
    let mesh = Mesh::start(&config(&route));
    let _shop = mesh.instance("shop", "shop-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");

    // With the header: about half are aborted with 418, flagged.
    let n = 2000;
    let mut aborted = 0;
    for _ in 0..n {
        let r = c
            .send("GET", "shop:8080", "/abort", &[("x-chaos", "on")], b"")
            .expect("answer");
        match r.status {
            418 => {
                assert_eq!(r.header("tandem-error"), Some("fault-injected"), "{r:?}");
                aborted += 1;
            }
            200 => assert_eq!(r.header("tandem-error"), None),
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    let (lo, hi) = bounds(n as f64, 0.5);
    assert!(
        (lo..=hi).contains(&(aborted as f64)),
        "{aborted} of {n} aborted; expected {lo:.0}..{hi:.0}"
    );
    // Without the header (or with another value) nothing is injected.
    for v in [None, Some("off")] {
        for _ in 0..200 {
            let h: Vec<(&str, &str)> = v.map(|v| ("x-chaos", v)).into_iter().collect();
            let r = c
                .send("GET", "shop:8080", "/abort", &h, b"")
                .expect("answer");
            assert_eq!(r.status, 200, "{r:?}");
        }
    }
    // Counted by the caller's sidecar, flagged in the golden signals, and
    // never held against the endpoint: with consecutiveErrors 1, one
    // counted failure would have ejected it.
    let m = client.metrics();
    let faults = metric_sum(&m, "tandem_faults_injected_total", &[("fault", "abort")]);
    assert_eq!(faults, aborted as f64, "{m}");
    let flagged = metric_sum(
        &m,
        "tandem_requests_total",
        &[("tandem_error", "fault-injected"), ("status_code", "418")],
    );
    assert_eq!(flagged, aborted as f64);
    assert_eq!(metric_sum(&m, "tandem_outlier_ejections_total", &[]), 0.0);

    // A delay holds the request at least its duration, then it is served.
    let started = Instant::now();
    let r = c
        .send("GET", "shop:8080", "/delay", &[], b"")
        .expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Under a shorter timeout the delay runs into it: the timeout's answer.
    let started = Instant::now();
    let r = c
        .send("GET", "shop:8080", "/late", &[], b"")
        .expect("answer");
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("tandem-error"), Some("upstream-timeout"));
    assert!(started.elapsed() >= Duration::from_millis(100));
    let m = client.metrics();
    assert_eq!(
        metric_sum(&m, "tandem_faults_injected_total", &[("fault", "delay")]),
        2.0
    );
}

#[test]
fn mirror_sends_a_marked_share_and_never_holds_the_caller() {
    // The shadow takes 2 s to answer (and for one part, fails): the caller
    // must not notice either.
    let route = |percent: u32| {
        format!(
            "{ROUTE_HEAD}    - filters:\n        - type: RequestMirror\n          requestMirror: {{backendRef: {{name: shadow, port: 8080}}, percent: {percent}}}\n      backendRefs: [{{name: shop, port: 8080}}]\n"
        )
    };
    let mesh = Mesh::start(&config(&route(50)));
    let shop = mesh.instance("shop", "shop-1", &[], &[]);
    let shadow = mesh.instance("shadow", "shadow-1", &["--latency", "2s"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");

    let n = 400;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        // Every tenth carries a body, which the shadow gets a copy of.
        let body: &[u8] = if i % 10 == 0 { b"{\"order\":1}" } else { b"" };
        let method = if body.is_empty() { "GET" } else { "POST" };
        // Every fifth claims to be a shadow copy itself: the mark is the
        // sidecar's alone.
        let fake: &[(&str, &str)] = if i % 5 == 1 {
            &[("tandem-mirror", "1")]
        } else {
            &[]
        };
        let r = c
            .send(method, "shop:8080", "/", fake, body)
            .unwrap_or_else(|| panic!("request {i}: connection broke"));
        times.push(started.elapsed());
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(json(&r.body)["service"], "shop");
        // The next request waits until the shadow holds at most 32 copies
        // (each for 2 s), so the sidecar's 64 places for shadow requests
        // never fill.
        wait_for("room for shadow copies", Duration::from_secs(20), || {
            (shadow.counters("mirrored")["in_flight"].as_u64()? <= 32).then_some(())
        });
    }
    times.sort();
    let p99 = times[n * 99 / 100];
    // Waiting for the shadow would put every mirrored request at 2 s.
    assert!(p99 < Duration::from_secs(1), "caller p99 {p99:?}");

    // About half arrived at the shadow, marked; the caller's sidecar counts
    // them (answered, or still in progress and then cut).
    let (lo, hi) = bounds(n as f64, 0.5);
    // Counted once every copy is in and answered (the last ones are still
    // on their way when the last request returns).
    let marked = wait_for("shadow copies to arrive", Duration::from_secs(20), || {
        let c = shadow.counters("mirrored");
        let started = c["started"].as_f64()?;
        let done = metric_sum(
            &client.metrics(),
            "tandem_mirror_requests_total",
            &[("dst_service", "shadow")],
        );
        (started >= lo && c["in_flight"].as_u64()? == 0 && done == started).then_some(started)
    });
    assert!((lo..=hi).contains(&marked), "{marked} of {n} mirrored");
    let all = shadow.counters("");
    assert_eq!(
        all["started"].as_f64(),
        Some(marked),
        "unmarked requests at the shadow: {all}"
    );
    assert_eq!(
        shop.counters("mirrored")["started"],
        0,
        "an app's own mark got through"
    );
    assert_eq!(shop.counters("")["started"].as_u64(), Some(n as u64));
    let results = wait_for("mirror results", Duration::from_secs(30), || {
        let m = client.metrics();
        let done = metric_sum(
            &m,
            "tandem_mirror_requests_total",
            &[("dst_service", "shadow")],
        );
        (done >= marked).then_some(m)
    });
    assert_eq!(
        metric_sum(
            &results,
            "tandem_mirror_requests_total",
            &[("result", "2xx")]
        ),
        marked
    );
    assert_eq!(
        metric_sum(
            &results,
            "tandem_mirror_requests_total",
            &[("result", "skipped-busy")]
        ),
        0.0
    );
    // Shadow traffic is not in the caller's golden signals.
    assert_eq!(
        metric_sum(
            &results,
            "tandem_requests_total",
            &[("dst_service", "shadow")]
        ),
        0.0
    );
}

#[test]
fn a_failing_or_dead_shadow_changes_nothing_for_the_caller() {
    let route = format!(
        "{ROUTE_HEAD}    - filters:\n        - type: RequestMirror\n          requestMirror: {{backendRef: {{name: shadow, port: 8080}}}}\n      backendRefs: [{{name: shop, port: 8080}}]\n"
    );
    let mesh = Mesh::start(&config(&route));
    let _shop = mesh.instance("shop", "shop-1", &[], &[]);
    let mut shadow = mesh.instance("shadow", "shadow-1", &["--failure-rate", "1"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");
    for _ in 0..100 {
        let r = c.send("GET", "shop:8080", "/", &[], b"").expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
    }
    wait_for(
        "500s from the shadow counted",
        Duration::from_secs(20),
        || {
            let m = client.metrics();
            (metric_sum(&m, "tandem_mirror_requests_total", &[("result", "5xx")]) == 100.0)
                .then_some(())
        },
    );
    // A dead shadow (its app gone): the caller still gets every answer.
    if let Some(app) = shadow.app.as_mut() {
        app.kill();
    }
    for _ in 0..100 {
        let r = c.send("GET", "shop:8080", "/", &[], b"").expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
    }
    wait_for(
        "failed shadow copies counted",
        Duration::from_secs(20),
        || {
            let m = client.metrics();
            let failed = metric_sum(&m, "tandem_mirror_requests_total", &[("result", "5xx")])
                + metric_sum(
                    &m,
                    "tandem_mirror_requests_total",
                    &[("result", "upstream-connect-failure")],
                )
                + metric_sum(
                    &m,
                    "tandem_mirror_requests_total",
                    &[("result", "upstream-reset")],
                );
            (failed == 200.0).then_some(())
        },
    );
}

#[test]
fn a_one_percent_and_a_tenth_of_a_percent_split_hold_their_shares() {
    let rt = rt();
    let mesh = Mesh::start(&common::config_with_split(99, 1));
    let _v1 = mesh.instance("catalog-v1", "catalog-v1-a", &["--version", "v1"], &[]);
    let _v2 = mesh.instance("catalog-v2", "catalog-v2-a", &["--version", "v2"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let n = 20_000;
    let count_v2 = || {
        let counts = rt.block_on(spread(client.http_proxy, n));
        assert_eq!(counts.0 + counts.1, n, "failures: {counts:?}");
        counts.1
    };
    let v2 = count_v2() as f64;
    let (lo, hi) = bounds(n as f64, 0.01);
    assert!(
        (lo..=hi).contains(&v2),
        "1 %: {v2} of {n}; expected {lo:.0}..{hi:.0}"
    );

    mesh.write_config("mesh.yaml", &common::config_with_split(999, 1));
    let before = client.config_version();
    wait_for("the new split applied", Duration::from_secs(20), || {
        (client.config_version() > before).then_some(())
    });
    let v2 = count_v2() as f64;
    let (lo, hi) = bounds(n as f64, 0.001);
    assert!(
        (lo..=hi).contains(&v2),
        "0.1 %: {v2} of {n}; expected {lo:.0}..{hi:.0}"
    );
}

/// `n` requests for `catalog`, 32 at a time: (answered by v1, by v2).
async fn spread(proxy: std::net::SocketAddr, n: usize) -> (usize, usize) {
    use http_body_util::{BodyExt, Empty};
    let c: hyper_util::client::legacy::Client<_, Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (c, sem) = (c.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.expect("permit");
            let req = http::Request::get(format!("http://{proxy}/"))
                .header("host", "catalog")
                .body(Empty::new())
                .expect("request");
            let resp = c.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            Some(v["version"].as_str()? == "v2")
        }));
    }
    let (mut v1, mut v2) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Some(true) => v2 += 1,
            Some(false) => v1 += 1,
            None => {}
        }
    }
    (v1, v2)
}

#[test]
fn http2_apps_see_the_name_they_were_called_by() {
    let mesh = Mesh::start(&common::config());
    let _h2 = mesh.instance("h2svc", "h2svc-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["h2svc"]);
    // Through the HTTP proxy port (the app named the service) and through
    // the per-upstream port (the app named only a local address).
    let via_proxy = curl(&[
        "-sS",
        "--proxy",
        &format!("http://{}", client.http_proxy),
        "http://h2svc:8080/headers",
    ]);
    let via_port = curl(&[
        "-sS",
        &format!("http://{}/headers", client.upstream("h2svc")),
    ]);
    for out in [via_proxy, via_port] {
        let h: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        assert_eq!(h[":authority"], "h2svc:8080", "{h} {}", out.stderr);
    }
}

#[test]
fn grpc_routes_match_services_and_methods() {
    let mut config = String::new();
    for (name, proto) in [
        ("client", "http"),
        ("grpc-echo", "grpc"),
        ("grpc-echo-v2", "grpc"),
    ] {
        config.push_str(&service_yaml(name, proto));
    }
    config.push_str(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-echo}
spec:
  parentRefs: [{name: grpc-echo}]
  rules:
    - matches: [{method: {service: tandem.v1.Echo, method: ServerStream}}]
      backendRefs: [{name: grpc-echo-v2, port: 8080}]
    - matches: [{method: {service: tandem.v1.Echo}, headers: [{name: x-svc, value: "1"}]}]
      backendRefs: [{name: grpc-echo, port: 8080}]
    - matches: [{method: {service: tandem.v1.Echo, method: Unary}, headers: [{name: x-split, value: "1"}]}]
      backendRefs: [{name: grpc-echo, port: 8080, weight: 1}, {name: grpc-echo-v2, port: 8080, weight: 3}]
    - matches: [{method: {method: Unary}, headers: [{name: x-chaos, value: "on"}]}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: tandem.dev, kind: FaultInjection, name: unavailable}
      backendRefs: [{name: grpc-echo, port: 8080}]
    - backendRefs: [{name: grpc-echo-v2, port: 8080}]
---
apiVersion: tandem.dev/v1alpha1
kind: FaultInjection
metadata: {name: unavailable}
spec:
  abort: {grpcStatus: UNAVAILABLE}
"#,
    );
    let mesh = Mesh::start(&config);
    let _v1 = mesh.instance("grpc-echo", "grpc-echo-1", &[], &[]);
    let _v2 = mesh.instance("grpc-echo-v2", "grpc-echo-v2-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["grpc-echo"]);
    let rt = rt();
    rt.block_on(async {
        use tandem_api::v1::echo_client::EchoClient;
        use tandem_api::v1::EchoRequest;
        let mut c = EchoClient::connect(format!("http://{}", client.upstream("grpc-echo")))
            .await
            .expect("connect");
        let req = |headers: &[(&'static str, &'static str)]| {
            let mut r = tonic::Request::new(EchoRequest {
                message: "hi".into(),
                count: 1,
            });
            for (k, v) in headers {
                r.metadata_mut().insert(*k, v.parse().expect("value"));
            }
            r
        };
        let unary = |c: &mut EchoClient<tonic::transport::Channel>, h| {
            let r = req(h);
            let mut c = c.clone();
            async move { c.unary(r).await }
        };
        let stream_by = |c: &mut EchoClient<tonic::transport::Channel>, h| {
            let r = req(h);
            let mut c = c.clone();
            async move {
                let mut s = c.server_stream(r).await.expect("stream").into_inner();
                s.message().await.expect("message").expect("one").served_by
            }
        };
        // A method of a service; the catch-all for the rest.
        assert_eq!(stream_by(&mut c, &[]).await, "grpc-echo-v2-1");
        let r = unary(&mut c, &[]).await.expect("unary");
        assert_eq!(r.get_ref().served_by, "grpc-echo-v2-1");
        // The service with a header; the exact method still wins over it.
        let r = unary(&mut c, &[("x-svc", "1")]).await.expect("unary");
        assert_eq!(r.get_ref().served_by, "grpc-echo-1");
        assert_eq!(stream_by(&mut c, &[("x-svc", "1")]).await, "grpc-echo-v2-1");
        // A method of any service, with a fault: UNAVAILABLE, flagged.
        let e = unary(&mut c, &[("x-chaos", "on")])
            .await
            .expect_err("aborted");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert_eq!(
            e.metadata()
                .get("tandem-error")
                .and_then(|v| v.to_str().ok()),
            Some("fault-injected")
        );
        // Weighted backends of a method rule: 1:3 over 400 calls.
        let n = 400;
        let mut v2 = 0;
        for _ in 0..n {
            let r = unary(&mut c, &[("x-split", "1")]).await.expect("unary");
            if r.get_ref().served_by == "grpc-echo-v2-1" {
                v2 += 1;
            }
        }
        let (lo, hi) = bounds(n as f64, 0.75);
        assert!((lo..=hi).contains(&(v2 as f64)), "{v2} of {n} to v2");
    });
}

#[test]
fn the_most_specific_http_match_wins() {
    let route = format!(
        "{ROUTE_HEAD}{}",
        r#"    - matches: [{path: {type: PathPrefix, value: /x}}]
      backendRefs: [{name: shop, port: 8080}]
    - matches: [{path: {type: Exact, value: /x/exact}}]
      backendRefs: [{name: shadow, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /x}, method: DELETE}]
      backendRefs: [{name: shadow, port: 8080}]
    - matches: [{queryParams: [{name: v, value: "2"}]}, {headers: [{name: x-to, value: shadow}]}]
      backendRefs: [{name: shadow, port: 8080}]
    - backendRefs: [{name: shop, port: 8080}]
"#
    );
    let mesh = Mesh::start(&config(&route));
    let _shop = mesh.instance("shop", "shop-1", &[], &[]);
    let _shadow = mesh.instance("shadow", "shadow-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");
    for (method, path, headers, want) in [
        // An exact path beats a longer-written prefix rule listed first.
        ("GET", "/x/exact", &[][..], "shadow"),
        ("GET", "/x/exactly", &[][..], "shop"),
        // A method match beats the same prefix without one.
        ("DELETE", "/x/y", &[][..], "shadow"),
        ("GET", "/x/y", &[][..], "shop"),
        // Either of a rule's matches: a query parameter, or a header.
        ("GET", "/other?a=1&v=2", &[][..], "shadow"),
        ("GET", "/other?v=3", &[][..], "shop"),
        ("GET", "/other", &[("x-to", "shadow")][..], "shadow"),
        // The prefix rule outranks the query rule for its paths.
        ("GET", "/x/y?v=2", &[][..], "shop"),
    ] {
        let r = c
            .send(method, "shop:8080", path, headers, b"")
            .expect("answer");
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        assert_eq!(json(&r.body)["service"], want, "{method} {path}");
    }
}
