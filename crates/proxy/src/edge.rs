//! The edge of the sidecar: where a request from a listener becomes a
//! request with a context, and where its answer leaves. Here, once per
//! request, a failure becomes the mesh's answer, the `tandem-error` header
//! is written from the kind the answer carries, and the request is
//! counted in the golden signals; the context then rides in the response
//! body to its end.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::{Body, Served};
use crate::ctx::RequestCtx;
use crate::error::{MeshError, ERROR_HEADER};
use crate::policy::deadline::Propagated;
use crate::svc::Service;
use crate::telemetry::metrics::{Metrics, RequestLabels};
use crate::telemetry::trace::TraceContext;

/// A stack of layers with its edge.
pub(crate) struct Edge<S> {
    stack: S,
    metrics: Arc<Metrics>,
}

impl<S: Service> Edge<S> {
    pub(crate) fn new(stack: S, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Edge { stack, metrics })
    }

    /// Serves one request with the context `ctx` (its direction, labels
    /// and caller set by the listener).
    pub(crate) async fn serve(
        &self,
        req: Request<Incoming>,
        mut ctx: RequestCtx,
    ) -> Result<Response<Served>, Infallible> {
        ctx.propagated = Propagated::of(req.headers());
        ctx.span = TraceContext::of(req.headers());
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
        let labels = RequestLabels {
            direction: ctx.direction,
            src_service: ctx.src.clone(),
            dst_service: ctx.dst.clone(),
            status_code: ctx.status,
            // A flag from another sidecar counts here too, so every sidecar
            // an answer passes through shows why the mesh made it.
            tandem_error: ctx.flag.or(ctx.upstream_flag).map_or("", MeshError::reason),
        };
        self.metrics
            .record(&labels, ctx.timings.accepted.elapsed().as_secs_f64());
        resp.map(|b| Served::new(b, ctx))
    }
}
