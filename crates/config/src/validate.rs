//! Whole-set checks that a single document cannot make on its own:
//! duplicate names, references to services that do not exist, ports and
//! weights that make no sense.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::diag::Diagnostic;
use crate::model::{Loaded, Protocol, ResourceSet, ServiceSpec};

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(crate) fn validate(set: &ResourceSet, diags: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<(&str, String), &crate::model::Pos> = HashMap::new();
    for s in &set.services {
        check_name(&s.name, &s.name_pos, diags);
        check_name(&s.namespace, &s.namespace_pos, diags);
        if let Some(first) = seen.insert(("Service", s.key()), &s.pos) {
            diags.push(Diagnostic::at(
                &s.name_pos,
                format!(
                    "duplicate Service `{}` (first defined at {}:{})",
                    s.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        validate_service(s, diags);
    }
    validate_external(set, diags);
    egress_mode(set, diags);
    let mut clusters: HashMap<&str, &crate::model::Pos> = HashMap::new();
    for c in &set.remote_clusters {
        check_name(&c.name, &c.name_pos, diags);
        if let Some(first) = clusters.insert(c.name.as_str(), &c.pos) {
            diags.push(Diagnostic::at(
                &c.name_pos,
                format!(
                    "duplicate RemoteCluster `{}` (first defined at {}:{}); clusters are named mesh-wide",
                    c.name,
                    first.file.display(),
                    first.line
                ),
            ));
        }
        if c.spec.api.is_empty() {
            diags.push(Diagnostic::at(
                &c.pos,
                "a RemoteCluster needs at least one `api` address (host:port of its control plane's API)",
            ));
        }
        for a in &c.spec.api {
            let ok = a
                .value
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                diags.push(Diagnostic::at(
                    &c.at(a),
                    format!("`{}` is not host:port", a.value),
                ));
            }
        }
        if c.spec.credential_file.value.trim().is_empty() {
            diags.push(Diagnostic::at(
                &c.at(&c.spec.credential_file),
                "credentialFile names the file with the remote cluster's export credential",
            ));
        }
    }
    for r in &set.http_routes {
        check_name(&r.name, &r.name_pos, diags);
        check_name(&r.namespace, &r.namespace_pos, diags);
        if let Some(first) = seen.insert(("HTTPRoute", r.key()), &r.pos) {
            diags.push(Diagnostic::at(
                &r.name_pos,
                format!(
                    "duplicate HTTPRoute `{}` (first defined at {}:{})",
                    r.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        validate_route(set, r, diags);
    }
    for r in &set.grpc_routes {
        check_name(&r.name, &r.name_pos, diags);
        check_name(&r.namespace, &r.namespace_pos, diags);
        if let Some(first) = seen.insert(("GRPCRoute", r.key()), &r.pos) {
            diags.push(Diagnostic::at(
                &r.name_pos,
                format!(
                    "duplicate GRPCRoute `{}` (first defined at {}:{})",
                    r.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        validate_grpc_route(set, r, diags);
    }
    let mut targeted: HashMap<String, &crate::model::Pos> = HashMap::new();
    for p in &set.traffic_policies {
        check_name(&p.name, &p.name_pos, diags);
        check_name(&p.namespace, &p.namespace_pos, diags);
        if let Some(first) = seen.insert(("TrafficPolicy", p.key()), &p.pos) {
            diags.push(Diagnostic::at(
                &p.name_pos,
                format!(
                    "duplicate TrafficPolicy `{}` (first defined at {}:{})",
                    p.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        let t = &p.spec.target_ref;
        let (ns, name) = t.resolve(&p.namespace);
        let target = format!("{ns}/{name}");
        if let Some(first) = targeted.insert(target.clone(), &p.pos) {
            diags.push(Diagnostic::at(
                &p.at(&t.name),
                format!(
                    "Service `{target}` already has a TrafficPolicy (at {}:{}); merge them into one",
                    first.file.display(),
                    first.line
                ),
            ));
        }
        crate::policy::compile_policy(set, p, diags);
    }
    for p in &set.authorization_policies {
        check_name(&p.name, &p.name_pos, diags);
        check_name(&p.namespace, &p.namespace_pos, diags);
        if let Some(first) = seen.insert(("AuthorizationPolicy", p.key()), &p.pos) {
            diags.push(Diagnostic::at(
                &p.name_pos,
                format!(
                    "duplicate AuthorizationPolicy `{}` (first defined at {}:{})",
                    p.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
    }
    for f in &set.fault_injections {
        check_name(&f.name, &f.name_pos, diags);
        check_name(&f.namespace, &f.namespace_pos, diags);
        if let Some(first) = seen.insert(("FaultInjection", f.key()), &f.pos) {
            diags.push(Diagnostic::at(
                &f.name_pos,
                format!(
                    "duplicate FaultInjection `{}` (first defined at {}:{})",
                    f.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        crate::filters::fault(f, diags);
    }
    for r in &set.rollouts {
        check_name(&r.name, &r.name_pos, diags);
        check_name(&r.namespace, &r.namespace_pos, diags);
        if let Some(first) = seen.insert(("Rollout", r.key()), &r.pos) {
            diags.push(Diagnostic::at(
                &r.name_pos,
                format!(
                    "duplicate Rollout `{}` (first defined at {}:{})",
                    r.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
    }
    crate::rollout::validate(set, diags);
    crate::authz::validate(set, diags);
}

/// The mesh's egress mode (`Mesh.spec.egress.mode`).
pub(crate) fn egress_mode(
    set: &ResourceSet,
    diags: &mut Vec<Diagnostic>,
) -> crate::snapshot::EgressMode {
    use crate::snapshot::EgressMode;
    let Some((m, mode)) = set.meshes.first().and_then(|m| {
        let mode = m.spec.egress.as_ref()?.mode.as_ref()?;
        Some((m, mode))
    }) else {
        return EgressMode::AllowAll;
    };
    match mode.value.as_str() {
        "allow-all" => EgressMode::AllowAll,
        "registry-only" => EgressMode::RegistryOnly,
        other => {
            diags.push(Diagnostic::at(
                &m.at(mode),
                format!("egress mode must be `allow-all` or `registry-only`, not `{other}`"),
            ));
            EgressMode::AllowAll
        }
    }
}

/// An ExternalService host: a DNS name, `*.` and a name, or an IP address.
fn valid_external_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn validate_external(set: &ResourceSet, diags: &mut Vec<Diagnostic>) {
    let mut hosts: HashMap<String, (&str, &crate::model::Pos)> = HashMap::new();
    let mut names: HashMap<String, &crate::model::Pos> = HashMap::new();
    for e in &set.external_services {
        check_name(&e.name, &e.name_pos, diags);
        check_name(&e.namespace, &e.namespace_pos, diags);
        if let Some(s) = set.service(&e.namespace, &e.name) {
            diags.push(Diagnostic::at(
                &e.name_pos,
                format!(
                    "`{}` is already a Service (at {}:{}); an ExternalService needs a name of its own",
                    e.key(),
                    s.pos.file.display(),
                    s.pos.line
                ),
            ));
        }
        if let Some(first) = names.insert(e.key(), &e.pos) {
            diags.push(Diagnostic::at(
                &e.name_pos,
                format!(
                    "duplicate ExternalService `{}` (first defined at {}:{})",
                    e.key(),
                    first.file.display(),
                    first.line
                ),
            ));
        }
        if e.spec.hosts.is_empty() {
            diags.push(Diagnostic::at(
                &e.pos,
                "an ExternalService needs at least one host",
            ));
        }
        for h in &e.spec.hosts {
            let host = h.value.to_ascii_lowercase();
            if !valid_external_host(&host) {
                diags.push(Diagnostic::at(
                    &e.at(h),
                    format!(
                        "`{}` is not a host: use a DNS name, `*.` and a name, or an IP address",
                        h.value
                    ),
                ));
                continue;
            }
            match hosts.get(&host) {
                Some((other, at)) => diags.push(Diagnostic::at(
                    &e.at(h),
                    format!(
                        "host `{host}` is already listed by ExternalService `{other}` (at {}:{})",
                        at.file.display(),
                        at.line
                    ),
                )),
                None => {
                    hosts.insert(host, (e.name.as_str(), &e.pos));
                }
            }
        }
        if e.spec.ports.is_empty() {
            diags.push(Diagnostic::at(
                &e.pos,
                format!("ExternalService `{}` declares no ports", e.name),
            ));
        }
        let mut ports = HashSet::new();
        for p in &e.spec.ports {
            if p.port.value == 0 {
                diags.push(Diagnostic::at(&e.at(&p.port), "port must be 1-65535"));
            } else if !ports.insert(p.port.value) {
                diags.push(Diagnostic::at(
                    &e.at(&p.port),
                    format!("port {} is declared twice", p.port.value),
                ));
            }
        }
    }
}

fn check_name(name: &str, pos: &crate::model::Pos, diags: &mut Vec<Diagnostic>) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        diags.push(Diagnostic::at(
            pos,
            format!("`{name}` is not a valid name: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit"),
        ));
    }
}

fn validate_service(s: &Loaded<ServiceSpec>, diags: &mut Vec<Diagnostic>) {
    if s.spec.ports.is_empty() {
        diags.push(Diagnostic::at(
            &s.pos,
            format!("Service `{}` declares no ports", s.name),
        ));
    }
    let mut ports = HashSet::new();
    if let Some(first) = s.spec.ports.first() {
        // A sidecar serves one protocol inbound; a service that mixes them
        // would have some of its traffic spoken wrongly.
        for p in &s.spec.ports[1..] {
            if p.protocol.value != first.protocol.value {
                diags.push(Diagnostic::at(
                    &s.at(&p.protocol),
                    format!(
                        "all ports of a Service must use one protocol (the first port is {}, this one {}); declare a second Service instead",
                        first.protocol.value, p.protocol.value
                    ),
                ));
            }
        }
    }
    for p in &s.spec.ports {
        if p.port.value == 0 {
            diags.push(Diagnostic::at(&s.at(&p.port), "port must be 1-65535"));
        }
        if !ports.insert(p.port.value) {
            diags.push(Diagnostic::at(
                &s.at(&p.port),
                format!("duplicate port {}", p.port.value),
            ));
        }
    }
    for e in &s.spec.endpoints {
        if e.address.value.parse::<SocketAddr>().is_err() {
            diags.push(Diagnostic::at(
                &s.at(&e.address),
                format!("endpoint address `{}` is not an ip:port", e.address.value),
            ));
        }
    }
}

fn validate_route(
    set: &ResourceSet,
    r: &Loaded<crate::model::HttpRouteSpec>,
    diags: &mut Vec<Diagnostic>,
) {
    check_parents(set, r, &r.spec.parent_refs, false, diags);
    for rule in &r.spec.rules {
        crate::policy::route_overrides(r, &rule.value, diags);
        crate::filters::rule_filters(set, r, rule, &mut |_| 0, diags);
        let rule_pos = r.at(rule);
        let rule = &rule.value;
        let redirects = crate::filters::redirects(rule);
        check_backends(set, r, &rule_pos, &rule.backend_refs, redirects, diags);
        for m in &rule.matches {
            let mpos = r.at(m);
            let m = &m.value;
            if let Some(path) = &m.path {
                if let Some(v) = &path.value {
                    if !v.value.starts_with('/') {
                        diags.push(Diagnostic::at(
                            &r.at(v),
                            format!("path `{}` must start with '/'", v.value),
                        ));
                    }
                } else {
                    diags.push(Diagnostic::at(&mpos, "path match needs a `value`"));
                }
            }
            if let Some(method) = &m.method {
                if !METHODS.contains(&method.value.as_str()) {
                    diags.push(Diagnostic::at(
                        &r.at(method),
                        format!(
                            "unknown method `{}`; expected one of {}",
                            method.value,
                            METHODS.join(", ")
                        ),
                    ));
                }
            }
            check_header_matches(r, &m.headers, diags);
            for q in &m.query_params {
                let n = &q.name.value;
                if n.is_empty()
                    || n.bytes()
                        .any(|b| b"&=#?".contains(&b) || b.is_ascii_whitespace())
                {
                    diags.push(Diagnostic::at(
                        &r.at(&q.name),
                        format!("`{n}` is not a valid query parameter name"),
                    ));
                }
            }
        }
    }
}

fn validate_grpc_route(
    set: &ResourceSet,
    r: &Loaded<crate::model::GrpcRouteSpec>,
    diags: &mut Vec<Diagnostic>,
) {
    check_parents(set, r, &r.spec.parent_refs, true, diags);
    for rule in &r.spec.rules {
        let rule_pos = r.at(rule);
        let parts = crate::filters::RuleParts::grpc(r, rule);
        crate::filters::filters_of(set, r, &parts, &mut |_| 0, diags);
        let rule = &rule.value;
        check_backends(set, r, &rule_pos, &rule.backend_refs, false, diags);
        for m in &rule.matches {
            if let Some(method) = &m.value.method {
                let mpos = r.at(method);
                let method = &method.value;
                if let Some(k) = method.kind.as_ref().filter(|k| k.value != "Exact") {
                    diags.push(Diagnostic::at(
                        &r.at(k),
                        format!(
                            "method match type `{}` is not supported; use Exact",
                            k.value
                        ),
                    ));
                }
                if method.service.is_none() && method.method.is_none() {
                    diags.push(Diagnostic::at(
                        &mpos,
                        "a method match needs a `service`, a `method` or both",
                    ));
                }
                let ident = |v: &str, dots: bool| {
                    !v.is_empty()
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
                };
                if let Some(svc) = method.service.as_ref().filter(|v| !ident(&v.value, true)) {
                    diags.push(Diagnostic::at(
                        &r.at(svc),
                        format!(
                            "`{}` is not a gRPC service name (`package.Service`)",
                            svc.value
                        ),
                    ));
                }
                if let Some(m) = method.method.as_ref().filter(|v| !ident(&v.value, false)) {
                    diags.push(Diagnostic::at(
                        &r.at(m),
                        format!("`{}` is not a gRPC method name", m.value),
                    ));
                }
            }
            check_header_matches(r, &m.value.headers, diags);
        }
    }
}

/// A route's parentRefs name Services that exist, on ports that exist and
/// speak HTTP (a GRPCRoute: gRPC).
fn check_parents<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    parent_refs: &[crate::model::ParentRef],
    grpc: bool,
    diags: &mut Vec<Diagnostic>,
) {
    let (kind, a_kind) = if grpc {
        ("GRPCRoute", "a GRPCRoute")
    } else {
        ("HTTPRoute", "an HTTPRoute")
    };
    if parent_refs.is_empty() {
        diags.push(Diagnostic::at(
            &r.pos,
            format!("{kind} has no parentRefs; attach it to a Service"),
        ));
    }
    for p in parent_refs {
        check_service_kind(r, p.group.as_ref(), p.kind.as_ref(), diags);
        let ns = p
            .namespace
            .as_ref()
            .map(|n| n.value.as_str())
            .unwrap_or(&r.namespace);
        let Some(svc) = set.service(ns, &p.name.value) else {
            diags.push(Diagnostic::at(
                &r.at(&p.name),
                format!(
                    "parentRef names Service `{ns}/{}`, which does not exist",
                    p.name.value
                ),
            ));
            continue;
        };
        let port = match &p.port {
            Some(port) => {
                let found = svc.spec.ports.iter().find(|sp| sp.port.value == port.value);
                if found.is_none() {
                    diags.push(Diagnostic::at(
                        &r.at(port),
                        format!("Service `{}` has no port {}", svc.key(), port.value),
                    ));
                }
                found
            }
            None => svc.spec.ports.first(),
        };
        let Some(sp) = port else { continue };
        let wrong = if grpc {
            sp.protocol.value != Protocol::Grpc
        } else {
            sp.protocol.value == Protocol::Tcp
        };
        if wrong {
            let needs = if grpc {
                "a grpc port"
            } else {
                "an http, http2 or grpc port"
            };
            diags.push(Diagnostic::at(
                &r.at(&p.name),
                format!(
                    "Service `{}` port {} is {}; {a_kind} needs {needs}",
                    svc.key(),
                    sp.port.value,
                    sp.protocol.value
                ),
            ));
        }
    }
}

/// A rule's backendRefs name Services that exist, with sane weights; a
/// rule has some unless it redirects.
fn check_backends<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    rule_pos: &crate::model::Pos,
    refs: &[crate::model::BackendRef],
    redirects: bool,
    diags: &mut Vec<Diagnostic>,
) {
    if refs.is_empty() && !redirects {
        diags.push(Diagnostic::at(rule_pos, "rule has no backendRefs"));
    }
    let mut total: u64 = 0;
    for b in refs {
        check_service_kind(r, b.group.as_ref(), b.kind.as_ref(), diags);
        crate::filters::backend_filters(r, &b.filters, diags);
        let weight = b.weight.as_ref().map(|w| w.value).unwrap_or(1);
        if weight > 1_000_000 {
            let pos = b
                .weight
                .as_ref()
                .map(|w| r.at(w))
                .unwrap_or_else(|| r.at(&b.name));
            diags.push(Diagnostic::at(&pos, "weight must be at most 1000000"));
        }
        total += u64::from(weight);
        let ns = b
            .namespace
            .as_ref()
            .map(|n| n.value.as_str())
            .unwrap_or(&r.namespace);
        match set.service(ns, &b.name.value) {
            None => diags.push(Diagnostic::at(
                &r.at(&b.name),
                format!(
                    "backendRef names Service `{ns}/{}`, which does not exist",
                    b.name.value
                ),
            )),
            Some(svc) => {
                if let Some(port) = &b.port {
                    if !svc.spec.ports.iter().any(|sp| sp.port.value == port.value) {
                        diags.push(Diagnostic::at(
                            &r.at(port),
                            format!("Service `{}` has no port {}", svc.key(), port.value),
                        ));
                    }
                }
            }
        }
    }
    if !refs.is_empty() && total == 0 {
        diags.push(Diagnostic::at(
            rule_pos,
            "all backendRefs of this rule have weight 0; no traffic could be sent",
        ));
    }
}

fn check_header_matches<S>(
    r: &Loaded<S>,
    headers: &[crate::model::ValueMatchSpec],
    diags: &mut Vec<Diagnostic>,
) {
    for h in headers {
        let n = &h.name.value;
        let token = |b: u8| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b);
        if n.is_empty() || !n.bytes().all(token) {
            diags.push(Diagnostic::at(
                &r.at(&h.name),
                format!("`{n}` is not a valid header name"),
            ));
        }
        if !h
            .value
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        {
            diags.push(Diagnostic::at(
                &r.at(&h.name),
                format!("the value for header `{n}` is not a valid header value"),
            ));
        }
    }
}

pub(crate) fn check_service_kind<S>(
    r: &Loaded<S>,
    group: Option<&serde_saphyr::Spanned<String>>,
    kind: Option<&serde_saphyr::Spanned<String>>,
    diags: &mut Vec<Diagnostic>,
) {
    if let Some(g) = group {
        if !(g.value.is_empty() || g.value == "core") {
            diags.push(Diagnostic::at(
                &r.at(g),
                format!(
                    "group `{}` is not supported; refer to a Service (group \"\")",
                    g.value
                ),
            ));
        }
    }
    if let Some(k) = kind {
        if k.value != "Service" {
            diags.push(Diagnostic::at(
                &r.at(k),
                format!("kind `{}` is not supported here; only Service", k.value),
            ));
        }
    }
}
