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
mod rotation;
mod snapshots;
pub mod stats;
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
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    /// gRPC address proxies connect to.
    pub listen: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
    /// How long a disconnected proxy stays an endpoint.
    pub grace: Duration,
    /// How often proxies' metrics are collected.
    pub scrape_interval: Duration,
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
}

/// Default lifetime of issued certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Runs the control plane until `shutdown` resolves.
pub async fn run(cfg: ControlConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (source, config) = match watch::DirSource::open(cfg.config_dir.clone()).await? {
        Ok(loaded) => loaded,
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            anyhow::bail!(
                "the config in {} has {} problem(s); fix them and start again",
                cfg.config_dir.display(),
                diags.len()
            );
        }
    };
    tracing::info!(services = config.services.len(), routes = config.http_routes.len(), dir = %cfg.config_dir.display(), "config loaded");
    let kv: Arc<dyn tandem_store::Kv> = Arc::new(
        tandem_store::LocalDir::open(&cfg.data_dir)
            .with_context(|| format!("cannot use data directory {}", cfg.data_dir.display()))?,
    );
    let registry: Arc<dyn tandem_store::RegistryStore> =
        Arc::new(tandem_store::MemoryRegistry::default());
    let mesh = mesh::Mesh::start(config, registry, kv.clone(), cfg.grace).await?;
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
    let ca = identity::Ca::new(authority, kv, cfg.cert_lifetime, mesh.clone())?;
    let generation = ca.publish();
    ca.resume(generation);
    tokio::spawn(ca.clone().renew_own());
    let stats = Arc::new(stats::Stats::default());

    let grpc = tandem_runtime::listen(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", cfg.listen))?;
    let api_listener = tandem_runtime::listen(cfg.api)
        .await
        .with_context(|| format!("cannot listen on {} (API)", cfg.api))?;
    tracing::info!(grpc = %cfg.listen, api = %cfg.api, "control plane listening");

    tokio::spawn(config::follow(source, mesh.clone()));
    tokio::spawn(stats::collect(
        mesh.clone(),
        stats.clone(),
        cfg.scrape_interval,
    ));
    tokio::spawn({
        let mesh = mesh.clone();
        let warmup = cfg.warmup;
        async move {
            tokio::time::sleep(warmup).await;
            mesh.end_warmup();
        }
    });
    let api = Arc::new(api::Api {
        mesh: mesh.clone(),
        stats,
        ca: ca.clone(),
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
    // Proxy streams never end by themselves; they are cut after a moment and
    // the proxies reconnect to the next control plane.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Most TLS handshakes in progress on the gRPC port at once.
const MAX_HANDSHAKES: usize = 256;

async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// TLS connections on the gRPC port, handshaken off the accept loop (a slow
/// or hostile client cannot hold up others; at most [`MAX_HANDSHAKES`] at
/// once, the others wait their turn), until `stop`.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<tandem_identity::tls::TlsIdentity>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(
        tls.server_config_no_client_auth(&[tandem_identity::tls::ALPN_H2]),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(tandem_runtime::accept_loop(
        listener,
        "grpc",
        stopped(stop),
        move |sock, _| {
            let (acceptor, tx, permits) = (acceptor.clone(), tx.clone(), permits.clone());
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(TlsConn(s))).await;
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

/// A TLS connection to the gRPC port.
pub struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
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
