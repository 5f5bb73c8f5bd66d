//! Route selection: which rule of a destination's HTTPRoutes a request
//! matches (`tandem_config::matching`, which `tandem explain` shares), and
//! which weighted backend it goes to. No match: `404 no-route`.

use http::{HeaderMap, Method, Request, Response};
use tandem_config::matching::{select, RequestHead};

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

impl RequestHead for RequestView<'_> {
    fn method(&self) -> &str {
        self.method.as_str()
    }

    fn path(&self) -> &str {
        self.path
    }

    fn query(&self) -> Option<&str> {
        self.query
    }

    fn has_header(&self, name: &str, value: &str) -> bool {
        self.headers
            .get_all(name)
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes())
    }

    fn port(&self) -> Option<u16> {
        self.port
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
    use tandem_config::matching::{matches, prefix_matches};
    use tandem_config::snapshot::{
        Matcher, NameValue, PathMatch, PathMatchType, Route, WeightedBackend,
    };

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
