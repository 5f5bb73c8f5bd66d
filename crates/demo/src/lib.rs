//! `tandem demo-app`: the sample service of the demo mesh and the tests.
//!
//! It answers HTTP/1.1 and HTTP/2 (h2c) on one port:
//! - `GET /` — JSON naming `service`, `version` and `instance`; with
//!   `--call [METHOD ]NAME[/PATH]` it first calls each named service through
//!   its sidecar's HTTP proxy port (`GET /` by default) and includes their
//!   answers (a failing call makes the answer a 502, so failures travel up
//!   the call chain);
//! - `/echo` — streams the request body back (any size, never buffered);
//! - `/slow?ms=N` — answers after N milliseconds;
//! - `/headers` — the request headers as JSON (and an HTTP/2 request's
//!   `:authority`);
//! - `/set-header?name=N&value=V` — answers with the response header `N: V`;
//! - `/bytes?n=N` — a body of N bytes (at most 1 GiB), streamed in 16 KiB
//!   chunks as the client reads them;
//! - `/flaky?key=K&fails=N&code=C&pad=P` — fails the first N requests of
//!   key K with status C (and P bytes of padding), then answers with the
//!   attempt number and a hash of the body (for retry tests);
//! - `/ws` — WebSocket echo;
//! - gRPC `tandem.v1.Echo` (unary and server-streaming); a unary message
//!   `flaky:KEY:N:...` fails the first N calls of KEY with UNAVAILABLE.
//!
//! - `/hold`, `/open`, `/close`, `/held`, `/counters` — gates and counters
//!   for deterministic tests (see [`gates`]).
//!
//! Knobs: added latency, failure rate, and a load generator (`--rps`).
//! `/knobs?failure_rate=F&latency_ms=N` changes the first two while the
//! app runs (for the demo: make a canary fail and watch its rollout roll
//! back); `/knobs` alone shows them.
//! `--tcp-echo ADDR` adds a raw TCP echo listener.
#![forbid(unsafe_code)]

mod gates;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem_api::v1::echo_server::{Echo, EchoServer};
use tandem_api::v1::{EchoReply, EchoRequest};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub listen: SocketAddr,
    pub service: String,
    pub version: String,
    pub instance: String,
    /// Services called on every `GET /`.
    pub calls: Vec<String>,
    /// The sidecar's HTTP proxy port; without it calls go straight to the
    /// named `host:port`.
    pub proxy: Option<SocketAddr>,
    pub latency: Duration,
    pub failure_rate: f64,
    /// Requests per second sent to each `calls` target (0: no load).
    pub rps: f64,
    pub tcp_echo: Option<SocketAddr>,
}

type Connector = tower::util::BoxCloneSyncService<Uri, TokioIo<TcpStream>, std::io::Error>;

struct App {
    cfg: DemoConfig,
    /// The failure rate (f64 bits) and added latency (µs) in force.
    failure_rate: std::sync::atomic::AtomicU64,
    latency_us: std::sync::atomic::AtomicU64,
    client: Client<Connector, Empty<Bytes>>,
    grpc: tonic::service::Routes,
    /// Requests seen per `/flaky` key.
    flaky: tandem_runtime::sync::Mutex<std::collections::HashMap<String, u32>>,
    gates: Arc<gates::Gates>,
}

pub async fn run(
    cfg: DemoConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = tandem_runtime::listen(cfg.listen).await?;
    if let Some(addr) = cfg.tcp_echo {
        let l = tandem_runtime::listen(addr).await?;
        tokio::spawn(tcp_echo(l));
    }
    let proxy = cfg.proxy;
    let connector: Connector =
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |uri: Uri| async move {
            let addr = match proxy {
                Some(p) => p.to_string(),
                None => uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            };
            let s = TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }));
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let grpc = tonic::service::Routes::new(EchoServer::new(EchoService {
        instance: cfg.instance.clone(),
        flaky: Default::default(),
    }));
    let app = Arc::new(App {
        failure_rate: std::sync::atomic::AtomicU64::new(cfg.failure_rate.to_bits()),
        latency_us: std::sync::atomic::AtomicU64::new(cfg.latency.as_micros() as u64),
        cfg,
        client,
        grpc,
        flaky: Default::default(),
        gates: Default::default(),
    });
    if app.cfg.rps > 0.0 {
        tokio::spawn(load(app.clone()));
    }
    tracing::info!(listen = %app.cfg.listen, service = %app.cfg.service, "demo app serving");
    tandem_runtime::accept_loop(listener, "demo app", shutdown, |sock, _| {
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(app.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(sock), svc)
                .await;
        });
    })
    .await;
    Ok(())
}

async fn tcp_echo(l: TcpListener) {
    tandem_runtime::accept_loop(l, "tcp echo", std::future::pending(), |mut s, _| {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    })
    .await;
}

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let query = req.uri().query().unwrap_or("").to_string();
    let key = query_param(Some(&query), "key").map(str::to_string);
    let gate = |k: &Option<String>| k.clone().unwrap_or_default();
    // The gates' own endpoints, before any latency or injected failure.
    match req.uri().path() {
        "/open" | "/close" => {
            let open = req.uri().path() == "/open";
            let n = app.gates.set_open(&gate(&key), open);
            return Ok(json(StatusCode::OK, &serde_json::json!({ "waiting": n })));
        }
        "/held" => {
            let v = serde_json::to_value(app.gates.held(&gate(&key))).unwrap_or_default();
            return Ok(json(StatusCode::OK, &v));
        }
        "/counters" => {
            let v = serde_json::to_value(app.gates.counters(&gate(&key))).unwrap_or_default();
            return Ok(json(StatusCode::OK, &v));
        }
        "/knobs" => {
            use std::sync::atomic::Ordering::Relaxed;
            let q = Some(query.as_str());
            if let Some(f) = query_param(q, "failure_rate").and_then(|v| v.parse::<f64>().ok()) {
                app.failure_rate.store(f.clamp(0.0, 1.0).to_bits(), Relaxed);
                tracing::info!(failure_rate = f, "knob changed");
            }
            if let Some(ms) = query_param(q, "latency_ms").and_then(|v| v.parse::<f64>().ok()) {
                app.latency_us
                    .store((ms.clamp(0.0, 60_000.0) * 1000.0) as u64, Relaxed);
                tracing::info!(latency_ms = ms, "knob changed");
            }
            let v = serde_json::json!({
                "failure_rate": f64::from_bits(app.failure_rate.load(Relaxed)),
                "latency_ms": app.latency_us.load(Relaxed) as f64 / 1000.0,
            });
            return Ok(json(StatusCode::OK, &v));
        }
        _ => {}
    }
    // Every request is counted under the empty key, and under its own;
    // a shadow copy from a sidecar's mirror also under `mirrored`.
    let started = [
        Some(app.gates.start("")),
        key.as_deref()
            .filter(|k| !k.is_empty())
            .map(|k| app.gates.start(k)),
        req.headers()
            .contains_key("tandem-mirror")
            .then(|| app.gates.start("mirrored")),
    ];
    let complete = |started: [Option<gates::Started>; 3]| {
        for s in started.into_iter().flatten() {
            s.complete();
        }
    };
    if req.uri().path() == "/hold" {
        let max = query_param(Some(&query), "max_ms")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(60), Duration::from_millis);
        let resp = match app.gates.hold(&gate(&key), max).await {
            gates::Hold::Released => json(
                StatusCode::OK,
                &serde_json::json!({
                    "service": app.cfg.service,
                    "version": app.cfg.version,
                    "instance": app.cfg.instance,
                    "key": gate(&key),
                }),
            ),
            gates::Hold::TimedOut => full(
                StatusCode::GATEWAY_TIMEOUT,
                "text/plain",
                "hold timed out\n",
            ),
        };
        complete(started);
        return Ok(resp);
    }
    let resp = serve(app, req).await;
    complete(started);
    resp
}

async fn serve(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        let resp = match app.grpc.clone().oneshot(req).await {
            Ok(r) => r.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
            Err(e) => match e {},
        };
        return Ok(resp);
    }
    let latency = app.latency_us.load(std::sync::atomic::Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
    let me = serde_json::json!({
        "service": app.cfg.service,
        "version": app.cfg.version,
        "instance": app.cfg.instance,
    });
    let path = req.uri().path().to_string();
    let ctx = req.headers().clone();
    let resp = match path.as_str() {
        "/echo" => {
            let mut r = Response::new(
                req.into_body()
                    .map_err(|e| -> BoxError { Box::new(e) })
                    .boxed_unsync(),
            );
            r.headers_mut()
                .insert("x-served-by", header(&app.cfg.instance));
            r
        }
        "/bytes" => {
            let n = query_param(req.uri().query(), "n")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(1 << 30);
            let mut r = Response::new(Blocks { left: n }.boxed_unsync());
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
            r
        }
        "/slow" => {
            let ms: u64 = query_param(req.uri().query(), "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
            json(StatusCode::OK, &me)
        }
        "/headers" => {
            // A header sent several times shows its values joined by ", ";
            // an HTTP/2 request's authority shows as `:authority`.
            let mut h = serde_json::Map::new();
            for k in req.headers().keys() {
                let values: Vec<String> = req
                    .headers()
                    .get_all(k)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                h.insert(k.to_string(), values.join(", ").into());
            }
            if let Some(a) = req.uri().authority() {
                h.insert(":authority".into(), a.as_str().into());
            }
            json(StatusCode::OK, &serde_json::Value::Object(h))
        }
        "/ws" => websocket(req),
        "/set-header" => {
            // Answers 200 with the response header `name: value` (for tests
            // of what a sidecar lets through from an app).
            let q = req.uri().query();
            let mut r = json(StatusCode::OK, &me);
            if let (Some(n), Some(v)) = (query_param(q, "name"), query_param(q, "value")) {
                if let (Ok(n), Ok(v)) = (
                    http::header::HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    r.headers_mut().insert(n, v);
                }
            }
            r
        }
        "/flaky" => flaky(&app, req).await,
        _ => {
            let failure_rate =
                f64::from_bits(app.failure_rate.load(std::sync::atomic::Ordering::Relaxed));
            if failure_rate > 0.0 && fastrand::f64() < failure_rate {
                let mut v = me.clone();
                v["error"] = "injected failure".into();
                return Ok(json(StatusCode::INTERNAL_SERVER_ERROR, &v));
            }
            let mut calls = Vec::new();
            let mut failed = false;
            for target in &app.cfg.calls {
                let (method, target, call_path) = parse_call(target);
                let (status, body) = call(&app, method, target, call_path, &ctx).await;
                failed |= status == 0 || status >= 500;
                calls.push(serde_json::json!({"service": target, "status": status, "body": body}));
            }
            let mut v = me.clone();
            v["path"] = path.into();
            v["calls"] = calls.into();
            json(
                if failed {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::OK
                },
                &v,
            )
        }
    };
    Ok(resp)
}

fn header(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// What an app passes on from the request it serves to the calls it makes:
/// the mesh's request context (`tandem-ctx-*`: deadline, no-retry), the
/// trace (W3C and B3) and the request id, so that its sidecars' spans and
/// log lines join up.
fn propagated(name: &str) -> bool {
    name.starts_with("tandem-ctx-")
        || name.starts_with("x-b3-")
        || matches!(name, "traceparent" | "tracestate" | "b3" | "x-request-id")
}

/// Calls `target` through the sidecar, passing on the request's context
/// ([`propagated`]) as an app should; returns the status (0 when the call
/// failed) and the JSON body (or the error text).
/// A `--call` target: `[METHOD ]NAME[/PATH]` (`GET` and `/` by default).
fn parse_call(spec: &str) -> (http::Method, &str, &str) {
    let (method, rest) = match spec.split_once(' ') {
        Some((m, rest)) => (
            http::Method::from_bytes(m.as_bytes()).unwrap_or(http::Method::GET),
            rest.trim(),
        ),
        None => (http::Method::GET, spec),
    };
    match rest.find('/') {
        Some(i) => (method, &rest[..i], &rest[i..]),
        None => (method, rest, "/"),
    }
}

async fn call(
    app: &App,
    method: http::Method,
    target: &str,
    path: &str,
    ctx: &http::HeaderMap,
) -> (u16, serde_json::Value) {
    let uri: Uri = match format!("http://{target}{path}").parse() {
        Ok(u) => u,
        Err(e) => return (0, e.to_string().into()),
    };
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri;
    *req.method_mut() = method;
    for (k, v) in ctx {
        if propagated(k.as_str()) {
            req.headers_mut().append(k, v.clone());
        }
    }
    let fut = async {
        let resp = app.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into());
        Ok::<_, String>((status, v))
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (0, e.into()),
        Err(_) => (0, "timed out".into()),
    }
}

/// Sends `rps` requests per second to each target, without waiting for
/// answers (an open-loop load, so a slow service shows as latency).
async fn load(app: Arc<App>) {
    let period = Duration::from_secs_f64(1.0 / app.cfg.rps);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let limit = Arc::new(tokio::sync::Semaphore::new(512));
    loop {
        tick.tick().await;
        for target in app.cfg.calls.clone() {
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let (method, target, path) = parse_call(&target);
                let _ = call(&app, method, target, path, &http::HeaderMap::new()).await;
                drop(permit);
            });
        }
    }
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "websocket upgrade expected\n",
        );
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = full(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let h = r.headers_mut();
    h.remove(http::header::CONTENT_TYPE);
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert("sec-websocket-accept", header(&accept));
    r
}

struct EchoService {
    instance: String,
    /// Calls seen per `flaky:` key.
    flaky: tandem_runtime::sync::Mutex<std::collections::HashMap<String, u32>>,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let m = request.into_inner().message;
        // `flaky:KEY:N:...`: the first N calls of KEY fail with UNAVAILABLE;
        // later ones echo the message with the call's number.
        if let Some(rest) = m.strip_prefix("flaky:") {
            let mut parts = rest.splitn(3, ':');
            let key = parts.next().unwrap_or_default().to_string();
            let fails: u32 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            let n = {
                let mut seen = self.flaky.lock();
                let n = seen.entry(key).or_insert(0);
                *n += 1;
                *n
            };
            if n <= fails {
                return Err(tonic::Status::unavailable(format!(
                    "call {n} fails on purpose"
                )));
            }
            return Ok(tonic::Response::new(EchoReply {
                message: format!("call {n}: {m}"),
                served_by: self.instance.clone(),
            }));
        }
        if let Some(reason) = m.strip_prefix("fail:") {
            // The status travels in the trailers; the caller seeing it proves
            // trailers crossed every hop.
            let mut status = tonic::Status::resource_exhausted(reason.to_string());
            status
                .metadata_mut()
                .insert("x-demo-trailer", "kept".parse().expect("static"));
            return Err(status);
        }
        Ok(tonic::Response::new(EchoReply {
            message: m,
            served_by: self.instance.clone(),
        }))
    }

    type ServerStreamStream =
        futures_util::stream::BoxStream<'static, Result<EchoReply, tonic::Status>>;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, tonic::Status> {
        let r = request.into_inner();
        let served_by = self.instance.clone();
        let n = r.count.min(10_000);
        let s = futures_util::stream::iter((0..n).map(move |i| {
            Ok(EchoReply {
                message: format!("{} {i}", r.message),
                served_by: served_by.clone(),
            })
        }));
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

/// `/flaky?key=K&fails=N&code=C`: the first N requests with key K are
/// answered with status C (default 503, with `Retry-After` if `retry_after`
/// is given); later ones with 200 and JSON naming the attempt, the body's
/// length and its FNV-1a hash, so a test can check that a replayed body
/// arrived intact.
/// The value of `name` in a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// `/bytes`: N bytes of `x`, in chunks of one static block.
struct Blocks {
    left: u64,
}

static BLOCK: [u8; 16 * 1024] = [b'x'; 16 * 1024];

impl http_body::Body for Blocks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(BLOCK.len() as u64) as usize;
        self.left -= n as u64;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            &BLOCK[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

async fn flaky(app: &App, req: Request<Incoming>) -> Response<Body> {
    let q = req.uri().query().unwrap_or("").to_string();
    let param = |name: &str| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let key = param("key").unwrap_or_default();
    let fails: u32 = param("fails").and_then(|v| v.parse().ok()).unwrap_or(1);
    let code = param("code")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let attempt = {
        let mut m = app.flaky.lock();
        let n = m.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let hash = body.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    let mut v = serde_json::json!({
        "key": key,
        "attempt": attempt,
        "body_len": body.len(),
        "body_fnv1a": format!("{hash:016x}"),
        "instance": app.cfg.instance,
    });
    if attempt <= fails {
        // `pad=N`: a failure with a larger body (up to 1 MiB).
        if let Some(n) = param("pad").and_then(|v| v.parse::<usize>().ok()) {
            v["pad"] = "x".repeat(n.min(1 << 20)).into();
        }
        let mut r = json(code, &v);
        if let Some(s) = param("retry_after") {
            if let Ok(h) = http::HeaderValue::from_str(&s) {
                r.headers_mut().insert(http::header::RETRY_AFTER, h);
            }
        }
        return r;
    }
    json(StatusCode::OK, &v)
}
