//! `tandem proxy`: the sidecar. It listens for inbound traffic to its service
//! and forwards it to the local app; it gives the app outbound ports (an HTTP
//! proxy port and per-upstream ports) and sends that traffic to the
//! destination's endpoints, routed and load-balanced per the snapshot the
//! control plane pushes.
//!
//! Modules: [`control`] (the stream to the control plane), [`state`] (the
//! routing table, swapped whole), [`route`] and [`balance`] (pure selection
//! logic), [`http`] and [`tcp`] (the data path), [`admin`], [`metrics`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod control;
pub mod error;
pub mod http;
pub mod metrics;
pub mod route;
pub mod state;
pub mod tcp;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::http::uri::Authority;
use ::http::HeaderValue;
use anyhow::Context;
use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::http::{Clients, Outbound};
use crate::metrics::{Direction, Metrics, Name};
use crate::state::{LoadCache, Routing};

/// How long a request for a destination the proxy has not seen yet waits
/// for the control plane to send it.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// How long a stopping proxy keeps accepting after telling the control plane
/// it leaves, for the new endpoint lists to reach its callers.
const LEAVE_DELAY: Duration = Duration::from_millis(500);

/// Most destinations one proxy asks the control plane for.
pub const MAX_DESTINATIONS: usize = 1024;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Control-plane gRPC URL, e.g. `http://127.0.0.1:7700`.
    pub control: String,
    pub namespace: String,
    pub service: String,
    pub instance: String,
    pub inbound: SocketAddr,
    /// Address registered for other sidecars (defaults to `inbound`).
    pub advertise: Option<String>,
    pub app: SocketAddr,
    pub admin: SocketAddr,
    pub http_proxy: Option<SocketAddr>,
    pub upstreams: Vec<(String, SocketAddr)>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_grace: Duration,
}

/// The state every listener shares.
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub service: Name,
    /// The label for a peer the proxy cannot name.
    unknown: Name,
    pub advertise: String,
    src_header: HeaderValue,
    app_authority: Authority,
    pub routing: ArcSwap<Routing>,
    pub routing_changed: watch::Sender<u64>,
    pub metrics: Metrics,
    clients: Clients,
    loads: LoadCache,
    interest: Mutex<BTreeSet<String>>,
    to_control: mpsc::UnboundedSender<ToControl>,
    /// Calling services seen inbound, interned (and bounded: the name comes
    /// from a request header).
    peers: RwLock<HashMap<Box<[u8]>, Name>>,
}

/// What the data path asks of the control-plane stream.
pub enum ToControl {
    Subscribe(String),
    Leave,
}

/// Most distinct calling-service labels; further names count as `unknown`.
const MAX_PEERS: usize = 256;

impl Proxy {
    pub fn is_ready(&self) -> bool {
        self.routing.load().version > 0
    }

    fn interest(&self) -> Vec<String> {
        match self.interest.lock() {
            Ok(i) => i.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }

    /// Adds a destination to the interest set, telling the control plane if
    /// it is new. Returns false when the set is full: hosts come from
    /// requests, and a caller inventing names must not grow it without bound.
    fn subscribe(&self, name: &str) -> bool {
        let mut interest = match self.interest.lock() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        if interest.contains(name) {
            return true;
        }
        if interest.len() >= MAX_DESTINATIONS {
            return false;
        }
        interest.insert(name.to_string());
        drop(interest);
        let _ = self.to_control.send(ToControl::Subscribe(name.to_string()));
        true
    }

    /// The metric label for a calling service named in a request header.
    fn peer_name(&self, raw: &[u8]) -> Name {
        let valid = !raw.is_empty()
            && raw.len() <= 63
            && raw
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if !valid {
            return self.unknown.clone();
        }
        if let Some(n) = self.peers.read().ok().and_then(|p| p.get(raw).cloned()) {
            return n;
        }
        let mut peers = match self.peers.write() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if peers.len() >= MAX_PEERS {
            return self.unknown.clone();
        }
        let name = Name::from(String::from_utf8_lossy(raw).as_ref());
        peers.insert(raw.into(), name.clone());
        name
    }
}

/// Counts live connections so shutdown can wait for them to finish.
#[derive(Clone)]
struct Drain(#[allow(dead_code)] mpsc::Sender<()>);

/// Runs the sidecar until `shutdown` resolves, then drains.
pub async fn run(cfg: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut cfg = cfg;
    // Upstream names are destinations like any host: one spelling each.
    for (name, _) in cfg.upstreams.iter_mut() {
        *name = http::destination_key(&name.to_ascii_lowercase()).to_string();
    }
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({what})"))
    };
    let inbound = bind(cfg.inbound, "inbound").await?;
    let admin = bind(cfg.admin, "admin").await?;
    let http_proxy = match cfg.http_proxy {
        Some(a) => Some(bind(a, "http proxy").await?),
        None => None,
    };
    let mut upstreams = Vec::new();
    for (name, addr) in &cfg.upstreams {
        upstreams.push((name.clone(), bind(*addr, "upstream").await?));
    }

    let (sub_tx, sub_rx) = mpsc::unbounded_channel();
    let interest: BTreeSet<String> = cfg.upstreams.iter().map(|(n, _)| n.clone()).collect();
    let proxy = Arc::new(Proxy {
        service: Name::from(cfg.service.as_str()),
        unknown: Name::from("unknown"),
        advertise: cfg
            .advertise
            .clone()
            .unwrap_or_else(|| cfg.inbound.to_string()),
        src_header: HeaderValue::from_str(&cfg.service)
            .context("service name is not a valid header value")?,
        app_authority: Authority::try_from(cfg.app.to_string().as_str())?,
        routing: ArcSwap::from_pointee(Routing::empty()),
        routing_changed: watch::channel(0).0,
        metrics: Metrics::new(),
        clients: Clients::new(),
        loads: LoadCache::default(),
        interest: Mutex::new(interest),
        to_control: sub_tx,
        peers: RwLock::new(HashMap::new()),
        cfg,
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    let drain = Drain(drain_tx);

    {
        let p = proxy.clone();
        let svc = move |req| admin::handle(p.clone(), req);
        tokio::spawn(serve_http(admin, stop_rx.clone(), None, svc));
    }
    tokio::spawn(control::run(proxy.clone(), sub_rx, stop_rx.clone()));

    tokio::pin!(shutdown);
    // Data listeners open once the first snapshot says how to serve; until
    // then connections wait in the accept backlog.
    let mut changed = proxy.routing_changed.subscribe();
    loop {
        if proxy.is_ready() {
            break;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = &mut shutdown => {
                let _ = stop_tx.send(true);
                return Ok(());
            }
        }
    }
    tracing::info!(service = %proxy.cfg.service, instance = %proxy.cfg.instance, "first snapshot applied; serving");

    tokio::spawn(serve_inbound(
        proxy.clone(),
        inbound,
        stop_rx.clone(),
        drain.clone(),
    ));
    if let Some(l) = http_proxy {
        let p = proxy.clone();
        let svc = move |req| http::outbound(p.clone(), Outbound::ByAuthority, req);
        tokio::spawn(serve_http(l, stop_rx.clone(), Some(drain.clone()), svc));
    }
    for (name, l) in upstreams {
        tokio::spawn(serve_upstream(
            proxy.clone(),
            Arc::from(name.as_str()),
            l,
            stop_rx.clone(),
            drain.clone(),
        ));
    }
    drop(drain);

    shutdown.await;
    // Tell the control plane first, so callers' sidecars stop choosing this
    // instance before it stops accepting connections.
    if proxy.metrics.control_connected.get() == 1 {
        let _ = proxy.to_control.send(ToControl::Leave);
        tokio::time::sleep(LEAVE_DELAY.min(proxy.cfg.drain_grace)).await;
    }
    tracing::info!(grace = ?proxy.cfg.drain_grace, "shutting down: draining connections");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(proxy.cfg.drain_grace, drain_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain grace period over; closing remaining connections");
    }
    Ok(())
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) with upgrades, closing
/// connections gracefully when `stop` fires.
async fn serve_http<F, Fut, B>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    drain: Option<Drain>,
    handler: F,
) where
    F: Fn(::http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<::http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    while let Some(sock) = accept(&listener, &mut stop).await {
        tokio::spawn(serve_http_conn(
            sock,
            stop.clone(),
            drain.clone(),
            handler.clone(),
        ));
    }
}

async fn serve_http_conn<F, Fut, B>(
    sock: TcpStream,
    mut stop: watch::Receiver<bool>,
    drain: Option<Drain>,
    handler: F,
) where
    F: Fn(::http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<::http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _drain = drain;
    let _ = sock.set_nodelay(true);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer enables hyper's header read timeout (30 s): a client that
    // trickles its request headers is cut off instead of holding a
    // connection forever. HTTP/2 peers are pinged so dead ones are noticed.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(sock), service_fn(handler));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The next connection, or `None` once `stop` fires. Accept errors (such
/// as running out of file descriptors) are logged and retried after a pause
/// instead of spinning.
async fn accept(listener: &TcpListener, stop: &mut watch::Receiver<bool>) -> Option<TcpStream> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => return Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

async fn serve_inbound(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    drain: Drain,
) {
    while let Some(sock) = accept(&listener, &mut stop).await {
        let protocol = proxy.routing.load().inbound.as_ref().map(|i| i.protocol);
        match protocol {
            Some(tandem_config::snapshot::Protocol::Tcp) => {
                let (p, d) = (proxy.clone(), drain.clone());
                let app = proxy.cfg.app;
                let me = proxy.service.clone();
                tokio::spawn(async move {
                    let _d = d;
                    let unknown = p.unknown.clone();
                    tcp::relay(p, sock, app, Direction::inbound, unknown, me).await;
                });
            }
            Some(_) => {
                let p = proxy.clone();
                let svc = move |req| http::inbound(p.clone(), req);
                tokio::spawn(serve_http_conn(
                    sock,
                    stop.clone(),
                    Some(drain.clone()),
                    svc,
                ));
            }
            None => {
                tracing::warn!(
                    "inbound connection refused: service `{}` is not declared in the config",
                    proxy.cfg.service
                );
                drop(sock);
            }
        }
    }
}

async fn serve_upstream(
    proxy: Arc<Proxy>,
    name: Arc<str>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    drain: Drain,
) {
    while let Some(sock) = accept(&listener, &mut stop).await {
        let dest = proxy
            .routing
            .load()
            .destination(http::destination_key(&name))
            .cloned();
        match dest {
            Some(dest) if dest.protocol == tandem_config::snapshot::Protocol::Tcp => {
                let Some(ep) = dest.backends.first().and_then(|b| b.pick()).cloned() else {
                    tracing::warn!(destination = %name, "no live endpoint; closing tcp connection");
                    continue;
                };
                let (p, d) = (proxy.clone(), drain.clone());
                let me = proxy.service.clone();
                tokio::spawn(async move {
                    let _d = d;
                    // Counts as outstanding for balancing; its duration is
                    // not a latency, so nothing is observed.
                    let _pending = ep.load.open();
                    tcp::relay(
                        p,
                        sock,
                        ep.load.addr,
                        Direction::outbound,
                        me,
                        dest.name.clone(),
                    )
                    .await;
                });
            }
            // HTTP, or a destination not known yet: the HTTP path routes,
            // discovers, or answers with a clear error.
            _ => {
                let p = proxy.clone();
                let n = name.clone();
                let svc = move |req| http::outbound(p.clone(), Outbound::Fixed(n.clone()), req);
                tokio::spawn(serve_http_conn(
                    sock,
                    stop.clone(),
                    Some(drain.clone()),
                    svc,
                ));
            }
        }
    }
}
