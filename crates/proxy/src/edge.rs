//! The edge of the sidecar: where a request from a listener becomes a
//! request with a context, and where its answer leaves. Here, once per
//! request, a failure becomes the mesh's answer, the `tandem-error` header
//! is written from the kind the answer carries, and the request is
//! counted in the golden signals; the context then rides in the response
//! body to its end.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HOST;
use http::uri::Authority;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{Body, Served};
use crate::ctx::RequestCtx;
use crate::error::{MeshError, ERROR_HEADER};
use crate::policy::deadline::Propagated;
use crate::svc::Service;
use crate::telemetry::metrics::{Metrics, Name, RequestLabels};
use crate::telemetry::record::Recorder;
use crate::telemetry::trace::{request_id, REQUEST_ID};

/// A stack of layers with its edge.
pub(crate) struct Edge<S> {
    stack: S,
    metrics: Arc<Metrics>,
    recorder: Arc<Recorder>,
    /// The `route` label of a request no route rule took.
    no_route: Name,
}

impl<S: Service> Edge<S> {
    pub(crate) fn new(stack: S, metrics: Arc<Metrics>, recorder: Arc<Recorder>) -> Arc<Self> {
        Arc::new(Edge {
            stack,
            metrics,
            recorder,
            no_route: Name::from(""),
        })
    }

    /// Serves one request with the context `ctx` (its direction, labels
    /// and caller set by the listener).
    pub(crate) async fn serve(
        &self,
        req: Request<Incoming>,
        mut ctx: RequestCtx,
    ) -> Result<Response<Served>, Infallible> {
        if let Err(why) = check_head(&req) {
            // A peer that breaks the protocol gets no second request on
            // this connection.
            let mut resp = MeshError::BadRequest.response(why);
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return Ok(self.answer(resp, ctx));
        }
        ctx.propagated = Propagated::of(req.headers());
        let mut req = req;
        if !req.headers().contains_key(&REQUEST_ID) {
            req.headers_mut().insert(REQUEST_ID, request_id());
        }
        self.recorder.start(
            &mut ctx,
            req.method(),
            req.uri(),
            req.headers(),
            req.version(),
        );
        let resp = match self.stack.call(req.map(Body::Stream), &mut ctx).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        Ok(self.answer(resp, ctx))
    }

    fn answer(&self, mut resp: Response<Body>, mut ctx: RequestCtx) -> Response<Served> {
        ctx.flag = resp.extensions().get::<MeshError>().copied();
        if let Some(flag) = ctx.flag {
            resp.headers_mut().insert(ERROR_HEADER, flag.header());
        }
        ctx.status = resp.status().as_u16();
        let (total, own) = ctx.timings.own(Instant::now());
        let route = match (&ctx.dest, ctx.rule) {
            (Some(d), Some(i)) => d.route_names.get(i).cloned(),
            _ => None,
        };
        let labels = RequestLabels {
            direction: ctx.direction,
            src_service: ctx.src.clone(),
            dst_service: ctx.dst.clone(),
            status_code: ctx.status,
            // A flag from another sidecar counts here too, so every sidecar
            // an answer passes through shows why the mesh made it.
            tandem_error: ctx.flag.or(ctx.upstream_flag).map_or("", MeshError::reason),
            route: route.unwrap_or_else(|| self.no_route.clone()),
        };
        self.metrics.traffic.record(&labels, total, own);
        resp.map(|b| Served::new(b, ctx))
    }
}

/// The rules of RFC 9112 that the HTTP layer leaves to the server, checked
/// before anything else sees the request: an HTTP/1.1 request has one
/// `Host`, a valid authority without user information, which agrees with
/// an absolute-form target; `*` is for `OPTIONS` and the authority form
/// for `CONNECT` only. An HTTP/2 request's `Host`, if any, agrees with its
/// `:authority`. A body is framed one way: `Transfer-Encoding` is exactly
/// `chunked` (once) and never comes with `Content-Length` (the mark of a
/// request-smuggling attempt). `Expect` is `100-continue` or absent.
fn check_head<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if req.version() == Version::HTTP_11 && host.is_none() {
        return Err("an HTTP/1.1 request needs a Host header");
    }
    if let Some(h) = host {
        let valid = h
            .to_str()
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('@'))
            .and_then(|h| Authority::try_from(h).ok());
        let Some(h) = valid else {
            return Err("the Host header is not a valid host[:port]");
        };
        if let Some(a) = req.uri().authority() {
            if !a.as_str().eq_ignore_ascii_case(h.as_str()) {
                return Err("the Host header disagrees with the request target");
            }
        }
    }
    let uri = req.uri();
    if uri == "*" && req.method() != Method::OPTIONS {
        return Err("only OPTIONS may have the target `*`");
    }
    if uri.scheme().is_none() && uri.authority().is_some() && req.method() != Method::CONNECT {
        return Err("only CONNECT may have an authority as its target");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("the request target has user information");
    }
    let headers = req.headers();
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim)
        .peekable();
    if codings.peek().is_some() {
        if req.version() != Version::HTTP_11 {
            return Err("Transfer-Encoding is for HTTP/1.1");
        }
        if headers.contains_key(http::header::CONTENT_LENGTH) {
            return Err("both Transfer-Encoding and Content-Length");
        }
        let all: Vec<&str> = codings.collect();
        if all.len() != 1 || !all[0].eq_ignore_ascii_case("chunked") {
            return Err("Transfer-Encoding other than a single `chunked`");
        }
    }
    for e in headers.get_all(http::header::EXPECT) {
        if !e.as_bytes().eq_ignore_ascii_case(b"100-continue") {
            return Err("an Expect other than 100-continue");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, version: Version, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn heads_that_break_the_rules_are_refused() {
        let v11 = Version::HTTP_11;
        assert_eq!(check_head(&req("GET", "/", v11, &["web"])), Ok(()));
        assert_eq!(
            check_head(&req("GET", "http://web:8080/", v11, &["WEB:8080"])),
            Ok(())
        );
        assert_eq!(check_head(&req("GET", "/", Version::HTTP_10, &[])), Ok(()));
        assert_eq!(check_head(&req("GET", "/", Version::HTTP_2, &[])), Ok(()));
        assert_eq!(check_head(&req("OPTIONS", "*", v11, &["web"])), Ok(()));
        assert_eq!(
            check_head(&req("CONNECT", "web:443", v11, &["web:443"])),
            Ok(())
        );
        for (r, why) in [
            (req("GET", "/", v11, &["web", "web"]), "more than one"),
            (req("GET", "/", v11, &[]), "needs a Host"),
            (req("GET", "/", v11, &["user@web"]), "not a valid"),
            (req("GET", "/", v11, &["we b"]), "not a valid"),
            (req("GET", "/", v11, &[""]), "not a valid"),
            (req("GET", "http://web/", v11, &["other"]), "disagrees"),
            (req("GET", "*", v11, &["web"]), "OPTIONS"),
            (req("GET", "web:80", v11, &["web:80"]), "CONNECT"),
        ] {
            let got = check_head(&r);
            assert!(got.is_err_and(|e| e.contains(why)), "{r:?}: {got:?}");
        }
        let with = |pairs: &[(&str, &str)], version| {
            let mut b = Request::builder()
                .method("POST")
                .uri("/")
                .version(version)
                .header(HOST, "web");
            for (k, v) in pairs {
                b = b.header(*k, *v);
            }
            b.body(()).expect("request")
        };
        assert_eq!(
            check_head(&with(&[("transfer-encoding", "Chunked")], v11)),
            Ok(())
        );
        assert_eq!(
            check_head(&with(&[("expect", "100-Continue")], v11)),
            Ok(())
        );
        for (r, why) in [
            (
                with(
                    &[("transfer-encoding", "chunked"), ("content-length", "5")],
                    v11,
                ),
                "both",
            ),
            (
                with(
                    &[
                        ("transfer-encoding", "chunked"),
                        ("transfer-encoding", "chunked"),
                    ],
                    v11,
                ),
                "single",
            ),
            (
                with(&[("transfer-encoding", "gzip, chunked")], v11),
                "single",
            ),
            (
                with(&[("transfer-encoding", "chunked")], Version::HTTP_10),
                "HTTP/1.1",
            ),
            (with(&[("expect", "teapot")], v11), "Expect"),
        ] {
            let got = check_head(&r);
            assert!(got.is_err_and(|e| e.contains(why)), "{r:?}: {got:?}");
        }
    }
}
