//! The admin endpoint: `/metrics`, `/ready`, `/live`, `/config`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::Proxy;

pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body): (StatusCode, &str, Bytes) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(proxy.metrics.encode()),
        ),
        "/live" => (StatusCode::OK, "text/plain", Bytes::from_static(b"live\n")),
        "/ready" => {
            if proxy.is_ready() {
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
            let routing = proxy.routing.load();
            let doc = serde_json::json!({
                "version": routing.version,
                "acked": routing.version > 0,
                "control_plane_connected": proxy.metrics.control_connected.get() == 1,
                "snapshot": &*routing.snapshot,
            });
            (
                StatusCode::OK,
                "application/json",
                Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default()),
            )
        }
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
