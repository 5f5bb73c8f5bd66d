//! The HTTP API for the CLI (and later the dashboard). All answers are JSON.
//!
//! - `GET /api/v1/proxies` — every known proxy and the config version it runs
//! - `GET /api/v1/stats?window=DURATION` — golden signals per service pair
//! - `GET /api/v1/stats/routes?window=DURATION` — the same per route and backend
//! - `GET /api/v1/config` — the config in force and the last refused change
//! - `GET /api/v1/tap?service=S&path=P&method=M&rate=N` — a live stream of
//!   request summaries from S's proxies (JSON lines)
//! - `GET /api/v1/push` — the push loop: rounds, compiles, sessions
//! - `GET /api/v1/ca` — trust domain, roots, signing root, rotation phase
//! - `POST /api/v1/ca/rotate` — start a root rotation
//! - `POST /api/v1/ca/retire[?force=true]` — remove roots that no longer sign
//! - `POST /api/v1/explain` — what the mesh would do with a request
//! - `GET /api/v1/rollouts` — every Rollout: its plan, step, signals, history
//! - `GET /api/v1/rollouts/NAMESPACE/NAME` — one
//! - `POST /api/v1/rollouts/NAMESPACE/NAME/{pause,resume,abort,promote}`
//! - `GET /api/v1/stats/series?service=S&window=5m&step=10s` — what S's
//!   callers saw of it, step by step
//! - `GET /dashboard` — the web dashboard (`/dashboard?token=T` logs in)
//! - `GET /healthz`, `GET /readyz` — liveness and readiness
//!
//! Every endpoint but the last two needs the admin credential
//! (`Authorization: Bearer <credential>`, the contents of
//! `<data>/admin.token`); without it the answer is 401 and nothing
//! changes. Before that, a request whose `Host` is not an IP address,
//! `localhost` or a name given with `--api-host` is refused (DNS
//! rebinding), and so is one whose `Origin` is another site (CSRF).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::identity::Ca;
use crate::mesh::Mesh;
use crate::rollout::{ActError, Action, Rollouts};
use crate::stats::Stats;
use crate::tap::{TapRequest, Taps};

/// An answer's body: JSON, or a stream of JSON lines (taps).
pub type ApiBody = UnsyncBoxBody<Bytes, Infallible>;

/// Largest `POST /api/v1/explain` body read.
/// Largest config set `tandem apply` may push (etcd's own limit on one
/// value is 1.5 MiB).
const MAX_CONFIG_BODY: usize = 1024 * 1024;
const MAX_EXPLAIN_BODY: usize = 64 << 10;

pub struct Api {
    pub mesh: Arc<Mesh>,
    pub stats: Arc<Stats>,
    pub ca: Arc<Ca>,
    pub rollouts: Arc<Rollouts>,
    pub taps: Arc<Taps>,
    /// The replicas and etcd, when the store is shared.
    pub store: Option<Arc<crate::store::Shared>>,
    pub data_dir: std::path::PathBuf,
    /// The config directory this control plane follows, if any.
    pub config_dir: Option<std::path::PathBuf>,
    /// Where pushed config goes (when it is not a directory's).
    pub pushed: Option<Arc<dyn tandem_store::Kv>>,
    /// The remote clusters this one imports from.
    pub remotes: Arc<crate::remote::Remotes>,
    pub access: Access,
}

/// The key of the admin credential in the data directory's store.
pub const ADMIN_CREDENTIAL: &str = "admin.token";

/// The admin credential: read from the store, or made (32 random bytes,
/// hex) on first start. Written once with compare-and-swap, so two
/// processes starting on one directory agree on it.
pub async fn admin_credential(kv: &dyn tandem_store::Kv) -> std::io::Result<String> {
    credential(kv, ADMIN_CREDENTIAL).await
}

/// A credential at `key` in the store: read, or made (32 random bytes,
/// hex) the first time, with compare-and-swap so that every process
/// agrees on it.
pub async fn credential(kv: &dyn tandem_store::Kv, key: &str) -> std::io::Result<String> {
    if let Some(v) = kv.get(key).await? {
        let t = String::from_utf8_lossy(&v.value).trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
        return Err(std::io::Error::other(format!(
            "{key} in the data directory is too short; delete it to make a new one"
        )));
    }
    let t = tandem_identity::ca::random_secret().map_err(std::io::Error::other)?;
    kv.put_if(key, None, format!("{t}\n").as_bytes()).await?;
    // Another process may have written first: theirs stands.
    let v = kv
        .get(key)
        .await?
        .ok_or_else(|| std::io::Error::other(format!("{key} vanished")))?;
    Ok(String::from_utf8_lossy(&v.value).trim().to_string())
}

/// Who may use the API: the credential, and the names it may be reached by.
pub struct Access {
    pub credential: String,
    /// What other clusters read this one's exports with (that only).
    pub export_credential: String,
    /// Host names accepted besides IP addresses and `localhost`.
    pub hosts: Vec<String>,
}

/// The dashboard's login token: derived from the admin credential (HMAC),
/// so it changes with it and gives no way back to it. In the URL that
/// `tandem dashboard` prints, it becomes a cookie that lets a browser read
/// the API (GET only) and the dashboard.
pub fn dashboard_token(credential: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, credential.as_bytes());
    aws_lc_rs::hmac::sign(&key, b"tandem dashboard")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cookie the dashboard's login sets.
const DASHBOARD_COOKIE: &str = "tandem_dashboard";

/// Why a request was refused before it was served.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Host`, or one the API is not known by.
    Host(String),
    /// An `Origin` (or `Sec-Fetch-Site`) of another site.
    Origin(String),
    /// No credential, or a wrong one.
    Credential,
}

impl Access {
    /// Checks a request's head: Host, Origin, then (unless `open`) the
    /// credential.
    pub fn check(&self, head: &http::request::Parts, open: bool) -> Result<(), Refusal> {
        let host = head
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| head.uri.authority().map(|a| a.to_string()))
            .ok_or_else(|| Refusal::Host("a Host header is required".into()))?;
        if !self.host_allowed(&host) {
            return Err(Refusal::Host(format!(
                "Host `{host}` is not a name of this API (IP addresses, localhost, --api-host)"
            )));
        }
        if let Some(origin) = head.headers.get(http::header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let same = ["http://", "https://"]
                .iter()
                .any(|s| origin.strip_prefix(s) == Some(host.as_str()));
            if !same {
                return Err(Refusal::Origin(format!(
                    "cross-origin request from `{origin}` refused"
                )));
            }
        }
        if let Some(site) = head.headers.get("sec-fetch-site") {
            if !matches!(site.as_bytes(), b"same-origin" | b"none") {
                return Err(Refusal::Origin("cross-site request refused".into()));
            }
        }
        if open {
            return Ok(());
        }
        // A browser with the dashboard's cookie may read, never change.
        if head.method == http::Method::GET {
            let token = dashboard_token(&self.credential);
            let cookie = head
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == DASHBOARD_COOKIE)
                .map(|(_, v)| v);
            if cookie.is_some_and(|c| constant_time_eq(c.as_bytes(), token.as_bytes())) {
                return Ok(());
            }
        }
        let given = head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        let admin = constant_time_eq(given.as_bytes(), self.credential.as_bytes());
        let exports = head.method == http::Method::GET
            && head.uri.path() == "/api/v1/exports"
            && constant_time_eq(given.as_bytes(), self.export_credential.as_bytes());
        if admin || exports {
            Ok(())
        } else {
            Err(Refusal::Credential)
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = match host.parse::<http::uri::Authority>() {
            Ok(a) => a.host().to_string(),
            Err(_) => return false,
        };
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(&name))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Api {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ApiBody>, Infallible> {
        let (head, body) = req.into_parts();
        // The dashboard's login: the token in the URL becomes a cookie.
        if head.uri.path() == "/dashboard" {
            if let Some(token) = query_param(head.uri.query(), "token") {
                return Ok(self.login(&head, token));
            }
        }
        let open = matches!(head.uri.path(), "/healthz" | "/readyz");
        match self.access.check(&head, open) {
            Ok(()) => {}
            Err(Refusal::Credential) if head.uri.path().starts_with("/dashboard") => {
                return Ok(page(
                    StatusCode::UNAUTHORIZED,
                    "text/html; charset=utf-8",
                    DASHBOARD_LOGIN,
                ));
            }
            Err(Refusal::Credential) => {
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": "the admin credential is missing or wrong (the CLI reads it from the control plane's data directory: --data or TANDEM_DATA, or --admin-token-file)"}),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"tandem\""),
                );
                return Ok(r);
            }
            Err(Refusal::Host(e) | Refusal::Origin(e)) => {
                tracing::warn!(error = %e, "API request refused");
                return Ok(json(
                    StatusCode::FORBIDDEN,
                    &serde_json::json!({ "error": e }),
                ));
            }
        }
        let req = Request::from_parts(head, ());
        if req.method() == http::Method::PUT && req.uri().path() == "/api/v1/config" {
            return Ok(self.push_config(body).await);
        }
        if req.method() == http::Method::POST {
            let resp = match req.uri().path() {
                "/api/v1/ca/rotate" => match self.ca.rotate().await {
                    Ok(r) => json(StatusCode::OK, &r),
                    Err(e) => json(StatusCode::CONFLICT, &serde_json::json!({ "error": e })),
                },
                "/api/v1/explain" => self.explain(body).await,
                "/api/v1/ca/retire" => {
                    let force = query_param(req.uri().query(), "force") == Some("true");
                    match self.ca.retire(force).await {
                        Ok(r) => json(StatusCode::OK, &serde_json::json!({ "retired": r })),
                        Err(e) => json(StatusCode::CONFLICT, &serde_json::json!({ "error": e })),
                    }
                }
                path => match rollout_path(path) {
                    Some((ns, name, Some(action))) => self.rollout_action(ns, name, action).await,
                    _ => json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "not found"}),
                    ),
                },
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
            "/api/v1/stats/routes" => match stats_window(req.uri().query()) {
                Ok(window) => json(StatusCode::OK, &self.stats.routes(window)),
                Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e })),
            },
            "/api/v1/tap" => self.tap(req.uri().query()),
            "/api/v1/stats/series" => self.series(req.uri().query()),
            "/api/v1/stats/destination" => {
                let q = req.uri().query();
                let service = query_param(q, "service").map(decode);
                let since = query_param(q, "since_ms").and_then(|v| v.parse::<u64>().ok());
                match (service, since) {
                    (Some(service), Some(ms)) => {
                        let since = tokio::time::Instant::now()
                            .checked_sub(Duration::from_millis(ms))
                            .unwrap_or_else(tokio::time::Instant::now);
                        json(
                            StatusCode::OK,
                            &self.stats.destination_counters(&service, since),
                        )
                    }
                    _ => json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "service and since_ms are needed"}),
                    ),
                }
            }
            "/dashboard" | "/dashboard/" => {
                page(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD_HTML)
            }
            "/dashboard/app.js" => page(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                DASHBOARD_JS,
            ),
            "/api/v1/config" => json(StatusCode::OK, &self.mesh.config_status()),
            "/api/v1/push" => json(StatusCode::OK, &self.mesh.push_status()),
            "/api/v1/ca" => json(StatusCode::OK, &self.ca.info()),
            "/api/v1/store" => json(StatusCode::OK, &self.store_status().await),
            "/api/v1/exports" => json(StatusCode::OK, &crate::remote::exports(&self.mesh)),
            "/api/v1/clusters" => json(
                StatusCode::OK,
                &serde_json::json!({
                    "cluster": self.mesh.cluster(),
                    "exports": crate::remote::exports(&self.mesh),
                    "remotes": self.remotes.status(),
                }),
            ),
            "/api/v1/rollouts" => json(StatusCode::OK, &self.rollouts.list()),
            "/healthz" | "/readyz" => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            path => match rollout_path(path) {
                Some((ns, name, None)) => {
                    match self
                        .rollouts
                        .list()
                        .into_iter()
                        .find(|v| v.namespace == ns && v.name == name)
                    {
                        Some(v) => json(StatusCode::OK, &v),
                        None => json(
                            StatusCode::NOT_FOUND,
                            &serde_json::json!({"error": format!("no Rollout {ns}/{name} in the config")}),
                        ),
                    }
                }
                _ => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "not found"}),
                ),
            },
        };
        Ok(resp)
    }

    /// `PUT /api/v1/config`: a whole config set (`{"files": {name:
    /// text}}`), validated, then stored where every replica follows it.
    /// Refused with every `file:line:col` problem (422), or when this
    /// control plane follows a directory (409) or the store cannot be
    /// written (503); the config in force stays.
    async fn push_config(&self, body: Incoming) -> Response<ApiBody> {
        use http_body_util::BodyExt;
        let error = |status, e: String| json(status, &serde_json::json!({ "error": e }));
        let Some(kv) = &self.pushed else {
            let dir = self
                .config_dir
                .as_ref()
                .map_or(String::new(), |d| d.display().to_string());
            return error(
                StatusCode::CONFLICT,
                format!(
                    "this control plane follows the config directory {dir}; change the files there"
                ),
            );
        };
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::Limited::new(body, MAX_CONFIG_BODY).collect(),
        )
        .await;
        let bytes = match read {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "request body: not sent within 10s".into(),
                )
            }
        };
        let pushed: crate::config::Pushed = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        };
        if let Err(problems) = pushed.load() {
            return json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({ "error": "the config has problems; nothing changed", "problems": problems }),
            );
        }
        let value = match serde_json::to_vec(&pushed) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        match kv.put(crate::config::PUSHED_KEY, &value).await {
            Ok(revision) => {
                tracing::info!(files = pushed.files.len(), revision, "config pushed");
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "files": pushed.files.len(), "revision": revision }),
                )
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("config not stored, the config in force stays: {e}"),
            ),
        }
    }

    async fn store_status(&self) -> crate::store::StoreStatus {
        match &self.store {
            Some(shared) => shared.status().await,
            None => crate::store::StoreStatus {
                kind: "local",
                location: self.data_dir.display().to_string(),
                replica: String::new(),
                leader: None,
                replicas: Vec::new(),
                members: Vec::new(),
                error: None,
            },
        }
    }

    /// `POST /api/v1/explain`: what the mesh would do with the request in
    /// the body (`tandem_config::explain::ExplainRequest`, JSON), from the
    /// config and rollout splits in force.
    async fn explain(&self, body: Incoming) -> Response<ApiBody> {
        use http_body_util::BodyExt;
        let bad = |e: String| json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e }));
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::Limited::new(body, MAX_EXPLAIN_BODY).collect(),
        )
        .await;
        let bytes = match read {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return bad(format!("request body: {e}")),
            Err(_) => return bad("request body: not sent within 5s".into()),
        };
        let req: tandem_config::explain::ExplainRequest = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => return bad(format!("request body: {e}")),
        };
        let trust_domain = self.ca.info().trust_domain;
        match tandem_config::explain::explain(
            &self.mesh.config(),
            &self.mesh.splits(),
            &trust_domain,
            &req,
        ) {
            Ok(e) => json(StatusCode::OK, &e),
            Err(e) => bad(e),
        }
    }

    /// `/dashboard?token=T`: with the right token, a cookie for the
    /// dashboard and a redirect to it (the token leaves the address bar).
    fn login(&self, head: &http::request::Parts, token: &str) -> Response<ApiBody> {
        if let Err(Refusal::Host(e) | Refusal::Origin(e)) = self.access.check(head, true) {
            return json(StatusCode::FORBIDDEN, &serde_json::json!({ "error": e }));
        }
        let want = dashboard_token(&self.access.credential);
        if !constant_time_eq(token.as_bytes(), want.as_bytes()) {
            return page(
                StatusCode::UNAUTHORIZED,
                "text/html; charset=utf-8",
                DASHBOARD_LOGIN,
            );
        }
        let mut r = page(StatusCode::SEE_OTHER, "text/plain", "");
        r.headers_mut().insert(
            http::header::LOCATION,
            http::HeaderValue::from_static("/dashboard"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&format!(
            "{DASHBOARD_COOKIE}={want}; HttpOnly; SameSite=Strict; Path=/"
        )) {
            r.headers_mut().insert(http::header::SET_COOKIE, v);
        }
        r
    }

    /// `GET /api/v1/stats/series?service=NAME&window=5m&step=10s`: what
    /// the callers of a service saw of it, step by step.
    fn series(&self, query: Option<&str>) -> Response<ApiBody> {
        let bad = |e: String| json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e }));
        let Some(service) = query_param(query, "service").filter(|s| !s.is_empty()) else {
            return bad("name the service: ?service=NAME".into());
        };
        let dur = |k: &str, default: Duration| match query_param(query, k) {
            None => Ok(default),
            Some(v) => tandem_config::duration::parse_within(
                v,
                Duration::from_secs(1),
                Duration::from_secs(300),
            )
            .map_err(|e| format!("{k}: {e}")),
        };
        let (window, step) = match (
            dur("window", Duration::from_secs(300)),
            dur("step", Duration::from_secs(10)),
        ) {
            (Ok(w), Ok(s)) => (w, s),
            (Err(e), _) | (_, Err(e)) => return bad(e),
        };
        json(StatusCode::OK, &self.stats.series(service, window, step))
    }

    /// `GET /api/v1/tap?service=NAME[.NAMESPACE]&path=PREFIX&method=M&rate=N&headers=reveal`:
    /// the tapped proxies' summaries as JSON lines, for as long as the
    /// caller reads (`?max=N` ends the answer after N lines).
    fn tap(&self, query: Option<&str>) -> Response<ApiBody> {
        let bad = |e: &str| json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e }));
        let param = |k| query_param(query, k).map(decode);
        let Some(service) = param("service").filter(|s| !s.is_empty()) else {
            return bad("name the service to tap: ?service=NAME");
        };
        let (ns, svc) =
            tandem_config::compile::resolve_name(&service, tandem_config::model::DEFAULT_NAMESPACE);
        if !tandem_identity::spiffe::valid_label(ns) || !tandem_identity::spiffe::valid_label(svc) {
            return bad("the service is not a service name");
        }
        let path = param("path").unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.len() > 1024 {
            return bad("path must be a path prefix (`/api`)");
        }
        let method = param("method").unwrap_or_default().to_ascii_uppercase();
        if method.len() > 32 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad("method must be an HTTP method");
        }
        let rate = match param("rate").map(|r| r.parse::<u32>()) {
            None => 50,
            Some(Ok(r)) if (1..=1000).contains(&r) => r,
            Some(_) => return bad("rate must be 1 to 1000 summaries a second"),
        };
        let max = match param("max").map(|r| r.parse::<u64>()) {
            None => u64::MAX,
            Some(Ok(m)) if m > 0 => m,
            Some(_) => return bad("max must be a positive number"),
        };
        let tap = self.taps.start(
            &self.mesh,
            TapRequest {
                namespace: ns.to_string(),
                service: svc.to_string(),
                path_prefix: path,
                method,
                per_second: rate,
                reveal_headers: param("headers").as_deref() == Some("reveal"),
            },
        );
        if tap.proxies == 0 {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({ "error": format!("no connected proxy of {ns}/{svc} to tap") }),
            );
        }
        // The first line says what is tapped; then one line per request.
        let first = serde_json::json!({ "tap": tap.id, "service": format!("{ns}/{svc}"), "proxies": tap.proxies })
            .to_string();
        let lines = futures_util::stream::unfold((tap, 0u64), move |(mut tap, n)| async move {
            if n >= max {
                return None;
            }
            let line = tap.events.recv().await?;
            Some((line, (tap, n + 1)))
        });
        let frames = futures_util::StreamExt::map(
            futures_util::StreamExt::chain(futures_util::stream::once(async { first }), lines),
            |l| Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(l + "\n"))),
        );
        let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed_unsync());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }

    async fn rollout_action(&self, ns: &str, name: &str, action: &str) -> Response<ApiBody> {
        let Some(a) = Action::parse(action) else {
            return json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("unknown action `{action}`; use pause, resume, abort or promote")}),
            );
        };
        match self.rollouts.act(ns, name, a).await {
            Ok(v) => json(StatusCode::OK, &v),
            Err(ActError::NotFound) => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("no Rollout {ns}/{name} in the config")}),
            ),
            Err(ActError::Refused(e)) => {
                json(StatusCode::CONFLICT, &serde_json::json!({ "error": e }))
            }
            Err(ActError::Store(e)) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "error": e }),
            ),
        }
    }
}

/// `/api/v1/rollouts/NS/NAME[/ACTION]`.
fn rollout_path(path: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = path.strip_prefix("/api/v1/rollouts/")?;
    let mut parts = rest.split('/');
    let (ns, name) = (parts.next()?, parts.next()?);
    let action = parts.next();
    if parts.next().is_some() || ns.is_empty() || name.is_empty() {
        return None;
    }
    Some((ns, name, action))
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

/// `%2F` and `+` in a query value.
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The dashboard: one page and its script, compiled in (no build step,
/// no Node). docs/observability.md says what it shows.
const DASHBOARD_HTML: &str = include_str!("../dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("../dashboard/app.js");
const DASHBOARD_LOGIN: &str = "<!doctype html><title>Tandem</title><p>Open the dashboard with the address <code>tandem dashboard</code> (or <code>tandem up</code>) prints: it carries the login token.</p>";

fn page(status: StatusCode, ctype: &'static str, body: &'static str) -> Response<ApiBody> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    // The page's own script and style only.
    r.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        ),
    );
    r
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<ApiBody> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
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

    fn head(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().uri("/api/v1/ca");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn hosts_origins_and_the_credential() {
        let access = Access {
            credential: "s3cret-s3cret-s3cret-s3cret-s3cret".into(),
            export_credential: "export-export-export-export-export".into(),
            hosts: vec!["tandem.internal".into()],
        };
        let auth = "Bearer s3cret-s3cret-s3cret-s3cret-s3cret";
        // The export credential reads the exports, and nothing else.
        let export = |method: &str, path: &str| {
            let mut h = head(&[
                ("host", "127.0.0.1:7701"),
                ("authorization", "Bearer export-export-export-export-export"),
            ]);
            h.method = method.parse().expect("method");
            h.uri = path.parse().expect("path");
            access.check(&h, false)
        };
        assert_eq!(export("GET", "/api/v1/exports"), Ok(()));
        assert_eq!(export("GET", "/api/v1/ca"), Err(Refusal::Credential));
        assert_eq!(export("POST", "/api/v1/exports"), Err(Refusal::Credential));
        assert_eq!(export("PUT", "/api/v1/config"), Err(Refusal::Credential));
        for host in [
            "127.0.0.1:7701",
            "[::1]:7701",
            "10.1.2.3",
            "localhost:7701",
            "LOCALHOST",
            "tandem.internal:7701",
        ] {
            assert_eq!(
                access.check(&head(&[("host", host), ("authorization", auth)]), false),
                Ok(()),
                "{host}"
            );
        }
        // DNS rebinding: a name that resolves here but is not ours.
        for host in ["evil.example:7701", "127.0.0.1.nip.io", "", "a b"] {
            assert!(matches!(
                access.check(&head(&[("host", host), ("authorization", auth)]), false),
                Err(Refusal::Host(_))
            ));
        }
        assert!(matches!(
            access.check(&head(&[]), true),
            Err(Refusal::Host(_))
        ));
        // CSRF: another site's page posting here.
        let h = "127.0.0.1:7701";
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
            assert!(matches!(
                access.check(
                    &head(&[("host", h), ("origin", origin), ("authorization", auth)]),
                    false
                ),
                Err(Refusal::Origin(_))
            ));
        }
        assert_eq!(
            access.check(
                &head(&[
                    ("host", h),
                    ("origin", "http://127.0.0.1:7701"),
                    ("authorization", auth)
                ]),
                false
            ),
            Ok(())
        );
        assert!(matches!(
            access.check(
                &head(&[
                    ("host", h),
                    ("sec-fetch-site", "cross-site"),
                    ("authorization", auth)
                ]),
                false
            ),
            Err(Refusal::Origin(_))
        ));
        // The credential: missing, wrong, another scheme; not needed when open.
        for a in [
            "",
            "Bearer wrong",
            "Basic czNjcmV0",
            "Bearer s3cret-s3cret-s3cret-s3cret-s3cre",
        ] {
            assert_eq!(
                access.check(&head(&[("host", h), ("authorization", a)]), false),
                Err(Refusal::Credential),
                "{a}"
            );
        }
        assert_eq!(access.check(&head(&[("host", h)]), true), Ok(()));
    }

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
