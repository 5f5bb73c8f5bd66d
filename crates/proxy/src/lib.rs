//! `tandem proxy`: the sidecar. It listens for inbound traffic to its service
//! and forwards it to the local app; it gives the app outbound ports (an HTTP
//! proxy port and per-upstream ports) and sends that traffic to the
//! destination's endpoints, routed and load-balanced per the snapshot the
//! control plane pushes.
//!
//! Modules: [`control`] (the stream to the control plane), [`identity`]
//! (certificates: bootstrap and renewal), [`state`] (the routing table,
//! swapped whole), [`route`] and [`balance`] (pure selection logic),
//! [`http`], [`tcp`] and [`transport`] (the data path, mTLS between
//! sidecars), [`admin`], [`metrics`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod control;
pub mod error;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod outlier;
pub mod pool;
pub mod ratelimit;
pub mod replay;
pub mod retry;
pub mod route;
pub mod state;
pub mod tcp;
pub mod transport;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::http::uri::Authority;
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

/// Largest request head (request line and headers) a sidecar reads; a
/// larger one is answered with 431.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Most destinations one proxy asks the control plane for.
pub const MAX_DESTINATIONS: usize = 1024;

#[derive(Clone)]
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
    /// Most connections open at once on the data listeners; more are
    /// closed at once.
    pub max_connections: usize,
    /// Most requests being handled at once; more are answered `503
    /// overloaded` without being forwarded.
    pub max_requests: usize,
    /// The join token for this service.
    pub token: String,
    /// A trust bundle to pin instead of learning it with the token.
    pub ca_bundle: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("control", &self.control)
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("instance", &self.instance)
            .field("inbound", &self.inbound)
            .field("app", &self.app)
            .field("token", &"(secret)")
            .finish_non_exhaustive()
    }
}

/// The state every listener shares.
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub service: Name,
    /// The label for a peer the proxy cannot name.
    unknown: Name,
    pub advertise: String,
    app_authority: Authority,
    pub identity: Arc<identity::Identity>,
    /// mTLS towards sidecars for opaque TCP.
    tcp_tls: transport::MeshTls,
    /// Inbound mTLS, for HTTP (ALPN h2, http/1.1) and for opaque TCP.
    server_http: Arc<rustls::ServerConfig>,
    server_tcp: Arc<rustls::ServerConfig>,
    /// Endpoint → identity, for the HTTP clients' connector.
    peer_names: Arc<ArcSwap<transport::PeerNames>>,
    pub routing: ArcSwap<Routing>,
    pub routing_changed: watch::Sender<u64>,
    pub metrics: Metrics,
    clients: Clients,
    loads: LoadCache,
    interest: Mutex<BTreeSet<String>>,
    to_control: mpsc::UnboundedSender<ToControl>,
    /// Calling services seen inbound, interned (and bounded).
    peers: RwLock<HashMap<Box<[u8]>, Name>>,
    pub limits: Arc<Limits>,
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

    /// The metric label for a calling service (from its certificate).
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

/// Bounds on what one sidecar takes on at once: past them it sheds load
/// (closes new connections, answers `503 overloaded`) instead of growing.
pub struct Limits {
    max_connections: usize,
    open: std::sync::atomic::AtomicUsize,
    /// Requests in progress, inbound and outbound counted apart (an app's
    /// own calls must not be starved by the requests waiting on them).
    pub inbound_requests: Arc<tokio::sync::Semaphore>,
    pub outbound_requests: Arc<tokio::sync::Semaphore>,
    rejected: prometheus_client::metrics::family::Family<
        metrics::OverloadLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// One open connection on a data listener.
pub struct ConnSlot(Arc<Limits>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Limits {
    /// A slot for a new connection, or `None` (counted) when full.
    pub fn connection(self: &Arc<Self>) -> Option<ConnSlot> {
        use std::sync::atomic::Ordering;
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.rejected
                .get_or_create(&metrics::OverloadLabels { what: "connection" })
                .inc();
            return None;
        }
        Some(ConnSlot(self.clone()))
    }

    pub fn request_rejected(&self) {
        self.rejected
            .get_or_create(&metrics::OverloadLabels { what: "request" })
            .inc();
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

    tokio::pin!(shutdown);
    let metrics = Metrics::new();
    // No traffic without an identity: get the trust bundle and a first
    // certificate before anything else.
    let bootstrap = identity::Identity::bootstrap(
        &cfg.control,
        &cfg.namespace,
        &cfg.service,
        &cfg.instance,
        &cfg.token,
        cfg.ca_bundle.clone(),
        &metrics,
    );
    let identity = tokio::select! {
        r = bootstrap => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let tls = identity.tls.clone();
    let handshakes = metrics.handshakes.clone();
    let overload = metrics.overload.clone();
    let mesh_tls = |alpn: &[&[u8]]| transport::MeshTls {
        config: tls.client_config(alpn),
        handshakes: handshakes.clone(),
    };
    let peer_names = Arc::new(ArcSwap::from_pointee(transport::PeerNames::new()));
    let connector = |alpn: &[&[u8]]| transport::Connector {
        tls: mesh_tls(alpn),
        names: peer_names.clone(),
    };
    use tandem_identity::tls::{ALPN_H2, ALPN_HTTP11};
    let app_authority = Authority::try_from(cfg.app.to_string().as_str())?;
    let clients = Clients::new(
        connector(&[ALPN_HTTP11]),
        connector(&[ALPN_H2]),
        &app_authority,
    );

    let (sub_tx, sub_rx) = mpsc::unbounded_channel();
    let interest: BTreeSet<String> = cfg.upstreams.iter().map(|(n, _)| n.clone()).collect();
    let proxy = Arc::new(Proxy {
        service: Name::from(cfg.service.as_str()),
        unknown: Name::from("unknown"),
        advertise: cfg
            .advertise
            .clone()
            .unwrap_or_else(|| cfg.inbound.to_string()),
        app_authority,
        tcp_tls: mesh_tls(&[]),
        server_http: tls.server_config(&[ALPN_H2, ALPN_HTTP11]),
        server_tcp: tls.server_config(&[]),
        peer_names,
        identity,
        routing: ArcSwap::from_pointee(Routing::empty()),
        routing_changed: watch::channel(0).0,
        metrics,
        clients,
        loads: LoadCache::default(),
        interest: Mutex::new(interest),
        to_control: sub_tx,
        peers: RwLock::new(HashMap::new()),
        limits: Arc::new(Limits {
            max_connections: cfg.max_connections.max(1),
            open: std::sync::atomic::AtomicUsize::new(0),
            inbound_requests: Arc::new(tokio::sync::Semaphore::new(cfg.max_requests.max(1))),
            outbound_requests: Arc::new(tokio::sync::Semaphore::new(cfg.max_requests.max(1))),
            rejected: overload,
        }),
        cfg,
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    let drain = Drain(drain_tx);

    {
        let p = proxy.clone();
        let svc = move |req| admin::handle(p.clone(), req);
        tokio::spawn(serve_http(admin, stop_rx.clone(), None, None, svc));
    }
    tokio::spawn(control::run(proxy.clone(), sub_rx, stop_rx.clone()));
    tokio::spawn(identity::keep_fresh(proxy.clone(), stop_rx.clone()));

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
        tokio::spawn(serve_http(
            l,
            stop_rx.clone(),
            Some(drain.clone()),
            Some(proxy.limits.clone()),
            svc,
        ));
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
    limits: Option<Arc<Limits>>,
    handler: F,
) where
    F: Fn(::http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<::http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    while let Some(sock) = accept(&listener, &mut stop).await {
        let slot = match &limits {
            Some(l) => match l.connection() {
                Some(s) => Some(s),
                None => continue,
            },
            None => None,
        };
        let (handler, drain) = (handler.clone(), drain.clone());
        tokio::spawn(serve_http_conn(sock, stop.clone(), drain, slot, handler));
    }
}

async fn serve_http_conn<I, F, Fut, B>(
    sock: I,
    mut stop: watch::Receiver<bool>,
    drain: Option<Drain>,
    slot: Option<ConnSlot>,
    handler: F,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(::http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<::http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (_drain, _slot) = (drain, slot);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer enables hyper's header read timeout (30 s): a client that
    // trickles its request headers is cut off instead of holding a
    // connection forever. HTTP/2 peers are pinged so dead ones are noticed.
    // Request headers above MAX_HEADER_BYTES are refused with 431.
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32)
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
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    return Some(s);
                }
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
        let Some(slot) = proxy.limits.connection() else {
            continue;
        };
        tokio::spawn(inbound_conn(
            proxy.clone(),
            sock,
            stop.clone(),
            drain.clone(),
            slot,
        ));
    }
}

/// One inbound connection: mTLS (or, for a permissive service, plaintext),
/// then HTTP or opaque TCP to the app.
async fn inbound_conn(
    proxy: Arc<Proxy>,
    sock: TcpStream,
    stop: watch::Receiver<bool>,
    drain: Drain,
    slot: ConnSlot,
) {
    let Some(inbound) = proxy.routing.load().inbound.clone() else {
        tracing::warn!(
            "inbound connection refused: service `{}` is not declared in the config",
            proxy.cfg.service
        );
        return;
    };
    let count = |result: &'static str| {
        proxy
            .metrics
            .handshakes
            .get_or_create(&metrics::HandshakeLabels {
                direction: Direction::inbound,
                result,
            })
            .inc();
    };
    // A TLS connection starts with a handshake record (0x16); peeking tells
    // it from plaintext without consuming anything. A TLS client sends its
    // hello at once; a plaintext client of a server-speaks-first protocol
    // sends nothing, so for a permissive TCP service silence soon means
    // plaintext.
    let permissive = inbound.mtls == tandem_config::snapshot::MtlsMode::Permissive;
    let wait = if permissive && !inbound.protocol.is_http() {
        transport::PLAINTEXT_SILENCE
    } else {
        transport::HANDSHAKE_TIMEOUT
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, sock.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) if permissive && !inbound.protocol.is_http() => first[0] = 0,
        Err(_) => {
            count("timeout");
            return;
        }
    }
    let (conn, peer) = if first[0] != 0x16 {
        if !permissive {
            count("plaintext");
            tracing::debug!("plaintext connection refused: the service requires mTLS");
            return;
        }
        if proxy.identity.tls.is_expired() {
            return;
        }
        proxy.metrics.plaintext.inc();
        (transport::Inbound::Left(sock), None)
    } else {
        let cfg = if inbound.protocol.is_http() {
            proxy.server_http.clone()
        } else {
            proxy.server_tcp.clone()
        };
        let accepted = tokio::time::timeout(
            transport::HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(cfg).accept(sock),
        )
        .await;
        let tls = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = tandem_identity::tls::failure_reason(&e);
                count(reason);
                tracing::debug!(%reason, error = %e, "inbound mTLS handshake failed");
                return;
            }
            Err(_) => {
                count("timeout");
                return;
            }
        };
        let id = tandem_identity::tls::peer_id(
            tls.get_ref().1.peer_certificates(),
            proxy.identity.tls.trust_domain(),
        );
        let Some(id) = id else {
            count("not-an-svid");
            return;
        };
        count("ok");
        let peer = ::http::HeaderValue::from_str(&id.uri())
            .ok()
            .map(|client_id| {
                Arc::new(http::Peer {
                    service: proxy.peer_name(id.service.as_bytes()),
                    client_id,
                })
            });
        (transport::Inbound::Right(Box::new(tls)), peer)
    };
    if inbound.protocol.is_http() {
        let p = proxy.clone();
        let svc = move |req| http::inbound(p.clone(), peer.clone(), req);
        serve_http_conn(conn, stop, Some(drain), Some(slot), svc).await;
    } else {
        let (_d, _slot) = (drain, slot);
        let src = peer
            .map(|p| p.service.clone())
            .unwrap_or_else(|| proxy.unknown.clone());
        let (app, me) = (proxy.cfg.app, proxy.service.clone());
        tcp::relay(
            proxy,
            conn,
            tcp::Target::Plain(app),
            Direction::inbound,
            src,
            me,
        )
        .await;
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
        let Some(slot) = proxy.limits.connection() else {
            continue;
        };
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
                    let (_d, _slot) = (d, slot);
                    // Counts as outstanding for balancing; its duration is
                    // not a latency, so nothing is observed.
                    let _pending = ep.load.open();
                    let target = match ep.server_name.clone() {
                        Some(name) => tcp::Target::Mesh(ep.addr(), name),
                        None => tcp::Target::Plain(ep.addr()),
                    };
                    tcp::relay(p, sock, target, Direction::outbound, me, dest.name.clone()).await;
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
                    Some(slot),
                    svc,
                ));
            }
        }
    }
}
