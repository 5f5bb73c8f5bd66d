//! The HTTP data path: outbound (from the local app to a destination
//! service, chosen by route and balanced over endpoints) and inbound (from
//! other sidecars to the local app). HTTP/1.1, HTTP/2 and gRPC are forwarded
//! with streaming bodies and trailers; HTTP/1.1 upgrades (WebSocket) become a
//! byte tunnel after the 101.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderName, CONNECTION, HOST, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tandem_config::snapshot::Protocol;
use tokio::time::Instant;

use crate::error::{Body, MeshError};
use crate::metrics::{Direction, Name, RequestLabels};
use crate::outlier::Outcome;
use crate::pool::{ConnLimits, Pool, PoolError};
use crate::replay::{Replay, REPLAY_LIMIT};
use crate::route::{pick_weighted, select, RequestView};
use crate::state::{Backend, Destination, Endpoint};
use crate::transport::Connector;
use crate::Proxy;

/// The header the inbound sidecar sets to the caller's verified SPIFFE ID
/// (and removes from anything that arrives, so it cannot be spoofed).
pub const CLIENT_ID_HEADER: &str = "tandem-client-id";

/// The connectors (mTLS to meshed endpoints, offering ALPN http/1.1 or
/// h2) and the connection pools towards the local app. Pools towards
/// endpoints live with the endpoints ([`Endpoint::pool`]).
pub struct Clients {
    h1: Connector,
    h2: Connector,
    app_h1: Arc<Pool>,
    app_h2: Arc<Pool>,
}

impl Clients {
    pub fn new(h1: Connector, h2: Connector, app: &Authority) -> Self {
        let uri = |a: &Authority| {
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(a.clone())
                .path_and_query("/")
                .build()
                .unwrap_or_default()
        };
        Clients {
            h1,
            h2,
            app_h1: Pool::new(uri(app), false),
            app_h2: Pool::new(uri(app), true),
        }
    }

    fn connector(&self, p: Protocol) -> &Connector {
        if p.is_h2() {
            &self.h2
        } else {
            &self.h1
        }
    }

    fn app(&self, p: Protocol) -> &Arc<Pool> {
        if p.is_h2() {
            &self.app_h2
        } else {
            &self.app_h1
        }
    }
}

/// The verified caller of an inbound connection.
pub struct Peer {
    /// Metric label: the calling service.
    pub service: Name,
    /// Its SPIFFE ID, as the `tandem-client-id` value.
    pub client_id: HeaderValue,
}

/// A response body as the listeners send it: it keeps the request counted
/// (in the sidecar's `--max-requests` and the destination's
/// `circuitBreaker.maxRequests`) until its last byte is sent or the
/// caller goes away, not only until the response headers.
pub struct Served {
    body: Body,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _counted: Option<crate::retry::InProgress>,
}

impl Served {
    pub fn new(
        body: Body,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
        counted: Option<crate::retry::InProgress>,
    ) -> Self {
        Served {
            body,
            _permit: permit,
            _counted: counted,
        }
    }
}

impl http_body::Body for Served {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Where outbound traffic of a listener goes.
#[derive(Clone)]
pub enum Outbound {
    /// The HTTP proxy port: destination from the request's authority.
    ByAuthority,
    /// A per-upstream port: always this destination.
    Fixed(Arc<str>),
}

pub async fn outbound(
    proxy: Arc<Proxy>,
    target: Outbound,
    req: Request<Incoming>,
) -> Result<Response<Served>, Infallible> {
    let start = Instant::now();
    // Shed load before doing any work for it.
    let Ok(permit) = proxy.limits.outbound_requests.clone().try_acquire_owned() else {
        let src = proxy.service.clone();
        return Ok(overloaded(
            &proxy,
            Direction::outbound,
            src,
            proxy.unknown.clone(),
            start,
        ));
    };
    let mut counted = None;
    let (resp, dst) = match route_outbound(&proxy, &target, req, start, &mut counted).await {
        Ok(r) => r,
        Err((e, detail, dst)) => (e.response(&detail), dst),
    };
    record(
        &proxy,
        Direction::outbound,
        proxy.service.clone(),
        dst,
        &resp,
        start,
    );
    Ok(resp.map(|b| Served::new(b, Some(permit), counted)))
}

type Failed = (MeshError, String, Name);

/// Routes and sends one outbound request. `start` is when it arrived (its
/// deadline counts from then, discovery included); a place it takes in the
/// destination's `maxRequests` is left in `counted`, to be held until the
/// response body ends.
async fn route_outbound(
    proxy: &Arc<Proxy>,
    target: &Outbound,
    req: Request<Incoming>,
    start: Instant,
    counted: &mut Option<crate::retry::InProgress>,
) -> Result<(Response<Body>, Name), Failed> {
    let unknown = proxy.unknown.clone();
    // Borrowed unless the host needs lower-casing: no allocation per request.
    let (host, port): (Cow<'_, str>, Option<u16>) = match target {
        Outbound::Fixed(name) => (Cow::Borrowed(&**name), None),
        Outbound::ByAuthority => match authority_of(&req) {
            Some((h, p)) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                (Cow::Owned(h.to_ascii_lowercase()), p)
            }
            Some((h, p)) => (Cow::Borrowed(h), p),
            None => {
                return Err((
                    MeshError::BadRequest,
                    "request names no host".into(),
                    unknown,
                ));
            }
        },
    };
    let host = destination_key(&host);
    let known = proxy.routing.load().destination(host).cloned();
    let dest = match known {
        Some(d) => d,
        None => match discover(proxy, host).await {
            Discovery::Found(d) => d,
            Discovery::Unknown => {
                return Err((
                    MeshError::UnknownService,
                    format!("no service `{host}` in the mesh"),
                    unknown,
                ))
            }
            Discovery::Unavailable(why) => {
                return Err((
                    MeshError::DiscoveryUnavailable,
                    format!("destination `{host}` is not yet known to this proxy and {why}"),
                    unknown,
                ))
            }
        },
    };
    let (backend, rule) = if dest.routes.is_empty() {
        (0, None)
    } else {
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            port: port.or(Some(dest.default_port)),
        };
        let Some(i) = select(&dest.routes, &view) else {
            return Err((
                MeshError::NoRoute,
                format!(
                    "no route of `{}` matches {} {}",
                    dest.name.0,
                    req.method(),
                    req.uri().path()
                ),
                dest.name.clone(),
            ));
        };
        (pick_backend(&dest, i), Some(i))
    };
    // A matched rule's own timeouts and retry come before the
    // destination's TrafficPolicy.
    let policy = rule
        .and_then(|i| dest.route_policies.get(i)?.as_ref())
        .or(dest.policy.as_ref());
    let Some(backend) = dest.backends.get(backend) else {
        return Err((
            MeshError::NoEndpoints,
            "no backend".into(),
            dest.name.clone(),
        ));
    };
    let name = backend.name.clone();
    let ctx = Ctx::of(req.headers());
    let key = policy
        .and_then(|p| p.hash_header.as_ref())
        .and_then(|h| req.headers().get(h))
        .map(|v| crate::state::fnv1a(v.as_bytes()));
    if policy.is_none() && ctx.is_empty() {
        // No policy and no context: one try, nothing buffered or added.
        let Some(ep) = backend.pick() else {
            return Err(no_endpoint(backend));
        };
        return try_endpoint(proxy, &dest, backend, ep, req.map(Body::Stream), None)
            .await
            .map(|r| (r, name.clone()))
            .map_err(|(e, d)| (e, d, name));
    }
    // The sooner of the policy's timeout and the caller's deadline.
    let policy_timeout = policy.and_then(|p| p.timeout);
    let (timeout, from_caller) = match (policy_timeout, ctx.deadline) {
        (Some(p), Some(c)) if c < p => (Some(c), true),
        (Some(p), _) => (Some(p), false),
        (None, c) => (c, c.is_some()),
    };
    let deadline = timeout.map(|t| start + t);
    // The destination's own limit of requests in progress (circuit breaker).
    *counted = match policy.map(|p| p.admit()) {
        None | Some(Some(None)) => None,
        Some(Some(c)) => c,
        Some(None) => {
            return Err((
                MeshError::Overflow,
                format!(
                    "`{}` already has its maximum of requests in progress from this sidecar (circuitBreaker.maxRequests)",
                    dest.name.0
                ),
                name,
            ))
        }
    };
    let plan = Plan {
        policy,
        ctx,
        key,
        deadline,
        own_deadline: if from_caller { None } else { deadline },
    };
    let work = with_retries(proxy, &dest, backend, plan, req);
    match (timeout, deadline) {
        (Some(t), Some(at)) => match tokio::time::timeout_at(at, work).await {
            Ok(r) => r,
            Err(_) => Err((
                MeshError::Timeout,
                if from_caller {
                    format!(
                        "the caller's deadline of {t:?} passed before `{}` answered",
                        dest.name.0
                    )
                } else {
                    format!(
                        "no answer from `{}` within the request timeout of {t:?} ({})",
                        dest.name.0,
                        policy.map(|p| &*p.source).unwrap_or("")
                    )
                },
                name,
            )),
        },
        // Dropping the attempt in flight cancels it upstream too.
        _ => work.await,
    }
}

/// Request context that travels between sidecars through the apps (which
/// pass on every `tandem-ctx-*` header they receive, as they would trace
/// headers): the time the original caller still waits, and whether an
/// outer sidecar already retries this request.
pub const CTX_DEADLINE: &str = "tandem-ctx-deadline-ms";
/// The same deadline as Unix milliseconds, as the inbound sidecar hands it
/// to its app: the app passes it on unchanged to its own sidecar on the same
/// host (one clock), so the time the app spends is not given back.
pub const CTX_DEADLINE_AT: &str = "tandem-ctx-deadline-at";
pub const CTX_NO_RETRY: &str = "tandem-ctx-no-retry";

#[derive(Clone, Copy, Default)]
pub struct Ctx {
    /// Time left, from `tandem-ctx-deadline-ms` or `grpc-timeout`.
    pub deadline: Option<std::time::Duration>,
    pub no_retry: bool,
}

impl Ctx {
    pub fn of(headers: &HeaderMap) -> Ctx {
        let ms = headers
            .get(CTX_DEADLINE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_millis);
        let at = headers
            .get(CTX_DEADLINE_AT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|at| std::time::Duration::from_millis(at.saturating_sub(unix_ms()).max(1)));
        let ms = match (ms, at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let grpc = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let deadline = match (ms, grpc) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ctx {
            deadline,
            no_retry: headers.contains_key(CTX_NO_RETRY),
        }
    }

    /// Hands the deadline to the local app in absolute form.
    fn hand_to_app(&self, headers: &mut HeaderMap) {
        headers.remove(CTX_DEADLINE);
        if let Some(d) = self.deadline {
            let at = unix_ms() + d.as_millis() as u64;
            if let Ok(v) = HeaderValue::from_str(&at.to_string()) {
                headers.insert(CTX_DEADLINE_AT, v);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.deadline.is_none() && !self.no_retry
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n * 3600),
        "M" => std::time::Duration::from_secs(n * 60),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}

/// Marks one try: the time left before the deadline (also as
/// `grpc-timeout` towards gRPC services, when sooner), and that this sidecar
/// retries, so that the next one does not.
fn stamp(req: &mut Request<Body>, deadline: Option<Instant>, grpc: bool, retrying: bool) {
    let h = req.headers_mut();
    h.remove(CTX_DEADLINE_AT);
    if let Some(d) = deadline {
        let left = d
            .saturating_duration_since(Instant::now())
            .as_millis()
            .max(1) as u64;
        if let Ok(v) = HeaderValue::from_str(&left.to_string()) {
            h.insert(CTX_DEADLINE, v);
        }
        if grpc {
            let sooner = h
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(grpc_timeout)
                .is_none_or(|t| t.as_millis() as u64 > left);
            if sooner {
                // At most 8 digits: milliseconds, or seconds beyond that.
                let value = if left <= 99_999_999 {
                    format!("{left}m")
                } else {
                    format!("{}S", (left / 1000).min(99_999_999))
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert("grpc-timeout", v);
                }
            }
        }
    }
    if retrying {
        h.insert(CTX_NO_RETRY, HeaderValue::from_static("1"));
    }
}

fn no_endpoint(backend: &Backend) -> Failed {
    (
        MeshError::NoEndpoints,
        format!("service `{}` has no live endpoint", backend.name.0),
        backend.name.clone(),
    )
}

/// How one request is to be tried: the policy in force, the context it
/// came with, the ring-hash key and the deadline.
struct Plan<'a> {
    policy: Option<&'a crate::retry::RuntimePolicy>,
    ctx: Ctx,
    key: Option<u64>,
    deadline: Option<Instant>,
    /// The policy's own deadline (not the caller's): a try cut off by it
    /// counts against the endpoint in outlier detection.
    own_deadline: Option<Instant>,
}

/// The attempts of one request under a retry policy. The body streams to
/// the first try while a copy of up to 64 KiB is kept ([`Replay`]); a retry
/// sends the copy and the rest. A body that outgrows the copy, one declared
/// larger, and an upgrade get a single try. A retry goes to another
/// endpoint when there is one, after a jittered backoff, and only while the
/// destination's budget allows.
async fn with_retries(
    proxy: &Arc<Proxy>,
    dest: &Arc<Destination>,
    backend: &Backend,
    plan: Plan<'_>,
    req: Request<Incoming>,
) -> Result<(Response<Body>, Name), Failed> {
    let Plan {
        policy,
        ctx,
        key,
        deadline,
        own_deadline,
    } = plan;
    let name = backend.name.clone();
    let grpc = dest.protocol == Protocol::Grpc;
    let retry = policy.and_then(|p| p.retry.as_ref());
    // An outer sidecar retrying this request means one try here (its
    // per-try timeout still holds).
    let retries = match retry {
        Some(r) if !ctx.no_retry => r.attempts,
        _ => 0,
    };
    let Some(retry) = retry else {
        let Some(ep) = backend.pick_for(key) else {
            return Err(no_endpoint(backend));
        };
        let mut req = req.map(Body::Stream);
        stamp(&mut req, deadline, grpc, false);
        return try_endpoint(proxy, dest, backend, ep, req, own_deadline)
            .await
            .map(|r| (r, name.clone()))
            .map_err(|(e, d)| (e, d, name));
    };
    retry.budget.deposit();
    // With no retries (a per-try timeout alone) nothing is kept.
    let replayable = retries > 0
        && !is_upgrade(&req)
        && req
            .body()
            .size_hint()
            .upper()
            .is_none_or(|n| n <= REPLAY_LIMIT as u64);
    let (attempts, parts, handle, mut next) = if replayable {
        let (parts, body) = req.into_parts();
        let first = Replay::new(body);
        let handle = first.handle();
        let req = rebuild(&parts, Body::Replay(first));
        (retries + 1, Some(parts), Some(handle), Some(req))
    } else {
        (1, None, None, Some(req.map(Body::Stream)))
    };
    let mut tried: crate::retry::Tried = Vec::new();
    let mut last: Option<Result<Response<Body>, (MeshError, String)>> = None;
    let mut denied = false;
    for n in 0..attempts {
        if n > 0 {
            let after = match &last {
                Some(Ok(r)) => crate::retry::retry_after(r.headers()),
                _ => None,
            };
            let wait = retry.backoff(n, after);
            // A retry that could not start before the deadline is not made:
            // the caller gets the last answer now.
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                break;
            }
            if !retry.budget.withdraw() {
                denied = true;
                break;
            }
            proxy
                .metrics
                .retries
                .get_or_create(&crate::metrics::RetryLabels {
                    src_service: proxy.service.clone(),
                    dst_service: dest.name.clone(),
                })
                .inc();
            tokio::time::sleep(wait).await;
        }
        let picked = if tried.is_empty() {
            backend.pick_for(key)
        } else {
            backend.pick_avoiding(&tried)
        };
        let Some(ep) = picked else {
            return Err(no_endpoint(backend));
        };
        tried.push(ep.addr());
        let Some(mut req) = next.take() else {
            break;
        };
        stamp(&mut req, deadline, grpc, attempts > 1);
        let cut_off = match (retry.per_try_timeout, own_deadline) {
            (Some(t), Some(d)) => Some(d.min(Instant::now() + t)),
            (Some(t), None) => Some(Instant::now() + t),
            (None, d) => d,
        };
        let attempt = try_endpoint(proxy, dest, backend, ep, req, cut_off);
        let result = match retry.per_try_timeout {
            None => attempt.await,
            Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
                Err((
                    MeshError::Timeout,
                    format!(
                        "{} ({}): no answer within the per-try timeout of {t:?}",
                        backend.name.0, ep.authority
                    ),
                ))
            }),
        };
        let again = match &result {
            Ok(r) => retry.retriable_answer(r.status(), r.headers()),
            Err((e, _)) => retry.retriable_failure(*e),
        };
        // A single try (nothing to replay) answers as it is.
        if !again || attempts == 1 {
            return result
                .map(|r| (r, name.clone()))
                .map_err(|(e, d)| (e, d, name));
        }
        if n + 1 < attempts {
            let (Some(parts), Some(h)) = (&parts, &handle) else {
                break;
            };
            // The body outgrew the copy: the answer stands as it is.
            if h.outgrown() {
                return result
                    .map(|r| (r, name.clone()))
                    .map_err(|(e, d)| (e, d, name));
            }
            // Read the replaced answer first: left unread, it would hold
            // its connection (and maybe the body) until the end.
            let result = match result {
                Ok(r) => Ok(settle(r).await),
                Err(e) => Err(e),
            };
            next = h.next_try().await.map(|b| rebuild(parts, Body::Replay(b)));
            if next.is_none() {
                return result
                    .map(|r| (r, name.clone()))
                    .map_err(|(e, d)| (e, d, name));
            }
            last = Some(result);
            continue;
        }
        last = Some(result);
    }
    // Out of attempts (or of budget): the last answer, marked.
    let flag = if denied {
        MeshError::RetryBudgetExhausted
    } else {
        MeshError::RetryLimitExhausted
    };
    let tries = tried.len();
    match last {
        Some(Ok(mut r)) => {
            r.headers_mut().insert(
                crate::error::ERROR_HEADER,
                HeaderValue::from_static(flag.reason()),
            );
            Ok((r, name))
        }
        Some(Err((MeshError::Timeout, d))) if !denied => Err((
            MeshError::Timeout,
            format!("{d} (after {tries} tries)"),
            name,
        )),
        Some(Err((e, d))) => Err((
            flag,
            format!("{}: {d} (after {tries} tries)", e.reason()),
            name,
        )),
        None => Err(no_endpoint(backend)),
    }
}

/// Longest the body of an answer that a retry replaces is read for.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// An answer that a retry replaces, read whole (up to 64 KiB, within a
/// second) so that its connection is free again; kept in case it ends up
/// the caller's answer. A larger or slower body is dropped (the answer
/// then has an empty one).
async fn settle(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let read = tokio::time::timeout(
        SETTLE_WAIT,
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, REPLAY_LIMIT)),
    )
    .await;
    let body = match read {
        Ok(Ok(collected)) => Body::Collected(collected),
        _ => {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Body::full(bytes::Bytes::new())
        }
    };
    Response::from_parts(parts, body)
}

fn rebuild(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

/// Outlier detection's view of one try: its outcome when it ends, or a
/// gateway error when a timeout of the mesh's own (per try, or the
/// policy's) cuts it off once it was sent. A try dropped for another reason
/// (the caller's deadline, the caller going away), or while it still
/// waited for a connection in this sidecar, says nothing about the
/// endpoint.
struct Watch<'a> {
    proxy: &'a Proxy,
    backend: &'a Backend,
    ep: &'a Endpoint,
    cb: &'a tandem_config::snapshot::CircuitBreaker,
    cut_off: Option<Instant>,
    sent: &'a AtomicBool,
    done: bool,
}

impl Watch<'_> {
    fn record(&mut self, outcome: Outcome) {
        self.done = true;
        if outcome == Outcome::Skipped {
            return;
        }
        if let Some(len) = self.backend.record_outcome(self.ep, outcome, self.cb) {
            tracing::warn!(endpoint = %self.ep.authority, backend = %self.backend.name.0, ejected_for = ?len, "endpoint ejected after consecutive failures");
            self.proxy
                .metrics
                .ejections
                .get_or_create(&crate::metrics::RetryLabels {
                    src_service: self.proxy.service.clone(),
                    dst_service: self.backend.name.clone(),
                })
                .inc();
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.done
            && self.sent.load(Ordering::Acquire)
            && self.cut_off.is_some_and(|t| Instant::now() >= t)
        {
            self.record(Outcome::GatewayError);
        }
    }
}

/// One try against one endpoint; the balancer and outlier detection learn
/// how it went. `cut_off`: when a timeout of the mesh's own ends the try.
async fn try_endpoint(
    proxy: &Proxy,
    dest: &Destination,
    backend: &Backend,
    ep: &Endpoint,
    req: Request<Body>,
    cut_off: Option<Instant>,
) -> Result<Response<Body>, (MeshError, String)> {
    // Never plaintext to a sidecar: with an expired certificate the request
    // is refused here.
    if ep.meshed && proxy.identity.tls.is_expired() {
        return Err((
            MeshError::IdentityExpired,
            "this proxy's certificate expired and could not be renewed".into(),
        ));
    }
    let in_flight = ep.load.start();
    let sent = AtomicBool::new(false);
    let mut watch = dest
        .policy
        .as_ref()
        .and_then(|p| p.circuit_breaker.as_ref())
        .map(|cb| Watch {
            proxy,
            backend,
            ep,
            cb,
            cut_off,
            sent: &sent,
            done: false,
        });
    let limits = dest.policy.as_ref().and_then(|p| p.conn_limits.as_ref());
    let result = forward(proxy, req, &ep.pool, dest.protocol, limits, Some(&sent)).await;
    if let Some(watch) = watch.as_mut() {
        let outcome = match &result {
            Ok(r) if matches!(r.status().as_u16(), 502..=504) => Outcome::GatewayError,
            Ok(r) if r.status().is_server_error() => Outcome::Error,
            Ok(_) => Outcome::Success,
            Err((MeshError::ConnectFailure | MeshError::UpstreamTls, _)) => Outcome::GatewayError,
            // This sidecar's own connection limit: nothing was asked of
            // the endpoint.
            Err((MeshError::Overflow, _)) => Outcome::Skipped,
            Err(_) => Outcome::Error,
        };
        watch.record(outcome);
    }
    match result {
        Ok(resp) => {
            // A peer sidecar that could not reach its own app answers fast
            // with a mesh error: that is a failure of this endpoint, not a
            // quick success.
            let peer_failed = ep.meshed
                && resp
                    .headers()
                    .get(crate::error::ERROR_HEADER)
                    .and_then(|v| MeshError::from_reason(v.as_bytes()))
                    .is_some_and(|e| {
                        matches!(
                            e,
                            MeshError::ConnectFailure
                                | MeshError::UpstreamReset
                                | MeshError::NotConfigured
                                | MeshError::IdentityExpired
                        )
                    });
            if peer_failed {
                in_flight.failed();
            } else {
                in_flight.complete();
            }
            Ok(resp)
        }
        Err(e) => {
            if e.0 == MeshError::Overflow {
                // Refused here: no latency to learn from.
                in_flight.cancel();
            } else {
                in_flight.failed();
            }
            Err((
                e.0,
                format!("{} ({}): {}", backend.name.0, ep.authority, e.1),
            ))
        }
    }
}

fn pick_backend(dest: &Destination, idx: usize) -> usize {
    let Some(r) = dest.routes.get(idx) else {
        return 0;
    };
    let total = dest.totals.get(idx).copied().unwrap_or(0);
    pick_weighted(r.backends.iter().map(|b| b.weight), total)
        .and_then(|i| r.backends.get(i))
        .map(|b| b.backend)
        .unwrap_or(0)
}

enum Discovery {
    Found(Arc<Destination>),
    /// The control plane says no such service exists.
    Unknown,
    /// No answer could be had (the reason is in the string).
    Unavailable(&'static str),
}

/// On-demand discovery: asks the control plane for a destination this proxy
/// has not needed before and waits briefly for a snapshot that has it.
async fn discover(proxy: &Arc<Proxy>, host: &str) -> Discovery {
    if proxy.routing.load().is_unknown(host) || !plausible_service_name(host) {
        return Discovery::Unknown;
    }
    let mut changes = proxy.routing_changed.subscribe();
    if !proxy.subscribe(host) {
        return Discovery::Unavailable(
            "this proxy already tracks the maximum number of destinations",
        );
    }
    if proxy.metrics.control_connected.get() == 0 {
        return Discovery::Unavailable("the control plane is unreachable");
    }
    let deadline = Instant::now() + crate::DISCOVERY_WAIT;
    loop {
        {
            let routing = proxy.routing.load();
            if let Some(d) = routing.destination(host) {
                return Discovery::Found(d.clone());
            }
            if routing.is_unknown(host) {
                return Discovery::Unknown;
            }
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Discovery::Unavailable("the control plane did not answer in time"),
        }
    }
}

/// `catalog.default.svc.cluster.local`, `catalog.default` and (in the
/// proxy's namespace) `catalog` name the same destination: only the first
/// two labels count.
pub fn destination_key(host: &str) -> &str {
    match host.match_indices('.').nth(1) {
        Some((i, _)) => &host[..i],
        None => host,
    }
}

fn plausible_service_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

pub async fn inbound(
    proxy: Arc<Proxy>,
    peer: Option<Arc<Peer>>,
    mut req: Request<Incoming>,
) -> Result<Response<Served>, Infallible> {
    let start = Instant::now();
    let Ok(permit) = proxy.limits.inbound_requests.clone().try_acquire_owned() else {
        let src = peer
            .as_ref()
            .map(|p| p.service.clone())
            .unwrap_or_else(|| proxy.unknown.clone());
        return Ok(overloaded(
            &proxy,
            Direction::inbound,
            src,
            proxy.service.clone(),
            start,
        ));
    };
    let headers = req.headers_mut();
    headers.remove(CLIENT_ID_HEADER);
    let src = match &peer {
        Some(p) => {
            headers.insert(CLIENT_ID_HEADER, p.client_id.clone());
            p.service.clone()
        }
        None => proxy.unknown.clone(),
    };
    let (protocol, limited) = {
        let routing = proxy.routing.load();
        let limited = routing
            .limiter
            .as_ref()
            .and_then(|l| l.check(&src, std::time::Instant::now()).err());
        (routing.inbound.as_ref().map(|i| i.protocol), limited)
    };
    let resp = match protocol {
        None => {
            MeshError::NotConfigured.response("this proxy's service is not declared in the config")
        }
        Some(_) if proxy.identity.tls.is_expired() => MeshError::IdentityExpired
            .response("this proxy's certificate expired and could not be renewed"),
        Some(_) if limited.is_some() => {
            let wait = limited.unwrap_or_default();
            let mut r = MeshError::RateLimited.response(&format!(
                "`{}` is over its rate limit for this caller; retry in {wait:?}",
                proxy.service.0
            ));
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            r
        }
        Some(protocol) => {
            // The caller's deadline holds here too: when it passes, the
            // app's request is cancelled (its connection closed).
            let ctx = Ctx::of(req.headers());
            let deadline = ctx.deadline;
            ctx.hand_to_app(req.headers_mut());
            let work = forward(
                &proxy,
                req.map(Body::Stream),
                proxy.clients.app(protocol),
                protocol,
                None,
                None,
            );
            let result = match deadline {
                None => work.await,
                Some(t) => tokio::time::timeout(t, work).await.unwrap_or_else(|_| {
                    Err((
                        MeshError::Timeout,
                        format!("the caller's deadline of {t:?} passed"),
                    ))
                }),
            };
            match result {
                Ok(r) => r,
                Err((e, detail)) => {
                    e.response(&format!("local app at {}: {detail}", proxy.app_authority))
                }
            }
        }
    };
    record(
        &proxy,
        Direction::inbound,
        src,
        proxy.service.clone(),
        &resp,
        start,
    );
    Ok(resp.map(|b| Served::new(b, Some(permit), None)))
}

/// The answer to a request shed at the sidecar's request limit (counted).
fn overloaded(
    proxy: &Proxy,
    direction: Direction,
    src: Name,
    dst: Name,
    start: Instant,
) -> Response<Served> {
    proxy.limits.request_rejected();
    let resp =
        MeshError::Overloaded.response("this sidecar is at its limit of requests in progress");
    record(proxy, direction, src, dst, &resp, start);
    resp.map(|b| Served::new(b, None, None))
}

fn record(
    proxy: &Proxy,
    direction: Direction,
    src: Name,
    dst: Name,
    resp: &Response<Body>,
    start: Instant,
) {
    let tandem_error = resp
        .headers()
        .get(crate::error::ERROR_HEADER)
        .and_then(|v| MeshError::from_reason(v.as_bytes()))
        .map(MeshError::reason)
        .unwrap_or("");
    let labels = RequestLabels {
        direction,
        src_service: src,
        dst_service: dst,
        status_code: resp.status().as_u16(),
        tandem_error,
    };
    proxy.metrics.record(&labels, start.elapsed().as_secs_f64());
}

/// `(host, port)` the application addressed: the absolute URI's authority
/// (HTTP proxy form, HTTP/2 `:authority`) or the Host header.
fn authority_of<B>(req: &Request<B>) -> Option<(&str, Option<u16>)> {
    let auth = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(HOST)?.to_str().ok()?,
    };
    let auth = auth.rsplit('@').next().unwrap_or(auth);
    match auth.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => Some((h, Some(port))),
            Err(_) => Some((auth, None)),
        },
        _ => Some((auth, None)),
    }
}

// `Trailer` is end-to-end (RFC 9110 §6.6.2) and hyper's HTTP/1.1 encoder only
// sends trailers it names, so it stays.
const HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers (and those the Connection header names);
/// keeps `Connection: upgrade` + `Upgrade` on an upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Header names listed in `Connection` (rare beyond keep-alive/close, so
    // the list is usually empty and allocates nothing).
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == UPGRADE) {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP.iter() {
        if !(upgrade && n == UPGRADE) {
            headers.remove(n);
        }
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows; gRPC needs it.
    if let Some(te) = headers.get(http::header::TE) {
        if te.as_bytes() != b"trailers" {
            headers.remove(http::header::TE);
        }
    }
}

/// Sends a request on a connection of `pool` speaking `protocol`, and
/// relays the response (and an upgraded connection, if any).
async fn forward(
    proxy: &Proxy,
    mut req: Request<Body>,
    pool: &Arc<Pool>,
    protocol: Protocol,
    limits: Option<&ConnLimits>,
    sent: Option<&AtomicBool>,
) -> Result<Response<Body>, (MeshError, String)> {
    let upgrade = is_upgrade(&req);
    // An HTTP/1.1 hop needs a Host; a request that came in over HTTP/2 has
    // only the `:authority`.
    let fallback_host = if !protocol.is_h2() && !req.headers().contains_key(HOST) {
        req.uri()
            .authority()
            .or(pool.uri().authority())
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    } else {
        None
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if protocol.is_h2() {
        // HTTP/2 takes `:scheme` and `:authority` from an absolute URI.
        let mut uri = Uri::builder();
        if let (Some(scheme), Some(auth)) = (pool.uri().scheme(), pool.uri().authority()) {
            uri = uri.scheme(scheme.clone()).authority(auth.clone());
        }
        parts.uri = uri
            .path_and_query(pq)
            .build()
            .map_err(|e| (MeshError::BadRequest, e.to_string()))?;
        parts.version = Version::HTTP_2;
        parts.headers.remove(HOST);
    } else {
        // HTTP/1.1 to an origin: origin-form.
        parts.uri = Uri::from(pq);
        parts.version = Version::HTTP_11;
        if let Some(h) = fallback_host {
            parts.headers.insert(HOST, h);
        }
    }
    let req = Request::from_parts(parts, body);
    let mut resp = pool
        .send(proxy.clients.connector(protocol), req, limits, sent)
        .await
        .map_err(|e| match e {
            PoolError::Overflow(why) => (MeshError::Overflow, why.to_string()),
            PoolError::Unsent(_) => (
                MeshError::UpstreamReset,
                "every connection closed before the request could be written".into(),
            ),
            PoolError::Connect(e) => {
                let kind = match tls_error(&*e) {
                    Some(_) => MeshError::UpstreamTls,
                    None => MeshError::ConnectFailure,
                };
                (kind, format!("connect: {}", error_chain(&*e)))
            }
            PoolError::Send(e) => {
                let kind = match tls_error(&e) {
                    Some(reason) => {
                        // In TLS 1.3 the server checks the client's
                        // certificate after the client's side of the
                        // handshake is done: a refusal shows up here, on
                        // the first read.
                        proxy
                            .metrics
                            .handshakes
                            .get_or_create(&crate::metrics::HandshakeLabels {
                                direction: crate::metrics::Direction::outbound,
                                result: reason,
                            })
                            .inc();
                        MeshError::UpstreamTls
                    }
                    None => MeshError::UpstreamReset,
                };
                (kind, error_chain(&e))
            }
        })?;
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade && switching);
    if let (Some(down), true) = (downstream_upgrade, switching) {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (down.await, up.await) {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
    }
    Ok(resp.map(Body::Stream))
}

/// The TLS failure behind an error, as a metric reason, if there is one.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(tandem_identity::tls::rustls_reason(t));
        }
        if let Some(t) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tandem_identity::tls::rustls_reason(t));
        }
        cur = c.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_headers() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("123456789m"), None);
        assert_eq!(grpc_timeout("5x"), None);
        let mut h = HeaderMap::new();
        h.insert(CTX_DEADLINE, "800".parse().expect("v"));
        h.insert("grpc-timeout", "500m".parse().expect("v"));
        let c = Ctx::of(&h);
        assert_eq!(c.deadline, Some(Duration::from_millis(500)));
        assert!(!c.no_retry);
        // Handed to the app as an absolute time, read back by its sidecar.
        let mut app = HeaderMap::new();
        Ctx {
            deadline: Some(Duration::from_millis(400)),
            no_retry: false,
        }
        .hand_to_app(&mut app);
        assert!(app.get(CTX_DEADLINE).is_none());
        let back = Ctx::of(&app).deadline.expect("deadline");
        assert!(back <= Duration::from_millis(400) && back >= Duration::from_millis(350));
        let mut req = Request::new(Body::full(bytes::Bytes::new()));
        stamp(
            &mut req,
            Some(Instant::now() + Duration::from_millis(300)),
            true,
            true,
        );
        let left: u64 = req.headers()[CTX_DEADLINE]
            .to_str()
            .expect("s")
            .parse()
            .expect("n");
        assert!((250..=300).contains(&left), "{left}");
        assert!(req.headers()["grpc-timeout"]
            .to_str()
            .expect("s")
            .ends_with('m'));
        assert_eq!(req.headers()[CTX_NO_RETRY], "1");
    }

    #[test]
    fn tls_failures_are_told_from_resets() {
        let refused = std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate,
        ));
        assert_eq!(tls_error(&refused), Some("refused-by-peer"));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(tls_error(&reset), None);
    }

    #[test]
    fn authority_forms() {
        let r = Request::get("http://catalog:8080/x").body(()).expect("req");
        assert_eq!(authority_of(&r), Some(("catalog", Some(8080))));
        let r = Request::get("/x")
            .header(HOST, "orders")
            .body(())
            .expect("req");
        assert_eq!(authority_of(&r), Some(("orders", None)));
        let r = Request::get("/x").body(()).expect("req");
        assert_eq!(authority_of(&r), None);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, x-custom".parse().expect("v"));
        h.insert("x-custom", "1".parse().expect("v"));
        h.insert("keep-alive", "timeout=5".parse().expect("v"));
        h.insert("te", "trailers".parse().expect("v"));
        h.insert("x-app", "kept".parse().expect("v"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-custom").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(CONNECTION).is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert_eq!(h.get("x-app").map(|v| v.as_bytes()), Some(&b"kept"[..]));
    }
}
