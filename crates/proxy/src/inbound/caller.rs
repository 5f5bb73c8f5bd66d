//! Who is calling: the verified SPIFFE ID of an inbound connection, made
//! into the [`Peer`] that its requests carry, and the `tandem-client-id`
//! header the app gets from it.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use tandem_identity::SpiffeId;
use tandem_runtime::sync::RwLock;

use crate::body::Body;
use crate::ctx::{Peer, RequestCtx};
use crate::error::Error;
use crate::svc::{layer, Service};
use crate::telemetry::metrics::Name;

/// The header the inbound sidecar sets to the caller's verified SPIFFE ID
/// (and removes from anything that arrives, so it cannot be spoofed).
pub(crate) const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("tandem-client-id");

/// Most distinct callers remembered; further ones get a peer of their own
/// per connection, labelled `unknown` in metrics.
const MAX_PEERS: usize = 256;

/// Callers seen, by SPIFFE ID: one shared [`Peer`] each (bounded).
pub(crate) struct Peers {
    known: RwLock<HashMap<Box<str>, Arc<Peer>>>,
    unknown: Name,
}

impl Peers {
    pub(crate) fn new(unknown: Name) -> Self {
        Peers {
            known: RwLock::new(HashMap::new()),
            unknown,
        }
    }

    /// The peer for a verified identity; `None` if its ID cannot be a
    /// header value (it always can for an ID that passed the SVID checks).
    pub(crate) fn get(&self, id: &SpiffeId) -> Option<Arc<Peer>> {
        let uri = id.uri();
        if let Some(p) = self.known.read().get(uri.as_str()) {
            return Some(p.clone());
        }
        let client_id = HeaderValue::from_str(&uri).ok()?;
        let mut known = self.known.write();
        let room = known.len() < MAX_PEERS;
        let peer = Arc::new(Peer {
            service: if room && is_label(&id.service) {
                Name::from(id.service.as_str())
            } else {
                self.unknown.clone()
            },
            id: Arc::from(uri.as_str()),
            namespace: Arc::from(id.namespace.as_str()),
            name: Arc::from(id.service.as_str()),
            client_id,
        });
        if room {
            known.insert(uri.into_boxed_str(), peer.clone());
        }
        Some(peer)
    }
}

/// A service name fit for a metric label.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

layer!(
    /// The headers an app behind the sidecar may trust (docs/security.md).
    /// Every header that reads as one the sidecar sets once `_` is taken
    /// for `-` (`tandem_client_id`, as CGI-style servers read it) goes;
    /// then `tandem-client-id` is the caller's verified SPIFFE ID (and
    /// absent for a plaintext caller), `x-forwarded-proto` the scheme of
    /// this hop, and the address of the connection's other end is appended
    /// to `x-forwarded-for`. A `Connection` header cannot make these
    /// hop-by-hop: the hop to the app keeps them (`transport/forward.rs`).
    ClientIdLayer => ClientId {}
);

pub(crate) const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");

impl<S: Service> Service for ClientId<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let headers = req.headers_mut();
        drop_look_alikes(headers);
        headers.remove(&CLIENT_ID_HEADER);
        if let Some(p) = &ctx.caller {
            headers.insert(CLIENT_ID_HEADER, p.client_id.clone());
        }
        headers.insert(
            XFP,
            HeaderValue::from_static(if ctx.caller.is_some() {
                "https"
            } else {
                "http"
            }),
        );
        if let Some(addr) = ctx.remote {
            if let Ok(v) = HeaderValue::from_str(&forwarded_for(headers, addr.ip())) {
                headers.insert(XFF, v);
            }
        }
        self.inner.call(req, ctx).await
    }
}

/// The `x-forwarded-for` list the caller sent (several lines read as one
/// list), with `ip` appended: the last entry is the one the sidecar saw.
fn forwarded_for(headers: &http::HeaderMap, ip: std::net::IpAddr) -> String {
    let mut list = String::new();
    for v in headers.get_all(&XFF) {
        for item in v.to_str().unwrap_or("").split(',') {
            let item = item.trim();
            if !item.is_empty() {
                list.push_str(item);
                list.push_str(", ");
            }
        }
    }
    list.push_str(&ip.to_string());
    list
}

/// Removes the headers whose names contain `_` and read, with `-` for
/// `_`, as a header the sidecar sets. Nothing is allocated unless such a
/// header came.
fn drop_look_alikes(headers: &mut http::HeaderMap) {
    let reads_as_ours = |name: &str| {
        let dashed = name.replace('_', "-");
        dashed.starts_with("tandem-") || dashed == XFF.as_str() || dashed == XFP.as_str()
    };
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_') && reads_as_ours(k.as_str()))
        .cloned()
        .collect();
    for k in found {
        headers.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alikes_go_and_the_forwarded_list_ends_with_the_peer() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("tandem_client_id", "spiffe://evil"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_app_id", "kept"),
            ("x-forwarded-for", "9.9.9.9, 8.8.8.8"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h.append(XFF, HeaderValue::from_static(" ,7.7.7.7"));
        drop_look_alikes(&mut h);
        assert!(h.get("tandem_client_id").is_none());
        assert!(h.get("x_forwarded_for").is_none());
        assert_eq!(h.get("x_app_id").map(|v| v.as_bytes()), Some(&b"kept"[..]));
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        assert_eq!(
            forwarded_for(&h, ip),
            "9.9.9.9, 8.8.8.8, 7.7.7.7, 127.0.0.1"
        );
        assert_eq!(forwarded_for(&http::HeaderMap::new(), ip), "127.0.0.1");
    }

    #[test]
    fn one_peer_per_identity_with_the_namespace_kept() {
        let peers = Peers::new(Name::from("unknown"));
        let shop = SpiffeId::new("td", "shop", "web");
        let blog = SpiffeId::new("td", "blog", "web");
        let a = peers.get(&shop).expect("peer");
        assert!(Arc::ptr_eq(&a, &peers.get(&shop).expect("peer")));
        let b = peers.get(&blog).expect("peer");
        assert_eq!(&*a.id, "spiffe://td/ns/shop/svc/web");
        assert_ne!(a.id, b.id);
        assert_eq!(a.service, b.service);
        assert_eq!(a.client_id, "spiffe://td/ns/shop/svc/web");
        // Past the bound: still the full identity, labelled `unknown`.
        for i in 0..MAX_PEERS {
            peers.get(&SpiffeId::new("td", "many", &format!("svc-{i}")));
        }
        let late = peers
            .get(&SpiffeId::new("td", "late", "api"))
            .expect("peer");
        assert_eq!(&*late.service.0, "unknown");
        assert_eq!(&*late.id, "spiffe://td/ns/late/svc/api");
    }
}
