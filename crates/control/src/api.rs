//! The HTTP API for the CLI (and later the dashboard). All answers are JSON.
//!
//! - `GET /api/v1/proxies` — every known proxy and the config version it runs
//! - `GET /api/v1/stats?window=SECONDS` — golden signals per service pair
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
            "/api/v1/stats" => {
                let window = query_param(req.uri().query(), "window")
                    .and_then(|w| w.trim_end_matches('s').parse::<f64>().ok())
                    .filter(|w| *w > 0.0 && *w <= 300.0)
                    .unwrap_or(10.0);
                json(
                    StatusCode::OK,
                    &self.stats.query(Duration::from_secs_f64(window)),
                )
            }
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
