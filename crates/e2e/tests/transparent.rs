//! `tandem run --transparent`: an app with no proxy settings, in a network
//! namespace `tandem run` creates, reaches a mesh service by name over
//! mTLS, reaches a server outside the mesh that speaks first, and is
//! reached by other services through its sidecar; the sidecar's own
//! connections are never intercepted again.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_e2e::*;

/// A server outside the mesh, stopped with the test.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem run`, stopped (SIGTERM, then SIGKILL) with the test.
struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        if wait_child(&mut self.0, patience(Duration::from_secs(10))).is_some() {
            return;
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unmodified_app_uses_the_mesh_through_transparent_interception() {
    let mesh = Mesh::start(&format!(
        "{}{}{}",
        service_yaml("shop", "http"),
        service_yaml("catalog", "http"),
        service_yaml("client", "http"),
    ));
    let catalog = mesh.instance("catalog", "catalog-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let dir = TempDir::new("transparent");

    // A server outside the mesh that speaks first (as SMTP and MySQL do),
    // on every address of this host: the app reaches it at its gateway.
    let banner = TcpListener::bind("0.0.0.0:0").unwrap();
    let banner_port = banner.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in banner.incoming().take(4) {
            let Ok(mut c) = conn else { continue };
            let _ = c.write_all(b"220 outside ready\r\n");
            let mut line = String::new();
            let _ = BufReader::new(c.try_clone().unwrap()).read_line(&mut line);
            let _ = c.write_all(format!("250 got {line}").as_bytes());
        }
    });

    // An HTTPS server and a plain HTTP one outside the mesh, on every
    // address of this host too.
    let tls_port = free_port().port();
    let cert = rcgen::generate_simple_self_signed(vec!["outside".into()]).unwrap();
    std::fs::write(dir.0.join("outside.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.0.join("outside.key"), cert.signing_key.serialize_pem()).unwrap();
    let _https = Server(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("0.0.0.0:{tls_port}"))
            .arg("-cert")
            .arg(dir.0.join("outside.pem"))
            .arg("-key")
            .arg(dir.0.join("outside.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl is installed (the test command installs it)"),
    );
    let http_port = free_port().port();
    let _http = Server(
        Command::new(bin())
            .args(["demo-app", "--service", "outside", "--listen"])
            .arg(format!("0.0.0.0:{http_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for port in [tls_port, http_port] {
        wait_for("the outside servers", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    // A capture of the link between the two sidecars (catalog's inbound).
    let capture = Capture::start(&dir.0, catalog.inbound.port());

    // The app: no proxy variable is used (they are unset); it calls
    // `catalog` by name, then the outside server, then serves `shop`.
    // The app runs as `nobody`: it needs its own copy of the binary (the
    // checkout may not be readable by others) and a directory it may
    // write to.
    use std::os::unix::fs::PermissionsExt;
    let out = dir.0.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let app_bin = dir.0.join("tandem");
    if std::fs::hard_link(bin(), &app_bin).is_err() {
        std::fs::copy(bin(), &app_bin).unwrap();
    }
    std::fs::set_permissions(&app_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = "tandem-marker-7e2a-transparent";
    let script = format!(
        r#"unset HTTP_PROXY http_proxy HTTPS_PROXY https_proxy
o={out}
id -u > $o/uid
if ip link set lo down 2>/dev/null; then echo escaped; else echo refused; fi > $o/netadmin
getent hosts catalog > $o/resolved
curl -sS -m 10 -H 'x-marker: {marker}' http://catalog:8080/headers > $o/mesh.json 2> $o/mesh.err
gw=$(ip route show default | awk '{{print $3}}')
exec 3<>/dev/tcp/$gw/{banner_port}
head -n1 <&3 > $o/banner
echo hello-outside >&3
head -n1 <&3 >> $o/banner
exec 3<&-
curl -sS -k -m 10 -o /dev/null -w '%{{http_code}}' https://$gw:{tls_port}/ > $o/tls 2>&1
curl -sS -m 10 http://$gw:{http_port}/ > $o/http.json 2>&1
echo done > $o/done
exec {bin} demo-app --service shop --listen 0.0.0.0:$PORT
"#,
        out = out.display(),
        bin = app_bin.display(),
    );
    let token = dir.0.join("shop.token");
    std::fs::write(&token, mesh.token("shop")).unwrap();
    let admin = free_port();
    let inbound = free_port();
    let log = dir.0.join("run.log");
    let child = Command::new(bin())
        .args([
            "run",
            "--transparent",
            "--service",
            "shop",
            "--instance",
            "shop-1",
        ])
        .arg("--token-file")
        .arg(&token)
        .args(["--control", &format!("http://{}", mesh.grpc)])
        .args(["--inbound", &inbound.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--user", "nobody"])
        .args(["--", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.0.join("run.err")).unwrap())
        .spawn()
        .unwrap();
    let run = Run(child);
    let logs = || {
        format!(
            "{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(dir.0.join("run.err")).unwrap_or_default()
        )
    };
    wait_for("the app's calls", Duration::from_secs(30), || {
        out.join("done").exists().then_some(())
    });

    // The app ran as nobody, without the privileges to leave its network.
    assert_eq!(std::fs::read_to_string(out.join("uid")).unwrap(), "65534\n");
    assert_eq!(
        std::fs::read_to_string(out.join("netadmin")).unwrap(),
        "refused\n"
    );

    // The mesh name resolved to an address the sidecar keeps for it, and
    // the call went through the mesh: catalog's sidecar saw the caller's
    // verified identity.
    let resolved = std::fs::read_to_string(out.join("resolved")).unwrap();
    assert!(resolved.starts_with("198.18."), "{resolved} {}", logs());
    let seen = std::fs::read_to_string(out.join("mesh.json")).unwrap();
    assert!(seen.contains(marker), "{seen} {}", logs());
    assert!(
        seen.contains("spiffe://tandem.local/ns/default/svc/shop"),
        "{seen}"
    );

    // The server that speaks first was reached, both ways.
    let banner = std::fs::read_to_string(out.join("banner")).unwrap();
    assert_eq!(
        banner,
        "220 outside ready\r\n250 got hello-outside\n",
        "{}",
        logs()
    );

    // TLS and plain HTTP to hosts outside the mesh, told from their first
    // bytes (allow-all: both pass).
    assert_eq!(
        std::fs::read_to_string(out.join("tls")).unwrap(),
        "200",
        "{}",
        logs()
    );
    let outside = std::fs::read_to_string(out.join("http.json")).unwrap();
    assert!(outside.contains("\"service\":\"outside\""), "{outside}");

    // Between the sidecars: TLS, and never the marker in clear.
    let bytes = capture.stop();
    let has = |needle: &[u8]| contains(&bytes, needle);
    assert!(bytes.len() > 500, "only {} bytes captured", bytes.len());
    assert!(!has(marker.as_bytes()), "the marker crossed in clear");
    assert!(
        has(&[0x16, 0x03, 0x01]) || has(&[0x16, 0x03, 0x03]),
        "no TLS handshake captured"
    );

    // Each of the app's connections was intercepted once: one to a mesh
    // service, one of each protocol outside (the sidecar's own
    // connections, to catalog's sidecar and to the outside servers, were
    // not intercepted again).
    let metrics = wait_for("the sidecar's metrics", Duration::from_secs(10), || {
        http_get(admin, "admin", "/metrics").map(|(_, body)| body)
    });
    let count = |kind: &str| {
        metric(
            &metrics,
            &format!("tandem_intercepted_connections_total{{kind=\"{kind}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        [count("mesh"), count("opaque"), count("tls"), count("http")],
        [1.0; 4],
        "{metrics}"
    );
    assert_eq!(count("refused"), 0.0, "{metrics}");

    // Inbound: another service calls `shop`, through the sidecar, into
    // the app in its namespace.
    let (status, body) = wait_for("a call to shop", Duration::from_secs(20), || {
        http_request(
            client.http_proxy,
            "GET",
            "http://shop/",
            &[("Host", "shop")],
        )
        .filter(|r| r.0 == 200)
    });
    assert_eq!(status, 200);
    assert!(body.contains("\"service\":\"shop\""), "{body}");

    // Stopping `tandem run` removes the namespace and the redirect.
    let pid = run.0.id();
    drop(run);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&format!("tandem-{pid}")),
        "the namespace is left behind"
    );
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S", "PREROUTING"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&format!("tdm{pid}h")),
        "the redirect is left behind"
    );
}
