//! `tandem`: one binary for the whole mesh — control plane, sidecar proxy,
//! demo app, the embedded demo (`tandem up`) and the read commands.
#![forbid(unsafe_code)]

mod api;
mod apply;
mod authz;
mod explain;
mod identity;
mod prometheus;
mod rollout;
mod run;
mod tap;
mod top;
mod transparent;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem service mesh: sidecar proxies and the control plane that configures them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the embedded demo mesh: control plane, demo services with their
    /// sidecars and a load generator, with a live view of golden signals.
    Up(up::UpArgs),
    /// Run the control plane.
    Control {
        /// Directory of YAML config files, watched for changes. Without it
        /// (replicas sharing etcd), config is pushed with `tandem apply`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Directory for state that must survive a restart.
        #[arg(long)]
        data: PathBuf,
        /// gRPC address proxies connect to.
        #[arg(long, default_value = tandem_control::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// HTTP API address (used by `tandem stat` and `tandem status`).
        #[arg(long, default_value = tandem_control::DEFAULT_API)]
        api: SocketAddr,
        /// A host name the API may be reached by (repeatable). IP addresses
        /// and `localhost` always are; any other `Host` is refused.
        #[arg(long)]
        api_host: Vec<String>,
        /// How long a disconnected proxy stays an endpoint.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        grace: Duration,
        /// How often proxies report their traffic over the control stream
        /// (`tandem stat`, rollouts); at least 100ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration, alias = "scrape-interval")]
        report_interval: Duration,
        /// After a restart, how long proxies that already run a config keep
        /// it while they reconnect, before snapshots are recomputed for them.
        #[arg(long, default_value = "6s", value_parser = parse_duration)]
        warmup: Duration,
        /// SPIFFE trust domain of the mesh (fixed when the CA is created).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Lifetime of the certificates issued to proxies (at most 7d, and
        /// never past the signing root's own end).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_lifetime: Duration,
        /// Accept peer certificates that chain to the trust bundle through
        /// intermediate CAs (refused by default).
        #[arg(long)]
        allow_intermediates: bool,
        /// Use this root CA certificate (PEM) instead of generating one.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The private key (PEM) of --ca-cert.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Where the mesh's state lives: the data directory (default), or
        /// etcd shared by several replicas:
        /// `etcd://host:port[,host:port...][/prefix]`.
        #[arg(long)]
        store: Option<String>,
        /// TLS towards etcd: the CA that signed its members' certificates.
        #[arg(long, requires = "store")]
        etcd_ca: Option<PathBuf>,
        /// TLS towards etcd: this replica's client certificate (PEM).
        #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// TLS towards etcd: the key of --etcd-cert (PEM).
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// This replica's name among those sharing the store (default: the
        /// host name and the gRPC port).
        #[arg(long)]
        name: Option<String>,
        /// The gRPC address other hosts reach this replica at, as the
        /// replica directory shows it (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// The name of this control plane's cluster, as other clusters'
        /// RemoteCluster resources name it.
        #[arg(long, default_value = "default")]
        cluster: String,
        /// A local file with the key (64 hex digits, `openssl rand -hex
        /// 32`) that seals the CA's private keys in the store: etcd and its
        /// backups then hold only ciphertext. Every replica needs it.
        #[arg(long)]
        seal_key: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Join tokens: what lets a proxy obtain certificates for one service.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The certificate authority: show it, rotate its root.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a sidecar proxy for one service instance.
    Proxy(Box<ProxyArgs>),
    /// Run an app with its sidecar: the sidecar starts first, the app
    /// (`-- CMD ARGS...`) once the sidecar is ready, with HTTP_PROXY and PORT
    /// pointing at it. Signals go to the app; the two stop together, and the
    /// app's exit code is returned.
    Run(Box<run::RunArgs>),
    /// How `tandem run` starts its app (internal).
    #[command(hide = true)]
    RunExec(run::ExecArgs),
    /// Check a config directory; print every problem as `file:line:col: message`.
    Validate { dir: PathBuf },
    /// Push a config directory to control-plane replicas that share a
    /// store (`tandem control --store etcd://...` without --config); it is
    /// checked first, and applied by every replica at once.
    Apply {
        dir: PathBuf,
        #[command(flatten)]
        api: api::ApiArgs,
    },
    /// Access policy: check a request, list who may reach a service
    /// (offline, from a config directory).
    #[command(subcommand)]
    Authz(authz::AuthzCommand),
    /// What the mesh would do with one request from a service: the rule,
    /// backends and weights, filters, mirror and faults, timeouts,
    /// retries, rate limit and the access verdict with its rule.
    Explain(Box<explain::ExplainArgs>),
    /// Golden signals per (source, destination) service pair.
    Stat {
        #[command(flatten)]
        api: api::ApiArgs,
        /// Window the figures cover.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        window: Duration,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A live table of the busiest service pairs and routes.
    Top(Box<top::TopArgs>),
    /// The address of the web dashboard, with its login token.
    Dashboard {
        #[command(flatten)]
        api: api::ApiArgs,
    },
    /// A live stream of the requests a service's sidecars handle.
    Tap(Box<tap::TapArgs>),
    /// Every proxy known to the control plane and the config version it runs.
    Status {
        #[command(flatten)]
        api: api::ApiArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Progressive delivery: a Rollout's step, signals and history;
    /// pause, resume, abort, promote.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// The sample service used by the demo and the tests.
    DemoApp(Box<DemoArgs>),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a join token for one service (offline, with the control plane's
    /// data directory). Prints the token on stdout.
    Create {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = tandem_config::model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// How long the token may be used to bootstrap a proxy.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// Let any number of proxies bootstrap with the token until it
        /// expires (at most 24h). By default a token is single-use: it
        /// certifies one proxy's key, once.
        #[arg(long)]
        reusable: bool,
        #[command(flatten)]
        store: identity::StoreArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Revoke a token by id: proxies using it can no longer register or renew.
    Revoke {
        id: String,
        #[command(flatten)]
        store: identity::StoreArgs,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Trust domain, roots in the bundle, the signing root, rotation phase.
    Show {
        #[command(flatten)]
        api: api::ApiArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Introduce a new root: it joins the trust bundle, then signs once
    /// every proxy knows it; proxies renew under it.
    Rotate {
        #[command(flatten)]
        api: api::ApiArgs,
        /// Return once the rotation started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove every root but the signing one from the trust bundle.
    Retire {
        #[command(flatten)]
        api: api::ApiArgs,
        /// Retire even if some proxy still uses a certificate the old root signed.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Exit (gracefully) when standard input closes; `tandem up` uses this so
    /// that no child outlives it.
    #[arg(long, hide = true)]
    exit_on_stdin_close: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Control-plane gRPC URL; several replicas comma-separated
    /// (`http://cp1:7700,http://cp2:7700`), or a host name with several
    /// addresses. The proxy moves to another replica when its own stops
    /// answering.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    control: String,
    /// Service this instance belongs to.
    #[arg(long)]
    service: String,
    /// Name of this instance (unique within the service).
    #[arg(long)]
    instance: String,
    #[arg(long, default_value = tandem_config::model::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Where other sidecars reach this service.
    #[arg(long)]
    inbound: SocketAddr,
    /// Address registered for other sidecars, if not `--inbound`.
    #[arg(long)]
    advertise: Option<String>,
    /// The zone this instance runs in: callers prefer endpoints of their
    /// own zone, then of their cluster, then other clusters.
    #[arg(long, default_value = "")]
    zone: String,
    /// The local application.
    #[arg(long)]
    app: SocketAddr,
    /// Admin endpoint: /metrics, /ready, /live, /config.
    #[arg(long, default_value = "127.0.0.1:4191")]
    admin: SocketAddr,
    /// Outbound HTTP proxy port (destination from Host / authority).
    #[arg(long)]
    http_proxy: Option<SocketAddr>,
    /// Where the app's connections arrive when the kernel redirects them
    /// (`tandem run --transparent` sets this up).
    #[arg(long)]
    transparent: Option<SocketAddr>,
    /// Answer the app's DNS queries here (UDP): mesh names get addresses
    /// that the transparent listener recognizes; the rest is asked of
    /// this host's resolver.
    #[arg(long, requires = "transparent")]
    dns: Option<SocketAddr>,
    /// Outbound port for one destination: SERVICE=LOCAL_ADDR (repeatable).
    #[arg(long, value_parser = parse_upstream)]
    upstream: Vec<(String, SocketAddr)>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_grace: Duration,
    /// Most connections open at once on the inbound and outbound listeners;
    /// more are closed at once.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Most requests in progress at once; more are answered 503
    /// (`tandem-error: overloaded`).
    #[arg(long, default_value_t = 10_000)]
    max_requests: usize,
    /// Join token for this service (see `tandem token create`).
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Trust bundle (PEM) to pin; without it the bundle is learned from the
    /// control plane and authenticated by the token.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    #[command(flatten)]
    trace: TraceArgs,
    /// Write an access log: one JSON line per request, to this file (`-`:
    /// standard output). Off by default.
    #[arg(long, env = "TANDEM_ACCESS_LOG")]
    access_log: Option<PathBuf>,
    /// The share of requests the access log shows (0 to 1).
    #[arg(long, default_value_t = 1.0)]
    access_log_sample: f64,
    /// What of the path a line shows: `query` (the path, query values
    /// redacted), `path` (none of it) or `none` (all of it).
    #[arg(long, default_value = "query", value_parser = parse_redact)]
    access_log_redact: tandem_proxy::Redact,
    #[command(flatten)]
    common: Common,
}

fn parse_redact(s: &str) -> Result<tandem_proxy::Redact, String> {
    match s {
        "query" => Ok(tandem_proxy::Redact::Query),
        "path" => Ok(tandem_proxy::Redact::Path),
        "none" => Ok(tandem_proxy::Redact::None),
        other => Err(format!("`{other}`: use query, path or none")),
    }
}

/// Distributed tracing, with OpenTelemetry's own variables.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TraceArgs {
    /// The OTLP collector spans are sent to (gRPC: its address; HTTP: the
    /// base URL, `/v1/traces` is added). Without one no spans are made.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The collector's traces URL, used as it is (over HTTP).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "http/protobuf"
    )]
    otlp_protocol: String,
    /// `otlp`, or `none` to make no spans.
    #[arg(long, env = "OTEL_TRACES_EXPORTER", default_value = "otlp")]
    traces_exporter: String,
    /// `parentbased_always_on`, `parentbased_traceidratio`, `always_on`,
    /// `always_off`, `traceidratio` or `parentbased_always_off`.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    trace_sampler: String,
    /// The sampler's ratio (0 to 1; default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    trace_sampler_arg: Option<String>,
}

impl TraceArgs {
    fn config(&self) -> anyhow::Result<tandem_proxy::TraceConfig> {
        let protocol = match self.otlp_protocol.trim() {
            "grpc" => tandem_proxy::OtlpProtocol::Grpc,
            "http/protobuf" => tandem_proxy::OtlpProtocol::HttpProtobuf,
            other => {
                anyhow::bail!("OTLP protocol `{other}` is not supported: use grpc or http/protobuf")
            }
        };
        let sampler =
            tandem_proxy::Sampler::parse(&self.trace_sampler, self.trace_sampler_arg.as_deref())
                .map_err(anyhow::Error::msg)?;
        let on = match self.traces_exporter.trim() {
            "otlp" => true,
            "none" => false,
            other => anyhow::bail!("traces exporter `{other}` is not supported: use otlp or none"),
        };
        let set = |v: &Option<String>| v.clone().filter(|s| on && !s.trim().is_empty());
        Ok(tandem_proxy::TraceConfig {
            endpoint: set(&self.otlp_endpoint),
            traces_endpoint: set(&self.otlp_traces_endpoint),
            protocol,
            sampler,
        })
    }
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Address to serve on (default: 127.0.0.1:$PORT, the port `tandem run`
    /// gives its app).
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long, env = "TANDEM_SERVICE")]
    service: String,
    #[arg(long, default_value = "v1")]
    version: String,
    /// Default: TANDEM_INSTANCE (set by `tandem run`), else SERVICE-VERSION.
    #[arg(long, env = "TANDEM_INSTANCE")]
    instance: Option<String>,
    /// Service to call on every request, `[METHOD ]NAME[/PATH]` (`GET /`
    /// by default; repeatable).
    #[arg(long)]
    call: Vec<String>,
    /// The sidecar's HTTP proxy port, used for calls (default: the address
    /// of HTTP_PROXY, `http://IP:PORT`, as `tandem run` sets it).
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// Latency added to every answer.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    latency: Duration,
    /// Fraction of requests answered with 500 (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Send this many requests per second to each `--call` target.
    #[arg(long, default_value_t = 0.0)]
    rps: f64,
    /// Also run a raw TCP echo server here.
    #[arg(long)]
    tcp_echo: Option<SocketAddr>,
    #[command(flatten)]
    common: Common,
}

/// The demo app's address: `--listen`, else 127.0.0.1:$PORT (what
/// `tandem run` gives its app).
fn demo_listen(listen: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = listen {
        return Ok(a);
    }
    match std::env::var("PORT") {
        Ok(p) => {
            let port: u16 = p
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT=`{p}` is not a port number"))?;
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        }
        Err(_) => anyhow::bail!(
            "--listen ADDR is needed (or PORT in the environment, as `tandem run` sets it)"
        ),
    }
}

/// The demo app's sidecar: `--proxy`, else the address of HTTP_PROXY
/// (`http://127.0.0.1:NNNN`, as `tandem run` sets it). An HTTP_PROXY that
/// names no address (a proxy by host name) is refused when the app has
/// calls to make, and ignored otherwise.
fn demo_proxy(proxy: Option<SocketAddr>, calls: bool) -> anyhow::Result<Option<SocketAddr>> {
    if proxy.is_some() {
        return Ok(proxy);
    }
    let Some(url) = ["HTTP_PROXY", "http_proxy"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
    else {
        return Ok(None);
    };
    match proxy_addr(&url) {
        Some(a) => Ok(Some(a)),
        None if calls => anyhow::bail!(
            "HTTP_PROXY=`{url}` is not `http://IP:PORT`: give the sidecar's address with --proxy"
        ),
        None => Ok(None),
    }
}

/// `http://127.0.0.1:4140` (or `http://127.0.0.1:4140/`) as an address.
fn proxy_addr(url: &str) -> Option<SocketAddr> {
    let url = url.trim();
    let rest = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])
        .unwrap_or(url);
    rest.trim_end_matches('/').parse().ok()
}

fn parse_upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s.split_once('=').ok_or("expected SERVICE=ADDR")?;
    let addr = addr.parse().map_err(|e| format!("`{addr}`: {e}"))?;
    if name.is_empty() {
        return Err("empty service name".into());
    }
    Ok((name.to_string(), addr))
}

/// Every duration flag takes the config's grammar (`250ms`, `2s`, `1m30s`).
use tandem_config::duration::parse as parse_duration;

/// The join token and, if given, the pinned trust bundle of `tandem proxy`.
type Credentials = (
    String,
    Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
);

fn proxy_credentials(a: &ProxyArgs) -> anyhow::Result<Credentials> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!(
            "a join token is needed: --token, --token-file or TANDEM_TOKEN (mint one with `tandem token create --service {}`)",
            a.service
        ),
    };
    let bundle = match &a.ca_bundle {
        Some(f) => {
            let pem = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
            let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: not PEM certificates", f.display()))?;
            if roots.is_empty() {
                anyhow::bail!("{}: no certificate in it", f.display());
            }
            Some(roots)
        }
        None => None,
    };
    Ok((token, bundle))
}

/// Logs to stderr at the levels `RUST_LOG` names (`info` by default):
/// a level, and levels per module (`warn,tandem_proxy=debug`). The
/// `Targets` filter parses that without compiling regular expressions, so
/// a sidecar starts with less code and memory; a `RUST_LOG` it cannot
/// parse is reported and `info` used.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = match spec.trim() {
        "" => (tracing_subscriber::filter::Targets::new(), None),
        s => match s.parse::<tracing_subscriber::filter::Targets>() {
            Ok(t) => (t, None),
            Err(e) => (tracing_subscriber::filter::Targets::new(), Some(e)),
        },
    };
    let filter = if spec.trim().is_empty() || bad.is_some() {
        filter.with_default(tracing::Level::INFO)
    } else {
        filter
    };
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .try_init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, "RUST_LOG `{spec}` does not parse; logging at info");
    }
}

/// Runs `f` on a runtime of `threads` worker threads; with one, every task
/// runs on the calling thread (tokio's current-thread scheduler: no
/// cross-thread wake-ups or work-stealing bookkeeping on the request path).
/// The runtime is shut down without waiting for blocking work (a pending
/// read of stdin would otherwise keep the process alive after it has
/// finished).
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    threads: usize,
    f: F,
) -> anyhow::Result<()> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let r = rt.block_on(f);
    rt.shutdown_background();
    r
}

/// Resolves on SIGINT, SIGTERM, or (if asked) when stdin closes.
async fn shutdown_signal(stdin: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let stdin_closed = async {
        if !stdin {
            return std::future::pending().await;
        }
        let mut buf = [0u8; 64];
        let mut input = tokio::io::stdin();
        loop {
            match tokio::io::AsyncReadExt::read(&mut input, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = stdin_closed => {}
    }
}

/// jemalloc, with its background thread: freed memory goes back to the
/// system within seconds (dirty pages decay over 10 s). With glibc's
/// allocator a sidecar kept the peak a burst of stalled clients had
/// caused; see bench/RESULTS.md, "Memory under stalled clients".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Apply { dir, api } => apply::apply(&dir, &api),
        Command::Up(args) => up::run(args),
        Command::Control {
            config,
            data,
            listen,
            api,
            api_host,
            grace,
            report_interval,
            warmup,
            trust_domain,
            cert_lifetime,
            allow_intermediates,
            ca_cert,
            ca_key,
            store,
            etcd_ca,
            etcd_cert,
            etcd_key,
            name,
            advertise,
            cluster,
            seal_key,
            common,
        } => {
            init_logging();
            let store = match store.as_deref() {
                None | Some("local") => tandem_control::store::StoreConfig::Local,
                Some(url) => match url.parse() {
                    Ok(url) => tandem_control::store::StoreConfig::Etcd {
                        url,
                        tls: etcd_ca.map(|ca| tandem_store::etcd::EtcdTls {
                            ca,
                            cert: etcd_cert,
                            key: etcd_key,
                        }),
                    },
                    Err(e) => {
                        eprintln!("tandem: --store: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let cfg = tandem_control::ControlConfig {
                config_dir: config,
                data_dir: data,
                listen,
                api,
                grace,
                report_interval,
                warmup,
                trust_domain,
                cert_lifetime,
                ca_import: ca_cert.zip(ca_key),
                api_hosts: api_host,
                allow_intermediates,
                store,
                name,
                advertise,
                cluster,
                seal_key,
            };
            block_on(
                common.threads.max(2),
                tandem_control::run(cfg, shutdown_signal(common.exit_on_stdin_close)),
            )
        }
        Command::Proxy(a) => {
            init_logging();
            let (token, ca_bundle) = match proxy_credentials(&a) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tandem: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let trace = match a.trace.config() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("tandem: tracing: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let cfg = tandem_proxy::ProxyConfig {
                token,
                ca_bundle,
                control: a.control,
                namespace: a.namespace,
                service: a.service,
                instance: a.instance,
                inbound: a.inbound,
                advertise: a.advertise,
                zone: a.zone,
                app: a.app,
                admin: a.admin,
                http_proxy: a.http_proxy,
                upstreams: a.upstream,
                transparent: a.transparent,
                dns: a.dns,
                drain_grace: a.drain_grace,
                max_connections: a.max_connections,
                max_requests: a.max_requests,
                trace,
                access_log: tandem_proxy::AccessLogConfig {
                    path: a.access_log,
                    sample: a.access_log_sample,
                    redact: a.access_log_redact,
                },
            };
            block_on(
                a.common.threads,
                tandem_proxy::run(cfg, shutdown_signal(a.common.exit_on_stdin_close)),
            )
        }
        Command::Run(a) => return run::run(*a),
        Command::RunExec(a) => return run::exec(a),
        Command::DemoApp(a) => {
            init_logging();
            let addrs = demo_listen(a.listen)
                .and_then(|l| Ok((l, demo_proxy(a.proxy, !a.call.is_empty())?)));
            let (listen, proxy) = match addrs {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("tandem: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let cfg = tandem_demo::DemoConfig {
                instance: a
                    .instance
                    .unwrap_or_else(|| format!("{}-{}", a.service, a.version)),
                listen,
                service: a.service,
                version: a.version,
                calls: a.call,
                proxy,
                latency: a.latency,
                failure_rate: a.failure_rate.clamp(0.0, 1.0),
                rps: a.rps.max(0.0),
                tcp_echo: a.tcp_echo,
            };
            block_on(
                a.common.threads,
                tandem_demo::run(cfg, shutdown_signal(a.common.exit_on_stdin_close)),
            )
        }
        Command::Authz(cmd) => return authz::run(cmd),
        Command::Explain(args) => return explain::run(*args),
        Command::Validate { dir } => match tandem_config::load_dir(&dir) {
            Ok(set) => {
                let mut counts = vec![
                    format!("{} services", set.services.len()),
                    format!("{} HTTP routes", set.http_routes.len()),
                ];
                for (n, what) in [
                    (set.grpc_routes.len(), "gRPC routes"),
                    (set.traffic_policies.len(), "traffic policies"),
                    (set.authorization_policies.len(), "authorization policies"),
                    (set.fault_injections.len(), "fault injections"),
                    (set.rollouts.len(), "rollouts"),
                    (set.external_services.len(), "external services"),
                ] {
                    if n > 0 {
                        counts.push(format!("{n} {what}"));
                    }
                }
                println!("{}: ok ({})", dir.display(), counts.join(", "));
                return ExitCode::SUCCESS;
            }
            Err(diags) => {
                for d in &diags {
                    println!("{d}");
                }
                eprintln!("{} problem(s) found", diags.len());
                return ExitCode::from(1);
            }
        },
        Command::Stat {
            api,
            window,
            output,
        } => api::stat(&api, window, output == Output::Json),
        Command::Status { api, output } => api::status(&api, output == Output::Json),
        Command::Rollout(cmd) => rollout::run(cmd),
        Command::Top(args) => top::run(*args),
        Command::Dashboard { api } => api.target().and_then(|t| t.dashboard_url()).map(|u| {
            println!("{u}");
        }),
        Command::Tap(args) => tap::run(*args),
        Command::Token(TokenCommand::Create {
            service,
            namespace,
            ttl,
            reusable,
            store,
            output,
        }) => identity::token_create(
            &store,
            &namespace,
            &service,
            ttl,
            reusable,
            output == Output::Json,
        ),
        Command::Token(TokenCommand::Revoke { id, store }) => identity::token_revoke(&store, &id),
        Command::Ca(CaCommand::Show { api, output }) => {
            identity::ca_show(&api, output == Output::Json)
        }
        Command::Ca(CaCommand::Rotate { api, no_wait }) => identity::ca_rotate(&api, !no_wait),
        Command::Ca(CaCommand::Retire { api, force }) => identity::ca_retire(&api, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_config_grammar() {
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        // A unit is required everywhere.
        assert!(parse_duration("3").is_err());
    }

    #[test]
    fn upstream_flag() {
        assert_eq!(
            parse_upstream("users=127.0.0.1:9001"),
            Ok(("users".to_string(), "127.0.0.1:9001".parse().expect("addr")))
        );
        assert!(parse_upstream("users").is_err());
        assert!(parse_upstream("=127.0.0.1:1").is_err());
    }

    #[test]
    fn http_proxy_urls_name_the_sidecar() {
        let want = Some("127.0.0.1:4140".parse().expect("addr"));
        assert_eq!(proxy_addr("http://127.0.0.1:4140"), want);
        assert_eq!(proxy_addr("HTTP://127.0.0.1:4140/"), want);
        assert_eq!(proxy_addr("127.0.0.1:4140"), want);
        assert_eq!(proxy_addr("http://proxy.corp:3128"), None);
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
