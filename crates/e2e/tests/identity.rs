//! Identity and mTLS, end to end: real certificates from the control
//! plane's CA, real TLS handshakes between real sidecars, checked with curl,
//! openssl and a packet capture.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::certs::{leaf, mesh_ca, other_ca, spiffe, Leaf, TD};
use tandem_e2e::{
    bin, contains, curl, free_port, http_get, metric, tandem_ok, wait_for, Capture, Instance, Load,
    Mesh, TempDir,
};

/// What an app behind a sidecar may trust (docs/security.md): headers a
/// caller sends cannot remove or stand in for the ones the sidecar sets,
/// and an app's own `tandem-error` is not passed off as the mesh's.
#[test]
fn the_app_trusts_only_the_headers_its_sidecar_sets() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let scratch = TempDir::new("certs");
    let (c, k) = common::certs::mesh_leaf(&mesh, &scratch.0, "tester");
    let url = format!("https://{}/headers", web.inbound);
    // HTTP/1.1: HTTP/2 has no `Connection` header.
    let out = curl(&[
        "--http1.1",
        "-k",
        "--cert",
        &c,
        "--key",
        &k,
        "-H",
        "Connection: tandem-client-id, host, x-forwarded-proto",
        "-H",
        "tandem_client_id: spiffe://tandem.local/ns/default/svc/root",
        "-H",
        "Tandem-Client-Id: spiffe://tandem.local/ns/default/svc/root",
        "-H",
        "X_Forwarded_For: 6.6.6.6",
        "-H",
        "x-forwarded-for: 9.9.9.9",
        "-H",
        "x-forwarded-proto: gopher",
        &url,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let h: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(h["tandem-client-id"], spiffe("default", "tester"), "{h}");
    assert_eq!(h["host"], web.inbound.to_string(), "{h}");
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
    assert_eq!(h["x-forwarded-for"], "9.9.9.9, 127.0.0.1", "{h}");
    let names: Vec<&String> = h.as_object().expect("object").keys().collect();
    assert!(!names.iter().any(|n| n.contains('_')), "{h}");

    // An app's `tandem-error` does not reach the caller; its other
    // headers do.
    let proxy = format!("http://{}", client.http_proxy);
    for (name, shown) in [("tandem-error", false), ("x-app", true)] {
        let out = curl(&[
            "-s",
            "-D",
            "-",
            "-x",
            &proxy,
            &format!("http://web/set-header?name={name}&value=no-endpoints"),
        ]);
        assert!(out.stdout.starts_with("HTTP/1.1 200"), "{}", out.stdout);
        let head = out.stdout.to_ascii_lowercase();
        assert_eq!(
            head.contains(&format!("\r\n{name}: no-endpoints")),
            shown,
            "{head}"
        );
    }
    assert!(!client.metrics().contains(r#"tandem_error="no-endpoints""#));
}

fn handshakes(inst: &Instance, direction: &str, result: &str) -> f64 {
    metric(
        &inst.metrics(),
        &format!(r#"tandem_tls_handshakes_total{{direction="{direction}",result="{result}"}}"#),
    )
    .unwrap_or(0.0)
}

/// `openssl s_client` sending one HTTP request; its whole output.
fn s_client(addr: std::net::SocketAddr, extra: &[&str]) -> String {
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", &addr.to_string()])
        .args(["-tls1_3", "-ign_eof", "-servername", "web.default"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (the test command installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn inbound_side_requires_a_mesh_certificate_and_counts_refusals() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let scratch = TempDir::new("certs");
    let dir = scratch.0.as_path();
    let (ca_crt, ca_key) = mesh_ca(&mesh);
    let mesh_issuer = (ca_crt.as_path(), ca_key.as_path());
    let (oc, ok) = other_ca(dir);
    let other = (oc.as_path(), ok.as_path());
    let url = format!("https://{}/headers", web.inbound);

    // A certificate from the mesh CA is accepted, and the app is told who
    // called (with a spoofed header replaced).
    let (c, k) = leaf(
        dir,
        "good",
        Leaf {
            uris: vec![spiffe("default", "tester")],
            from: -60,
            to: 600,
            ca_flag: false,
            issuer: mesh_issuer,
            lineage: None,
        },
    );
    let out = curl(&[
        "-k",
        "--cert",
        &c,
        "--key",
        &k,
        "-H",
        "tandem-client-id: spiffe://tandem.local/ns/default/svc/root",
        &url,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let h: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(h["tandem-client-id"], spiffe("default", "tester"), "{h}");
    // ALPN offers HTTP/2 across the hop.
    let s = s_client(
        web.inbound,
        &["-cert", &c, "-key", &k, "-alpn", "h2,http/1.1"],
    );
    assert!(s.contains("ALPN protocol: h2"), "{s}");
    assert_eq!(handshakes(&web, "inbound", "ok"), 2.0);

    // Each of these is refused, and counted under its reason.
    let cases: Vec<(&str, Leaf<'_>, &str)> = vec![
        (
            "expired",
            Leaf {
                uris: vec![spiffe("default", "tester")],
                from: -7200,
                to: -3600,
                ca_flag: false,
                issuer: mesh_issuer,
                lineage: None,
            },
            "expired",
        ),
        (
            "future",
            Leaf {
                uris: vec![spiffe("default", "tester")],
                from: 3600,
                to: 7200,
                ca_flag: false,
                issuer: mesh_issuer,
                lineage: None,
            },
            "not-yet-valid",
        ),
        (
            "other-td",
            Leaf {
                uris: vec!["spiffe://other.org/ns/default/svc/tester".into()],
                from: -60,
                to: 600,
                ca_flag: false,
                issuer: mesh_issuer,
                lineage: None,
            },
            "other-trust-domain",
        ),
        (
            "two-sans",
            Leaf {
                uris: vec![spiffe("default", "tester"), spiffe("default", "web")],
                from: -60,
                to: 600,
                ca_flag: false,
                issuer: mesh_issuer,
                lineage: None,
            },
            "several-uri-sans",
        ),
        (
            "ca-leaf",
            Leaf {
                uris: vec![spiffe("default", "tester")],
                from: -60,
                to: 600,
                ca_flag: true,
                issuer: mesh_issuer,
                lineage: None,
            },
            "ca-as-leaf",
        ),
        (
            "other-ca",
            Leaf {
                uris: vec![spiffe("default", "tester")],
                from: -60,
                to: 600,
                ca_flag: false,
                issuer: other,
                lineage: None,
            },
            "unknown-ca",
        ),
    ];
    for (name, l, reason) in cases {
        let (c, k) = leaf(dir, name, l);
        let out = curl(&["-k", "--cert", &c, "--key", &k, &url]);
        assert_ne!(out.code, 0, "{name} was accepted: {}", out.stdout);
        assert!(
            !out.stdout.contains("tandem-client-id"),
            "{name}: {}",
            out.stdout
        );
        let n = wait_for(
            &format!("{name} counted as {reason}"),
            Duration::from_secs(5),
            || {
                let n = handshakes(&web, "inbound", reason);
                (n >= 1.0).then_some(n)
            },
        );
        assert_eq!(n, 1.0, "{name}");
    }
    // Without a client certificate, and with one from another CA, openssl
    // gets an alert instead of an answer.
    let s = s_client(web.inbound, &[]);
    assert!(s.contains("alert") && !s.contains("HTTP/1.1 200"), "{s}");
    assert_eq!(handshakes(&web, "inbound", "no-client-cert"), 1.0);
    let (c, k) = (dir.join("other-ca.crt"), dir.join("other-ca.key"));
    let (oc, ok) = leaf(
        dir,
        "other-ca-leaf",
        Leaf {
            uris: vec![spiffe("default", "tester")],
            from: -60,
            to: 600,
            ca_flag: false,
            issuer: (c.as_path(), k.as_path()),
            lineage: None,
        },
    );
    let s = s_client(web.inbound, &["-cert", &oc, "-key", &ok]);
    assert!(s.contains("alert") && !s.contains("HTTP/1.1 200"), "{s}");
    assert_eq!(handshakes(&web, "inbound", "unknown-ca"), 2.0);
    // Plaintext is refused too (the service is strict by default).
    let out = curl(&[&format!("http://{}/", web.inbound)]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert_eq!(handshakes(&web, "inbound", "plaintext"), 1.0);
}

#[test]
fn outbound_side_refuses_a_peer_with_another_identity() {
    let mesh = Mesh::start(&common::config());
    // A real `lonely` sidecar, and a `web` registration that points at it: the
    // endpoint answers with a valid mesh certificate, but not web's.
    // (An address a live proxy of another service registered is refused,
    // so web registers it first and lonely then listens there while
    // registering another.)
    let taken = free_port();
    let _web = mesh.instance("web", "web-1", &[], &["--advertise", &taken.to_string()]);
    let mut lonely = mesh.instance("lonely", "lonely-1", &[], &[]);
    lonely.proxy_mut().kill();
    lonely.inbound = taken;
    let elsewhere = free_port().to_string();
    mesh.start_proxy(&mut lonely, &["--advertise", &elsewhere]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let out = curl(&["-D", "-", &format!("http://{}/", client.upstream("web"))]);
    assert!(out.stdout.starts_with("HTTP/1.1 503"), "{}", out.stdout);
    assert!(
        out.stdout.contains("tandem-error: upstream-tls-failure"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("spiffe://"), "{}", out.stdout);
    assert!(handshakes(&client, "outbound", "unexpected-identity") >= 1.0);
    // The request never reached the impostor's app.
    assert!(
        !lonely
            .metrics()
            .contains(r#"direction="inbound",src_service="client""#),
        "{}",
        lonely.metrics()
    );
}

#[test]
fn bytes_between_sidecars_are_encrypted() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let echo = free_port().to_string();
    let tcp = mesh.instance("tcpecho", "tcpecho-1", &["--tcp-echo", &echo], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web", "tcpecho"]);
    let scratch = TempDir::new("capture");
    let marker = "TANDEM-MARKER-7f3a9c1e-in-the-body";
    let hop = Capture::start(&scratch.0, web.inbound.port());
    let app = Capture::start(&scratch.0, web.app_addr.port());
    let tcp_hop = Capture::start(&scratch.0, tcp.inbound.port());
    for _ in 0..3 {
        let out = curl(&[
            "-d",
            marker,
            &format!("http://{}/echo", client.upstream("web")),
        ]);
        assert!(out.stdout.contains(marker), "{} {}", out.stdout, out.stderr);
    }
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(client.upstream("tcpecho")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(marker.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, marker);
    }
    let hop = hop.stop();
    let app = app.stop();
    let tcp_hop = tcp_hop.stop();
    // The capture works: between the inbound sidecar and the app (plain
    // loopback by design) the marker is there...
    assert!(
        contains(&app, marker.as_bytes()),
        "no marker on the app side ({} bytes captured)",
        app.len()
    );
    // ...and between the sidecars it is not, though traffic was captured.
    assert!(hop.len() > 2000, "only {} bytes captured", hop.len());
    assert!(
        !contains(&hop, marker.as_bytes()),
        "marker in clear between sidecars"
    );
    assert!(
        tcp_hop.len() > 1000,
        "only {} bytes captured",
        tcp_hop.len()
    );
    assert!(
        !contains(&tcp_hop, marker.as_bytes()),
        "TCP marker in clear"
    );
    assert!(handshakes(&tcp, "inbound", "ok") >= 1.0);
}

#[test]
fn issued_certificates_follow_the_spiffe_rules() {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let (_, body) = http_get(web.admin, "admin", "/certs").unwrap();
    let certs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(certs["spiffe_id"], spiffe("default", "web"));
    assert!(
        !body.contains("PRIVATE KEY"),
        "the admin endpoint shows a key"
    );
    let leaf_pem = certs["chain"][0]["pem"].as_str().unwrap();
    let bundle_pem = certs["bundle"][0]["pem"].as_str().unwrap();

    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let leaf_der = der(leaf_pem);
    let (_, cert) = X509Certificate::from_der(&leaf_der).unwrap();
    let mut uris = Vec::new();
    let (mut saw_bc, mut saw_ku) = (false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => {
                saw_bc = true;
                assert!(!bc.ca, "leaf is a CA");
            }
            ParsedExtension::KeyUsage(ku) => {
                saw_ku = true;
                assert!(ext.critical, "key usage not critical");
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign());
            }
            _ => {}
        }
    }
    assert_eq!(uris, vec![spiffe("default", "web")], "exactly one URI SAN");
    assert!(saw_bc && saw_ku);
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (24 * 3600..=24 * 3600 + 120).contains(&life),
        "lifetime {life}s"
    );
    // The CA carries no name constraints.
    let ca_der = der(bundle_pem);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());
    assert!(!ca
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_))));

    // openssl accepts the chain.
    let scratch = TempDir::new("verify");
    let (l, b) = (scratch.0.join("leaf.pem"), scratch.0.join("bundle.pem"));
    std::fs::write(&l, leaf_pem).unwrap();
    std::fs::write(&b, bundle_pem).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&b)
        .arg(&l)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": OK"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CA key is private to its owner.
    let (_, key) = mesh_ca(&mesh);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A proxy given the bundle pins it instead of learning it.
    let (root, _) = mesh_ca(&mesh);
    let pinned = mesh.instance(
        "client",
        "client-1",
        &[],
        &["--ca-bundle", root.to_str().unwrap()],
    );
    let (status, body) = http_get(pinned.http_proxy, "web", "/headers").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&spiffe("default", "client")), "{body}");
    // `tandem status` shows identity and expiry.
    let ps = mesh.proxies();
    let web_row = ps.iter().find(|p| p["service"] == "web").unwrap();
    assert_eq!(web_row["spiffe_id"], spiffe("default", "web"), "{ps:?}");
    assert!(web_row["cert_not_after"].as_u64().unwrap() > 0);
}

/// Asks the control plane to sign a CSR for `csr_for` with `token`.
fn certify(mesh: &Mesh, token: &str, csr_for: &str) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let id = tandem_identity::SpiffeId::new(TD, "default", csr_for);
    let (csr, _key) = tandem_identity::ca::new_csr(&id).unwrap();
    let cfg = mesh
        .bare_identity()
        .client_config_anonymous(&[tandem_identity::tls::ALPN_H2]);
    mesh.certify(cfg, token, csr).map(|r| r.chain)
}

#[test]
fn join_tokens_grant_one_identity_and_can_be_refused() {
    let mesh = Mesh::start(&common::config());
    let orders = mesh.token("orders");
    // The right identity: issued.
    let chain = certify(&mesh, &orders, "orders").expect("orders certificate");
    let id = tandem_identity::spiffe::check_svid(&chain[0], TD).unwrap();
    assert_eq!(id.service, "orders");
    // A token for orders never yields payments.
    let e = certify(&mesh, &orders, "payments").unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("svc/orders"), "{}", e.message());
    // Expired.
    // (Reusable: the attempts before it expires would spend a single-use
    // one, and then it would be refused as used, not as expired.)
    let short = mesh.token_with(&["--service", "orders", "--ttl", "1s", "--reusable"]);
    let e = wait_for("the short token to expire", Duration::from_secs(10), || {
        certify(&mesh, &short, "orders").err()
    });
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
    // Tampered: claims rewritten to payments, signature kept.
    let (claims, _, mac) = tandem_identity::token::inspect(&orders).unwrap();
    let forged_claims = serde_json::json!({
        "id": claims.id, "td": claims.td, "ns": "default", "svc": "payments", "exp": claims.exp,
    });
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let forged = format!(
        "tdm1.{}.{}",
        b64.encode(serde_json::to_vec(&forged_claims).unwrap()),
        b64.encode(&mac)
    );
    let e = certify(&mesh, &forged, "payments").unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("signature"), "{}", e.message());
    // Revoked.
    let data = mesh.data_dir().display().to_string();
    tandem_ok(&["token", "revoke", &claims.id, "--data", &data]);
    let e = certify(&mesh, &orders, "orders").unwrap_err();
    assert!(e.message().contains("revoked"), "{}", e.message());
    // A proxy started with another service's token does not start.
    let payments_token = mesh.token("payments");
    let mut args = vec![
        "proxy".to_string(),
        "--control".into(),
        format!("http://{}", mesh.grpc),
        "--service".into(),
        "web".into(),
        "--instance".into(),
        "web-x".into(),
        "--inbound".into(),
        free_port().to_string(),
        "--app".into(),
        free_port().to_string(),
        "--admin".into(),
        free_port().to_string(),
        "--token".into(),
        payments_token,
    ];
    args.push("--threads".into());
    args.push("1".into());
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the join token is for default/payments"),
        "{err}"
    );
    // A token from another mesh's CA: this control plane cannot prove it
    // minted it, so the proxy does not trust it (and never sends the token).
    let elsewhere = TempDir::new("other-mesh");
    let elsewhere_data = elsewhere.0.display().to_string();
    let foreign = tandem_ok(&[
        "token",
        "create",
        "--service",
        "web",
        "--data",
        &elsewhere_data,
    ]);
    let n = args.len();
    args[n - 3] = foreign;
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not prove it minted this join token"),
        "{err}"
    );
}

fn renewals(inst: &Instance) -> f64 {
    metric(
        &inst.metrics(),
        r#"tandem_identity_renewals_total{result="issued"}"#,
    )
    .unwrap_or(0.0)
}

#[test]
fn short_lived_certificates_renew_under_load_without_failures() {
    let mesh = Mesh::start_with(&common::config(), &["--cert-lifetime", "20s"]);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let first = |i: &Instance| {
        let (_, b) = http_get(i.admin, "a", "/certs").unwrap();
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["chain"][0]["serial"].clone()
    };
    let (web0, client0) = (first(&web), first(&client));
    let load = Load::start(client.http_proxy, "web", "/", 2, Duration::from_millis(40));
    // Three lifetimes: at least two renewals each.
    wait_for(
        "two renewals on both sides",
        Duration::from_secs(60),
        || (renewals(&web) >= 3.0 && renewals(&client) >= 3.0).then_some(()),
    );
    // Traffic goes on over the renewed certificates.
    load.wait_progress(50, Duration::from_secs(10));
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 300, "only {ok} requests");
    assert_ne!(first(&web), web0);
    assert_ne!(first(&client), client0);
    // The expiry gauge follows the newest certificate.
    let exp = metric(&web.metrics(), "tandem_identity_cert_expiry_seconds").unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(exp > now && exp <= now + 21.0, "expiry {exp} now {now}");
}

#[test]
fn root_rotation_under_load_fails_no_request() {
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let before = mesh.api_json("/api/v1/ca").unwrap();
    let old_root = before["signer"].as_str().unwrap().to_string();
    let load = Load::start(client.http_proxy, "web", "/", 2, Duration::from_millis(20));
    load.wait_progress(20, Duration::from_secs(10));
    let api = mesh.api.to_string();
    let data = mesh.data_dir().display().to_string();
    tandem_ok(&["ca", "rotate", "--api", &api, "--data", &data]);
    let ca = mesh.api_json("/api/v1/ca").unwrap();
    let new_root = ca["signer"].as_str().unwrap().to_string();
    assert_ne!(new_root, old_root);
    assert_eq!(ca["roots"].as_array().unwrap().len(), 2);
    // Every proxy renews under the new root.
    wait_for(
        "proxies signed by the new root",
        Duration::from_secs(20),
        || {
            let ps = mesh.proxies();
            (ps.len() == 2 && ps.iter().all(|p| p["cert_signer"] == new_root.as_str()))
                .then_some(())
        },
    );
    // Retiring is refused while... nothing uses the old root any more: it goes.
    tandem_ok(&["ca", "retire", "--api", &api, "--data", &data]);
    let ca = mesh.api_json("/api/v1/ca").unwrap();
    assert_eq!(ca["roots"], serde_json::json!([new_root]));
    for inst in [&web, &client] {
        wait_for("proxies drop the old root", Duration::from_secs(10), || {
            let (_, b) = http_get(inst.admin, "a", "/certs")?;
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            (v["bundle"].as_array()?.len() == 1).then_some(())
        });
    }
    // Established connections go on under the new root alone...
    load.wait_progress(20, Duration::from_secs(10));
    // ...and so do new ones (a new caller).
    let late = mesh.instance("client", "client-2", &[], &[]);
    let (status, _) = http_get(late.http_proxy, "web", "/").unwrap();
    assert_eq!(status, 200);
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok >= 40, "only {ok} requests");
}

#[test]
fn without_the_control_plane_proxies_serve_until_expiry_then_fail_closed() {
    let mut mesh = Mesh::start_with(&common::config(), &["--cert-lifetime", "20s"]);
    // A proxy whose certificate expired bootstraps again with its token:
    // that takes a reusable one (a single-use token was spent on the first
    // certificate).
    let reusable = |svc: &str| mesh.token_with(&["--service", svc, "--reusable", "--ttl", "1h"]);
    let web = mesh.instance("web", "web-1", &[], &["--token", &reusable("web")]);
    let client = mesh.instance("client", "client-1", &[], &["--token", &reusable("client")]);
    let get = || http_get(client.http_proxy, "web", "/");
    assert_eq!(get().map(|r| r.0), Some(200));
    // Kill the control plane right after the client renewed, so both
    // certificates have most of their life left.
    let n = renewals(&client);
    wait_for("a fresh renewal", Duration::from_secs(30), || {
        (renewals(&client) > n).then_some(())
    });
    mesh.control.as_mut().unwrap().kill();
    assert_eq!(
        get().map(|r| r.0),
        Some(200),
        "serving on current certificates"
    );
    // At expiry: refused, never sent in plaintext.
    let refused = wait_for("fail closed at expiry", Duration::from_secs(30), || {
        let out = curl(&[
            "-s",
            "-D",
            "-",
            "-x",
            &format!("http://{}", client.http_proxy),
            "http://web/",
        ]);
        out.stdout
            .contains("identity-expired")
            .then_some(out.stdout)
    });
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Whichever certificate expired first answered; within one lifetime
    // both sidecars stop serving, and say why.
    for inst in [&web, &client] {
        wait_for(
            "sidecar not ready after expiry",
            Duration::from_secs(25),
            || http_get(inst.admin, "a", "/ready").filter(|(s, _)| *s == 503),
        );
        assert!(inst.proxy().log_text().contains("certificate expired"));
    }
    let out = curl(&[
        "-s",
        "-D",
        "-",
        "-x",
        &format!("http://{}", client.http_proxy),
        "http://web/",
    ]);
    assert!(out.stdout.starts_with("HTTP/1.1 503"), "{}", out.stdout);
    assert!(
        out.stdout.contains("tandem-error: identity-expired"),
        "{}",
        out.stdout
    );
    // Back: certificates are issued again and traffic flows.
    mesh.start_control();
    wait_for("recovery", Duration::from_secs(40), || {
        get().filter(|r| r.0 == 200).map(|_| ())
    });
    let (status, _) = http_get(web.admin, "a", "/ready").unwrap();
    assert_eq!(status, 200);
}

#[test]
fn permissive_services_accept_plaintext_and_count_it() {
    let mut config = common::config();
    config.push_str(
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: legacy}\nspec:\n  ports: [{name: main, port: 8080, protocol: http}]\n  mtls: permissive\n---\n",
    );
    let mesh = Mesh::start(&config);
    let legacy = mesh.instance("legacy", "legacy-1", &[], &[]);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    // Plaintext from outside the mesh: accepted by the permissive one...
    let out = curl(&[&format!("http://{}/headers", legacy.inbound)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let h: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(h.get("tandem-client-id").is_none(), "{h}");
    assert_eq!(
        metric(
            &legacy.metrics(),
            "tandem_inbound_plaintext_connections_total"
        ),
        Some(1.0)
    );
    // ...while meshed callers still use mTLS to it.
    let (status, body) = http_get(client.http_proxy, "legacy", "/headers").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(&spiffe("default", "client")), "{body}");
    assert_eq!(
        metric(
            &legacy.metrics(),
            "tandem_inbound_plaintext_connections_total"
        ),
        Some(1.0)
    );
    // The strict one refuses plaintext.
    let out = curl(&[&format!("http://{}/", web.inbound)]);
    assert_ne!(out.code, 0);
    assert_eq!(handshakes(&web, "inbound", "plaintext"), 1.0);
}

#[test]
fn permissive_tcp_serves_a_server_speaks_first_protocol() {
    use std::io::{BufRead, BufReader, Write};
    let mut config = common::config();
    config.push_str(
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: smtp}\nspec:\n  ports: [{name: main, port: 25, protocol: tcp}]\n  mtls: permissive\n---\n",
    );
    let mesh = Mesh::start(&config);
    // An app that speaks first, as SMTP or MySQL servers do.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"220 tandem-test ready\r\n");
        }
    });
    let mut smtp = Instance {
        service: "smtp".into(),
        instance: "smtp-1".into(),
        app_addr: app,
        inbound: free_port(),
        admin: free_port(),
        http_proxy: free_port(),
        upstreams: Vec::new(),
        tcp_echo: Some(app),
        app: None,
        proxy: None,
    };
    mesh.start_proxy(&mut smtp, &[]);
    let greeting = |addr: std::net::SocketAddr| {
        let start = std::time::Instant::now();
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        (start.elapsed(), line)
    };
    // A plaintext client that waits for the server gets the greeting after
    // the short silence, not after a detection timeout.
    let (took, line) = greeting(smtp.inbound);
    assert!(line.starts_with("220 tandem-test"), "{line:?}");
    // The silence is 200 ms; a connection taken for a stalled handshake
    // would wait out the 10 s handshake timeout first.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        metric(
            &smtp.metrics(),
            "tandem_inbound_plaintext_connections_total"
        ),
        Some(1.0)
    );
    // A meshed caller goes through mTLS and gets it too.
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["smtp"]);
    let (_, line) = greeting(client.upstream("smtp"));
    assert!(line.starts_with("220 tandem-test"), "{line:?}");
    assert_eq!(handshakes(&smtp, "inbound", "ok"), 1.0);
}
