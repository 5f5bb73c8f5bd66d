//! Process lifecycle and the CLI: graceful drain on SIGTERM, `tandem up`
//! end to end, `tandem validate`, help texts.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_e2e::*;

#[test]
fn sigterm_drains_in_flight_requests() {
    let mesh = Mesh::start(&common::config());
    // A grace period far longer than the test may wait: the sidecar must
    // exit because its last request finished, not because time ran out.
    let mut web = mesh.instance("web", "web-1", &[], &["--drain-grace", "10m"]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    assert_eq!(http_get(up, "web", "/").map(|r| r.0), Some(200));

    // A request is held at the app, through both sidecars, when the
    // server-side sidecar is told to stop.
    let held = std::thread::spawn(move || http_get(up, "web", "/hold?key=drain"));
    web.wait_held("drain", 1, Duration::from_secs(10));
    web.proxy().signal("TERM");
    web.proxy().wait_log(
        "shutting down: draining connections",
        Duration::from_secs(10),
    );
    // Still held: draining does not cut it.
    assert_eq!(web.held("drain")["waiting"], 1);
    assert!(web
        .proxy_mut()
        .wait_exit(Duration::from_millis(200))
        .is_none());
    web.open("drain");
    let (status, body) = held.join().expect("thread").expect("answer");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["service"], "web", "{body}");
    assert_eq!(v["key"], "drain", "{body}");
    // It exits once the request is done, long before the grace period ends.
    let exit = web
        .proxy_mut()
        .wait_exit(patience(Duration::from_secs(20)))
        .expect("sidecar exited after its last request");
    assert!(exit.success(), "{exit:?}");
    let log = web.proxy().log_text();
    assert!(!log.contains("drain grace period over"), "{log}");
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

/// The command names listed under `Commands:` in a help text.
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().expect("run");
    assert!(out.status.success(), "{args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_explains_every_command() {
    let top = help(&["--help"]);
    assert_eq!(
        commands(&top),
        [
            "up",
            "control",
            "token",
            "ca",
            "proxy",
            "run",
            "validate",
            "apply",
            "authz",
            "explain",
            "stat",
            "top",
            "dashboard",
            "tap",
            "status",
            "rollout",
            "demo-app"
        ],
        "{top}"
    );
    for cmd in commands(&top) {
        let text = help(&[&cmd, "--help"]);
        assert!(text.contains(&format!("Usage: tandem {cmd}")), "{text}");
        // Every subcommand explains itself too.
        for sub in commands(&text) {
            let text = help(&[&cmd, &sub, "--help"]);
            assert!(
                text.contains(&format!("Usage: tandem {cmd} {sub}")),
                "{text}"
            );
        }
    }
    assert_eq!(commands(&help(&["token", "--help"])), ["create", "revoke"]);
    assert_eq!(
        commands(&help(&["ca", "--help"])),
        ["show", "rotate", "retire"]
    );
}

/// `tandem up`'s children and theirs (`tandem run` starts an app and a
/// sidecar).
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = children(pid);
    let mut i = 0;
    while i < all.len() {
        let more = children(all[i]);
        all.extend(more);
        i += 1;
    }
    all
}

fn stat_json(api: std::net::SocketAddr, data: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin())
        .args([
            "stat",
            "-o",
            "json",
            "--api",
            &api.to_string(),
            "--data",
            data,
        ])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn tandem_up_runs_the_demo_and_cleans_up() {
    let dir = TempDir::new("up");
    let api = free_port();
    let mut up = start_up(&dir, api, &[]);
    let up_out = dir.0.join("up.out");
    let data = dir.0.join("state/data").display().to_string();
    let rows = wait_for("traffic in tandem stat", Duration::from_secs(60), || {
        let v = stat_json(api, &data)?;
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
        // Both sides of every pair have reported (the destinations'
        // sidecars report on their own clocks), and the window is past the
        // start, when callers' first requests may find a sidecar not ready
        // yet.
        let both_sides = rows.iter().all(|r| {
            r["raw_success_rate"].is_number()
                && r["dst_proxy_p99_ms"].is_number()
                && r["success_rate"].as_f64().is_some_and(|s| s >= 0.9)
        });
        (both_sides && want.iter().all(|w| pairs.iter().any(|p| p == w))).then_some(rows)
    });
    for r in &rows {
        let num = |f: &str| {
            r[f].as_f64()
                .unwrap_or_else(|| panic!("{f} is not a number in {r}"))
        };
        assert!(num("rps") > 0.0, "{r}");
        assert!(num("requests") >= 1.0, "{r}");
        let rate = num("success_rate");
        assert!((0.0..=1.0).contains(&rate), "{r}");
        // The demo's access policy lets all of its own traffic through
        // (payments fails a few per cent, and its callers retry).
        assert!(rate >= 0.9, "{r}");
        let (p50, p95, p99) = (num("p50_ms"), num("p95_ms"), num("p99_ms"));
        assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{r}");
        assert!(r["retries"].as_u64().is_some(), "{r}");
        // Every demo destination has a sidecar, so tries are seen there.
        let raw = r["raw_success_rate"]
            .as_f64()
            .unwrap_or_else(|| panic!("raw_success_rate in {r}"));
        assert!((0.0..=1.0).contains(&raw), "{r}");
        // Both sidecars of every pair report the time they took themselves.
        for f in [
            "proxy_p50_ms",
            "proxy_p99_ms",
            "dst_proxy_p50_ms",
            "dst_proxy_p99_ms",
        ] {
            assert!(num(f) > 0.0, "{f}: {r}");
        }
    }
    // orders waits 2 ms and calls payments, which waits 4 ms: web's sidecar
    // waits at least 6 ms on orders, which is not its own time.
    let web_orders = rows
        .iter()
        .find(|r| r["source"] == "web" && r["destination"] == "orders")
        .expect("web->orders");
    let (own, total) = (
        web_orders["proxy_p50_ms"].as_f64().expect("own"),
        web_orders["p50_ms"].as_f64().expect("total"),
    );
    assert!(own < total / 2.0, "{web_orders}");
    let p50 = |src: &str, dst: &str| {
        rows.iter()
            .find(|r| r["source"] == src && r["destination"] == dst)
            .and_then(|r| r["p50_ms"].as_f64())
            .expect("row")
    };
    assert!(p50("web", "orders") >= 4.0, "{rows:?}");
    assert!(p50("orders", "payments") >= 2.0, "{rows:?}");
    let status = Command::new(bin())
        .args([
            "status",
            "-o",
            "json",
            "--api",
            &api.to_string(),
            "--data",
            &data,
        ])
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let proxies = v.as_array().cloned().unwrap_or_default();
    let mut services: Vec<&str> = proxies
        .iter()
        .map(|p| p["service"].as_str().expect("service"))
        .collect();
    services.sort_unstable();
    assert_eq!(
        services,
        [
            "catalog-v1",
            "catalog-v2",
            "loadgen",
            "orders",
            "payments",
            "web"
        ],
        "{v}"
    );
    for p in &proxies {
        let service = p["service"].as_str().expect("service");
        assert_eq!(p["instance"], format!("{service}-1"), "{p}");
        assert_eq!(p["connected"], true, "{p}");
        assert_eq!(p["config_acked"], true, "{p}");
        // Versions are per proxy (each gets the snapshot of its own inputs).
        let version = p["config_version"].as_u64().expect("version");
        assert!(version >= 1 && p["acked_version"] == version, "{p}");
        for f in ["inbound", "admin", "http_proxy"] {
            let addr = p[f].as_str().unwrap_or_default();
            assert!(
                addr.parse::<std::net::SocketAddr>().is_ok(),
                "{f} is not an address in {p}"
            );
        }
        let id = p["spiffe_id"].as_str().unwrap_or_default();
        assert!(
            id.starts_with("spiffe://") && id.ends_with(&format!("/ns/default/svc/{service}")),
            "{p}"
        );
    }
    let table = Command::new(bin())
        .args(["stat", "--api", &api.to_string(), "--data", &data])
        .output()
        .expect("stat");
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("loadgen"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    // The demo rolls catalog-v2 out, step by step, to the end.
    let rollout = wait_for(
        "the demo's rollout to succeed",
        Duration::from_secs(120),
        || {
            let out = Command::new(bin())
                .args([
                    "rollout",
                    "status",
                    "catalog",
                    "-o",
                    "json",
                    "--api",
                    &api.to_string(),
                    "--data",
                    &data,
                ])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["state"]["phase"] == "succeeded").then_some(v)
        },
    );
    let steps: Vec<&str> = rollout["state"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|d| d["action"].as_str())
        .collect();
    assert_eq!(
        steps,
        ["start", "promote", "promote", "promote", "succeed"],
        "{rollout}"
    );
    let shown = std::fs::read_to_string(&up_out).unwrap_or_default();
    assert!(shown.contains("state directory"), "{shown}");
    assert!(
        shown.contains("rollout default/catalog: catalog: "),
        "{shown}"
    );
    // The hint names the state directory's credential.
    assert!(
        shown.contains(&format!("tandem stat --api {api} --data {data}")),
        "{shown}"
    );

    // Ctrl-C: everything stops, nothing is left behind.
    let kids = descendants(up.id());
    assert_eq!(
        kids.len(),
        19,
        "control + 6 `tandem run`, each with an app and its sidecar: {kids:?}"
    );
    let ok = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = wait_for("tandem up to stop", Duration::from_secs(20), || {
        up.try_wait().expect("wait")
    });
    assert!(status.success(), "{status:?}");
    let left: Vec<u32> = kids.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Even `kill -9` of tandem up leaves nothing behind: the children see
    // their stdin close and exit by themselves.
    let api = free_port();
    let mut up = start_up(&dir, api, &[]);
    wait_for("traffic again", Duration::from_secs(60), || {
        stat_json(api, &data)?
            .as_array()?
            .iter()
            .any(|r| r["source"] == "loadgen")
            .then_some(())
    });
    let kids = descendants(up.id());
    assert_eq!(kids.len(), 19, "{kids:?}");
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
    let mut web1 = mesh.instance("web", "web-1", &[], &["--drain-grace", "10m"]);
    let _web2 = mesh.instance("web", "web-2", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    wait_for("both endpoints", Duration::from_secs(10), || {
        (client.endpoints("web", "web")?.len() == 2).then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || -> Result<(), String> {
                // One keep-alive connection per worker, like a real client.
                let mut conn = KeepAlive::connect(up).ok_or("connect")?;
                while !stop.load(Ordering::Relaxed) {
                    match conn.send("GET", "web", "/", &[], b"") {
                        Some(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => return Err(format!("{other:?}")),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
        })
        .collect();
    let progress = |more: u64| {
        let target = ok.load(Ordering::Relaxed) + more;
        wait_for("requests answered", Duration::from_secs(20), || {
            (ok.load(Ordering::Relaxed) >= target).then_some(())
        });
    };
    // Both instances serve before web-1 stops.
    progress(100);
    let served_by_1 = |m: &str| metric_sum(m, "tandem_requests_total", &[("direction", "inbound")]);
    assert!(served_by_1(&web1.metrics()) > 0.0);
    web1.proxy().signal("TERM");
    let exit = web1
        .proxy_mut()
        .wait_exit(patience(Duration::from_secs(20)))
        .expect("web-1's sidecar exits once its connections are drained");
    assert!(exit.success(), "{exit:?}");
    assert!(!web1.proxy().log_text().contains("drain grace period over"));
    // The same connections go on to web-2.
    progress(100);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let r = w.join().expect("worker");
        assert_eq!(r, Ok(()), "a request failed while web-1 stopped");
    }
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

/// The proxies `tandem up`'s Prometheus targets file lists, by service.
fn scrape_targets(file: &std::path::Path) -> Option<Vec<(String, std::net::SocketAddr)>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    v.as_array()?
        .iter()
        .map(|g| {
            Some((
                g["labels"]["service"].as_str()?.to_string(),
                g["targets"][0].as_str()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_tandem_up() {
    let dir = TempDir::new("up-prometheus");
    let api = free_port();
    let mut up = KillOnDrop(start_up(&dir, api, &[]));
    let prom = dir.0.join("state/prometheus");
    let targets_file = prom.join("targets.json");
    let targets = wait_for(
        "six sidecars in the targets file",
        Duration::from_secs(60),
        || {
            // `tandem up` gone: say why at once.
            if let Ok(Some(status)) = up.0.try_wait() {
                let out = std::fs::read_to_string(dir.0.join("up.out")).unwrap_or_default();
                panic!("tandem up exited ({status}):\n{out}");
            }
            scrape_targets(&targets_file).filter(|t| t.len() == 6)
        },
    );

    // Every sidecar's page, once it has served requests, passes
    // Prometheus' own checker.
    for (service, admin) in &targets {
        let text = wait_for(
            &format!("{service} to serve"),
            Duration::from_secs(60),
            || {
                let (status, text) = http_get(*admin, "admin", "/metrics")?;
                (status == 200 && text.contains("tandem_proxy_duration_seconds_bucket"))
                    .then_some(text)
            },
        );
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian's prometheus package)");
        std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), text.as_bytes())
            .expect("write");
        let out = check.wait_with_output().expect("promtool");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{service}: {said}"
        );
    }

    // A real Prometheus, started with the config `tandem up` wrote.
    let web = free_port();
    let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log");
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                prom.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus"),
    );
    let query = "histogram_quantile(0.99, sum by (le, dst_service) (rate(tandem_request_duration_seconds_bucket{direction=\"outbound\"}[1m])))";
    let path = format!("/api/v1/query?query={}", url_encode(query));
    let p99 = wait_for(
        "p99 per destination from Prometheus",
        Duration::from_secs(90),
        || {
            let (status, body) = http_get(web, "prometheus", &path)?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let rows: Vec<(String, f64)> = v["data"]["result"]
                .as_array()?
                .iter()
                .filter_map(|r| {
                    let value: f64 = r["value"][1].as_str()?.parse().ok()?;
                    Some((r["metric"]["dst_service"].as_str()?.to_string(), value))
                })
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            let all = ["web", "orders", "payments", "catalog-v1"]
                .iter()
                .all(|s| rows.iter().any(|(d, _)| d == s));
            (status == 200 && all).then_some(rows)
        },
    );
    // payments answers in 4 ms or more; its p99 is at least that.
    let payments = p99.iter().find(|(d, _)| d == "payments").expect("payments");
    assert!(payments.1 >= 0.004, "{p99:?}");

    // A sidecar that goes away leaves the targets file.
    let catalog_v2 = descendants(up.0.id())
        .into_iter()
        .find(|pid| {
            let args = cmdline(*pid);
            args.iter().any(|a| a == "proxy") && args.iter().any(|a| a == "catalog-v2")
        })
        .expect("the catalog-v2 sidecar");
    let ok = Command::new("kill")
        .args(["-TERM", &catalog_v2.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    wait_for(
        "catalog-v2 to leave the targets",
        Duration::from_secs(30),
        || {
            scrape_targets(&targets_file)
                .filter(|t| t.len() == 5 && t.iter().all(|(s, _)| s != "catalog-v2"))
        },
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
