//! The control plane defends itself: its HTTP API takes the admin
//! credential and answers only to its own names; the gRPC port checks every
//! Hello, refuses what a live proxy holds, caps what one proxy may ask for
//! and cannot be held up by silent sockets; join tokens cannot be replayed;
//! revocation expels; the CA's keys stay private; chains through
//! intermediates are refused unless allowed.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::certs::{leaf, mesh_ca, spiffe, Leaf};
use tandem_api::v1::discovery_client::DiscoveryClient;
use tandem_api::v1::{proxy_message, ControlMessage, Hello, ProxyMessage, Subscribe};
use tandem_e2e::{
    bin, curl, free_port, http_request, metric, tandem_ok, wait_for, Instance, Mesh, TempDir,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_api_takes_the_admin_credential_and_answers_only_to_its_own_names() {
    let mesh = Mesh::start(&common::config());
    let data = mesh.data_dir();
    // The credential and the CA are the owner's alone.
    assert_eq!(mode(&data.join("admin.token")), 0o600);
    assert_eq!(mode(&data.join("ca")), 0o700);
    assert_eq!(mode(&data), 0o700);
    let credential = mesh.credential();
    assert!(credential.len() >= 64, "{credential}");
    let host = mesh.api.to_string();
    let auth = format!("Bearer {credential}");
    let call = |method: &str, path: &str, headers: &[(&str, &str)]| {
        http_request(mesh.api, method, path, headers).unwrap()
    };
    // Liveness and readiness need nothing.
    for p in ["/healthz", "/readyz"] {
        assert_eq!(call("GET", p, &[("Host", &host)]).0, 200, "{p}");
    }
    // Everything else needs the credential: 401 without it or with
    // another, and the mutating calls change nothing.
    for (method, path) in [
        ("GET", "/api/v1/proxies"),
        ("GET", "/api/v1/stats"),
        ("GET", "/api/v1/config"),
        ("GET", "/api/v1/push"),
        ("GET", "/api/v1/ca"),
        ("POST", "/api/v1/ca/rotate"),
        ("POST", "/api/v1/ca/retire?force=true"),
    ] {
        for given in [
            None,
            Some("Bearer not-the-credential"),
            Some("Basic YWRtaW46YWRtaW4="),
        ] {
            let mut headers = vec![("Host", host.as_str())];
            if let Some(g) = given {
                headers.push(("Authorization", g));
            }
            let (status, body) = call(method, path, &headers);
            assert_eq!(status, 401, "{method} {path} {given:?}: {body}");
            assert!(body.contains("admin credential"), "{body}");
        }
    }
    let ca = mesh.api_json("/api/v1/ca").unwrap();
    assert_eq!(
        ca["roots"].as_array().unwrap().len(),
        1,
        "no rotation began"
    );
    assert_eq!(ca["rotation"]["phase"], "idle", "{ca}");
    // DNS rebinding: a foreign Host is refused even with the credential;
    // so is another site's page (CSRF), before the credential matters.
    for headers in [
        vec![
            ("Host", "attacker.example:7701"),
            ("Authorization", auth.as_str()),
        ],
        vec![
            ("Host", "127.0.0.1.nip.io"),
            ("Authorization", auth.as_str()),
        ],
        vec![
            ("Host", host.as_str()),
            ("Origin", "http://attacker.example"),
            ("Authorization", auth.as_str()),
        ],
        vec![
            ("Host", host.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
            ("Authorization", auth.as_str()),
        ],
        vec![("Host", "attacker.example")],
    ] {
        let (status, body) = call("POST", "/api/v1/ca/rotate", &headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
    }
    let ca = mesh.api_json("/api/v1/ca").unwrap();
    assert_eq!(
        ca["roots"].as_array().unwrap().len(),
        1,
        "no rotation began"
    );
    // The same origin, localhost and curl with the credential are served.
    let origin = format!("http://{host}");
    let (status, _) = call(
        "GET",
        "/api/v1/ca",
        &[
            ("Host", &host),
            ("Origin", &origin),
            ("Authorization", &auth),
        ],
    );
    assert_eq!(status, 200);
    let local = format!("localhost:{}", mesh.api.port());
    assert_eq!(
        call(
            "GET",
            "/api/v1/ca",
            &[("Host", &local), ("Authorization", &auth)]
        )
        .0,
        200
    );
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: {auth}"),
        &format!("http://{host}/api/v1/proxies"),
    ]);
    assert_eq!(out.stdout, "200");
    // The CLI reads the credential from the data directory (or a file
    // named by the environment), and says what is missing otherwise.
    let api = mesh.api.to_string();
    let data_s = data.display().to_string();
    tandem_ok(&["status", "--api", &api, "--data", &data_s]);
    let out = Command::new(bin())
        .args(["ca", "show", "--api", &api])
        .env("TANDEM_ADMIN_TOKEN_FILE", data.join("admin.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scratch = TempDir::new("wrong-credential");
    let wrong = scratch.0.join("wrong.token");
    std::fs::write(&wrong, "0".repeat(64)).unwrap();
    let out = Command::new(bin())
        .args(["ca", "rotate", "--no-wait", "--api", &api])
        .arg("--admin-token-file")
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the admin credential"), "{err}");
    // A restart keeps the credential.
    let mut mesh = mesh;
    mesh.control.as_mut().unwrap().kill();
    mesh.start_control();
    assert_eq!(mesh.credential(), credential);
}

type Opened = (mpsc::Sender<ProxyMessage>, tonic::Streaming<ControlMessage>);

/// A Discovery stream opened with `cfg` (a certificate or none) and
/// `hello`, on `rt` (which must outlive the stream).
fn open(
    rt: &tokio::runtime::Runtime,
    mesh: &Mesh,
    cfg: Arc<rustls::ClientConfig>,
    hello: Hello,
) -> Result<Opened, tonic::Status> {
    let grpc = mesh.grpc.to_string();
    rt.block_on(async move {
        let ch = tandem_proxy::control_channel(&grpc, cfg)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let s = DiscoveryClient::new(ch)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, s))
    })
}

fn hello(service: &str, instance: &str) -> Hello {
    Hello {
        service: service.into(),
        instance: instance.into(),
        namespace: "default".into(),
        inbound_addr: free_port().to_string(),
        proxy_version: "test".into(),
        ..Hello::default()
    }
}

/// A change to a Hello.
type Edit = Box<dyn Fn(&mut Hello)>;

fn alpn() -> [&'static [u8]; 1] {
    [tandem_identity::tls::ALPN_H2]
}

#[test]
fn hellos_are_checked_and_cannot_take_what_a_live_proxy_holds() {
    let mesh = Mesh::start(&common::config());
    let rt = tandem_e2e::rt();
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client_cert = mesh.identity_for("client").client_config(&alpn());
    let web_cert = mesh.identity_for("web").client_config(&alpn());
    let code = |r: Result<_, tonic::Status>| r.err().map(|e| (e.code(), e.message().to_string()));
    // No certificate: a stream cannot register at all.
    let anonymous = mesh.bare_identity().client_config_anonymous(&alpn());
    let (c, m) = code(open(&rt, &mesh, anonymous, hello("client", "c-1"))).unwrap();
    assert_eq!(c, tonic::Code::Unauthenticated, "{m}");
    // A certificate registers its own service only.
    let (c, m) = code(open(&rt, &mesh, client_cert.clone(), hello("web", "web-9"))).unwrap();
    assert_eq!(c, tonic::Code::PermissionDenied, "{m}");
    // Fields out of bounds.
    let bad: Vec<(&str, Edit)> = vec![
        (
            "admin host name",
            Box::new(|h| h.admin_addr = "metadata.internal:80".into()),
        ),
        (
            "admin URL",
            Box::new(|h| h.admin_addr = "http://169.254.169.254/latest".into()),
        ),
        (
            "proxy port name",
            Box::new(|h| h.http_proxy_addr = "localhost:3128".into()),
        ),
        ("instance", Box::new(|h| h.instance = "../../etc".into())),
        ("version", Box::new(|h| h.applied_version = u64::MAX)),
        ("version", Box::new(|h| h.applied_version = 1 << 60)),
        (
            "interest",
            Box::new(|h| h.interest = (0..2000).map(|i| format!("s{i}")).collect()),
        ),
    ];
    for (what, f) in &bad {
        let mut h = hello("client", "c-1");
        f(&mut h);
        let (c, m) = code(open(&rt, &mesh, client_cert.clone(), h)).unwrap();
        assert_eq!(c, tonic::Code::InvalidArgument, "{what}: {m}");
    }
    // The huge version lifted nobody: web's versions stay small.
    let v = mesh
        .proxies()
        .iter()
        .find(|p| p["instance"] == "web-1")
        .and_then(|p| p["config_version"].as_u64())
        .unwrap();
    assert!(v < 1_000_000, "{v}");
    // A live instance's name, from another token: refused.
    let (c, m) = code(open(&rt, &mesh, web_cert.clone(), hello("web", "web-1"))).unwrap();
    assert_eq!(c, tonic::Code::AlreadyExists, "{m}");
    // A live instance's inbound address, for another service: refused.
    let mut h = hello("client", "c-1");
    h.inbound_addr = web.inbound.to_string();
    let (c, m) = code(open(&rt, &mesh, client_cert.clone(), h)).unwrap();
    assert_eq!(c, tonic::Code::AlreadyExists, "{m}");
    assert!(m.contains("default/web"), "{m}");
    // web-1 still serves, registered as before.
    assert_eq!(
        mesh.proxies()
            .iter()
            .filter(|p| p["instance"] == "web-1")
            .count(),
        1
    );
    // Subscriptions are capped: past the cap the stream ends with
    // RESOURCE_EXHAUSTED.
    let (tx, mut stream) = open(&rt, &mesh, client_cert, hello("client", "c-2")).unwrap();
    let end = rt.block_on(async move {
        tx.send(ProxyMessage {
            kind: Some(proxy_message::Kind::Subscribe(Subscribe {
                services: (0..1100).map(|i| format!("s{i}")).collect(),
            })),
        })
        .await
        .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => return Some(status),
                Err(_) => panic!("the stream was not ended"),
            }
        }
    });
    let status = end.expect("an error status");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}

#[test]
fn silent_sockets_on_the_grpc_port_do_not_hold_up_a_bootstrap() {
    let mesh = Mesh::start(&common::config());
    // 300 connections that never say anything, held open.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(mesh.grpc).unwrap())
        .collect();
    let start = Instant::now();
    let web = mesh.instance("web", "web-1", &[], &[]);
    let took = start.elapsed();
    eprintln!("bootstrap with 300 idle sockets held: {took:?}");
    // It bootstrapped while they were still held: the control plane closes
    // a silent socket only after 10 s.
    let still_open = idle
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let mut r: &TcpStream = s;
            matches!(r.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(still_open, 300, "bootstrap took {took:?}");
    assert!(web.metrics().contains("tandem_identity_renewals_total"));
    // And they are not kept forever.
    wait_for("silent sockets closed", Duration::from_secs(30), || {
        idle.iter()
            .all(|s| {
                let mut b = [0u8; 1];
                let mut r: &TcpStream = s;
                match r.read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            })
            .then_some(())
    });
}

#[test]
fn reports_count_only_their_own_traffic_and_bad_ones_are_refused() {
    use tandem_api::v1::{PairTraffic, Report};
    let mesh = Mesh::start(&common::config());
    let rt = tandem_e2e::rt();
    let cert = mesh.identity_for("client").client_config(&alpn());
    let (tx, _stream) = open(&rt, &mesh, cert, hello("client", "c-1")).unwrap();
    let pair = |inbound: bool, src: &str, dst: &str, requests: u64| PairTraffic {
        inbound,
        source: src.into(),
        destination: dst.into(),
        requests,
        failures: requests,
        latency: vec![0, requests],
        proxy_latency: vec![requests],
        ..PairTraffic::default()
    };
    let send = |r: Report| {
        rt.block_on(tx.send(ProxyMessage {
            kind: Some(proxy_message::Kind::Report(r)),
        }))
        .unwrap()
    };
    let report = |pairs: Vec<PairTraffic>| Report {
        latency_bounds: vec![0.01],
        proxy_bounds: vec![],
        pairs,
    };
    // Malformed and oversized reports are refused whole...
    let mut bad = report(vec![pair(false, "client", "web", 5)]);
    bad.latency_bounds = vec![f64::NAN];
    send(bad);
    send(report(
        (0..5000)
            .map(|i| pair(false, "client", &format!("s{i}"), 1))
            .collect(),
    ));
    // ...and a report of other services' traffic counts for nothing: the
    // client's proxy cannot make web's calls to catalog look bad.
    send(report(vec![
        pair(false, "web", "catalog-v1", 1000),
        pair(true, "web", "catalog-v2", 1000),
        pair(false, "client", "web", 0),
    ]));
    send(report(vec![
        pair(false, "web", "catalog-v1", 2000),
        pair(true, "web", "catalog-v2", 2000),
        pair(false, "client", "web", 10),
    ]));
    let rows = wait_for(
        "the client's own pair in the stats",
        Duration::from_secs(20),
        || {
            let v = mesh.api_json("/api/v1/stats?window=1m")?;
            let rows = v.as_array()?.clone();
            rows.iter()
                .any(|r| r["source"] == "client" && r["destination"] == "web")
                .then_some(rows)
        },
    );
    assert!(
        rows.iter().all(|r| r["source"] != "web"),
        "another service's traffic was counted: {rows:?}"
    );
    let log = std::fs::read_to_string(&mesh.control.as_ref().unwrap().log).unwrap_or_default();
    assert!(log.contains("traffic report refused"), "{log}");
}

fn renewals(inst: &Instance, result: &str) -> f64 {
    metric(
        &inst.metrics(),
        &format!(r#"tandem_identity_renewals_total{{result="{result}"}}"#),
    )
    .unwrap_or(0.0)
}

/// `tandem proxy` for `web` with `token`, run to its exit (it exits only
/// when its token is refused).
fn proxy_refused(mesh: &Mesh, instance: &str, token: &str) -> String {
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin())
        .args([
            "proxy",
            "--control",
            &format!("http://{}", mesh.grpc),
            "--service",
            "web",
            "--instance",
            instance,
            "--inbound",
            &free_port().to_string(),
            "--app",
            &free_port().to_string(),
            "--admin",
            &free_port().to_string(),
            "--token",
            token,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_join_token_is_spent_once_and_proxies_renew_with_their_certificate() {
    let mesh = Mesh::start_with(&common::config(), &["--cert-lifetime", "6s"]);
    let data = mesh.data_dir().display().to_string();
    // `token create` says which kind it made.
    let out = Command::new(bin())
        .args(["token", "create", "--service", "web", "--data", &data])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("single-use token"));
    let once = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let json: serde_json::Value = serde_json::from_str(&tandem_ok(&[
        "token",
        "create",
        "--service",
        "web",
        "--reusable",
        "--ttl",
        "1h",
        "--data",
        &data,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["use"], "reusable");
    let reusable = json["token"].as_str().unwrap().to_string();
    let out = Command::new(bin())
        .args([
            "token",
            "create",
            "--service",
            "web",
            "--reusable",
            "--ttl",
            "2d",
            "--data",
            &data,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a reusable token lives at most 24h");
    // A CSR the CA refuses (a P-384 key) does not spend it...
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let cfg = mesh.bare_identity().client_config_anonymous(&alpn());
    let e = mesh
        .certify(cfg, &once, csr)
        .expect_err("a P-384 key is refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("P-256"), "{}", e.message());
    // ...so it still bootstraps one proxy...
    let web1 = mesh.instance("web", "web-1", &[], &["--token", &once]);
    // ...and is refused to the next, which does not start.
    let err = proxy_refused(&mesh, "web-2", &once);
    assert!(err.contains("already used"), "{err}");
    // The first keeps renewing, with its certificate: several lifetimes.
    let before = renewals(&web1, "issued");
    wait_for(
        "renewals with the certificate",
        Duration::from_secs(40),
        || (renewals(&web1, "issued") >= before + 3.0).then_some(()),
    );
    assert_eq!(renewals(&web1, "failed"), 0.0);
    // A reusable token bootstraps any number, until it expires.
    let web3 = mesh.instance("web", "web-3", &[], &["--token", &reusable]);
    let web4 = mesh.instance("web", "web-4", &[], &["--token", &reusable]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    for _ in 0..6 {
        let (status, _) = tandem_e2e::http_get(client.http_proxy, "web", "/").unwrap();
        assert_eq!(status, 200);
    }
    drop((web3, web4));
}

#[test]
fn revoking_a_token_expels_its_proxies_within_seconds() {
    let mesh = Mesh::start(&common::config());
    let data = mesh.data_dir().display().to_string();
    let json: serde_json::Value = serde_json::from_str(&tandem_ok(&[
        "token",
        "create",
        "--service",
        "web",
        "--data",
        &data,
        "-o",
        "json",
    ]))
    .unwrap();
    let (bad_id, bad) = (
        json["id"].as_str().unwrap().to_string(),
        json["token"].as_str().unwrap().to_string(),
    );
    let scratch = TempDir::new("revoked");
    let web1 = mesh.instance("web", "web-1", &[], &["--token", &bad]);
    let web2 = mesh.instance("web", "web-2", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let both = vec!["web-1".to_string(), "web-2".to_string()];
    wait_for("both endpoints", Duration::from_secs(10), || {
        let mut e = client.endpoints("web", "web")?;
        e.sort();
        (e == both).then_some(())
    });
    let start = Instant::now();
    tandem_ok(&["token", "revoke", &bad_id, "--data", &data]);
    wait_for("web-1 expelled", Duration::from_secs(5), || {
        (client.endpoints("web", "web")? == vec!["web-2".to_string()]).then_some(())
    });
    eprintln!("revocation to endpoint removal: {:?}", start.elapsed());
    // Every sidecar now refuses a certificate issued under the token, on
    // any new connection, though it has not expired.
    let (ok_chain, ok_key) = leaf_with_lineage(&mesh, &scratch.0, "ok", "some-live-token");
    let (bad_chain, bad_key) = leaf_with_lineage(&mesh, &scratch.0, "bad", &bad_id);
    wait_for(
        "web-2 refuses the revoked lineage",
        Duration::from_secs(5),
        || (call_with(web2.inbound, &bad_chain, &bad_key) == "000").then_some(()),
    );
    assert_eq!(call_with(web2.inbound, &ok_chain, &ok_key), "200");
    let refused = metric(
        &web2.metrics(),
        r#"tandem_tls_handshakes_total{direction="inbound",result="revoked"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{}", web2.metrics());
    wait_for("web-1 told", Duration::from_secs(5), || {
        web1.proxy().log_text().contains("revoked").then_some(())
    });
    // It cannot come back: its reconnect is refused (its certificate no
    // longer registers), and it stays out.
    wait_for("web-1's reconnect refused", Duration::from_secs(15), || {
        web1.proxy()
            .log_text()
            .contains("the join token it was issued under was revoked")
            .then_some(())
    });
    assert!(mesh
        .proxies()
        .iter()
        .filter(|p| p["instance"] == "web-1")
        .all(|p| p["connected"] == false));
    assert_eq!(
        client.endpoints("web", "web"),
        Some(vec!["web-2".to_string()])
    );
    drop(web2);
}

#[test]
fn the_ca_keys_stay_private_and_certificates_short_lived() {
    let mesh = Mesh::start(&common::config());
    let data = mesh.data_dir();
    let control = |extra: &[&str]| {
        let out = Command::new("timeout")
            .arg("20")
            .arg(bin())
            .args([
                "control",
                "--config",
                &mesh.config_dir.display().to_string(),
                "--data",
                &data.display().to_string(),
                "--listen",
                &free_port().to_string(),
                "--api",
                &free_port().to_string(),
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A signing key others can read: the control plane will not start.
    let (_, key) = mesh_ca(&mesh);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = control(&[]);
    assert!(err.contains("chmod 600") && err.contains(".key"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca_dir = data.join("ca");
    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = control(&[]);
    assert!(err.contains("chmod 700"), "{err}");
    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A certificate lifetime beyond a week is refused.
    let err = control(&["--cert-lifetime", "8d"]);
    assert!(err.contains("--cert-lifetime"), "{err}");
    // What is issued lives at most the configured lifetime (24h here).
    let web = mesh.instance("web", "web-1", &[], &[]);
    let row = mesh
        .proxies()
        .into_iter()
        .find(|p| p["instance"] == "web-1")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let not_after = row["cert_not_after"].as_u64().unwrap();
    assert!(not_after <= now + 24 * 3600 + 5, "{row}");
    drop(web);
}

/// A leaf for `tester` from the mesh's root that names `lineage` as its
/// join token, as the CA's leaves do: (certificate, key) paths.
fn leaf_with_lineage(
    mesh: &Mesh,
    dir: &std::path::Path,
    name: &str,
    lineage: &str,
) -> (String, String) {
    let (root_crt, root_key) = mesh_ca(mesh);
    leaf(
        dir,
        name,
        Leaf {
            uris: vec![spiffe("default", "tester")],
            from: -60,
            to: 600,
            ca_flag: false,
            issuer: (root_crt.as_path(), root_key.as_path()),
            lineage: Some(lineage),
        },
    )
}

/// A leaf for `tester` that chains to the mesh's root through an
/// intermediate CA: (chain file, key file).
fn chained_leaf(mesh: &Mesh, dir: &std::path::Path) -> (String, String) {
    let (root_crt, root_key) = mesh_ca(mesh);
    let (mid_crt, mid_key) = leaf(
        dir,
        "intermediate",
        Leaf {
            uris: vec![],
            from: -60,
            to: 600,
            ca_flag: true,
            issuer: (root_crt.as_path(), root_key.as_path()),
            lineage: None,
        },
    );
    let (c, k) = leaf(
        dir,
        "chained",
        Leaf {
            uris: vec![spiffe("default", "tester")],
            from: -60,
            to: 600,
            ca_flag: false,
            issuer: (
                std::path::Path::new(&mid_crt),
                std::path::Path::new(&mid_key),
            ),
            lineage: None,
        },
    );
    let chain = dir.join("chain.pem");
    let text = std::fs::read_to_string(&c).unwrap() + &std::fs::read_to_string(&mid_crt).unwrap();
    std::fs::write(&chain, text).unwrap();
    (chain.display().to_string(), k)
}

fn call_with(inbound: SocketAddr, chain: &str, key: &str) -> String {
    curl(&[
        "-s",
        "-k",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cert",
        chain,
        "--key",
        key,
        &format!("https://{inbound}/"),
    ])
    .stdout
}

#[test]
fn chains_through_an_intermediate_are_refused_unless_allowed() {
    let scratch = TempDir::new("intermediate");
    let mesh = Mesh::start(&common::config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let (chain, key) = chained_leaf(&mesh, &scratch.0);
    assert_eq!(call_with(web.inbound, &chain, &key), "000");
    let refused = metric(
        &web.metrics(),
        r#"tandem_tls_handshakes_total{direction="inbound",result="intermediate"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{}", web.metrics());
    // Configured: the same chain is accepted.
    let mesh = Mesh::start_with(&common::config(), &["--allow-intermediates"]);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let (chain, key) = chained_leaf(&mesh, &scratch.0);
    wait_for("the chain accepted", Duration::from_secs(10), || {
        (call_with(web.inbound, &chain, &key) == "200").then_some(())
    });
}
