//! Deadlines: the request's whole timeout and the caller's deadline.
//!
//! A deadline travels between sidecars through the apps, which pass on
//! every `tandem-ctx-*` header they receive, as they would trace headers:
//! `tandem-ctx-deadline-ms` is the time the original caller still waits
//! (gRPC's own `grpc-timeout` counts too), and `tandem-ctx-no-retry` says
//! that an outer sidecar already retries the request. An inbound sidecar
//! hands the deadline to its app as an absolute time,
//! `tandem-ctx-deadline-at` (Unix milliseconds), which the app passes on
//! unchanged to its own sidecar on the same host (one clock), so the time
//! the app spends is not given back.
//!
//! Layers: [`DeadlineLayer`] (outbound: the sooner of the policy's timeout
//! and the caller's deadline, counted from the request's arrival),
//! [`StampLayer`] (each try tells the next hop how long is left), and
//! [`InboundDeadlineLayer`] (the caller's deadline holds at the app too).

use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use tandem_config::snapshot::Protocol;
use tokio::time::Instant;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};

// Names parsed once (a lookup by `&str` parses the name every time).
pub(crate) const CTX_DEADLINE: HeaderName = HeaderName::from_static("tandem-ctx-deadline-ms");
pub(crate) const CTX_DEADLINE_AT: HeaderName = HeaderName::from_static("tandem-ctx-deadline-at");
pub(crate) const CTX_NO_RETRY: HeaderName = HeaderName::from_static("tandem-ctx-no-retry");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// What earlier hops sent along with the request.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Propagated {
    /// Time left, from `tandem-ctx-deadline-ms`, `-deadline-at` or
    /// `grpc-timeout` (the soonest).
    pub(crate) deadline: Option<Duration>,
    pub(crate) no_retry: bool,
}

impl Propagated {
    pub(crate) fn of(headers: &HeaderMap) -> Propagated {
        let number = |name: &HeaderName| -> Option<u64> {
            headers.get(name)?.to_str().ok()?.trim().parse().ok()
        };
        let ms = number(&CTX_DEADLINE).map(Duration::from_millis);
        let at = number(&CTX_DEADLINE_AT)
            .map(|at| Duration::from_millis(at.saturating_sub(unix_ms()).max(1)));
        let grpc = headers
            .get(&GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let deadline = [ms, at, grpc].into_iter().flatten().min();
        Propagated {
            deadline,
            no_retry: headers.contains_key(&CTX_NO_RETRY),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Marks one try: the time left before the deadline (also as
/// `grpc-timeout` towards gRPC services, when sooner), and that this
/// sidecar retries, so that the next one does not.
fn stamp(h: &mut HeaderMap, deadline: Option<Instant>, grpc: bool, retrying: bool) {
    h.remove(&CTX_DEADLINE_AT);
    if let Some(d) = deadline {
        let left = d
            .saturating_duration_since(Instant::now())
            .as_millis()
            .max(1) as u64;
        h.insert(CTX_DEADLINE, HeaderValue::from(left));
        if grpc {
            let sooner = h
                .get(&GRPC_TIMEOUT)
                .and_then(|v| v.to_str().ok())
                .and_then(grpc_timeout)
                .is_none_or(|t| t.as_millis() as u64 > left);
            if sooner {
                // At most 8 digits: milliseconds, or seconds beyond that.
                let value = if left <= 99_999_999 {
                    format!("{left}m")
                } else {
                    format!("{}S", (left / 1000).min(99_999_999))
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(GRPC_TIMEOUT, v);
                }
            }
        }
    }
    if retrying {
        h.insert(CTX_NO_RETRY, HeaderValue::from_static("1"));
    }
}

/// Hands the caller's deadline to the local app in absolute form.
fn hand_to_app(deadline: Option<Duration>, headers: &mut HeaderMap) {
    let Some(d) = deadline else {
        return;
    };
    headers.remove(&CTX_DEADLINE);
    let at = unix_ms() + d.as_millis() as u64;
    headers.insert(CTX_DEADLINE_AT, HeaderValue::from(at));
}

layer!(
    /// Outbound: decides the request's deadline. The tries enforce it
    /// (`policy::timeout`: each try is cut off at the deadline at the
    /// latest) and the retries respect it (no retry that could not start
    /// before it), so one timer per try serves both.
    DeadlineLayer => Deadline {}
);

impl<S: Service> Service for Deadline<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let policy = ctx
            .dest
            .as_deref()
            .and_then(|d| d.policy_for(ctx.rule))
            .and_then(|p| p.timeout);
        match (policy, ctx.propagated.deadline) {
            (Some(p), Some(c)) if c < p => ctx.set_deadline(c, true),
            (Some(p), _) => ctx.set_deadline(p, false),
            (None, Some(c)) => ctx.set_deadline(c, true),
            (None, None) => {}
        }
        self.inner.call(req, ctx).await
    }
}

impl RequestCtx {
    fn set_deadline(&mut self, timeout: Duration, callers: bool) {
        self.deadline = Some(self.timings.accepted + timeout);
        self.deadline_is_callers = callers;
    }
}

layer!(
    /// Each try: tells the next hop the time left and whether this sidecar
    /// retries. A request with neither gets nothing added.
    StampLayer => Stamp {}
);

impl<S: Service> Service for Stamp<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        if ctx.deadline.is_some() || ctx.retrying {
            let grpc = ctx
                .dest
                .as_ref()
                .is_some_and(|d| d.protocol == Protocol::Grpc);
            stamp(req.headers_mut(), ctx.deadline, grpc, ctx.retrying);
        }
        self.inner.call(req, ctx).await
    }
}

layer!(
    /// Inbound: the caller's deadline holds here too. When it passes, the
    /// app's request is cancelled (its connection closed).
    InboundDeadlineLayer => InboundDeadline {}
);

impl<S: Service> Service for InboundDeadline<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let deadline = ctx.propagated.deadline;
        hand_to_app(deadline, req.headers_mut());
        let Some(t) = deadline else {
            return self.inner.call(req, ctx).await;
        };
        let at = ctx.timings.accepted + t;
        ctx.deadline = Some(at);
        match tokio::time::timeout_at(at, self.inner.call(req, ctx)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                MeshError::Timeout,
                format!("the caller's deadline of {t:?} passed"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_headers() {
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("123456789m"), None);
        assert_eq!(grpc_timeout("5x"), None);
        let mut h = HeaderMap::new();
        h.insert(CTX_DEADLINE, "800".parse().expect("v"));
        h.insert(GRPC_TIMEOUT, "500m".parse().expect("v"));
        let c = Propagated::of(&h);
        assert_eq!(c.deadline, Some(Duration::from_millis(500)));
        assert!(!c.no_retry);
        // Handed to the app as an absolute time, read back by its sidecar.
        let mut app = HeaderMap::new();
        hand_to_app(Some(Duration::from_millis(400)), &mut app);
        assert!(app.get(&CTX_DEADLINE).is_none());
        let back = Propagated::of(&app).deadline.expect("deadline");
        assert!(back <= Duration::from_millis(400) && back >= Duration::from_millis(350));
        let mut h = HeaderMap::new();
        stamp(
            &mut h,
            Some(Instant::now() + Duration::from_millis(300)),
            true,
            true,
        );
        let left: u64 = h[&CTX_DEADLINE].to_str().expect("s").parse().expect("n");
        assert!((250..=300).contains(&left), "{left}");
        assert!(h[&GRPC_TIMEOUT].to_str().expect("s").ends_with('m'));
        assert_eq!(h[&CTX_NO_RETRY], "1");
    }
}
