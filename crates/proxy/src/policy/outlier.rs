//! Outlier detection (the `circuitBreaker` of a TrafficPolicy): an endpoint
//! that fails too many times in a row is ejected, left out of load
//! balancing for a while, which grows each time it is ejected again. No
//! more than a set share of a backend's endpoints is ejected at once.
//! State lives with the endpoint's load (per calling sidecar) in atomics.
//!
//! The layer sits above the per-try timeout: it sees each try's outcome,
//! including a try that a timeout of the mesh's own cut off once it had a
//! connection (a gateway error). A try dropped for another reason (the
//! caller's deadline, the caller going away), or while it still waited for
//! a connection in this sidecar, says nothing about the endpoint.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tandem_config::snapshot::CircuitBreaker;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::routing::{Backend, Endpoint};
use crate::svc::{layer, Service};
use crate::telemetry::metrics::{Metrics, Name, RetryLabels};

/// Milliseconds since the process started (never 0).
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Longest ejection, whatever the count.
const MAX_EJECTION_FACTOR: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// A 5xx other than a gateway error, or a reset.
    Error,
    /// 502, 503, 504 or a connect failure.
    GatewayError,
    /// The try never reached the endpoint (this sidecar's own limits).
    Skipped,
}

#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    errors: AtomicU32,
    gateway_errors: AtomicU32,
    last_failure_ms: AtomicU64,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl OutlierState {
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) > now
    }

    /// Counts an outcome; true when the endpoint has now failed enough
    /// times in a row to be ejected.
    pub(crate) fn record(&self, outcome: Outcome, cb: &CircuitBreaker, now: u64) -> bool {
        if outcome == Outcome::Skipped {
            return false;
        }
        if outcome == Outcome::Success {
            self.errors.store(0, Ordering::Release);
            self.gateway_errors.store(0, Ordering::Release);
            // A healthy stretch as long as one base ejection after the last
            // one brings the next ejection's length down a step.
            if self.ejections.load(Ordering::Acquire) > 0 {
                let until = self.ejected_until_ms.load(Ordering::Acquire);
                if now > until.saturating_add(cb.base_ejection_ms) {
                    let _ = self
                        .ejections
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            Some(n.saturating_sub(1))
                        });
                    // The next step down needs another full stretch.
                    self.ejected_until_ms.store(now, Ordering::Release);
                }
            }
            return false;
        }
        let last = self.last_failure_ms.swap(now, Ordering::AcqRel);
        if last != 0 && now.saturating_sub(last) > cb.interval_ms {
            // Too far apart to be "in a row".
            self.errors.store(0, Ordering::Release);
            self.gateway_errors.store(0, Ordering::Release);
        }
        let errors = self.errors.fetch_add(1, Ordering::AcqRel) + 1;
        let gateway = if outcome == Outcome::GatewayError {
            self.gateway_errors.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.gateway_errors.store(0, Ordering::Release);
            0
        };
        (cb.consecutive_errors > 0 && errors >= cb.consecutive_errors)
            || (cb.consecutive_gateway_errors > 0 && gateway >= cb.consecutive_gateway_errors)
    }

    /// Ejects for `base × n`, n being how many times this endpoint has been
    /// ejected (at most 10).
    pub(crate) fn eject(&self, cb: &CircuitBreaker, now: u64) -> Duration {
        let n = (self.ejections.fetch_add(1, Ordering::AcqRel) + 1).min(MAX_EJECTION_FACTOR);
        let len = cb.base_ejection_ms.saturating_mul(u64::from(n));
        self.ejected_until_ms.store(now + len, Ordering::Release);
        self.errors.store(0, Ordering::Release);
        self.gateway_errors.store(0, Ordering::Release);
        Duration::from_millis(len)
    }
}

/// How many of `n` endpoints may be ejected at once: the percentage,
/// at least one when it is above zero, and never all of them.
pub(crate) fn max_ejected(n: usize, percent: u32) -> usize {
    if percent == 0 || n < 2 {
        return 0;
    }
    (n * percent as usize / 100).max(1).min(n - 1)
}

impl Backend {
    /// Counts the outcome of a try for outlier detection, and ejects the
    /// endpoint when it has failed enough in a row and the backend can
    /// spare it. Returns the ejection's length when it ejected.
    pub(crate) fn record_outcome(
        &self,
        ep: &Endpoint,
        outcome: Outcome,
        cb: &CircuitBreaker,
    ) -> Option<Duration> {
        let now = now_ms();
        let state = &ep.load.outlier;
        if !state.record(outcome, cb, now) {
            return None;
        }
        // Rare (an endpoint just crossed its threshold): the lock is never
        // taken on the way of a healthy request.
        let _one_at_a_time = self.ejecting.lock();
        if state.is_ejected(now) {
            return None;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.load.outlier.is_ejected(now))
            .count();
        if ejected >= max_ejected(self.endpoints.len(), cb.max_ejection_percent) {
            return None;
        }
        Some(state.eject(cb, now))
    }
}

/// What a try's result says about its endpoint. `sent`: the try had a
/// connection (or was opening one) when it ended; `by_caller`: a timeout
/// was the caller's deadline, not the mesh's own.
fn outcome(result: &Result<Response<Body>, Error>, sent: bool, by_caller: bool) -> Outcome {
    match result {
        Ok(r) if matches!(r.status().as_u16(), 502..=504) => Outcome::GatewayError,
        Ok(r) if r.status().is_server_error() => Outcome::Error,
        Ok(_) => Outcome::Success,
        Err(e) => match e.kind {
            MeshError::ConnectFailure | MeshError::UpstreamTls => Outcome::GatewayError,
            // Cut off by a timeout of the mesh's own.
            MeshError::Timeout if sent && !by_caller => Outcome::GatewayError,
            // Still queued in this sidecar, or refused by its own limits:
            // nothing was asked of the endpoint.
            MeshError::Timeout | MeshError::Overflow | MeshError::IdentityExpired => {
                Outcome::Skipped
            }
            _ => Outcome::Error,
        },
    }
}

layer!(
    /// Outlier detection of the destination's `circuitBreaker`.
    OutlierLayer => Outliers {
        metrics: Arc<Metrics>,
        service: Name,
    }
);

impl<S: Service> Service for Outliers<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return self.inner.call(req, ctx).await;
        };
        let Some(cb) = dest
            .policy
            .as_ref()
            .and_then(|p| p.circuit_breaker.as_ref())
        else {
            return self.inner.call(req, ctx).await;
        };
        let result = self.inner.call(req, ctx).await;
        let Some(backend) = dest.backends.get(ctx.backend) else {
            return result;
        };
        let Some(ep) = ctx.endpoint.and_then(|i| backend.endpoints.get(i)) else {
            return result;
        };
        let outcome = outcome(&result, ctx.sent, ctx.cut_by_caller);
        if let Some(len) = backend.record_outcome(ep, outcome, cb) {
            tracing::warn!(endpoint = %ep.authority, backend = %backend.name.0, ejected_for = ?len, "endpoint ejected after consecutive failures");
            self.metrics
                .ejections
                .get_or_create(&RetryLabels {
                    src_service: self.service.clone(),
                    dst_service: backend.name.clone(),
                })
                .inc();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb() -> CircuitBreaker {
        CircuitBreaker {
            consecutive_errors: 3,
            consecutive_gateway_errors: 0,
            interval_ms: 1000,
            base_ejection_ms: 100,
            max_ejection_percent: 50,
            max_requests: None,
            max_connections: None,
            max_pending_requests: None,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times() {
        let s = OutlierState::default();
        let c = cb();
        assert!(!s.record(Outcome::Error, &c, 10));
        assert!(!s.record(Outcome::GatewayError, &c, 20));
        // A success in between starts the count again.
        assert!(!s.record(Outcome::Success, &c, 30));
        assert!(!s.record(Outcome::Error, &c, 40));
        assert!(!s.record(Outcome::Error, &c, 50));
        assert!(s.record(Outcome::Error, &c, 60));
        assert_eq!(s.eject(&c, 60), Duration::from_millis(100));
        assert!(s.is_ejected(159) && !s.is_ejected(160));
        assert_eq!(s.eject(&c, 200), Duration::from_millis(200));
        // Failures further apart than the interval are not in a row.
        let s = OutlierState::default();
        assert!(!s.record(Outcome::Error, &c, 10));
        assert!(!s.record(Outcome::Error, &c, 20));
        assert!(!s.record(Outcome::Error, &c, 5000));
    }

    #[test]
    fn never_all_endpoints() {
        assert_eq!(max_ejected(1, 100), 0);
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(3, 10), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(4, 100), 3);
        assert_eq!(max_ejected(4, 0), 0);
    }

    #[test]
    fn endpoints_failing_at_once_never_pass_the_ejection_cap() {
        let cb = CircuitBreaker {
            max_ejection_percent: 34,
            consecutive_errors: 1,
            base_ejection_ms: 60_000,
            ..cb()
        };
        for _ in 0..100 {
            let r = crate::routing::tests::three_endpoints();
            let b = &r.destination("api").expect("api").backends[0];
            // Two endpoints cross their threshold at the same instant.
            let go = std::sync::Barrier::new(2);
            let ejected: usize = std::thread::scope(|t| {
                let runs: Vec<_> = b.endpoints[..2]
                    .iter()
                    .map(|e| {
                        let (go, cb) = (&go, &cb);
                        t.spawn(move || {
                            go.wait();
                            b.record_outcome(e, Outcome::Error, cb).is_some() as usize
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().expect("thread")).sum()
            });
            assert_eq!(ejected, 1);
        }
    }

    #[test]
    fn what_a_try_says_about_its_endpoint() {
        let answer = |code: u16| -> Result<Response<Body>, Error> {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = http::StatusCode::from_u16(code).expect("status");
            Ok(r)
        };
        let failed = |kind| -> Result<Response<Body>, Error> { Err(Error::new(kind, "x")) };
        let says = |r: &Result<Response<Body>, Error>, sent, by_caller| outcome(r, sent, by_caller);
        assert_eq!(says(&answer(200), true, false), Outcome::Success);
        assert_eq!(says(&answer(500), true, false), Outcome::Error);
        assert_eq!(says(&answer(503), true, false), Outcome::GatewayError);
        let connect = failed(MeshError::ConnectFailure);
        assert_eq!(says(&connect, true, false), Outcome::GatewayError);
        let timeout = failed(MeshError::Timeout);
        assert_eq!(says(&timeout, true, false), Outcome::GatewayError);
        // Still queued in this sidecar, or cut off by the caller's
        // deadline: nothing about the endpoint.
        assert_eq!(says(&timeout, false, false), Outcome::Skipped);
        assert_eq!(says(&timeout, true, true), Outcome::Skipped);
        assert_eq!(
            says(&failed(MeshError::Overflow), true, false),
            Outcome::Skipped
        );
        assert_eq!(
            says(&failed(MeshError::UpstreamReset), true, false),
            Outcome::Error
        );
    }
}
