//! Distributed tracing through real sidecars and a real OTLP receiver
//! (the official OpenTelemetry protos, in Python): one request through
//! client → web → orders → payments is one trace whose spans link parent
//! to child across every sidecar; W3C and B3 callers join their own
//! traces; a dead collector costs the requests nothing.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tandem_e2e::*;

fn config() -> String {
    ["client", "web", "orders", "payments"]
        .iter()
        .map(|s| service_yaml(s, "http"))
        .collect()
}

/// Proxy flags exporting to `c` over `protocol`.
fn export_to(c: &Collector, protocol: &str) -> Vec<String> {
    let addr = if protocol == "grpc" { c.grpc } else { c.http };
    vec![
        "--otlp-endpoint".into(),
        format!("http://{addr}"),
        "--otlp-protocol".into(),
        protocol.into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The spans of trace `id`, once `n` of them arrived.
fn trace(c: &Collector, id: &str, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} spans of trace {id}"),
        Duration::from_secs(20),
        || {
            let spans: Vec<Value> = c
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == id)
                .collect();
            (spans.len() >= n).then_some(spans)
        },
    )
}

const SERVER: i64 = 2;
const CLIENT: i64 = 3;

#[test]
fn one_request_is_one_trace_across_every_sidecar() {
    let c = Collector::start();
    let mesh = Mesh::start(&config());
    // Both OTLP protocols, sidecar by sidecar.
    let (grpc, http) = (export_to(&c, "grpc"), export_to(&c, "http/protobuf"));
    let _payments = mesh.instance("payments", "payments-1", &[], &strs(&grpc));
    let _orders = mesh.instance(
        "orders",
        "orders-1",
        &["--call", "POST payments/charge"],
        &strs(&http),
    );
    let _web = mesh.instance("web", "web-1", &["--call", "orders"], &strs(&grpc));
    let client = mesh.instance("client", "client-1", &[], &strs(&http));

    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    let r = conn.send("GET", "web:8080", "/", &[], b"").expect("answer");
    assert_eq!(r.status, 200, "{r:?}");

    // The client's sidecar started the trace: find it by its root span.
    let root = wait_for("the root span", Duration::from_secs(20), || {
        c.spans()
            .into_iter()
            .find(|s| s["service"] == "client" && s["kind"] == CLIENT && s["parent_span_id"] == "")
    });
    let id = root["trace_id"].as_str().expect("trace id").to_string();
    // client: request + try; web and orders: server + request + try;
    // payments: server.
    let spans = trace(&c, &id, 9);
    assert_eq!(spans.len(), 9, "{spans:#?}");
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap_or(""), s))
        .collect();
    // From the last hop up to the root, parent by parent.
    let mut chain = Vec::new();
    let mut span = spans
        .iter()
        .find(|s| s["service"] == "payments")
        .expect("payments' span");
    loop {
        chain.push((
            span["service"].as_str().unwrap_or("").to_string(),
            span["kind"].as_i64().unwrap_or(0),
            span["name"].as_str().unwrap_or("").to_string(),
        ));
        let parent = span["parent_span_id"].as_str().unwrap_or("");
        if parent.is_empty() {
            break;
        }
        span = by_id
            .get(parent)
            .unwrap_or_else(|| panic!("parent {parent} of {span} is missing: {spans:#?}"));
    }
    chain.reverse();
    let want: Vec<(String, i64, String)> = [
        ("client", CLIENT, "GET"),
        ("client", CLIENT, "GET try 1"),
        ("web", SERVER, "GET"),
        ("web", CLIENT, "GET"),
        ("web", CLIENT, "GET try 1"),
        ("orders", SERVER, "GET"),
        ("orders", CLIENT, "POST"),
        ("orders", CLIENT, "POST try 1"),
        ("payments", SERVER, "POST"),
    ]
    .iter()
    .map(|(s, k, n)| (s.to_string(), *k, n.to_string()))
    .collect();
    assert_eq!(chain, want, "{spans:#?}");
    // Both protocols delivered; the attributes say who talked to whom.
    let protocols: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter_map(|s| s["protocol"].as_str())
        .collect();
    assert_eq!(protocols, ["grpc", "http"].into_iter().collect());
    let server = spans
        .iter()
        .find(|s| s["service"] == "payments")
        .expect("payments");
    let a = &server["attributes"];
    assert_eq!(a["http.request.method"], "POST", "{server}");
    assert_eq!(a["url.path"], "/charge", "{server}");
    assert_eq!(a["http.response.status_code"], 200, "{server}");
    assert_eq!(a["tandem.peer.service"], "orders", "{server}");
    assert_eq!(
        a["tandem.peer.spiffe_id"], "spiffe://tandem.local/ns/default/svc/orders",
        "{server}"
    );
    let try_span = spans
        .iter()
        .find(|s| s["service"] == "orders" && s["name"] == "POST try 1")
        .expect("orders' try");
    assert_eq!(try_span["attributes"]["peer.service"], "payments");
    assert_eq!(
        try_span["attributes"]["tandem.peer.spiffe_id"],
        "spiffe://tandem.local/ns/default/svc/payments"
    );
    // A child never starts before its parent.
    for s in &spans {
        if let Some(p) = by_id.get(s["parent_span_id"].as_str().unwrap_or("")) {
            assert!(s["start"].as_u64() >= p["start"].as_u64(), "{s} before {p}");
        }
    }
}

#[test]
fn w3c_and_b3_callers_join_their_own_traces() {
    let c = Collector::start();
    let mesh = Mesh::start(&config());
    let http = export_to(&c, "http/protobuf");
    let _web = mesh.instance("web", "web-1", &[], &strs(&http));
    let client = mesh.instance("client", "client-1", &[], &strs(&http));
    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    let mut headers_seen = |h: &[(&str, &str)]| -> Value {
        let r = conn
            .send("GET", "web:8080", "/headers", h, b"")
            .expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_slice(&r.body).expect("JSON")
    };

    // W3C: the trace and the caller's span are kept.
    let w3c_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let seen = headers_seen(&[
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "vendor=1"),
    ]);
    let tp = seen["traceparent"].as_str().expect("traceparent");
    assert!(
        tp.starts_with(&format!("00-{w3c_trace}-")) && tp.ends_with("-01"),
        "{seen}"
    );
    assert_eq!(seen["tracestate"], "vendor=1", "{seen}");
    // An x-request-id was made on the way.
    assert_eq!(
        seen["x-request-id"].as_str().map(str::len),
        Some(36),
        "{seen}"
    );
    let spans = trace(&c, w3c_trace, 3);
    let root = spans
        .iter()
        .find(|s| {
            s["service"] == "client"
                && s["kind"] == CLIENT
                && !s["name"].as_str().unwrap_or("").contains("try")
        })
        .expect("client span");
    assert_eq!(root["parent_span_id"], "00f067aa0ba902b7", "{spans:#?}");
    // The app sees the server span of its own sidecar as the parent.
    let server = spans.iter().find(|s| s["kind"] == SERVER).expect("server");
    assert!(
        tp.contains(server["span_id"].as_str().expect("id")),
        "{tp} {server}"
    );

    // B3, several headers: the trace joins, and the app gets its B3 back
    // (and W3C).
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let seen = headers_seen(&[
        ("x-b3-traceid", b3_trace),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
    ]);
    assert_eq!(seen["x-b3-traceid"], b3_trace, "{seen}");
    assert_eq!(seen["x-b3-sampled"], "1", "{seen}");
    assert!(
        seen["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains(b3_trace)),
        "{seen}"
    );
    let spans = trace(&c, b3_trace, 3);
    assert!(
        spans
            .iter()
            .any(|s| s["parent_span_id"] == "e457b5a2e4d86bd1"),
        "{spans:#?}"
    );
    // B3 in one header.
    let single = "a3ce929d0e0e47364bf92f3577b34da6";
    let seen = headers_seen(&[("b3", "a3ce929d0e0e47364bf92f3577b34da6-00f067aa0ba902b7-1")]);
    assert!(
        seen["b3"]
            .as_str()
            .is_some_and(|b| b.starts_with(single) && b.ends_with("-1")),
        "{seen}"
    );
    trace(&c, single, 3);
    // A caller that says "not sampled" is followed: no spans, the flag
    // passes on.
    let unsampled = "11111111111111111111111111111111";
    let seen = headers_seen(&[(
        "traceparent",
        "00-11111111111111111111111111111111-00f067aa0ba902b7-00",
    )]);
    assert!(
        seen["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains(unsampled) && t.ends_with("-00")),
        "{seen}"
    );
    // Spans of a later sampled request arrive; the unsampled one never does.
    let later = "22222222222222222222222222222222";
    headers_seen(&[(
        "traceparent",
        "00-22222222222222222222222222222222-00f067aa0ba902b7-01",
    )]);
    trace(&c, later, 3);
    assert!(c.spans().iter().all(|s| s["trace_id"] != unsampled));
}

#[test]
fn a_dead_collector_costs_the_requests_nothing() {
    let mesh = Mesh::start(&config());
    // Nothing listens there.
    let dead = format!("http://{}", free_port());
    let args = ["--otlp-endpoint", dead.as_str(), "--otlp-protocol", "grpc"];
    let _web = mesh.instance("web", "web-1", &[], &args);
    let client = mesh.instance("client", "client-1", &[], &args);
    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    for _ in 0..200 {
        let r = conn.send("GET", "web:8080", "/", &[], b"").expect("answer");
        assert_eq!(r.status, 200, "{r:?}");
    }
    // The spans were made, and dropped because nobody took them.
    wait_for(
        "failed exports to be counted",
        Duration::from_secs(30),
        || {
            let m = client.metrics();
            (metric_sum(
                &m,
                "tandem_trace_spans_total",
                &[("result", "dropped-export-failed")],
            ) > 0.0)
                .then_some(())
        },
    );
    let m = client.metrics();
    assert_eq!(
        metric_sum(&m, "tandem_trace_spans_total", &[("result", "exported")]),
        0.0
    );
}

#[test]
fn tandem_up_hands_the_otel_variables_to_its_sidecars() {
    let c = Collector::start();
    let dir = TempDir::new("up-traces");
    let _up = KillOnDrop(start_up(
        &dir,
        free_port(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", c.grpc)),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1".into()),
        ],
    ));
    // A trace of the demo's loadgen → web → orders → payments, whole.
    let chain = wait_for(
        "a whole trace from loadgen to payments",
        Duration::from_secs(90),
        || {
            let spans = c.spans();
            let by_id: HashMap<&str, &Value> = spans
                .iter()
                .map(|s| (s["span_id"].as_str().unwrap_or(""), s))
                .collect();
            spans
                .iter()
                .filter(|s| s["service"] == "payments")
                .find_map(|last| {
                    let mut services = vec![last["service"].as_str()?.to_string()];
                    let mut span = last;
                    loop {
                        let parent = span["parent_span_id"].as_str()?;
                        if parent.is_empty() {
                            break;
                        }
                        span = by_id.get(parent)?;
                        if services.last().map(String::as_str) != span["service"].as_str() {
                            services.push(span["service"].as_str()?.to_string());
                        }
                    }
                    services.reverse();
                    Some(services)
                })
        },
    );
    assert_eq!(chain, ["loadgen", "web", "orders", "payments"]);
    let shown = std::fs::read_to_string(dir.0.join("up.out")).unwrap_or_default();
    assert!(shown.contains("every sidecar exports spans to"), "{shown}");
}

#[test]
fn access_log_lines_carry_the_trace_of_their_spans() {
    let c = Collector::start();
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("access");
    let (client_log, web_log) = (dir.0.join("client.jsonl"), dir.0.join("web.jsonl"));
    let with_log = |path: &std::path::Path| {
        let mut a = export_to(&c, "http/protobuf");
        a.extend(["--access-log".to_string(), path.display().to_string()]);
        a
    };
    let _web = mesh.instance("web", "web-1", &[], &strs(&with_log(&web_log)));
    let client = mesh.instance("client", "client-1", &[], &strs(&with_log(&client_log)));
    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let r = conn
        .send(
            "GET",
            "web:8080",
            "/items?user=alice&token=secret",
            &[(
                "traceparent",
                "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
            b"",
        )
        .expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    let spans = trace(&c, trace_id, 3);
    let lines = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    };
    let (out, inb) = wait_for("a line in each access log", Duration::from_secs(20), || {
        let (o, i) = (lines(&client_log), lines(&web_log));
        (!o.is_empty() && !i.is_empty()).then_some((o, i))
    });
    let (out, inb) = (&out[0], &inb[0]);
    for line in [out, inb] {
        assert_eq!(line["trace_id"], trace_id, "{line}");
        // The line's span is one of the trace's spans.
        let span = line["span_id"].as_str().expect("span id");
        assert!(
            spans.iter().any(|s| s["span_id"] == span),
            "{line} {spans:#?}"
        );
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        // Query values are redacted by default.
        assert_eq!(
            line["path"], "/items?user=redacted&token=redacted",
            "{line}"
        );
        for f in ["duration_ms", "upstream_ms", "proxy_ms"] {
            assert!(line[f].as_f64().is_some_and(|v| v >= 0.0), "{f}: {line}");
        }
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
    // One request id across both hops, made by the first sidecar.
    assert_eq!(out["request_id"].as_str().map(str::len), Some(36), "{out}");
    assert_eq!(out["request_id"], inb["request_id"]);
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["caller"], "spiffe://tandem.local/ns/default/svc/client");
    assert_eq!(out["callee"], "spiffe://tandem.local/ns/default/svc/web");
    assert_eq!(out["tries"], 1);
    assert!(out["endpoint"]
        .as_str()
        .is_some_and(|e| e.parse::<std::net::SocketAddr>().is_ok()));
    assert_eq!(inb["direction"], "inbound");
    assert_eq!(inb["caller"], "spiffe://tandem.local/ns/default/svc/client");
    assert_eq!(inb["callee"], "spiffe://tandem.local/ns/default/svc/web");
    assert!(
        inb["response_bytes"].as_u64().is_some_and(|b| b > 0),
        "{inb}"
    );
}
