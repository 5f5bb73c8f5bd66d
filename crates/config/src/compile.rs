//! Compiling a validated [`ResourceSet`] plus the live endpoints into the
//! snapshot for one proxy.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::model::{HttpRouteSpec, Loaded, PathMatchType, ResourceSet, ServiceSpec};
use crate::snapshot::{
    Backend, Destination, Endpoint, Inbound, Matcher, NameValue, PathMatch, Route, Snapshot,
    WeightedBackend,
};

/// What the control plane knows of the proxy a snapshot is for.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    /// Destination names the proxy needs: `name` (in its own namespace) or
    /// `name.namespace`.
    pub interest: &'a BTreeSet<String>,
}

/// Splits `name` / `name.namespace` (also `name.namespace.svc...`).
pub fn resolve_name<'a>(name: &'a str, default_ns: &'a str) -> (&'a str, &'a str) {
    let mut parts = name.split('.');
    let svc = parts.next().unwrap_or(name);
    let ns = parts.next().unwrap_or(default_ns);
    (ns, svc)
}

/// Builds the snapshot. `endpoints(ns, name)` returns the registered meshed
/// instances of a service.
pub fn compile(
    set: &ResourceSet,
    target: &Target<'_>,
    endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>,
) -> Snapshot {
    let service = set.service(target.namespace, target.service);
    let mtls = service
        .and_then(|s| s.spec.mtls.as_ref())
        .map(|m| m.value)
        .unwrap_or_default();
    let rate_limit = set
        .traffic_policies
        .iter()
        .find(|tp| tp.spec.target_ref.resolve(&tp.namespace) == (target.namespace, target.service))
        .and_then(|tp| {
            tp.spec
                .rate_limit
                .as_ref()
                .map(|rl| crate::policy::rate_limit(tp, rl, &mut Vec::new()))
        });
    let inbound = service.and_then(|s| s.spec.ports.first()).map(|p| Inbound {
        protocol: p.protocol.value,
        port: p.port.value,
        mtls,
        rate_limit,
        authz: crate::authz::compile(set, target.namespace, target.service),
    });
    let mut destinations = Vec::new();
    let mut unknown = Vec::new();
    let mut done = BTreeSet::new();
    for name in target.interest {
        let (ns, svc) = resolve_name(name, target.namespace);
        match set.service(ns, svc) {
            Some(s) => {
                if done.insert(s.key()) {
                    destinations.push(destination(set, s, endpoints));
                }
            }
            None => unknown.push(name.clone()),
        }
    }
    Snapshot {
        namespace: target.namespace.to_string(),
        service: target.service.to_string(),
        inbound,
        destinations,
        unknown,
        trust: None,
    }
}

fn backend(s: &Loaded<ServiceSpec>, endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>) -> Backend {
    let mut eps = endpoints(&s.namespace, &s.name);
    eps.extend(s.spec.endpoints.iter().map(|e| Endpoint {
        address: e.address.value.clone(),
        instance: String::new(),
        meshed: false,
    }));
    eps.sort();
    eps.dedup();
    Backend {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        endpoints: eps,
    }
}

/// The index of `s` among `backends`, added if it is not there yet.
fn backend_index(
    backends: &mut Vec<Backend>,
    s: &Loaded<ServiceSpec>,
    endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>,
) -> usize {
    match backends
        .iter()
        .position(|x| x.name == s.name && x.namespace == s.namespace)
    {
        Some(i) => i,
        None => {
            backends.push(backend(s, endpoints));
            backends.len() - 1
        }
    }
}

fn destination(
    set: &ResourceSet,
    svc: &Loaded<ServiceSpec>,
    endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>,
) -> Destination {
    let mut backends = vec![backend(svc, endpoints)];
    let mut routes = Vec::new();
    // Whether a parentRef of route `r` names this service.
    let names_svc = |r: &Loaded<HttpRouteSpec>, p: &crate::model::ParentRef| {
        let ns = p
            .namespace
            .as_ref()
            .map(|n| n.value.as_str())
            .unwrap_or(&r.namespace);
        p.name.value == svc.name && ns == svc.namespace
    };
    let mut attached: Vec<&Loaded<HttpRouteSpec>> = set
        .http_routes
        .iter()
        .filter(|r| r.spec.parent_refs.iter().any(|p| names_svc(r, p)))
        .collect();
    attached.sort_by_key(|r| r.key());
    for r in attached {
        let ports: Vec<Option<u16>> = r
            .spec
            .parent_refs
            .iter()
            .filter(|p| names_svc(r, p))
            .map(|p| p.port.as_ref().map(|p| p.value))
            .collect();
        for (rule_idx, spanned_rule) in r.spec.rules.iter().enumerate() {
            let rule = &spanned_rule.value;
            let mut weighted = Vec::new();
            for b in &rule.backend_refs {
                let ns = b
                    .namespace
                    .as_ref()
                    .map(|n| n.value.as_str())
                    .unwrap_or(&r.namespace);
                let Some(bs) = set.service(ns, &b.name.value) else {
                    continue;
                };
                weighted.push(WeightedBackend {
                    backend: backend_index(&mut backends, bs, endpoints),
                    weight: b.weight.as_ref().map(|w| w.value).unwrap_or(1),
                    filters: crate::filters::backend_filters(r, &b.filters, &mut Vec::new()),
                });
            }
            let filters = crate::filters::rule_filters(
                set,
                r,
                spanned_rule,
                &mut |s| backend_index(&mut backends, s, endpoints),
                &mut Vec::new(),
            );
            let matchers: Vec<Matcher> = if rule.matches.is_empty() {
                vec![Matcher::default()]
            } else {
                rule.matches.iter().map(|m| matcher(&m.value)).collect()
            };
            for port in &ports {
                for m in &matchers {
                    let mut m = m.clone();
                    if m.path.is_none() {
                        m.path = Some(PathMatch {
                            kind: PathMatchType::PathPrefix,
                            value: "/".into(),
                        });
                    }
                    routes.push(Route {
                        route: r.key(),
                        rule: rule_idx,
                        port: *port,
                        matcher: m,
                        backends: weighted.clone(),
                        policy: crate::policy::route_overrides(r, rule, &mut Vec::new()),
                        filters: filters.clone(),
                    });
                }
            }
        }
    }
    // Gateway API precedence: exact path, then longest prefix, then method,
    // then most header matches, then most query matches; ties keep route
    // name and rule order (the sort is stable).
    routes.sort_by_key(|r| {
        let (exact, len) = match &r.matcher.path {
            Some(p) => (p.kind == PathMatchType::Exact, p.value.len()),
            None => (false, 0),
        };
        (
            Reverse(exact),
            Reverse(len),
            Reverse(r.matcher.method.is_some()),
            Reverse(r.matcher.headers.len()),
            Reverse(r.matcher.query.len()),
        )
    });
    Destination {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        protocol: svc
            .spec
            .ports
            .first()
            .map(|p| p.protocol.value)
            .unwrap_or(crate::model::Protocol::Http),
        ports: svc.spec.ports.iter().map(|p| p.port.value).collect(),
        routes,
        backends,
        policy: set
            .traffic_policies
            .iter()
            .find(|p| {
                p.spec.target_ref.resolve(&p.namespace)
                    == (svc.namespace.as_str(), svc.name.as_str())
            })
            .map(|p| crate::policy::compile_policy(set, p, &mut Vec::new())),
    }
}

pub(crate) fn matcher(m: &crate::model::MatchSpec) -> Matcher {
    Matcher {
        path: m.path.as_ref().map(|p| PathMatch {
            kind: p
                .kind
                .as_ref()
                .map(|k| k.value)
                .unwrap_or(PathMatchType::PathPrefix),
            value: p
                .value
                .as_ref()
                .map(|v| v.value.clone())
                .unwrap_or_else(|| "/".into()),
        }),
        headers: m
            .headers
            .iter()
            .map(|h| NameValue {
                name: h.name.value.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect(),
        query: m
            .query_params
            .iter()
            .map(|h| NameValue {
                name: h.name.value.clone(),
                value: h.value.clone(),
            })
            .collect(),
        method: m.method.as_ref().map(|v| v.value.clone()),
    }
}
