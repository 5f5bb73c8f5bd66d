//! The resources users write. Field names follow Kubernetes and the Gateway
//! API (GAMMA profile); every struct refuses unknown fields so that a typo is
//! an error, never a silently ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

pub const TANDEM_API: &str = "tandem.dev/v1alpha1";
pub const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where a value came from: file, line and column (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pos {
    pub file: Arc<Path>,
    pub line: u64,
    pub column: u64,
}

/// Common head of every resource.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: Spanned<String>,
    pub kind: Spanned<String>,
    pub metadata: Metadata,
    pub spec: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Just enough of a document to know which kind it is.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Head {
    pub api_version: Option<Spanned<String>>,
    pub kind: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    /// HTTP/2 on the wire (h2c between app and sidecar).
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        })
    }
}

// ---- Service ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    /// Static endpoints for a service that runs outside the mesh.
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
    /// Whether the service's sidecars accept plaintext besides mTLS.
    #[serde(default)]
    pub mtls: Option<Spanned<MtlsMode>>,
    /// Whether other clusters may import its endpoints (`RemoteCluster`).
    #[serde(default)]
    pub export: bool,
}

/// How a sidecar treats inbound connections that are not mTLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mTLS with a certificate from the mesh (the default).
    #[default]
    Strict,
    /// mTLS, and plaintext too (counted), while callers migrate.
    Permissive,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: Spanned<u16>,
    pub protocol: Spanned<Protocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticEndpoint {
    /// `host:port`, with an IP literal host.
    pub address: Spanned<String>,
}

// ---- HTTPRoute (GAMMA) -------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Spanned<RouteRuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<Spanned<String>>,
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<Spanned<MatchSpec>>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Gateway API `timeouts`: override the TrafficPolicy for this rule.
    #[serde(default)]
    pub timeouts: Option<RouteTimeoutsSpec>,
    /// Gateway API `retry` (GEP-1731): overrides the TrafficPolicy's retry.
    #[serde(default)]
    pub retry: Option<RouteRetrySpec>,
    /// Gateway API filters, applied in order to the rule's requests.
    #[serde(default)]
    pub filters: Vec<Spanned<RouteFilterSpec>>,
}

/// One Gateway API `HTTPRouteFilter`: `type` names which of the other
/// fields carries its settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteFilterSpec {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub request_header_modifier: Option<Spanned<HeaderModifierSpec>>,
    #[serde(default)]
    pub response_header_modifier: Option<Spanned<HeaderModifierSpec>>,
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<Spanned<UrlRewriteSpec>>,
    #[serde(default)]
    pub request_redirect: Option<Spanned<RedirectSpec>>,
    #[serde(default)]
    pub request_mirror: Option<Spanned<MirrorSpec>>,
    #[serde(default)]
    pub extension_ref: Option<Spanned<ExtensionRefSpec>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifierSpec {
    /// Replace the header's values with this one.
    #[serde(default)]
    pub set: Vec<HeaderValueSpec>,
    /// Append this value to the header's.
    #[serde(default)]
    pub add: Vec<HeaderValueSpec>,
    /// Remove the header.
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderValueSpec {
    pub name: Spanned<String>,
    pub value: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewriteSpec {
    #[serde(default)]
    pub hostname: Option<Spanned<String>>,
    #[serde(default)]
    pub path: Option<Spanned<PathModifierSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub replace_full_path: Option<Spanned<String>>,
    #[serde(default)]
    pub replace_prefix_match: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<Spanned<String>>,
    #[serde(default)]
    pub hostname: Option<Spanned<String>>,
    #[serde(default)]
    pub path: Option<Spanned<PathModifierSpec>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default)]
    pub status_code: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    pub backend_ref: BackendObjectRef,
    /// Share of requests mirrored, 0-100 (default: all).
    #[serde(default)]
    pub percent: Option<Spanned<u32>>,
    /// Share of requests mirrored as `numerator / denominator`.
    #[serde(default)]
    pub fraction: Option<Spanned<FractionSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FractionSpec {
    pub numerator: Spanned<u32>,
    /// Default 100.
    #[serde(default)]
    pub denominator: Option<Spanned<u32>>,
}

/// A Gateway API `BackendObjectReference`: a Service, by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObjectRef {
    #[serde(default)]
    pub group: Option<Spanned<String>>,
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
}

/// A filter defined by another resource in the route's namespace (here: a
/// `FaultInjection` of `tandem.dev`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtensionRefSpec {
    pub group: Spanned<String>,
    pub kind: Spanned<String>,
    pub name: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteTimeoutsSpec {
    /// The whole request (TrafficPolicy `timeout`).
    #[serde(default)]
    pub request: Option<Spanned<String>>,
    /// One try (TrafficPolicy `retry.perTryTimeout`).
    #[serde(default)]
    pub backend_request: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRetrySpec {
    /// Status codes that are retried.
    #[serde(default)]
    pub codes: Option<Vec<Spanned<u16>>>,
    /// Retries after the first try.
    #[serde(default)]
    pub attempts: Option<Spanned<u32>>,
    /// Backoff base.
    #[serde(default)]
    pub backoff: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub method: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    PathPrefix,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatchSpec {
    #[serde(default, rename = "type")]
    pub kind: Option<Spanned<PathMatchType>>,
    #[serde(default)]
    pub value: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    Exact,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatchSpec {
    #[serde(default, rename = "type")]
    pub kind: Option<ValueMatchType>,
    pub name: Spanned<String>,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<Spanned<String>>,
    #[serde(default)]
    pub kind: Option<Spanned<String>>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    #[serde(default)]
    pub weight: Option<Spanned<u32>>,
    /// Filters for requests sent to this backend only (header modifiers).
    #[serde(default)]
    pub filters: Vec<Spanned<RouteFilterSpec>>,
}

// ---- GRPCRoute (GAMMA) ------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Spanned<GrpcRuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<Spanned<GrpcMatchSpec>>,
    /// Header modifiers, mirrors and a FaultInjection (no URL filters).
    #[serde(default)]
    pub filters: Vec<Spanned<RouteFilterSpec>>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMatchSpec {
    #[serde(default)]
    pub method: Option<Spanned<GrpcMethodMatchSpec>>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
}

/// A gRPC service (`pkg.Service`), a method of it, or both.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatchSpec {
    /// `Exact` (the default).
    #[serde(default, rename = "type")]
    pub kind: Option<Spanned<String>>,
    #[serde(default)]
    pub service: Option<Spanned<String>>,
    #[serde(default)]
    pub method: Option<Spanned<String>>,
}

// ---- TrafficPolicy ---------------------------------------------------------------

/// Resilience policy for calls to one Service: the whole-request timeout,
/// retries, the load-balancing algorithm, outlier detection and a rate
/// limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: TargetRef,
    /// Whole request, retries included (`5s`, `250ms`).
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
}

/// Outlier detection: endpoints that keep failing are taken out of the
/// rotation for a while.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Consecutive failures (5xx, connect failures, resets, mTLS failures)
    /// that eject an endpoint (default 5; 0 = off).
    #[serde(default)]
    pub consecutive_errors: Option<Spanned<u32>>,
    /// Consecutive gateway errors (502, 503, 504, connect failures) that
    /// eject an endpoint (default off).
    #[serde(default)]
    pub consecutive_gateway_errors: Option<Spanned<u32>>,
    /// Failures further apart than this do not count as consecutive
    /// (default 10s).
    #[serde(default)]
    pub interval: Option<Spanned<String>>,
    /// First ejection's length; each further ejection of the same endpoint
    /// lasts one more of it (default 30s).
    #[serde(default)]
    pub base_ejection_time: Option<Spanned<String>>,
    /// Most endpoints of a backend ejected at once, in percent (default 50).
    #[serde(default)]
    pub max_ejection_percent: Option<Spanned<u32>>,
    /// Most requests in progress to the service from one sidecar; more are
    /// answered 503 `overflow` at once.
    #[serde(default)]
    pub max_requests: Option<Spanned<u32>>,
    /// Most connections one sidecar keeps open to the service's endpoints
    /// (an endpoint without any may always open one).
    #[serde(default)]
    pub max_connections: Option<Spanned<u32>>,
    /// Most requests waiting for a connection at `maxConnections`; more are
    /// answered 503 `overflow` at once (default 1024).
    #[serde(default)]
    pub max_pending_requests: Option<Spanned<u32>>,
}

/// A local token bucket on each inbound sidecar of the target service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub requests_per_second: Spanned<f64>,
    /// Requests allowed at once above the rate (default: one second's worth).
    #[serde(default)]
    pub burst: Option<Spanned<u32>>,
    /// `service` (one bucket for all callers, the default) or `caller` (one
    /// bucket per calling identity).
    #[serde(default)]
    pub per: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `peak-ewma` (default), `round-robin`, `least-request`, `ring-hash`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// For `ring-hash`: the request header whose value picks the endpoint.
    #[serde(default)]
    pub hash_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: Option<Spanned<String>>,
    pub kind: Spanned<String>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    /// One named part of the target (an HTTPRoute rule's `name`).
    #[serde(default)]
    pub section_name: Option<Spanned<String>>,
}

impl TargetRef {
    /// `(namespace, name)` of the target; the namespace is `default_ns`
    /// (the referring resource's) unless the reference names one.
    pub fn resolve<'a>(&'a self, default_ns: &'a str) -> (&'a str, &'a str) {
        let ns = self
            .namespace
            .as_ref()
            .map_or(default_ns, |n| n.value.as_str());
        (ns, self.name.value.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try (so `attempts: 3` sends at most 4).
    pub attempts: Spanned<u32>,
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`,
    /// `retriable-4xx` (409), a status code such as `503`, or a gRPC status
    /// such as `unavailable`. Default: `[5xx, connect-failure, reset]`.
    #[serde(default)]
    pub on: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub per_try_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub backoff: Option<BackoffSpec>,
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackoffSpec {
    #[serde(default)]
    pub base: Option<Spanned<String>>,
    #[serde(default)]
    pub max: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Retries allowed as a percentage of recent requests.
    #[serde(default)]
    pub percent: Option<Spanned<u32>>,
    /// Retries allowed per second regardless of the percentage.
    #[serde(default)]
    pub min_per_second: Option<Spanned<u32>>,
}

// ---- AuthorizationPolicy -------------------------------------------------------

/// Who may call a Service, on which paths (see docs/access-policy.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub target_ref: TargetRef,
    /// Only requests to this port of the Service (default: every port).
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    /// `allow` (the default), `deny` or `audit`.
    #[serde(default)]
    pub action: Option<Spanned<String>>,
    /// A request matches the policy when it matches one of the rules.
    #[serde(default)]
    pub rules: Option<Spanned<Vec<AuthzRuleSpec>>>,
}

/// One rule: a request matches when it matches one `from` entry, one `to`
/// entry and every `when` condition (an absent list matches everything).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRuleSpec {
    #[serde(default)]
    pub from: Option<Vec<AuthzFromSpec>>,
    #[serde(default)]
    pub to: Option<Vec<AuthzToSpec>>,
    #[serde(default)]
    pub when: Option<Vec<AuthzWhenSpec>>,
}

/// Callers, by verified identity; the fields of one entry must all match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzFromSpec {
    /// Services: `name` (the policy's namespace) or `name.namespace`.
    #[serde(default)]
    pub services: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub not_services: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub namespaces: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub not_namespaces: Option<Vec<Spanned<String>>>,
    /// SPIFFE IDs, exact or with a trailing `*`.
    #[serde(default)]
    pub identities: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub not_identities: Option<Vec<Spanned<String>>>,
}

/// What is called; the fields of one entry must all match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzToSpec {
    /// `/exact`, `/prefix/*` (the prefix and everything under it), or a
    /// glob where `*` matches within one segment and `**` across segments.
    #[serde(default)]
    pub paths: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub not_paths: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub not_methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub ports: Option<Vec<Spanned<u16>>>,
    #[serde(default)]
    pub not_ports: Option<Vec<Spanned<u16>>>,
}

/// A condition on a request header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzWhenSpec {
    pub header: Spanned<String>,
    /// One of the header's values is one of these.
    #[serde(default)]
    pub values: Option<Vec<Spanned<String>>>,
    /// None of the header's values is one of these.
    #[serde(default)]
    pub not_values: Option<Vec<Spanned<String>>>,
}

// ---- FaultInjection --------------------------------------------------------------

/// Delays and errors injected into a route rule's requests by the caller's
/// sidecar, named by the rule's `ExtensionRef` filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    /// Only requests that carry these headers (every request without it).
    #[serde(default, rename = "match")]
    pub when: Option<FaultMatchSpec>,
    #[serde(default)]
    pub delay: Option<Spanned<FaultDelaySpec>>,
    #[serde(default)]
    pub abort: Option<Spanned<FaultAbortSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultMatchSpec {
    pub headers: Vec<ValueMatchSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelaySpec {
    pub duration: Spanned<String>,
    /// Share of requests delayed, 0-100 (fractions allowed; default 100).
    #[serde(default)]
    pub percent: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbortSpec {
    /// The HTTP status of the injected answer (400-599).
    #[serde(default)]
    pub http_status: Option<Spanned<u16>>,
    /// Or a gRPC status: a code (1-16) or its name (`UNAVAILABLE`).
    #[serde(default)]
    pub grpc_status: Option<Spanned<String>>,
    /// Share of requests aborted, 0-100 (fractions allowed; default 100).
    #[serde(default)]
    pub percent: Option<Spanned<f64>>,
}

// ---- Rollout ---------------------------------------------------------------------

/// Progressive delivery: the control plane moves a Service's traffic from
/// the stable backend to the canary step by step, promoting while the
/// canary's golden signals hold and rolling back when they do not.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The Service whose routes are driven: each rule of its HTTPRoutes
    /// and GRPCRoutes whose backendRefs are the stable and the canary.
    pub service: Spanned<String>,
    pub stable: Spanned<String>,
    pub canary: Spanned<String>,
    /// The canary's share at each step, in percent (to 0.1), rising to 100.
    pub steps: Spanned<Vec<Spanned<f64>>>,
    /// How long each step runs before it is promoted (default 30s).
    #[serde(default)]
    pub hold: Option<Spanned<String>>,
    #[serde(default)]
    pub thresholds: Option<RolloutThresholdsSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutThresholdsSpec {
    /// Least share of the canary's requests that succeed, in percent
    /// (default 99).
    #[serde(default)]
    pub success_rate: Option<Spanned<f64>>,
    /// Most the canary's p99 latency may be (default: no limit).
    #[serde(default)]
    pub p99: Option<Spanned<String>>,
    /// Requests the canary must have answered in a step before it is
    /// judged (default 20).
    #[serde(default)]
    pub min_requests: Option<Spanned<u32>>,
}

// ---- Mesh ----------------------------------------------------------------------

/// Mesh-wide settings (at most one `Mesh` resource).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    #[serde(default)]
    pub authorization: Option<MeshAuthorizationSpec>,
    #[serde(default)]
    pub egress: Option<MeshEgressSpec>,
}

/// What the sidecars do with calls to hosts outside the mesh.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshEgressSpec {
    /// `allow-all` (the default): any outside host may be called;
    /// `registry-only`: only the hosts of ExternalServices.
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshAuthorizationSpec {
    /// For a service no allow policy targets: `allow-authenticated` (the
    /// default) or `deny`.
    #[serde(default)]
    pub default: Option<Spanned<String>>,
}

// ---- ExternalService -----------------------------------------------------------

/// Hosts outside the mesh that its services call: named, so policies can
/// target them and the golden signals show them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    /// DNS names (`api.example.com`), wildcards of one or more labels
    /// (`*.example.com`) or IP addresses.
    pub hosts: Vec<Spanned<String>>,
    pub ports: Vec<ExternalPortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExternalPortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: Spanned<u16>,
    pub protocol: Spanned<ExternalProtocol>,
}

/// What a sidecar sees of the calls to an external port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalProtocol {
    /// Plain HTTP: requests are routed one by one, and timeouts, retries
    /// and path rules apply.
    Http,
    /// TLS the application speaks itself (HTTPS), tunnelled with `CONNECT`.
    Tls,
    /// Any other TCP protocol, tunnelled with `CONNECT`.
    Tcp,
}

// ---- RemoteCluster -----------------------------------------------------------

/// Another cluster whose exported services this one imports: its control
/// planes' API addresses and the credential its export API takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoteClusterSpec {
    /// `host:port` of its control-plane replicas' HTTP API, tried in turn.
    pub api: Vec<Spanned<String>>,
    /// A file holding its export credential (its `<data>/export.token`).
    pub credential_file: Spanned<String>,
}

// ---- The loaded set ----------------------------------------------------------

/// A resource with its identity and where it was defined.
#[derive(Debug)]
pub struct Loaded<S> {
    pub name: String,
    pub namespace: String,
    pub pos: Pos,
    pub name_pos: Pos,
    pub namespace_pos: Pos,
    pub file: Arc<Path>,
    /// Lines before this resource's document: spans inside it count from
    /// the document's start.
    pub line_offset: u64,
    pub spec: S,
}

impl<S> Loaded<S> {
    /// Where a value inside this resource was written.
    pub fn at<T>(&self, s: &Spanned<T>) -> Pos {
        if s.referenced.line() == 0 {
            return self.pos.clone();
        }
        Pos {
            file: self.file.clone(),
            line: s.referenced.line() + self.line_offset,
            column: s.referenced.column(),
        }
    }

    /// `namespace/name`, the key resources are referred to by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// All resources of a config directory, in file order.
#[derive(Debug, Default)]
pub struct ResourceSet {
    pub services: Vec<Loaded<ServiceSpec>>,
    pub http_routes: Vec<Loaded<HttpRouteSpec>>,
    pub grpc_routes: Vec<Loaded<GrpcRouteSpec>>,
    pub traffic_policies: Vec<Loaded<TrafficPolicySpec>>,
    pub authorization_policies: Vec<Loaded<AuthorizationPolicySpec>>,
    pub fault_injections: Vec<Loaded<FaultInjectionSpec>>,
    pub rollouts: Vec<Loaded<RolloutSpec>>,
    pub meshes: Vec<Loaded<MeshSpec>>,
    pub remote_clusters: Vec<Loaded<RemoteClusterSpec>>,
    pub external_services: Vec<Loaded<ExternalServiceSpec>>,
}

impl ResourceSet {
    pub fn external_service(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<&Loaded<ExternalServiceSpec>> {
        self.external_services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Loaded<ServiceSpec>> {
        self.services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
    }
}
