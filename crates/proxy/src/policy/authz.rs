//! Inbound: who may call this service. The service's AuthorizationPolicies
//! and the mesh default (`tandem_config::authz`, which decides) are checked
//! against the caller's verified identity before anything reaches the app.
//! A denied request gets `403 forbidden` (gRPC: `PERMISSION_DENIED`) with
//! no policy detail; the denial is counted in `tandem_authz_denials_total`
//! by policy and rule and logged with the caller's identity. An `audit`
//! policy's match is counted and logged the same way, and let through.

use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use tandem_config::authz::{AuthzRequest, Caller, DecidedBy, Decision, Verdict};

use crate::body::Body;
use crate::ctx::{Peer, RequestCtx};
use crate::error::{Error, MeshError};
use crate::routing::Routes;
use crate::svc::{layer, Service};
use crate::telemetry::metrics::{AuthzLabels, Metrics};

layer!(
    /// Inbound: the service's access policy.
    AuthorizeLayer => Authorize {
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
    }
);

impl<S: Service> Service for Authorize<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let allowed = {
            let routing = self.routes.load();
            match routing.inbound.as_ref() {
                // Not configured: the layer above has answered already.
                None => true,
                // The common case costs one check: no policy, and a caller
                // with a verified identity.
                Some(i) if i.authz.is_open() && ctx.caller.is_some() => true,
                Some(i) => {
                    let header = |name: &str| header_values(&req, name);
                    let r = AuthzRequest {
                        caller: ctx.caller.as_deref().map(caller),
                        port: i.port,
                        method: req.method().as_str(),
                        path: req.uri().path(),
                        query: req.uri().query().unwrap_or(""),
                        header: &header,
                    };
                    let d = i.authz.decide(&r);
                    report(&self.metrics, &d, ctx.caller.as_deref(), &r);
                    d.verdict == Verdict::Allow
                }
            }
        };
        if allowed {
            return self.inner.call(req, ctx).await;
        }
        Ok(forbidden(&req))
    }
}

/// The values of a request header, as the access policy reads them.
pub(crate) fn header_values<'a, B>(req: &'a Request<B>, name: &str) -> Vec<&'a str> {
    let mut v: Vec<&str> = req
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    // HTTP/2 carries the host as `:authority`.
    if v.is_empty() && name == "host" {
        v.extend(req.uri().authority().map(|a| a.as_str()));
    }
    v
}

pub(crate) fn caller(p: &Peer) -> Caller<'_> {
    Caller {
        id: &p.id,
        namespace: &p.namespace,
        service: &p.name,
    }
}

/// Counts and logs a denial and every audit match of a decision.
pub(crate) fn report(
    metrics: &Metrics,
    d: &Decision<'_>,
    peer: Option<&Peer>,
    r: &AuthzRequest<'_>,
) {
    let who = peer.map_or("(plaintext, no identity)", |p| &p.id);
    for (p, rule) in &d.audited {
        metrics
            .authz
            .get_or_create(&AuthzLabels {
                policy: p.name.clone(),
                rule: rule.to_string(),
                decision: "audit",
                reason: "policy",
            })
            .inc();
        tracing::info!(
            caller = %who,
            method = %r.method,
            path = %r.path,
            port = r.port,
            policy = %p.name,
            rule,
            "access policy (audit): this request would be denied; let through"
        );
    }
    if d.verdict == Verdict::Allow {
        return;
    }
    let (policy, rule, reason) = match d.by {
        DecidedBy::Rule(p, i) => (p.name.clone(), i.to_string(), "policy"),
        DecidedBy::NoAllowMatched => (String::new(), String::new(), "no-allow-matched"),
        DecidedBy::Default(_) => (String::new(), String::new(), "mesh-default"),
    };
    tracing::info!(
        caller = %who,
        method = %r.method,
        path = %r.path,
        port = r.port,
        policy = %policy,
        rule = %rule,
        reason,
        "access policy: request denied"
    );
    metrics
        .authz
        .get_or_create(&AuthzLabels {
            policy,
            rule,
            decision: "deny",
            reason,
        })
        .inc();
}

/// `403 forbidden`, or for a gRPC call `PERMISSION_DENIED` in a
/// trailers-only response; nothing says which policy or rule decided.
fn forbidden(req: &Request<Body>) -> Response<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return MeshError::Forbidden.response("the service's access policy does not allow this");
    }
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    h.insert("grpc-message", HeaderValue::from_static("forbidden"));
    r.extensions_mut().insert(MeshError::Forbidden);
    r
}
