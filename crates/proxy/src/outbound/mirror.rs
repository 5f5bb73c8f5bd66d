//! Request mirroring (`RequestMirror`): a share of a rule's requests is
//! copied to another backend, fire and forget. The caller's request goes
//! on at once and its answer never waits for the shadow's.
//!
//! The copy of the body is taken as the body streams to the real backend
//! ([`Tee`]), up to [`MIRROR_BODY_LIMIT`]; the shadow request is sent once
//! the body has ended. A larger body is not mirrored (counted as
//! `skipped-body-too-large`). At most [`MIRROR_IN_FLIGHT`] shadow requests
//! (with their copies) exist at once per sidecar, counted from the
//! decision to mirror; beyond that a mirror is skipped (`skipped-busy`), so
//! a dead or slow shadow holds a bounded amount of memory. Each shadow
//! request is cut at [`MIRROR_TIMEOUT`] (or the rule's timeout, if
//! shorter), its answer read and thrown away. Shadow requests carry
//! `tandem-mirror: 1` (removed from every other request, so an app cannot
//! pass a real one off as a shadow) and are counted in
//! `tandem_mirror_requests`, not in the golden signals.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tandem_config::snapshot::Mirror as MirrorTo;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::balance::Balance;
use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::Error;
use crate::routing::Destination;
use crate::svc::Service;
use crate::telemetry::metrics::{Direction, Metrics, MirrorLabels, Name};
use crate::transport::forward::ToEndpoint;

/// Most bytes of a request body copied for a shadow request.
pub(crate) const MIRROR_BODY_LIMIT: usize = 64 * 1024;
/// Most shadow requests in progress in one sidecar.
pub(crate) const MIRROR_IN_FLIGHT: usize = 64;
/// Longest a shadow request may take.
pub(crate) const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) const MIRROR_HEADER: HeaderName = HeaderName::from_static("tandem-mirror");

/// What sends shadow requests: the balancer and the endpoint connector,
/// as for a real try, and the bound on shadows in progress.
pub(crate) struct Shadows {
    pub(crate) stack: Balance<ToEndpoint>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) service: Name,
}

/// Mirrors the matched rule's requests.
#[derive(Clone)]
pub(crate) struct MirrorLayer {
    pub(crate) shadows: Arc<Shadows>,
}

impl<S> tower::Layer<S> for MirrorLayer {
    type Service = Mirroring<S>;
    fn layer(&self, inner: S) -> Mirroring<S> {
        Mirroring {
            inner,
            shadows: self.shadows.clone(),
        }
    }
}

pub(crate) struct Mirroring<S> {
    inner: S,
    shadows: Arc<Shadows>,
}

impl<S: Service> Service for Mirroring<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        // Only this layer marks a shadow copy: an app's own mark would
        // pass a real request off as one.
        req.headers_mut().remove(MIRROR_HEADER);
        let Some(dest) = ctx.dest.clone() else {
            return self.inner.call(req, ctx).await;
        };
        let mirrors = ctx
            .rule
            .and_then(|i| dest.filters.get(i)?.as_ref())
            .map(|f| f.mirrors.as_slice())
            .unwrap_or_default();
        if mirrors.is_empty() {
            return self.inner.call(req, ctx).await;
        }
        let shadows = &self.shadows;
        let mut chosen = Vec::new();
        for m in mirrors {
            if fastrand::u32(..m.denominator.max(1)) >= m.numerator {
                continue;
            }
            match shadows.permits.clone().try_acquire_owned() {
                Ok(permit) => chosen.push((m.clone(), permit)),
                Err(_) => shadows.count(&dest, m, "skipped-busy"),
            }
        }
        if chosen.is_empty() {
            return self.inner.call(req, ctx).await;
        }
        if req.body().size_hint().lower() > MIRROR_BODY_LIMIT as u64 {
            for (m, _) in &chosen {
                shadows.count(&dest, m, "skipped-body-too-large");
            }
            return self.inner.call(req, ctx).await;
        }
        let mut head = Request::builder()
            .method(req.method().clone())
            .uri(req.uri().clone())
            .version(req.version())
            .body(())
            .unwrap_or_default();
        *head.headers_mut() = req.headers().clone();
        head.headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        let job = Job {
            shadows: shadows.clone(),
            dest,
            rule: ctx.rule,
            head,
            chosen,
        };
        if req.body().is_end_stream() {
            tokio::spawn(job.send(Ok(Bytes::new())));
            return self.inner.call(req, ctx).await;
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let copy = match tokio::time::timeout(MIRROR_TIMEOUT, rx).await {
                Ok(Ok(copy)) => copy,
                _ => Err("skipped-body-incomplete"),
            };
            job.send(copy).await;
        });
        let req = req.map(|body| Body::Tee(Box::new(Tee::new(body, tx))));
        self.inner.call(req, ctx).await
    }
}

impl Shadows {
    fn count(&self, dest: &Destination, m: &MirrorTo, result: &'static str) {
        let backend = dest
            .backends
            .get(m.backend)
            .map_or_else(|| dest.name.clone(), |b| b.name.clone());
        self.metrics
            .mirrors
            .get_or_create(&MirrorLabels {
                src_service: self.service.clone(),
                dst_service: backend,
                result,
            })
            .inc();
    }
}

/// The shadow requests of one request, waiting for its body.
struct Job {
    shadows: Arc<Shadows>,
    dest: Arc<Destination>,
    rule: Option<usize>,
    head: Request<()>,
    chosen: Vec<(MirrorTo, OwnedSemaphorePermit)>,
}

impl Job {
    async fn send(self, body: Result<Bytes, &'static str>) {
        let body = match body {
            Ok(b) => b,
            Err(why) => {
                for (m, _) in &self.chosen {
                    self.shadows.count(&self.dest, m, why);
                }
                return;
            }
        };
        let timeout = self
            .dest
            .policy_for(self.rule)
            .and_then(|p| p.timeout)
            .map_or(MIRROR_TIMEOUT, |t| t.min(MIRROR_TIMEOUT));
        for (m, permit) in self.chosen {
            let mut req = Request::new(Body::full(body.clone()));
            *req.method_mut() = self.head.method().clone();
            *req.uri_mut() = self.head.uri().clone();
            *req.version_mut() = self.head.version();
            *req.headers_mut() = self.head.headers().clone();
            let (shadows, dest, rule) = (self.shadows.clone(), self.dest.clone(), self.rule);
            tokio::spawn(async move {
                let _permit = permit;
                let backend = dest
                    .backends
                    .get(m.backend)
                    .map_or_else(|| dest.name.clone(), |b| b.name.clone());
                let mut ctx =
                    RequestCtx::new(Direction::outbound, shadows.service.clone(), backend);
                ctx.dest = Some(dest.clone());
                ctx.rule = rule;
                ctx.backend = m.backend;
                let sent = async {
                    let resp = shadows.stack.call(req, &mut ctx).await?;
                    let status = resp.status();
                    // Read to the end, so the connection can be used again.
                    let mut body = resp.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                    Ok::<_, Error>(status)
                };
                let result = match tokio::time::timeout(timeout, sent).await {
                    Ok(Ok(s)) if s.is_success() => "2xx",
                    Ok(Ok(s)) if s.is_redirection() => "3xx",
                    Ok(Ok(s)) if s.is_client_error() => "4xx",
                    Ok(Ok(s)) if s.is_server_error() => "5xx",
                    Ok(Ok(_)) => "1xx",
                    Ok(Err(e)) => e.kind.reason(),
                    Err(_) => "upstream-timeout",
                };
                shadows.count(&dest, &m, result);
            });
        }
    }
}

/// A request body that streams through unchanged while keeping a copy for
/// the shadow requests, handed over when the body ends; past the limit the
/// copy is dropped and the shadows are told why.
pub(crate) struct Tee {
    inner: Body,
    copy: BytesMut,
    tx: Option<oneshot::Sender<Result<Bytes, &'static str>>>,
}

impl Tee {
    fn new(inner: Body, tx: oneshot::Sender<Result<Bytes, &'static str>>) -> Self {
        Tee {
            inner,
            copy: BytesMut::new(),
            tx: Some(tx),
        }
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Ok(std::mem::take(&mut self.copy).freeze()));
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(_)) = (frame.data_ref(), &this.tx) {
                    if this.copy.len() + data.len() > MIRROR_BODY_LIMIT {
                        if let Some(tx) = this.tx.take() {
                            let _ = tx.send(Err("skipped-body-too-large"));
                        }
                        this.copy = BytesMut::new();
                    } else {
                        this.copy.extend_from_slice(data);
                    }
                }
                // Trailers end a body; so may its last data frame.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            // A broken body: the shadows get nothing.
            Poll::Ready(Some(Err(_))) => this.tx = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tee_of(parts: &[&'static [u8]]) -> (Vec<u8>, Result<Bytes, &'static str>) {
        let (tx, rx) = oneshot::channel();
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        let stream = http_body_util::StreamBody::new(tokio_stream::iter(chunks));
        let full = stream.collect().await.expect("infallible").to_bytes();
        let tee = Tee::new(Body::full(full), tx);
        let seen = tee.collect().await.expect("body").to_bytes().to_vec();
        (seen, rx.await.unwrap_or(Err("dropped")))
    }

    #[tokio::test]
    async fn the_copy_is_the_body_and_stops_at_the_limit() {
        let (seen, copy) = tee_of(&[b"hello ", b"shadow"]).await;
        assert_eq!(seen, b"hello shadow");
        assert_eq!(copy, Ok(Bytes::from_static(b"hello shadow")));
        static BIG: [u8; MIRROR_BODY_LIMIT + 1] = [1; MIRROR_BODY_LIMIT + 1];
        let (seen, copy) = tee_of(&[&BIG]).await;
        assert_eq!(seen.len(), MIRROR_BODY_LIMIT + 1);
        assert_eq!(copy, Err("skipped-body-too-large"));
    }
}
