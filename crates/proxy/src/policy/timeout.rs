//! The per-try timeout (`retry.perTryTimeout`). With outlier detection on,
//! each try is also cut off here at the policy's own deadline, so that the
//! outlier layer above sees every try that a timeout of the mesh's own
//! ended (the request's whole deadline, one layer further up, fires at the
//! same instant and finds the try already answered).

use http::{Request, Response};
use tokio::time::Instant;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};

layer!(
    /// Cuts a try off at its per-try timeout.
    PerTryTimeoutLayer => PerTryTimeout {}
);

impl<S: Service> Service for PerTryTimeout<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        ctx.sent = false;
        let dest = ctx.dest.clone();
        let policy = dest.as_deref().and_then(|d| d.policy_for(ctx.rule));
        let per_try = policy.and_then(|p| p.retry.as_ref()?.per_try_timeout);
        let outlier = dest
            .as_deref()
            .and_then(|d| d.policy.as_ref()?.circuit_breaker.as_ref());
        let own = ctx.own_deadline.filter(|_| outlier.is_some());
        let now = Instant::now();
        let (at, by_per_try) = match (per_try.map(|t| now + t), own) {
            (Some(t), Some(d)) if d < t => (d, false),
            (Some(t), _) => (t, true),
            (None, Some(d)) => (d, false),
            (None, None) => return self.inner.call(req, ctx).await,
        };
        match tokio::time::timeout_at(at, self.inner.call(req, ctx)).await {
            Ok(r) => r,
            Err(_) => {
                let name = dest.as_ref().map_or("", |d| &*d.name.0);
                let backend = dest
                    .as_ref()
                    .and_then(|d| d.backends.get(ctx.backend))
                    .map_or("", |b| &*b.name.0);
                let endpoint = ctx
                    .endpoint_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                Err(Error::new(
                    MeshError::Timeout,
                    match (by_per_try, per_try, policy) {
                        (true, Some(t), _) => format!(
                            "{backend} ({endpoint}): no answer within the per-try timeout of {t:?}"
                        ),
                        (_, _, Some(p)) => format!(
                            "no answer from `{name}` within the request timeout of {:?} ({})",
                            p.timeout.unwrap_or_default(),
                            p.source
                        ),
                        _ => format!("no answer from `{name}` in time"),
                    },
                ))
            }
        }
    }
}
