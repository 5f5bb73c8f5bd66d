//! The HTTP API for the CLI (and later the dashboard). All answers are JSON.
//!
//! - `GET /api/v1/proxies` — every known proxy and the config version it runs
//! - `GET /api/v1/stats?window=DURATION` — golden signals per service pair
//! - `GET /api/v1/config` — the config in force and the last refused change
//! - `GET /api/v1/push` — the push loop: rounds, compiles, sessions
//! - `GET /api/v1/ca` — trust domain, roots, signing root, rotation phase
//! - `POST /api/v1/ca/rotate` — start a root rotation
//! - `POST /api/v1/ca/retire[?force=true]` — remove roots that no longer sign
//! - `GET /healthz`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::identity::Ca;
use crate::mesh::Mesh;
use crate::stats::Stats;

pub struct Api {
    pub mesh: Arc<Mesh>,
    pub stats: Arc<Stats>,
    pub ca: Arc<Ca>,
}

impl Api {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() == http::Method::POST {
            let resp = match req.uri().path() {
                "/api/v1/ca/rotate" => match self.ca.rotate().await {
                    Ok(r) => json(StatusCode::OK, &r),
                    Err(e) => json(StatusCode::CONFLICT, &serde_json::json!({ "error": e })),
                },
                "/api/v1/ca/retire" => {
                    let force = query_param(req.uri().query(), "force") == Some("true");
                    match self.ca.retire(force).await {
                        Ok(r) => json(StatusCode::OK, &serde_json::json!({ "retired": r })),
                        Err(e) => json(StatusCode::CONFLICT, &serde_json::json!({ "error": e })),
                    }
                }
                _ => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "not found"}),
                ),
            };
            return Ok(resp);
        }
        if req.method() != http::Method::GET {
            return Ok(json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "only GET and POST"}),
            ));
        }
        let resp = match req.uri().path() {
            "/api/v1/proxies" => json(StatusCode::OK, &self.mesh.status()),
            "/api/v1/stats" => match stats_window(req.uri().query()) {
                Ok(window) => json(StatusCode::OK, &self.stats.query(window)),
                Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e })),
            },
            "/api/v1/config" => json(StatusCode::OK, &self.mesh.config_status()),
            "/api/v1/push" => json(StatusCode::OK, &self.mesh.push_status()),
            "/api/v1/ca" => json(StatusCode::OK, &self.ca.info()),
            "/healthz" => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "not found"}),
            ),
        };
        Ok(resp)
    }
}

/// The `window` of `GET /api/v1/stats`: a duration (the config's grammar)
/// from 1 ms to 5 minutes; 10 s when absent.
fn stats_window(query: Option<&str>) -> Result<Duration, String> {
    match query_param(query, "window") {
        None => Ok(Duration::from_secs(10)),
        Some(w) => tandem_config::duration::parse_within(
            w,
            Duration::from_millis(1),
            Duration::from_secs(300),
        )
        .map_err(|e| format!("window: {e}")),
    }
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_window_is_a_duration() {
        assert_eq!(stats_window(None), Ok(Duration::from_secs(10)));
        assert_eq!(stats_window(Some("window=1m")), Ok(Duration::from_secs(60)));
        assert_eq!(
            stats_window(Some("x=1&window=500ms")),
            Ok(Duration::from_millis(500))
        );
        assert!(stats_window(Some("window=60")).is_err());
        assert!(stats_window(Some("window=1h")).is_err());
    }
}
