//! Inbound: other sidecars → this sidecar → the local app.
//!
//! A connection is accepted (within `--max-connections`), and its first
//! byte tells TLS from plaintext without consuming anything. A TLS record
//! goes through the rustls acceptor, which requires a client SVID from the
//! trust bundle; the verified SPIFFE ID becomes the connection's [`Peer`].
//! In permissive mode plaintext is served too (and counted); a strict
//! service closes it. An HTTP service's requests then go down the stack
//! below; an opaque TCP service's bytes are relayed to the app.
//!
//! The stack, top to bottom:
//!
//! | layer | answers |
//! |---|---|
//! | edge (`edge.rs`) | strict HTTP/1.1 heads (`400`), the flag header, the golden signals |
//! | [`AdmitLayer`]: `--max-requests` | `503 overloaded` |
//! | [`ReadyLayer`]: service declared, certificate valid | `503 not-configured`, `503 identity-expired` |
//! | [`NormalizePathLayer`]: the path the policy matches and the app gets | `400 bad-request` |
//! | [`AuthorizeLayer`]: the access policy, by the caller's verified identity | `403 forbidden` (gRPC `PERMISSION_DENIED`) |
//! | [`ClientIdLayer`]: the headers the app may trust (`tandem-client-id`, `x-forwarded-*`) | |
//! | [`RateLimitLayer`]: the service's `rateLimit` | `429 rate-limited` |
//! | [`InboundDeadlineLayer`]: the caller's deadline | `504 upstream-timeout` |
//! | [`ToApp`]: the app's connection pool | `503 upstream-connect-failure`, `502 upstream-reset` |

pub(crate) mod caller;
pub(crate) mod path;
pub(crate) mod ready;

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use tandem_config::authz::{AuthzRequest, Verdict};
use tandem_config::snapshot::MtlsMode;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::control::identity::Identity;
use crate::ctx::{Peer, RequestCtx};
use crate::edge::Edge;
use crate::listen::{serve_http_conn, stopped, Drain};
use crate::policy::authz::{self, AuthorizeLayer};
use crate::policy::deadline::InboundDeadlineLayer;
use crate::policy::overload::{AdmitLayer, ConnSlot, Limits};
use crate::policy::ratelimit::RateLimitLayer;
use crate::routing::Routes;
use crate::svc::Service;
use crate::telemetry::metrics::{Direction, HandshakeLabels, Metrics, Name, TcpLabels};
use crate::transport::forward::{Connectors, ToApp};
use crate::transport::tcp::{relay, Target};
use crate::transport::tls::{self, HANDSHAKE_TIMEOUT, PLAINTEXT_SILENCE};
use caller::{ClientIdLayer, Peers};
use path::NormalizePathLayer;
use ready::ReadyLayer;

/// The handles the inbound side works with.
pub(crate) struct Inbound<S> {
    edge: Arc<Edge<S>>,
    routes: Arc<Routes>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    /// mTLS server configs: HTTP (ALPN h2, http/1.1) and opaque TCP.
    server_http: Arc<rustls::ServerConfig>,
    server_tcp: Arc<rustls::ServerConfig>,
    peers: Peers,
    app: SocketAddr,
    service: Name,
    unknown: Name,
}

/// What the inbound side is built from.
pub(crate) struct Parts {
    pub(crate) routes: Arc<Routes>,
    pub(crate) identity: Arc<Identity>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) recorder: Arc<crate::telemetry::record::Recorder>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) connectors: Arc<Connectors>,
    pub(crate) app: SocketAddr,
    pub(crate) app_authority: Authority,
    pub(crate) service: Name,
}

/// The inbound side: its stack, and its listener's handles.
pub(crate) fn build(p: Parts) -> Arc<Inbound<impl Service>> {
    let stack = ServiceBuilder::new()
        .layer(AdmitLayer {
            permits: p.limits.inbound_requests.clone(),
            limits: p.limits.clone(),
        })
        .layer(ReadyLayer {
            routes: p.routes.clone(),
            tls: p.identity.tls.clone(),
        })
        .layer(NormalizePathLayer {})
        .layer(AuthorizeLayer {
            routes: p.routes.clone(),
            metrics: p.metrics.clone(),
        })
        .layer(ClientIdLayer {})
        .layer(RateLimitLayer {
            routes: p.routes.clone(),
        })
        .layer(InboundDeadlineLayer {})
        .service(ToApp::new(p.connectors, p.routes.clone(), p.app_authority));
    use tandem_identity::tls::{ALPN_H2, ALPN_HTTP11};
    let unknown = Name::from("unknown");
    Arc::new(Inbound {
        edge: Edge::new(stack, p.metrics.clone(), p.recorder.clone()),
        server_http: p.identity.tls.server_config(&[ALPN_H2, ALPN_HTTP11]),
        server_tcp: p.identity.tls.server_config(&[]),
        routes: p.routes,
        identity: p.identity,
        metrics: p.metrics,
        limits: p.limits,
        peers: Peers::new(unknown.clone()),
        app: p.app,
        service: p.service,
        unknown,
    })
}

impl<S: Service> Inbound<S> {
    /// Accepts inbound connections until `stop`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
        drain: Drain,
    ) {
        let me = self.clone();
        tandem_runtime::accept_loop(
            listener,
            "inbound",
            stopped(stop.clone()),
            move |sock, _| {
                let Some(slot) = me.limits.connection() else {
                    return;
                };
                tokio::spawn(
                    me.clone()
                        .connection(sock, stop.clone(), drain.clone(), slot),
                );
            },
        )
        .await;
    }

    fn count_handshake(&self, result: &'static str) {
        self.metrics
            .handshakes
            .get_or_create(&HandshakeLabels {
                direction: Direction::inbound,
                result,
            })
            .inc();
    }

    /// One inbound connection: mTLS (or, for a permissive service,
    /// plaintext), then HTTP or opaque TCP to the app.
    async fn connection(
        self: Arc<Self>,
        sock: TcpStream,
        stop: watch::Receiver<bool>,
        drain: Drain,
        slot: ConnSlot,
    ) {
        let remote = sock.peer_addr().ok();
        let Some(inbound) = self.routes.load().inbound.clone() else {
            tracing::warn!(
                "inbound connection refused: service `{}` is not declared in the config",
                self.service.0
            );
            return;
        };
        // A TLS connection starts with a handshake record (0x16); peeking
        // tells it from plaintext without consuming anything. A TLS client
        // sends its hello at once; a plaintext client of a
        // server-speaks-first protocol sends nothing, so for a permissive
        // TCP service silence soon means plaintext.
        let permissive = inbound.mtls == MtlsMode::Permissive;
        let silent_is_plain = permissive && !inbound.protocol.is_http();
        let wait = if silent_is_plain {
            PLAINTEXT_SILENCE
        } else {
            HANDSHAKE_TIMEOUT
        };
        let mut first = [0u8; 1];
        match tokio::time::timeout(wait, sock.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(_) => return,
            Err(_) if silent_is_plain => first[0] = 0,
            Err(_) => {
                self.count_handshake("timeout");
                return;
            }
        }
        let (conn, peer): (tls::Inbound, Option<Arc<Peer>>) = if first[0] != 0x16 {
            if !permissive {
                self.count_handshake("plaintext");
                tracing::debug!("plaintext connection refused: the service requires mTLS");
                return;
            }
            if self.identity.tls.is_expired() {
                return;
            }
            self.metrics.plaintext.inc();
            (tls::Inbound::Left(sock), None)
        } else {
            let cfg = if inbound.protocol.is_http() {
                self.server_http.clone()
            } else {
                self.server_tcp.clone()
            };
            let accepted = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(cfg).accept(sock),
            )
            .await;
            let mut stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = tandem_identity::tls::failure_reason(&e);
                    self.count_handshake(reason);
                    tracing::debug!(%reason, error = %e, "inbound mTLS handshake failed");
                    return;
                }
                Err(_) => {
                    self.count_handshake("timeout");
                    return;
                }
            };
            let id = tandem_identity::tls::peer_id(
                stream.get_ref().1.peer_certificates(),
                self.identity.tls.trust_domain(),
            );
            let Some(id) = id else {
                self.count_handshake("not-an-svid");
                return;
            };
            self.count_handshake("ok");
            stream
                .get_mut()
                .1
                .set_buffer_limit(Some(tls::TLS_SEND_BUFFER));
            (tls::Inbound::Right(Box::new(stream)), self.peers.get(&id))
        };
        let src = peer
            .as_ref()
            .map_or_else(|| self.unknown.clone(), |p| p.service.clone());
        if inbound.protocol.is_http() {
            let me = self.clone();
            let svc = move |req| {
                let me = me.clone();
                let mut ctx = RequestCtx::new(Direction::inbound, src.clone(), me.service.clone());
                ctx.caller = peer.clone();
                ctx.remote = remote;
                async move { me.edge.serve(req, ctx).await }
            };
            serve_http_conn(conn, stop, (drain, slot), svc).await;
        } else {
            // Opaque TCP: the access policy's identity and port rules,
            // once, when the connection opens.
            let denied = {
                let none = |_: &str| Vec::new();
                let r = AuthzRequest {
                    caller: peer.as_deref().map(authz::caller),
                    port: inbound.port,
                    method: "",
                    path: "",
                    query: "",
                    header: &none,
                };
                let d = inbound.authz.decide(&r);
                authz::report(&self.metrics, &d, peer.as_deref(), &r);
                d.verdict == Verdict::Deny
            };
            if denied {
                return;
            }
            let _keep = (drain, slot);
            let labels = TcpLabels {
                direction: Direction::inbound,
                src_service: src,
                dst_service: self.service.clone(),
            };
            relay(conn, Target::Plain(self.app), &self.metrics, labels).await;
        }
    }
}
