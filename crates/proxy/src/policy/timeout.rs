//! The timeout of each try: it is cut off at its per-try timeout
//! (`retry.perTryTimeout`) or at the request's deadline, whichever comes
//! first: one timer per try. A try cut off by the per-try timeout or the
//! policy's own deadline counts against its endpoint in outlier detection
//! (the outlier layer above reads `ctx.sent` and `ctx.cut_by_caller`); one
//! cut off by the caller's deadline does not.

use http::{Request, Response};
use tokio::time::Instant;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};

layer!(
    /// Cuts a try off at its per-try timeout or the request's deadline.
    TryTimeoutLayer => TryTimeout {}
);

impl<S: Service> Service for TryTimeout<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        ctx.sent = false;
        ctx.cut_by_caller = false;
        let dest = ctx.dest.clone();
        let policy = dest.as_deref().and_then(|d| d.policy_for(ctx.rule));
        let per_try = policy.and_then(|p| p.retry.as_ref()?.per_try_timeout);
        let now = Instant::now();
        let (at, by_per_try) = match (per_try.map(|t| now + t), ctx.deadline) {
            (Some(t), Some(d)) if d < t => (d, false),
            (Some(t), _) => (t, true),
            (None, Some(d)) => (d, false),
            (None, None) => return self.inner.call(req, ctx).await,
        };
        match tokio::time::timeout_at(at, self.inner.call(req, ctx)).await {
            Ok(r) => r,
            Err(_) => {
                ctx.cut_by_caller = !by_per_try && ctx.deadline_is_callers;
                let name = dest.as_ref().map_or("", |d| &*d.name.0);
                let timeout = ctx
                    .deadline
                    .map(|d| d.saturating_duration_since(ctx.timings.accepted))
                    .unwrap_or_default();
                Err(Error::new(
                    MeshError::Timeout,
                    match (by_per_try, per_try) {
                        (true, Some(t)) => {
                            let backend = dest
                                .as_ref()
                                .and_then(|d| d.backends.get(ctx.backend))
                                .map_or("", |b| &*b.name.0);
                            let endpoint = ctx
                                .endpoint_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_default();
                            format!(
                                "{backend} ({endpoint}): no answer within the per-try timeout of {t:?}"
                            )
                        }
                        _ if ctx.deadline_is_callers => format!(
                            "the caller's deadline of {timeout:?} passed before `{name}` answered"
                        ),
                        _ => format!(
                            "no answer from `{name}` within the request timeout of {timeout:?} ({})",
                            policy.map_or("", |p| &*p.source)
                        ),
                    },
                ))
            }
        }
    }
}
