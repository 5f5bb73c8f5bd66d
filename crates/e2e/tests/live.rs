//! The live views against real sidecars: `tandem tap` sees the requests
//! that match its filter and nothing else, with headers redacted unless
//! asked for; `tandem top` shows the busiest pairs and routes.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tandem_e2e::*;

fn config() -> String {
    let mut s: String = ["client", "web", "orders"]
        .iter()
        .map(|n| service_yaml(n, "http"))
        .collect();
    s.push_str(&split_yaml("web", &[("web", 1)]));
    s
}

fn cli(mesh: &Mesh, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args)
        .args(["--api", &mesh.api.to_string()])
        .args(["--data", &mesh.data_dir().display().to_string()]);
    c
}

#[test]
fn tap_sees_what_matches_and_nothing_else() {
    let mesh = Mesh::start(&config());
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    let r = conn.send("GET", "web:8080", "/", &[], b"").expect("warm");
    assert_eq!(r.status, 200);

    // Three GETs under /tapped, then the tap ends by itself.
    let mut tap = cli(
        &mesh,
        &[
            "tap", "web", "--path", "/tapped", "--method", "GET", "--count", "3", "-o", "json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("tandem tap");
    // The tap is in force on web's sidecar before any request is sent.
    wait_for("the tap on web's sidecar", Duration::from_secs(20), || {
        (metric_sum(&web.metrics(), "tandem_taps_active", &[]) == 1.0).then_some(())
    });
    for (method, path) in [
        ("GET", "/other"),
        ("POST", "/tapped/post"),
        ("GET", "/tappedx"),
        ("GET", "/tapped/1"),
        ("GET", "/tapped/2?secret=x"),
        ("GET", "/tapped"),
    ] {
        let r = conn
            .send(
                method,
                "web:8080",
                path,
                &[("x-env", "prod"), ("authorization", "Bearer t")],
                b"",
            )
            .expect("answer");
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
    }
    let out = tap.stdout.take().expect("stdout");
    let lines: Vec<Value> = std::io::BufReader::new(out)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("line")).expect("JSON"))
        .collect();
    let status = tap.wait().expect("tap");
    assert!(status.success(), "{status:?}");
    // The client's sidecar is not web's: only web's inbound side answers.
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or(""),
                l["path"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("GET", "/tapped/1"),
            ("GET", "/tapped/2"),
            ("GET", "/tapped")
        ],
        "{lines:#?}"
    );
    for l in &lines {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["src_service"], "client", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["proxy"], "default/web/web-1", "{l}");
        assert_eq!(l["headers"]["x-env"], "redacted", "{l}");
        assert_eq!(l["headers"]["authorization"], "redacted", "{l}");
        assert!(l["request_id"].as_str().is_some(), "{l}");
    }
    // The tap ended: the sidecar does no tap work any more.
    wait_for(
        "the tap to end on web's sidecar",
        Duration::from_secs(20),
        || (metric_sum(&web.metrics(), "tandem_taps_active", &[]) == 0.0).then_some(()),
    );

    // Asked for, values show; credentials never do.
    let tap = cli(
        &mesh,
        &[
            "tap",
            "web",
            "--reveal-headers",
            "--count",
            "1",
            "-o",
            "json",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("tandem tap");
    wait_for("the second tap", Duration::from_secs(20), || {
        (metric_sum(&web.metrics(), "tandem_taps_active", &[]) == 1.0).then_some(())
    });
    conn.send(
        "GET",
        "web:8080",
        "/x",
        &[("x-env", "prod"), ("authorization", "Bearer t")],
        b"",
    )
    .expect("answer");
    let out = tap.wait_with_output().expect("tap");
    let l: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(l["headers"]["x-env"], "prod", "{l}");
    assert_eq!(l["headers"]["authorization"], "redacted", "{l}");

    // Tapping needs the admin credential.
    let out = Command::new(bin())
        .args([
            "tap",
            "web",
            "--api",
            &mesh.api.to_string(),
            "--admin-token-file",
            "/dev/null",
        ])
        .output()
        .expect("tap");
    assert!(!out.status.success());
    // A service without proxies is refused with the reason.
    let out = cli(&mesh, &["tap", "orders"]).output().expect("tap");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no connected proxy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn top_shows_the_busiest_pairs_and_routes() {
    let mesh = Mesh::start(&config());
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    let mut conn = KeepAlive::connect(client.http_proxy).expect("connect");
    let top = wait_for(
        "client → web in tandem top",
        Duration::from_secs(30),
        || {
            for _ in 0..20 {
                conn.send("GET", "web:8080", "/", &[], b"")?;
            }
            let out = cli(
                &mesh,
                &["top", "-o", "json", "--count", "1", "--interval", "200ms"],
            )
            .output()
            .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let pair = v["pairs"]
                .as_array()?
                .iter()
                .any(|p| p["source"] == "client" && p["destination"] == "web");
            let route = v["routes"]
                .as_array()?
                .iter()
                .any(|r| r["route"] == "default/web" && r["backend"] == "web");
            (pair && route).then_some(v)
        },
    );
    let route = &top["routes"][0];
    assert!(route["rps"].as_f64().is_some_and(|r| r > 0.0), "{top}");
    assert_eq!(route["success_rate"], 1.0, "{top}");
    // The table for people.
    let out = cli(&mesh, &["top", "--count", "1"]).output().expect("top");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ROUTE") && text.contains("default/web"),
        "{text}"
    );
}
