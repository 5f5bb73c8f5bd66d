//! Bodies on the request path: what a layer sends or answers, and what the
//! listeners send back to the caller.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::ctx::RequestCtx;
use crate::outbound::mirror::Tee;
use crate::policy::replay::Replay;

/// Every body inside the sidecar: one streamed from a peer, one the mesh
/// made, a request body that a retry may send again, an answer read whole
/// (kept while a retry replaces it), or a request body copied for a shadow
/// request as it streams.
pub(crate) enum Body {
    Stream(Incoming),
    Full(Full<Bytes>),
    Replay(Replay<Body>),
    Collected(Box<http_body_util::Collected<Bytes>>),
    Tee(Box<Tee>),
}

impl Body {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Full::new(b.into()))
    }

    pub(crate) fn empty() -> Self {
        Body::Full(Full::new(Bytes::new()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Stream(b) => Pin::new(b).poll_frame(cx),
            Body::Replay(b) => Pin::new(b).poll_frame(cx),
            Body::Tee(b) => Pin::new(&mut **b).poll_frame(cx),
            Body::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            Body::Collected(b) => Pin::new(&mut **b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(b) => b.is_end_stream(),
            Body::Full(b) => b.is_end_stream(),
            Body::Replay(b) => b.is_end_stream(),
            Body::Collected(b) => b.is_end_stream(),
            Body::Tee(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
            Body::Replay(b) => b.size_hint(),
            Body::Collected(b) => b.size_hint(),
            Body::Tee(b) => b.size_hint(),
        }
    }
}

/// A response body as the listeners send it. It carries the request's
/// context to the end of the body: the places the request holds (in the
/// sidecar's `--max-requests`, in the destination's
/// `circuitBreaker.maxRequests`) are given back when the last byte is sent
/// or the caller goes away, not when the response headers are, and the
/// context's `done` time is set then.
pub(crate) struct Served {
    body: Body,
    ctx: RequestCtx,
}

impl Served {
    pub(crate) fn new(body: Body, ctx: RequestCtx) -> Self {
        Served { body, ctx }
    }
}

impl http_body::Body for Served {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ctx.finish(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let complete = http_body::Body::is_end_stream(&self.body);
        self.ctx.finish(complete);
    }
}
