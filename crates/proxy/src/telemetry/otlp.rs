//! Spans and their export with OTLP. Each sampled request gets a span in
//! every sidecar it passes: a server span on the destination's side, a
//! client span on the caller's with a child per try (retries and the
//! mesh's flags as events). They are built when the response body ends,
//! queued (bounded: a full queue drops spans and counts them, a request
//! never waits) and sent in batches by one task, over gRPC or
//! HTTP/protobuf, to the collector `OTEL_EXPORTER_OTLP_ENDPOINT` names.
//!
//! The types and the gRPC client come from the `opentelemetry-proto` crate
//! (the official protos, generated with the workspace's prost and tonic);
//! the OpenTelemetry SDK's tracer is not used: a sidecar's spans are a few
//! per request, made from its request context.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Version;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ctx::RequestCtx;
use crate::telemetry::metrics::Direction;
use crate::telemetry::record::Recording;
use crate::telemetry::trace::{Sampler, TraceContext};

/// Spans waiting for export, at most; more are dropped.
pub(crate) const QUEUE: usize = 2048;
/// Spans per export request, at most.
const BATCH: usize = 512;
/// A batch goes out at the latest this long after its first span.
const FLUSH: Duration = Duration::from_secs(1);
/// An export that takes longer is given up (its spans counted as dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How spans reach the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Tracing settings of a sidecar.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// The collector: for gRPC its address (`http://collector:4317`); for
    /// HTTP the base URL, to which `/v1/traces` is added. `None`: no
    /// spans are made (the trace headers still pass through).
    pub endpoint: Option<String>,
    /// An HTTP URL used as it is (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub traces_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub sampler: Sampler,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct SpanLabels {
    /// `exported`, `dropped-queue-full` or `dropped-export-failed`.
    pub(crate) result: &'static str,
}

/// Who this sidecar is, for the spans' resource.
pub(crate) struct Me {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) trust_domain: String,
}

/// Sends the spans of sampled requests to the collector.
pub(crate) struct Exporter {
    queue: mpsc::Sender<Span>,
    spans: Family<SpanLabels, Counter>,
    trust_domain: String,
}

impl Exporter {
    /// An exporter to `cfg`'s collector (spawning the export task), if it
    /// names one.
    pub(crate) fn new(
        cfg: &TraceConfig,
        me: &Me,
        spans: Family<SpanLabels, Counter>,
    ) -> Option<Self> {
        let target = match (&cfg.traces_endpoint, &cfg.endpoint) {
            (Some(url), _) => Target::new(cfg.protocol, url.clone(), true),
            (None, Some(base)) => Target::new(cfg.protocol, base.clone(), false),
            (None, None) => return None,
        };
        match target {
            Ok(target) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(export(rx, target, resource(me), spans.clone()));
                Some(Exporter {
                    queue: tx,
                    spans,
                    trust_domain: me.trust_domain.clone(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "tracing off: bad OTLP endpoint");
                None
            }
        }
    }

    /// Queues the spans of a request that ended `now` (a full queue drops
    /// them, counted).
    pub(crate) fn send(&self, ctx: &RequestCtx, t: &TraceContext, rec: &Recording, now: Instant) {
        for span in spans(ctx, t, rec, now, &self.trust_domain) {
            if self.queue.try_send(span).is_err() {
                self.spans
                    .get_or_create(&SpanLabels {
                        result: "dropped-queue-full",
                    })
                    .inc();
            }
        }
    }
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..KeyValue::default()
    }
}

fn s(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.into()))
}

fn i(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

/// The spans of one request: the sidecar's own, and one per try.
fn spans(
    ctx: &RequestCtx,
    t: &TraceContext,
    rec: &Recording,
    now: Instant,
    trust_domain: &str,
) -> Vec<Span> {
    let wall_now = SystemTime::now();
    let at = |i: Instant| -> u64 {
        let back = now.saturating_duration_since(i);
        wall_now
            .checked_sub(back)
            .unwrap_or(wall_now)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let unix = |w: SystemTime| {
        w.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let inbound = ctx.direction == Direction::inbound;
    let flag = ctx.flag.or(ctx.upstream_flag);
    let mut attrs = vec![
        s("http.request.method", rec.method.as_str()),
        s("url.path", &*rec.path),
        s("url.scheme", "http"),
        s(
            "network.protocol.version",
            match rec.version {
                Version::HTTP_2 => "2",
                Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
        i("http.response.status_code", i64::from(ctx.status)),
        s(
            "tandem.direction",
            if inbound { "inbound" } else { "outbound" },
        ),
    ];
    if let Some((host, port)) =
        rec.host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.rsplit_once(':') {
                Some((n, p)) if p.parse::<u16>().is_ok() => (n, p.parse::<i64>().ok()),
                _ => (h, None),
            })
    {
        attrs.push(s("server.address", host));
        if let Some(p) = port {
            attrs.push(i("server.port", p));
        }
    }
    if let Some(f) = flag {
        attrs.push(s("tandem.response_flag", f.reason()));
    }
    if let Some(own) = ctx.timings.own {
        attrs.push(kv(
            "tandem.proxy_duration_ms",
            any_value::Value::DoubleValue(own.as_secs_f64() * 1e3),
        ));
    }
    if inbound {
        if let Some(c) = &ctx.caller {
            attrs.push(s("tandem.peer.service", &*c.name));
            attrs.push(s("tandem.peer.spiffe_id", &*c.id));
        }
        if let Some(r) = ctx.remote {
            attrs.push(s("client.address", r.ip().to_string()));
        }
    } else {
        attrs.push(s("peer.service", &*ctx.dst.0));
        if let Some(r) = ctx
            .dest
            .as_ref()
            .zip(ctx.rule)
            .and_then(|(d, i)| d.route_names.get(i))
        {
            attrs.push(s("tandem.route", &*r.0));
        }
    }
    let failed = flag.is_some() || ctx.status >= if inbound { 500 } else { 400 };
    let status = Some(Status {
        code: if failed {
            StatusCode::Error
        } else {
            StatusCode::Unset
        } as i32,
        message: flag.map(|f| f.reason().to_string()).unwrap_or_default(),
    });
    let mut events = Vec::new();
    for (n, tr) in rec.tries.iter().enumerate().skip(1) {
        let before = &rec.tries[n - 1];
        let outcome = match (before.flag, before.status) {
            (Some(f), _) => f.reason().to_string(),
            (None, 0) => "no answer".to_string(),
            (None, st) => st.to_string(),
        };
        events.push(Event {
            time_unix_nano: at(tr.start),
            name: "retry".into(),
            attributes: vec![
                i("http.request.resend_count", n as i64),
                s("tandem.previous_outcome", outcome),
            ],
            ..Event::default()
        });
    }
    if let Some(f) = ctx.flag {
        events.push(Event {
            time_unix_nano: at(now),
            name: "tandem.mesh_answer".into(),
            attributes: vec![
                s("tandem.response_flag", f.reason()),
                i("http.response.status_code", i64::from(ctx.status)),
            ],
            ..Event::default()
        });
    }
    let trace_id = t.trace_id.to_be_bytes().to_vec();
    let mut out = Vec::with_capacity(1 + rec.tries.len());
    out.push(Span {
        trace_id: trace_id.clone(),
        span_id: t.span_id.to_be_bytes().to_vec(),
        parent_span_id: t
            .parent_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: 1,
        name: rec.method.as_str().to_string(),
        kind: if inbound {
            SpanKind::Server
        } else {
            SpanKind::Client
        } as i32,
        start_time_unix_nano: unix(rec.started),
        end_time_unix_nano: at(now),
        attributes: attrs,
        events,
        status,
        ..Span::default()
    });
    for (n, tr) in rec.tries.iter().enumerate() {
        let mut attrs = vec![
            s("http.request.method", rec.method.as_str()),
            i("http.response.status_code", i64::from(tr.status)),
            s("peer.service", &*ctx.dst.0),
        ];
        if n > 0 {
            attrs.push(i("http.request.resend_count", n as i64));
        }
        if let Some(ep) = tr.endpoint {
            attrs.push(s("network.peer.address", ep.ip().to_string()));
            attrs.push(i("network.peer.port", i64::from(ep.port())));
        }
        if let Some(f) = tr.flag {
            attrs.push(s("tandem.response_flag", f.reason()));
        }
        // The identity the endpoint's sidecar had to prove
        // (`name.namespace.tandem`).
        if let Some(id) = tr
            .identity
            .as_ref()
            .and_then(|n| tandem_identity::tls::expected_id(trust_domain, n))
        {
            attrs.push(s("tandem.peer.spiffe_id", id.uri()));
        }
        let failed = tr.flag.is_some() || tr.status == 0 || tr.status >= 500;
        out.push(Span {
            trace_id: trace_id.clone(),
            span_id: tr.span_id.to_be_bytes().to_vec(),
            parent_span_id: t.span_id.to_be_bytes().to_vec(),
            flags: 1,
            name: format!("{} try {}", rec.method.as_str(), n + 1),
            kind: SpanKind::Client as i32,
            start_time_unix_nano: at(tr.start),
            end_time_unix_nano: at(tr.end.unwrap_or(now)),
            attributes: attrs,
            status: Some(Status {
                code: if failed {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                } as i32,
                message: String::new(),
            }),
            ..Span::default()
        });
    }
    out
}

fn resource(me: &Me) -> Resource {
    Resource {
        attributes: vec![
            s("service.name", &me.service),
            s("service.namespace", &me.namespace),
            s("service.instance.id", &me.instance),
            s("telemetry.sdk.name", "tandem"),
            s("telemetry.sdk.language", "rust"),
            s("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
            s("tandem.component", "sidecar"),
        ],
        ..Resource::default()
    }
}

/// Where batches go (one per sidecar, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Target {
    Grpc(TraceServiceClient<tonic::transport::Channel>),
    Http {
        client: hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<bytes::Bytes>,
        >,
        uri: http::Uri,
    },
}

impl Target {
    /// `exact`: the URL is the traces endpoint itself (else `/v1/traces`
    /// is added for HTTP).
    fn new(protocol: OtlpProtocol, url: String, exact: bool) -> Result<Target, String> {
        match protocol {
            OtlpProtocol::Grpc => {
                let ch = tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("`{url}`: {e}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy();
                Ok(Target::Grpc(TraceServiceClient::new(ch)))
            }
            OtlpProtocol::HttpProtobuf => {
                let full = if exact {
                    url.clone()
                } else {
                    format!("{}/v1/traces", url.trim_end_matches('/'))
                };
                let uri: http::Uri = full.parse().map_err(|e| format!("`{full}`: {e}"))?;
                if uri.scheme_str() != Some("http") {
                    return Err(format!("`{full}`: only http:// collectors are supported"));
                }
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                Ok(Target::Http { client, uri })
            }
        }
    }

    async fn send(&mut self, req: ExportTraceServiceRequest) -> Result<(), String> {
        match self {
            Target::Grpc(c) => c.export(req).await.map(|_| ()).map_err(|s| s.to_string()),
            Target::Http { client, uri } => {
                let body = prost::Message::encode_to_vec(&req);
                let r = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .map_err(|e| e.to_string())?;
                let resp = client.request(r).await.map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("collector answered {}", resp.status()))
                }
            }
        }
    }
}

/// The export task: batches of up to [`BATCH`] spans, each sent within
/// [`FLUSH`] of its first span.
async fn export(
    mut rx: mpsc::Receiver<Span>,
    mut target: Target,
    resource: Resource,
    spans: Family<SpanLabels, Counter>,
) {
    let scope = InstrumentationScope {
        name: "tandem-proxy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..InstrumentationScope::default()
    };
    let mut last_warning: Option<Instant> = None;
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut batch = Vec::with_capacity(BATCH.min(64));
        batch.push(first);
        let until = Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let result = match tokio::time::timeout(EXPORT_TIMEOUT, target.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer in {EXPORT_TIMEOUT:?}")),
        };
        let label = match result {
            Ok(()) => "exported",
            Err(e) => {
                // One warning a minute is enough to say the collector is away.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %e, spans = n, "OTLP export failed; spans dropped");
                    last_warning = Some(Instant::now());
                }
                "dropped-export-failed"
            }
        };
        spans.get_or_create(&SpanLabels { result: label }).inc_by(n);
    }
}
