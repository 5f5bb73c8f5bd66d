//! TrafficPolicy: checked once (diagnostics with positions) and compiled
//! into the snapshot's [`Policy`] for the destination it targets.

use crate::diag::Diagnostic;
use crate::model::{Loaded, Protocol, ResourceSet, TrafficPolicySpec};
use crate::snapshot::{CircuitBreaker, LoadBalancer, Policy, RateLimit, RetryOn, RetryPolicy};
use serde_saphyr::Spanned;

pub const DEFAULT_BACKOFF_BASE_MS: u64 = 25;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 250;
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_MAX_PENDING_REQUESTS: u32 = 1024;
/// Most retries one policy may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
const MAX_DURATION_MS: u64 = 3_600_000;

/// A policy duration ([`crate::duration`]'s grammar) in milliseconds,
/// between 1 ms and 1 h.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    crate::duration::parse_within(
        s,
        std::time::Duration::from_millis(1),
        std::time::Duration::from_millis(MAX_DURATION_MS),
    )
    .map(|d| d.as_millis() as u64)
}

fn duration(
    p: &Loaded<TrafficPolicySpec>,
    v: &Option<Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<u64> {
    let v = v.as_ref()?;
    match parse_duration_ms(&v.value) {
        Ok(ms) => Some(ms),
        Err(e) => {
            diags.push(Diagnostic::at(&p.at(v), e));
            None
        }
    }
}

fn gprc_code(name: &str) -> Option<u32> {
    Some(match name {
        "cancelled" => 1,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

fn retry_on(s: &str) -> Option<RetryOn> {
    Some(match s {
        "5xx" => RetryOn::Server5xx,
        "gateway-error" => RetryOn::GatewayError,
        "connect-failure" => RetryOn::ConnectFailure,
        "reset" => RetryOn::Reset,
        "retriable-4xx" => RetryOn::Status(409),
        other => match other.parse::<u16>() {
            Ok(code) if (400..=599).contains(&code) => RetryOn::Status(code),
            Ok(_) => return None,
            Err(_) => RetryOn::Grpc(gprc_code(other)?),
        },
    })
}

/// Checks one TrafficPolicy and compiles it. Problems go to `diags`; the
/// result is only meaningful when none were added.
pub fn compile_policy(
    set: &ResourceSet,
    p: &Loaded<TrafficPolicySpec>,
    diags: &mut Vec<Diagnostic>,
) -> Policy {
    let t = &p.spec.target_ref;
    check_target_kind(p, t, "a TrafficPolicy", diags);
    let (ns, _) = t.resolve(&p.namespace);
    if t.kind.value == "ExternalService" {
        external_target(set, p, ns, diags);
    } else {
        match set.service(ns, &t.name.value) {
            None => diags.push(Diagnostic::at(
                &p.at(&t.name),
                format!(
                    "targetRef names Service `{ns}/{}`, which does not exist",
                    t.name.value
                ),
            )),
            Some(svc) => {
                if svc.spec.ports.first().map(|p| p.protocol.value) == Some(Protocol::Tcp) {
                    diags.push(Diagnostic::at(
                    &p.at(&t.name),
                    format!(
                        "Service `{ns}/{}` is tcp: timeouts and retries apply to HTTP and gRPC services",
                        t.name.value
                    ),
                ));
                }
            }
        }
    }
    let timeout_ms = duration(p, &p.spec.timeout, diags);
    let retry = p.spec.retry.as_ref().map(|r| {
        if r.attempts.value > MAX_ATTEMPTS {
            diags.push(Diagnostic::at(
                &p.at(&r.attempts),
                format!("attempts must be at most {MAX_ATTEMPTS}"),
            ));
        }
        let mut on = Vec::new();
        match &r.on {
            None => on.extend([RetryOn::Server5xx, RetryOn::ConnectFailure, RetryOn::Reset]),
            Some(list) => {
                for c in list {
                    match retry_on(&c.value) {
                        Some(x) => on.push(x),
                        None => diags.push(Diagnostic::at(
                            &p.at(c),
                            format!(
                                "unknown retry condition `{}`; use 5xx, gateway-error, connect-failure, reset, retriable-4xx, a status code (400-599) or a gRPC status (cancelled, deadline-exceeded, resource-exhausted, internal, unavailable)",
                                c.value
                            ),
                        )),
                    }
                }
            }
        }
        let per_try_timeout_ms = duration(p, &r.per_try_timeout, diags);
        if let (Some(per_try), Some(total), Some(pt)) =
            (per_try_timeout_ms, timeout_ms, r.per_try_timeout.as_ref())
        {
            if per_try > total {
                diags.push(Diagnostic::at(
                    &p.at(pt),
                    "perTryTimeout is longer than timeout (the whole request, retries included)",
                ));
            }
        }
        let (mut base, mut max) = (DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_MAX_MS);
        if let Some(b) = &r.backoff {
            base = duration(p, &b.base, diags).unwrap_or(base);
            max = duration(p, &b.max, diags).unwrap_or(max.max(base));
            if base > max {
                if let Some(m) = &b.max {
                    diags.push(Diagnostic::at(&p.at(m), "backoff max is below base"));
                }
            }
        }
        let (mut percent, mut min_per_second) =
            (DEFAULT_BUDGET_PERCENT, DEFAULT_BUDGET_MIN_PER_SECOND);
        if let Some(b) = &r.budget {
            if let Some(pc) = &b.percent {
                if pc.value > 100 {
                    diags.push(Diagnostic::at(&p.at(pc), "budget percent must be 0-100"));
                }
                percent = pc.value;
            }
            if let Some(m) = &b.min_per_second {
                min_per_second = m.value;
            }
        }
        RetryPolicy {
            attempts: r.attempts.value,
            on,
            per_try_timeout_ms,
            backoff_base_ms: base,
            backoff_max_ms: max,
            budget_percent: percent,
            budget_min_per_second: min_per_second,
        }
    });
    let load_balancer = match &p.spec.load_balancer {
        None => LoadBalancer::PeakEwma,
        Some(lb) => {
            let header = lb.hash_header.as_ref();
            let kind = match lb.kind.value.as_str() {
                "peak-ewma" => Some(LoadBalancer::PeakEwma),
                "round-robin" => Some(LoadBalancer::RoundRobin),
                "least-request" => Some(LoadBalancer::LeastRequest),
                "ring-hash" => match header {
                    Some(h) if http_header_name(&h.value) => Some(LoadBalancer::RingHash {
                        header: h.value.to_ascii_lowercase(),
                    }),
                    Some(h) => {
                        diags.push(Diagnostic::at(
                            &p.at(h),
                            format!("`{}` is not a valid header name", h.value),
                        ));
                        None
                    }
                    None => {
                        diags.push(Diagnostic::at(
                            &p.at(&lb.kind),
                            "ring-hash needs `hashHeader`: the request header whose value picks the endpoint",
                        ));
                        None
                    }
                },
                other => {
                    diags.push(Diagnostic::at(
                        &p.at(&lb.kind),
                        format!("unknown load balancer `{other}`; use peak-ewma, round-robin, least-request or ring-hash"),
                    ));
                    None
                }
            };
            if let (Some(h), Some(k)) = (header, &kind) {
                if !matches!(k, LoadBalancer::RingHash { .. }) {
                    diags.push(Diagnostic::at(
                        &p.at(h),
                        "hashHeader applies to ring-hash only",
                    ));
                }
            }
            kind.unwrap_or_default()
        }
    };
    if let Some(rl) = &p.spec.rate_limit {
        rate_limit(p, rl, diags);
    }
    let circuit_breaker = p.spec.circuit_breaker.as_ref().map(|cb| {
        if let Some(m) = &cb.max_ejection_percent {
            if m.value > 100 {
                diags.push(Diagnostic::at(&p.at(m), "maxEjectionPercent must be 0-100"));
            }
        }
        // Outlier detection is on when any of its fields is given; a block
        // with only limits ejects nothing.
        let outliers = cb.consecutive_errors.is_some()
            || cb.consecutive_gateway_errors.is_some()
            || cb.interval.is_some()
            || cb.base_ejection_time.is_some()
            || cb.max_ejection_percent.is_some();
        let at_least_one = |v: &Option<Spanned<u32>>, name: &str, diags: &mut Vec<Diagnostic>| {
            v.as_ref().map(|m| {
                if m.value == 0 {
                    diags.push(Diagnostic::at(&p.at(m), format!("{name} must be at least 1")));
                }
                m.value.max(1)
            })
        };
        let max_connections = at_least_one(&cb.max_connections, "maxConnections", diags);
        if let (Some(m), None) = (&cb.max_pending_requests, &cb.max_connections) {
            diags.push(Diagnostic::at(
                &p.at(m),
                "maxPendingRequests counts requests waiting at maxConnections; set maxConnections too",
            ));
        }
        CircuitBreaker {
            consecutive_errors: match &cb.consecutive_errors {
                Some(v) => v.value,
                None if outliers => 5,
                None => 0,
            },
            consecutive_gateway_errors: cb
                .consecutive_gateway_errors
                .as_ref()
                .map(|v| v.value)
                .unwrap_or(0),
            interval_ms: duration(p, &cb.interval, diags).unwrap_or(10_000),
            base_ejection_ms: duration(p, &cb.base_ejection_time, diags).unwrap_or(30_000),
            max_ejection_percent: cb
                .max_ejection_percent
                .as_ref()
                .map(|v| v.value.min(100))
                .unwrap_or(50),
            max_requests: at_least_one(&cb.max_requests, "maxRequests", diags),
            max_pending_requests: max_connections.map(|_| {
                cb.max_pending_requests
                    .as_ref()
                    .map(|m| m.value)
                    .unwrap_or(DEFAULT_MAX_PENDING_REQUESTS)
            }),
            max_connections,
        }
    });
    Policy {
        source: p.key(),
        timeout_ms,
        retry,
        load_balancer,
        circuit_breaker,
    }
}

/// The timeouts and retry of one HTTPRoute rule, checked.
pub fn route_overrides(
    r: &Loaded<crate::model::HttpRouteSpec>,
    rule: &crate::model::RouteRuleSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::snapshot::RouteOverrides> {
    if rule.timeouts.is_none() && rule.retry.is_none() {
        return None;
    }
    let dur = |v: &Option<Spanned<String>>, diags: &mut Vec<Diagnostic>| {
        let v = v.as_ref()?;
        match parse_duration_ms(&v.value) {
            Ok(ms) => Some(ms),
            Err(e) => {
                diags.push(Diagnostic::at(&r.at(v), e));
                None
            }
        }
    };
    let mut o = crate::snapshot::RouteOverrides::default();
    if let Some(t) = &rule.timeouts {
        o.timeout_ms = dur(&t.request, diags);
        o.per_try_timeout_ms = dur(&t.backend_request, diags);
        if let (Some(req), Some(back), Some(b)) =
            (o.timeout_ms, o.per_try_timeout_ms, &t.backend_request)
        {
            if back > req {
                diags.push(Diagnostic::at(
                    &r.at(b),
                    "backendRequest is longer than request",
                ));
            }
        }
    }
    if let Some(rt) = &rule.retry {
        if let Some(a) = &rt.attempts {
            if a.value > MAX_ATTEMPTS {
                diags.push(Diagnostic::at(
                    &r.at(a),
                    format!("attempts must be at most {MAX_ATTEMPTS}"),
                ));
            }
            o.attempts = Some(a.value.min(MAX_ATTEMPTS));
        }
        if let Some(codes) = &rt.codes {
            for c in codes {
                if !(400..=599).contains(&c.value) {
                    diags.push(Diagnostic::at(&r.at(c), "retry codes must be 400-599"));
                }
            }
            o.codes = Some(codes.iter().map(|c| c.value).collect());
        }
        o.backoff_ms = dur(&rt.backoff, diags);
    }
    Some(o)
}

/// A TrafficPolicy on an ExternalService: it must exist and take plain
/// HTTP; what needs the destination's own sidecar or several endpoints
/// does not apply.
fn external_target(
    set: &ResourceSet,
    p: &Loaded<TrafficPolicySpec>,
    ns: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let t = &p.spec.target_ref;
    let Some(e) = set.external_service(ns, &t.name.value) else {
        diags.push(Diagnostic::at(
            &p.at(&t.name),
            format!(
                "targetRef names ExternalService `{ns}/{}`, which does not exist",
                t.name.value
            ),
        ));
        return;
    };
    let http = e
        .spec
        .ports
        .iter()
        .any(|port| port.protocol.value == crate::model::ExternalProtocol::Http);
    if !http && (p.spec.timeout.is_some() || p.spec.retry.is_some()) {
        diags.push(Diagnostic::at(
            &p.at(&t.name),
            format!(
                "ExternalService `{ns}/{}` has no http port: timeouts and retries apply to plain HTTP calls (tunnels are opaque)",
                t.name.value
            ),
        ));
    }
    if let Some(rl) = &p.spec.rate_limit {
        diags.push(Diagnostic::at(
            &p.at(&rl.requests_per_second),
            "rateLimit is enforced by a service's own sidecars; an ExternalService has none",
        ));
    }
    if let Some(lb) = &p.spec.load_balancer {
        diags.push(Diagnostic::at(
            &p.at(&lb.kind),
            "loadBalancer does not apply to an ExternalService: each call goes to the host it names",
        ));
    }
}

/// A policy's `targetRef` names a Service: its kind is `Service` and its
/// group `tandem.dev` or none. `what` names the policy (`a TrafficPolicy`).
pub(crate) fn check_target_kind<S>(
    p: &Loaded<S>,
    t: &crate::model::TargetRef,
    what: &str,
    diags: &mut Vec<Diagnostic>,
) {
    let kind = t.kind.value.as_str();
    if kind != "Service" && kind != "ExternalService" {
        diags.push(Diagnostic::at(
            &p.at(&t.kind),
            format!(
                "targetRef kind `{}` is not supported; {what} targets a Service or an ExternalService",
                t.kind.value
            ),
        ));
    }
    if let Some(sn) = &t.section_name {
        diags.push(Diagnostic::at(
            &p.at(sn),
            format!("sectionName is not supported on a {kind} target; {what} applies to the whole {kind}"),
        ));
    }
    check_target_group(p, t, "tandem.dev", kind, diags);
}

/// A targetRef's group must be its kind's (`group`), or left out.
pub(crate) fn check_target_group<S>(
    p: &Loaded<S>,
    t: &crate::model::TargetRef,
    group: &str,
    kind: &str,
    diags: &mut Vec<Diagnostic>,
) {
    if let Some(g) = t
        .group
        .as_ref()
        .filter(|g| !(g.value.is_empty() || g.value == group))
    {
        diags.push(Diagnostic::at(
            &p.at(g),
            format!(
                "targetRef group `{}` is not {kind}'s; use `{group}` or leave it out",
                g.value
            ),
        ));
    }
}

/// The rate limit of a TrafficPolicy, checked.
pub fn rate_limit(
    p: &Loaded<TrafficPolicySpec>,
    rl: &crate::model::RateLimitSpec,
    diags: &mut Vec<Diagnostic>,
) -> RateLimit {
    let rps = rl.requests_per_second.value;
    if !(0.001..=1e6).contains(&rps) {
        diags.push(Diagnostic::at(
            &p.at(&rl.requests_per_second),
            "requestsPerSecond must be between 0.001 and 1000000",
        ));
    }
    let burst = match &rl.burst {
        Some(b) if b.value == 0 => {
            diags.push(Diagnostic::at(&p.at(b), "burst must be at least 1"));
            1
        }
        Some(b) => b.value,
        None => rps.ceil().max(1.0) as u32,
    };
    let per_caller = match &rl.per {
        None => false,
        Some(s) if s.value == "service" => false,
        Some(s) if s.value == "caller" => true,
        Some(s) => {
            diags.push(Diagnostic::at(
                &p.at(s),
                format!("per must be `service` or `caller`, not `{}`", s.value),
            ));
            false
        }
    };
    RateLimit {
        requests_per_second: rps,
        burst,
        per_caller,
    }
}

pub(crate) fn http_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units_and_sane_ranges() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("5s"), Ok(5000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert!(parse_duration_ms("5").is_err());
        assert!(parse_duration_ms("0s").is_err());
        assert!(parse_duration_ms("2d").is_err());
        assert!(parse_duration_ms("fast").is_err());
    }

    #[test]
    fn retry_conditions() {
        assert_eq!(retry_on("5xx"), Some(RetryOn::Server5xx));
        assert_eq!(retry_on("503"), Some(RetryOn::Status(503)));
        assert_eq!(retry_on("unavailable"), Some(RetryOn::Grpc(14)));
        assert_eq!(retry_on("200"), None);
        assert_eq!(retry_on("sometimes"), None);
    }
}
