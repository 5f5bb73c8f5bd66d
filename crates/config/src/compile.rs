//! Compiling a validated [`ResourceSet`] plus the live endpoints into the
//! snapshot for one proxy.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::model::{GrpcRouteSpec, HttpRouteSpec, Loaded, PathMatchType, ResourceSet, ServiceSpec};
use crate::rollout::{Split, Splits};
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
    compile_with(set, target, endpoints, &Splits::new())
}

/// [`compile`], with the weights rollouts put on the rules they drive in
/// place of those written in the routes.
pub fn compile_with(
    set: &ResourceSet,
    target: &Target<'_>,
    endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>,
    splits: &Splits,
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
                    destinations.push(destination(set, s, endpoints, splits));
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
        cluster: String::new(),
        egress: egress(set),
    }
}

/// The mesh's egress mode and its ExternalServices, with their policies.
pub fn egress(set: &ResourceSet) -> crate::snapshot::Egress {
    let mode = crate::validate::egress_mode(set, &mut Vec::new());
    let services = set
        .external_services
        .iter()
        .map(|e| crate::snapshot::External {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            hosts: e
                .spec
                .hosts
                .iter()
                .map(|h| h.value.to_ascii_lowercase())
                .collect(),
            ports: e
                .spec
                .ports
                .iter()
                .map(|p| crate::snapshot::ExternalPort {
                    port: p.port.value,
                    protocol: p.protocol.value,
                })
                .collect(),
            policy: set
                .traffic_policies
                .iter()
                .find(|p| {
                    p.spec.target_ref.resolve(&p.namespace)
                        == (e.namespace.as_str(), e.name.as_str())
                })
                .map(|p| crate::policy::compile_policy(set, p, &mut Vec::new())),
            authz: crate::authz::compile(set, &e.namespace, &e.name),
        })
        .collect();
    let namespaces: std::collections::BTreeSet<&str> =
        set.services.iter().map(|s| s.namespace.as_str()).collect();
    crate::snapshot::Egress {
        mode,
        namespaces: namespaces.into_iter().map(str::to_string).collect(),
        services,
    }
}

fn backend(s: &Loaded<ServiceSpec>, endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>) -> Backend {
    let mut eps = endpoints(&s.namespace, &s.name);
    eps.extend(s.spec.endpoints.iter().map(|e| Endpoint {
        address: e.address.value.clone(),
        instance: String::new(),
        meshed: false,
        cluster: String::new(),
        zone: String::new(),
    }));
    eps.sort();
    eps.dedup();
    Backend {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        endpoints: eps,
    }
}

/// The parentRef ports (`None`: every port) with which route `r` attaches
/// to `svc`; empty when it does not.
fn attached_ports<S>(
    r: &Loaded<S>,
    parents: &[crate::model::ParentRef],
    svc: &Loaded<ServiceSpec>,
) -> Vec<Option<u16>> {
    parents
        .iter()
        .filter(|p| {
            let ns = p
                .namespace
                .as_ref()
                .map_or(r.namespace.as_str(), |n| n.value.as_str());
            p.name.value == svc.name && ns == svc.namespace
        })
        .map(|p| p.port.as_ref().map(|p| p.value))
        .collect()
}

/// A rule's weighted backends (added to `backends` as needed).
fn weighted<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    refs: &[crate::model::BackendRef],
    backends: &mut Vec<Backend>,
    endpoints: &dyn Fn(&str, &str) -> Vec<Endpoint>,
) -> Vec<WeightedBackend> {
    let mut out = Vec::new();
    for b in refs {
        let ns = b
            .namespace
            .as_ref()
            .map_or(r.namespace.as_str(), |n| n.value.as_str());
        let Some(bs) = set.service(ns, &b.name.value) else {
            continue;
        };
        out.push(WeightedBackend {
            backend: backend_index(backends, bs, endpoints),
            weight: b.weight.as_ref().map(|w| w.value).unwrap_or(1),
            filters: crate::filters::backend_filters(r, &b.filters, &mut Vec::new()),
        });
    }
    out
}

/// A rule whose backends are exactly a rollout's stable and canary
/// Services (in the destination's namespace) gets the rollout's weights,
/// in thousandths, shared among the refs to each.
fn split_weights(
    weighted: &mut [WeightedBackend],
    backends: &[Backend],
    ns: &str,
    split: Option<&Split>,
) {
    let Some(split) = split else { return };
    let name = |w: &WeightedBackend| {
        backends
            .get(w.backend)
            .filter(|b| b.namespace == ns)
            .map(|b| b.name.as_str())
    };
    let count = |n: &str| weighted.iter().filter(|w| name(w) == Some(n)).count() as u32;
    let (stable, canary) = (count(&split.stable), count(&split.canary));
    if stable == 0 || canary == 0 || stable + canary != weighted.len() as u32 {
        return;
    }
    let c = split.canary_permille.min(1000);
    let shares: Vec<u32> = weighted
        .iter()
        .map(|w| {
            if name(w) == Some(split.canary.as_str()) {
                c / canary
            } else {
                (1000 - c) / stable
            }
        })
        .collect();
    for (w, share) in weighted.iter_mut().zip(shares) {
        w.weight = share;
    }
}

/// Adds `rule` once per port and match (a rule without matches matches
/// everything); a match without a path matches every path.
fn push_rule(routes: &mut Vec<Route>, ports: &[Option<u16>], matchers: Vec<Matcher>, rule: &Route) {
    let matchers = if matchers.is_empty() {
        vec![Matcher::default()]
    } else {
        matchers
    };
    for port in ports {
        for m in &matchers {
            let mut m = m.clone();
            if m.path.is_none() {
                m.path = Some(PathMatch {
                    kind: PathMatchType::PathPrefix,
                    value: "/".into(),
                });
            }
            let mut route = rule.clone();
            route.port = *port;
            route.matcher = m;
            routes.push(route);
        }
    }
}

/// A GRPCRoute match: service and method become the path (`/pkg.Svc/M`
/// exactly, or the `/pkg.Svc` prefix); a method of any service is matched
/// on its own.
fn grpc_matcher(m: &crate::model::GrpcMatchSpec) -> Matcher {
    let method = m.method.as_ref().map(|x| &x.value);
    let service = method
        .and_then(|x| x.service.as_ref())
        .map(|v| v.value.as_str());
    let name = method
        .and_then(|x| x.method.as_ref())
        .map(|v| v.value.clone());
    let (path, grpc_method) = match (service, name) {
        (Some(s), Some(m)) => (
            Some(PathMatch {
                kind: PathMatchType::Exact,
                value: format!("/{s}/{m}"),
            }),
            None,
        ),
        (Some(s), None) => (
            Some(PathMatch {
                kind: PathMatchType::PathPrefix,
                value: format!("/{s}"),
            }),
            None,
        ),
        (None, m) => (None, m),
    };
    Matcher {
        path,
        headers: m
            .headers
            .iter()
            .map(|h| NameValue {
                name: h.name.value.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect(),
        query: Vec::new(),
        method: None,
        grpc_method,
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
    splits: &Splits,
) -> Destination {
    let split = splits.get(&svc.key());
    let mut backends = vec![backend(svc, endpoints)];
    let mut routes = Vec::new();
    let mut http: Vec<&Loaded<HttpRouteSpec>> = set.http_routes.iter().collect();
    http.sort_by_key(|r| r.key());
    for r in http {
        let ports = attached_ports(r, &r.spec.parent_refs, svc);
        if ports.is_empty() {
            continue;
        }
        for (rule_idx, spanned_rule) in r.spec.rules.iter().enumerate() {
            let rule = &spanned_rule.value;
            let mut weighted = weighted(set, r, &rule.backend_refs, &mut backends, endpoints);
            split_weights(&mut weighted, &backends, &svc.namespace, split);
            let filters = crate::filters::rule_filters(
                set,
                r,
                spanned_rule,
                &mut |s| backend_index(&mut backends, s, endpoints),
                &mut Vec::new(),
            );
            let matchers: Vec<Matcher> = rule.matches.iter().map(|m| matcher(&m.value)).collect();
            let rule = Route {
                route: r.key(),
                rule: rule_idx,
                port: None,
                matcher: Matcher::default(),
                backends: weighted,
                policy: crate::policy::route_overrides(r, rule, &mut Vec::new()),
                filters,
            };
            push_rule(&mut routes, &ports, matchers, &rule);
        }
    }
    let mut grpc: Vec<&Loaded<GrpcRouteSpec>> = set.grpc_routes.iter().collect();
    grpc.sort_by_key(|r| r.key());
    for r in grpc {
        let ports = attached_ports(r, &r.spec.parent_refs, svc);
        if ports.is_empty() {
            continue;
        }
        for (rule_idx, spanned_rule) in r.spec.rules.iter().enumerate() {
            let rule = &spanned_rule.value;
            let mut weighted = weighted(set, r, &rule.backend_refs, &mut backends, endpoints);
            split_weights(&mut weighted, &backends, &svc.namespace, split);
            let parts = crate::filters::RuleParts::grpc(r, spanned_rule);
            let filters = crate::filters::filters_of(
                set,
                r,
                &parts,
                &mut |s| backend_index(&mut backends, s, endpoints),
                &mut Vec::new(),
            );
            let matchers = rule
                .matches
                .iter()
                .map(|m| grpc_matcher(&m.value))
                .collect();
            let rule = Route {
                route: r.key(),
                rule: rule_idx,
                port: None,
                matcher: Matcher::default(),
                backends: weighted,
                policy: None,
                filters,
            };
            push_rule(&mut routes, &ports, matchers, &rule);
        }
    }
    // Gateway API precedence: exact path, then longest prefix, then a gRPC
    // method of any service, then method, then most header matches, then
    // most query matches; ties keep route name and rule order (the sort is
    // stable). A GRPCRoute's service and method are its path, so its
    // precedence (service, then method, then headers) follows.
    routes.sort_by_key(|r| {
        let (exact, len) = match &r.matcher.path {
            Some(p) => (p.kind == PathMatchType::Exact, p.value.len()),
            None => (false, 0),
        };
        (
            Reverse(exact),
            Reverse(len),
            Reverse(r.matcher.grpc_method.is_some()),
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
        grpc_method: None,
    }
}
