//! Access policy: `AuthorizationPolicy` and the mesh-wide default, checked
//! and compiled into the [`Authz`] of a service's inbound snapshot, and the
//! one decision function that the sidecar and `tandem authz` share.
//!
//! Evaluation, for one request to a service (docs/access-policy.md):
//! 1. a matching `deny` policy denies;
//! 2. a matching `audit` policy is reported (logged, counted) and the
//!    evaluation goes on;
//! 3. if any `allow` policy targets the service (and port), the request
//!    must match one of them, else it is denied;
//! 4. otherwise the mesh default decides: `allow-authenticated` lets any
//!    caller with a verified identity in (and, on a service in permissive
//!    mTLS mode, plaintext callers too); `deny` lets nobody in.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::compile::resolve_name;
use crate::diag::Diagnostic;
use crate::model::{
    AuthorizationPolicySpec, AuthzFromSpec, AuthzToSpec, Loaded, MtlsMode, Protocol, ResourceSet,
};

/// The access policy of one service, as its sidecars enforce it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Authz {
    #[serde(default)]
    pub default: AuthzDefault,
    /// Plaintext callers are served (permissive mTLS mode): the default
    /// `allow-authenticated` lets them in.
    #[serde(default)]
    pub permissive: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AuthzPolicy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthzDefault {
    #[default]
    AllowAuthenticated,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

impl AuthzAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "allow",
            AuthzAction::Deny => "deny",
            AuthzAction::Audit => "audit",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzPolicy {
    /// `namespace/name` of the AuthorizationPolicy.
    pub name: String,
    pub action: AuthzAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Targeted at an HTTPRoute: the policy applies only to requests that
    /// route's matches select.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<AuthzRoute>,
    pub rules: Vec<AuthzRule>,
}

/// The requests an HTTPRoute selects, for a policy that targets it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzRoute {
    /// `namespace/name` of the HTTPRoute.
    pub name: String,
    /// Its rules' matches, any one of which selects a request (a rule
    /// without matches selects every request).
    pub matches: Vec<crate::snapshot::Matcher>,
}

impl AuthzPolicy {
    /// Whether the policy applies to this request at all (its port, its
    /// route).
    fn applies(&self, req: &AuthzRequest<'_>) -> bool {
        self.port.is_none_or(|port| port == req.port)
            && self.route.as_ref().is_none_or(|r| r.selects(req))
    }

    /// Applies to only part of the service's requests.
    pub fn is_scoped(&self) -> bool {
        self.port.is_some() || self.route.is_some()
    }

    /// `" (port 8080, route default/admin)"`, or nothing.
    pub fn scope(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.port {
            parts.push(format!("port {p}"));
        }
        if let Some(r) = &self.route {
            parts.push(format!("route {}", r.name));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

impl AuthzRoute {
    /// Gateway API matching, with what the access policy adds: methods and
    /// paths compared without regard to ASCII case (as path rules are),
    /// so that a route-scoped deny holds for every spelling a server may
    /// take for the same resource.
    fn selects(&self, req: &AuthzRequest<'_>) -> bool {
        use crate::model::PathMatchType;
        self.matches.is_empty()
            || self.matches.iter().any(|m| {
                m.method
                    .as_ref()
                    .is_none_or(|x| x.eq_ignore_ascii_case(req.method))
                    && m.path.as_ref().is_none_or(|p| match p.kind {
                        PathMatchType::Exact => p.value.eq_ignore_ascii_case(req.path),
                        PathMatchType::PathPrefix => prefix_matches(&p.value, req.path),
                    })
                    && m.headers
                        .iter()
                        .all(|h| (req.header)(&h.name).iter().any(|v| *v == h.value))
                    && m.query.iter().all(|q| {
                        req.query.split('&').any(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                            k == q.name && v == q.value
                        })
                    })
            })
    }
}

/// Gateway API prefix matching by path element (`/foo` matches `/foo`,
/// `/foo/`, `/foo/bar`, not `/foobar`), ASCII case aside.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => {
            let rest = &path[prefix.len()..];
            rest.is_empty() || rest.starts_with('/')
        }
        _ => false,
    }
}

/// Empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// Callers. Services are `namespace/name`; identities are SPIFFE IDs, a
/// trailing `*` matching any suffix. Empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_identities: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// A request header (lower-case name) with one of `values` and none of
/// `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzCondition {
    pub header: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The verified caller of a request.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// `spiffe://td/ns/NS/svc/NAME`
    pub id: &'a str,
    pub namespace: &'a str,
    pub service: &'a str,
}

/// What a decision looks at. For an opaque TCP connection `method` and
/// `path` are empty and no header is present.
pub struct AuthzRequest<'a> {
    pub caller: Option<Caller<'a>>,
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    /// The query string, without `?` (empty when none).
    pub query: &'a str,
    /// The values of a request header (lower-case name); for `host`, the
    /// Host header or, in HTTP/2, the `:authority`.
    pub header: &'a dyn Fn(&str) -> Vec<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// What decided, for logs, metrics and `tandem authz check`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecidedBy<'a> {
    /// A rule of a policy: the policy, the index of the rule.
    Rule(&'a AuthzPolicy, usize),
    /// Allow policies target the service and none matched.
    NoAllowMatched,
    /// The mesh default.
    Default(AuthzDefault),
}

impl DecidedBy<'_> {
    /// What decided, in words: `default/web (allow), rule 0: from
    /// services [...]`, `allow policies target the service and none
    /// matched`, `the mesh default (allow-authenticated)`. `permissive`:
    /// the service takes plaintext too.
    pub fn describe(&self, permissive: bool) -> String {
        match self {
            DecidedBy::Rule(p, i) => format!(
                "{}{} ({}), rule {i}: {}",
                p.name,
                p.scope(),
                p.action.as_str(),
                p.rules[*i]
            ),
            DecidedBy::NoAllowMatched => {
                "allow policies target the service and none matched".to_string()
            }
            DecidedBy::Default(AuthzDefault::AllowAuthenticated) if permissive => {
                "the mesh default (allow-authenticated; the service is permissive, so plaintext too)"
                    .to_string()
            }
            DecidedBy::Default(AuthzDefault::AllowAuthenticated) => {
                "the mesh default (allow-authenticated)".to_string()
            }
            DecidedBy::Default(AuthzDefault::Deny) => "the mesh default (deny)".to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision<'a> {
    pub verdict: Verdict,
    pub by: DecidedBy<'a>,
    /// Audit policies that matched (policy, rule): what they would deny.
    pub audited: Vec<(&'a AuthzPolicy, usize)>,
}

impl Authz {
    /// Whether the access policy lets every request in (the default with
    /// no policy, for a caller that has an identity): lets the sidecar
    /// skip the evaluation.
    pub fn is_open(&self) -> bool {
        self.policies.is_empty() && self.default == AuthzDefault::AllowAuthenticated
    }

    pub fn decide<'a>(&'a self, req: &AuthzRequest<'_>) -> Decision<'a> {
        let applies = |p: &&'a AuthzPolicy| p.applies(req);
        let first_match = |p: &'a AuthzPolicy| p.rules.iter().position(|r| r.matches(req));
        let mut audited = Vec::new();
        for p in self.policies.iter().filter(applies) {
            match p.action {
                AuthzAction::Deny => {
                    if let Some(i) = first_match(p) {
                        return Decision {
                            verdict: Verdict::Deny,
                            by: DecidedBy::Rule(p, i),
                            audited,
                        };
                    }
                }
                AuthzAction::Audit => {
                    if let Some(i) = first_match(p) {
                        audited.push((p, i));
                    }
                }
                AuthzAction::Allow => {}
            }
        }
        let mut any_allow = false;
        for p in self
            .policies
            .iter()
            .filter(applies)
            .filter(|p| p.action == AuthzAction::Allow)
        {
            any_allow = true;
            if let Some(i) = first_match(p) {
                return Decision {
                    verdict: Verdict::Allow,
                    by: DecidedBy::Rule(p, i),
                    audited,
                };
            }
        }
        if any_allow {
            return Decision {
                verdict: Verdict::Deny,
                by: DecidedBy::NoAllowMatched,
                audited,
            };
        }
        let verdict = match self.default {
            AuthzDefault::AllowAuthenticated if req.caller.is_some() || self.permissive => {
                Verdict::Allow
            }
            _ => Verdict::Deny,
        };
        Decision {
            verdict,
            by: DecidedBy::Default(self.default),
            audited,
        }
    }
}

/// What identity alone decides for one caller of a service: the
/// compliance view of `tandem authz list`. Paths, methods, ports and
/// headers may narrow it further; the rules listed say how.
#[derive(Debug)]
pub struct Reach<'a> {
    /// `None`: no request of this caller gets in. `Some(rules)`: requests
    /// that one of these allow rules matches get in (an empty list: any
    /// request, by the mesh default).
    pub allowed_by: Option<Vec<(&'a AuthzPolicy, usize)>>,
    /// Deny rules that may apply to this caller.
    pub denied_by: Vec<(&'a AuthzPolicy, usize)>,
    /// Allow policies on one port or route: within that scope only their
    /// rules let requests in; the indices of those that name this caller.
    pub scoped: Vec<(&'a AuthzPolicy, Vec<usize>)>,
}

impl Authz {
    pub fn reach(&self, caller: Option<Caller<'_>>) -> Reach<'_> {
        let names = |r: &AuthzRule| r.from.is_empty() || r.from.iter().any(|f| f.matches(caller));
        let rules = |action: AuthzAction| -> Vec<(&AuthzPolicy, usize)> {
            self.policies
                .iter()
                .filter(|p| p.action == action)
                .flat_map(|p| {
                    p.rules
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| names(r))
                        .map(move |(i, _)| (p, i))
                })
                .collect()
        };
        let denied_by = rules(AuthzAction::Deny);
        // A deny rule with nothing but identities denies every request.
        let all_denied = denied_by.iter().any(|(p, i)| {
            let r = &p.rules[*i];
            r.to.is_empty() && r.when.is_empty() && !p.is_scoped()
        });
        // Allow policies on one port or route leave the other requests to
        // the rest; only an unscoped one makes every unmatched request a
        // denial.
        let any_allow = self
            .policies
            .iter()
            .any(|p| p.action == AuthzAction::Allow && !p.is_scoped());
        let allowed_by = if all_denied {
            None
        } else if any_allow {
            Some(rules(AuthzAction::Allow))
                .map(|r| {
                    r.into_iter()
                        .filter(|(p, _)| !p.is_scoped())
                        .collect::<Vec<_>>()
                })
                .filter(|r| !r.is_empty())
        } else {
            let by_default = match self.default {
                AuthzDefault::AllowAuthenticated => caller.is_some() || self.permissive,
                AuthzDefault::Deny => false,
            };
            by_default.then(Vec::new)
        };
        // Each scoped allow policy: the rules of it that name this caller
        // (none: no request of its scope gets in).
        let mut scoped = Vec::new();
        for p in self
            .policies
            .iter()
            .filter(|p| p.action == AuthzAction::Allow && p.is_scoped())
        {
            let named: Vec<usize> = p
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| names(r))
                .map(|(i, _)| i)
                .collect();
            scoped.push((p, named));
        }
        Reach {
            allowed_by,
            denied_by,
            scoped,
        }
    }
}

impl std::fmt::Display for AuthzRule {
    /// `from services [a, b] to paths [/x] methods [GET] when x-env in [prod]`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn list<T: std::fmt::Display>(
            f: &mut std::fmt::Formatter<'_>,
            name: &str,
            v: &[T],
        ) -> std::fmt::Result {
            if v.is_empty() {
                return Ok(());
            }
            write!(f, " {name} [")?;
            for (i, x) in v.iter().enumerate() {
                write!(f, "{}{x}", if i > 0 { ", " } else { "" })?;
            }
            write!(f, "]")
        }
        let mut any = false;
        for (i, s) in self.from.iter().enumerate() {
            write!(f, "{}", if i == 0 { "from" } else { " or" })?;
            list(f, "services", &s.services)?;
            list(f, "notServices", &s.not_services)?;
            list(f, "namespaces", &s.namespaces)?;
            list(f, "notNamespaces", &s.not_namespaces)?;
            list(f, "identities", &s.identities)?;
            list(f, "notIdentities", &s.not_identities)?;
            any = true;
        }
        for (i, o) in self.to.iter().enumerate() {
            let sep = if any && i == 0 { " " } else { "" };
            write!(f, "{sep}{}", if i == 0 { "to" } else { " or" })?;
            list(f, "paths", &o.paths)?;
            list(f, "notPaths", &o.not_paths)?;
            list(f, "methods", &o.methods)?;
            list(f, "notMethods", &o.not_methods)?;
            list(f, "ports", &o.ports)?;
            list(f, "notPorts", &o.not_ports)?;
            any = true;
        }
        for w in &self.when {
            write!(f, "{}when {}", if any { " " } else { "" }, w.header)?;
            list(f, "in", &w.values)?;
            list(f, "not in", &w.not_values)?;
            any = true;
        }
        if !any {
            write!(f, "every request")?;
        }
        Ok(())
    }
}

impl AuthzRule {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(req.caller)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(req)))
            && self.when.iter().all(|w| w.matches(req))
    }
}

impl AuthzSource {
    fn matches(&self, caller: Option<Caller<'_>>) -> bool {
        // Every field names identities: a caller without one matches none.
        let Some(c) = caller else {
            return false;
        };
        let service = |s: &String| {
            s.split_once('/')
                .is_some_and(|(ns, name)| ns == c.namespace && name == c.service)
        };
        let namespace = |n: &String| n == c.namespace;
        let identity = |i: &String| match i.strip_suffix('*') {
            Some(prefix) => c.id.starts_with(prefix),
            None => i == c.id,
        };
        one_of(&self.services, service)
            && none_of(&self.not_services, service)
            && one_of(&self.namespaces, namespace)
            && none_of(&self.not_namespaces, namespace)
            && one_of(&self.identities, identity)
            && none_of(&self.not_identities, identity)
    }
}

impl AuthzOperation {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let path = |p: &String| path_matches(p, req.path);
        // Methods are case-sensitive in HTTP, but servers differ in
        // whether `post` is `POST`: a rule holds for both readings.
        let method = |m: &String| m.eq_ignore_ascii_case(req.method);
        let port = |p: &u16| *p == req.port;
        one_of(&self.paths, path)
            && none_of(&self.not_paths, path)
            && one_of(&self.methods, method)
            && none_of(&self.not_methods, method)
            && one_of(&self.ports, port)
            && none_of(&self.not_ports, port)
    }
}

impl AuthzCondition {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let got = (req.header)(&self.header);
        let host = self.header == "host";
        // A host is a name: compared without port, trailing dot or case
        // (the configured values were normalized the same way).
        let same = |v: &str, s: &String| {
            if host {
                host_name(v).eq_ignore_ascii_case(s)
            } else {
                v == s
            }
        };
        let listed = |set: &Vec<String>| got.iter().any(|v| set.iter().any(|s| same(v, s)));
        (self.values.is_empty() || listed(&self.values))
            && (self.not_values.is_empty() || !listed(&self.not_values))
    }
}

/// The name of a `host[:port]` (an IPv6 literal keeps its brackets),
/// without a trailing dot.
pub fn host_name(host: &str) -> &str {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name)
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// An empty list matches everything.
fn one_of<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

fn none_of<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(f)
}

/// `/exact`; `/prefix/*`: the prefix itself and everything under it; else a
/// glob where `*` matches within one segment and `**` across segments.
///
/// Letters are compared without regard to ASCII case: servers differ in
/// whether `/Admin` is `/admin`, and a rule must hold for both readings.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("/*") {
        if !prefix.contains('*') {
            let (p, rest) = (prefix.as_bytes(), path.as_bytes());
            return rest.len() >= p.len()
                && rest[..p.len()].eq_ignore_ascii_case(p)
                && (rest.len() == p.len() || rest[p.len()] == b'/');
        }
    }
    if !pattern.contains('*') {
        return pattern.eq_ignore_ascii_case(path);
    }
    glob(pattern.as_bytes(), path.as_bytes())
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = &p[2..];
            (0..=s.len()).any(|i| glob(rest, &s[i..]))
        }
        Some(b'*') => {
            let rest = &p[1..];
            let seg = s.iter().position(|&b| b == b'/').unwrap_or(s.len());
            (0..=seg).any(|i| glob(rest, &s[i..]))
        }
        Some(&c) => s.first().is_some_and(|x| x.eq_ignore_ascii_case(&c)) && glob(&p[1..], &s[1..]),
    }
}

// ---- Paths -------------------------------------------------------------------------

/// Why a request path is refused (400) rather than normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    BadEncoding,
    /// `%2F`: servers disagree on whether it separates segments.
    EncodedSlash,
    /// `\` or `%5C`: some servers read it as `/`.
    Backslash,
    /// `%00`
    Nul,
    /// `;` (path parameters, which some servers strip before routing).
    Parameters,
    /// `#`, which has no place in a request.
    Fragment,
}

impl PathError {
    pub fn describe(self) -> &'static str {
        match self {
            PathError::BadEncoding => "a `%` not followed by two hex digits",
            PathError::EncodedSlash => "an encoded `/` (%2F)",
            PathError::Backslash => "a backslash (`\\` or %5C)",
            PathError::Nul => "an encoded NUL (%00)",
            PathError::Parameters => "a `;` (path parameters are not accepted)",
            PathError::Fragment => "a `#` fragment",
        }
    }
}

/// The path a rule matches and the app receives: percent-encoded
/// unreserved characters decoded (other encodings upper-cased), `.` and
/// `..` segments resolved, runs of `/` merged. Paths a server could read
/// two ways are refused instead: encoded `/`, backslashes, encoded NUL,
/// `;` parameters, fragments. A path that does not start with `/`
/// (`OPTIONS *`) is left as it is. Nothing is allocated when the path is
/// already normal.
pub fn normalize_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    use std::borrow::Cow;
    let b = path.as_bytes();
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let mut plain = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'#' => return Err(PathError::Fragment),
            b';' => return Err(PathError::Parameters),
            b'\\' => return Err(PathError::Backslash),
            b'%' => plain = false,
            b'/' if b.get(i + 1) == Some(&b'/') => plain = false,
            b'.' if b[i - 1] == b'/'
                && matches!(
                    b.get(i + 1..),
                    Some([] | [b'/', ..] | [b'.'] | [b'.', b'/', ..])
                ) =>
            {
                plain = false
            }
            _ => {}
        }
    }
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    // Decode what may be decoded.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let v = (h * 16 + l) as u8;
        match v {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => decoded.push(c as char),
            c => {
                decoded.push('%');
                decoded.push_str(&format!("{c:02X}"));
            }
        }
        i += 3;
    }
    // Resolve dot segments and merge slashes.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for seg in &out {
        norm.push('/');
        norm.push_str(seg);
    }
    if trailing || out.is_empty() {
        norm.push('/');
    }
    Ok(Cow::Owned(norm))
}

// ---- Checking and compiling ----------------------------------------------------

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Checks every AuthorizationPolicy and the Mesh resource.
pub(crate) fn validate(set: &ResourceSet, diags: &mut Vec<Diagnostic>) {
    if let Some(extra) = set.meshes.get(1) {
        let first = &set.meshes[0];
        diags.push(Diagnostic::at(
            &extra.pos,
            format!(
                "a second Mesh resource (the first is at {}:{}); the mesh has one",
                first.file.display(),
                first.pos.line
            ),
        ));
    }
    for m in &set.meshes {
        mesh_default(m, diags);
    }
    for p in &set.authorization_policies {
        compile_policy(set, p, diags);
    }
}

fn mesh_default(m: &Loaded<crate::model::MeshSpec>, diags: &mut Vec<Diagnostic>) -> AuthzDefault {
    match m
        .spec
        .authorization
        .as_ref()
        .and_then(|a| a.default.as_ref())
    {
        None => AuthzDefault::AllowAuthenticated,
        Some(d) if d.value == "allow-authenticated" => AuthzDefault::AllowAuthenticated,
        Some(d) if d.value == "deny" => AuthzDefault::Deny,
        Some(d) => {
            diags.push(Diagnostic::at(
                &m.at(d),
                format!(
                    "default must be `allow-authenticated` or `deny`, not `{}`",
                    d.value
                ),
            ));
            AuthzDefault::AllowAuthenticated
        }
    }
}

/// The access policy of the service `namespace/name`.
pub fn compile(set: &ResourceSet, namespace: &str, name: &str) -> Authz {
    let mut ignored = Vec::new();
    let default = set
        .meshes
        .first()
        .map(|m| mesh_default(m, &mut ignored))
        .unwrap_or_default();
    let permissive = set
        .service(namespace, name)
        .and_then(|s| s.spec.mtls.as_ref())
        .is_some_and(|m| m.value == MtlsMode::Permissive);
    let policies = set
        .authorization_policies
        .iter()
        .filter(|p| target(set, p) == (namespace, name))
        .map(|p| compile_policy(set, p, &mut ignored))
        .collect();
    Authz {
        default,
        permissive,
        policies,
    }
}

/// The Service a policy applies to: its target, or the parent of the
/// HTTPRoute it targets.
fn target<'a>(set: &'a ResourceSet, p: &'a Loaded<AuthorizationPolicySpec>) -> (&'a str, &'a str) {
    let (ns, name) = p.spec.target_ref.resolve(&p.namespace);
    if p.spec.target_ref.kind.value != "HTTPRoute" {
        return (ns, name);
    }
    set.http_routes
        .iter()
        .find(|r| r.namespace == ns && r.name == name)
        .and_then(|r| r.spec.parent_refs.first().map(|pr| (r, pr)))
        .map_or(("", ""), |(r, pr)| {
            let pns = pr
                .namespace
                .as_ref()
                .map_or(r.namespace.as_str(), |n| n.value.as_str());
            (pns, pr.name.value.as_str())
        })
}

/// The requests of the HTTPRoute a policy targets: of its rules, or of the
/// one rule `section` names. `None`: no such route (or rule).
fn route_scope(
    set: &ResourceSet,
    ns: &str,
    name: &str,
    section: Option<&str>,
) -> Option<AuthzRoute> {
    let r = set
        .http_routes
        .iter()
        .find(|r| r.namespace == ns && r.name == name)?;
    let rules: Vec<_> = r
        .spec
        .rules
        .iter()
        .filter(|rule| section.is_none_or(|sn| rule.value.name.as_deref() == Some(sn)))
        .collect();
    if rules.is_empty() && section.is_some() {
        return None;
    }
    let mut matches = Vec::new();
    for rule in rules {
        if rule.value.matches.is_empty() {
            // A rule without matches selects every request.
            matches.clear();
            break;
        }
        matches.extend(
            rule.value
                .matches
                .iter()
                .map(|m| crate::compile::matcher(&m.value)),
        );
    }
    Some(AuthzRoute {
        name: match section {
            Some(sn) => format!("{ns}/{name} rule {sn}"),
            None => format!("{ns}/{name}"),
        },
        matches,
    })
}

/// One policy, checked against the set (unknown services, L7 fields on a
/// TCP service, contradictions) and compiled.
fn compile_policy(
    set: &ResourceSet,
    p: &Loaded<AuthorizationPolicySpec>,
    diags: &mut Vec<Diagnostic>,
) -> AuthzPolicy {
    let spec = &p.spec;
    let t = &spec.target_ref;
    let on_route = t.kind.value == "HTTPRoute";
    let route = match t.kind.value.as_str() {
        "HTTPRoute" => {
            crate::policy::check_target_group(
                p,
                t,
                "gateway.networking.k8s.io",
                "HTTPRoute",
                diags,
            );
            let (rns, rname) = t.resolve(&p.namespace);
            let section = t.section_name.as_ref().map(|s| s.value.as_str());
            let scope = route_scope(set, rns, rname, section);
            if scope.is_none() {
                let (at, what) = match (&t.section_name, route_scope(set, rns, rname, None)) {
                    (Some(sn), Some(_)) => (
                        p.at(sn),
                        format!("HTTPRoute `{rns}/{rname}` has no rule named `{}`", sn.value),
                    ),
                    _ => (
                        p.at(&t.name),
                        format!("no HTTPRoute `{rns}/{rname}` to apply this policy to"),
                    ),
                };
                diags.push(Diagnostic::at(&at, what));
            }
            scope
        }
        "Service" | "ExternalService" => {
            crate::policy::check_target_kind(p, t, "an AuthorizationPolicy", diags);
            None
        }
        other => {
            diags.push(Diagnostic::at(
                &p.at(&t.kind),
                format!("targetRef kind `{other}` is not supported; an AuthorizationPolicy targets a Service or an HTTPRoute"),
            ));
            None
        }
    };
    let (ns, name) = target(set, p);
    let service = set.service(ns, name);
    let external = (t.kind.value == "ExternalService")
        .then(|| set.external_service(ns, name))
        .flatten();
    if t.kind.value == "ExternalService" {
        if external.is_none() {
            diags.push(Diagnostic::at(
                &p.at(&t.name),
                format!("no ExternalService `{ns}/{name}` to apply this policy to"),
            ));
        }
    } else if service.is_none() && !(on_route && route.is_none()) {
        diags.push(Diagnostic::at(
            &p.at(&t.name),
            format!("no Service `{ns}/{name}` to apply this policy to"),
        ));
    }
    let service = if external.is_some() { None } else { service };
    // A tunnel to an external host shows only who calls and the port.
    let tcp = service.is_some_and(|s| {
        s.spec
            .ports
            .first()
            .is_some_and(|port| port.protocol.value == Protocol::Tcp)
    }) || external.is_some_and(|e| {
        !e.spec
            .ports
            .iter()
            .any(|port| port.protocol.value == crate::model::ExternalProtocol::Http)
    });
    if let (Some(port), Some(e)) = (&spec.port, external) {
        if !e.spec.ports.iter().any(|ep| ep.port.value == port.value) {
            diags.push(Diagnostic::at(
                &p.at(port),
                format!("ExternalService `{ns}/{name}` has no port {}", port.value),
            ));
        }
    }
    if let (Some(port), Some(s)) = (&spec.port, service) {
        if !s.spec.ports.iter().any(|sp| sp.port.value == port.value) {
            diags.push(Diagnostic::at(
                &p.at(port),
                format!("Service `{ns}/{name}` has no port {}", port.value),
            ));
        }
    }
    let action = match &spec.action {
        None => AuthzAction::Allow,
        Some(a) => match a.value.as_str() {
            "allow" => AuthzAction::Allow,
            "deny" => AuthzAction::Deny,
            "audit" => AuthzAction::Audit,
            other => {
                diags.push(Diagnostic::at(
                    &p.at(a),
                    format!("action must be `allow`, `deny` or `audit`, not `{other}`"),
                ));
                AuthzAction::Allow
            }
        },
    };
    let mut rules = Vec::new();
    match &spec.rules {
        Some(r) if !r.value.is_empty() => {
            for rule in &r.value {
                let from = rule
                    .from
                    .iter()
                    .flatten()
                    .map(|f| source(set, p, f, diags))
                    .collect();
                let to = rule
                    .to
                    .iter()
                    .flatten()
                    .map(|o| operation(p, o, tcp, diags))
                    .collect();
                let mut when = Vec::new();
                for w in rule.when.iter().flatten() {
                    if tcp {
                        diags.push(Diagnostic::at(
                            &p.at(&w.header),
                            "`when` looks at HTTP headers: a TCP service gets identity and port rules only",
                        ));
                    }
                    let header = w.header.value.to_ascii_lowercase();
                    if !crate::policy::http_header_name(&header) {
                        diags.push(Diagnostic::at(
                            &p.at(&w.header),
                            format!("`{}` is not a valid header name", w.header.value),
                        ));
                    }
                    let mut values = strings(&w.values);
                    let mut not_values = strings(&w.not_values);
                    if header == "host" {
                        for v in values.iter_mut().chain(not_values.iter_mut()) {
                            *v = host_name(v).to_ascii_lowercase();
                        }
                    }
                    contradiction(p, &w.values, &w.not_values, "values", diags);
                    if values.is_empty() && not_values.is_empty() {
                        diags.push(Diagnostic::at(
                            &p.at(&w.header),
                            "a condition needs `values` or `notValues`",
                        ));
                    }
                    when.push(AuthzCondition {
                        header,
                        values,
                        not_values,
                    });
                }
                rules.push(AuthzRule { from, to, when });
            }
        }
        Some(r) => diags.push(Diagnostic::at(
            &p.at(r),
            "no rules: a policy matches requests through its rules (`- {}` matches every request)",
        )),
        None => diags.push(Diagnostic::at(
            &p.pos,
            "missing `rules`: a policy matches requests through its rules (`rules: [{}]` matches every request)",
        )),
    }
    if route.is_some() && tcp {
        diags.push(Diagnostic::at(
            &p.at(&t.kind),
            "an HTTPRoute selects HTTP requests: a policy on a TCP service targets the Service",
        ));
    }
    AuthzPolicy {
        name: p.key(),
        action,
        port: spec.port.as_ref().map(|p| p.value),
        route,
        rules,
    }
}

fn strings(v: &Option<Vec<Spanned<String>>>) -> Vec<String> {
    v.iter().flatten().map(|s| s.value.clone()).collect()
}

/// A value both in a list and in its `not` form never matches anything.
fn contradiction(
    p: &Loaded<AuthorizationPolicySpec>,
    yes: &Option<Vec<Spanned<String>>>,
    no: &Option<Vec<Spanned<String>>>,
    field: &str,
    diags: &mut Vec<Diagnostic>,
) {
    for n in no.iter().flatten() {
        if yes.iter().flatten().any(|y| y.value == n.value) {
            diags.push(Diagnostic::at(
                &p.at(n),
                format!(
                    "`{}` is in both {field} and not{}{}: this entry can never match",
                    n.value,
                    field[..1].to_ascii_uppercase(),
                    &field[1..]
                ),
            ));
        }
    }
}

fn source(
    set: &ResourceSet,
    p: &Loaded<AuthorizationPolicySpec>,
    f: &AuthzFromSpec,
    diags: &mut Vec<Diagnostic>,
) -> AuthzSource {
    let services = |list: &Option<Vec<Spanned<String>>>, diags: &mut Vec<Diagnostic>| {
        let mut out = Vec::new();
        for s in list.iter().flatten() {
            let (ns, name) = resolve_name(&s.value, &p.namespace);
            if set.service(ns, name).is_none() {
                diags.push(Diagnostic::at(
                    &p.at(s),
                    format!("no Service `{ns}/{name}`"),
                ));
            }
            out.push(format!("{ns}/{name}"));
        }
        out
    };
    let identities = |list: &Option<Vec<Spanned<String>>>, diags: &mut Vec<Diagnostic>| {
        for i in list.iter().flatten() {
            let star = i.value.find('*');
            if !i.value.starts_with("spiffe://") || star.is_some_and(|at| at + 1 != i.value.len()) {
                diags.push(Diagnostic::at(
                    &p.at(i),
                    format!(
                        "`{}` is not a SPIFFE ID pattern: `spiffe://trust-domain/ns/NS/svc/NAME`, `*` only at the end",
                        i.value
                    ),
                ));
            }
        }
        strings(list)
    };
    contradiction(p, &f.services, &f.not_services, "services", diags);
    contradiction(p, &f.namespaces, &f.not_namespaces, "namespaces", diags);
    contradiction(p, &f.identities, &f.not_identities, "identities", diags);
    AuthzSource {
        services: services(&f.services, diags),
        not_services: services(&f.not_services, diags),
        namespaces: strings(&f.namespaces),
        not_namespaces: strings(&f.not_namespaces),
        identities: identities(&f.identities, diags),
        not_identities: identities(&f.not_identities, diags),
    }
}

fn operation(
    p: &Loaded<AuthorizationPolicySpec>,
    o: &AuthzToSpec,
    tcp: bool,
    diags: &mut Vec<Diagnostic>,
) -> AuthzOperation {
    for (list, field) in [
        (&o.paths, "paths"),
        (&o.not_paths, "notPaths"),
        (&o.methods, "methods"),
        (&o.not_methods, "notMethods"),
    ] {
        if let (true, Some(first)) = (tcp, list.iter().flatten().next()) {
            diags.push(Diagnostic::at(
                &p.at(first),
                format!(
                    "`{field}` is an HTTP field: a TCP service gets identity and port rules only"
                ),
            ));
        }
    }
    for path in o.paths.iter().chain(&o.not_paths).flatten() {
        let v = &path.value;
        let bad = !v.starts_with('/')
            || v.contains("***")
            || v.bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'?' || b == b'#');
        if bad {
            diags.push(Diagnostic::at(
                &p.at(path),
                format!("`{v}` is not a path pattern: start with `/`; `/prefix/*`, `*` within a segment, `**` across segments; no query or fragment"),
            ));
        }
    }
    for m in o.methods.iter().chain(&o.not_methods).flatten() {
        if !METHODS.contains(&m.value.as_str()) {
            diags.push(Diagnostic::at(
                &p.at(m),
                format!(
                    "`{}` is not a method; use one of {}",
                    m.value,
                    METHODS.join(", ")
                ),
            ));
        }
    }
    for port in o.ports.iter().chain(&o.not_ports).flatten() {
        if port.value == 0 {
            diags.push(Diagnostic::at(&p.at(port), "port 0 is not a port"));
        }
    }
    contradiction(p, &o.paths, &o.not_paths, "paths", diags);
    contradiction(p, &o.methods, &o.not_methods, "methods", diags);
    let ports = |l: &Option<Vec<Spanned<u16>>>| l.iter().flatten().map(|x| x.value).collect();
    let (yes, no): (Vec<u16>, Vec<u16>) = (ports(&o.ports), ports(&o.not_ports));
    for n in o.not_ports.iter().flatten() {
        if yes.contains(&n.value) {
            diags.push(Diagnostic::at(
                &p.at(n),
                format!(
                    "port {} is in both ports and notPorts: this entry can never match",
                    n.value
                ),
            ));
        }
    }
    AuthzOperation {
        paths: strings(&o.paths),
        not_paths: strings(&o.not_paths),
        methods: strings(&o.methods),
        not_methods: strings(&o.not_methods),
        ports: yes,
        not_ports: no,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml: &str) -> ResourceSet {
        let base = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 8080, protocol: http}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{name: http, port: 8080, protocol: http}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  ports: [{name: tcp, port: 5432, protocol: tcp}]\n---\n";
        crate::load_str("t.yaml", &format!("{base}{yaml}")).unwrap_or_else(|d| {
            panic!(
                "{}",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    fn errors(yaml: &str) -> Vec<String> {
        let base = "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  ports: [{name: http, port: 8080, protocol: http}]\n---\napiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  ports: [{name: tcp, port: 5432, protocol: tcp}]\n---\n";
        match crate::load_str("t.yaml", &format!("{base}{yaml}")) {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn policy(name: &str, target: &str, body: &str) -> String {
        format!("apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Service, name: {target}}}\n{body}---\n")
    }

    fn caller(svc: &'static str) -> Caller<'static> {
        let id: &'static str =
            Box::leak(format!("spiffe://td/ns/default/svc/{svc}").into_boxed_str());
        Caller {
            id,
            namespace: "default",
            service: svc,
        }
    }

    fn verdict(a: &Authz, c: Option<Caller<'_>>, method: &str, path: &str) -> Verdict {
        let none = |_: &str| Vec::new();
        a.decide(&AuthzRequest {
            caller: c,
            port: 8080,
            method,
            path,
            query: "",
            header: &none,
        })
        .verdict
    }

    #[test]
    fn a_policy_on_a_route_applies_to_what_the_route_selects() {
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-admin}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n    - matches: [{path: {type: PathPrefix, value: /admin}}, {path: {type: Exact, value: /ops}, method: POST}]\n      backendRefs: [{name: api}]\n---\n";
        let named = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-all}\nspec:\n  parentRefs: [{name: api}]\n  rules:\n    - name: debug\n      matches: [{path: {type: PathPrefix, value: /debug}}]\n      backendRefs: [{name: api}]\n    - backendRefs: [{name: api}]\n---\n";
        let p = "apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: admin-only-web}\nspec:\n  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: api-admin}\n  rules:\n    - from: [{services: [web]}]\n---\n";
        let s = set(&format!("{route}{p}"));
        let a = compile(&s, "default", "api");
        let pol = &a.policies[0];
        assert_eq!(pol.scope(), " (route default/api-admin)");
        let (web, db) = (Some(caller("web")), Some(caller("db")));
        // Inside the route: only web; ASCII case does not get around it.
        for (m, path) in [
            ("GET", "/admin"),
            ("GET", "/admin/x"),
            ("GET", "/ADMIN/x"),
            ("post", "/ops"),
        ] {
            assert_eq!(verdict(&a, web, m, path), Verdict::Allow, "{m} {path}");
            assert_eq!(verdict(&a, db, m, path), Verdict::Deny, "{m} {path}");
        }
        // Outside it the mesh default holds.
        for (m, path) in [("GET", "/administrator"), ("GET", "/ops"), ("GET", "/")] {
            assert_eq!(verdict(&a, db, m, path), Verdict::Allow, "{m} {path}");
        }
        // The compliance view: db reaches the service, not the route.
        let r = a.reach(db);
        assert_eq!(r.allowed_by, Some(Vec::new()));
        assert_eq!(r.scoped.len(), 1);
        assert!(r.scoped[0].1.is_empty());
        assert_eq!(a.reach(web).scoped[0].1, vec![0]);
        // One rule of a route, by its name (sectionName); the route's
        // catch-all rule is not part of it.
        let p = "apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-debug}\nspec:\n  targetRef: {kind: HTTPRoute, name: api-all, sectionName: debug}\n  action: deny\n  rules: [{}]\n---\n";
        let s = set(&format!("{named}{p}"));
        let a = compile(&s, "default", "api");
        assert_eq!(a.policies[0].scope(), " (route default/api-all rule debug)");
        assert_eq!(verdict(&a, web, "GET", "/debug/x"), Verdict::Deny);
        assert_eq!(verdict(&a, web, "GET", "/x"), Verdict::Allow);
        let e = errors(&format!("{named}apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: x}}\nspec:\n  targetRef: {{kind: HTTPRoute, name: api-all, sectionName: nope}}\n  rules: [{{}}]\n---\n"));
        assert!(
            e.iter().any(|e| e.contains("has no rule named `nope`")),
            "{e:?}"
        );
        let e = errors("apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  targetRef: {kind: Service, name: api, sectionName: http}\n  rules: [{}]\n---\n");
        assert!(
            e.iter().any(|e| e.contains("sectionName is not supported")),
            "{e:?}"
        );
        // Unknown route, wrong group, a TCP service.
        let e = errors("apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  targetRef: {kind: HTTPRoute, name: nope}\n  rules: [{}]\n---\n");
        assert!(
            e.iter().any(|e| e.contains("no HTTPRoute `default/nope`")),
            "{e:?}"
        );
        let e = errors(&format!("{route}apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: x}}\nspec:\n  targetRef: {{group: tandem.dev, kind: HTTPRoute, name: api-admin}}\n  rules: [{{}}]\n---\n"));
        assert!(e.iter().any(|e| e.contains("is not HTTPRoute's")), "{e:?}");
        let e = errors("apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  targetRef: {kind: Gateway, name: api}\n  rules: [{}]\n---\n");
        assert!(
            e.iter().any(|e| e.contains("a Service or an HTTPRoute")),
            "{e:?}"
        );
    }

    #[test]
    fn hosts_and_methods_are_compared_as_servers_read_them() {
        let s = set(&policy(
            "no-internal",
            "api",
            "  action: deny\n  rules:\n    - when: [{header: host, values: [Internal.Example.]}]\n    - to: [{methods: [DELETE]}]\n",
        ));
        let a = compile(&s, "default", "api");
        let decide = |host: &'static str, method: &str| {
            let h = move |n: &str| if n == "host" { vec![host] } else { Vec::new() };
            a.decide(&AuthzRequest {
                caller: Some(caller("web")),
                port: 8080,
                method,
                path: "/",
                query: "",
                header: &h,
            })
            .verdict
        };
        for host in [
            "internal.example",
            "INTERNAL.example:8080",
            "internal.example.",
            "internal.example.:80",
        ] {
            assert_eq!(decide(host, "GET"), Verdict::Deny, "{host}");
        }
        assert_eq!(decide("public.example", "GET"), Verdict::Allow);
        assert_eq!(decide("internal.example.com", "GET"), Verdict::Allow);
        for m in ["DELETE", "delete", "Delete"] {
            assert_eq!(decide("public.example", m), Verdict::Deny, "{m}");
        }
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("a.b:99"), "a.b");
        assert_eq!(host_name("a.b."), "a.b");
    }

    #[test]
    fn deny_wins_allow_lists_and_the_rest_is_denied() {
        let s = set(&format!(
            "{}{}",
            policy("api-allow", "api", "  rules:\n    - from: [{services: [web]}]\n      to: [{paths: [\"/users/*\"], methods: [GET]}]\n"),
            policy("api-deny", "api", "  action: deny\n  rules:\n    - to: [{paths: [\"/users/admin\"]}]\n"),
        ));
        let a = compile(&s, "default", "api");
        assert_eq!(
            verdict(&a, Some(caller("web")), "GET", "/users/7"),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&a, Some(caller("web")), "GET", "/users"),
            Verdict::Allow
        );
        assert_eq!(
            verdict(&a, Some(caller("web")), "GET", "/usersx"),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&a, Some(caller("web")), "POST", "/users/7"),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&a, Some(caller("web")), "GET", "/users/admin"),
            Verdict::Deny
        );
        assert_eq!(
            verdict(&a, Some(caller("api")), "GET", "/users/7"),
            Verdict::Deny
        );
        assert_eq!(verdict(&a, None, "GET", "/users/7"), Verdict::Deny);
        let d = a.decide(&AuthzRequest {
            caller: Some(caller("web")),
            port: 8080,
            method: "GET",
            path: "/users/admin",
            query: "",
            header: &|_| Vec::new(),
        });
        assert!(matches!(d.by, DecidedBy::Rule(p, 0) if p.name == "default/api-deny"));
        // No policy on web: the default lets an identity in, not plaintext.
        let w = compile(&s, "default", "web");
        assert!(w.is_open());
        assert_eq!(verdict(&w, Some(caller("api")), "GET", "/"), Verdict::Allow);
        assert_eq!(verdict(&w, None, "GET", "/"), Verdict::Deny);
    }

    #[test]
    fn audit_reports_and_lets_through_and_the_mesh_default_can_deny() {
        let s = set(&format!(
            "{}apiVersion: tandem.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec:\n  authorization: {{default: deny}}\n---\n",
            policy("web-audit", "web", "  action: audit\n  rules:\n    - from: [{notServices: [api]}]\n"),
        ));
        let w = compile(&s, "default", "web");
        let none = |_: &str| Vec::new();
        let d = w.decide(&AuthzRequest {
            caller: Some(caller("db")),
            port: 8080,
            method: "GET",
            path: "/",
            query: "",
            header: &none,
        });
        assert_eq!(d.verdict, Verdict::Deny, "the mesh default denies");
        assert_eq!(d.by, DecidedBy::Default(AuthzDefault::Deny));
        assert_eq!(d.audited.len(), 1);
        let d = w.decide(&AuthzRequest {
            caller: Some(caller("api")),
            port: 8080,
            method: "GET",
            path: "/",
            query: "",
            header: &none,
        });
        assert!(d.audited.is_empty());
    }

    #[test]
    fn identities_namespaces_ports_and_headers() {
        let s = set(&policy(
            "p",
            "api",
            "  rules:\n    - from: [{identities: [\"spiffe://td/ns/default/*\"], notNamespaces: [blog]}]\n      to: [{notPorts: [9090]}]\n      when: [{header: X-Env, values: [prod]}]\n",
        ));
        let a = compile(&s, "default", "api");
        let prod = |h: &str| {
            if h == "x-env" {
                vec!["prod"]
            } else {
                Vec::new()
            }
        };
        let dev = |h: &str| {
            if h == "x-env" {
                vec!["dev"]
            } else {
                Vec::new()
            }
        };
        let req = |c, port, header| AuthzRequest {
            caller: Some(c),
            port,
            method: "GET",
            path: "/",
            query: "",
            header,
        };
        assert_eq!(
            a.decide(&req(caller("web"), 8080, &prod)).verdict,
            Verdict::Allow
        );
        assert_eq!(
            a.decide(&req(caller("web"), 8080, &dev)).verdict,
            Verdict::Deny
        );
        assert_eq!(
            a.decide(&req(caller("web"), 9090, &prod)).verdict,
            Verdict::Deny
        );
        let other = Caller {
            id: "spiffe://td/ns/blog/svc/web",
            namespace: "blog",
            service: "web",
        };
        assert_eq!(a.decide(&req(other, 8080, &prod)).verdict, Verdict::Deny);
    }

    #[test]
    fn paths_are_normalized_or_refused() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/%2E/b", "/a/b"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a//b///c", "/a/b/c"),
            ("/a%20b", "/a%20b"),
            ("/a%7e%3b", "/a~%3B"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a..b/c.", "/a..b/c."),
            ("*", "*"),
        ] {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
        assert!(matches!(
            normalize_path("/a/b"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        for (raw, e) in [
            ("/admin%2F", PathError::EncodedSlash),
            ("/admin%2fx", PathError::EncodedSlash),
            ("/a%5Cb", PathError::Backslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/admin;x", PathError::Parameters),
            ("/a#b", PathError::Fragment),
            ("/a%2", PathError::BadEncoding),
            ("/a%zz", PathError::BadEncoding),
        ] {
            assert_eq!(normalize_path(raw), Err(e), "{raw}");
        }
    }

    #[test]
    fn path_patterns() {
        assert!(path_matches("/admin", "/ADMIN"));
        assert!(path_matches("/admin/*", "/Admin/x"));
        assert!(path_matches("/a/*/c", "/A/b/C"));
        assert!(path_matches("/health", "/health"));
        assert!(!path_matches("/health", "/health/"));
        assert!(path_matches("/api/*", "/api"));
        assert!(path_matches("/api/*", "/api/v1/x"));
        assert!(!path_matches("/api/*", "/apix"));
        assert!(path_matches("/users/*/profile", "/users/7/profile"));
        assert!(!path_matches("/users/*/profile", "/users/7/8/profile"));
        assert!(path_matches("/static/**.css", "/static/a/b.css"));
        assert!(path_matches("*.png", "x.png"));
        assert!(!path_matches("/a*", "/a/b"));
    }

    #[test]
    fn mistakes_are_refused_where_they_are_written() {
        let e = errors(&policy("p", "nope", "  rules: [{}]\n"));
        assert!(
            e.iter()
                .any(|e| e.starts_with("t.yaml:17:36: no Service `default/nope`")),
            "{e:?}"
        );
        let e = errors(&policy(
            "p",
            "api",
            "  rules:\n    - from: [{services: [ghost]}]\n",
        ));
        assert!(
            e.iter().any(|e| e.contains("no Service `default/ghost`")),
            "{e:?}"
        );
        let e = errors(&policy("p", "db", "  rules:\n    - to: [{paths: [/x]}]\n"));
        assert!(
            e.iter().any(|e| e.contains("`paths` is an HTTP field")),
            "{e:?}"
        );
        let e = errors(&policy(
            "p",
            "db",
            "  rules:\n    - when: [{header: x, values: [y]}]\n",
        ));
        assert!(
            e.iter().any(|e| e.contains("`when` looks at HTTP headers")),
            "{e:?}"
        );
        let e = errors(&policy(
            "p",
            "api",
            "  rules:\n    - to: [{methods: [GET], notMethods: [GET]}]\n",
        ));
        assert!(
            e.iter()
                .any(|e| e.contains("in both methods and notMethods")),
            "{e:?}"
        );
        let e = errors(&policy("p", "api", "  action: block\n  rules: [{}]\n"));
        assert!(e.iter().any(|e| e.contains("action must be")), "{e:?}");
        let e = errors(&policy("p", "api", "  rules: []\n"));
        assert!(e.iter().any(|e| e.contains("no rules")), "{e:?}");
        let e = errors(&policy(
            "p",
            "api",
            "  rules:\n    - from: [{identities: [\"spiffe://td/*/x\"]}]\n",
        ));
        assert!(
            e.iter().any(|e| e.contains("not a SPIFFE ID pattern")),
            "{e:?}"
        );
        let e = errors(&policy("p", "api", "  port: 9999\n  rules: [{}]\n"));
        assert!(e.iter().any(|e| e.contains("has no port 9999")), "{e:?}");
        let e = errors(&policy(
            "p",
            "api",
            "  rules:\n    - to: [{paths: [users]}]\n",
        ));
        assert!(e.iter().any(|e| e.contains("not a path pattern")), "{e:?}");
        // L4 rules on a TCP service are fine.
        assert!(errors(&policy(
            "p",
            "db",
            "  rules:\n    - from: [{services: [api]}]\n      to: [{ports: [5432]}]\n"
        ))
        .is_empty());
    }
}
