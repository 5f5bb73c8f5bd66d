//! The last step of both stacks: a request goes out on a connection of a
//! pool, to the chosen endpoint (outbound) or to the local app (inbound).
//! Hop-by-hop headers are stripped and the URI is rewritten for the hop
//! (origin-form for HTTP/1.1; for HTTP/2 an absolute URI with the
//! authority the caller used, the endpoint's `ip:port` only when it named
//! none); bodies and
//! trailers stream through untouched; on `101 Switching Protocols` the two
//! upgraded connections are spliced.

use std::sync::Arc;

use http::header::{HeaderName, CONNECTION, HOST, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tandem_config::snapshot::Protocol;
use tandem_identity::tls::TlsIdentity;
use tokio::time::Instant;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError, ERROR_HEADER};
use crate::inbound::caller::{CLIENT_ID_HEADER, XFF, XFP};
use crate::routing::Routes;
use crate::svc::Service;
use crate::telemetry::metrics::{Direction, HandshakeLabels};
use crate::transport::pool::{ConnLimits, Pool, PoolError};
use crate::transport::tls::{Connector, Handshakes};

/// The connectors of the HTTP pools: mTLS to meshed endpoints offering
/// ALPN http/1.1 or h2 (plain TCP for `http://` endpoints and the app).
pub(crate) struct Connectors {
    pub(crate) h1: Connector,
    pub(crate) h2: Connector,
    pub(crate) handshakes: Handshakes,
}

impl Connectors {
    fn for_protocol(&self, p: Protocol) -> &Connector {
        if p.is_h2() {
            &self.h2
        } else {
            &self.h1
        }
    }
}

/// Outbound: sends each try to the endpoint the balancer chose.
pub(crate) struct ToEndpoint {
    pub(crate) connectors: Arc<Connectors>,
    pub(crate) tls: Arc<TlsIdentity>,
}

impl Service for ToEndpoint {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return Err(Error::new(MeshError::NoEndpoints, "no destination"));
        };
        let backend = dest.backends.get(ctx.backend);
        let Some((backend, ep)) = backend.and_then(|b| Some((b, b.endpoints.get(ctx.endpoint?)?)))
        else {
            return Err(Error::new(MeshError::NoEndpoints, "no endpoint chosen"));
        };
        // Never plaintext to a sidecar: with an expired certificate the
        // request is refused here.
        if ep.meshed && self.tls.is_expired() {
            return Err(Error::new(
                MeshError::IdentityExpired,
                "this proxy's certificate expired and could not be renewed",
            ));
        }
        let limits = dest.policy.as_ref().and_then(|p| p.conn_limits.as_ref());
        let connector = self.connectors.for_protocol(dest.protocol);
        let mut req = req;
        ctx.trace_hop(req.headers_mut());
        // From here to the answer's headers (or the failure) the request
        // waits on the connection, the network and the destination.
        ctx.timings.wait_start();
        let sent = forward(
            req,
            &ep.pool,
            connector,
            &self.connectors.handshakes,
            dest.protocol,
            limits,
            ctx,
        )
        .await;
        ctx.timings.wait_end();
        match sent {
            Ok(resp) => {
                ctx.timings.upstream_headers = Some(Instant::now());
                if ep.meshed {
                    ctx.upstream_flag = flag_of(resp.headers());
                }
                ctx.trace_hop_done(resp.status().as_u16(), flag_of(resp.headers()));
                Ok(resp)
            }
            Err(e) => {
                ctx.trace_hop_done(0, Some(e.kind));
                Err(Error::new(
                    e.kind,
                    format!("{} ({}): {}", backend.name.0, ep.authority, e.detail),
                ))
            }
        }
    }
}

/// Inbound: sends the request to the local app, speaking the protocol of
/// the proxy's own Service.
pub(crate) struct ToApp {
    pub(crate) connectors: Arc<Connectors>,
    pub(crate) routes: Arc<Routes>,
    pub(crate) authority: Authority,
    h1: Arc<Pool>,
    h2: Arc<Pool>,
}

impl ToApp {
    pub(crate) fn new(
        connectors: Arc<Connectors>,
        routes: Arc<Routes>,
        authority: Authority,
    ) -> Self {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        ToApp {
            connectors,
            routes,
            h1: Arc::new(Pool::new(uri.clone(), false)),
            h2: Arc::new(Pool::new(uri, true)),
            authority,
        }
    }
}

impl Service for ToApp {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let protocol = self
            .routes
            .load()
            .inbound
            .as_ref()
            .map_or(Protocol::Http, |i| i.protocol);
        let pool = if protocol.is_h2() { &self.h2 } else { &self.h1 };
        let connector = self.connectors.for_protocol(protocol);
        let handshakes = &self.connectors.handshakes;
        let mut req = req;
        ctx.trace_hop(req.headers_mut());
        ctx.timings.wait_start();
        let sent = forward(req, pool, connector, handshakes, protocol, None, ctx).await;
        ctx.timings.wait_end();
        match sent {
            Ok(mut resp) => {
                ctx.timings.upstream_headers = Some(Instant::now());
                // Only the mesh says `tandem-error`: an app's own (or one it
                // passes on) never reaches the caller as the mesh's word.
                resp.headers_mut().remove(&ERROR_HEADER);
                Ok(resp)
            }
            Err(e) => Err(Error::new(
                e.kind,
                format!("local app at {}: {}", self.authority, e.detail),
            )),
        }
    }
}

/// The flag of an answer made by another sidecar, if it names one of ours.
fn flag_of(headers: &HeaderMap) -> Option<MeshError> {
    MeshError::from_reason(headers.get(&ERROR_HEADER)?.as_bytes())
}

// `Trailer` is end-to-end (RFC 9110 §6.6.2) and hyper's HTTP/1.1 encoder only
// sends trailers it names, so it stays.
const HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Headers a `Connection` header cannot make hop-by-hop: `Host`, which
/// every request needs, and those the inbound sidecar sets for its app
/// (docs/security.md).
const END_TO_END: [HeaderName; 4] = [HOST, CLIENT_ID_HEADER, XFF, XFP];

/// Removes hop-by-hop headers (and those the Connection header names,
/// except [`END_TO_END`] ones); keeps `Connection: upgrade` + `Upgrade` on
/// an upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Header names listed in `Connection` (rare beyond keep-alive/close, so
    // the list is usually empty and allocates nothing).
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        let kept = END_TO_END.contains(&n) || (upgrade && n == UPGRADE);
        if !kept {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP.iter() {
        if !(upgrade && n == UPGRADE) {
            headers.remove(n);
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows; gRPC needs it.
    if let Some(te) = headers.get(http::header::TE) {
        if te.as_bytes() != b"trailers" {
            headers.remove(http::header::TE);
        }
    }
}

/// Sends a request on a connection of `pool` speaking `protocol`, and
/// relays the response (and an upgraded connection, if any). `ctx.sent` is
/// set once the request has a connection or is opening one; an HTTP/2
/// stream is held in `ctx.held` until the response body ends.
async fn forward(
    mut req: Request<Body>,
    pool: &Arc<Pool>,
    connector: &Connector,
    handshakes: &Handshakes,
    protocol: Protocol,
    limits: Option<&ConnLimits>,
    ctx: &mut RequestCtx,
) -> Result<Response<Body>, Error> {
    let upgrade = is_upgrade(&req);
    // An HTTP/1.1 hop needs a Host; a request that came in over HTTP/2 has
    // only the `:authority`.
    let fallback_host = if !protocol.is_h2() && !req.headers().contains_key(HOST) {
        req.uri()
            .authority()
            .or(pool.uri().authority())
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    } else {
        None
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // An HTTP/1.1 caller's connection can carry its next request only once
    // this one's body was read to the end, even if the hop stops early.
    let body = match body {
        Body::Stream(b) if parts.version == Version::HTTP_11 && !upgrade => {
            Body::Drained(crate::body::Drained::new(b))
        }
        b => b,
    };
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if protocol.is_h2() {
        // HTTP/2 takes `:scheme` and `:authority` from an absolute URI. The
        // authority is the one the caller used (`catalog:8080`), so the app
        // sees the name it was called by, not the endpoint's address.
        let mut uri = Uri::builder();
        let called = parts
            .headers
            .get(HOST)
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| parts.uri.authority().cloned());
        if let (Some(scheme), Some(auth)) = (
            pool.uri().scheme(),
            called.as_ref().or(pool.uri().authority()),
        ) {
            uri = uri.scheme(scheme.clone()).authority(auth.clone());
        }
        parts.uri = uri
            .path_and_query(pq)
            .build()
            .map_err(|e| Error::new(MeshError::BadRequest, e.to_string()))?;
        parts.version = Version::HTTP_2;
        parts.headers.remove(HOST);
    } else {
        // HTTP/1.1 to an origin: origin-form.
        parts.uri = Uri::from(pq);
        parts.version = Version::HTTP_11;
        if let Some(h) = fallback_host {
            parts.headers.insert(HOST, h);
        }
    }
    let req = Request::from_parts(parts, body);
    let (mut resp, stream) = pool
        .send(connector, req, limits, &mut ctx.sent)
        .await
        .map_err(|e| match e {
            PoolError::Overflow(why) => Error::new(MeshError::Overflow, why),
            PoolError::Unsent(_) => Error::new(
                MeshError::UpstreamReset,
                "every connection closed before the request could be written",
            ),
            PoolError::Connect(e) => {
                let kind = match tls_error(&*e) {
                    Some(_) => MeshError::UpstreamTls,
                    None => MeshError::ConnectFailure,
                };
                Error::new(kind, format!("connect: {}", error_chain(&*e)))
            }
            // The request's own body failed (the caller sent a malformed
            // one or went away): the caller's fault, not the upstream's.
            PoolError::Send(e) if e.is_user() => Error::new(
                MeshError::BadRequest,
                format!("the request body could not be read: {}", error_chain(&e)),
            ),
            PoolError::Send(e) => {
                let kind = match tls_error(&e) {
                    Some(reason) => {
                        // In TLS 1.3 the server checks the client's
                        // certificate after the client's side of the
                        // handshake is done: a refusal shows up here, on
                        // the first read.
                        handshakes
                            .get_or_create(&HandshakeLabels {
                                direction: Direction::outbound,
                                result: reason,
                            })
                            .inc();
                        MeshError::UpstreamTls
                    }
                    None => MeshError::UpstreamReset,
                };
                Error::new(kind, error_chain(&e))
            }
        })?;
    ctx.held.stream = stream;
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade && switching);
    if let (Some(down), true) = (downstream_upgrade, switching) {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
    Ok(resp.map(Body::Stream))
}

/// The TLS failure behind an error, as a metric reason, if there is one.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(tandem_identity::tls::rustls_reason(t));
        }
        if let Some(t) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tandem_identity::tls::rustls_reason(t));
        }
        cur = c.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_told_from_resets() {
        let refused = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate,
        ));
        assert_eq!(tls_error(&refused), Some("refused-by-peer"));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(tls_error(&reset), None);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            "keep-alive, x-custom, Host, tandem-client-id"
                .parse()
                .expect("v"),
        );
        h.insert(HOST, "web".parse().expect("v"));
        h.insert(
            CLIENT_ID_HEADER,
            "spiffe://td/ns/a/svc/b".parse().expect("v"),
        );
        h.insert("x-custom", "1".parse().expect("v"));
        h.insert("keep-alive", "timeout=5".parse().expect("v"));
        h.insert("te", "trailers".parse().expect("v"));
        h.insert("x-app", "kept".parse().expect("v"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-custom").is_none());
        assert_eq!(h.get(HOST).map(|v| v.as_bytes()), Some(&b"web"[..]));
        assert!(h.get(CLIENT_ID_HEADER).is_some());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(CONNECTION).is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert_eq!(h.get("x-app").map(|v| v.as_bytes()), Some(&b"kept"[..]));
    }

    #[test]
    fn upgrades_are_http11_with_connection_upgrade() {
        let r = Request::get("/ws")
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "keep-alive, Upgrade")
            .body(())
            .expect("req");
        assert!(is_upgrade(&r));
        let r = Request::get("/ws")
            .header(UPGRADE, "websocket")
            .body(())
            .expect("req");
        assert!(!is_upgrade(&r));
    }
}
