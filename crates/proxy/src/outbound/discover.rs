//! Which destination an outbound request is for: fixed for a per-upstream
//! port, else from the absolute URI or the Host header on the HTTP proxy
//! port. A destination the proxy has never needed is discovered on demand:
//! the proxy subscribes to it on the control stream and waits (up to
//! [`DISCOVERY_WAIT`]) for a snapshot that has it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::{Request, Response};
use tokio::time::Instant;

use crate::body::Body;
use crate::control::Subscriptions;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::outbound::egress::{Listed, Me};
use crate::policy::authz::header_values;
use crate::routing::{Destination, Routes};
use crate::svc::{layer, Service};
use tandem_config::authz::normalize_path;

/// How long a request for a destination the proxy has not seen yet waits
/// for the control plane to send it.
pub(crate) const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// Where the outbound traffic of a listener goes.
#[derive(Clone)]
pub(crate) enum Target {
    /// The HTTP proxy port: destination from the request's authority.
    ByAuthority,
    /// A per-upstream port: always this destination.
    Fixed(Arc<str>),
}

layer!(
    /// Finds the request's destination: a mesh service, or a host outside
    /// the mesh under the egress rules (`egress.rs`).
    DiscoverLayer => Discover {
        target: Target,
        routes: Arc<Routes>,
        control: Arc<Subscriptions>,
        me: Arc<Me>,
    }
);

impl<S: Service> Service for Discover<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let (dest, port) = {
            // Borrowed unless the host needs lower-casing: no allocation
            // per request.
            let (host, port): (Cow<'_, str>, Option<u16>) = match &self.target {
                Target::Fixed(name) => (Cow::Borrowed(&**name), None),
                Target::ByAuthority => match authority_of(&req) {
                    Some((h, p)) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                        (Cow::Owned(h.to_ascii_lowercase()), p)
                    }
                    Some((h, p)) => (Cow::Borrowed(h), p),
                    None => return Err(Error::new(MeshError::BadRequest, "request names no host")),
                },
            };
            let key = destination_key(&host);
            let known = self.routes.load().destination(key).cloned();
            let dest = match known {
                Some(d) => d,
                None if matches!(self.target, Target::Fixed(_)) => {
                    discover(&self.routes, &self.control, key).await?
                }
                None => {
                    // One spelling of an outside host: no brackets around
                    // an IPv6 address, no final dot.
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let host = host.strip_suffix('.').unwrap_or(host);
                    let (listed, mesh) = {
                        let routing = self.routes.load();
                        (routing.egress.listed(host), routing.egress.maybe_mesh(host))
                    };
                    if listed.is_none() && mesh {
                        match discover(&self.routes, &self.control, key).await {
                            Ok(d) => d,
                            // A dotted name no service has: outside the
                            // mesh. A bare name stays a mesh name.
                            Err(e) if e.kind == MeshError::UnknownService && host.contains('.') => {
                                self.egress(&req, listed, host, port)?
                            }
                            Err(e) => return Err(e),
                        }
                    } else {
                        self.egress(&req, listed, host, port)?
                    }
                }
            };
            (dest, port)
        };
        // A per-upstream port stands for its destination: a request that
        // names only the local address (`127.0.0.1:15001`, `localhost`)
        // goes out naming the service (`catalog:8080`), so the app behind
        // the destination's sidecar sees the name it is called by.
        if matches!(self.target, Target::Fixed(_)) && names_local_address(&req) {
            req.headers_mut().insert(HOST, dest.authority.clone());
        }
        ctx.port = port;
        ctx.dest = Some(dest);
        self.inner.call(req, ctx).await
    }
}

impl<S> Discover<S> {
    /// The destination of a plain HTTP call to a host outside the mesh,
    /// if the egress rules let this sidecar make it.
    fn egress(
        &self,
        req: &Request<Body>,
        listed: Listed,
        host: &str,
        port: Option<u16>,
    ) -> Result<Arc<Destination>, Error> {
        if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            return Err(Error::new(
                MeshError::BadRequest,
                "an https:// URL goes through the proxy with CONNECT",
            ));
        }
        let port = port.unwrap_or(80);
        let routing = self.routes.load();
        // The path an access policy matches, as inbound: `//admin`,
        // `/./admin` and `/%61dmin` are all `/admin`, and a path that
        // cannot be read one way only is refused.
        let raw = req.uri().path();
        let path = match normalize_path(raw) {
            Ok(p) => p,
            Err(e) if routing.egress.has_policy(listed) => {
                return Err(Error::new(MeshError::BadRequest, e.describe()))
            }
            Err(_) => std::borrow::Cow::Borrowed(raw),
        };
        routing.egress.check(
            listed,
            host,
            port,
            &self.me,
            req.method().as_str(),
            &path,
            req.uri().query().unwrap_or(""),
            &|name| header_values(req, name),
        )?;
        routing
            .egress
            .destination(listed, host, port, self.routes.kept())
    }
}

/// Asks the control plane for a destination this proxy has not needed
/// before and waits briefly for a snapshot that has it (the HTTP stacks,
/// and the DNS answers of transparent interception).
pub(crate) async fn discover(
    routes: &Routes,
    control: &Subscriptions,
    host: &str,
) -> Result<Arc<Destination>, Error> {
    let unknown = || {
        Error::new(
            MeshError::UnknownService,
            format!("no service `{host}` in the mesh"),
        )
    };
    let unavailable = |why: &str| {
        Error::new(
            MeshError::DiscoveryUnavailable,
            format!("destination `{host}` is not yet known to this proxy and {why}"),
        )
    };
    if routes.load().is_unknown(host) || !plausible_service_name(host) {
        return Err(unknown());
    }
    let mut changes = routes.changes();
    if !control.subscribe(host) {
        return Err(unavailable(
            "this proxy already tracks the maximum number of destinations",
        ));
    }
    if !control.is_connected() {
        return Err(unavailable("the control plane is unreachable"));
    }
    let deadline = Instant::now() + DISCOVERY_WAIT;
    loop {
        {
            let routing = routes.load();
            if let Some(d) = routing.destination(host) {
                return Ok(d.clone());
            }
            if routing.is_unknown(host) {
                return Err(unknown());
            }
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Err(unavailable("the control plane did not answer in time")),
        }
    }
}

/// `(host, port)` the application addressed: the absolute URI's authority
/// (HTTP proxy form, HTTP/2 `:authority`) or the Host header.
/// Whether the request's authority is a loopback address or `localhost`
/// (or absent).
fn names_local_address<B>(req: &Request<B>) -> bool {
    match authority_of(req) {
        None => true,
        Some((h, _)) => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
        }
    }
}

fn authority_of<B>(req: &Request<B>) -> Option<(&str, Option<u16>)> {
    let auth = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(HOST)?.to_str().ok()?,
    };
    let auth = auth.rsplit('@').next().unwrap_or(auth);
    match auth.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => Some((h, Some(port))),
            Err(_) => Some((auth, None)),
        },
        _ => Some((auth, None)),
    }
}

/// `catalog.default.svc.cluster.local`, `catalog.default` and (in the
/// proxy's namespace) `catalog` name the same destination: only the first
/// two labels count.
pub(crate) fn destination_key(host: &str) -> &str {
    match host.match_indices('.').nth(1) {
        Some((i, _)) => &host[..i],
        None => host,
    }
}

fn plausible_service_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        let r = Request::get("http://catalog:8080/x").body(()).expect("req");
        assert_eq!(authority_of(&r), Some(("catalog", Some(8080))));
        let r = Request::get("/x")
            .header(HOST, "orders")
            .body(())
            .expect("req");
        assert_eq!(authority_of(&r), Some(("orders", None)));
        let r = Request::get("/x").body(()).expect("req");
        assert_eq!(authority_of(&r), None);
    }

    #[test]
    fn destination_names() {
        assert_eq!(
            destination_key("catalog.default.svc.cluster.local"),
            "catalog.default"
        );
        assert_eq!(destination_key("catalog"), "catalog");
        assert!(plausible_service_name("catalog.shop"));
        assert!(!plausible_service_name("Catalog"));
        assert!(!plausible_service_name(""));
    }
}
