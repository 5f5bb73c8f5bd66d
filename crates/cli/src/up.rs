//! `tandem up`: the whole demo mesh as child processes on loopback, with a
//! live view of its golden signals.
//!
//! The children are the control plane and, for each demo service, one
//! `tandem run` that starts the service's sidecar and then its demo app.
//! Every child gets a pipe as standard input and exits (gracefully) when it
//! closes, so no child outlives `tandem up` however it ends — Ctrl-C, a
//! crash, or `kill -9`.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::api;
use crate::run::{ready, Ports};

pub const DEMO_CONFIG: &str = include_str!("../demo-config/demo.yaml");

#[derive(clap::Args)]
pub struct UpArgs {
    /// Config directory to use instead of the built-in demo config.
    dir: Option<PathBuf>,
    /// Where config, data and logs go (announced at start).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Control-plane HTTP API address.
    #[arg(long, default_value = tandem_control::DEFAULT_API)]
    api: SocketAddr,
    /// Control-plane gRPC address.
    #[arg(long, default_value = tandem_control::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Requests per second the load generator sends.
    #[arg(long, default_value_t = 50.0)]
    rps: f64,
    /// Print the view as plain lines instead of redrawing the screen.
    #[arg(long)]
    plain: bool,
    /// Stop when standard input closes (for supervisors and tests).
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
    /// Write the built-in demo config into this directory and exit.
    #[arg(long, value_name = "DIR")]
    write_config: Option<PathBuf>,
}

/// One demo service: its app flags and which services it calls.
struct DemoService {
    service: &'static str,
    version: &'static str,
    calls: &'static [&'static str],
    latency: &'static str,
    failure_rate: f64,
    load: bool,
}

const SERVICES: &[DemoService] = &[
    DemoService {
        service: "web",
        version: "v1",
        calls: &["catalog", "orders"],
        latency: "1ms",
        failure_rate: 0.0,
        load: false,
    },
    DemoService {
        service: "catalog-v1",
        version: "v1",
        calls: &[],
        latency: "2ms",
        failure_rate: 0.0,
        load: false,
    },
    DemoService {
        service: "catalog-v2",
        version: "v2",
        calls: &[],
        latency: "3ms",
        failure_rate: 0.0,
        load: false,
    },
    DemoService {
        service: "orders",
        version: "v1",
        calls: &["POST payments/charge"],
        latency: "2ms",
        failure_rate: 0.0,
        load: false,
    },
    DemoService {
        service: "payments",
        version: "v1",
        calls: &[],
        latency: "4ms",
        failure_rate: 0.03,
        load: false,
    },
    DemoService {
        service: "loadgen",
        version: "v1",
        calls: &["web"],
        latency: "0ms",
        failure_rate: 0.0,
        load: true,
    },
];

struct Proc {
    name: String,
    child: Child,
    exited: bool,
}

/// Where `tandem up` keeps its state unless told otherwise (the CLI looks
/// for the demo control plane's admin credential there).
pub fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("tandem-up")
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.write_config {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("demo.yaml");
        std::fs::write(&path, DEMO_CONFIG)?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(up(args))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let state = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let config_dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let d = state.join("config");
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("demo.yaml"), DEMO_CONFIG)?;
            d
        }
    };
    if let Err(diags) = tandem_config::load_dir(&config_dir) {
        for d in &diags {
            eprintln!("{d}");
        }
        anyhow::bail!("{} has {} problem(s)", config_dir.display(), diags.len());
    }
    for (what, addr) in [("API", args.api), ("gRPC", args.listen)] {
        TcpListener::bind(addr).with_context(|| {
            format!("{addr} ({what}) is in use: is another `tandem up` or `tandem control` running? (see --api / --listen)")
        })?;
    }
    let exe = std::env::current_exe().context("cannot find the tandem binary")?;
    println!("tandem up: state directory {}", state.display());
    println!(
        "  config:  {} (edit it; the mesh follows)",
        config_dir.display()
    );
    println!("  logs:    {}", logs.display());

    let mut procs: Vec<Proc> = Vec::new();
    let result = start_all(&args, &exe, &state, &config_dir, &logs, &mut procs).await;
    if let Err(e) = result {
        stop_all(&mut procs).await;
        return Err(e);
    }
    println!();
    // The CLI finds the admin credential in the default state directory
    // by itself; elsewhere it must be told.
    let data_flag = if args.state_dir.is_some() {
        format!(" --data {}", state.join("data").display())
    } else {
        String::new()
    };
    let api_flag = if args.api.to_string() != tandem_control::DEFAULT_API {
        format!(" --api {}", args.api)
    } else {
        String::new()
    };
    let traced = trace_flags();
    if let Some(i) = traced
        .iter()
        .position(|f| f == "--otlp-endpoint" || f == "--otlp-traces-endpoint")
    {
        println!(
            "  traces:  every sidecar exports spans to {} (OTEL_* variables)",
            traced[i + 1]
        );
    }
    let mut scrape = crate::prometheus::Scrape::create(&state)?;
    println!(
        "  metrics: prometheus --config.file={}  (finds every sidecar as they come and go)",
        scrape.config_file().display()
    );
    if let Ok(url) =
        api::Target::local(args.api, &state.join("data")).and_then(|t| t.dashboard_url())
    {
        println!("  dashboard: {url}");
    }
    println!("  from another terminal:  tandem stat{api_flag}{data_flag}    tandem status{api_flag}{data_flag}");
    println!("  Ctrl-C stops everything.");
    println!();

    let header = format!(
        "config: {}  (edit it; the mesh follows)\nlogs:   {}\n",
        config_dir.display(),
        logs.display()
    );
    let outcome = watch(&args, &header, &state.join("data"), &mut procs, &mut scrape).await;
    stop_all(&mut procs).await;
    println!("tandem up: stopped all {} processes", procs.len());
    outcome
}

/// OpenTelemetry's variables and the sidecar flags that say the same.
const OTEL_VARS: [(&str, &str); 6] = [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "--otlp-endpoint"),
    (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "--otlp-traces-endpoint",
    ),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "--otlp-protocol"),
    ("OTEL_TRACES_EXPORTER", "--traces-exporter"),
    ("OTEL_TRACES_SAMPLER", "--trace-sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "--trace-sampler-arg"),
];

/// The tracing settings of `tandem up`'s environment, as flags of `tandem
/// run`, which hands them to its sidecar: every demo sidecar gets them (and
/// no other child sees the variables).
fn trace_flags() -> Vec<String> {
    OTEL_VARS
        .iter()
        .filter_map(|(var, flag)| {
            let v = std::env::var(var).ok().filter(|v| !v.trim().is_empty())?;
            Some([flag.to_string(), v])
        })
        .flatten()
        .collect()
}

/// Starts `exe ARGS` (which must say `--exit-on-stdin-close`), its output
/// to `logs/NAME.log`.
fn spawn(
    exe: &Path,
    name: &str,
    args: &[String],
    logs: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(exe);
    for (var, _) in OTEL_VARS {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    procs.push(Proc {
        name: name.to_string(),
        child,
        exited: false,
    });
    Ok(())
}

async fn start_all(
    args: &UpArgs,
    exe: &Path,
    state: &Path,
    config_dir: &Path,
    logs: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let s = |x: &dyn ToString| x.to_string();
    // The CA is created here (the control plane opens the same one) so that
    // each demo sidecar gets a join token for its service.
    let data = state.join("data");
    let kv = tandem_store::LocalDir::open(&data)
        .with_context(|| format!("data directory {}", data.display()))?;
    // A state directory from an older release may have an open `ca/`;
    // the control plane refuses that, and this one is ours to fix.
    let ca_dir = data.join("ca");
    if ca_dir.is_dir() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let ca = tandem_identity::ca::Authority::open(&kv, None, None)
        .await
        .with_context(|| format!("certificate authority in {}", data.display()))?;
    let tokens = state.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    spawn(
        exe,
        "control",
        &[
            s(&"control"),
            s(&"--config"),
            config_dir.display().to_string(),
            s(&"--data"),
            state.join("data").display().to_string(),
            s(&"--listen"),
            s(&args.listen),
            s(&"--api"),
            s(&args.api),
            s(&"--exit-on-stdin-close"),
        ],
        logs,
        procs,
    )?;
    let control = format!("http://{}", args.listen);
    let mut admins = Vec::new();
    let mut ports = Ports::new(&[args.api, args.listen]);
    let mut plan = Vec::new();
    for _ in SERVICES {
        plan.push((ports.take()?, ports.take()?, ports.take()?, ports.take()?));
    }
    ports.release();
    for (svc, (inbound, app, admin, proxy)) in SERVICES.iter().zip(plan) {
        let instance = format!("{}-1", svc.service);
        // Single-use: each sidecar spends its token on its first
        // certificate and renews with that certificate afterwards.
        let (_, token) = ca.mint_token(
            tandem_config::model::DEFAULT_NAMESPACE,
            svc.service,
            Duration::from_secs(3600),
            false,
        )?;
        let token_file = tokens.join(format!("{}.token", svc.service));
        write_secret(&token_file, &token)?;
        // `tandem run` starts the sidecar, and the app once the sidecar is
        // ready; both write to the service's log, labelled.
        let mut r = vec![
            s(&"run"),
            s(&"--service"),
            s(&svc.service),
            s(&"--instance"),
            instance,
            s(&"--token-file"),
            token_file.display().to_string(),
            s(&"--control"),
            control.clone(),
            s(&"--inbound"),
            s(&inbound),
            s(&"--app-port"),
            s(&app.port()),
            s(&"--http-proxy"),
            s(&proxy),
            s(&"--admin"),
            s(&admin),
            s(&"--drain-grace"),
            s(&"2s"),
        ];
        r.extend(trace_flags());
        // The app finds its port and its sidecar in PORT and HTTP_PROXY.
        r.extend([
            s(&"--exit-on-stdin-close"),
            s(&"--"),
            exe.display().to_string(),
            s(&"demo-app"),
            s(&"--service"),
            s(&svc.service),
            s(&"--version"),
            s(&svc.version),
            s(&"--latency"),
            s(&svc.latency),
            s(&"--failure-rate"),
            s(&svc.failure_rate),
        ]);
        for c in svc.calls {
            r.push(s(&"--call"));
            r.push(s(c));
        }
        if svc.load {
            r.push(s(&"--rps"));
            r.push(s(&args.rps));
        }
        spawn(exe, svc.service, &r, logs, procs)?;
        admins.push((svc.service, admin));
        println!(
            "  {:<11} app {app}  sidecar inbound {inbound}  http proxy {proxy}  admin {admin}",
            svc.service
        );
    }
    // Ready when every sidecar has its first snapshot.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (name, admin) in admins {
        loop {
            if ready(admin).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the {name} sidecar did not become ready in 30s; see {}",
                    logs.display()
                );
            }
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    anyhow::bail!(
                        "{} exited during start-up ({status}); see {}/{}.log",
                        p.name,
                        logs.display(),
                        p.name
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Shows the live view until Ctrl-C / SIGTERM. A child that dies is
/// reported; the rest keep running.
async fn watch(
    args: &UpArgs,
    header: &str,
    data: &Path,
    procs: &mut [Proc],
    scrape: &mut crate::prometheus::Scrape,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let tty = !args.plain && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut notes: Vec<String> = Vec::new();
    let stdin_closed = async {
        if !args.exit_on_stdin_close {
            return std::future::pending().await;
        }
        let mut buf = [0u8; 64];
        let mut input = tokio::io::stdin();
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut input, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::pin!(stdin_closed);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stdin_closed => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
        }
        for p in procs.iter_mut().filter(|p| !p.exited) {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.exited = true;
                notes.push(format!(
                    "{} exited ({status}); the others keep running",
                    p.name
                ));
            }
        }
        let target = api::Target::local(args.api, data);
        if let Ok(t) = &target {
            if let Ok(proxies) = api::get_json(t, "/api/v1/proxies").await {
                if let Err(e) = scrape.update(&proxies) {
                    notes.push(format!("{e:#}"));
                }
            }
        }
        let stats = match &target {
            Ok(t) => api::fetch_stats(t, Duration::from_secs(10)).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        let table = match stats {
            Ok(rows) => api::stat_table(&rows),
            Err(e) => format!("(no stats: {e:#})\n"),
        };
        let rollouts: Vec<tandem_control::rollout::View> = match &target {
            Ok(t) => api::get_json(t, "/api/v1/rollouts")
                .await
                .ok()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\x1b[2J\x1b[H");
            let _ = writeln!(out, "tandem up — golden signals, last 10s (Ctrl-C to stop; `tandem stat`, `tandem status` in another terminal)");
            let _ = writeln!(out, "{header}");
        } else {
            let _ = writeln!(out, "--- golden signals, last 10s");
        }
        let _ = write!(out, "{table}");
        for r in &rollouts {
            let _ = writeln!(out, "rollout {}", crate::rollout::summary(r));
        }
        for n in &notes {
            let _ = writeln!(out, "! {n}");
        }
        let _ = out.flush();
    }
}

/// Closes every child's stdin (they drain and exit), then kills stragglers.
async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        drop(p.child.stdin.take());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, p.child.wait()).await.is_err() {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
