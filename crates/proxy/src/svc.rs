//! The seam every policy plugs into: a [`Service`] is one step of a
//! sidecar's request path, and a [`tower::Layer`] wraps one around the
//! next, so a stack reads top to bottom with `tower::ServiceBuilder` in one
//! place per direction (`inbound.rs`, `outbound.rs`).
//!
//! Why not `tower::Service` itself: a step here takes `&self` and the
//! request's context by `&mut` for the length of the call, which is what
//! retries (call the next step several times, reading what it decided) and
//! the context (one value every step reads and writes) need. tower's
//! `Service` takes `&mut self` with `poll_ready` and owns its future, which
//! would force the context into a shared, locked value and each step's
//! future into a box. Here the steps' futures nest by value into one
//! future per request, with no allocation per step; backpressure is the
//! admission layers' explicit answer (`503 overloaded`, `overflow`) rather
//! than `poll_ready`.

use std::future::Future;

use http::{Request, Response};

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::Error;

pub(crate) trait Service: Send + Sync + 'static {
    /// Handles one request (or one try of it): an answer, or the reason
    /// the mesh could not get one.
    fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send;
}

/// Declares a layer `$layer` holding its settings, and the service `$svc<S>`
/// it makes around the next step `S`: the next step as `inner`, and a copy
/// of each setting.
macro_rules! layer {
    ($(#[$doc:meta])* $layer:ident => $svc:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub(crate) struct $layer { $(pub(crate) $field: $ty),* }

        impl<S> tower::Layer<S> for $layer {
            type Service = $svc<S>;
            fn layer(&self, inner: S) -> $svc<S> {
                $svc { inner, $($field: self.$field.clone()),* }
            }
        }

        pub(crate) struct $svc<S> {
            inner: S,
            $($field: $ty),*
        }
    };
}
pub(crate) use layer;
