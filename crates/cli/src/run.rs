//! `tandem run`: one instance of a service, its app and its sidecar,
//! started, watched and stopped as one process.
//!
//! ```text
//! tandem run --service web --token-file web.token --inbound 10.0.0.5:4143 -- ./web-server
//! ```
//!
//! The lifecycle:
//!
//! 1. **Check.** The app's command must be found (else exit 127, or 126
//!    when it cannot be run) before anything starts: a sidecar started for
//!    nothing would spend a single-use join token.
//! 2. **Sidecar.** This same binary runs `tandem proxy ...
//!    --exit-on-stdin-close` with a pipe as its standard input: it drains
//!    and exits when the pipe closes, so it never outlives `tandem run`,
//!    even after `kill -9` (ARCHITECTURE.md, "Supervision through stdin").
//!    It runs in a process group of its own, so a terminal's Ctrl-C reaches
//!    the app (directly, and through us) while the sidecar keeps serving
//!    it. The join token travels in a file or the environment, never on a
//!    command line that `ps` shows. Free loopback ports are picked for the
//!    app, the HTTP proxy and the admin endpoint unless given; the app's
//!    stays held until the app starts.
//! 3. **Ready.** Its admin `GET /ready` is polled until it answers 200 (it
//!    has a certificate and its first snapshot), for `--ready-timeout` at
//!    most. A sidecar that exits first is reported with its status and the
//!    app is never started.
//! 4. **App.** Started only then, with `HTTP_PROXY` (and friends) pointing
//!    at the sidecar and `PORT` naming the port the sidecar sends inbound
//!    requests to. It is started through the hidden `tandem run-exec`,
//!    which asks the kernel to kill it should `tandem run` die (Linux's
//!    parent-death signal) and then becomes the command (same pid).
//! 5. **Watch.** SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are
//!    forwarded to the app (with `--exit-on-stdin-close`, stdin closing is
//!    a SIGTERM). Both outputs are relayed line by line, labelled: the
//!    app's as `[LABEL] line` (stdout to stdout, stderr to stderr), the
//!    sidecar's as `[LABEL proxy] line` on stderr.
//! 6. **Stop.** When the app exits, the sidecar's stdin is closed: it
//!    drains (`--drain-grace`) and exits, and `tandem run` exits with the
//!    app's code (128 + N for a death by signal N). When the sidecar exits
//!    first, the app is sent SIGTERM, SIGKILL after `--stop-grace`, and
//!    `tandem run` exits 1: an app never runs without its sidecar.

use std::ffi::{OsStr, OsString};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{parse_duration, parse_upstream, TraceArgs};

/// The sidecar died while the app ran (the app was stopped).
const EXIT_SIDECAR_DIED: u8 = 1;
/// `tandem run` could not start the app: bad arguments, a sidecar that
/// failed or was not ready in time.
const EXIT_FAILED: u8 = 2;
/// The command exists but cannot be executed (as shells say).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as shells say).
const EXIT_NOT_FOUND: u8 = 127;

/// How often the sidecar's readiness is asked for.
const READY_POLL: Duration = Duration::from_millis(50);
/// The longest line relayed whole; a longer one is cut in pieces.
const MAX_LINE: u64 = 64 * 1024;
/// How long the relays may take to pass on what the processes wrote
/// before they exited (a grandchild of the app may hold its pipes open).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct RunArgs {
    /// Service this instance belongs to.
    #[arg(long)]
    service: String,
    /// Name of this instance, unique within the service (default:
    /// SERVICE-HOST-PID).
    #[arg(long)]
    instance: Option<String>,
    #[arg(long, default_value = tandem_config::model::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Join token for this service (see `tandem token create`); handed to
    /// the sidecar in its environment.
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Trust bundle (PEM) for the sidecar to pin.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Control-plane gRPC URL; several replicas comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    control: String,
    /// Where other sidecars reach this instance (the sidecar's inbound
    /// listener).
    #[arg(long)]
    inbound: SocketAddr,
    /// Address registered for other sidecars, if not `--inbound`.
    #[arg(long)]
    advertise: Option<String>,
    /// The zone this instance runs in.
    #[arg(long, default_value = "")]
    zone: String,
    /// The loopback port the app listens on (given to it as PORT; default:
    /// a free one).
    #[arg(long)]
    app_port: Option<u16>,
    /// The sidecar's HTTP proxy address (given to the app as HTTP_PROXY;
    /// default: a free loopback port).
    #[arg(long)]
    http_proxy: Option<SocketAddr>,
    /// The sidecar's admin address (default: a free loopback port).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// An outbound port of the sidecar for one destination:
    /// SERVICE=LOCAL_ADDR (repeatable).
    #[arg(long, value_parser = parse_upstream)]
    upstream: Vec<(String, SocketAddr)>,
    /// Time the sidecar's in-flight requests get to finish once the app
    /// has exited.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_grace: Duration,
    /// How long the sidecar may take to become ready (a certificate and
    /// its first snapshot) before the app starts.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// When the sidecar dies, how long the app has to exit after SIGTERM
    /// before it is killed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stop_grace: Duration,
    /// The label of the output lines: `[LABEL] ...` for the app's,
    /// `[LABEL proxy] ...` for the sidecar's (default: the service).
    #[arg(long)]
    label: Option<String>,
    /// Intercept the app transparently (Linux, as root): it runs in a
    /// network namespace of its own whose TCP connections all go to the
    /// sidecar and whose DNS the sidecar answers, so it needs no proxy
    /// settings (docs/onboarding.md). It must listen on `0.0.0.0:$PORT`.
    #[arg(long)]
    transparent: bool,
    /// Run the app as this user (a name or a uid), with no capabilities
    /// and no way to gain any (`setpriv`). With --transparent, an app left
    /// as root could leave its namespace.
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    trace: TraceArgs,
    /// Stop (SIGTERM to the app) when standard input closes; the app's
    /// standard input is then empty. For supervisors such as `tandem up`.
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
    /// The app: `-- CMD ARGS...`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `tandem run-exec` (hidden): what `tandem run` starts the app with.
#[derive(clap::Args)]
pub struct ExecArgs {
    /// The pid of the `tandem run` this app belongs to.
    #[arg(long)]
    parent: i32,
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

/// Becomes the app: asks for SIGKILL when the parent (`tandem run`) dies,
/// then replaces this process with the command. Returns only on failure.
pub fn exec(a: ExecArgs) -> ExitCode {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("tandem run: cannot tie the app to tandem run: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    // `tandem run` died before the line above: nothing would stop the app.
    if nix::unistd::getppid().as_raw() != a.parent {
        eprintln!("tandem run: exited before its app started");
        return ExitCode::from(EXIT_FAILED);
    }
    let Some((cmd, args)) = a.command.split_first() else {
        return ExitCode::from(EXIT_FAILED);
    };
    let err = std::process::Command::new(cmd).args(args).exec();
    eprintln!("tandem run: cannot start {}: {err}", show(cmd));
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        EXIT_NOT_FOUND
    } else {
        EXIT_CANNOT_EXECUTE
    })
}

pub fn run(args: RunArgs) -> ExitCode {
    let output = Output::start();
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(supervise(args, &output));
            // A pending read of stdin must not keep the process alive.
            rt.shutdown_background();
            code
        }
        Err(e) => {
            eprintln!("tandem run: {e}");
            EXIT_FAILED
        }
    };
    output.finish();
    ExitCode::from(code)
}

/// Everything `tandem run` does, from the check to the exit code.
async fn supervise(a: RunArgs, out: &Output) -> u8 {
    // Handlers first: a signal from now on is ours to forward, not a death.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            out.say(format!("cannot handle signals: {e}")).await;
            return EXIT_FAILED;
        }
    };
    let stdin = stdin_closed(a.exit_on_stdin_close);
    tokio::pin!(stdin);
    let mut stdin_done = !a.exit_on_stdin_close;

    // 1. Check.
    let Some(program) = a.command.first() else {
        return EXIT_FAILED;
    };
    if let Err((code, why)) = find_program(program) {
        out.say(format!("cannot start {}: {why}", show(program)))
            .await;
        return code;
    }
    if a.token.is_none() && a.token_file.is_none() {
        out.say(format!(
            "a join token is needed: --token, --token-file or TANDEM_TOKEN (mint one with `tandem token create --service {}`)",
            a.service
        ))
        .await;
        return EXIT_FAILED;
    }
    if let Err(e) = a.trace.config() {
        out.say(format!("tracing: {e:#}")).await;
        return EXIT_FAILED;
    }
    let user = match a.user.as_deref().map(resolve_user).transpose() {
        Ok(u) => u,
        Err(e) => {
            out.say(format!("--user: {e:#}")).await;
            return EXIT_FAILED;
        }
    };
    if a.transparent && user.is_none() && nix::unistd::geteuid().is_root() {
        out.say(
            "the app runs as root: it could leave its network namespace (and the mesh); --user runs it without privileges".into(),
        )
        .await;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            out.say(format!("cannot find the tandem binary: {e}")).await;
            return EXIT_FAILED;
        }
    };
    let label = a.label.clone().unwrap_or_else(|| a.service.clone());
    let instance = a
        .instance
        .clone()
        .unwrap_or_else(|| default_instance(&a.service));

    // 2. Sidecar.
    let plan = match Plan::pick(&a) {
        Ok(p) => p,
        Err(e) => {
            out.say(format!("cannot pick free ports: {e}")).await;
            return EXIT_FAILED;
        }
    };
    let Plan {
        app,
        http_proxy,
        admin,
        mut sidecar_ports,
        mut app_ports,
    } = plan;
    // Held to the end: dropping it removes the namespace and the redirect.
    let jail = if a.transparent {
        let made = sidecar_ports
            .take()
            .map_err(anyhow::Error::from)
            .and_then(|port| {
                crate::transparent::Jail::create(std::process::id(), port.port())
                    .map(|j| (j, port.port()))
            });
        match made {
            Ok(j) => Some(j),
            Err(e) => {
                out.say(format!("--transparent: {e:#}")).await;
                return EXIT_FAILED;
            }
        }
    } else {
        None
    };
    // Where the sidecar reaches the app: in its namespace, when it has one.
    let app = match &jail {
        Some((j, _)) => SocketAddr::from((j.app_ip, app.port())),
        None => app,
    };
    sidecar_ports.release();
    let mut sidecar = match sidecar_command(&exe, &a, &instance, app, http_proxy, admin)
        .args(jail.as_ref().map_or_else(Vec::new, |(j, port)| {
            vec![
                "--transparent".to_string(),
                format!("{}:{port}", j.host_ip),
                "--dns".to_string(),
                format!("{}:53", j.host_ip),
            ]
        }))
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            out.say(format!("cannot start the sidecar: {e}")).await;
            return EXIT_FAILED;
        }
    };
    // Held here: `Child::wait` would close it (and the sidecar would stop).
    let mut sidecar_stdin = sidecar.stdin.take();
    let proxy_label = format!("[{label} proxy] ");
    // Its own, so that its last words come before ours when it dies.
    let mut sidecar_relays = Vec::new();
    if let Some(s) = sidecar.stdout.take() {
        sidecar_relays.push(relay(s, &proxy_label, out.err.clone()));
    }
    if let Some(s) = sidecar.stderr.take() {
        sidecar_relays.push(relay(s, &proxy_label, out.err.clone()));
    }

    // 3. Ready.
    let poll = async {
        while !ready(admin).await {
            tokio::time::sleep(READY_POLL).await;
        }
    };
    tokio::pin!(poll);
    let limit = tokio::time::sleep(a.ready_timeout);
    tokio::pin!(limit);
    let stopped_early = loop {
        tokio::select! {
            _ = &mut poll => break None,
            status = sidecar.wait() => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                flush(std::mem::take(&mut sidecar_relays)).await;
                out.say(format!(
                    "the sidecar exited before it was ready ({status}); {} was not started",
                    show(program)
                ))
                .await;
                break Some(EXIT_FAILED);
            }
            _ = &mut limit => {
                out.say(format!(
                    "the sidecar was not ready within {:?} (its output is above); stopping it",
                    a.ready_timeout
                ))
                .await;
                break Some(EXIT_FAILED);
            }
            // Only the ones that ask to stop: SIGUSR1/2 mean nothing yet.
            sig = signals.recv() => if !matches!(sig, Signal::SIGUSR1 | Signal::SIGUSR2) {
                out.say(format!("{sig} before the app started; stopping the sidecar")).await;
                break Some(signal_code(sig as i32));
            },
            _ = &mut stdin, if !stdin_done => {
                out.say("stdin closed before the app started; stopping the sidecar".into()).await;
                break Some(signal_code(Signal::SIGTERM as i32));
            }
        }
    };
    if let Some(code) = stopped_early {
        stop_sidecar(
            &mut sidecar,
            sidecar_stdin.take(),
            a.drain_grace,
            &mut signals,
        )
        .await;
        flush(sidecar_relays).await;
        return code;
    }

    // 4. App.
    app_ports.release();
    let mut app_proc = match app_command(
        &exe,
        &a,
        &instance,
        app,
        http_proxy,
        jail.as_ref().map(|(j, _)| j),
        user,
    )
    .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            out.say(format!("cannot start {}: {e}", show(program)))
                .await;
            stop_sidecar(
                &mut sidecar,
                sidecar_stdin.take(),
                a.drain_grace,
                &mut signals,
            )
            .await;
            flush(sidecar_relays).await;
            return EXIT_NOT_FOUND;
        }
    };
    let mut relays = Vec::new();
    let app_label = format!("[{label}] ");
    if let Some(s) = app_proc.stdout.take() {
        relays.push(relay(s, &app_label, out.out.clone()));
    }
    if let Some(s) = app_proc.stderr.take() {
        relays.push(relay(s, &app_label, out.err.clone()));
    }
    // Known until the app is reaped, which only `wait` below does: a
    // signal never reaches another process that took its pid.
    let app_pid = app_proc
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    out.say(format!(
        "sidecar ready (inbound {}, http proxy {http_proxy}, admin {admin}); started {} on port {}",
        a.inbound,
        show(program),
        app.port()
    ))
    .await;

    // 5. Watch.
    let first = loop {
        tokio::select! {
            biased;
            status = app_proc.wait() => break Ok(status),
            status = sidecar.wait() => break Err(status),
            sig = signals.recv() => send(app_pid, sig),
            _ = &mut stdin, if !stdin_done => {
                stdin_done = true;
                send(app_pid, Signal::SIGTERM);
            }
        }
    };

    // 6. Stop.
    let code = match first {
        Ok(Ok(status)) => {
            let code = exit_code(status);
            if let Some(s) = stop_sidecar(
                &mut sidecar,
                sidecar_stdin.take(),
                a.drain_grace,
                &mut signals,
            )
            .await
            {
                if !s.success() {
                    out.say(format!("the sidecar exited ({s}) while draining"))
                        .await;
                }
            }
            code
        }
        Ok(Err(e)) => {
            out.say(format!("lost track of the app ({e}); stopping it"))
                .await;
            stop_app(&mut app_proc, app_pid, a.stop_grace, &mut signals).await;
            stop_sidecar(
                &mut sidecar,
                sidecar_stdin.take(),
                a.drain_grace,
                &mut signals,
            )
            .await;
            EXIT_FAILED
        }
        Err(status) => {
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            flush(std::mem::take(&mut sidecar_relays)).await;
            out.say(format!(
                "the sidecar exited ({status}); stopping {}",
                a.service
            ))
            .await;
            stop_app(&mut app_proc, app_pid, a.stop_grace, &mut signals).await;
            EXIT_SIDECAR_DIED
        }
    };
    relays.append(&mut sidecar_relays);
    flush(relays).await;
    code
}

/// The addresses of the sidecar and the app; the free ports picked stay
/// held until the process that binds them starts.
struct Plan {
    app: SocketAddr,
    http_proxy: SocketAddr,
    admin: SocketAddr,
    sidecar_ports: Ports,
    app_ports: Ports,
}

impl Plan {
    fn pick(a: &RunArgs) -> std::io::Result<Plan> {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut given = vec![a.inbound];
        given.extend(a.http_proxy);
        given.extend(a.admin);
        given.extend(a.app_port.map(loopback));
        given.extend(a.upstream.iter().map(|(_, addr)| *addr));
        let mut sidecar_ports = Ports::new(&given);
        let mut app_ports = Ports::new(&given);
        Ok(Plan {
            http_proxy: a.http_proxy.map_or_else(|| sidecar_ports.take(), Ok)?,
            admin: a.admin.map_or_else(|| sidecar_ports.take(), Ok)?,
            app: a
                .app_port
                .map(loopback)
                .map_or_else(|| app_ports.take(), Ok)?,
            sidecar_ports,
            app_ports,
        })
    }
}

/// `tandem proxy` for this instance.
fn sidecar_command(
    exe: &Path,
    a: &RunArgs,
    instance: &str,
    app: SocketAddr,
    http_proxy: SocketAddr,
    admin: SocketAddr,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("proxy")
        .args(["--service", &a.service, "--instance", instance])
        .args(["--namespace", &a.namespace, "--control", &a.control])
        .args(["--inbound", &a.inbound.to_string()])
        .args(["--zone", &a.zone])
        .args(["--app", &app.to_string()])
        .args(["--http-proxy", &http_proxy.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--drain-grace", &millis(a.drain_grace)]);
    if let Some(adv) = &a.advertise {
        cmd.args(["--advertise", adv]);
    }
    for (name, addr) in &a.upstream {
        cmd.arg("--upstream").arg(format!("{name}={addr}"));
    }
    if let Some(b) = &a.ca_bundle {
        cmd.arg("--ca-bundle").arg(b);
    }
    cmd.args(trace_flags(&a.trace));
    // The token in a file or the environment: a command line is public.
    match (&a.token_file, &a.token) {
        (Some(f), _) => {
            cmd.arg("--token-file").arg(f).env_remove("TANDEM_TOKEN");
        }
        (None, Some(t)) => {
            cmd.env("TANDEM_TOKEN", t);
        }
        (None, None) => {}
    }
    cmd.arg("--exit-on-stdin-close")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Out of the terminal's process group: Ctrl-C is for the app; the
        // sidecar drains once the app is gone.
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// The app, through `tandem run-exec`, with the environment that points it
/// at its sidecar.
fn app_command(
    exe: &Path,
    a: &RunArgs,
    instance: &str,
    app: SocketAddr,
    http_proxy: SocketAddr,
    jail: Option<&crate::transparent::Jail>,
    user: Option<(u32, u32)>,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(["run-exec", "--parent", &std::process::id().to_string()])
        .arg("--");
    if let Some(j) = jail {
        // Inside its namespace, where everything goes through the sidecar
        // without any setting.
        cmd.args(j.exec_prefix());
    }
    if let Some((uid, gid)) = user {
        // A change of user clears the parent-death signal: setpriv sets it
        // again.
        cmd.args([
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &gid.to_string(),
        ])
        .args(["--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .args(["--no-new-privs", "--pdeathsig", "SIGKILL", "--"]);
    }
    cmd.args(&a.command);
    // An intercepted app needs no proxy setting.
    if jail.is_none() {
        let proxy = format!("http://{http_proxy}");
        for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
            cmd.env(var, &proxy);
        }
        for var in ["NO_PROXY", "no_proxy"] {
            cmd.env(var, "localhost,127.0.0.1,::1");
        }
    }
    cmd.env("PORT", app.port().to_string())
        .env("TANDEM_SERVICE", &a.service)
        .env("TANDEM_INSTANCE", instance)
        // The sidecar's secret, not the app's.
        .env_remove("TANDEM_TOKEN")
        .stdin(if a.exit_on_stdin_close {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The uid and gid of `--user` (a name, or a uid: its gid is the user's
/// group if it has an entry, else the same number).
fn resolve_user(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, user])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    match (id("-u"), id("-g"), user.parse::<u32>()) {
        (Some(u), Some(g), _) => Ok((u, g)),
        (_, _, Ok(n)) => Ok((n, n)),
        _ => anyhow::bail!("no user `{user}`"),
    }
}

/// The tracing settings as sidecar flags.
fn trace_flags(t: &TraceArgs) -> Vec<String> {
    let mut flags = Vec::new();
    for (flag, value) in [
        ("--otlp-endpoint", &t.otlp_endpoint),
        ("--otlp-traces-endpoint", &t.otlp_traces_endpoint),
        ("--trace-sampler-arg", &t.trace_sampler_arg),
    ] {
        if let Some(v) = value {
            flags.extend([flag.to_string(), v.clone()]);
        }
    }
    for (flag, value) in [
        ("--otlp-protocol", &t.otlp_protocol),
        ("--traces-exporter", &t.traces_exporter),
        ("--trace-sampler", &t.trace_sampler),
    ] {
        flags.extend([flag.to_string(), value.clone()]);
    }
    flags
}

/// A duration in the flags' grammar.
fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// SERVICE-HOST-PID, in the characters an instance name may have.
fn default_instance(service: &str) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = format!("{service}-{host}-{}", std::process::id())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    // ASCII only by now; the end (the pid) is what makes it unique.
    name[name.len().saturating_sub(128)..].to_string()
}

/// Where `program` would be executed from, as `execvp` looks: a path, or
/// the first executable file of that name on `PATH`. The error is the exit
/// code and the reason.
fn find_program(program: &OsStr) -> Result<PathBuf, (u8, String)> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return match std::fs::metadata(path) {
            Err(e) => Err((EXIT_NOT_FOUND, e.to_string())),
            Ok(_) if executable(path) => Ok(path.to_path_buf()),
            Ok(_) => Err((EXIT_CANNOT_EXECUTE, "not an executable file".into())),
        };
    }
    if program.is_empty() {
        return Err((EXIT_NOT_FOUND, "empty command".into()));
    }
    let dirs = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&dirs)
        .map(|d| d.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| (EXIT_NOT_FOUND, "command not found on PATH".into()))
}

/// A program name for messages.
fn show(program: &OsStr) -> String {
    format!("`{}`", program.to_string_lossy())
}

/// The code a shell would report for this status.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(EXIT_FAILED),
        (None, Some(sig)) => signal_code(sig),
        (None, None) => EXIT_FAILED,
    }
}

fn signal_code(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(255)
}

fn send(pid: Option<Pid>, sig: Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(pid, sig);
    }
}

/// Closes the sidecar's stdin: it drains and exits. Killed if it takes
/// longer than its grace period allows, or at a second Ctrl-C.
async fn stop_sidecar(
    sidecar: &mut Child,
    stdin: Option<ChildStdin>,
    drain_grace: Duration,
    signals: &mut Signals,
) -> Option<ExitStatus> {
    drop(stdin);
    // It first leaves the registry (up to the grace period), then drains.
    let limit = tokio::time::sleep(drain_grace * 2 + Duration::from_secs(5));
    tokio::pin!(limit);
    loop {
        tokio::select! {
            status = sidecar.wait() => return status.ok(),
            _ = &mut limit => break,
            sig = signals.recv() => if sig == Signal::SIGINT { break },
        }
    }
    let _ = sidecar.start_kill();
    sidecar.wait().await.ok()
}

/// SIGTERM to the app, SIGKILL after `grace`; signals received meanwhile
/// are still forwarded.
async fn stop_app(app: &mut Child, pid: Option<Pid>, grace: Duration, signals: &mut Signals) {
    send(pid, Signal::SIGTERM);
    let limit = tokio::time::sleep(grace);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            _ = app.wait() => return,
            _ = &mut limit => break,
            sig = signals.recv() => send(pid, sig),
        }
    }
    let _ = app.start_kill();
    let _ = app.wait().await;
}

/// The signals forwarded to the app.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.term.recv() => Signal::SIGTERM,
            Some(()) = self.int.recv() => Signal::SIGINT,
            Some(()) = self.hup.recv() => Signal::SIGHUP,
            Some(()) = self.quit.recv() => Signal::SIGQUIT,
            Some(()) = self.usr1.recv() => Signal::SIGUSR1,
            Some(()) = self.usr2.recv() => Signal::SIGUSR2,
            else => std::future::pending().await,
        }
    }
}

/// Resolves when stdin closes, if `enabled`; never otherwise.
async fn stdin_closed(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    let mut buf = [0u8; 64];
    let mut input = tokio::io::stdin();
    loop {
        match input.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Our stdout and stderr, each written by a thread of its own from a
/// bounded queue of whole lines: lines never interleave, a blocked
/// terminal or pipe never stalls signal forwarding, and a process that
/// writes faster than we can pass on waits on its pipe.
struct Output {
    out: mpsc::Sender<Vec<u8>>,
    err: mpsc::Sender<Vec<u8>>,
    writers: Vec<std::thread::JoinHandle<()>>,
}

impl Output {
    fn start() -> Output {
        fn writer(
            mut rx: mpsc::Receiver<Vec<u8>>,
            mut to: impl std::io::Write + Send + 'static,
        ) -> std::thread::JoinHandle<()> {
            std::thread::spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    // A closed stdout is not a reason to stop the app.
                    let _ = to.write_all(&line);
                    if rx.is_empty() {
                        let _ = to.flush();
                    }
                }
                let _ = to.flush();
            })
        }
        let (out, out_rx) = mpsc::channel(1024);
        let (err, err_rx) = mpsc::channel(1024);
        Output {
            out,
            err,
            writers: vec![
                writer(out_rx, std::io::stdout()),
                writer(err_rx, std::io::stderr()),
            ],
        }
    }

    /// A message of our own, on stderr.
    async fn say(&self, msg: String) {
        let _ = self
            .err
            .send(format!("tandem run: {msg}\n").into_bytes())
            .await;
    }

    /// Waits until every line queued has been written.
    fn finish(self) {
        drop(self.out);
        drop(self.err);
        for w in self.writers {
            let _ = w.join();
        }
    }
}

/// Passes `from` on to `to` line by line, each prefixed with `label`; a
/// last line without its newline gets one.
fn relay(
    from: impl AsyncRead + Unpin + Send + 'static,
    label: &str,
    to: mpsc::Sender<Vec<u8>>,
) -> JoinHandle<()> {
    let label = label.as_bytes().to_vec();
    tokio::spawn(async move {
        let mut from = tokio::io::BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match (&mut from).take(MAX_LINE).read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut line = Vec::with_capacity(label.len() + buf.len() + 1);
            line.extend_from_slice(&label);
            line.extend_from_slice(&buf);
            if !buf.ends_with(b"\n") {
                line.push(b'\n');
            }
            if to.send(line).await.is_err() {
                return;
            }
        }
    })
}

/// Waits (a little) for the relays to pass on what is left in the pipes.
async fn flush(relays: Vec<JoinHandle<()>>) {
    let deadline = tokio::time::Instant::now() + FLUSH_WAIT;
    for mut r in relays {
        if tokio::time::timeout_at(deadline, &mut r).await.is_err() {
            r.abort();
        }
    }
}

/// Hands out distinct free loopback ports: each stays bound (so the
/// kernel cannot hand it out twice) until `release` is called, just before
/// the process that binds it starts.
pub(crate) struct Ports {
    held: Vec<TcpListener>,
    /// Ports promised elsewhere (the control plane's, which it may not have
    /// bound yet): never handed out.
    avoid: Vec<u16>,
}

impl Ports {
    pub(crate) fn new(avoid: &[SocketAddr]) -> Self {
        Ports {
            held: Vec::new(),
            avoid: avoid.iter().map(SocketAddr::port).collect(),
        }
    }

    pub(crate) fn take(&mut self) -> std::io::Result<SocketAddr> {
        loop {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            // A refused port stays held, so the kernel offers another.
            let ok = !self.avoid.contains(&addr.port());
            self.held.push(l);
            if ok {
                return Ok(addr);
            }
        }
    }

    pub(crate) fn release(&mut self) {
        self.held.clear();
    }
}

/// Whether the sidecar with this admin address is ready: `GET /ready`
/// answers 200 once it has a certificate and its first snapshot.
pub(crate) async fn ready(admin: SocketAddr) -> bool {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_a_shells() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn programs_are_found_as_execvp_would() {
        assert!(find_program(OsStr::new("sh")).is_ok());
        assert_eq!(
            find_program(OsStr::new("no-such-command-here")).map_err(|e| e.0),
            Err(EXIT_NOT_FOUND)
        );
        assert_eq!(
            find_program(OsStr::new("/no/such/file")).map_err(|e| e.0),
            Err(EXIT_NOT_FOUND)
        );
        // A directory is there, but cannot be run.
        assert_eq!(
            find_program(OsStr::new("/")).map_err(|e| e.0),
            Err(EXIT_CANNOT_EXECUTE)
        );
    }

    #[test]
    fn instance_names_keep_to_the_allowed_characters() {
        let name = default_instance("web api");
        assert!(name.starts_with("web-api-"), "{name}");
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert!(default_instance(&"x".repeat(300)).len() <= 128);
    }
}
