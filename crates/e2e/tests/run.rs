//! `tandem run`: an app and its sidecar as one process. The sidecar is
//! ready before the app starts, signals reach the app and its exit code
//! comes back, output is labelled, and no app runs on without its sidecar.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tandem_e2e::*;

fn config() -> String {
    format!(
        "{}{}",
        service_yaml("client", "http"),
        service_yaml("catalog", "http")
    )
}

/// One `tandem run`, its stdout and stderr each in a file.
struct Run {
    child: Child,
    instance: String,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    /// `tandem run --service SERVICE` with a fresh join token, towards
    /// `mesh`'s control plane, with `flags`, then `-- APP...`.
    fn start(mesh: &Mesh, dir: &Path, service: &str, flags: &[&str], app: &[&str]) -> Run {
        let token = dir.join(format!("{service}.token"));
        std::fs::write(&token, mesh.token(service)).unwrap();
        let control = format!("http://{}", mesh.grpc);
        let mut all = vec!["--control", control.as_str()];
        all.extend_from_slice(flags);
        Run::start_with(dir, service, &token, &all, app)
    }

    /// `tandem run` with this token file and `flags` (and `--control`
    /// among them, or the default).
    fn start_with(dir: &Path, service: &str, token: &Path, flags: &[&str], app: &[&str]) -> Run {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let instance = format!("{service}-run-{}-{n}", std::process::id());
        let out = dir.join(format!("{instance}.out"));
        let err = dir.join(format!("{instance}.err"));
        let child = Command::new(bin())
            .args(["run", "--service", service, "--instance", &instance])
            .arg("--token-file")
            .arg(token)
            .args(["--inbound", &free_port().to_string()])
            .args(flags)
            // A test that fails midway leaves nothing running.
            .arg("--exit-on-stdin-close")
            .arg("--")
            .args(app)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Run {
            child,
            instance,
            out,
            err,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits until stdout has this line.
    fn wait_line(&self, line: &str) {
        wait_for(
            &format!("`{line}` from tandem run"),
            Duration::from_secs(30),
            || self.stdout().lines().any(|l| l == line).then_some(()),
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_for("tandem run to exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        })
    }

    /// The sidecar `tandem run` started (while it runs).
    fn sidecar(&self) -> u32 {
        wait_for("the sidecar", Duration::from_secs(10), || {
            children(self.child.id())
                .into_iter()
                .find(|p| cmdline(*p).iter().any(|a| a == "proxy"))
        })
    }

    /// Live sidecars of this instance.
    fn sidecars_left(&self) -> Vec<u32> {
        pids_with_args(&["proxy", &self.instance])
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- tandem run stdout ----\n{}\n---- stderr ----\n{}",
                self.stdout(),
                self.stderr()
            );
        }
        // The app dies with it (its parent-death signal), the sidecar sees
        // its stdin close.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_apps_first_request_finds_its_sidecar_ready() {
    let mesh = Mesh::start(&config());
    let _catalog = mesh.instance("catalog", "catalog-1", &[], &[]);
    let dir = TempDir::new("run-first");
    let (status, env) = (dir.0.join("status"), dir.0.join("env"));
    let admin = free_port();
    // The app's very first acts: ask whether its sidecar is ready (directly:
    // NO_PROXY covers loopback), then call through it. Had it started
    // before the sidecar had its certificate and snapshot, the first would
    // not be 200 and the call would wait in the listener's backlog.
    let script = format!(
        "curl -s -o /dev/null -w '%{{http_code}} ' --max-time 5 http://{admin}/ready > {s}.tmp; env > {env}; curl -sS -o /dev/null -w '%{{http_code}}' --max-time 10 -x \"$HTTP_PROXY\" http://catalog/ >> {s}.tmp; mv {s}.tmp {s}; exec sleep 1000",
        env = env.display(),
        s = status.display()
    );
    let mut run = Run::start(
        &mesh,
        &dir.0,
        "client",
        &["--admin", &admin.to_string()],
        &["sh", "-c", &script],
    );
    let codes = wait_for("the app's first call", Duration::from_secs(30), || {
        std::fs::read_to_string(&status).ok()
    });
    assert_eq!(
        codes, "200 200",
        "/ready, then the first call through the sidecar"
    );

    // What the app was told.
    let env = std::fs::read_to_string(&env).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let proxy = var("HTTP_PROXY").expect("HTTP_PROXY");
    assert!(proxy.starts_with("http://127.0.0.1:"), "{proxy}");
    for k in ["http_proxy", "HTTPS_PROXY", "https_proxy"] {
        assert_eq!(var(k).as_ref(), Some(&proxy), "{k}");
    }
    assert_eq!(var("NO_PROXY").as_deref(), Some("localhost,127.0.0.1,::1"));
    assert_eq!(var("no_proxy").as_deref(), Some("localhost,127.0.0.1,::1"));
    assert!(
        var("PORT").is_some_and(|p| p.parse::<u16>().is_ok()),
        "{env}"
    );
    assert_eq!(var("TANDEM_SERVICE").as_deref(), Some("client"));
    assert_eq!(var("TANDEM_INSTANCE").as_ref(), Some(&run.instance));
    assert!(var("TANDEM_TOKEN").is_none(), "the token is the sidecar's");

    // `sleep` dies of the SIGTERM passed on: 128 + 15, as shells say.
    run.signal("TERM");
    assert_eq!(run.wait_exit().code(), Some(143));
    assert!(run.sidecars_left().is_empty());
}

#[test]
fn demo_app_needs_no_flags_under_tandem_run() {
    let mesh = Mesh::start(&config());
    let client = mesh.instance("client", "client-1", &[], &[]);
    let dir = TempDir::new("run-demo");
    let bin = bin().display().to_string();
    // Its address from PORT, its name from TANDEM_SERVICE/INSTANCE.
    let mut run = Run::start(&mesh, &dir.0, "catalog", &[], &[&bin, "demo-app"]);
    let v = wait_for("catalog through the mesh", Duration::from_secs(30), || {
        let (status, body) = http_get(client.http_proxy, "catalog", "/")?;
        (status == 200).then(|| serde_json::from_str::<serde_json::Value>(&body).unwrap())
    });
    assert_eq!(v["service"], "catalog", "{v}");
    assert_eq!(v["instance"], run.instance.as_str(), "{v}");
    run.signal("INT");
    assert_eq!(run.wait_exit().code(), Some(0), "a clean stop");
    assert!(run.sidecars_left().is_empty());
}

#[test]
fn sigterm_reaches_the_app_and_its_exit_code_comes_back() {
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("run-term");
    let mut run = Run::start(
        &mesh,
        &dir.0,
        "client",
        &["--label", "app"],
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo started; while :; do sleep 0.1; done",
        ],
    );
    run.wait_line("[app] started");
    let sidecar = run.sidecar();
    assert!(alive(sidecar));
    run.signal("TERM");
    assert_eq!(run.wait_exit().code(), Some(42));
    let out = run.stdout();
    assert!(out.lines().any(|l| l == "[app] got-term"), "{out}");
    // Drained and reaped before tandem run exited.
    assert!(!alive(sidecar));
    let err = run.stderr();
    assert!(err.contains("shutting down: draining connections"), "{err}");
}

#[test]
fn an_app_that_exits_gives_its_exit_code() {
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("run-exit");
    let mut run = Run::start(
        &mesh,
        &dir.0,
        "client",
        &[],
        &["sh", "-c", "echo bye; exit 3"],
    );
    assert_eq!(run.wait_exit().code(), Some(3));
    assert!(run.stdout().contains("[client] bye\n"));
    assert!(run.sidecars_left().is_empty(), "the sidecar is gone");
}

#[test]
fn killing_the_sidecar_stops_the_app() {
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("run-kill");
    let pid_file = dir.0.join("app.pid");
    // The app notes SIGTERM but goes on: SIGKILL ends it after --stop-grace.
    let script = format!(
        "echo $$ > {}; trap 'echo got-term' TERM; echo started; while :; do sleep 0.1; done",
        pid_file.display()
    );
    let mut run = Run::start(
        &mesh,
        &dir.0,
        "client",
        &["--stop-grace", "1s"],
        &["sh", "-c", &script],
    );
    run.wait_line("[client] started");
    let app: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(app));
    let sidecar = run.sidecar();
    let ok = Command::new("kill")
        .args(["-9", &sidecar.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert_eq!(run.wait_exit().code(), Some(1));
    let err = run.stderr();
    assert!(
        err.contains("tandem run: the sidecar exited (signal: 9 (SIGKILL)); stopping client"),
        "{err}"
    );
    assert!(
        run.stdout().contains("[client] got-term\n"),
        "SIGTERM first"
    );
    assert!(!alive(app), "the app runs on without its sidecar");
}

#[test]
fn killing_tandem_run_leaves_nothing_behind() {
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("run-kill9");
    let pid_file = dir.0.join("app.pid");
    let script = format!(
        "echo $$ > {}; echo started; trap '' TERM; while :; do sleep 0.1; done",
        pid_file.display()
    );
    let mut run = Run::start(&mesh, &dir.0, "client", &[], &["sh", "-c", &script]);
    run.wait_line("[client] started");
    let app: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sidecar = run.sidecar();
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    // The kernel kills the app (its parent-death signal: even one that
    // ignores SIGTERM); the sidecar sees its stdin close.
    wait_for(
        "the app and the sidecar to end",
        Duration::from_secs(20),
        || (!alive(app) && !alive(sidecar)).then_some(()),
    );
}

#[test]
fn output_is_labelled_line_by_line() {
    let mesh = Mesh::start(&config());
    let dir = TempDir::new("run-output");
    let mut run = Run::start(
        &mesh,
        &dir.0,
        "client",
        &[],
        &[
            "sh",
            "-c",
            "echo out-line; echo err-line >&2; printf partial",
        ],
    );
    assert_eq!(run.wait_exit().code(), Some(0));
    let out = run.stdout();
    // The app's stdout on stdout; its last line, without a newline, whole.
    assert_eq!(out, "[client] out-line\n[client] partial\n");
    let err = run.stderr();
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.contains(&"[client] err-line"), "{err}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[client proxy] ") && l.contains("first snapshot applied")),
        "{err}"
    );
    // Every line is labelled, ours too.
    assert!(
        lines.iter().all(|l| l.starts_with("[client] ")
            || l.starts_with("[client proxy] ")
            || l.starts_with("tandem run: ")),
        "{err}"
    );
}

#[test]
fn a_command_not_found_starts_nothing() {
    let dir = TempDir::new("run-notfound");
    let token = dir.0.join("token");
    std::fs::write(&token, "not-a-token").unwrap();
    let mut run = Run::start_with(
        &dir.0,
        "client",
        &token,
        &[],
        &["no-such-command-anywhere", "x"],
    );
    assert_eq!(run.wait_exit().code(), Some(127));
    let err = run.stderr();
    assert!(
        err.contains("tandem run: cannot start `no-such-command-anywhere`: command not found"),
        "{err}"
    );
    // No sidecar was started (it would have spent the token).
    assert!(!err.contains("[client proxy]"), "{err}");
}

#[test]
fn the_app_waits_for_a_sidecar_that_cannot_start() {
    let dir = TempDir::new("run-notready");
    let marker = dir.0.join("app-ran");
    let app = format!("touch {}", marker.display());
    // A sidecar that exits at once: its token file is missing.
    let mut run = Run::start_with(
        &dir.0,
        "client",
        &dir.0.join("missing.token"),
        &[],
        &["sh", "-c", &app],
    );
    assert_eq!(run.wait_exit().code(), Some(2));
    let err = run.stderr();
    // Its reason, then ours.
    let ours = err
        .find("tandem run: the sidecar exited before it was ready (exit status: 2); `sh` was not started")
        .expect(&err);
    let why = err.find("cannot read the token file").expect(&err);
    assert!(why < ours, "{err}");
    assert!(!marker.exists(), "the app ran");

    // A sidecar that never gets ready: no control plane answers.
    let token = dir.0.join("token");
    let data = dir.0.join("data").display().to_string();
    let minted = tandem_ok(&["token", "create", "--service", "client", "--data", &data]);
    std::fs::write(&token, minted).unwrap();
    let control = format!("http://{}", free_port());
    let mut run = Run::start_with(
        &dir.0,
        "client",
        &token,
        &["--control", &control, "--ready-timeout", "1s"],
        &["sh", "-c", &app],
    );
    assert_eq!(run.wait_exit().code(), Some(2));
    let err = run.stderr();
    assert!(
        err.contains("tandem run: the sidecar was not ready within 1s"),
        "{err}"
    );
    assert!(err.contains("cannot get the trust bundle yet"), "{err}");
    assert!(!marker.exists(), "the app ran");
    assert!(run.sidecars_left().is_empty());
}
