//! Retries: which answers are worth another try, backoff with full jitter,
//! and the layer that makes the tries.
//!
//! The body streams to the first try while a copy of up to 64 KiB is kept
//! ([`crate::policy::replay`]); a retry sends the copy and then the rest.
//! A body that outgrows the copy, one declared larger, and an upgrade get a
//! single try. A retry goes to another endpoint when there is one (the
//! balancer reads the endpoints already tried from the context), after a
//! jittered backoff, only while the destination's budget allows, and never
//! when it could not start before the deadline. An outer sidecar that
//! already retries (`tandem-ctx-no-retry`) leaves one try here.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body as _;
use tandem_config::snapshot::{RetryOn, RetryPolicy};
use tokio::time::Instant;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::policy::budget::RetryBudget;
use crate::policy::replay::{Replay, REPLAY_LIMIT};
use crate::routing::Kept;
use crate::svc::{layer, Service};
use crate::telemetry::metrics::{Metrics, Name, RetryLabels};
use crate::transport::forward::is_upgrade;

const GRPC_STATUS: http::header::HeaderName = http::header::HeaderName::from_static("grpc-status");
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest the body of an answer that a retry replaces is read for.
const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// A policy's `retry`, ready to use.
pub(crate) struct Retry {
    /// Retries after the first try.
    pub(crate) attempts: u32,
    on: Vec<RetryOn>,
    pub(crate) per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    pub(crate) budget: Arc<RetryBudget>,
}

impl Retry {
    pub(crate) fn build(dest: &str, r: &RetryPolicy, kept: &Kept) -> Self {
        Retry {
            attempts: r.attempts,
            on: r.on.clone(),
            per_try_timeout: r.per_try_timeout_ms.map(Duration::from_millis),
            backoff_base: Duration::from_millis(r.backoff_base_ms),
            backoff_max: Duration::from_millis(r.backoff_max_ms.max(r.backoff_base_ms)),
            budget: kept.budget(dest, r.budget_percent, r.budget_min_per_second),
        }
    }

    /// Whether an answer should be tried again.
    pub(crate) fn retriable_answer(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        let grpc = headers
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        self.on.iter().any(|c| match *c {
            RetryOn::Server5xx => (500..600).contains(&code),
            RetryOn::GatewayError => matches!(code, 502..=504),
            RetryOn::Status(s) => s == code,
            RetryOn::Grpc(g) => grpc == Some(g),
            RetryOn::ConnectFailure | RetryOn::Reset => false,
        })
    }

    /// Whether a failure of the mesh to get an answer should be tried again.
    pub(crate) fn retriable_failure(&self, e: MeshError) -> bool {
        self.on.iter().any(|c| {
            matches!(
                (*c, e),
                (
                    RetryOn::ConnectFailure,
                    MeshError::ConnectFailure | MeshError::UpstreamTls
                ) | (RetryOn::Reset, MeshError::UpstreamReset)
                    | (
                        RetryOn::Server5xx | RetryOn::GatewayError,
                        MeshError::Timeout
                    )
            )
        })
    }

    /// The pause before retry number `n` (1-based): full jitter over an
    /// exponentially growing ceiling, or the answer's `Retry-After` if
    /// longer.
    pub(crate) fn backoff(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        let jittered = ceiling.mul_f64(fastrand::f64());
        match retry_after {
            Some(r) => jittered.max(r.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// `Retry-After: <seconds>` (the HTTP-date form is not used by services
/// that shed load, and is ignored).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

layer!(
    /// Makes the tries of a request under its retry policy.
    RetryLayer => Retrying {
        metrics: Arc<Metrics>,
        service: Name,
    }
);

type Tried = Result<Response<Body>, Error>;

impl<S: Service> Service for Retrying<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return self.inner.call(req, ctx).await;
        };
        let Some(retry) = dest.policy_for(ctx.rule).and_then(|p| p.retry.as_ref()) else {
            return self.inner.call(req, ctx).await;
        };
        retry.budget.deposit();
        let retries = if ctx.propagated.no_retry {
            0
        } else {
            retry.attempts
        };
        // With no retries (a per-try timeout alone) nothing is kept.
        let replayable = retries > 0
            && !is_upgrade(&req)
            && req
                .body()
                .size_hint()
                .upper()
                .is_none_or(|n| n <= REPLAY_LIMIT as u64);
        // The head of the request is kept to rebuild each retry.
        let (attempts, kept, mut next) = match req.into_parts() {
            (parts, body) if replayable => {
                let first = Replay::new(body);
                let handle = first.handle();
                let req = rebuild(&parts, Body::Replay(first));
                (retries + 1, Some((parts, handle)), Some(req))
            }
            (parts, body) => (1, None, Some(Request::from_parts(parts, body))),
        };
        ctx.retrying = attempts > 1;
        let mut last: Option<Tried> = None;
        let mut denied = false;
        let mut tries = 0;
        for n in 0..attempts {
            if n > 0 {
                let after = match &last {
                    Some(Ok(r)) => retry_after(r.headers()),
                    _ => None,
                };
                let wait = retry.backoff(n, after);
                // A retry that could not start before the deadline is not
                // made: the caller gets the last answer now.
                if ctx.deadline.is_some_and(|d| Instant::now() + wait >= d) {
                    break;
                }
                if !retry.budget.withdraw() {
                    denied = true;
                    break;
                }
                self.metrics.traffic.retried(&RetryLabels {
                    src_service: self.service.clone(),
                    dst_service: dest.name.clone(),
                });
                // The rare paths of a retry are boxed, so that they do not
                // grow the future of every request.
                ctx.timings.wait_start();
                Box::pin(tokio::time::sleep(wait)).await;
                ctx.timings.wait_end();
            }
            let Some(req) = next.take() else {
                break;
            };
            let result = self.inner.call(req, ctx).await;
            if ctx.endpoint.is_none() {
                // No endpoint to try: that is the answer.
                return result;
            }
            tries += 1;
            if attempts > 1 {
                if let Some(addr) = ctx.endpoint_addr() {
                    ctx.tried.push(addr);
                }
            }
            let again = match &result {
                Ok(r) => retry.retriable_answer(r.status(), r.headers()),
                Err(e) => retry.retriable_failure(e.kind),
            };
            // A single try (nothing to replay) answers as it is.
            if !again || attempts == 1 {
                return result;
            }
            if n + 1 < attempts {
                let Some((parts, h)) = &kept else {
                    return result;
                };
                // The body outgrew the copy: the answer stands as it is.
                if h.outgrown() {
                    return result;
                }
                // Read the replaced answer first: left unread, it would
                // hold its connection (and maybe the body) until the end.
                // (Waiting on that body and on the caller's is not this
                // sidecar's time.)
                ctx.timings.wait_start();
                let result = match result {
                    Ok(r) => Ok(Box::pin(settle(r, ctx.deadline)).await),
                    Err(e) => Err(e),
                };
                next = Box::pin(h.next_try())
                    .await
                    .map(|b| rebuild(parts, Body::Replay(b)));
                ctx.timings.wait_end();
                if next.is_none() {
                    return result;
                }
                last = Some(result);
                continue;
            }
            last = Some(result);
        }
        // Out of attempts (or of budget): the last answer, flagged.
        let flag = if denied {
            MeshError::RetryBudgetExhausted
        } else {
            MeshError::RetryLimitExhausted
        };
        match last {
            Some(Ok(mut r)) => {
                r.extensions_mut().insert(flag);
                Ok(r)
            }
            Some(Err(e)) if e.kind == MeshError::Timeout && !denied => Err(Error::new(
                MeshError::Timeout,
                format!("{} (after {tries} tries)", e.detail),
            )),
            Some(Err(e)) => Err(Error::new(
                flag,
                format!("{}: {} (after {tries} tries)", e.kind.reason(), e.detail),
            )),
            None => Err(Error::new(
                MeshError::NoEndpoints,
                format!("`{}` has no endpoint to try", dest.name.0),
            )),
        }
    }
}

/// An answer that a retry replaces, read whole (up to 64 KiB, within a
/// second and before the deadline) so that its connection is free again;
/// kept in case it ends up the caller's answer. A larger or slower body is
/// dropped (the answer then has an empty one).
async fn settle(resp: Response<Body>, deadline: Option<Instant>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let until = Instant::now() + SETTLE_WAIT;
    let read = tokio::time::timeout_at(
        deadline.map_or(until, |d| d.min(until)),
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, REPLAY_LIMIT)),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => Body::Collected(Box::new(collected)),
        _ => {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Body::empty()
        }
    };
    Response::from_parts(parts, body)
}

fn rebuild(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_and_backoff() {
        let r = Retry {
            attempts: 3,
            on: vec![
                RetryOn::GatewayError,
                RetryOn::Grpc(14),
                RetryOn::ConnectFailure,
            ],
            per_try_timeout: None,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            budget: Arc::new(RetryBudget::new(20, 10)),
        };
        let h = HeaderMap::new();
        assert!(r.retriable_answer(StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!r.retriable_answer(StatusCode::INTERNAL_SERVER_ERROR, &h));
        let mut g = HeaderMap::new();
        g.insert("grpc-status", "14".parse().expect("v"));
        assert!(r.retriable_answer(StatusCode::OK, &g));
        assert!(r.retriable_failure(MeshError::ConnectFailure));
        assert!(!r.retriable_failure(MeshError::UpstreamReset));
        assert!(r.retriable_failure(MeshError::Timeout));
        for n in 1..8 {
            assert!(r.backoff(n, None) <= Duration::from_millis(40));
        }
        assert_eq!(
            r.backoff(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
