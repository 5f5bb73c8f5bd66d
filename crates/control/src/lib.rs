//! `tandem control`: the control plane. It loads and watches the config
//! directory ([`watch`]), keeps the registry of connected proxies and
//! compiles and pushes their snapshots ([`mesh`], [`discovery`]), collects
//! golden signals ([`stats`]), serves the HTTP API for the CLI ([`api`]),
//! and keeps durable state behind the [`storage`] interface.
#![forbid(unsafe_code)]

pub mod api;
mod config;
pub mod discovery;
pub mod identity;
pub mod mesh;
mod registry;
mod remote;
pub mod rollout;
mod rotation;
mod snapshots;
pub mod stats;
pub mod store;
pub mod tap;
mod versions;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem_api::v1::discovery_server::DiscoveryServer;
use tandem_api::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
pub const DEFAULT_API: &str = "127.0.0.1:7701";

#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The config directory (GitOps); `None`: config is pushed through
    /// the API into the shared store (`tandem apply`).
    pub config_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// gRPC address proxies connect to.
    pub listen: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
    /// How long a disconnected proxy stays an endpoint.
    pub grace: Duration,
    /// How often proxies report their traffic (`tandem stat`, rollouts).
    pub report_interval: Duration,
    /// After a start, how long proxies that already run a config keep it
    /// while the registry fills again (longer than the proxies' longest
    /// reconnect backoff).
    pub warmup: Duration,
    /// SPIFFE trust domain (fixed when the CA is created).
    pub trust_domain: Option<String>,
    /// Lifetime of issued certificates.
    pub cert_lifetime: Duration,
    /// A root CA (PEM certificate and key) to use instead of generating one.
    pub ca_import: Option<(PathBuf, PathBuf)>,
    /// Host names the HTTP API answers to besides IP addresses and
    /// `localhost`.
    pub api_hosts: Vec<String>,
    /// Accept peer certificates that chain to the bundle through
    /// intermediate CAs.
    pub allow_intermediates: bool,
    /// Where state lives: the data directory, or etcd shared by replicas.
    pub store: store::StoreConfig,
    /// This replica's name among those sharing the store (default: the
    /// host name and the gRPC port).
    pub name: Option<String>,
    /// The gRPC address other hosts reach this replica at (default:
    /// `listen`), as the replica directory shows it.
    pub advertise: Option<String>,
    /// The name of this control plane's cluster (endpoints imported from
    /// other clusters carry theirs).
    pub cluster: String,
    /// A local file with the key that seals the CA's private keys in the
    /// store (they never reach it in the clear).
    pub seal_key: Option<PathBuf>,
}

impl ControlConfig {
    /// The replica's name: given, or the host's name and the gRPC port.
    pub fn replica_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "control".into());
            format!("{host}-{}", self.listen.port())
        })
    }
}

/// Default lifetime of issued certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Runs the control plane until `shutdown` resolves.
pub async fn run(cfg: ControlConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let most = tandem_identity::ca::MAX_CERT_LIFETIME;
    if cfg.cert_lifetime > most || cfg.cert_lifetime < Duration::from_secs(1) {
        anyhow::bail!(
            "--cert-lifetime must be from 1s to {}d: a stolen certificate is good until it expires",
            most.as_secs() / 86400
        );
    }
    let dir = tandem_store::LocalDir::open(&cfg.data_dir)
        .with_context(|| format!("cannot use data directory {}", cfg.data_dir.display()))?;
    // The CA's keys and the admin credential are the mesh's secrets: a
    // copy another user can read is refused, not used.
    for private in ["ca", api::ADMIN_CREDENTIAL] {
        dir.check_private(private)
            .context("refusing to start: the data directory must be private")?;
    }
    let name = cfg.replica_name();
    let (store_stop, store_stopped) = tokio::sync::watch::channel(false);
    let local_copy = matches!(cfg.store, store::StoreConfig::Etcd { .. })
        .then(|| tandem_store::LocalDir::open(&cfg.data_dir))
        .transpose()?;
    let stores = store::Stores::open(&cfg, &name, dir, store_stopped).await?;
    let kv = stores.kv.clone();
    let credential = api::admin_credential(&*kv)
        .await
        .context("admin credential")?;
    let export_credential = api::credential(&*kv, remote::EXPORT_CREDENTIAL)
        .await
        .context("export credential")?;
    // Replicas share the credentials through the store; the CLI on this
    // host reads them from the data directory.
    if let Some(local) = local_copy {
        use tandem_store::Kv;
        for (key, value) in [
            (api::ADMIN_CREDENTIAL, &credential),
            (remote::EXPORT_CREDENTIAL, &export_credential),
        ] {
            local
                .put(key, format!("{value}\n").as_bytes())
                .await
                .with_context(|| format!("cannot write {key} to the data directory"))?;
        }
    }
    let (source, config) = match &cfg.config_dir {
        Some(dir) => {
            let (source, config) = open_dir(dir).await?;
            (Source::Dir(source), config)
        }
        None => {
            if stores.shared.is_none() {
                anyhow::bail!("--config is needed unless the store is shared (--store etcd://...), where config is pushed with `tandem apply`");
            }
            let (source, config) = config::StoreSource::open(kv.clone())
                .await
                .context("cannot read the pushed config from the store")?;
            tracing::info!(
                services = config.services.len(),
                routes = config.http_routes.len(),
                "config loaded from the store"
            );
            (Source::Store(source), config)
        }
    };
    let mesh = mesh::Mesh::start(
        config,
        stores.registry.clone(),
        kv.clone(),
        cfg.grace,
        name.clone(),
        &cfg.cluster,
    )
    .await?;
    let authority = tandem_identity::ca::Authority::open(
        &*kv,
        cfg.trust_domain.as_deref(),
        cfg.ca_import
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .await
    .context("certificate authority")?;
    tracing::info!(trust_domain = %authority.trust_domain(), signer = %authority.signer_id(), roots = authority.root_ids().len(), "certificate authority ready");
    let ca = identity::Ca::new(
        authority,
        kv.clone(),
        cfg.cert_lifetime,
        cfg.allow_intermediates,
        mesh.clone(),
        stores.leadership.clone(),
    )?;
    ca.publish();
    ca.resume();
    tokio::spawn(ca.clone().renew_own());
    tokio::spawn(ca.clone().follow_revocations(REVOCATION_CHECK));
    let stats = Arc::new(stats::Stats::default());

    let grpc = tandem_runtime::listen(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", cfg.listen))?;
    let api_listener = tandem_runtime::listen(cfg.api)
        .await
        .with_context(|| format!("cannot listen on {} (API)", cfg.api))?;
    tracing::info!(grpc = %cfg.listen, api = %cfg.api, credential = %cfg.data_dir.join(api::ADMIN_CREDENTIAL).display(), "control plane listening");

    let pushable = matches!(source, Source::Store(_));
    match source {
        Source::Dir(s) => tokio::spawn(config::follow(s, mesh.clone())),
        Source::Store(s) => tokio::spawn(config::follow(s, mesh.clone())),
    };
    tokio::spawn({
        let mesh = mesh.clone();
        let warmup = cfg.warmup;
        async move {
            tokio::time::sleep(warmup).await;
            mesh.end_warmup();
        }
    });
    let rollouts = rollout::Rollouts::new(
        mesh.clone(),
        stats.clone(),
        kv.clone(),
        stores.leadership.clone(),
        stores.shared.clone().map(|shared| rollout::Peers {
            shared,
            credential: credential.clone(),
        }),
    );
    // The splits in force before the first proxy is served (a restarted
    // control plane goes on with its rollouts where they were).
    if let Err(e) = rollouts.step_all().await {
        tracing::warn!(error = %e, "rollouts: cannot read their state yet");
    }
    tokio::spawn(rollouts.clone().run(rollout::TICK));
    let stats_for_streams = stats.clone();
    let remotes = Arc::new(remote::Remotes::default());
    tokio::spawn(remotes.clone().follow(mesh.clone()));
    let taps = Arc::new(tap::Taps::default());
    let api = Arc::new(api::Api {
        mesh: mesh.clone(),
        stats,
        ca: ca.clone(),
        rollouts,
        taps: taps.clone(),
        store: stores.shared.clone(),
        data_dir: cfg.data_dir.clone(),
        config_dir: cfg.config_dir.clone(),
        pushed: pushable.then(|| kv.clone()),
        remotes: remotes.clone(),
        access: api::Access {
            credential,
            export_credential,
            hosts: cfg.api_hosts.clone(),
        },
    });
    let (accept_stop, accept_stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(tandem_runtime::accept_loop(
        api_listener,
        "api",
        stopped(accept_stopped.clone()),
        move |sock, _| {
            let api = api.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| api.clone().handle(req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        },
    ));

    let incoming = tls_incoming(grpc, ca.tls.clone(), accept_stopped);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Pings notice a proxy that vanished without closing its stream.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(DiscoveryServer::new(discovery::DiscoveryService {
                mesh: mesh.clone(),
                ca: ca.clone(),
                stats: stats_for_streams,
                report_interval: cfg.report_interval,
                taps: taps.clone(),
            }))
            .add_service(IdentityServer::new(identity::IdentityService { ca, mesh }))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut server => {
            r??;
            return Ok(());
        }
        _ = &mut shutdown => {}
    }
    let _ = stop_tx.send(());
    let _ = accept_stop.send(true);
    // Resigns the leadership and leaves the replica directory; the
    // registrations stay under the lease until the proxies have moved.
    let _ = store_stop.send(true);
    // Proxy streams never end by themselves; they are cut after a moment and
    // the proxies reconnect to the next control plane.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tracing::info!("control plane stopped");
    Ok(())
}

enum Source {
    Dir(watch::DirSource),
    Store(config::StoreSource),
}

/// The config directory, loaded and watched; refused with every problem.
async fn open_dir(
    dir: &std::path::Path,
) -> anyhow::Result<(watch::DirSource, tandem_config::ResourceSet)> {
    match watch::DirSource::open(dir.to_path_buf()).await? {
        Ok((source, config)) => {
            tracing::info!(services = config.services.len(), routes = config.http_routes.len(), dir = %dir.display(), "config loaded");
            Ok((source, config))
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            anyhow::bail!(
                "the config in {} has {} problem(s); fix them and start again",
                dir.display(),
                diags.len()
            );
        }
    }
}

/// How often the revocation list is read (a revoked token's proxies are
/// expelled within this).
const REVOCATION_CHECK: Duration = Duration::from_secs(1);

/// Most TLS handshakes in progress on the gRPC port at once.
const MAX_HANDSHAKES: usize = 256;

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How long a new connection on the gRPC port may stay silent before its
/// TLS handshake starts, and how long the handshake may then take.
const FIRST_BYTE_WAIT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIME: Duration = Duration::from_secs(5);

/// TLS connections on the gRPC port, handshaken off the accept loop, until
/// `stop`. A connection takes one of [`MAX_HANDSHAKES`] places only once
/// its first bytes arrived, so sockets held open and silent never keep a
/// proxy from bootstrapping; a slow handshake loses its place after
/// [`HANDSHAKE_TIME`].
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<tandem_identity::tls::TlsIdentity>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(
        tls.server_config_optional_client_auth(&[tandem_identity::tls::ALPN_H2]),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(tandem_runtime::accept_loop(
        listener,
        "grpc",
        stopped(stop),
        move |sock, _| {
            let (acceptor, tx, permits) = (acceptor.clone(), tx.clone(), permits.clone());
            let trust_domain = tls.trust_domain().to_string();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(FIRST_BYTE_WAIT, sock.peek(&mut first)).await,
                    Ok(Ok(1))
                ) {
                    tracing::debug!("connection on the gRPC port sent nothing; closed");
                    return;
                }
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                match tokio::time::timeout(HANDSHAKE_TIME, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let peer =
                            discovery::Peer::of(s.get_ref().1.peer_certificates(), &trust_domain);
                        let _ = tx.send(Ok(TlsConn(s, peer))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake on the gRPC port failed")
                    }
                    Err(_) => tracing::debug!("TLS handshake on the gRPC port timed out"),
                }
            });
        },
    ));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A TLS connection to the gRPC port, and the certificate its client
/// presented.
pub struct TlsConn(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Option<discovery::Peer>,
);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Option<discovery::Peer>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.1.clone()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
