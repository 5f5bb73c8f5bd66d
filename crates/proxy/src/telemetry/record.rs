//! What a sidecar keeps of one request for its spans, its access log and
//! the taps in force:
//! the trace it belongs to (joined or started at the edge), and for a
//! request that is sampled for either, a [`Recording`] filled in as it
//! goes and handed over when its response body ends. A request that is
//! neither costs a header lookup or two.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, Method, Version};
use tokio::time::Instant;

use crate::ctx::RequestCtx;
use crate::error::MeshError;
use crate::telemetry::access::AccessLog;
use crate::telemetry::metrics::Direction;
use crate::telemetry::otlp::Exporter;
use crate::telemetry::tap::Taps;
use crate::telemetry::trace::{new_span_id, Parent, Sampler, TraceContext, REQUEST_ID};

/// Starts each request's trace and records the sampled ones.
pub(crate) struct Recorder {
    sampler: Sampler,
    spans: Option<Exporter>,
    access: Option<AccessLog>,
    pub(crate) taps: Arc<Taps>,
}

/// A sampled request, as it goes.
pub(crate) struct Recording {
    recorder: Arc<Recorder>,
    /// Its spans go to the collector.
    pub(crate) spans: bool,
    /// It gets an access log line.
    pub(crate) log: bool,
    /// A tap wants it: its request headers are kept.
    pub(crate) headers: Option<HeaderMap>,
    /// The wall clock when the request arrived.
    pub(crate) started: SystemTime,
    pub(crate) method: Method,
    pub(crate) path: Box<str>,
    pub(crate) query: Option<Box<str>>,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) version: Version,
    pub(crate) request_id: Option<HeaderValue>,
    /// The request body's declared length.
    pub(crate) request_bytes: Option<u64>,
    pub(crate) tries: Vec<TrySpan>,
}

/// One try of an outbound request, with a span of its own.
pub(crate) struct TrySpan {
    pub(crate) span_id: u64,
    pub(crate) start: Instant,
    pub(crate) end: Option<Instant>,
    pub(crate) endpoint: Option<SocketAddr>,
    /// The mTLS server name of a meshed endpoint.
    pub(crate) identity: Option<rustls_pki_types::ServerName<'static>>,
    pub(crate) status: u16,
    pub(crate) flag: Option<MeshError>,
}

impl Recorder {
    pub(crate) fn new(
        sampler: Sampler,
        spans: Option<Exporter>,
        access: Option<AccessLog>,
        taps: Arc<Taps>,
    ) -> Self {
        Recorder {
            sampler,
            spans,
            access,
            taps,
        }
    }

    /// The request's trace: the caller's joined (or a new one) with a span
    /// of this sidecar's when spans are exported; otherwise the caller's
    /// trace as it came, for logs, with its headers untouched. A request
    /// sampled for spans or the access log, or tapped, gets a
    /// [`Recording`].
    pub(crate) fn start(
        self: &Arc<Self>,
        ctx: &mut RequestCtx,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        version: Version,
    ) {
        let parent = Parent::of(headers);
        let t = match (&self.spans, parent) {
            (Some(_), _) => Some(TraceContext::start(parent, &self.sampler)),
            (None, Some(p)) => Some(TraceContext {
                trace_id: p.trace_id,
                parent_id: Some(p.span_id),
                span_id: p.span_id,
                sampled: false,
                format: p.format,
                ours: false,
            }),
            (None, None) => None,
        };
        ctx.span = t;
        let spans = self.spans.is_some() && t.is_some_and(|t| t.sampled);
        let log = self
            .access
            .as_ref()
            .is_some_and(|a| a.sample(t.map(|t| t.trace_id)));
        let tap = self.taps.wants(method, uri.path());
        if !spans && !log && !tap {
            return;
        }
        ctx.recording = Some(Box::new(Recording {
            recorder: self.clone(),
            spans,
            log,
            headers: tap.then(|| headers.clone()),
            started: SystemTime::now(),
            method: method.clone(),
            path: uri.path().into(),
            query: uri.query().map(Into::into),
            // HTTP/2 names it in the `:authority`, not in `Host`.
            host: headers.get(http::header::HOST).cloned().or_else(|| {
                uri.authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            }),
            version,
            request_id: headers.get(&REQUEST_ID).cloned(),
            request_bytes: headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
            tries: Vec::new(),
        }));
    }
}

impl RequestCtx {
    /// Marks `headers` (of a try to an endpoint, or of the request to the
    /// app) with this sidecar's span as the next hop's parent; a try of an
    /// outbound request whose spans are exported gets a span of its own.
    pub(crate) fn trace_hop(&mut self, headers: &mut HeaderMap) {
        let Some(t) = self.span.filter(|t| t.ours) else {
            return;
        };
        let span_id = match (&mut self.recording, self.direction) {
            (Some(r), Direction::outbound) if r.spans => {
                let id = new_span_id();
                r.tries.push(TrySpan {
                    span_id: id,
                    start: Instant::now(),
                    end: None,
                    endpoint: None,
                    identity: None,
                    status: 0,
                    flag: None,
                });
                id
            }
            _ => t.span_id,
        };
        t.inject(headers, span_id);
    }

    /// The current try ended: its status (0: none) and flag.
    pub(crate) fn trace_hop_done(&mut self, status: u16, flag: Option<MeshError>) {
        if self.recording.as_ref().is_none_or(|r| r.tries.is_empty()) {
            return;
        }
        let endpoint = self.endpoint_addr();
        let identity = self.endpoint_server_name();
        if let Some(t) = self.recording.as_mut().and_then(|r| r.tries.last_mut()) {
            if t.end.is_none() {
                t.end = Some(Instant::now());
                t.endpoint = endpoint;
                t.identity = identity;
                t.status = status;
                t.flag = flag;
            }
        }
    }

    /// At the end of the response: a sampled request's spans go to the
    /// export queue and its access log line to the writer (either is
    /// dropped, and counted, when its queue is full).
    pub(crate) fn end_recording(&mut self, now: Instant) {
        let Some(rec) = self.recording.take() else {
            return;
        };
        let recorder = rec.recorder.clone();
        if rec.spans {
            if let (Some(e), Some(t)) = (&recorder.spans, self.span) {
                e.send(self, &t, &rec, now);
            }
        }
        if rec.log {
            if let Some(a) = &recorder.access {
                a.write(self, &rec, now);
            }
        }
        if rec.headers.is_some() {
            recorder.taps.send(self, &rec, now);
        }
    }
}
