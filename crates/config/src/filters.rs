//! HTTPRoute filters (Gateway API `HTTPRouteFilter`) and the
//! `FaultInjection` resource a rule names through an `ExtensionRef`:
//! checked with positions and compiled into the snapshot's [`Filters`].
//! One function does both, so what is checked is what is compiled.

use serde_saphyr::Spanned;

use crate::diag::Diagnostic;
use crate::model::{
    FaultInjectionSpec, HeaderModifierSpec, HttpRouteSpec, Loaded, PathMatchType, PathModifierSpec,
    Protocol, ResourceSet, RouteFilterSpec, RouteRuleSpec, ServiceSpec,
};
use crate::snapshot::{
    Fault, FaultAbort, FaultDelay, Filters, HeaderModifier, Mirror, NameValue, PathModifier,
    Redirect, UrlRewrite,
};

/// Most entries in one of a header modifier's lists (as in the Gateway API).
const MAX_HEADER_EDITS: usize = 16;
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];
const FILTER_TYPES: &str =
    "RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestRedirect, RequestMirror, ExtensionRef";

/// Headers a filter may not touch: the message's framing and hop-by-hop
/// headers belong to the proxies, and `Host` is changed with `URLRewrite`.
const RESERVED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

type Route = Loaded<HttpRouteSpec>;

/// The parts of a route rule that filters are checked against.
pub(crate) struct RuleParts<'a> {
    pub(crate) filters: &'a [Spanned<RouteFilterSpec>],
    /// An HTTPRoute rule's matches (`ReplacePrefixMatch` replaces its one
    /// `PathPrefix`); `None` for a GRPCRoute, which has no URL filters.
    pub(crate) matches: Option<&'a [Spanned<crate::model::MatchSpec>]>,
    /// Where the rule's first backendRef is named, if it has one.
    pub(crate) first_backend: Option<&'a Spanned<String>>,
    pub(crate) pos: crate::model::Pos,
}

impl<'a> RuleParts<'a> {
    pub(crate) fn grpc(
        r: &Loaded<crate::model::GrpcRouteSpec>,
        rule: &'a Spanned<crate::model::GrpcRuleSpec>,
    ) -> Self {
        RuleParts {
            filters: &rule.value.filters,
            matches: None,
            first_backend: rule.value.backend_refs.first().map(|b| &b.name),
            pos: r.at(rule),
        }
    }

    pub(crate) fn http(r: &Route, rule: &'a Spanned<RouteRuleSpec>) -> Self {
        RuleParts {
            filters: &rule.value.filters,
            matches: Some(&rule.value.matches),
            first_backend: rule.value.backend_refs.first().map(|b| &b.name),
            pos: r.at(rule),
        }
    }
}

/// Checks rule `rule` of HTTPRoute `r` and compiles its filters. `backend`
/// gives the destination's backend index of a mirror's Service (checks
/// alone pass one that returns 0).
pub fn rule_filters(
    set: &ResourceSet,
    r: &Route,
    rule: &Spanned<RouteRuleSpec>,
    backend: &mut dyn FnMut(&Loaded<ServiceSpec>) -> usize,
    diags: &mut Vec<Diagnostic>,
) -> Option<Box<Filters>> {
    filters_of(set, r, &RuleParts::http(r, rule), backend, diags)
}

/// Checks and compiles the filters of one rule of route `r` (an HTTPRoute
/// or a GRPCRoute).
pub(crate) fn filters_of<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    rule: &RuleParts<'_>,
    backend: &mut dyn FnMut(&Loaded<ServiceSpec>) -> usize,
    diags: &mut Vec<Diagnostic>,
) -> Option<Box<Filters>> {
    let mut f = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for filter in rule.filters {
        let Some(kind) = filter_kind(r, &filter.value, diags) else {
            continue;
        };
        if rule.matches.is_none() && URL_FILTERS.contains(&kind) {
            diags.push(Diagnostic::at(
                &r.at(&filter.value.kind),
                format!("a GRPCRoute has no {kind} filter; use an HTTPRoute"),
            ));
            continue;
        }
        let matches = rule.matches.unwrap_or_default();
        let repeatable = kind == "RequestMirror";
        if !repeatable && seen.contains(&kind) {
            diags.push(Diagnostic::at(
                &r.at(&filter.value.kind),
                format!("a rule may have one {kind} filter"),
            ));
            continue;
        }
        seen.push(kind);
        let spec = &filter.value;
        match kind {
            "RequestHeaderModifier" => {
                if let Some(m) = &spec.request_header_modifier {
                    f.request_headers = Some(header_modifier(r, m, diags));
                }
            }
            "ResponseHeaderModifier" => {
                if let Some(m) = &spec.response_header_modifier {
                    f.response_headers = Some(header_modifier(r, m, diags));
                }
            }
            "URLRewrite" => {
                if let Some(u) = &spec.url_rewrite {
                    f.rewrite = Some(UrlRewrite {
                        hostname: u
                            .value
                            .hostname
                            .as_ref()
                            .and_then(|h| hostname(r, h, diags)),
                        path: u
                            .value
                            .path
                            .as_ref()
                            .and_then(|p| path_modifier(r, matches, p, diags)),
                    });
                }
            }
            "RequestRedirect" => {
                if let Some(rd) = &spec.request_redirect {
                    f.redirect = Some(redirect(r, matches, rd, diags));
                }
            }
            "RequestMirror" => {
                if let Some(m) = &spec.request_mirror {
                    if let Some(m) = mirror(set, r, m, backend, diags) {
                        f.mirrors.push(m);
                    }
                }
            }
            "ExtensionRef" => {
                if let Some(e) = &spec.extension_ref {
                    f.fault = fault_ref(set, r, e, diags);
                }
            }
            _ => {}
        }
    }
    if f.redirect.is_some() {
        let others = ["URLRewrite", "RequestMirror", "ExtensionRef"];
        if let Some(other) = seen.iter().find(|k| others.contains(k)) {
            diags.push(Diagnostic::at(
                &rule.pos,
                format!("a rule with a RequestRedirect answers requests itself; it cannot also have a {other} filter"),
            ));
        }
        if let Some(b) = rule.first_backend {
            diags.push(Diagnostic::at(
                &r.at(b),
                "a rule with a RequestRedirect answers requests itself; remove its backendRefs",
            ));
        }
    }
    (f != Filters::default()).then(|| Box::new(f))
}

/// Filters that change the URL, which only an HTTPRoute has.
const URL_FILTERS: [&str; 2] = ["URLRewrite", "RequestRedirect"];

/// Whether rule `rule` answers with a redirect (and so needs no backends).
pub(crate) fn redirects(rule: &RouteRuleSpec) -> bool {
    rule.filters
        .iter()
        .any(|f| f.value.kind.value == "RequestRedirect")
}

/// Checks the filters of one backendRef: header modifiers only.
pub fn backend_filters<S>(
    r: &Loaded<S>,
    filters: &[Spanned<RouteFilterSpec>],
    diags: &mut Vec<Diagnostic>,
) -> Option<Box<Filters>> {
    let mut f = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for filter in filters {
        let Some(kind) = filter_kind(r, &filter.value, diags) else {
            continue;
        };
        if seen.contains(&kind) {
            diags.push(Diagnostic::at(
                &r.at(&filter.value.kind),
                format!("a backendRef may have one {kind} filter"),
            ));
            continue;
        }
        seen.push(kind);
        match (
            kind,
            &filter.value.request_header_modifier,
            &filter.value.response_header_modifier,
        ) {
            ("RequestHeaderModifier", Some(m), _) => {
                f.request_headers = Some(header_modifier(r, m, diags))
            }
            ("ResponseHeaderModifier", _, Some(m)) => {
                f.response_headers = Some(header_modifier(r, m, diags))
            }
            _ => diags.push(Diagnostic::at(
                &r.at(&filter.value.kind),
                format!("a backendRef's filters may only modify headers; put the {kind} filter on the rule"),
            )),
        }
    }
    (f != Filters::default()).then(|| Box::new(f))
}

/// The filter's type, when it is known and its settings are in the field
/// the type names (and only there).
fn filter_kind<'a, S>(
    r: &Loaded<S>,
    f: &'a RouteFilterSpec,
    diags: &mut Vec<Diagnostic>,
) -> Option<&'a str> {
    let fields = [
        (
            "RequestHeaderModifier",
            "requestHeaderModifier",
            f.request_header_modifier.is_some(),
        ),
        (
            "ResponseHeaderModifier",
            "responseHeaderModifier",
            f.response_header_modifier.is_some(),
        ),
        ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
        (
            "RequestRedirect",
            "requestRedirect",
            f.request_redirect.is_some(),
        ),
        ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
        ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
    ];
    let kind = f.kind.value.as_str();
    let Some(&(_, field, present)) = fields.iter().find(|(k, _, _)| *k == kind) else {
        diags.push(Diagnostic::at(
            &r.at(&f.kind),
            format!("unknown filter type `{kind}`; supported: {FILTER_TYPES}"),
        ));
        return None;
    };
    if !present {
        diags.push(Diagnostic::at(
            &r.at(&f.kind),
            format!("a {kind} filter needs its settings in `{field}`"),
        ));
        return None;
    }
    if let Some((_, other, _)) = fields.iter().find(|(k, _, p)| *p && *k != kind) {
        diags.push(Diagnostic::at(
            &r.at(&f.kind),
            format!("a {kind} filter cannot have `{other}`; write another filter for it"),
        ));
        return None;
    }
    Some(kind)
}

fn header_modifier<S>(
    r: &Loaded<S>,
    m: &Spanned<HeaderModifierSpec>,
    diags: &mut Vec<Diagnostic>,
) -> HeaderModifier {
    let spec = &m.value;
    let mut names: Vec<String> = Vec::new();
    let mut check_name = |n: &Spanned<String>, diags: &mut Vec<Diagnostic>| -> Option<String> {
        let lower = n.value.to_ascii_lowercase();
        if !crate::policy::http_header_name(&n.value) {
            diags.push(Diagnostic::at(
                &r.at(n),
                format!("`{}` is not a valid header name", n.value),
            ));
            return None;
        }
        if RESERVED.contains(&lower.as_str()) {
            let hint = if lower == "host" {
                "; change it with a URLRewrite filter's `hostname`"
            } else {
                ""
            };
            diags.push(Diagnostic::at(
                &r.at(n),
                format!("header `{lower}` belongs to the connection and cannot be modified{hint}"),
            ));
            return None;
        }
        if lower.starts_with("tandem-") {
            diags.push(Diagnostic::at(
                &r.at(n),
                format!("header `{lower}` is reserved for the mesh (`tandem-` headers)"),
            ));
            return None;
        }
        if names.contains(&lower) {
            diags.push(Diagnostic::at(
                &r.at(n),
                format!("header `{lower}` is named twice in this filter"),
            ));
            return None;
        }
        names.push(lower.clone());
        Some(lower)
    };
    let mut pairs = |list: &[crate::model::HeaderValueSpec], diags: &mut Vec<Diagnostic>| {
        let mut out = Vec::new();
        for h in list {
            let Some(name) = check_name(&h.name, diags) else {
                continue;
            };
            if !header_value(&h.value.value) {
                diags.push(Diagnostic::at(
                    &r.at(&h.value),
                    format!("the value for header `{name}` is not a valid header value"),
                ));
                continue;
            }
            out.push(NameValue {
                name,
                value: h.value.value.clone(),
            });
        }
        out
    };
    let set = pairs(&spec.set, diags);
    let add = pairs(&spec.add, diags);
    let mut remove = Vec::new();
    for n in &spec.remove {
        if let Some(n) = check_name(n, diags) {
            remove.push(n);
        }
    }
    for (list, len) in [
        ("set", spec.set.len()),
        ("add", spec.add.len()),
        ("remove", spec.remove.len()),
    ] {
        if len > MAX_HEADER_EDITS {
            diags.push(Diagnostic::at(
                &r.at(m),
                format!("`{list}` has {len} headers; at most {MAX_HEADER_EDITS}"),
            ));
        }
    }
    if spec.set.is_empty() && spec.add.is_empty() && spec.remove.is_empty() {
        diags.push(Diagnostic::at(
            &r.at(m),
            "a header modifier needs `set`, `add` or `remove`",
        ));
    }
    HeaderModifier { set, add, remove }
}

fn header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A host name without port (RFC 1123 labels).
fn hostname<S>(r: &Loaded<S>, h: &Spanned<String>, diags: &mut Vec<Diagnostic>) -> Option<String> {
    let v = &h.value;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if v.is_empty() || v.len() > 253 || !v.split('.').all(label_ok) {
        diags.push(Diagnostic::at(
            &r.at(h),
            format!("`{v}` is not a valid host name (letters, digits, '-' and '.', no port)"),
        ));
        return None;
    }
    Some(v.to_ascii_lowercase())
}

/// A path as a filter writes it: starts with `/`, no query or fragment.
fn path_value<S>(
    r: &Loaded<S>,
    p: &Spanned<String>,
    diags: &mut Vec<Diagnostic>,
) -> Option<String> {
    let v = &p.value;
    let ok = v.starts_with('/')
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#\\".contains(&b));
    if !ok {
        diags.push(Diagnostic::at(
            &r.at(p),
            format!("path `{v}` must start with '/' and have no query, fragment, spaces or '\\'"),
        ));
        return None;
    }
    Some(v.clone())
}

fn path_modifier<S>(
    r: &Loaded<S>,
    matches: &[Spanned<crate::model::MatchSpec>],
    p: &Spanned<PathModifierSpec>,
    diags: &mut Vec<Diagnostic>,
) -> Option<PathModifier> {
    let spec = &p.value;
    match spec.kind.value.as_str() {
        "ReplaceFullPath" => {
            if let Some(x) = &spec.replace_prefix_match {
                diags.push(Diagnostic::at(
                    &r.at(x),
                    "replacePrefixMatch goes with type ReplacePrefixMatch",
                ));
            }
            let Some(full) = &spec.replace_full_path else {
                diags.push(Diagnostic::at(
                    &r.at(&spec.kind),
                    "type ReplaceFullPath needs `replaceFullPath`",
                ));
                return None;
            };
            path_value(r, full, diags).map(PathModifier::Full)
        }
        "ReplacePrefixMatch" => {
            if let Some(x) = &spec.replace_full_path {
                diags.push(Diagnostic::at(
                    &r.at(x),
                    "replaceFullPath goes with type ReplaceFullPath",
                ));
            }
            let Some(with) = &spec.replace_prefix_match else {
                diags.push(Diagnostic::at(
                    &r.at(&spec.kind),
                    "type ReplacePrefixMatch needs `replacePrefixMatch`",
                ));
                return None;
            };
            // Gateway API: the prefix replaced is the rule's one PathPrefix match.
            let prefix = match matches {
                [] => Some("/".to_string()),
                [m] => match &m.value.path {
                    Some(path)
                        if path.kind.as_ref().map(|k| k.value) != Some(PathMatchType::Exact) =>
                    {
                        path.value.as_ref().map(|v| v.value.clone())
                    }
                    _ => None,
                },
                _ => None,
            };
            let Some(prefix) = prefix else {
                diags.push(Diagnostic::at(
                    &r.at(&spec.kind),
                    "ReplacePrefixMatch needs a rule with exactly one match, a PathPrefix path",
                ));
                return None;
            };
            // An empty replacement removes the prefix.
            let with = if with.value.is_empty() {
                String::new()
            } else {
                path_value(r, with, diags)?
            };
            Some(PathModifier::Prefix { prefix, with })
        }
        other => {
            diags.push(Diagnostic::at(
                &r.at(&spec.kind),
                format!(
                    "unknown path modifier `{other}`; use ReplaceFullPath or ReplacePrefixMatch"
                ),
            ));
            None
        }
    }
}

fn redirect<S>(
    r: &Loaded<S>,
    matches: &[Spanned<crate::model::MatchSpec>],
    rd: &Spanned<crate::model::RedirectSpec>,
    diags: &mut Vec<Diagnostic>,
) -> Redirect {
    let spec = &rd.value;
    let scheme = spec.scheme.as_ref().and_then(|s| {
        if s.value == "http" || s.value == "https" {
            Some(s.value.clone())
        } else {
            diags.push(Diagnostic::at(
                &r.at(s),
                format!("scheme must be `http` or `https`, not `{}`", s.value),
            ));
            None
        }
    });
    let status = match &spec.status_code {
        None => 302,
        Some(c) if REDIRECT_CODES.contains(&c.value) => c.value,
        Some(c) => {
            diags.push(Diagnostic::at(
                &r.at(c),
                format!(
                    "statusCode {} is not a redirect; use 301, 302, 303, 307 or 308",
                    c.value
                ),
            ));
            302
        }
    };
    let port = spec.port.as_ref().and_then(|p| {
        if p.value == 0 {
            diags.push(Diagnostic::at(&r.at(p), "port must be 1-65535"));
            None
        } else {
            Some(p.value)
        }
    });
    Redirect {
        scheme,
        hostname: spec.hostname.as_ref().and_then(|h| hostname(r, h, diags)),
        path: spec
            .path
            .as_ref()
            .and_then(|p| path_modifier(r, matches, p, diags)),
        port,
        status,
    }
}

fn mirror<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    m: &Spanned<crate::model::MirrorSpec>,
    backend: &mut dyn FnMut(&Loaded<ServiceSpec>) -> usize,
    diags: &mut Vec<Diagnostic>,
) -> Option<Mirror> {
    let spec = &m.value;
    let b = &spec.backend_ref;
    crate::validate::check_service_kind(r, b.group.as_ref(), b.kind.as_ref(), diags);
    let share = match (&spec.percent, &spec.fraction) {
        (Some(_), Some(f)) => {
            diags.push(Diagnostic::at(
                &r.at(f),
                "a RequestMirror takes `percent` or `fraction`, not both",
            ));
            None
        }
        (Some(p), None) if p.value > 100 => {
            diags.push(Diagnostic::at(&r.at(p), "percent must be 0-100"));
            None
        }
        (Some(p), None) => Some((p.value, 100)),
        (None, Some(f)) => {
            let den = f.value.denominator.as_ref().map_or(100, |d| d.value);
            if den == 0 || f.value.numerator.value > den {
                diags.push(Diagnostic::at(
                    &r.at(&f.value.numerator),
                    "fraction needs 0 <= numerator <= denominator and a denominator of at least 1",
                ));
                None
            } else {
                Some((f.value.numerator.value, den))
            }
        }
        (None, None) => Some((1, 1)),
    };
    let ns = b
        .namespace
        .as_ref()
        .map_or(r.namespace.as_str(), |n| n.value.as_str());
    let Some(svc) = set.service(ns, &b.name.value) else {
        diags.push(Diagnostic::at(
            &r.at(&b.name),
            format!(
                "the mirror's backendRef names Service `{ns}/{}`, which does not exist",
                b.name.value
            ),
        ));
        return None;
    };
    if let Some(port) = &b.port {
        if !svc.spec.ports.iter().any(|sp| sp.port.value == port.value) {
            diags.push(Diagnostic::at(
                &r.at(port),
                format!("Service `{}` has no port {}", svc.key(), port.value),
            ));
        }
    }
    if svc.spec.ports.first().map(|p| p.protocol.value) == Some(Protocol::Tcp) {
        diags.push(Diagnostic::at(
            &r.at(&b.name),
            format!(
                "Service `{}` is tcp; requests can only be mirrored to an HTTP service",
                svc.key()
            ),
        ));
        return None;
    }
    let (numerator, denominator) = share?;
    Some(Mirror {
        backend: backend(svc),
        numerator,
        denominator,
    })
}

fn fault_ref<S>(
    set: &ResourceSet,
    r: &Loaded<S>,
    e: &Spanned<crate::model::ExtensionRefSpec>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Fault> {
    let e = &e.value;
    if e.group.value != "tandem.dev" || e.kind.value != "FaultInjection" {
        diags.push(Diagnostic::at(
            &r.at(&e.kind),
            format!(
                "extensionRef `{}/{}` is not supported; the one extension is group `tandem.dev`, kind `FaultInjection`",
                e.group.value, e.kind.value
            ),
        ));
        return None;
    }
    let Some(fi) = set
        .fault_injections
        .iter()
        .find(|f| f.namespace == r.namespace && f.name == e.name.value)
    else {
        diags.push(Diagnostic::at(
            &r.at(&e.name),
            format!(
                "FaultInjection `{}/{}` does not exist",
                r.namespace, e.name.value
            ),
        ));
        return None;
    };
    // Its own problems are reported once, where it is defined.
    let mut own = Vec::new();
    let f = fault(fi, &mut own);
    own.is_empty().then_some(f)
}

/// Checks one FaultInjection and compiles it.
pub fn fault(fi: &Loaded<FaultInjectionSpec>, diags: &mut Vec<Diagnostic>) -> Fault {
    let spec = &fi.spec;
    let percent = |p: &Option<Spanned<f64>>, diags: &mut Vec<Diagnostic>| match p {
        None => 100.0,
        Some(p) if p.value.is_finite() && (0.0..=100.0).contains(&p.value) => p.value,
        Some(p) => {
            diags.push(Diagnostic::at(&fi.at(p), "percent must be 0-100"));
            0.0
        }
    };
    if spec.delay.is_none() && spec.abort.is_none() {
        diags.push(Diagnostic::at(
            &fi.pos,
            "a FaultInjection needs a `delay`, an `abort` or both",
        ));
    }
    let delay = spec.delay.as_ref().map(|d| {
        let ms = match crate::policy::parse_duration_ms(&d.value.duration.value) {
            Ok(ms) => ms,
            Err(e) => {
                diags.push(Diagnostic::at(&fi.at(&d.value.duration), e));
                0
            }
        };
        FaultDelay {
            ms,
            percent: percent(&d.value.percent, diags),
        }
    });
    let abort = spec.abort.as_ref().map(|a| {
        let a_pos = fi.at(a);
        let a = &a.value;
        let http_status = a.http_status.as_ref().and_then(|s| {
            if (400..=599).contains(&s.value) {
                Some(s.value)
            } else {
                diags.push(Diagnostic::at(&fi.at(s), "httpStatus must be 400-599"));
                None
            }
        });
        let grpc_status = a.grpc_status.as_ref().and_then(|s| {
            let code = grpc_code(&s.value);
            if code.is_none() {
                diags.push(Diagnostic::at(
                    &fi.at(s),
                    format!("`{}` is not a gRPC error status; use a code 1-16 or a name such as UNAVAILABLE", s.value),
                ));
            }
            code
        });
        match (&a.http_status, &a.grpc_status) {
            (Some(_), Some(_)) => diags.push(Diagnostic::at(
                &a_pos,
                "an abort takes `httpStatus` or `grpcStatus`, not both",
            )),
            (None, None) => diags.push(Diagnostic::at(
                &a_pos,
                "an abort needs `httpStatus` or `grpcStatus`",
            )),
            _ => {}
        }
        FaultAbort {
            http_status,
            grpc_status,
            percent: percent(&a.percent, diags),
        }
    });
    let mut headers = Vec::new();
    for h in spec.when.iter().flat_map(|m| &m.headers) {
        if !crate::policy::http_header_name(&h.name.value) || !header_value(&h.value) {
            diags.push(Diagnostic::at(
                &fi.at(&h.name),
                format!(
                    "`{}: {}` is not a valid header match",
                    h.name.value, h.value
                ),
            ));
            continue;
        }
        headers.push(NameValue {
            name: h.name.value.to_ascii_lowercase(),
            value: h.value.clone(),
        });
    }
    Fault {
        source: fi.key(),
        headers,
        delay,
        abort,
    }
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC error status by code (`14`) or name (`UNAVAILABLE`,
/// `unavailable`, `deadline-exceeded`); `OK` is not an error.
pub(crate) fn grpc_code(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=16).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase().replace('-', "_");
    GRPC_CODES
        .iter()
        .position(|c| *c == upper)
        .filter(|&i| i > 0)
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_by_number_and_name() {
        assert_eq!(grpc_code("14"), Some(14));
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("deadline-exceeded"), Some(4));
        assert_eq!(grpc_code("unauthenticated"), Some(16));
        assert_eq!(grpc_code("0"), None);
        assert_eq!(grpc_code("OK"), None);
        assert_eq!(grpc_code("17"), None);
        assert_eq!(grpc_code("broken"), None);
    }
}
