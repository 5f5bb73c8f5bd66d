//! Bodies on the request path: what a layer sends or answers, and what the
//! listeners send back to the caller.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::ctx::RequestCtx;
use crate::outbound::mirror::Tee;
use crate::policy::replay::Replay;

/// Every body inside the sidecar: one streamed from a peer, one the mesh
/// made, a request body that a retry may send again, an answer read whole
/// (kept while a retry replaces it), a request body copied for a shadow
/// request as it streams, or an HTTP/1.1 request body that is read to its
/// end even when the next hop stops wanting it ([`Drained`]).
pub(crate) enum Body {
    Stream(Incoming),
    Full(Full<Bytes>),
    Replay(Replay<Body>),
    Collected(Box<http_body_util::Collected<Bytes>>),
    Tee(Box<Tee>),
    Drained(Drained),
}

/// Most of a request body read and thrown away after the next hop let go
/// of it, and for how long.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// An HTTP/1.1 request body on its way to the next hop. When the hop lets
/// go of it before its end (the upstream answered without reading it all,
/// as an app may), the rest is read and thrown away in the background, up
/// to [`DRAIN_LIMIT`] and [`DRAIN_TIME`]: an HTTP/1.1 connection whose
/// request body was not read to the end cannot carry the next request, so
/// without this the caller would lose its keep-alive connection, and a
/// request it had already sent on it.
pub(crate) struct Drained(Option<Incoming>);

impl Drained {
    pub(crate) fn new(body: Incoming) -> Self {
        Drained(Some(body))
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(mut rest) = self.0.take() else {
            return;
        };
        if rest.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let drain = async {
                let mut read = 0;
                while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut rest).await {
                    read += frame.data_ref().map_or(0, |d| d.len());
                    if read > DRAIN_LIMIT {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

impl http_body::Body for Drained {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().0.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
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
            Body::Drained(b) => Pin::new(b).poll_frame(cx),
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
            Body::Drained(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
            Body::Replay(b) => b.size_hint(),
            Body::Collected(b) => b.size_hint(),
            Body::Tee(b) => b.size_hint(),
            Body::Drained(b) => b.size_hint(),
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
        match &polled {
            Poll::Ready(None) => this.ctx.finish(true),
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.ctx.response_bytes += d.len() as u64;
                }
            }
            _ => {}
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
