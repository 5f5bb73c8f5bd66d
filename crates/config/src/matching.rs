//! Which route rule a request matches, with Gateway API semantics over
//! rules already sorted by precedence (the first match wins). Shared by the
//! sidecar, for every request, and by `tandem explain`.

use crate::model::PathMatchType;
use crate::snapshot::{Matcher, Route};

/// The parts of a request that routing looks at.
pub trait RequestHead {
    fn method(&self) -> &str;
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// Whether the request has header `name` (lower-case) with exactly
    /// `value`, among its values.
    fn has_header(&self, name: &str, value: &str) -> bool;
    /// The port the caller addressed, when known.
    fn port(&self) -> Option<u16>;
}

/// Index of the first rule that matches.
pub fn select(routes: &[Route], req: &impl RequestHead) -> Option<usize> {
    routes.iter().position(|r| {
        r.port.is_none_or(|p| req.port().is_none_or(|rp| rp == p)) && matches(&r.matcher, req)
    })
}

pub fn matches(m: &Matcher, req: &impl RequestHead) -> bool {
    if m.method
        .as_ref()
        .is_some_and(|method| req.method() != method)
    {
        return false;
    }
    let path = req.path();
    if let Some(p) = &m.path {
        let ok = match p.kind {
            PathMatchType::Exact => path == p.value,
            PathMatchType::PathPrefix => prefix_matches(&p.value, path),
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.grpc_method {
        // `/SERVICE/METHOD`, any service.
        let ok = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .is_some_and(|(svc, m)| !svc.is_empty() && m == method);
        if !ok {
            return false;
        }
    }
    if !m.headers.iter().all(|h| req.has_header(&h.name, &h.value)) {
        return false;
    }
    m.query.iter().all(|q| {
        req.query().is_some_and(|qs| {
            qs.split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                k == q.name && v == q.value
            })
        })
    })
}

/// Gateway API prefix matching is by path element: `/foo` matches `/foo`,
/// `/foo/` and `/foo/bar`, but not `/foobar`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}
