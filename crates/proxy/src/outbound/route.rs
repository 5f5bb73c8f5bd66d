//! Route selection: which rule of a destination's HTTPRoutes a request
//! matches (Gateway API semantics), and which weighted backend it goes to.
//! The rules are already sorted by precedence; the first match wins. No
//! match: `404 no-route`.

use http::{HeaderMap, Method, Request, Response};
use tandem_config::snapshot::{Matcher, PathMatchType, Route};

use crate::balance::pick::fnv1a;
use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::routing::Destination;
use crate::svc::{layer, Service};

layer!(
    /// Chooses the route rule and backend, and the ring-hash key.
    RouteLayer => Router {}
);

impl<S: Service> Service for Router<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return Err(Error::new(MeshError::UnknownService, "no destination"));
        };
        ctx.dst = dest.name.clone();
        if !dest.routes.is_empty() {
            let view = RequestView {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
                port: ctx.port.or(Some(dest.default_port)),
            };
            let Some(i) = select(&dest.routes, &view) else {
                return Err(Error::new(
                    MeshError::NoRoute,
                    format!(
                        "no route of `{}` matches {} {}",
                        dest.name.0,
                        req.method(),
                        req.uri().path()
                    ),
                ));
            };
            ctx.rule = Some(i);
            if let Some((r, b)) = pick_backend(&dest, i) {
                ctx.backend_ref = Some(r);
                ctx.backend = b;
            }
        }
        let Some(backend) = dest.backends.get(ctx.backend) else {
            return Err(Error::new(MeshError::NoEndpoints, "no backend"));
        };
        ctx.dst = backend.name.clone();
        ctx.hash_key = dest
            .policy_for(ctx.rule)
            .and_then(|p| p.hash_header.as_ref())
            .and_then(|h| req.headers().get(h))
            .map(|v| fnv1a(v.as_bytes()));
        self.inner.call(req, ctx).await
    }
}

/// The backendRef of rule `idx`, by weight, and its backend.
fn pick_backend(dest: &Destination, idx: usize) -> Option<(usize, usize)> {
    let r = dest.routes.get(idx)?;
    let total = dest.totals.get(idx).copied().unwrap_or(0);
    let i = pick_weighted(r.backends.iter().map(|b| b.weight), total)?;
    Some((i, r.backends.get(i)?.backend))
}

/// The parts of a request that routing looks at.
pub(crate) struct RequestView<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a HeaderMap,
    /// Port the caller addressed, when known.
    pub(crate) port: Option<u16>,
}

/// Index of the first route (routes are in precedence order) that matches.
pub(crate) fn select(routes: &[Route], req: &RequestView<'_>) -> Option<usize> {
    routes.iter().position(|r| {
        r.port.is_none_or(|p| req.port.is_none_or(|rp| rp == p)) && matches(&r.matcher, req)
    })
}

pub(crate) fn matches(m: &Matcher, req: &RequestView<'_>) -> bool {
    if let Some(method) = &m.method {
        if req.method.as_str() != method {
            return false;
        }
    }
    if let Some(p) = &m.path {
        let ok = match p.kind {
            PathMatchType::Exact => req.path == p.value,
            PathMatchType::PathPrefix => prefix_matches(&p.value, req.path),
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.grpc_method {
        // `/SERVICE/METHOD`, any service.
        let ok = req
            .path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .is_some_and(|(svc, m)| !svc.is_empty() && m == method);
        if !ok {
            return false;
        }
    }
    for h in &m.headers {
        let found = req
            .headers
            .get_all(h.name.as_str())
            .iter()
            .any(|v| v.as_bytes() == h.value.as_bytes());
        if !found {
            return false;
        }
    }
    for q in &m.query {
        let found = req.query.is_some_and(|qs| {
            qs.split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                k == q.name && v == q.value
            })
        });
        if !found {
            return false;
        }
    }
    true
}

/// Gateway API prefix matching is by path element: `/foo` matches `/foo`,
/// `/foo/` and `/foo/bar`, but not `/foobar`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Picks an index by weight; `total` is the sum of weights (non-zero).
pub(crate) fn pick_weighted(
    weights: impl Iterator<Item = u32> + Clone,
    total: u64,
) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u64(..total);
    for (i, w) in weights.enumerate() {
        let w = u64::from(w);
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::snapshot::{NameValue, PathMatch, WeightedBackend};

    fn route(m: Matcher) -> Route {
        Route {
            route: "r".into(),
            rule: 0,
            port: None,
            matcher: m,
            backends: vec![WeightedBackend {
                backend: 0,
                weight: 1,
                filters: None,
            }],
            policy: None,
            filters: None,
        }
    }

    fn view<'a>(
        method: &'a Method,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            headers,
            port: None,
        }
    }

    #[test]
    fn prefix_is_per_path_element() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn header_method_query_and_exact_path() {
        let mut headers = HeaderMap::new();
        headers.insert("x-beta", "1".parse().expect("value"));
        let m = Matcher {
            path: Some(PathMatch {
                kind: PathMatchType::Exact,
                value: "/a".into(),
            }),
            headers: vec![NameValue {
                name: "x-beta".into(),
                value: "1".into(),
            }],
            query: vec![NameValue {
                name: "v".into(),
                value: "2".into(),
            }],
            method: Some("GET".into()),
            grpc_method: None,
        };
        let get = Method::GET;
        assert!(matches(&m, &view(&get, "/a", Some("x=1&v=2"), &headers)));
        assert!(!matches(&m, &view(&get, "/a/b", Some("v=2"), &headers)));
        assert!(!matches(&m, &view(&get, "/a", Some("v=3"), &headers)));
        assert!(!matches(
            &m,
            &view(&Method::POST, "/a", Some("v=2"), &headers)
        ));
        let empty = HeaderMap::new();
        assert!(!matches(&m, &view(&get, "/a", Some("v=2"), &empty)));
    }

    #[test]
    fn first_matching_route_wins() {
        let mut headers = HeaderMap::new();
        let beta = route(Matcher {
            headers: vec![NameValue {
                name: "x-beta".into(),
                value: "1".into(),
            }],
            ..Matcher::default()
        });
        let mut all = route(Matcher::default());
        all.rule = 1;
        let routes = vec![beta, all];
        let get = Method::GET;
        assert_eq!(
            select(&routes, &view(&get, "/", None, &headers)).map(|i| routes[i].rule),
            Some(1)
        );
        headers.insert("x-beta", "1".parse().expect("value"));
        assert_eq!(
            select(&routes, &view(&get, "/", None, &headers)).map(|i| routes[i].rule),
            Some(0)
        );
    }

    #[test]
    fn a_grpc_method_of_any_service() {
        let m = Matcher {
            grpc_method: Some("Unary".into()),
            ..Matcher::default()
        };
        let h = HeaderMap::new();
        let post = Method::POST;
        assert!(matches(&m, &view(&post, "/tandem.v1.Echo/Unary", None, &h)));
        assert!(matches(&m, &view(&post, "/other.Svc/Unary", None, &h)));
        assert!(!matches(
            &m,
            &view(&post, "/tandem.v1.Echo/ServerStream", None, &h)
        ));
        assert!(!matches(&m, &view(&post, "//Unary", None, &h)));
        assert!(!matches(&m, &view(&post, "/Unary", None, &h)));
        assert!(!matches(&m, &view(&post, "/a/b/Unary", None, &h)));
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let weights = [90u32, 10, 0];
        let mut hits = [0usize; 3];
        for _ in 0..10_000 {
            hits[pick_weighted(weights.iter().copied(), 100).expect("pick")] += 1;
        }
        assert_eq!(hits[2], 0);
        assert!((8700..9300).contains(&hits[0]), "{hits:?}");
        assert_eq!(pick_weighted(weights.iter().copied(), 0), None);
    }
}
