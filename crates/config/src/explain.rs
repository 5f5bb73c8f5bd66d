//! `tandem explain`: what the mesh would do with one request from one
//! service, read off the same compiled snapshots and the same decisions the
//! sidecars run: the destination, the route rule matched (the sidecar's own
//! matching, [`crate::matching`]), backends and weights (with a rollout's
//! split in force), filters, mirrors and faults, timeouts, retries, the
//! destination's rate limit and circuit breaker, and the access policy's
//! verdict with the rule that decided it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::authz::{normalize_path, AuthzRequest, Caller, Verdict};
use crate::compile::{compile_with, resolve_name, Target};
use crate::matching::{select, RequestHead};
use crate::model::DEFAULT_NAMESPACE;
use crate::rollout::Splits;
use crate::snapshot::{
    Destination, Filters, HeaderModifier, PathModifier, Policy, RetryOn, Snapshot,
};
use crate::ResourceSet;

/// The request to explain.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// The calling service, `name` or `name.namespace`.
    pub source: String,
    pub method: String,
    /// `host[:port]`, as the app would address it (`catalog:8080`).
    pub authority: String,
    /// The path, with its query if any.
    pub path: String,
    /// `(name, value)`; names in any case.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// What the mesh would do with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// `namespace/name` of the caller.
    pub source: String,
    /// `namespace/name` of the service addressed, when the mesh has one.
    pub destination: Option<String>,
    pub port: Option<u16>,
    /// The answer the caller's sidecar makes itself, if it makes one
    /// (`404 no-route`, `302 to https://...`); `None` when the request is
    /// forwarded.
    pub answer: Option<String>,
    /// The rule that matched: `HTTPRoute default/catalog rule 0 (headers
    /// x-canary=1)`; `None` without routes or without a match.
    pub rule: Option<String>,
    /// Where requests go, and in what shares.
    pub backends: Vec<BackendShare>,
    /// A rollout's split in force on the rule, instead of its weights.
    pub rollout: Option<String>,
    /// Edits the rule makes to the request and to the answer.
    pub request_changes: Vec<String>,
    pub response_changes: Vec<String>,
    /// Shadow copies: backend and share in percent.
    pub mirrors: Vec<(String, f64)>,
    /// The FaultInjection on the rule, and whether this request carries
    /// the headers it needs.
    pub fault: Option<String>,
    /// `namespace/name` of the TrafficPolicy (and rule overrides) in force.
    pub policy: Option<String>,
    pub timeout_ms: Option<u64>,
    pub per_try_timeout_ms: Option<u64>,
    /// `2 retries on 5xx, connect-failure; backoff 25-250 ms; budget 20 %`.
    pub retries: Option<String>,
    pub load_balancer: Option<String>,
    pub circuit_breaker: Option<String>,
}

/// One backend of the rule, with what its own sidecar decides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendShare {
    /// `namespace/name`.
    pub service: String,
    pub weight: u32,
    /// Share of the rule's requests, in percent.
    pub percent: f64,
    /// Headers edited for this backend only.
    pub changes: Vec<String>,
    /// Its inbound rate limit.
    pub rate_limit: Option<String>,
    /// `allow` or `deny`, and why.
    pub verdict: String,
    pub decided_by: String,
    /// Audit policies that would deny it.
    pub audit: Vec<String>,
}

struct Head<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a [(String, String)],
    port: Option<u16>,
}

impl RequestHead for Head<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn query(&self) -> Option<&str> {
        self.query
    }
    fn has_header(&self, name: &str, value: &str) -> bool {
        self.headers.iter().any(|(n, v)| n == name && v == value)
    }
    fn port(&self) -> Option<u16> {
        self.port
    }
}

/// Explains `req` against the config `set` with the rollouts' `splits` in
/// force. An `Err` is a request that cannot be explained (no such source).
pub fn explain(
    set: &ResourceSet,
    splits: &Splits,
    trust_domain: &str,
    req: &ExplainRequest,
) -> Result<Explanation, String> {
    let (src_ns, src) = resolve_name(&req.source, DEFAULT_NAMESPACE);
    if set.service(src_ns, src).is_none() {
        return Err(format!("no Service `{}` in the config", req.source));
    }
    let mut out = Explanation {
        source: format!("{src_ns}/{src}"),
        ..Explanation::default()
    };
    let (host, port) = split_authority(&req.authority)?;
    out.port = port;
    // As the sidecar reads the authority: `name` or `name.namespace`.
    let host = host.to_ascii_lowercase();
    let key = match host.match_indices('.').nth(1) {
        Some((i, _)) => &host[..i],
        None => &host,
    };
    let interest = BTreeSet::from([key.to_string()]);
    let none = |_: &str, _: &str| Vec::new();
    let compile = |ns: &str, svc: &str, interest: &BTreeSet<String>| -> Snapshot {
        compile_with(
            set,
            &Target {
                namespace: ns,
                service: svc,
                interest,
            },
            &none,
            splits,
        )
    };
    let snapshot = compile(src_ns, src, &interest);
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path.as_str(), None),
    };
    let caller_id = format!("spiffe://{trust_domain}/ns/{src_ns}/svc/{src}");
    let caller = Caller {
        id: &caller_id,
        namespace: src_ns,
        service: src,
    };
    let (dst_ns, dst_name) = resolve_name(key, src_ns);
    let Some(dest) = snapshot
        .destinations
        .iter()
        .find(|d| d.name == dst_name && d.namespace == dst_ns)
    else {
        let head = Head {
            method: &req.method,
            path,
            query,
            headers: &headers,
            port,
        };
        if let Some(answer) = egress(&snapshot.egress, &host, &head, caller, &mut out) {
            out.answer = answer;
            return Ok(out);
        }
        out.answer = Some(format!(
            "404 unknown-service: no service `{key}` in the mesh"
        ));
        return Ok(out);
    };
    out.destination = Some(format!("{}/{}", dest.namespace, dest.name));
    let port = port.or(dest.ports.first().copied());
    out.port = port;
    let head = Head {
        method: &req.method,
        path,
        query,
        headers: &headers,
        port,
    };
    // Which rule, which backends.
    let rule = if dest.routes.is_empty() {
        None
    } else {
        match select(&dest.routes, &head) {
            Some(i) => Some(i),
            None => {
                out.answer = Some(format!(
                    "404 no-route: no rule of `{}` matches {} {path}",
                    dest.name, req.method
                ));
                return Ok(out);
            }
        }
    };
    let route = rule.and_then(|i| dest.routes.get(i));
    let weighted: Vec<(usize, u32, Option<&Filters>)> = match route {
        Some(r) => r
            .backends
            .iter()
            .map(|b| (b.backend, b.weight, b.filters.as_deref()))
            .collect(),
        None => vec![(0, 1, None)],
    };
    if let Some(r) = route {
        let kind = if r.matcher.grpc_method.is_some() {
            "GRPCRoute"
        } else {
            "HTTPRoute"
        };
        out.rule = Some(format!(
            "{kind} {} rule {} ({})",
            r.route,
            r.rule,
            describe_match(&r.matcher)
        ));
        // A rollout drives the rules of its service whose backends are
        // exactly its stable and canary.
        let names: BTreeSet<&str> = r
            .backends
            .iter()
            .filter_map(|b| dest.backends.get(b.backend))
            .map(|b| b.name.as_str())
            .collect();
        out.rollout = splits
            .get(&format!("{}/{}", dest.namespace, dest.name))
            .filter(|s| names == BTreeSet::from([s.stable.as_str(), s.canary.as_str()]))
            .map(|s| {
                format!(
                    "{} -> {}: {:.1}% to the canary",
                    s.stable,
                    s.canary,
                    f64::from(s.canary_permille) / 10.0
                )
            });
    }
    let filters = route.and_then(|r| r.filters.as_deref());
    if let Some(f) = filters {
        if let Some(rd) = &f.redirect {
            let to = rd.location(&host, port, port.unwrap_or(80), path, query);
            out.answer = Some(format!("{} redirect to {to}", rd.status));
            return Ok(out);
        }
        describe_headers(f.request_headers.as_ref(), &mut out.request_changes);
        describe_headers(f.response_headers.as_ref(), &mut out.response_changes);
        if let Some(rw) = &f.rewrite {
            if let Some(h) = &rw.hostname {
                out.request_changes.push(format!("host becomes {h}"));
            }
            match &rw.path {
                Some(PathModifier::Full(p)) => {
                    out.request_changes.push(format!("path becomes {p}"))
                }
                Some(PathModifier::Prefix { prefix, with }) => out
                    .request_changes
                    .push(format!("path prefix {prefix} becomes {with}")),
                None => {}
            }
        }
        for m in &f.mirrors {
            let name = backend_name(dest, m.backend);
            let share = f64::from(m.numerator) * 100.0 / f64::from(m.denominator.max(1));
            out.mirrors.push((name, share));
        }
        if let Some(fault) = &f.fault {
            let applies = fault
                .headers
                .iter()
                .all(|h| head.has_header(&h.name, &h.value));
            let mut parts = Vec::new();
            if let Some(d) = &fault.delay {
                parts.push(format!("delay {} ms to {}% of requests", d.ms, d.percent));
            }
            if let Some(a) = &fault.abort {
                let what = match (a.http_status, a.grpc_status) {
                    (_, Some(g)) => format!("grpc-status {g}"),
                    (Some(s), None) => format!("{s}"),
                    (None, None) => "an error".to_string(),
                };
                parts.push(format!("abort with {what} for {}% of requests", a.percent));
            }
            out.fault = Some(format!(
                "FaultInjection {}: {}{}",
                fault.source,
                parts.join(", "),
                if applies {
                    ""
                } else {
                    " (not this request: it lacks the headers the fault matches)"
                }
            ));
        }
    }
    // The policy in force for the rule: the destination's TrafficPolicy
    // with the rule's own timeouts and retry over it.
    let policy: Option<Policy> = match route.and_then(|r| r.policy.as_ref()) {
        Some(o) => Some(Policy::with_overrides(dest.policy.as_ref(), o)),
        None => dest.policy.clone(),
    };
    if let Some(p) = &policy {
        let mut source = p.source.clone();
        if let Some(r) = route.filter(|r| r.policy.is_some()) {
            if !source.is_empty() {
                source.push_str(", ");
            }
            source.push_str(&format!("overridden by {} rule {}", r.route, r.rule));
        }
        out.policy = (!source.is_empty()).then_some(source);
        out.timeout_ms = p.timeout_ms;
        out.per_try_timeout_ms = p.retry.as_ref().and_then(|r| r.per_try_timeout_ms);
        out.retries = p.retry.as_ref().filter(|r| r.attempts > 0).map(|r| {
            let on: Vec<String> = r.on.iter().map(retry_on).collect();
            format!(
                "{} retr{} on {}; backoff {}-{} ms; budget {}% of requests (at least {}/s)",
                r.attempts,
                if r.attempts == 1 { "y" } else { "ies" },
                on.join(", "),
                r.backoff_base_ms,
                r.backoff_max_ms,
                r.budget_percent,
                r.budget_min_per_second
            )
        });
        out.load_balancer = Some(match &p.load_balancer {
            crate::snapshot::LoadBalancer::PeakEwma => "peak-ewma".to_string(),
            crate::snapshot::LoadBalancer::RoundRobin => "round-robin".to_string(),
            crate::snapshot::LoadBalancer::LeastRequest => "least-request".to_string(),
            crate::snapshot::LoadBalancer::RingHash { header } => format!("ring-hash on {header}"),
        });
        out.circuit_breaker = p.circuit_breaker.as_ref().map(|cb| {
            let mut parts = Vec::new();
            if cb.consecutive_errors > 0 || cb.consecutive_gateway_errors > 0 {
                parts.push(format!(
                    "eject an endpoint after {} errors or {} gateway errors in a row, for {} ms and up, at most {}%",
                    cb.consecutive_errors,
                    cb.consecutive_gateway_errors,
                    cb.base_ejection_ms,
                    cb.max_ejection_percent
                ));
            }
            if let Some(m) = cb.max_requests {
                parts.push(format!("at most {m} requests in progress"));
            }
            if let Some(m) = cb.max_connections {
                parts.push(format!(
                    "at most {m} connections per endpoint, {} waiting",
                    cb.max_pending_requests.unwrap_or(0)
                ));
            }
            parts.join("; ")
        });
    } else {
        out.load_balancer = Some("peak-ewma".to_string());
    }
    // Each backend: its share, and what its own sidecar decides.
    let total: u64 = weighted.iter().map(|(_, w, _)| u64::from(*w)).sum();
    let normalized = normalize_path(path);
    for (b, weight, bf) in weighted {
        let Some(backend) = dest.backends.get(b) else {
            continue;
        };
        let mut share = BackendShare {
            service: format!("{}/{}", backend.namespace, backend.name),
            weight,
            percent: if total > 0 {
                (f64::from(weight) * 100.0 / total as f64 * 1000.0).round() / 1000.0
            } else {
                0.0
            },
            ..BackendShare::default()
        };
        describe_headers(
            bf.and_then(|f| f.request_headers.as_ref()),
            &mut share.changes,
        );
        let there = compile(&backend.namespace, &backend.name, &BTreeSet::new());
        let Some(inbound) = there.inbound else {
            share.verdict = "deny".into();
            share.decided_by = "503 not-configured: the service has no port".into();
            out.backends.push(share);
            continue;
        };
        share.rate_limit = inbound.rate_limit.as_ref().map(|rl| {
            format!(
                "{} requests/s, burst {}{}",
                rl.requests_per_second,
                rl.burst,
                if rl.per_caller { ", per caller" } else { "" }
            )
        });
        let path = match &normalized {
            Ok(p) => p,
            Err(e) => {
                share.verdict = "deny".into();
                share.decided_by = format!("400 bad-request: the path has {}", e.describe());
                out.backends.push(share);
                continue;
            }
        };
        let d = decide(&inbound.authz, caller, inbound.port, &head, path);
        share.verdict = match d.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
        .into();
        share.decided_by = d.by.describe(inbound.authz.permissive);
        share.audit = d
            .audited
            .iter()
            .map(|(p, i)| format!("{}, rule {i}: {}", p.name, p.rules[*i]))
            .collect();
        out.backends.push(share);
    }
    Ok(out)
}

fn split_authority(a: &str) -> Result<(&str, Option<u16>), String> {
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    let a = a.split('/').next().unwrap_or(a);
    if a.is_empty() {
        return Err("the request names no host".into());
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => p
            .parse()
            .map(|p| (h, Some(p)))
            .map_err(|_| format!("`{p}` is not a port")),
        _ => Ok((a, None)),
    }
}

fn backend_name(dest: &Destination, i: usize) -> String {
    dest.backends
        .get(i)
        .map_or_else(|| "?".into(), |b| format!("{}/{}", b.namespace, b.name))
}

fn describe_match(m: &crate::snapshot::Matcher) -> String {
    let mut parts = Vec::new();
    if let Some(method) = &m.grpc_method {
        parts.push(format!("gRPC method {method}"));
    }
    if let Some(p) = &m.path {
        if m.grpc_method.is_none() {
            let kind = match p.kind {
                crate::model::PathMatchType::Exact => "path",
                crate::model::PathMatchType::PathPrefix => "path prefix",
            };
            parts.push(format!("{kind} {}", p.value));
        } else {
            parts.push(format!("path {}", p.value));
        }
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    for h in &m.headers {
        parts.push(format!("header {}={}", h.name, h.value));
    }
    for q in &m.query {
        parts.push(format!("query {}={}", q.name, q.value));
    }
    if parts.is_empty() {
        "every request".into()
    } else {
        parts.join(", ")
    }
}

fn describe_headers(m: Option<&HeaderModifier>, out: &mut Vec<String>) {
    let Some(m) = m else { return };
    for r in &m.remove {
        out.push(format!("remove header {r}"));
    }
    for s in &m.set {
        out.push(format!("set header {}: {}", s.name, s.value));
    }
    for a in &m.add {
        out.push(format!("add header {}: {}", a.name, a.value));
    }
}

fn retry_on(r: &RetryOn) -> String {
    match r {
        RetryOn::Server5xx => "5xx".into(),
        RetryOn::GatewayError => "gateway-error".into(),
        RetryOn::ConnectFailure => "connect-failure".into(),
        RetryOn::Reset => "reset".into(),
        RetryOn::Status(s) => s.to_string(),
        RetryOn::Grpc(c) => format!("grpc {c}"),
    }
}

/// A host outside the mesh, as the caller's sidecar sees it (see
/// `tandem-proxy`'s `outbound/egress.rs`): `Some(answer)` when the host
/// is one (`None` inside: forwarded), `None` when it is a mesh name.
fn egress(
    e: &crate::snapshot::Egress,
    host: &str,
    head: &Head<'_>,
    caller: Caller<'_>,
    out: &mut Explanation,
) -> Option<Option<String>> {
    let listed = e.services.iter().find(|s| {
        s.hosts.iter().any(|h| match h.strip_prefix('*') {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            None => h == host,
        })
    });
    let outside = host.parse::<std::net::IpAddr>().is_ok() || host.contains('.');
    if listed.is_none() && !outside {
        return None;
    }
    let port = head.port.unwrap_or(80);
    out.port = Some(port);
    let Some(s) = listed else {
        out.destination = Some(crate::snapshot::UNLISTED_EGRESS.to_string());
        return Some(match e.mode {
            crate::snapshot::EgressMode::AllowAll => None,
            crate::snapshot::EgressMode::RegistryOnly => Some(format!(
                "403 egress-denied: `{host}` is outside the mesh and no ExternalService lists it (egress mode registry-only)"
            )),
        });
    };
    out.destination = Some(format!("{}/{}", s.namespace, s.name));
    if !s.ports.iter().any(|p| p.port == port) {
        return Some(Some(format!(
            "403 egress-denied: ExternalService `{}` does not list port {port}",
            s.name
        )));
    }
    if let Some(p) = &s.policy {
        out.policy = Some(p.source.clone());
        out.timeout_ms = p.timeout_ms;
    }
    if s.authz.is_open() {
        return Some(None);
    }
    // Its access policy, as the caller's sidecar checks it.
    let path = match normalize_path(head.path) {
        Ok(p) => p,
        Err(e) => {
            return Some(Some(format!(
                "400 bad-request: the path has {}",
                e.describe()
            )))
        }
    };
    let d = decide(&s.authz, caller, port, head, &path);
    Some((d.verdict == Verdict::Deny).then(|| {
        format!(
            "403 egress-denied: the access policy of ExternalService `{}` does not let {} call it ({})",
            s.name,
            caller.id,
            d.by.describe(false)
        )
    }))
}

/// What access policy `authz` decides for the request `head` (its path
/// normalized: `path`) from `caller` on `port`.
fn decide<'p>(
    authz: &'p crate::authz::Authz,
    caller: Caller<'_>,
    port: u16,
    head: &Head<'_>,
    path: &str,
) -> crate::authz::Decision<'p> {
    let header = |n: &str| -> Vec<&str> {
        head.headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    authz.decide(&AuthzRequest {
        caller: Some(caller),
        port,
        method: head.method,
        path,
        query: head.query.unwrap_or(""),
        header: &header,
    })
}
