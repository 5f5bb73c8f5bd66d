//! Egress: hosts outside the mesh reached through the sidecar's HTTP proxy
//! port. Plain HTTP under an ExternalService's TrafficPolicy and access
//! policy, HTTPS through `CONNECT` with the app's own TLS end to end, the
//! `registry-only` mode, and egress in `tandem stat`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_e2e::*;

/// A server outside the mesh that is stopped with the test.
struct Outside(Child);

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `openssl s_server` on `addr`, with a self-signed certificate for its
/// IP address (written to `dir/<ip>.pem`): answers `GET /` with a page.
fn https_server(dir: &TempDir, addr: SocketAddr) -> (Outside, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec![addr.ip().to_string()]).unwrap();
    let cert_file = dir.0.join(format!("{}.pem", addr.ip()));
    let key_file = dir.0.join(format!("{}.key", addr.ip()));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(addr.to_string())
        .arg("-cert")
        .arg(&cert_file)
        .arg("-key")
        .arg(&key_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (the test command installs it)");
    let server = Outside(child);
    wait_for(
        "the HTTPS server to listen",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(addr).ok(),
    );
    (server, cert_file)
}

/// A demo app outside the mesh (no sidecar), answering plain HTTP.
fn http_server(addr: SocketAddr) -> Outside {
    let child = Command::new(bin())
        .args(["demo-app", "--service", "outside", "--listen"])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Outside(child);
    wait_for("the HTTP server to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    });
    server
}

/// A free port on a loopback address other than 127.0.0.1.
fn port_on(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap()
}

fn config(mode: &str, http: SocketAddr, tls: SocketAddr) -> String {
    format!(
        r#"{client}---
apiVersion: tandem.dev/v1alpha1
kind: Mesh
metadata: {{name: mesh}}
spec:
  egress: {{mode: {mode}}}
---
apiVersion: tandem.dev/v1alpha1
kind: ExternalService
metadata: {{name: plain-api}}
spec:
  hosts: ["{http_ip}"]
  ports: [{{port: {http_port}, protocol: http}}]
---
apiVersion: tandem.dev/v1alpha1
kind: ExternalService
metadata: {{name: secure-api}}
spec:
  hosts: ["{tls_ip}"]
  ports: [{{port: {tls_port}, protocol: tls}}]
---
apiVersion: tandem.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: plain-api}}
spec:
  targetRef: {{kind: ExternalService, name: plain-api}}
  timeout: 500ms
  retry: {{attempts: 3, on: [5xx], backoff: {{base: 5ms, max: 20ms}}}}
---
apiVersion: tandem.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  targetRef: {{kind: ExternalService, name: plain-api}}
  action: deny
  rules: [{{to: [{{paths: ["/admin/*"]}}]}}]
"#,
        client = service_yaml("client", "http"),
        http_ip = http.ip(),
        http_port = http.port(),
        tls_ip = tls.ip(),
        tls_port = tls.port(),
    )
}

/// One request through the sidecar's HTTP proxy port, naming `host`.
fn ask(proxy: SocketAddr, host: &str, path: &str) -> Resp {
    KeepAlive::connect(proxy)
        .unwrap()
        .send("GET", host, path, &[], b"")
        .unwrap()
}

fn stat_rows(mesh: &Mesh) -> Vec<serde_json::Value> {
    let data = mesh.data_dir();
    let out = Command::new(bin())
        .args([
            "stat",
            "-o",
            "json",
            "--api",
            &mesh.api.to_string(),
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn egress_under_the_mode_external_services_and_their_policies() {
    let dir = TempDir::new("egress");
    let (listed_tls, unlisted_tls) = (port_on("127.0.0.8"), port_on("127.0.0.9"));
    let (listed_http, unlisted_http) = (port_on("127.0.0.7"), port_on("127.0.0.10"));
    let (_s1, listed_cert) = https_server(&dir, listed_tls);
    let (_s2, unlisted_cert) = https_server(&dir, unlisted_tls);
    let _h1 = http_server(listed_http);
    let _h2 = http_server(unlisted_http);

    let mesh = Mesh::start(&config("allow-all", listed_http, listed_tls));
    let client = mesh.instance("client", "client-1", &[], &[]);
    let proxy = format!("http://{}", client.http_proxy);
    let https = |addr: SocketAddr, cert: &std::path::Path| {
        curl(&[
            "-x",
            &proxy,
            "--cacert",
            cert.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{addr}/"),
        ])
    };

    // allow-all: HTTPS through CONNECT to a listed and an unlisted host;
    // the certificate verified is the server's own, so the TLS is the
    // app's, end to end.
    for (addr, cert) in [(listed_tls, &listed_cert), (unlisted_tls, &unlisted_cert)] {
        let out = https(addr, cert);
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "200"),
            "{}",
            out.stderr
        );
    }
    // Plain HTTP to an unlisted host.
    let out = curl(&["-x", &proxy, &format!("http://{unlisted_http}/")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("\"service\":\"outside\""),
        "{}",
        out.stdout
    );

    // The ExternalService's TrafficPolicy: retries (the first two tries
    // fail) and the timeout.
    let out = curl(&[
        "-x",
        &proxy,
        &format!("http://{listed_http}/flaky?key=egress&fails=2"),
    ]);
    assert!(
        out.stdout.contains("\"attempt\":3"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    let r = ask(client.http_proxy, &listed_http.to_string(), "/slow?ms=5000");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (504, Some("upstream-timeout")),
        "{r:?}"
    );
    // Its access policy, checked by the caller's sidecar.
    let r = ask(client.http_proxy, &listed_http.to_string(), "/admin/users");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (403, Some("egress-denied")),
        "{r:?}"
    );
    // The path the policy matches is the normalized one.
    for path in ["//admin/users", "/./admin/users", "/%61dmin/users"] {
        let r = ask(client.http_proxy, &listed_http.to_string(), path);
        assert_eq!(
            (r.status, r.header("tandem-error")),
            (403, Some("egress-denied")),
            "{path}: {r:?}"
        );
    }
    // A tunnel to its http port would carry requests past those rules.
    let out = curl(&[
        "-x",
        &proxy,
        "--proxytunnel",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{listed_http}/admin/users"),
    ]);
    assert!(out.stderr.contains("403"), "{} {}", out.stdout, out.stderr);
    // The sidecar never calls itself on the app's behalf.
    let r = ask(client.http_proxy, &client.http_proxy.to_string(), "/");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (503, Some("upstream-connect-failure")),
        "{r:?}"
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains("own listener"),
        "{r:?}"
    );
    // A port the ExternalService does not list.
    let out = https(
        SocketAddr::new(listed_tls.ip(), unlisted_tls.port()),
        &listed_cert,
    );
    assert_eq!(out.stdout, "000", "{}", out.stderr);
    assert!(out.stderr.contains("403"), "{}", out.stderr);

    // Egress in the golden signals: each ExternalService by name, every
    // unlisted host in one bucket.
    let rows = wait_for("egress in tandem stat", Duration::from_secs(20), || {
        let rows = stat_rows(&mesh);
        let has = |dst: &str| {
            rows.iter().any(|r| {
                r.to_string().contains(&format!("\"{dst}\""))
                    && r.to_string().contains("\"client\"")
            })
        };
        (has("plain-api") && has("secure-api") && has("(unlisted)")).then_some(rows)
    });
    assert!(
        !rows
            .iter()
            .any(|r| r.to_string().contains(&unlisted_tls.ip().to_string())),
        "an unlisted host got a row of its own: {rows:?}"
    );

    // registry-only: listed hosts still pass, the rest are refused.
    mesh.write_config(
        "mesh.yaml",
        &config("registry-only", listed_http, listed_tls),
    );
    wait_for(
        "registry-only to be in force",
        Duration::from_secs(20),
        || {
            let out = https(unlisted_tls, &unlisted_cert);
            (out.stdout == "000" && out.stderr.contains("403")).then_some(())
        },
    );
    let out = https(listed_tls, &listed_cert);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "200"),
        "{}",
        out.stderr
    );
    let r = ask(client.http_proxy, &unlisted_http.to_string(), "/");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (403, Some("egress-denied")),
        "{r:?}"
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains("registry-only"),
        "{r:?}"
    );
    let out = curl(&["-x", &proxy, &format!("http://{listed_http}/")]);
    assert!(
        out.stdout.contains("\"service\":\"outside\""),
        "{}",
        out.stdout
    );
    // A bare name is still a mesh name: unknown, not egress.
    let r = ask(client.http_proxy, "nosuchservice", "/");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (404, Some("unknown-service"))
    );
}
