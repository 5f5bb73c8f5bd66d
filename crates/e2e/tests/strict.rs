//! Strict HTTP/1.1: a malformed request gets a 4xx from the sidecar and
//! never reaches the app, on the outbound proxy port and on the inbound
//! (mTLS) port alike. Each request carries a key in its path (where the
//! request line lets it); the demo app counts every request by key, so
//! "never reached the app" is checked, not assumed.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_e2e::*;

/// (what is wrong, the request; `KEY` is replaced by a key of its own,
/// `HOST` by the target's host).
const CORPUS: &[(&str, &str)] = &[
    ("two Host headers", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nHost: HOST\r\n\r\n"),
    ("two different Host headers", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nHost: other\r\n\r\n"),
    ("no Host in HTTP/1.1", "GET /?key=KEY HTTP/1.1\r\n\r\n"),
    ("Host with userinfo", "GET /?key=KEY HTTP/1.1\r\nHost: user@HOST\r\n\r\n"),
    ("Host with a space", "GET /?key=KEY HTTP/1.1\r\nHost: HO ST\r\n\r\n"),
    ("space before the colon", "GET /?key=KEY HTTP/1.1\r\nHost : HOST\r\n\r\n"),
    ("two different Content-Lengths", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("a Content-Length list", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    ("a negative Content-Length", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: -1\r\n\r\n"),
    ("a Content-Length that is not a number", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: abc\r\n\r\n"),
    ("a Content-Length with a sign", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: +5\r\n\r\nhello"),
    ("a Content-Length too large", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
    ("chunked not last", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("an unknown transfer coding", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: foo\r\n\r\n"),
    ("chunked twice", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("Transfer-Encoding in HTTP/1.0", "POST /?key=KEY HTTP/1.0\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("a chunk size that is not hex", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("a chunk size that overflows", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"),
    ("a chunk size with a space", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n"),
    ("a bare LF in a chunk extension", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n"),
    ("a header name with a space", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nBad Header: x\r\n\r\n"),
    ("an empty header name", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\n: x\r\n\r\n"),
    ("a header name with a non-token byte", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nX@y: z\r\n\r\n"),
    ("a folded header line", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nX-A: a\r\n b\r\n\r\n"),
    ("a NUL in a header value", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nX-A: a\0b\r\n\r\n"),
    ("a bare CR in a header value", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nX-A: a\rb\r\n\r\n"),
    ("a header line without a colon", "GET /?key=KEY HTTP/1.1\r\nHost: HOST\r\nNoColon\r\n\r\n"),
    ("two spaces in the request line", "GET  /?key=KEY HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("a method with a non-token byte", "G(T /?key=KEY HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("an unknown protocol", "GET /?key=KEY HTTX/1.1\r\nHost: HOST\r\n\r\n"),
    ("a lower-case protocol", "GET /?key=KEY http/1.1\r\nHost: HOST\r\n\r\n"),
    ("HTTP/2.0 in an HTTP/1 request line", "GET /?key=KEY HTTP/2.0\r\nHost: HOST\r\n\r\n"),
    ("HTTP/1.2", "GET /?key=KEY HTTP/1.2\r\nHost: HOST\r\n\r\n"),
    ("a space in the target", "GET /?key=KEY a HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("a non-ASCII byte in the target", "GET /\u{ff}?key=KEY HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("the asterisk form for GET", "GET * HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("the authority form for GET", "GET HOST:80 HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("a target that is not a URI", "GET ?key=KEY HTTP/1.1\r\nHost: HOST\r\n\r\n"),
    ("an unsupported Expect", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nExpect: teapot\r\nContent-Length: 5\r\n\r\nhello"),
    ("a Content-Length of a mixed list", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: 5,\r\n\r\nhello"),
    ("a Content-Length with a space inside", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nContent-Length: 1 0\r\n\r\nhello"),
    ("a tab in the request line", "GET\t/?key=KEY HTTP/1.1\r\nHost: HOST\r\n\r\n"),
];

/// Requests whose head is sound and whose body breaks its framing after
/// its first bytes: the sidecar streams bodies, so the head and those bytes
/// may have reached the app when the fault shows; the app's request is
/// then cut (its connection reset before the body ends), and the caller
/// gets a 400, never a 502.
const BODY_CORPUS: &[(&str, &str)] = &[
    ("a chunk longer than its size", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
    ("no CRLF after a chunk", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"),
    ("a bad chunk size after a good chunk", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nx\r\n0\r\n\r\n"),
    ("a malformed trailer", "POST /?key=KEY HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n"),
];

/// The status a raw request got ("" when the connection closed without an
/// answer, which also counts as a refusal).
fn status_of(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

/// Sends `raw` to a plain TCP port; the answer's head (or what came
/// before the connection closed).
fn send_plain(addr: std::net::SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(patience(Duration::from_secs(10))))
        .expect("timeout");
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Sends `raw` over mTLS with the certificate `cert`/`key`; the answer.
fn send_tls(addr: std::net::SocketAddr, cert: &str, key: &str, raw: &[u8]) -> Vec<u8> {
    let mut child = Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-quiet",
            "-ign_eof",
            "-alpn",
            "http/1.1",
            "-connect",
            &addr.to_string(),
            "-cert",
            cert,
            "-key",
            key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (the test command installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(raw);
    drop(stdin);
    child.wait_with_output().expect("openssl").stdout
}

fn check_corpus(
    target: &str,
    host: &str,
    app: &Instance,
    send: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (i, (what, raw)) in BODY_CORPUS.iter().enumerate() {
        let raw = raw
            .replace("KEY", &format!("{target}-body-{i}"))
            .replace("HOST", host);
        let answer = send(raw.as_bytes());
        let status = status_of(&answer);
        if !(status.is_empty() || status == "400") {
            wrong.push(format!("{target}: {what}: status `{status}`"));
        }
    }
    for (i, (what, raw)) in CORPUS.iter().enumerate() {
        let key = format!("{target}-{i}");
        let raw = raw.replace("KEY", &key).replace("HOST", host);
        let mut bytes = raw.into_bytes();
        // `\u{ff}` is two bytes in UTF-8; the corpus means the byte 0xff.
        if let Some(at) = bytes.windows(2).position(|w| w == [0xc3, 0xbf]) {
            bytes.splice(at..at + 2, [0xff]);
        }
        let answer = send(&bytes);
        let status = status_of(&answer);
        let reached = app.counters(&key)["started"].as_u64().unwrap_or(0);
        let refused = status.is_empty() || status.starts_with('4');
        if !refused || reached != 0 {
            wrong.push(format!(
                "{target}: {what}: status `{status}`, reached the app {reached} time(s): {}",
                String::from_utf8_lossy(&answer)
                    .lines()
                    .next()
                    .unwrap_or("")
            ));
        }
    }
    wrong
}

#[test]
fn malformed_requests_get_a_4xx_and_never_reach_the_app() {
    assert!(CORPUS.len() + BODY_CORPUS.len() >= 40);
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    wait_for("web through the sidecars", Duration::from_secs(20), || {
        (http_get(up, "web", "/").map(|r| r.0) == Some(200)).then_some(())
    });
    // A well-formed request of each kind passes, so the refusals below are
    // the requests' fault.
    let ok = send_plain(
        up,
        b"POST /?key=good HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(status_of(&ok), "200", "{}", String::from_utf8_lossy(&ok));
    assert_eq!(web.counters("good")["started"], 1);

    let mut wrong = check_corpus("outbound", "web", &web, &|raw| send_plain(up, raw));

    // Both Transfer-Encoding and Content-Length: the HTTP layer reads the
    // body as chunked and drops the Content-Length (RFC 9112 §6.3), so
    // every hop frames it the same way; the app gets the chunked body's
    // bytes and no stale length.
    for raw in [
        "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut s = std::net::TcpStream::connect(up).expect("connect");
        s.set_read_timeout(Some(patience(Duration::from_secs(10))))
            .expect("timeout");
        s.write_all(raw.as_bytes()).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // The echo, chunked: exactly the five bytes of the body.
        assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{text}");
    }

    // The inbound port, over mTLS with a certificate of the mesh.
    let scratch = TempDir::new("strict-certs");
    let (cert, key) = common::certs::mesh_leaf(&mesh, &scratch.0, "tester");
    let ok = send_tls(
        web.inbound,
        &cert,
        &key,
        b"GET /?key=good-in HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&ok), "200", "{}", String::from_utf8_lossy(&ok));
    wrong.extend(check_corpus("inbound", "web", &web, &|raw| {
        send_tls(web.inbound, &cert, &key, raw)
    }));
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
