//! Fault injection (`FaultInjection`, named by a route rule's
//! `ExtensionRef` filter): the caller's sidecar delays a share of the
//! rule's requests, or answers them itself with an error, optionally only
//! those that carry given headers (a tester's own requests).
//!
//! The layer sits below the deadline and above retries and outlier
//! detection: an injected delay counts against the request's timeout, an
//! injected error is never retried, and neither says anything about an
//! endpoint. An injected answer carries `tandem-error: fault-injected`.

use http::{HeaderValue, Request, Response, StatusCode};
use tandem_config::snapshot::{Fault, FaultAbort};
use tokio::time::{Duration, Instant};

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};
use crate::telemetry::metrics::{FaultLabels, Metrics};

layer!(
    /// Injects the matched rule's faults.
    FaultLayer => Faults { metrics: std::sync::Arc<Metrics> }
);

impl<S: Service> Service for Faults<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return self.inner.call(req, ctx).await;
        };
        let fault = ctx
            .rule
            .and_then(|i| dest.filters.get(i)?.as_ref()?.fault.as_ref());
        let Some(fault) = fault.filter(|f| applies(f, &req)) else {
            return self.inner.call(req, ctx).await;
        };
        let count = |fault: &'static str| {
            self.metrics
                .faults
                .get_or_create(&FaultLabels {
                    src_service: ctx.src.clone(),
                    dst_service: dest.name.clone(),
                    fault,
                })
                .inc();
        };
        if let Some(d) = fault.delay.as_ref().filter(|d| drawn(d.percent)) {
            count("delay");
            let until = Instant::now() + Duration::from_millis(d.ms);
            // The delay is the config's, not this sidecar's own time.
            ctx.timings.wait_start();
            match ctx.deadline {
                Some(deadline) if deadline < until => {
                    tokio::time::sleep_until(deadline).await;
                    ctx.timings.wait_end();
                    return Err(Error::new(
                        MeshError::Timeout,
                        format!(
                            "the request's deadline passed during a delay injected by FaultInjection {}",
                            fault.source
                        ),
                    ));
                }
                _ => tokio::time::sleep_until(until).await,
            }
            ctx.timings.wait_end();
        }
        if let Some(a) = fault.abort.as_ref().filter(|a| drawn(a.percent)) {
            count("abort");
            return Ok(aborted(a, &fault.source, &req));
        }
        self.inner.call(req, ctx).await
    }
}

/// Whether the request carries every header the fault is limited to.
fn applies(f: &Fault, req: &Request<Body>) -> bool {
    f.headers.iter().all(|h| {
        req.headers()
            .get_all(h.name.as_str())
            .iter()
            .any(|v| v.as_bytes() == h.value.as_bytes())
    })
}

/// A draw that succeeds `percent` times in a hundred.
fn drawn(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

/// The injected answer: the HTTP status, or for a gRPC status a
/// trailers-only answer; flagged `fault-injected` either way.
fn aborted(a: &FaultAbort, source: &str, req: &Request<Body>) -> Response<Body> {
    let mut resp = match a.grpc_status {
        Some(code) => {
            let mut r = Response::new(Body::empty());
            let h = r.headers_mut();
            let grpc_type = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/grpc"));
            h.insert(http::header::CONTENT_TYPE, grpc_type);
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static("fault%20injected"));
            r
        }
        None => {
            let mut r =
                MeshError::FaultInjected.response(&format!("injected by FaultInjection {source}"));
            if let Some(s) = a.http_status.and_then(|s| StatusCode::from_u16(s).ok()) {
                *r.status_mut() = s;
            }
            r
        }
    };
    resp.extensions_mut().insert(MeshError::FaultInjected);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::snapshot::NameValue;

    #[test]
    fn a_fault_limited_to_a_header_spares_the_rest() {
        let f = Fault {
            source: "default/f".into(),
            headers: vec![NameValue {
                name: "x-chaos".into(),
                value: "on".into(),
            }],
            delay: None,
            abort: None,
        };
        let with = Request::builder()
            .header("x-chaos", "on")
            .body(Body::empty())
            .expect("request");
        let other = Request::builder()
            .header("x-chaos", "off")
            .body(Body::empty())
            .expect("request");
        assert!(applies(&f, &with));
        assert!(!applies(&f, &other));
    }

    #[test]
    fn aborts_answer_with_their_status_and_the_flag() {
        let req = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(Body::empty())
            .expect("request");
        let http = FaultAbort {
            http_status: Some(418),
            grpc_status: None,
            percent: 100.0,
        };
        let r = aborted(&http, "default/f", &req);
        assert_eq!(r.status(), 418);
        assert_eq!(
            r.extensions().get::<MeshError>(),
            Some(&MeshError::FaultInjected)
        );
        let grpc = FaultAbort {
            http_status: None,
            grpc_status: Some(14),
            percent: 100.0,
        };
        let r = aborted(&grpc, "default/f", &req);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc+proto");
        assert!(drawn(100.0));
        assert!(!drawn(0.0));
    }
}
