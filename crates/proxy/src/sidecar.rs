//! Assembling a sidecar: its listeners, identity, control-plane stream and
//! the two request stacks, each handed only the handles it uses; then
//! serving until shutdown, and draining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use http::uri::Authority;
use tandem_identity::tls::{ALPN_H2, ALPN_HTTP11};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::client::{Client, Registration};
use crate::control::identity::{keep_fresh, Identity};
use crate::control::Subscriptions;
use crate::listen::{serve_http_conn, stopped, Drain};
use crate::outbound::discover::destination_key;
use crate::policy::overload::Limits;
use crate::routing::Routes;
use crate::telemetry::access::{AccessLog, AccessLogConfig};
use crate::telemetry::admin::{self, Admin};
use crate::telemetry::metrics::{Metrics, Name};
use crate::telemetry::otlp::{Exporter, Me, TraceConfig};
use crate::telemetry::record::Recorder;
use crate::telemetry::tap::Taps;
use crate::transport::forward::Connectors;
use crate::transport::tls::{Connector, MeshTls, PeerNames};
use crate::{inbound, outbound};

/// How long a stopping proxy keeps accepting after telling the control plane
/// it leaves, for the new endpoint lists to reach its callers.
const LEAVE_DELAY: Duration = Duration::from_millis(500);

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
    /// The zone this instance runs in: callers in the same zone prefer it,
    /// and it prefers endpoints of its zone (empty: not said).
    pub zone: String,
    pub app: SocketAddr,
    pub admin: SocketAddr,
    pub http_proxy: Option<SocketAddr>,
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Where the app's connections arrive when they are intercepted
    /// transparently (redirected by the kernel; `tandem run --transparent`).
    pub transparent: Option<SocketAddr>,
    /// Where the app's DNS queries arrive (UDP), answered for mesh names.
    pub dns: Option<SocketAddr>,
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
    /// Spans and their export (OTLP).
    pub trace: TraceConfig,
    /// The access log.
    pub access_log: AccessLogConfig,
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

async fn bind(addr: SocketAddr, what: &'static str) -> anyhow::Result<TcpListener> {
    tandem_runtime::listen(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Runs the sidecar until `shutdown` resolves, then drains.
pub async fn run(cfg: ProxyConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut cfg = cfg;
    // Upstream names are destinations like any host: one spelling each.
    for (name, _) in cfg.upstreams.iter_mut() {
        *name = destination_key(&name.to_ascii_lowercase()).to_string();
    }
    if cfg.advertise.is_none() && cfg.inbound.ip().is_unspecified() {
        anyhow::bail!(
            "--inbound {} listens on every address, and other sidecars need one: give the address they reach this one at with --advertise HOST:PORT",
            cfg.inbound
        );
    }
    let inbound_listener = bind(cfg.inbound, "inbound").await?;
    let admin_listener = bind(cfg.admin, "admin").await?;
    let http_proxy = match cfg.http_proxy {
        Some(a) => Some(bind(a, "http proxy").await?),
        None => None,
    };
    let transparent = match cfg.transparent {
        Some(a) => Some(bind(a, "transparent").await?),
        None => None,
    };
    let dns_socket = match cfg.dns {
        Some(a) => Some(
            tokio::net::UdpSocket::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (dns)"))?,
        ),
        None => None,
    };
    let mut upstreams = Vec::new();
    for (name, addr) in &cfg.upstreams {
        upstreams.push((
            Arc::<str>::from(name.as_str()),
            bind(*addr, "upstream").await?,
        ));
    }

    tokio::pin!(shutdown);
    let metrics = Arc::new(Metrics::new());
    // No traffic without an identity: get the trust bundle and a first
    // certificate before anything else.
    let bootstrap = Identity::bootstrap(
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
    let mesh_tls = |alpn: &[&[u8]]| MeshTls {
        config: tls.client_config(alpn),
        handshakes: metrics.handshakes.clone(),
    };
    let peer_names = Arc::new(ArcSwap::from_pointee(PeerNames::new()));
    let mut own = vec![cfg.inbound, cfg.admin];
    own.extend(cfg.http_proxy);
    own.extend(cfg.transparent);
    own.extend(cfg.upstreams.iter().map(|(_, a)| *a));
    let own = Arc::new(crate::transport::tls::OwnAddrs(own));
    let connector = |alpn: &[&[u8]]| Connector {
        tls: mesh_tls(alpn),
        names: peer_names.clone(),
        own: own.clone(),
    };
    let connectors = Arc::new(Connectors {
        h1: connector(&[ALPN_HTTP11]),
        h2: connector(&[ALPN_H2]),
        handshakes: metrics.handshakes.clone(),
    });
    let routes = Arc::new(Routes::new(peer_names.clone(), &cfg.zone));
    let (subscriptions, asks) = Subscriptions::new(cfg.upstreams.iter().map(|(n, _)| n.clone()));
    let subscriptions = Arc::new(subscriptions);
    let limits = Limits::new(
        cfg.max_connections,
        cfg.max_requests,
        metrics.overload.clone(),
    );
    let service = Name::from(cfg.service.as_str());
    let me = Me {
        namespace: cfg.namespace.clone(),
        service: cfg.service.clone(),
        instance: cfg.instance.clone(),
        trust_domain: identity
            .tls
            .leaf()
            .map_or_else(|| "tandem.local".to_string(), |l| l.id.trust_domain.clone()),
    };
    let access = AccessLog::open(
        &cfg.access_log,
        format!(
            "spiffe://{}/ns/{}/svc/{}",
            me.trust_domain, me.namespace, me.service
        ),
        me.trust_domain.clone(),
        metrics.access_log_dropped.clone(),
    )?;
    let (taps, tap_events) = Taps::new(
        format!("{}/{}/{}", me.namespace, me.service, me.instance),
        metrics.taps.clone(),
    );
    let taps = Arc::new(taps);
    let recorder = Arc::new(Recorder::new(
        cfg.trace.sampler,
        Exporter::new(&cfg.trace, &me, metrics.spans.clone()),
        access,
        taps.clone(),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let (drain, mut drained) = Drain::new();

    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        routes: routes.clone(),
        identity: identity.clone(),
        control: subscriptions.clone(),
    });
    tokio::spawn(serve_admin(admin, admin_listener, stop_rx.clone()));
    let client = Client {
        me: Registration {
            control: cfg.control.clone(),
            namespace: cfg.namespace.clone(),
            service: cfg.service.clone(),
            instance: cfg.instance.clone(),
            advertise: cfg
                .advertise
                .clone()
                .unwrap_or_else(|| cfg.inbound.to_string()),
            admin: cfg.admin.to_string(),
            http_proxy: cfg.http_proxy.map(|a| a.to_string()).unwrap_or_default(),
            zone: cfg.zone.clone(),
        },
        identity: identity.clone(),
        routes: routes.clone(),
        subscriptions: subscriptions.clone(),
        metrics: metrics.clone(),
        taps,
    };
    tokio::spawn(client.run(asks, tap_events, stop_rx.clone()));
    tokio::spawn(keep_fresh(
        identity.clone(),
        cfg.instance.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));

    // Data listeners open once the first snapshot says how to serve; until
    // then connections wait in the accept backlog.
    let mut changed = routes.changes();
    while !routes.is_ready() {
        tokio::select! {
            _ = changed.changed() => {}
            _ = &mut shutdown => {
                let _ = stop_tx.send(true);
                return Ok(());
            }
        }
    }
    tracing::info!(service = %cfg.service, instance = %cfg.instance, "first snapshot applied; serving");

    let app_authority = Authority::try_from(cfg.app.to_string().as_str())?;
    let inbound = inbound::build(inbound::Parts {
        routes: routes.clone(),
        identity: identity.clone(),
        metrics: metrics.clone(),
        recorder: recorder.clone(),
        limits: limits.clone(),
        connectors: connectors.clone(),
        app: cfg.app,
        app_authority,
        service: service.clone(),
    });
    tokio::spawn(inbound.serve(inbound_listener, stop_rx.clone(), drain.clone()));
    let out = outbound::Parts {
        routes: routes.clone(),
        subscriptions: subscriptions.clone(),
        metrics: metrics.clone(),
        recorder,
        limits,
        connectors,
        tls: identity.tls.clone(),
        tcp_tls: mesh_tls(&[]),
        service,
        unknown: Name::from("unknown"),
        me: Arc::new(outbound::egress::Me {
            id: format!(
                "spiffe://{}/ns/{}/svc/{}",
                me.trust_domain, me.namespace, me.service
            ),
            namespace: me.namespace.clone(),
            service: me.service.clone(),
            own: own.clone(),
        }),
        mirror_permits: Arc::new(tokio::sync::Semaphore::new(
            outbound::mirror::MIRROR_IN_FLIGHT,
        )),
    };
    let vips = Arc::new(outbound::transparent::Vips::default());
    if let Some(socket) = dns_socket {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let dns = outbound::dns::Dns {
            routes: routes.clone(),
            control: subscriptions.clone(),
            vips: vips.clone(),
            upstream: outbound::dns::upstream_of(&resolv),
        };
        tokio::spawn(outbound::dns::serve(Arc::new(dns), socket, stop_rx.clone()));
    }
    if let Some(l) = transparent {
        tokio::spawn(outbound::transparent::serve(
            out.clone(),
            vips,
            l,
            stop_rx.clone(),
            drain.clone(),
        ));
    }
    if let Some(l) = http_proxy {
        tokio::spawn(outbound::serve_http_proxy(
            out.clone(),
            l,
            stop_rx.clone(),
            drain.clone(),
        ));
    }
    for (name, l) in upstreams {
        tokio::spawn(outbound::serve_upstream(
            out.clone(),
            name,
            l,
            stop_rx.clone(),
            drain.clone(),
        ));
    }
    drop(drain);

    shutdown.await;
    // Tell the control plane first, so callers' sidecars stop choosing this
    // instance before it stops accepting connections.
    if subscriptions.leave() {
        tokio::time::sleep(LEAVE_DELAY.min(cfg.drain_grace)).await;
    }
    tracing::info!(grace = ?cfg.drain_grace, "shutting down: draining connections");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(cfg.drain_grace, drained.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain grace period over; closing remaining connections");
    }
    Ok(())
}

/// The admin endpoint: served until the proxy stops, outside the data
/// listeners' limits.
async fn serve_admin(admin: Arc<Admin>, listener: TcpListener, stop: watch::Receiver<bool>) {
    tandem_runtime::accept_loop(listener, "admin", stopped(stop.clone()), |sock, _| {
        let a = admin.clone();
        let svc = move |req| admin::handle(a.clone(), req);
        tokio::spawn(serve_http_conn(sock, stop.clone(), (), svc));
    })
    .await;
}
