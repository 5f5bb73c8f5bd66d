//! The circuit breaker's admission: `circuitBreaker.maxRequests` caps the
//! requests this sidecar has in progress to a destination; over it a
//! request is answered `503 overflow` at once. A request holds its place
//! until its response body ends (the place rides in the request's
//! context). Outlier detection, the other half of the circuit breaker, is
//! in [`crate::policy::outlier`]; the connection caps are the pool's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::policy::RuntimePolicy;
use crate::svc::{layer, Service};

/// One request counted against a destination's `maxRequests`.
pub(crate) struct InProgress(Arc<AtomicUsize>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What admission decided.
pub(crate) enum Admitted {
    /// No limit on the destination.
    Unlimited,
    /// Counted in; the place is held while this lives.
    Counted(InProgress),
    /// At the limit.
    Full,
}

impl RuntimePolicy {
    /// Counts a request in against `maxRequests`.
    pub(crate) fn admit(&self) -> Admitted {
        let Some((max, count)) = &self.max_requests else {
            return Admitted::Unlimited;
        };
        if count.fetch_add(1, Ordering::AcqRel) >= *max {
            count.fetch_sub(1, Ordering::AcqRel);
            return Admitted::Full;
        }
        Admitted::Counted(InProgress(count.clone()))
    }
}

layer!(
    /// `circuitBreaker.maxRequests`.
    AdmissionLayer => Admission {}
);

impl<S: Service> Service for Admission<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        if let Some(dest) = ctx.dest.clone() {
            match dest.policy_for(ctx.rule).map(RuntimePolicy::admit) {
                None | Some(Admitted::Unlimited) => {}
                Some(Admitted::Counted(c)) => ctx.held.in_progress = Some(c),
                Some(Admitted::Full) => {
                    return Err(Error::new(
                        MeshError::Overflow,
                        format!(
                            "`{}` already has its maximum of requests in progress from this sidecar (circuitBreaker.maxRequests)",
                            dest.name.0
                        ),
                    ))
                }
            }
        }
        self.inner.call(req, ctx).await
    }
}
