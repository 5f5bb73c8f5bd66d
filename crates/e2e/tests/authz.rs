//! Access policy end to end: AuthorizationPolicy and the mesh default,
//! enforced by the destination's sidecar on the caller's certificate.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use tandem_api::v1::echo_client::EchoClient;
use tandem_api::v1::EchoRequest;
use tandem_e2e::*;

fn authz(name: &str, target: &str, body: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Service, name: {target}}}\n{body}---\n"
    )
}

/// `curl -x CALLER http://web<path>`: (status, headers, body).
fn call(from: &Instance, target: &str, method: &str, path: &str, extra: &[&str]) -> Resp {
    let proxy = format!("http://{}", from.http_proxy);
    let url = format!("http://{target}{path}");
    let mut args = vec!["-s", "-D", "-", "-X", method, "-x", proxy.as_str()];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    let out = curl(&args);
    let (head, body) = out
        .stdout
        .split_once("\r\n\r\n")
        .unwrap_or((out.stdout.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    }
}

/// `web-1` and `client-1`, once web answers through client's sidecar.
fn web_and_client(mesh: &Mesh) -> (Instance, Instance) {
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    wait_for(
        "web through client's sidecar",
        Duration::from_secs(20),
        || (call(&client, "web", "GET", "/headers", &[]).status == 200).then_some(()),
    );
    (web, client)
}

fn denials(inst: &Instance, labels: &str) -> f64 {
    metric(
        &inst.metrics(),
        &format!("tandem_authz_denials_total{{{labels}}}"),
    )
    .unwrap_or(0.0)
}

/// Who may call `web`, on which paths and methods: decided by the caller's
/// certificate, never by a header it sends, and a denied request never
/// reaches the app.
#[test]
fn who_may_call_whom_on_which_paths() {
    let mut config = common::config();
    config.push_str(&authz(
        "web-readers",
        "web",
        "  rules:\n    - from: [{services: [client]}]\n      to: [{paths: [\"/public/*\", \"/headers\"], methods: [GET, HEAD]}]\n    - from: [{services: [catalog]}]\n      to: [{paths: [/headers]}]\n",
    ));
    config.push_str(&authz(
        "web-no-admin",
        "web",
        "  action: deny\n  rules:\n    - to: [{paths: [\"/public/admin/*\"]}]\n",
    ));
    config.push_str(&authz(
        "web-watch",
        "web",
        "  action: audit\n  rules:\n    - from: [{services: [catalog]}]\n",
    ));
    let mesh = Mesh::start(&config);
    let (web, client) = web_and_client(&mesh);
    let catalog = mesh.instance("catalog", "catalog-1", &[], &[]);

    // The matrix: (caller, method, path) → status.
    let cases: &[(&Instance, &str, &str, u16)] = &[
        (&client, "GET", "/public/a?key=a1", 200),
        (&client, "HEAD", "/public/a?key=a2", 200),
        (&client, "GET", "/public?key=a3", 200),
        (&client, "POST", "/public/a?key=d1", 403),
        (&client, "GET", "/private?key=d2", 403),
        (&client, "GET", "/public/admin/x?key=d3", 403),
        (&catalog, "GET", "/headers?key=a4", 200),
        (&catalog, "GET", "/public/a?key=d4", 403),
    ];
    for (from, method, path, want) in cases {
        let r = call(from, "web", method, path, &[]);
        assert_eq!(r.status, *want, "{method} {path}: {r:?}");
        let key = path.split("key=").nth(1).expect("key");
        if *want == 403 {
            assert_eq!(r.header("tandem-error"), Some("forbidden"), "{r:?}");
            let body = String::from_utf8_lossy(&r.body);
            assert!(!body.contains("web-"), "no policy detail: {body}");
            assert_eq!(web.counters(key)["started"], 0, "{method} {path}");
        } else {
            assert_eq!(web.counters(key)["started"], 1, "{method} {path}");
        }
    }
    // A header cannot stand in for the certificate.
    let r = call(
        &catalog,
        "web",
        "GET",
        "/public/a?key=spoof",
        &[
            "-H",
            "tandem-client-id: spiffe://tandem.local/ns/default/svc/client",
        ],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(web.counters("spoof")["started"], 0);

    // Counted by policy and rule; audit counts what it saw and let through.
    assert_eq!(
        denials(
            &web,
            r#"policy="default/web-no-admin",rule="0",decision="deny",reason="policy""#
        ),
        1.0
    );
    assert_eq!(
        denials(
            &web,
            r#"policy="",rule="",decision="deny",reason="no-allow-matched""#
        ),
        4.0,
        "POST /public, /private, catalog's /public and its spoofed one"
    );
    assert_eq!(
        denials(
            &web,
            r#"policy="default/web-watch",rule="0",decision="audit",reason="policy""#
        ),
        3.0
    );
    // Logged with the caller's identity.
    web.proxy().wait_log(
        "caller=spiffe://tandem.local/ns/default/svc/catalog",
        Duration::from_secs(5),
    );
}

/// The mesh default `deny`: a service with no policy lets nobody in; an
/// allow policy added to the config opens it without a restart; gRPC gets
/// PERMISSION_DENIED; an opaque TCP service is closed to a caller its
/// identity rules do not name.
#[test]
fn zero_trust_default_live_edits_grpc_and_tcp() {
    let mut config = common::config();
    config.push_str(
        "apiVersion: tandem.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  authorization: {default: deny}\n---\n",
    );
    config.push_str(&authz(
        "tcp-from-client",
        "tcpecho",
        "  rules:\n    - from: [{services: [client]}]\n",
    ));
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let _grpc = mesh.instance("grpc-echo", "grpc-echo-1", &[], &[]);
    let echo = free_port().to_string();
    let _tcp = mesh.instance("tcpecho", "tcpecho-1", &["--tcp-echo", &echo], &[]);
    let client =
        mesh.instance_with_upstreams("client", "client-1", &[], &[], &["grpc-echo", "tcpecho"]);
    let catalog = mesh.instance_with_upstreams("catalog", "catalog-1", &[], &[], &["tcpecho"]);

    // Denied by the mesh default (once both sidecars are configured).
    let r = wait_for("web answers the client", Duration::from_secs(20), || {
        let r = call(&client, "web", "GET", "/headers?key=d", &[]);
        (r.status != 0 && r.status != 503).then_some(r)
    });
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("tandem-error"), Some("forbidden"));
    assert_eq!(web.counters("d")["started"], 0);
    assert_eq!(
        denials(
            &web,
            r#"policy="",rule="",decision="deny",reason="mesh-default""#
        ),
        1.0
    );

    // gRPC: PERMISSION_DENIED, from the destination's sidecar.
    let rt = rt();
    rt.block_on(async {
        let mut c = EchoClient::connect(format!("http://{}", client.upstream("grpc-echo")))
            .await
            .expect("connect");
        let e = c
            .unary(EchoRequest {
                message: "hello".into(),
                count: 0,
            })
            .await
            .expect_err("denied");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });

    // Opaque TCP: identity rules only. The client gets its echo; catalog's
    // connection is closed without a byte.
    let echo_once = |from: &Instance| -> Vec<u8> {
        let mut s = std::net::TcpStream::connect(from.upstream("tcpecho")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(b"ping");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    };
    let got = wait_for("tcp echo for the client", Duration::from_secs(20), || {
        let got = echo_once(&client);
        (!got.is_empty()).then_some(got)
    });
    assert_eq!(got, b"ping");
    assert!(echo_once(&catalog).is_empty());
    let tcp_denials = wait_for(
        "the refused TCP connection counted",
        Duration::from_secs(5),
        || {
            let n = denials(
                &_tcp,
                r#"policy="",rule="",decision="deny",reason="no-allow-matched""#,
            );
            (n >= 1.0).then_some(n)
        },
    );
    assert_eq!(tcp_denials, 1.0);

    // An allow policy for web, added to the config: applied without a
    // restart.
    config.push_str(&authz(
        "web-from-client",
        "web",
        "  rules:\n    - from: [{services: [client]}]\n",
    ));
    mesh.write_config("mesh.yaml", &config);
    wait_for("the new policy applied", Duration::from_secs(20), || {
        (call(&client, "web", "GET", "/headers?key=a", &[]).status == 200).then_some(())
    });
    assert_eq!(web.counters("a")["started"], 1);
    // Still nobody else.
    assert_eq!(call(&catalog, "web", "GET", "/headers", &[]).status, 403);
}

/// A deny on `/admin/*` cannot be passed by spelling the path another
/// way: the destination's sidecar matches the normalized path, hands the
/// app that same path, and refuses paths that servers read two ways.
#[test]
fn a_denied_path_cannot_be_spelled_around() {
    let mut config = common::config();
    config.push_str(&authz(
        "web-no-admin",
        "web",
        "  action: deny\n  rules:\n    - to: [{paths: [\"/admin/*\"]}]\n",
    ));
    let mesh = Mesh::start(&config);
    let (web, client) = web_and_client(&mesh);
    for (path, want) in [
        ("/admin?key=b1", 403),
        ("//admin?key=b2", 403),
        ("/./admin?key=b3", 403),
        ("/x/../admin?key=b4", 403),
        ("/%61dmin?key=b5", 403),
        ("/ADMIN?key=b6", 403),
        ("/admin/../admin/x?key=b7", 403),
        ("/%2e%2e/admin?key=b8", 403),
        ("//x/..//%61DMIN/./y?key=b9", 403),
        ("/admin%2F?key=b10", 400),
        ("/admin%2fx?key=b11", 400),
        ("/admin;x?key=b12", 400),
        ("/admin%00?key=b13", 400),
        ("/adm%5Cin?key=b14", 400),
        ("/adm%zzin?key=b15", 400),
    ] {
        // `--path-as-is`: curl sends the dots as written.
        let r = call(&client, "web", "GET", path, &["--path-as-is"]);
        assert_eq!(r.status, want, "{path}: {r:?}");
        let key = path.split("key=").nth(1).expect("key");
        assert_eq!(web.counters(key)["started"], 0, "{path} reached the app");
    }
    // An allowed path reaches the app as the policy saw it.
    let r = call(
        &client,
        "web",
        "GET",
        "/x//y/./z/../%7Euser?key=ok",
        &["--path-as-is"],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(body["path"], "/x/y/~user");
}

/// `tandem authz check` and `list` on the demo's config, as `tandem up`
/// writes it: the verdict, the rule that decided, the exit status, and
/// who may reach a service.
#[test]
fn authz_check_and_list_on_the_demo_config() {
    let dir = TempDir::new("authz-cli");
    let cfg = dir.0.join("demo");
    let cfg_s = cfg.display().to_string();
    tandem_ok(&["up", "--write-config", &cfg_s]);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let check = |from: &str, to: &str, method: &str, path: &str| {
        run(&[
            "authz", "check", "--config", &cfg_s, "--from", from, "--to", to, method, path,
        ])
    };
    // Every call the demo makes is allowed.
    for (from, to, method, path) in [
        ("loadgen", "web", "GET", "/"),
        ("web", "catalog-v1", "GET", "/"),
        ("web", "catalog-v2", "GET", "/"),
        ("web", "orders", "GET", "/"),
        ("orders", "payments", "POST", "/charge"),
        ("orders", "payments", "GET", "/health"),
    ] {
        let (code, out) = check(from, to, method, path);
        assert_eq!(code, Some(0), "{from} → {to} {method} {path}: {out}");
        assert!(out.starts_with("allow:"), "{out}");
    }
    let (code, out) = check("orders", "payments", "POST", "/charge");
    assert_eq!(code, Some(0));
    assert!(
        out.contains("decided by default/payments (allow), rule 0: from services [default/orders]"),
        "{out}"
    );
    // And nothing else.
    for (from, to, method, path) in [
        ("web", "payments", "POST", "/charge"),
        ("orders", "payments", "GET", "/charge"),
        ("orders", "payments", "POST", "/refund"),
        ("loadgen", "orders", "GET", "/"),
        ("catalog-v1", "web", "GET", "/"),
    ] {
        let (code, out) = check(from, to, method, path);
        assert_eq!(code, Some(1), "{from} → {to} {method} {path}: {out}");
        assert!(out.starts_with("deny:"), "{out}");
    }
    // A path spelled another way is the same path.
    let (code, out) = check("orders", "payments", "POST", "/x/../%63harge");
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check("orders", "payments", "POST", "/charge;x");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("400"), "{out}");
    // Who may reach payments: only orders.
    let (code, out) = run(&["authz", "list", "--config", &cfg_s, "payments"]);
    assert_eq!(code, Some(0), "{out}");
    let line = |who: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(who))
            .unwrap_or_else(|| panic!("no line for {who} in {out}"))
            .to_string()
    };
    assert!(
        line("default/orders ").contains("may call through default/payments rule 0"),
        "{out}"
    );
    for other in [
        "default/web ",
        "default/loadgen ",
        "default/catalog-v1 ",
        "(plaintext)",
    ] {
        assert!(line(other).contains("may not call"), "{out}");
    }
    // A broken directory: its problems, and status 2.
    let (code, _) = run(&["authz", "list", "--config", "/nonexistent", "payments"]);
    assert_eq!(code, Some(2));
}

/// Policy edits reach the sidecars without restarts and drop none of the
/// traffic they still allow: steady load from client to web while a deny
/// for another caller, an allow for client and a deny for another path
/// are applied in turn.
#[test]
fn policy_edits_drop_no_allowed_request() {
    let base = common::config();
    let mesh = Mesh::start(&base);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let catalog = mesh.instance("catalog", "catalog-1", &[], &[]);
    let up = client.upstream("web");
    wait_for("web through the sidecars", Duration::from_secs(20), || {
        (http_get(up, "web", "/public/x").map(|r| r.0) == Some(200)).then_some(())
    });
    let load = Load::start(up, "web", "/public/x", 4, Duration::from_millis(5));
    load.wait_progress(50, Duration::from_secs(20));
    let mut config = base.clone();
    for edit in [
        authz(
            "no-catalog",
            "web",
            "  action: deny\n  rules:\n    - from: [{services: [catalog]}]\n",
        ),
        authz(
            "readers",
            "web",
            "  rules:\n    - from: [{services: [client]}]\n      to: [{paths: [\"/public/*\"]}]\n",
        ),
        authz(
            "no-admin",
            "web",
            "  action: deny\n  rules:\n    - to: [{paths: [\"/admin/*\"]}]\n",
        ),
    ] {
        config.push_str(&edit);
        let before = web.config_version();
        mesh.write_config("mesh.yaml", &config);
        wait_for("web has the edit", Duration::from_secs(20), || {
            (web.config_version() > before).then_some(())
        });
        load.wait_progress(50, Duration::from_secs(20));
    }
    // The edits are in force: catalog is refused, and so is client off
    // its paths.
    assert_eq!(call(&catalog, "web", "GET", "/public/x", &[]).status, 403);
    assert_eq!(http_get(up, "web", "/private").map(|r| r.0), Some(403));
    assert_eq!(http_get(up, "web", "/admin/x").map(|r| r.0), Some(403));
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok
    );
    assert!(ok >= 200, "{ok}");
}

/// A policy on one HTTPRoute covers what that route selects and nothing
/// else; a `host` condition holds whether the host came as `Host`
/// (HTTP/1.1) or `:authority` (HTTP/2); a method rule holds in any case.
#[test]
fn route_host_and_method_rules_hold_on_every_spelling() {
    let mut config = common::config();
    config.push_str(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-ops}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n    - name: ops\n      matches: [{path: {type: PathPrefix, value: /ops}}]\n      backendRefs: [{name: web}]\n    - backendRefs: [{name: web}]\n---\n",
    );
    config.push_str(
        "apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: ops-closed}\nspec:\n  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: web-ops, sectionName: ops}\n  action: deny\n  rules: [{}]\n---\n",
    );
    config.push_str(&authz(
        "web-internal",
        "web",
        "  action: deny\n  rules:\n    - when: [{header: host, values: [internal.example]}]\n    - to: [{methods: [DELETE]}]\n",
    ));
    let mesh = Mesh::start(&config);
    let (web, client) = web_and_client(&mesh);
    for (method, path, want) in [
        ("GET", "/ops?key=r1", 403),
        ("GET", "/ops/x?key=r2", 403),
        ("GET", "/OPS/x?key=r3", 403),
        ("GET", "/operations?key=r4", 200),
        ("DELETE", "/x?key=r5", 403),
        ("delete", "/x?key=r6", 403),
    ] {
        let r = call(&client, "web", method, path, &[]);
        assert_eq!(r.status, want, "{method} {path}: {r:?}");
        let key = path.split("key=").nth(1).expect("key");
        let reached = if want == 403 { 0 } else { 1 };
        assert_eq!(web.counters(key)["started"], reached, "{method} {path}");
    }
    // The host, straight to web's inbound port with a mesh certificate:
    // as Host in HTTP/1.1 and as :authority in HTTP/2.
    let scratch = TempDir::new("authz-host");
    let (c, k) = common::certs::mesh_leaf(&mesh, &scratch.0, "client");
    for (proto, host, want) in [
        ("--http1.1", "internal.example", "403"),
        ("--http2", "internal.example", "403"),
        ("--http2", "INTERNAL.example:8443", "403"),
        ("--http1.1", "internal.example.", "403"),
        ("--http2", "public.example", "200"),
    ] {
        let out = curl(&[
            proto,
            "-s",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--cert",
            &c,
            "--key",
            &k,
            "-H",
            &format!("Host: {host}"),
            &format!("https://{}/?key=h", web.inbound),
        ]);
        let (code, version) = out.stdout.split_once(' ').unwrap_or(("", ""));
        assert_eq!(code, want, "{proto} {host}: {}", out.stdout);
        assert_eq!(version, if proto == "--http2" { "2" } else { "1.1" });
    }
}
