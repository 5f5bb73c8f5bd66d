//! Outbound: the local app → this sidecar → the destination's sidecar.
//!
//! The app reaches the mesh through the HTTP proxy port (destination from
//! the request's authority) or a per-upstream port (a fixed destination;
//! an opaque TCP destination is relayed as bytes). Every HTTP request goes
//! down the stack below, built once per listener. Each layer reads its
//! settings for the request from the context (the destination's policy, or
//! the matched rule's), and passes the request on untouched when it has
//! none: without a policy and without a caller's deadline a request gets
//! one try, with nothing buffered or added.
//!
//! The stack, top to bottom:
//!
//! | layer | decides | answers |
//! |---|---|---|
//! | edge (`edge.rs`) | the request head keeps RFC 9112 | `400 bad-request`; the flag header and the golden signals |
//! | [`AdmitLayer`]: `--max-requests` | | `503 overloaded` |
//! | [`ConnectLayer`] | HTTP proxy port: `CONNECT host:port` to a host outside the mesh, under the egress rules; a tunnel | `403 egress-denied`, `503 upstream-connect-failure` |
//! | [`DiscoverLayer`] | the destination (discovered on demand), or a host outside the mesh (`egress.rs`) | `404 unknown-service`, `503 discovery-unavailable`, `400 bad-request`, `403 egress-denied` |
//! | [`RouteLayer`] | the route rule, backend, ring-hash key | `404 no-route` |
//! | [`FilterLayer`] | the rule's filters: redirect, header modifiers, URL rewrite | the redirect |
//! | [`DeadlineLayer`] | the deadline: the policy's timeout or the caller's, counted from arrival | |
//! | [`FaultLayer`] | injected delays and aborts (`FaultInjection`) | the injected status, `fault-injected` |
//! | [`MirrorLayer`] | shadow copies to the rule's mirrors, fire and forget | |
//! | [`AdmissionLayer`]: `circuitBreaker.maxRequests` | | `503 overflow` |
//! | [`RetryLayer`] | the tries: replay, backoff, budget | `retry-limit-exhausted`, `retry-budget-exhausted` |
//! | [`StampLayer`], each try | the deadline left and no-retry for the next hop | |
//! | [`OutlierLayer`], each try | the endpoint's outcome; ejections | |
//! | [`TryTimeoutLayer`], each try | cuts the try at its per-try timeout or the deadline | `504 upstream-timeout` |
//! | [`BalanceLayer`], each try | the endpoint; its latency estimate | `503 no-endpoints` |
//! | [`ToEndpoint`], each try | the connection (pool, mTLS, `maxConnections`) | `503 upstream-connect-failure`, `upstream-tls-failure`, `identity-expired`, `overflow`; `502 upstream-reset` |

pub(crate) mod discover;
pub(crate) mod dns;
pub(crate) mod egress;
pub(crate) mod filter;
pub(crate) mod mirror;
pub(crate) mod route;
pub(crate) mod transparent;

use std::sync::Arc;

use tandem_config::snapshot::Protocol;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::balance::BalanceLayer;
use crate::control::Subscriptions;
use crate::ctx::RequestCtx;
use crate::edge::Edge;
use crate::listen::{serve_http_conn, stopped, Drain};
use crate::policy::circuit::AdmissionLayer;
use crate::policy::deadline::{DeadlineLayer, StampLayer};
use crate::policy::fault::FaultLayer;
use crate::policy::outlier::OutlierLayer;
use crate::policy::overload::{AdmitLayer, Limits};
use crate::policy::retry::RetryLayer;
use crate::policy::timeout::TryTimeoutLayer;
use crate::routing::{self, Routes};
use crate::svc::Service;
use crate::telemetry::metrics::{Direction, Metrics, Name, TcpLabels};
use crate::transport::forward::{Connectors, ToEndpoint};
use crate::transport::tcp::{relay, Target};
use crate::transport::tls::MeshTls;
use discover::{destination_key, DiscoverLayer};
use egress::ConnectLayer;
use filter::FilterLayer;
use mirror::{MirrorLayer, Shadows};
use route::RouteLayer;

pub(crate) use discover::Target as Listen;

/// What the outbound side is built from.
#[derive(Clone)]
pub(crate) struct Parts {
    pub(crate) routes: Arc<Routes>,
    pub(crate) subscriptions: Arc<Subscriptions>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) recorder: Arc<crate::telemetry::record::Recorder>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) connectors: Arc<Connectors>,
    pub(crate) tls: Arc<tandem_identity::tls::TlsIdentity>,
    pub(crate) tcp_tls: MeshTls,
    pub(crate) service: Name,
    /// The label of a destination not known yet.
    pub(crate) unknown: Name,
    /// Shadow requests in progress (`RequestMirror`), for the whole sidecar.
    pub(crate) mirror_permits: Arc<tokio::sync::Semaphore>,
    /// This sidecar's identity, the caller its egress is checked as.
    pub(crate) me: Arc<egress::Me>,
}

/// The outbound stack of a listener whose traffic goes to `target`.
fn stack(p: &Parts, target: Listen) -> impl Service {
    ServiceBuilder::new()
        .layer(AdmitLayer {
            permits: p.limits.outbound_requests.clone(),
            limits: p.limits.clone(),
        })
        .layer(ConnectLayer {
            enabled: matches!(target, Listen::ByAuthority),
            routes: p.routes.clone(),
            me: p.me.clone(),
            metrics: p.metrics.clone(),
            limits: p.limits.clone(),
        })
        .layer(DiscoverLayer {
            target,
            routes: p.routes.clone(),
            control: p.subscriptions.clone(),
            me: p.me.clone(),
        })
        .layer(RouteLayer {})
        .layer(FilterLayer {})
        .layer(DeadlineLayer {})
        .layer(FaultLayer {
            metrics: p.metrics.clone(),
        })
        .layer(MirrorLayer {
            shadows: Arc::new(Shadows {
                stack: tower::Layer::layer(&BalanceLayer {}, to_endpoint(p)),
                permits: p.mirror_permits.clone(),
                metrics: p.metrics.clone(),
                service: p.service.clone(),
            }),
        })
        .layer(AdmissionLayer {})
        .layer(RetryLayer {
            metrics: p.metrics.clone(),
            service: p.service.clone(),
        })
        .layer(StampLayer {})
        .layer(OutlierLayer {
            metrics: p.metrics.clone(),
            service: p.service.clone(),
        })
        .layer(TryTimeoutLayer {})
        .layer(BalanceLayer {})
        .service(to_endpoint(p))
}

fn to_endpoint(p: &Parts) -> ToEndpoint {
    ToEndpoint {
        connectors: p.connectors.clone(),
        tls: p.tls.clone(),
    }
}

/// Serves HTTP requests of `edge` on one connection.
fn serve_conn<S: Service, I>(
    edge: &Arc<Edge<S>>,
    p: &Parts,
    sock: I,
    stop: watch::Receiver<bool>,
    keep: impl Send + 'static,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (edge, unknown, me) = (edge.clone(), p.unknown.clone(), p.service.clone());
    let svc = move |req| {
        let edge = edge.clone();
        let ctx = RequestCtx::new(Direction::outbound, me.clone(), unknown.clone());
        async move { edge.serve(req, ctx).await }
    };
    tokio::spawn(serve_http_conn(sock, stop, keep, svc));
}

/// The HTTP proxy port: the destination is the host each request names.
pub(crate) async fn serve_http_proxy(
    p: Parts,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    drain: Drain,
) {
    let edge = Edge::new(
        stack(&p, Listen::ByAuthority),
        p.metrics.clone(),
        p.recorder.clone(),
    );
    let limits = p.limits.clone();
    tandem_runtime::accept_loop(listener, "http proxy", stopped(stop.clone()), |sock, _| {
        if let Some(slot) = limits.connection() {
            serve_conn(&edge, &p, sock, stop.clone(), (drain.clone(), slot));
        }
    })
    .await;
}

/// A per-upstream port: every connection goes to destination `name`, as
/// HTTP or, for an opaque TCP destination, as bytes.
pub(crate) async fn serve_upstream(
    p: Parts,
    name: Arc<str>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    drain: Drain,
) {
    let edge = Edge::new(
        stack(&p, Listen::Fixed(name.clone())),
        p.metrics.clone(),
        p.recorder.clone(),
    );
    let limits = p.limits.clone();
    tandem_runtime::accept_loop(listener, "upstream", stopped(stop.clone()), |sock, _| {
        let Some(slot) = limits.connection() else {
            return;
        };
        let dest = p.routes.load().destination(destination_key(&name)).cloned();
        match dest {
            Some(dest) if dest.protocol == Protocol::Tcp => {
                relay_to(&p, &dest, sock, (drain.clone(), slot));
            }
            // HTTP, or a destination not known yet: the HTTP path routes,
            // discovers, or answers with a clear error.
            _ => serve_conn(&edge, &p, sock, stop.clone(), (drain.clone(), slot)),
        }
    })
    .await;
}

/// Relays an opaque TCP connection to an endpoint of `dest` (over mTLS to
/// a sidecar), in a task holding `keep`.
pub(crate) fn relay_to(
    p: &Parts,
    dest: &routing::Destination,
    sock: tokio::net::TcpStream,
    keep: impl Send + 'static,
) {
    let Some(ep) = dest
        .backends
        .first()
        .and_then(|b| b.endpoints.get(b.pick()?))
    else {
        tracing::warn!(destination = %dest.name.0, "no live endpoint; closing tcp connection");
        return;
    };
    let target = match ep.server_name.clone() {
        Some(sni) => Target::Mesh(ep.addr(), sni, p.tcp_tls.clone()),
        None => Target::Plain(ep.addr()),
    };
    // Counts as outstanding for balancing; its duration is not a latency,
    // so nothing is observed.
    let pending = ep.load.open();
    let labels = TcpLabels {
        direction: Direction::outbound,
        src_service: p.service.clone(),
        dst_service: dest.name.clone(),
    };
    let metrics = p.metrics.clone();
    tokio::spawn(async move {
        let _keep = (keep, pending);
        relay(sock, target, &metrics, labels).await;
    });
}
