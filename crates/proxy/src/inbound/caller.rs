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
    /// Hands the caller's identity to the app in `tandem-client-id`,
    /// replacing whatever came from outside.
    ClientIdLayer => ClientId {}
);

impl<S: Service> Service for ClientId<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let headers = req.headers_mut();
        headers.remove(&CLIENT_ID_HEADER);
        if let Some(p) = &ctx.caller {
            headers.insert(CLIENT_ID_HEADER, p.client_id.clone());
        }
        self.inner.call(req, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
