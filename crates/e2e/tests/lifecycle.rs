//! Process lifecycle and the CLI: graceful drain on SIGTERM, `tandem up`
//! end to end, `tandem validate`, help texts.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_e2e::*;

#[test]
fn sigterm_drains_in_flight_requests() {
    let mesh = Mesh::start(&common::config());
    let mut web = mesh.instance("web", "web-1", &[], &["--drain-grace", "5s"]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    assert_eq!(http_get(up, "web", "/").map(|r| r.0), Some(200));

    // A slow request is in flight through both sidecars when the server-side
    // sidecar is told to stop.
    let slow = std::thread::spawn(move || http_get(up, "web", "/slow?ms=1500"));
    std::thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    web.proxy().signal("TERM");
    let (status, body) = slow.join().expect("thread").expect("answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"service\":\"web\""), "{body}");
    // It exits once the request is done, well before the grace period ends.
    let exit = web
        .proxy_mut()
        .wait_exit(Duration::from_secs(5))
        .expect("sidecar exited");
    assert!(exit.success(), "{exit:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // New requests get a clear mesh error, not a hang.
    let (status, _) = http_get(up, "web", "/").expect("answer");
    assert_eq!(status, 503);
}

#[test]
fn validate_reports_every_problem_with_position() {
    let dir = TempDir::new("validate");
    std::fs::write(dir.0.join("good.yaml"), common::config()).expect("write");
    let run = || {
        Command::new(bin())
            .args(["validate", &dir.0.display().to_string()])
            .output()
            .expect("run")
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    std::fs::write(
        dir.0.join("bad.yaml"),
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: extra}\nspec:\n  ports: [{port: 80, protocol: http}]\n  endpoint: []\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: missing}]\n  rules:\n    - backendRefs: [{name: web, weight: 0}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, protocol: http}]\n",
    )
    .expect("write");
    let out = run();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let bad = dir.0.join("bad.yaml").display().to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{bad}:6:3: unknown field `endpoint`"))),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{bad}:12:23: parentRef names Service `default/missing`"
        ))),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{bad}:14:7: all backendRefs of this rule have weight 0"
        ))),
        "{text}"
    );
    // bad.yaml sorts first, so good.yaml's `web` is the duplicate.
    let good = dir.0.join("good.yaml").display().to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{good}:"))
                && l.contains("duplicate Service `default/web`")),
        "{text}"
    );
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(bin()).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for cmd in [
        "up", "control", "proxy", "validate", "stat", "status", "demo-app",
    ] {
        assert!(
            text.contains(&format!("  {cmd}")),
            "{cmd} missing from:\n{text}"
        );
        let out = Command::new(bin())
            .args([cmd, "--help"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{cmd} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: tandem"),
            "{cmd}"
        );
    }
}

/// PIDs of the direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the command name: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

fn start_up(dir: &TempDir, api: std::net::SocketAddr) -> std::process::Child {
    let log = std::fs::File::create(dir.0.join("up.out")).expect("log");
    Command::new(bin())
        .args([
            "up",
            "--plain",
            "--rps",
            "20",
            "--state-dir",
            &dir.0.join("state").display().to_string(),
            "--api",
            &api.to_string(),
            "--listen",
            &free_port().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("tandem up")
}

fn stat_json(api: std::net::SocketAddr) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args(["stat", "-o", "json", "--api", &api.to_string()])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn tandem_up_runs_the_demo_and_cleans_up() {
    let dir = TempDir::new("up");
    let api = free_port();
    let mut up = start_up(&dir, api);
    let up_out = dir.0.join("up.out");
    let rows = wait_for("traffic in tandem stat", Duration::from_secs(60), || {
        let v = stat_json(api)?;
        let rows = v.as_array()?.clone();
        let pairs: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{}->{}",
                    r["source"].as_str().unwrap_or(""),
                    r["destination"].as_str().unwrap_or("")
                )
            })
            .collect();
        let want = [
            "loadgen->web",
            "web->catalog-v1",
            "web->orders",
            "orders->payments",
        ];
        want.iter()
            .all(|w| pairs.iter().any(|p| p == w))
            .then_some(rows)
    });
    for r in &rows {
        for f in [
            "source",
            "destination",
            "rps",
            "success_rate",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "requests",
            "retries",
            "raw_success_rate",
        ] {
            assert!(r.get(f).is_some(), "field {f} missing in {r}");
        }
    }
    let status = Command::new(bin())
        .args(["status", "-o", "json", "--api", &api.to_string()])
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let proxies = v.as_array().cloned().unwrap_or_default();
    assert_eq!(proxies.len(), 6, "{v}");
    for p in &proxies {
        for f in [
            "service",
            "instance",
            "inbound",
            "admin",
            "http_proxy",
            "config_version",
            "config_acked",
        ] {
            assert!(p.get(f).is_some(), "field {f} missing in {p}");
        }
        assert_eq!(p["config_acked"], true, "{p}");
    }
    let table = Command::new(bin())
        .args(["stat", "--api", &api.to_string()])
        .output()
        .expect("stat");
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("loadgen"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    let shown = std::fs::read_to_string(&up_out).unwrap_or_default();
    assert!(shown.contains("state directory"), "{shown}");
    assert!(shown.contains("tandem stat"), "{shown}");

    // Ctrl-C: everything stops, nothing is left behind.
    let kids = children(up.id());
    assert_eq!(kids.len(), 13, "control + 6 apps + 6 sidecars: {kids:?}");
    let ok = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "tandem up did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let left: Vec<u32> = kids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Even `kill -9` of tandem up leaves nothing behind: the children see
    // their stdin close and exit by themselves.
    let api = free_port();
    let mut up = start_up(&dir, api);
    wait_for("traffic again", Duration::from_secs(60), || {
        stat_json(api)?
            .as_array()?
            .iter()
            .any(|r| r["source"] == "loadgen")
            .then_some(())
    });
    let kids = children(up.id());
    assert_eq!(kids.len(), 13, "{kids:?}");
    up.kill().expect("kill -9");
    let _ = up.wait();
    wait_for("children to exit", Duration::from_secs(20), || {
        kids.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn stopping_an_instance_loses_no_requests() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mesh = Mesh::start(&common::config());
    let mut web1 = mesh.instance("web", "web-1", &[], &[]);
    let _web2 = mesh.instance("web", "web-2", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    wait_for("both endpoints", Duration::from_secs(10), || {
        (client.endpoints("web", "web")?.len() == 2).then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                // One keep-alive connection per worker, like a real client.
                let mut s = std::net::TcpStream::connect(up).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    use std::io::{Read, Write};
                    let sent = s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
                    let n = sent.and_then(|_| s.read(&mut buf)).unwrap_or(0);
                    if buf[..n].starts_with(b"HTTP/1.1 200") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {}", String::from_utf8_lossy(&buf[..n]));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    web1.proxy().signal("TERM");
    assert!(web1
        .proxy_mut()
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed while web-1 stopped"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "{}",
        ok.load(Ordering::Relaxed)
    );
}

#[test]
fn up_with_a_user_config_directory() {
    let dir = TempDir::new("upcfg");
    let cfg = dir.0.join("mine");
    // The demo config can be written out to start from; it validates.
    let out = Command::new(bin())
        .args(["up", "--write-config", &cfg.display().to_string()])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin())
        .args(["validate", &cfg.display().to_string()])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A broken directory is refused before anything starts.
    let demo = cfg.join("demo.yaml");
    let text = std::fs::read_to_string(&demo)
        .expect("read")
        .replace("backendRefs", "backendRef");
    std::fs::write(&demo, text).expect("write");
    let out = Command::new(bin())
        .args([
            "up",
            &cfg.display().to_string(),
            "--state-dir",
            &dir.0.join("state").display().to_string(),
            "--api",
            &free_port().to_string(),
            "--listen",
            &free_port().to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:", demo.display())) && err.contains("unknown field `backendRef`"),
        "{err}"
    );
    assert!(
        !dir.0.join("state/logs/control.log").exists(),
        "nothing was started"
    );
}
