//! HTTPRoute filters at run time: the matched rule's (and its chosen
//! backend's) header modifiers, `URLRewrite` and `RequestRedirect`. They
//! are parsed into header names and values once, when the routing table
//! is built ([`RuleFilters::build`]); a rule without filters costs one
//! `Option` check per request. Mirrors (`mirror.rs`) and injected faults
//! (`policy/fault.rs`) are their own layers and read their settings from
//! the same [`RuleFilters`].

use http::header::{HeaderName, HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use tandem_config::snapshot::{
    Fault, HeaderModifier, Mirror, PathModifier, Redirect, Route, UrlRewrite,
};

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::Error;
use crate::svc::{layer, Service};

/// Header edits, parsed: removed, then set, then added.
#[derive(Default)]
pub(crate) struct HeaderEdits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    fn build(m: &HeaderModifier) -> Result<Self, String> {
        let pair = |n: &str, v: &str| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("header name `{n}`"))?,
                HeaderValue::from_str(v).map_err(|_| format!("value of header `{n}`"))?,
            ))
        };
        Ok(HeaderEdits {
            remove: m
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("header name `{n}`"))
                })
                .collect::<Result<_, _>>()?,
            set: m
                .set
                .iter()
                .map(|h| pair(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
            add: m
                .add
                .iter()
                .map(|h| pair(&h.name, &h.value))
                .collect::<Result<_, _>>()?,
        })
    }

    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// One side's edits (request or response) of a rule and of a backend.
#[derive(Default)]
struct Edits {
    request: Option<HeaderEdits>,
    response: Option<HeaderEdits>,
}

impl Edits {
    fn build(
        req: Option<&HeaderModifier>,
        resp: Option<&HeaderModifier>,
    ) -> Result<Option<Self>, String> {
        if req.is_none() && resp.is_none() {
            return Ok(None);
        }
        Ok(Some(Edits {
            request: req.map(HeaderEdits::build).transpose()?,
            response: resp.map(HeaderEdits::build).transpose()?,
        }))
    }
}

/// A route rule's filters, ready to use.
pub(crate) struct RuleFilters {
    rule: Option<Edits>,
    /// Parallel to the rule's weighted backends.
    backends: Vec<Option<Edits>>,
    rewrite: Option<Rewrite>,
    redirect: Option<Redirect>,
    pub(crate) mirrors: Vec<Mirror>,
    pub(crate) fault: Option<Fault>,
}

struct Rewrite {
    host: Option<HeaderValue>,
    path: Option<PathModifier>,
}

impl RuleFilters {
    /// The filters of route `r`, or `None` when neither the rule nor any
    /// of its backends has one.
    pub(crate) fn build(r: &Route) -> Result<Option<Self>, String> {
        let backends = r
            .backends
            .iter()
            .map(|b| match &b.filters {
                Some(f) => Edits::build(f.request_headers.as_ref(), f.response_headers.as_ref()),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("route {} rule {}: {e}", r.route, r.rule))?;
        let Some(f) = r.filters.as_deref() else {
            if backends.iter().all(Option::is_none) {
                return Ok(None);
            }
            return Ok(Some(RuleFilters {
                rule: None,
                backends,
                rewrite: None,
                redirect: None,
                mirrors: Vec::new(),
                fault: None,
            }));
        };
        let rule = Edits::build(f.request_headers.as_ref(), f.response_headers.as_ref())
            .map_err(|e| format!("route {} rule {}: {e}", r.route, r.rule))?;
        let rewrite = match &f.rewrite {
            Some(UrlRewrite { hostname, path }) => Some(Rewrite {
                host: hostname
                    .as_deref()
                    .map(HeaderValue::from_str)
                    .transpose()
                    .map_err(|_| format!("route {} rule {}: rewrite hostname", r.route, r.rule))?,
                path: path.clone(),
            }),
            None => None,
        };
        Ok(Some(RuleFilters {
            rule,
            backends,
            rewrite,
            redirect: f.redirect.clone(),
            mirrors: f.mirrors.clone(),
            fault: f.fault.clone(),
        }))
    }
}

layer!(
    /// Applies the matched rule's filters: a redirect answers at once;
    /// otherwise the request's headers, path and host are edited on the
    /// way out and the answer's headers on the way back.
    FilterLayer => Filter {}
);

impl<S: Service> Service for Filter<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Some(dest) = ctx.dest.clone() else {
            return self.inner.call(req, ctx).await;
        };
        let Some(f) = ctx.rule.and_then(|i| dest.filters.get(i)?.as_ref()) else {
            return self.inner.call(req, ctx).await;
        };
        if let Some(rd) = &f.redirect {
            return Ok(redirect(rd, &req, ctx.port.unwrap_or(dest.default_port)));
        }
        let backend = ctx.backend_ref.and_then(|i| f.backends.get(i)?.as_ref());
        for e in [f.rule.as_ref(), backend].into_iter().flatten() {
            if let Some(h) = &e.request {
                h.apply(req.headers_mut());
            }
        }
        if let Some(rw) = &f.rewrite {
            rewrite(rw, &mut req);
        }
        let mut resp = self.inner.call(req, ctx).await?;
        for e in [f.rule.as_ref(), backend].into_iter().flatten() {
            if let Some(h) = &e.response {
                h.apply(resp.headers_mut());
            }
        }
        Ok(resp)
    }
}

fn rewrite(rw: &Rewrite, req: &mut Request<Body>) {
    if let Some(host) = &rw.host {
        req.headers_mut().insert(HOST, host.clone());
    }
    let uri = req.uri();
    let path = rw.path.as_ref().map(|m| {
        let p = m.apply(uri.path());
        match uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p,
        }
    });
    if path.is_none() && (rw.host.is_none() || uri.authority().is_none()) {
        return;
    }
    let mut parts = uri.clone().into_parts();
    if let Some(p) = path.and_then(|p| PathAndQuery::try_from(p).ok()) {
        parts.path_and_query = Some(p);
    }
    if let (Some(host), Some(_)) = (&rw.host, &parts.authority) {
        parts.authority = Authority::try_from(host.as_bytes()).ok();
    }
    if let Ok(u) = Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

/// The host and port the request named (`Host`, else its authority).
fn request_host(req: &Request<Body>) -> Option<(String, Option<u16>)> {
    let a = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned())?;
    Some((a.host().to_string(), a.port_u16()))
}

/// The redirect's answer (Gateway API `RequestRedirect`): what the filter
/// names replaces the scheme, host, port or path the request used; a port
/// is left out of `Location` when it is the scheme's own.
fn redirect(rd: &Redirect, req: &Request<Body>, listener_port: u16) -> Response<Body> {
    let (host, port) = request_host(req).unwrap_or_default();
    let location = rd.location(
        &host,
        port,
        listener_port,
        req.uri().path(),
        req.uri().query(),
    );
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(prefix: &str, with: &str) -> PathModifier {
        PathModifier::Prefix {
            prefix: prefix.into(),
            with: with.into(),
        }
    }

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        for (path, pre, with, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/anything", "/", "/v2", "/v2/anything"),
        ] {
            assert_eq!(prefix(pre, with).apply(path), want, "{path} {pre} {with}");
        }
        assert_eq!(PathModifier::Full("/x".into()).apply("/a/b"), "/x");
    }

    fn get(uri: &str, host: &str) -> Request<Body> {
        Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(Body::empty())
            .expect("request")
    }

    fn location(rd: &Redirect, req: &Request<Body>) -> (u16, String) {
        let r = redirect(rd, req, 8080);
        let loc = r
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (r.status().as_u16(), loc)
    }

    #[test]
    fn redirects_keep_what_they_do_not_name() {
        let base = Redirect {
            scheme: None,
            hostname: None,
            path: None,
            port: None,
            status: 302,
        };
        let req = get("/old/page?x=1", "shop:8080");
        assert_eq!(
            location(&base, &req),
            (302, "http://shop:8080/old/page?x=1".into())
        );
        let https = Redirect {
            scheme: Some("https".into()),
            hostname: Some("secure.example".into()),
            status: 301,
            ..base.clone()
        };
        assert_eq!(
            location(&https, &req),
            (301, "https://secure.example/old/page?x=1".into())
        );
        let moved = Redirect {
            path: Some(prefix("/old", "/new")),
            port: Some(80),
            ..base.clone()
        };
        assert_eq!(
            location(&moved, &req),
            (302, "http://shop/new/page?x=1".into())
        );
        // No port in Host: the service port the request came in on.
        assert_eq!(
            location(&base, &get("/", "shop")),
            (302, "http://shop:8080/".into())
        );
    }

    #[test]
    fn rewrite_changes_path_and_host_and_keeps_the_query() {
        let rw = Rewrite {
            host: Some(HeaderValue::from_static("backend.internal")),
            path: Some(prefix("/api", "/v2")),
        };
        let mut req = get("http://shop:8080/api/items?id=3", "shop:8080");
        rewrite(&rw, &mut req);
        assert_eq!(req.uri().path(), "/v2/items");
        assert_eq!(req.uri().query(), Some("id=3"));
        assert_eq!(req.uri().host(), Some("backend.internal"));
        assert_eq!(req.headers()[HOST], "backend.internal");
        let mut edits = HeaderMap::new();
        edits.append("x-a", HeaderValue::from_static("1"));
        edits.append("x-gone", HeaderValue::from_static("1"));
        let h = HeaderEdits::build(&HeaderModifier {
            set: vec![tandem_config::snapshot::NameValue {
                name: "x-a".into(),
                value: "2".into(),
            }],
            add: vec![tandem_config::snapshot::NameValue {
                name: "x-a".into(),
                value: "3".into(),
            }],
            remove: vec!["x-gone".into()],
        })
        .expect("edits");
        h.apply(&mut edits);
        let a: Vec<_> = edits.get_all("x-a").iter().collect();
        assert_eq!(a, ["2", "3"]);
        assert!(!edits.contains_key("x-gone"));
    }
}
