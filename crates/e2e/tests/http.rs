//! HTTP/1.1, HTTP/2, gRPC, WebSocket and opaque TCP through a pair of real
//! sidecars, with real clients.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tandem_api::v1::echo_client::EchoClient;
use tandem_api::v1::EchoRequest;
use tandem_e2e::*;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn http1_through_proxy_port_and_upstream_port() {
    let mesh = Mesh::start(&common::config());
    let _web = mesh.instance("web", "web-1", &["--version", "v3"], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let proxy = format!("http://{}", client.http_proxy);

    // HTTP proxy port, destination from the absolute URI.
    let out = curl(&["-x", &proxy, "http://web/"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = json(&out.stdout);
    assert_eq!(v["service"], "web");
    assert_eq!(v["version"], "v3");
    assert_eq!(v["instance"], "web-1");

    // HTTP proxy port, destination from the Host header, with a port.
    let out = curl(&[
        "-H",
        "Host: web:8080",
        &format!("http://{}/", client.http_proxy),
    ]);
    assert_eq!(json(&out.stdout)["instance"], "web-1", "{}", out.stderr);

    // Per-upstream port.
    let up = client.upstream("web");
    let out = curl(&[&format!("http://{up}/")]);
    assert_eq!(json(&out.stdout)["service"], "web", "{}", out.stderr);

    // Keep-alive: two requests in one curl run reuse one connection.
    let out = curl(&[
        "-w",
        "%{num_connects}\n",
        "-o",
        "/dev/null",
        &format!("http://{up}/"),
        "-o",
        "/dev/null",
        &format!("http://{up}/"),
    ]);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        vec!["1", "0"],
        "{}",
        out.stderr
    );

    // A chunked request body arrives whole.
    let body = "chunk ".repeat(5000);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "@-",
            &format!("http://{up}/echo"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), body);

    // The app learns who calls from the caller's verified certificate; a
    // value the calling app made up is replaced.
    let out = curl(&[
        "-H",
        "tandem-client-id: spiffe://tandem.local/ns/default/svc/admin",
        &format!("http://{up}/headers"),
    ]);
    let h = json(&out.stdout);
    assert_eq!(
        h["tandem-client-id"], "spiffe://tandem.local/ns/default/svc/client",
        "{h}"
    );

    // Golden-signal metrics on both sides name the pair.
    let m = client.metrics();
    assert!(
        m.contains(r#"tandem_requests_total{direction="outbound",src_service="client",dst_service="web",status_code="200",tandem_error="",route=""}"#),
        "{m}"
    );
    assert!(m.contains("tandem_request_duration_seconds_bucket{"), "{m}");
    assert!(m.contains("tandem_proxy_duration_seconds_bucket{"), "{m}");
    let wm = _web.metrics();
    assert!(
        wm.contains(r#"tandem_requests_total{direction="inbound",src_service="client",dst_service="web",status_code="200",tandem_error="",route=""}"#),
        "{wm}"
    );
    // The admin /config shows the snapshot in force.
    let (status, cfg) = http_get(client.admin, "a", "/config").expect("config");
    assert_eq!(status, 200);
    let cfg = json(&cfg);
    assert!(cfg["version"].as_u64().unwrap_or(0) > 0);
    assert_eq!(cfg["snapshot"]["service"], "client");
    assert_eq!(http_get(client.admin, "a", "/live").map(|r| r.0), Some(200));
}

/// An app that answers a POST without reading its body (as many do for a
/// small one) costs the caller neither its keep-alive connection nor the
/// next request on it: both sidecars read the rest of the body.
#[test]
fn a_body_the_app_never_reads_keeps_the_connection() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    for addr in [client.http_proxy, client.upstream("web")] {
        let mut c = KeepAlive::connect(addr).expect("connect");
        for i in 0..200 {
            // `/` answers at once; head and body go in separate writes, so
            // the body is still on its way when the answer comes.
            let r = c
                .send("POST", "web", "/?key=unread", &[], b"{\"order\":1}")
                .unwrap_or_else(|| panic!("request {i} via {addr}: the connection broke"));
            assert_eq!(r.status, 200, "{r:?}");
            let r = c
                .send("GET", "web", "/?key=unread", &[], b"")
                .unwrap_or_else(|| panic!("GET after POST {i} via {addr}: the connection broke"));
            assert_eq!(r.status, 200, "{r:?}");
        }
    }
    assert_eq!(web.counters("unread")["completed"], 800);
}

#[test]
fn mesh_errors_are_clear_and_marked() {
    let app = free_port();
    let closed = free_port();
    let extra = format!(
        "{}apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {{name: external}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n  endpoints: [{{address: \"{app}\"}}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {{name: gone}}\nspec:\n  ports: [{{port: 8080, protocol: http}}]\n  endpoints: [{{address: \"{closed}\"}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-only}}\nspec:\n  parentRefs: [{{name: web}}]\n  rules:\n    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n      backendRefs: [{{name: web}}]\n",
        common::config()
    );
    let mesh = Mesh::start(&extra);
    // A service outside the mesh, reached through its static endpoint.
    let dir = TempDir::new("external");
    let _external = Proc::spawn(
        "external",
        &[
            "demo-app",
            "--listen",
            &app.to_string(),
            "--service",
            "external",
        ]
        .map(String::from),
        &dir.0,
    );
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let proxy = format!("http://{}", client.http_proxy);
    let ask = |url: &str| {
        let out = curl(&["-x", &proxy, "-D", "-", url]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout
    };

    wait_for("external app", Duration::from_secs(10), || {
        http_get(app, "x", "/").filter(|r| r.0 == 200)
    });
    let ok = ask("http://external/");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"service\":\"external\""), "{ok}");

    let r = ask("http://web/api/items");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = ask("http://web/other");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert!(r.contains("tandem-error: no-route"), "{r}");
    assert!(r.contains("no route of `web` matches GET /other"), "{r}");

    let r = ask("http://nosuchservice/");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert!(r.contains("tandem-error: unknown-service"), "{r}");

    let r = ask("http://lonely/");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("tandem-error: no-endpoints"), "{r}");

    let r = ask("http://gone/");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("tandem-error: upstream-connect-failure"), "{r}");

    let m = client.metrics();
    assert!(
        m.contains(r#"dst_service="lonely",status_code="503",tandem_error="no-endpoints""#),
        "{m}"
    );
    assert!(
        m.contains(r#"status_code="404",tandem_error="no-route""#),
        "{m}"
    );
}

#[test]
fn http2_and_grpc_keep_trailers() {
    let mesh = Mesh::start(&common::config());
    let _h2 = mesh.instance("h2svc", "h2svc-1", &[], &[]);
    let _grpc = mesh.instance("grpc-echo", "grpc-echo-1", &[], &[]);
    let client =
        mesh.instance_with_upstreams("client", "client-1", &[], &[], &["h2svc", "grpc-echo"]);

    // HTTP/2 with prior knowledge from curl, HTTP/2 on every hop.
    let out = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "\n%{http_version}",
        &format!("http://{}/", client.upstream("h2svc")),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (body, version) = out.stdout.rsplit_once('\n').expect("two parts");
    assert_eq!(version, "2");
    assert_eq!(json(body)["service"], "h2svc");

    let rt = rt();
    rt.block_on(async {
        let mut c = EchoClient::connect(format!("http://{}", client.upstream("grpc-echo")))
            .await
            .expect("connect");
        let r = c
            .unary(EchoRequest {
                message: "hello".into(),
                count: 0,
            })
            .await
            .expect("unary");
        assert_eq!(r.get_ref().message, "hello");
        assert_eq!(r.get_ref().served_by, "grpc-echo-1");

        // The status, its message and custom metadata travel in trailers.
        let e = c
            .unary(EchoRequest {
                message: "fail:quota".into(),
                count: 0,
            })
            .await
            .expect_err("status");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.message(), "quota");
        assert_eq!(
            e.metadata()
                .get("x-demo-trailer")
                .and_then(|v| v.to_str().ok()),
            Some("kept")
        );

        let mut s = c
            .server_stream(EchoRequest {
                message: "m".into(),
                count: 50,
            })
            .await
            .expect("stream")
            .into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await.expect("message") {
            assert_eq!(m.message, format!("m {n}"));
            n += 1;
        }
        assert_eq!(n, 50);
        // Trailers after the stream: grpc-status 0 arrived (no error above).
        let trailers = s.trailers().await.expect("trailers");
        assert!(trailers.is_some());
    });
}

#[test]
fn ten_megabyte_body_streams_both_ways() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let dir = TempDir::new("body");
    let input = dir.0.join("in.bin");
    let output = dir.0.join("out.bin");
    // 10 MiB of varied bytes.
    let mut data = Vec::with_capacity(10 << 20);
    let mut x: u32 = 12345;
    while data.len() < 10 << 20 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&input, &data).expect("write");
    let before = (client.proxy().rss_kib(), web.proxy().rss_kib());
    for url in [
        format!("http://{}/echo", client.upstream("web")),
        "http://web/echo".to_string(),
    ] {
        let mut args = vec![
            "--data-binary".to_string(),
            format!("@{}", input.display()),
            "-o".into(),
            output.display().to_string(),
            "-w".into(),
            "%{http_code}".into(),
        ];
        if url.starts_with("http://web") {
            args.extend(["-x".to_string(), format!("http://{}", client.http_proxy)]);
        }
        args.push(url);
        let out = curl(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(out.stdout, "200", "{}", out.stderr);
        let got = std::fs::read(&output).expect("read");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "body changed in transit");
    }
    // Streaming, not buffering: neither sidecar ever grew by anything like
    // the body (the most each has held, not a sample afterwards).
    let after = (client.proxy().peak_rss_kib(), web.proxy().peak_rss_kib());
    assert!(
        after.0 < before.0 + 8 * 1024,
        "client sidecar RSS {before:?} -> {after:?} KiB"
    );
    assert!(
        after.1 < before.1 + 8 * 1024,
        "web sidecar RSS {before:?} -> {after:?} KiB"
    );
}

#[test]
fn websocket_echo_through_both_outbound_ports() {
    let mesh = Mesh::start(&common::config());
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    rt().block_on(async {
        let (mut ws, resp) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws", client.upstream("web")))
                .await
                .expect("websocket via upstream port");
        assert_eq!(resp.status(), 101);
        ws.send("hello".into()).await.expect("send");
        let m = ws.next().await.expect("message").expect("ok");
        assert_eq!(m.into_text().expect("text").as_str(), "hello");
        let big = vec![7u8; 200_000];
        ws.send(big.clone().into()).await.expect("send");
        let m = ws.next().await.expect("message").expect("ok");
        assert_eq!(m.into_data().as_ref(), &big[..]);
        ws.close(None).await.expect("close");

        // Through the HTTP proxy port: the Host names the service.
        let tcp = tokio::net::TcpStream::connect(client.http_proxy)
            .await
            .expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async("ws://web/ws", tcp)
            .await
            .expect("websocket via proxy port");
        ws.send("again".into()).await.expect("send");
        let m = ws.next().await.expect("message").expect("ok");
        assert_eq!(m.into_text().expect("text").as_str(), "again");
    });
}

#[test]
fn opaque_tcp_echo() {
    let mesh = Mesh::start(&common::config());
    let echo = free_port().to_string();
    let _svc = mesh.instance("tcpecho", "tcpecho-1", &["--tcp-echo", &echo], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["tcpecho"]);
    let mut s = std::net::TcpStream::connect(client.upstream("tcpecho")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut w = s.try_clone().expect("clone");
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).expect("write");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read");
    writer.join().expect("writer");
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    let m = wait_for("tcp metrics", Duration::from_secs(5), || {
        let m = client.metrics();
        m.contains(r#"tandem_tcp_connections_closed_total{direction="outbound",src_service="client",dst_service="tcpecho"} 1"#).then_some(m)
    });
    assert!(m.contains(r#"tandem_tcp_read_bytes_total{direction="outbound",src_service="client",dst_service="tcpecho"} 1000000"#), "{m}");
}

#[test]
fn malformed_traffic_gets_an_answer_not_a_crash() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let exchange = |addr: std::net::SocketAddr, bytes: &[u8]| -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(600_000)
    );
    for addr in [client.http_proxy, client.upstream("web")] {
        // Not HTTP at all: a 400, or the connection is closed; never a hang.
        let r = exchange(addr, b"\x16\x03\x01 not http at all\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{addr}: {r}");
        // Headers far too large: refused.
        let r = exchange(addr, huge.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{addr}: {r}");
        // A request line with an invalid method.
        let r = exchange(addr, b"G\x01T / HTTP/1.1\r\nHost: web\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{addr}: {r}");
    }
    // The inbound side speaks only mTLS: plaintext and a broken handshake
    // are closed, and counted.
    for bytes in [
        // A TLS record header followed by a handshake that is not one.
        &b"\x16\x03\x01\x00\x05hello"[..],
        huge.as_bytes(),
        b"G\x01T / HTTP/1.1\r\nHost: web\r\n\r\n",
    ] {
        assert_eq!(exchange(web.inbound, bytes), "");
    }
    let m = web.metrics();
    assert!(
        m.contains(r#"tandem_tls_handshakes_total{direction="inbound",result="plaintext"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"tandem_tls_handshakes_total{direction="inbound",result="protocol"} 1"#),
        "{m}"
    );
    // Both sidecars are still up and serving.
    let out = curl(&[&format!("http://{}/", client.upstream("web"))]);
    assert_eq!(json(&out.stdout)["service"], "web", "{}", out.stderr);
    for inst in [&client, &web] {
        assert_eq!(
            http_get(inst.admin, "admin", "/live").map(|r| r.0),
            Some(200)
        );
    }
}
