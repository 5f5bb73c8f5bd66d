//! The proxy's metrics, exported on the admin `/metrics` endpoint in the
//! Prometheus text format (or OpenMetrics, when the scraper asks for it).
//! The request traffic itself is kept in [`Traffic`], which also feeds the
//! reports to the control plane.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::otlp::SpanLabels;
use crate::telemetry::traffic::Traffic;

/// A label value shared without copying (service names).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Name(pub(crate) Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EncodeLabelValue)]
pub(crate) enum Direction {
    #[allow(non_camel_case_types)]
    inbound,
    #[allow(non_camel_case_types)]
    outbound,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) direction: Direction,
    pub(crate) src_service: Name,
    pub(crate) dst_service: Name,
    pub(crate) status_code: u16,
    /// Empty for responses from the application; the `tandem-error` reason
    /// for responses the mesh generated.
    pub(crate) tandem_error: &'static str,
    /// Outbound: `namespace/name` of the HTTPRoute or GRPCRoute whose rule
    /// matched (empty when none did, and inbound).
    pub(crate) route: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct TcpLabels {
    pub(crate) direction: Direction,
    pub(crate) src_service: Name,
    pub(crate) dst_service: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct InterceptLabels {
    /// What the connection turned out to be: `mesh` (a mesh service's
    /// address), `http`, `tls`, `opaque`, or `refused`.
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ConfigLabels {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct OverloadLabels {
    /// `connection` (closed at accept) or `request` (answered 503).
    pub(crate) what: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RetryLabels {
    pub(crate) src_service: Name,
    /// The destination the caller addressed (its TrafficPolicy retries).
    pub(crate) dst_service: Name,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    pub(crate) direction: Direction,
    /// `ok`, or why it failed (`no-client-cert`, `unknown-ca`, `expired`, ...).
    pub(crate) result: &'static str,
}

/// A request the access policy denied, or would deny (audit).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct AuthzLabels {
    /// `namespace/name` of the AuthorizationPolicy; empty when no policy
    /// decided (`reason` says what did).
    pub(crate) policy: String,
    /// The index of the rule in the policy; empty with no policy.
    pub(crate) rule: String,
    /// `deny`, or `audit` (let through).
    pub(crate) decision: &'static str,
    /// `policy`, `no-allow-matched` (allow policies target the service and
    /// none matched) or `mesh-default`.
    pub(crate) reason: &'static str,
}

/// A fault the caller's sidecar injected (`FaultInjection`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct FaultLabels {
    pub(crate) src_service: Name,
    /// The destination the caller addressed.
    pub(crate) dst_service: Name,
    /// `delay` or `abort`.
    pub(crate) fault: &'static str,
}

/// A shadow copy of a request (`RequestMirror`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct MirrorLabels {
    pub(crate) src_service: Name,
    /// The mirror's backend.
    pub(crate) dst_service: Name,
    /// The shadow's answer (`2xx`, `4xx`, `5xx`, ...), the mesh's reason
    /// when it had none (`upstream-connect-failure`, `upstream-timeout`),
    /// or why no copy was sent (`skipped-body-too-large`, `skipped-busy`,
    /// `skipped-body-incomplete`).
    pub(crate) result: &'static str,
}

pub(crate) struct Metrics {
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) tcp_open: Family<TcpLabels, Counter>,
    pub(crate) tcp_close: Family<TcpLabels, Counter>,
    pub(crate) tcp_active: Family<TcpLabels, Gauge>,
    pub(crate) tcp_read: Family<TcpLabels, Counter>,
    pub(crate) tcp_write: Family<TcpLabels, Counter>,
    pub(crate) config_updates: Family<ConfigLabels, Counter>,
    pub(crate) config_version: Gauge,
    pub(crate) control_connected: Gauge,
    pub(crate) handshakes: Family<HandshakeLabels, Counter>,
    pub(crate) plaintext: Counter,
    pub(crate) cert_expiry: Gauge,
    pub(crate) renewals: Family<ConfigLabels, Counter>,
    pub(crate) overload: Family<OverloadLabels, Counter>,
    pub(crate) ejections: Family<RetryLabels, Counter>,
    pub(crate) authz: Family<AuthzLabels, Counter>,
    pub(crate) faults: Family<FaultLabels, Counter>,
    pub(crate) mirrors: Family<MirrorLabels, Counter>,
    pub(crate) spans: Family<SpanLabels, Counter>,
    pub(crate) access_log_dropped: Counter,
    pub(crate) taps: Gauge,
    pub(crate) intercepted: Family<InterceptLabels, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let traffic = Arc::new(Traffic::default());
        let tcp_open = Family::<TcpLabels, Counter>::default();
        let tcp_close = Family::<TcpLabels, Counter>::default();
        let tcp_active = Family::<TcpLabels, Gauge>::default();
        let tcp_read = Family::<TcpLabels, Counter>::default();
        let tcp_write = Family::<TcpLabels, Counter>::default();
        let config_updates = Family::<ConfigLabels, Counter>::default();
        let config_version = Gauge::default();
        let control_connected = Gauge::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let plaintext = Counter::default();
        let cert_expiry = Gauge::default();
        let renewals = Family::<ConfigLabels, Counter>::default();
        let overload = Family::<OverloadLabels, Counter>::default();
        let ejections = Family::<RetryLabels, Counter>::default();
        let authz = Family::<AuthzLabels, Counter>::default();
        let faults = Family::<FaultLabels, Counter>::default();
        let mirrors = Family::<MirrorLabels, Counter>::default();
        let spans = Family::<SpanLabels, Counter>::default();
        let access_log_dropped = Counter::default();
        let taps = Gauge::default();
        let intercepted = Family::<InterceptLabels, Counter>::default();
        let mut r = Registry::with_prefix("tandem");
        r.register(
            "intercepted_connections",
            "Connections of the app intercepted transparently, by what they turned out to be",
            intercepted.clone(),
        );
        r.register_collector(Box::new(traffic.clone()));
        r.register(
            "faults_injected",
            "Delays and aborts injected into outbound requests by a FaultInjection",
            faults.clone(),
        );
        r.register(
            "mirror_requests",
            "Shadow copies of outbound requests (RequestMirror), by backend and result; not counted in tandem_requests",
            mirrors.clone(),
        );
        r.register(
            "trace_spans",
            "Spans this sidecar made, by result: exported, dropped-queue-full (the export queue was full) or dropped-export-failed (the collector did not take them)",
            spans.clone(),
        );
        r.register(
            "taps_active",
            "Taps in force on this sidecar (tandem tap)",
            taps.clone(),
        );
        r.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer was behind (a slow disk)",
            access_log_dropped.clone(),
        );
        r.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by calling service and backend",
            ejections.clone(),
        );
        r.register(
            "overload_rejections",
            "Connections closed and requests refused because the sidecar was at its limits",
            overload.clone(),
        );
        r.register(
            "tls_handshakes",
            "mTLS handshakes between sidecars, by direction and result (ok or the reason of the failure)",
            handshakes.clone(),
        );
        r.register(
            "inbound_plaintext_connections",
            "Plaintext connections accepted by a permissive inbound side (migration is done when this stops growing)",
            plaintext.clone(),
        );
        r.register(
            "identity_cert_expiry_seconds",
            "When this proxy's certificate expires, Unix seconds",
            cert_expiry.clone(),
        );
        r.register(
            "identity_renewals",
            "Certificate requests to the control plane, by result (issued or failed)",
            renewals.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "Opaque TCP connections opened",
            tcp_open.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "Opaque TCP connections closed",
            tcp_close.clone(),
        );
        r.register(
            "tcp_connections_active",
            "Opaque TCP connections open now",
            tcp_active.clone(),
        );
        r.register(
            "tcp_read_bytes",
            "Bytes received from the connecting side of opaque TCP connections",
            tcp_read.clone(),
        );
        r.register(
            "tcp_write_bytes",
            "Bytes sent to the connecting side of opaque TCP connections",
            tcp_write.clone(),
        );
        r.register(
            "authz_denials",
            "Inbound requests and connections the access policy denied (decision=deny) or would deny (decision=audit, let through)",
            authz.clone(),
        );
        r.register(
            "config_updates",
            "Snapshots received, by result (applied or rejected)",
            config_updates.clone(),
        );
        r.register(
            "config_version",
            "Version of the snapshot in force",
            config_version.clone(),
        );
        r.register(
            "control_plane_connected",
            "1 while the stream to the control plane is up",
            control_connected.clone(),
        );
        Metrics {
            traffic,
            tcp_open,
            tcp_close,
            tcp_active,
            tcp_read,
            tcp_write,
            config_updates,
            config_version,
            control_connected,
            handshakes,
            plaintext,
            cert_expiry,
            renewals,
            overload,
            ejections,
            authz,
            faults,
            mirrors,
            spans,
            access_log_dropped,
            taps,
            intercepted,
            registry: r,
        }
    }

    /// The metrics in the Prometheus text format (0.0.4), or in
    /// OpenMetrics with `openmetrics`; returns the content type too.
    pub(crate) fn encode(&self, openmetrics: bool) -> (&'static str, String) {
        let mut out = String::with_capacity(8192);
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            (
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                out,
            )
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            ("text/plain; version=0.0.4; charset=utf-8", out)
        }
    }
}
