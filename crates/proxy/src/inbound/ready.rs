//! Whether this sidecar can serve its app at all: its service must be
//! declared in the config (`503 not-configured`), and its certificate must
//! not have expired (`503 identity-expired`).

use std::sync::Arc;

use http::{Request, Response};
use tandem_identity::tls::TlsIdentity;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::routing::Routes;
use crate::svc::{layer, Service};

layer!(
    /// Refuses requests this sidecar cannot serve.
    ReadyLayer => Ready {
        routes: Arc<Routes>,
        tls: Arc<TlsIdentity>,
    }
);

impl<S: Service> Service for Ready<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        if self.routes.load().inbound.is_none() {
            return Err(Error::new(
                MeshError::NotConfigured,
                "this proxy's service is not declared in the config",
            ));
        }
        if self.tls.is_expired() {
            return Err(Error::new(
                MeshError::IdentityExpired,
                "this proxy's certificate expired and could not be renewed",
            ));
        }
        self.inner.call(req, ctx).await
    }
}
