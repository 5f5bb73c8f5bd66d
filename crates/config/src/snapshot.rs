//! The per-proxy configuration the control plane compiles and pushes. It is
//! self-contained (a proxy needs nothing else to route) and small: it holds
//! only the proxy's own inbound settings and the destinations it talks to.

use serde::{Deserialize, Serialize};

pub use crate::authz::Authz;
pub use crate::model::{ExternalProtocol, MtlsMode, PathMatchType, Protocol};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The namespace and service of the proxy this snapshot is for.
    pub namespace: String,
    pub service: String,
    /// How to serve inbound traffic; `None` when the proxy's service is not
    /// declared in the config (the proxy then refuses inbound connections).
    pub inbound: Option<Inbound>,
    /// Destinations this proxy may call, by service.
    pub destinations: Vec<Destination>,
    /// Destination names the proxy asked for that do not exist.
    #[serde(default)]
    pub unknown: Vec<String>,
    /// The mesh's trust bundle, set by the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Trust>,
    /// The cluster of the control plane that compiled it (the proxy's
    /// own): endpoints of other clusters are used only when none of its
    /// own is left.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// Calls to hosts outside the mesh: the mode and the ExternalServices.
    #[serde(default, skip_serializing_if = "Egress::is_default")]
    pub egress: Egress,
}

/// The destination name of every call to a host no ExternalService lists:
/// one bucket, so the golden signals stay bounded whatever apps call. Not a
/// valid service name, so it cannot be taken for one.
pub const UNLISTED_EGRESS: &str = "(unlisted)";

/// What the mesh lets its services call outside it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Egress {
    #[serde(default)]
    pub mode: EgressMode,
    /// The namespaces the mesh's services are in: a name `a.b` is a mesh
    /// name only when `b` is one of them, so the sidecar knows
    /// `example.com` is outside without asking the control plane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Every ExternalService of the mesh (they are few, and any proxy may
    /// call them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<External>,
}

impl Egress {
    pub fn is_default(&self) -> bool {
        *self == Egress::default()
    }
}

/// Whether hosts that no ExternalService lists may be called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressMode {
    #[default]
    AllowAll,
    RegistryOnly,
}

impl EgressMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressMode::AllowAll => "allow-all",
            EgressMode::RegistryOnly => "registry-only",
        }
    }
}

/// One ExternalService, as a caller's sidecar applies it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct External {
    pub name: String,
    pub namespace: String,
    /// Exact names, `*.suffix` wildcards and IP addresses, lower case.
    pub hosts: Vec<String>,
    pub ports: Vec<ExternalPort>,
    /// The TrafficPolicy targeting it: timeouts and retries of plain HTTP
    /// calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Who may call it, checked by the caller's own sidecar.
    #[serde(default)]
    pub authz: Authz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalPort {
    pub port: u16,
    pub protocol: ExternalProtocol,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trust {
    /// Root certificates (PEM) a peer's certificate may chain to.
    pub roots: Vec<String>,
    /// Id of the root that signs new certificates: a proxy whose
    /// certificate was signed by another one renews it.
    pub signer: String,
    /// Peers' chains may pass through intermediate CAs (off: leaves are
    /// signed by a root of the bundle directly).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub intermediates: bool,
    /// Join tokens revoked: a peer whose certificate descends from one of
    /// them is refused, though the certificate has not expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    pub protocol: Protocol,
    pub port: u16,
    #[serde(default)]
    pub mtls: MtlsMode,
    /// From the TrafficPolicy targeting this proxy's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Who may call this service (AuthorizationPolicy, the mesh default).
    #[serde(default)]
    pub authz: Authz,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    /// One bucket per calling identity instead of one for the service.
    pub per_caller: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    pub name: String,
    pub namespace: String,
    /// Protocol of the service's (first) port; decides how the hop is spoken.
    pub protocol: Protocol,
    pub ports: Vec<u16>,
    /// Route rules in precedence order. Empty means "no HTTPRoute": all
    /// traffic goes to the destination's own endpoints (backend 0).
    pub routes: Vec<Route>,
    /// Every service traffic to this destination can land on. Backend 0 is
    /// always the destination itself.
    pub backends: Vec<Backend>,
    /// The TrafficPolicy targeting this destination, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// `namespace/name` of the TrafficPolicy, for display.
    pub source: String,
    /// The whole request, retries included.
    pub timeout_ms: Option<u64>,
    pub retry: Option<RetryPolicy>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    /// 0 = off (so is all of outlier detection when both counts are 0).
    pub consecutive_errors: u32,
    /// 0 = off.
    pub consecutive_gateway_errors: u32,
    pub interval_ms: u64,
    pub base_ejection_ms: u64,
    pub max_ejection_percent: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Only with `max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

/// How an endpoint is chosen among a backend's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    /// Power of two choices over a peak-EWMA latency estimate.
    #[default]
    PeakEwma,
    RoundRobin,
    /// Power of two choices over outstanding requests.
    LeastRequest,
    /// Consistent hashing of a request header: one key, one endpoint.
    RingHash {
        header: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub per_try_timeout_ms: Option<u64>,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub budget_percent: u32,
    pub budget_min_per_second: u32,
}

/// What makes an attempt worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx answer (and a per-try timeout).
    Server5xx,
    /// 502, 503, 504 (and a per-try timeout).
    GatewayError,
    ConnectFailure,
    /// The connection failed after the request was sent.
    Reset,
    Status(u16),
    /// A gRPC status code in a trailers-only answer.
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// `namespace/name` of the HTTPRoute and the rule index, for display.
    pub route: String,
    pub rule: usize,
    /// The parentRef port this rule is attached to, if it named one.
    pub port: Option<u16>,
    pub matcher: Matcher,
    pub backends: Vec<WeightedBackend>,
    /// This rule's own timeouts and retry (HTTPRoute `timeouts`, `retry`),
    /// over the destination's TrafficPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RouteOverrides>,
    /// The rule's filters (HTTPRoute `filters`), if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Box<Filters>>,
}

/// What a route rule (or one of its backends) does to a request besides
/// choosing where it goes. Filters of a backend only modify headers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<UrlRewrite>,
    /// The rule answers with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Header edits, in this order: `remove`, `set`, `add`. Names are
/// lower-case.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UrlRewrite {
    /// The `Host` (`:authority`) the backend receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathModifier {
    /// The whole path becomes this one (the query stays).
    Full(String),
    /// The rule's `PathPrefix` match (`prefix`) is replaced by this one.
    Prefix { prefix: String, with: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub status: u16,
}

/// A shadow copy of a share of the rule's requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mirror {
    /// Index into [`Destination::backends`].
    pub backend: usize,
    /// Mirrored when a uniform draw below `denominator` is below this.
    pub numerator: u32,
    pub denominator: u32,
}

/// Faults injected into a rule's requests (`FaultInjection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// `namespace/name` of the FaultInjection, for display.
    pub source: String,
    /// Only requests carrying all of these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultDelay {
    pub ms: u64,
    /// 0-100.
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultAbort {
    /// The HTTP status answered, or for gRPC, the `grpc-status` of a
    /// trailers-only answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// 0-100.
    pub percent: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteOverrides {
    pub timeout_ms: Option<u64>,
    pub per_try_timeout_ms: Option<u64>,
    pub attempts: Option<u32>,
    pub codes: Option<Vec<u16>>,
    pub backoff_ms: Option<u64>,
}

impl PathModifier {
    /// The path after this modifier (the query is kept by the caller).
    pub fn apply(&self, path: &str) -> String {
        match self {
            PathModifier::Full(p) => p.clone(),
            PathModifier::Prefix { prefix, with } => {
                // The rule matched `prefix` by whole path elements, so what
                // is left is empty or starts with '/'.
                let rest = path.get(prefix.trim_end_matches('/').len()..).unwrap_or("");
                let out = format!("{}{rest}", with.trim_end_matches('/'));
                if out.is_empty() {
                    "/".to_string()
                } else {
                    out
                }
            }
        }
    }
}

impl Redirect {
    /// The `Location` for a request to `host` (and `port`, if it named
    /// one; else the `listener_port` it arrived on) with this path and
    /// query: what the redirect does not name stays as it was.
    pub fn location(
        &self,
        host: &str,
        port: Option<u16>,
        listener_port: u16,
        path: &str,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(s)) if s == "https" => 443,
            (None, Some(_)) => 80,
            (None, None) => port.unwrap_or(listener_port),
        };
        let host = self.hostname.as_deref().unwrap_or(host);
        let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
        let path = match &self.path {
            Some(m) => m.apply(path),
            None => path.to_string(),
        };
        let mut location = format!("{scheme}://{host}");
        if !default_port {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(q) = query {
            location.push('?');
            location.push_str(q);
        }
        location
    }
}

impl Policy {
    /// This policy with a route rule's overrides applied (a rule may also
    /// bring timeouts or retries to a destination without a policy).
    pub fn with_overrides(base: Option<&Policy>, o: &RouteOverrides) -> Policy {
        let mut p = base.cloned().unwrap_or(Policy {
            source: String::new(),
            timeout_ms: None,
            retry: None,
            load_balancer: LoadBalancer::default(),
            circuit_breaker: None,
        });
        if o.timeout_ms.is_some() {
            p.timeout_ms = o.timeout_ms;
        }
        let wants_retry = o.attempts.is_some() || o.codes.is_some() || o.backoff_ms.is_some();
        if wants_retry || o.per_try_timeout_ms.is_some() {
            let mut r = p.retry.take().unwrap_or(RetryPolicy {
                attempts: if wants_retry { 1 } else { 0 },
                on: vec![RetryOn::Server5xx, RetryOn::ConnectFailure, RetryOn::Reset],
                per_try_timeout_ms: None,
                backoff_base_ms: 25,
                backoff_max_ms: 250,
                budget_percent: 20,
                budget_min_per_second: 10,
            });
            if let Some(a) = o.attempts {
                r.attempts = a;
            }
            if let Some(c) = &o.codes {
                r.on = c.iter().map(|c| RetryOn::Status(*c)).collect();
                r.on.extend([RetryOn::ConnectFailure, RetryOn::Reset]);
            }
            if let Some(b) = o.backoff_ms {
                r.backoff_base_ms = b;
                r.backoff_max_ms = r.backoff_max_ms.max(b);
            }
            if o.per_try_timeout_ms.is_some() {
                r.per_try_timeout_ms = o.per_try_timeout_ms;
            }
            p.retry = Some(r);
        }
        p
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Matcher {
    pub path: Option<PathMatch>,
    pub headers: Vec<NameValue>,
    pub query: Vec<NameValue>,
    pub method: Option<String>,
    /// A gRPC method of any service: the path is `/SERVICE/THIS`
    /// (GRPCRoute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathMatch {
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameValue {
    /// Header names are stored lower-case.
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedBackend {
    /// Index into [`Destination::backends`].
    pub backend: usize,
    pub weight: u32,
    /// Header modifiers for requests sent to this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Box<Filters>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub name: String,
    pub namespace: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ip:port` to connect to.
    pub address: String,
    /// Instance name of a meshed endpoint, empty for a static one.
    pub instance: String,
    /// Whether a Tandem sidecar answers on this address.
    pub meshed: bool,
    /// The cluster it runs in, when not the proxy's own (imported from a
    /// remote cluster).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// Its zone, when its sidecar said (`--zone`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

impl Snapshot {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
