//! The admin endpoint: `/metrics`, `/ready`, `/live`, `/config`, `/certs`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::control::identity::Identity;
use crate::control::Subscriptions;
use crate::routing::Routes;
use crate::telemetry::metrics::Metrics;

/// What the admin endpoint shows.
pub(crate) struct Admin {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) routes: Arc<Routes>,
    pub(crate) identity: Arc<Identity>,
    pub(crate) control: Arc<Subscriptions>,
}

pub(crate) async fn handle(
    admin: Arc<Admin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body): (StatusCode, &str, Bytes) = match req.uri().path() {
        "/metrics" => {
            // Prometheus asks for OpenMetrics first; anything else (curl,
            // promtool) gets the classic text format.
            let openmetrics = req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.contains("application/openmetrics-text"))
            });
            let (ctype, text) = admin.metrics.encode(openmetrics);
            (StatusCode::OK, ctype, Bytes::from(text))
        }
        "/live" => (StatusCode::OK, "text/plain", Bytes::from_static(b"live\n")),
        "/ready" => {
            if admin.identity.tls.is_expired() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready: the certificate expired\n"),
                )
            } else if admin.routes.is_ready() {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready: no configuration received yet\n"),
                )
            }
        }
        "/config" => {
            let routing = admin.routes.load();
            let doc = serde_json::json!({
                "version": routing.version,
                "acked": routing.version > 0,
                "control_plane_connected": admin.control.is_connected(),
                "snapshot": &*routing.snapshot,
            });
            (
                StatusCode::OK,
                "application/json",
                Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default()),
            )
        }
        "/certs" => (
            StatusCode::OK,
            "application/json",
            Bytes::from(serde_json::to_vec_pretty(&certs(&admin.identity)).unwrap_or_default()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// The certificate chain and trust bundle (never the private key).
fn certs(identity: &Identity) -> serde_json::Value {
    use tandem_identity::ca::pem;
    let tls = &identity.tls;
    let leaf = tls.leaf();
    let describe = |der: &[u8]| {
        use x509_parser::prelude::{FromDer, X509Certificate};
        match X509Certificate::from_der(der) {
            Ok((_, c)) => serde_json::json!({
                "subject": c.subject().to_string(),
                "issuer": c.issuer().to_string(),
                "serial": c.raw_serial_as_string(),
                "not_before": c.validity().not_before.timestamp(),
                "not_after": c.validity().not_after.timestamp(),
                "pem": pem("CERTIFICATE", der),
            }),
            Err(_) => serde_json::json!({ "error": "does not parse" }),
        }
    };
    serde_json::json!({
        "spiffe_id": leaf.as_ref().map(|l| l.id.uri()),
        "trust_domain": tls.trust_domain(),
        "serving": !tls.is_expired() && leaf.is_some(),
        "not_after": leaf.as_ref().map(|l| l.not_after_unix()),
        "signer": leaf.as_ref().map(|l| l.signer.clone()),
        "chain": leaf.as_ref().map(|l| l.chain().iter().map(|c| describe(c)).collect::<Vec<_>>()),
        "bundle": tls.bundle().iter().map(|c| describe(c)).collect::<Vec<_>>(),
    })
}
