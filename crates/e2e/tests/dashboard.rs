//! The web dashboard in a real browser: `tandem up` prints its address
//! with a login token; headless Chromium, driven by chromedriver over the
//! WebDriver protocol, loads it, finds the demo's services and the edges
//! between them with live numbers, opens a service's charts, and saves a
//! screenshot (kept under the target directory as the test's artifact).

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tandem_e2e::*;

/// A WebDriver call (with curl); its `value`.
fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-X",
        method,
        &format!("http://127.0.0.1:{port}{path}"),
    ]);
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = c.output().expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["value"].clone()
}

fn curl_status(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_shows_the_mesh_live_in_a_real_browser() {
    let dir = TempDir::new("dashboard");
    let api = free_port();
    let _up = KillOnDrop(start_up(&dir, api, &[]));
    let url = wait_for("the dashboard's address", Duration::from_secs(60), || {
        let shown = std::fs::read_to_string(dir.0.join("up.out")).ok()?;
        let line = shown.lines().find(|l| l.contains("dashboard: "))?;
        Some(line.split("dashboard: ").nth(1)?.trim().to_string())
    });
    assert!(
        url.starts_with(&format!("http://{api}/dashboard?token=")),
        "{url}"
    );
    // `tandem dashboard` prints the same address.
    let out = Command::new(bin())
        .args(["dashboard", "--api", &api.to_string(), "--data"])
        .arg(dir.0.join("state/data"))
        .output()
        .expect("tandem dashboard");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), url);

    // The login: a wrong token or none gets nothing; the right one a
    // cookie that reads the API but changes nothing.
    let jar = dir.0.join("cookies").display().to_string();
    let base = format!("http://{api}");
    assert_eq!(curl_status(&[&format!("{base}/dashboard")]), "401");
    assert_eq!(
        curl_status(&[&format!("{base}/dashboard?token=wrong")]),
        "401"
    );
    assert_eq!(curl_status(&["-c", &jar, &url]), "303");
    assert_eq!(
        curl_status(&["-b", &jar, &format!("{base}/api/v1/proxies")]),
        "200"
    );
    assert_eq!(
        curl_status(&["-b", &jar, &format!("{base}/dashboard/app.js")]),
        "200"
    );
    assert_eq!(
        curl_status(&[
            "-b",
            &jar,
            "-X",
            "POST",
            &format!("{base}/api/v1/ca/rotate")
        ]),
        "401"
    );

    // The browser.
    let port = free_port().port();
    let _driver = KillOnDrop(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver)"),
    );
    wait_for("chromedriver", Duration::from_secs(30), || {
        wd(port, "GET", "/status", None)["ready"]
            .as_bool()
            .filter(|r| *r)
    });
    let session = wd(
        port,
        "POST",
        "/session",
        Some(json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1100"]
            }
        }}})),
    );
    let id = session["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no browser session: {session}"))
        .to_string();
    wd(
        port,
        "POST",
        &format!("/session/{id}/url"),
        Some(json!({ "url": url })),
    );
    let script = |s: &str| {
        wd(
            port,
            "POST",
            &format!("/session/{id}/execute/sync"),
            Some(json!({ "script": s, "args": [] })),
        )
    };
    let seen = wait_for(
        "the demo's services and edges with numbers",
        Duration::from_secs(90),
        || {
            let v = script(
            "return {
               services: [...document.querySelectorAll('[data-service]')].map(e => e.dataset.service),
               edges: [...document.querySelectorAll('[data-edge]')].map(e => [e.dataset.edge, e.textContent, e.getAttribute('class')]),
               proxies: document.querySelectorAll('[data-proxy]').length,
               rollouts: document.querySelectorAll('[data-rollout]').length,
               status: document.getElementById('status').textContent,
               path: location.pathname + location.search }",
        );
            let services: Vec<&str> = v["services"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let all = [
                "catalog-v1",
                "catalog-v2",
                "loadgen",
                "orders",
                "payments",
                "web",
            ]
            .iter()
            .all(|s| services.contains(s));
            let live = |edge: &str| {
                v["edges"].as_array().into_iter().flatten().any(|e| {
                    e[0] == edge
                        && e[1].as_str().is_some_and(|t| {
                            t.split(" rps")
                                .next()
                                .and_then(|r| r.parse::<f64>().ok())
                                .is_some_and(|r| r > 0.0)
                                && t.contains("% · p99 ")
                        })
                })
            };
            let edges = ["loadgen->web", "web->orders", "orders->payments"]
                .iter()
                .all(|e| live(e));
            (all && edges && v["proxies"] == 6 && v["rollouts"] == 1).then_some(v)
        },
    );
    // The token left the address bar.
    assert_eq!(seen["path"], "/dashboard", "{seen}");
    assert!(
        seen["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("live")),
        "{seen}"
    );
    // Every edge is coloured by its health.
    for e in seen["edges"].as_array().expect("edges") {
        let class = e[2].as_str().unwrap_or("");
        assert!(["edge ok", "edge warn", "edge bad"].contains(&class), "{e}");
    }
    // A service's page: its golden signals over the last minutes.
    script("document.querySelector('[data-service=\"payments\"]').dispatchEvent(new MouseEvent('click'))");
    wait_for("payments' charts", Duration::from_secs(30), || {
        let t = script("const e = document.querySelector('[data-last=\"rps\"]'); return e ? e.textContent : ''");
        t.as_str()
            .filter(|t| t.starts_with("now ") && !t.starts_with("now 0.00"))
            .map(|_| ())
    });

    // The screenshot, kept as the test's artifact.
    let png = wd(port, "GET", &format!("/session/{id}/screenshot"), None);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().expect("screenshot"))
        .expect("base64");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let artifacts = target.join("e2e-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts");
    std::fs::write(artifacts.join("dashboard.png"), &bytes).expect("screenshot");
    wd(port, "DELETE", &format!("/session/{id}"), None);
}
