//! `tandem control`: the control plane. It loads and watches the config
//! directory ([`watch`]), keeps the registry of connected proxies and
//! compiles and pushes their snapshots ([`mesh`], [`discovery`]), collects
//! golden signals ([`stats`]), serves the HTTP API for the CLI ([`api`]),
//! and keeps durable state behind the [`storage`] interface.
#![forbid(unsafe_code)]

pub mod api;
pub mod discovery;
pub mod mesh;
pub mod stats;
pub mod storage;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem_api::v1::discovery_server::DiscoveryServer;
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
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(cfg: ControlConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = match tandem_config::load_dir(&cfg.config_dir) {
        Ok(set) => set,
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
    let storage = Arc::new(
        storage::LocalDir::open(&cfg.data_dir)
            .with_context(|| format!("cannot use data directory {}", cfg.data_dir.display()))?,
    );
    let mesh = mesh::Mesh::new(config, storage, cfg.grace).await?;
    let stats = Arc::new(stats::Stats::default());

    let grpc = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", cfg.listen))?;
    let api_listener = TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("cannot listen on {} (API)", cfg.api))?;
    tracing::info!(grpc = %cfg.listen, api = %cfg.api, "control plane listening");

    tokio::spawn({
        let (dir, mesh) = (cfg.config_dir.clone(), mesh.clone());
        async move {
            if let Err(e) = watch::run(dir, mesh).await {
                tracing::error!(error = %e, "config watch stopped");
            }
        }
    });
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
            mesh.end_warmup().await;
        }
    });
    let api = Arc::new(api::Api {
        mesh: mesh.clone(),
        stats,
    });
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = api_listener.accept().await else {
                continue;
            };
            let api = api.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| api.clone().handle(req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Pings notice a proxy that vanished without closing its stream.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(DiscoveryServer::new(discovery::DiscoveryService { mesh }))
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
    // Proxy streams never end by themselves; they are cut after a moment and
    // the proxies reconnect to the next control plane.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tracing::info!("control plane stopped");
    Ok(())
}
