//! Load balancing: which endpoint of the chosen backend a try goes to
//! ([`pick`]), and what the balancer learns from how it went ([`ewma`]).
//! The layer picks for each try (a retry avoids the endpoints already
//! tried), counts the try as outstanding on its endpoint, and observes its
//! latency, or a penalty when it failed, so a slow or failing endpoint is
//! chosen less.

pub(crate) mod ewma;
pub(crate) mod pick;

use http::{Request, Response};

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};

layer!(
    /// Picks the endpoint of each try.
    BalanceLayer => Balance {}
);

impl<S: Service> Service for Balance<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        ctx.endpoint = None;
        ctx.upstream_flag = None;
        let Some(dest) = ctx.dest.clone() else {
            return Err(Error::new(MeshError::NoEndpoints, "no destination"));
        };
        let Some(backend) = dest.backends.get(ctx.backend) else {
            return Err(Error::new(MeshError::NoEndpoints, "no backend"));
        };
        let picked = if ctx.tried.is_empty() {
            backend.pick_for(ctx.hash_key)
        } else {
            backend.pick_avoiding(&ctx.tried)
        };
        let Some(i) = picked else {
            return Err(Error::new(
                MeshError::NoEndpoints,
                format!("service `{}` has no live endpoint", backend.name.0),
            ));
        };
        ctx.endpoint = Some(i);
        ctx.tries += 1;
        let in_flight = backend.endpoints[i].load.start();
        let result = self.inner.call(req, ctx).await;
        match &result {
            // A peer sidecar that could not reach its own app answers fast
            // with a mesh error: that is a failure of this endpoint, not a
            // quick success.
            Ok(_) if peer_failed(ctx.upstream_flag) => in_flight.failed(),
            Ok(_) => {
                in_flight.complete();
            }
            // Refused in this sidecar: nothing to learn about the endpoint.
            Err(e) if matches!(e.kind, MeshError::Overflow | MeshError::IdentityExpired) => {
                in_flight.cancel()
            }
            Err(_) => in_flight.failed(),
        }
        result
    }
}

/// The flags a peer sidecar answers with when its side of the hop failed.
fn peer_failed(flag: Option<MeshError>) -> bool {
    matches!(
        flag,
        Some(
            MeshError::ConnectFailure
                | MeshError::UpstreamReset
                | MeshError::NotConfigured
                | MeshError::IdentityExpired
        )
    )
}
