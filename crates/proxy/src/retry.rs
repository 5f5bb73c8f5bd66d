//! Retry policy at run time: which answers are worth another try, backoff
//! with full jitter, and the retry budget that keeps one service's incident
//! from becoming a retry storm.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tandem_config::snapshot::{Policy, RetryOn};

use crate::error::MeshError;

/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The window the budget looks back over.
const WINDOW_SECS: u64 = 10;

/// A destination's TrafficPolicy, ready to use.
pub struct RuntimePolicy {
    pub source: Arc<str>,
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// The header whose value picks the endpoint (ring-hash).
    pub hash_header: Option<http::HeaderName>,
    pub circuit_breaker: Option<tandem_config::snapshot::CircuitBreaker>,
    /// `circuitBreaker.maxRequests`, with the destination's count of
    /// requests in progress (kept across snapshots).
    pub max_requests: Option<(usize, Arc<std::sync::atomic::AtomicUsize>)>,
    /// `circuitBreaker.maxConnections` and `maxPendingRequests`, with the
    /// destination's counts (kept across snapshots).
    pub conn_limits: Option<crate::pool::ConnLimits>,
}

/// One request counted against a destination's `maxRequests`.
pub struct InProgress(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RuntimePolicy {
    /// Counts a request in, or `None` when the destination is at its limit.
    pub fn admit(&self) -> Option<Option<InProgress>> {
        let Some((max, count)) = &self.max_requests else {
            return Some(None);
        };
        if count.fetch_add(1, Ordering::AcqRel) >= *max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Some(InProgress(count.clone())))
    }
}

pub struct Retry {
    pub attempts: u32,
    on: Vec<RetryOn>,
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    pub budget: Arc<RetryBudget>,
}

impl RuntimePolicy {
    pub fn build(dest: &str, p: &Policy, budgets: &BudgetCache) -> Self {
        RuntimePolicy {
            hash_header: match &p.load_balancer {
                tandem_config::snapshot::LoadBalancer::RingHash { header } => {
                    http::HeaderName::from_bytes(header.as_bytes()).ok()
                }
                _ => None,
            },
            circuit_breaker: p.circuit_breaker.clone(),
            max_requests: p
                .circuit_breaker
                .as_ref()
                .and_then(|c| c.max_requests)
                .map(|m| (m as usize, budgets.in_progress(dest))),
            conn_limits: p.circuit_breaker.as_ref().and_then(|c| {
                Some(crate::pool::ConnLimits {
                    max_connections: c.max_connections? as usize,
                    max_pending: c.max_pending_requests.unwrap_or(0) as usize,
                    conns: budgets.conns(dest),
                })
            }),
            source: Arc::from(p.source.as_str()),
            timeout: p.timeout_ms.map(Duration::from_millis),
            retry: p.retry.as_ref().map(|r| Retry {
                attempts: r.attempts,
                on: r.on.clone(),
                per_try_timeout: r.per_try_timeout_ms.map(Duration::from_millis),
                backoff_base: Duration::from_millis(r.backoff_base_ms),
                backoff_max: Duration::from_millis(r.backoff_max_ms.max(r.backoff_base_ms)),
                budget: budgets.get(dest, r.budget_percent, r.budget_min_per_second),
            }),
        }
    }
}

impl Retry {
    /// Whether an answer should be tried again.
    pub fn retriable_answer(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        self.on.iter().any(|c| match *c {
            RetryOn::Server5xx => (500..600).contains(&code),
            RetryOn::GatewayError => matches!(code, 502..=504),
            RetryOn::Status(s) => s == code,
            RetryOn::Grpc(g) => grpc == Some(g),
            RetryOn::ConnectFailure | RetryOn::Reset => false,
        })
    }

    /// Whether a failure of the mesh to get an answer should be tried again.
    pub fn retriable_failure(&self, e: MeshError) -> bool {
        self.on.iter().any(|c| {
            matches!(
                (*c, e),
                (
                    RetryOn::ConnectFailure,
                    MeshError::ConnectFailure | MeshError::UpstreamTls
                ) | (RetryOn::Reset, MeshError::UpstreamReset)
                    | (
                        RetryOn::Server5xx | RetryOn::GatewayError,
                        MeshError::Timeout
                    )
            )
        })
    }

    /// The pause before retry number `n` (1-based): full jitter over an
    /// exponentially growing ceiling, or the answer's `Retry-After` if
    /// longer.
    pub fn backoff(&self, n: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        let jittered = ceiling.mul_f64(fastrand::f64());
        match retry_after {
            Some(r) => jittered.max(r.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// `Retry-After: <seconds>` (the HTTP-date form is not used by services
/// that shed load, and is ignored).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Retries allowed over the last ten seconds: `percent` of the requests
/// plus `min_per_second` for each second of the window. Counted in
/// one-second buckets with atomics: no lock on the request path.
pub struct RetryBudget {
    percent: u64,
    min_per_second: u64,
    buckets: [Bucket; WINDOW_SECS as usize],
}

#[derive(Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

fn now_secs() -> u64 {
    // +1 so that second 0 never matches a fresh bucket's 0.
    crate::outlier::now_ms() / 1000 + 1
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        RetryBudget {
            percent: u64::from(percent),
            min_per_second: u64::from(min_per_second),
            buckets: Default::default(),
        }
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let b = &self.buckets[(now % WINDOW_SECS) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != now
            && b.second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.retries.store(0, Ordering::Release);
        }
        b
    }

    /// A request was sent (the first try).
    pub fn deposit(&self) {
        self.bucket(now_secs())
            .requests
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(now_secs())
    }

    fn withdraw_at(&self, now: u64) -> bool {
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s != 0 && now.saturating_sub(s) < WINDOW_SECS {
                requests += b.requests.load(Ordering::Acquire);
                retries += b.retries.load(Ordering::Acquire);
            }
        }
        let allowed = requests * self.percent / 100 + self.min_per_second * WINDOW_SECS;
        if retries >= allowed {
            return false;
        }
        self.bucket(now).retries.fetch_add(1, Ordering::AcqRel);
        true
    }
}

/// Budgets by destination, kept across snapshots (a config change must not
/// hand out a fresh budget in the middle of an incident).
/// Destination, percent, minimum per second.
type BudgetKey = (Box<str>, u32, u32);

#[derive(Default)]
pub struct BudgetCache {
    map: Mutex<std::collections::HashMap<BudgetKey, Weak<RetryBudget>>>,
    in_progress: Mutex<std::collections::HashMap<Box<str>, Weak<std::sync::atomic::AtomicUsize>>>,
    conns: Mutex<std::collections::HashMap<Box<str>, Weak<crate::pool::DestConns>>>,
}

impl BudgetCache {
    /// The connection counts of `dest`, shared by successive snapshots.
    fn conns(&self, dest: &str) -> Arc<crate::pool::DestConns> {
        let mut map = match self.conns.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = map.get(dest).and_then(Weak::upgrade) {
            return c;
        }
        let c = Arc::new(crate::pool::DestConns::default());
        map.insert(Box::from(dest), Arc::downgrade(&c));
        map.retain(|_, w| w.strong_count() > 0);
        c
    }

    /// The count of requests in progress to `dest`, shared by successive
    /// snapshots.
    fn in_progress(&self, dest: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        let mut map = match self.in_progress.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = map.get(dest).and_then(Weak::upgrade) {
            return c;
        }
        let c = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        map.insert(Box::from(dest), Arc::downgrade(&c));
        map.retain(|_, w| w.strong_count() > 0);
        c
    }

    fn get(&self, dest: &str, percent: u32, min_per_second: u32) -> Arc<RetryBudget> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let key = (Box::from(dest), percent, min_per_second);
        if let Some(b) = map.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(RetryBudget::new(percent, min_per_second));
        map.insert(key, Arc::downgrade(&b));
        map.retain(|_, w| w.strong_count() > 0);
        b
    }
}

/// Endpoints already tried for one request (a retry goes elsewhere when it
/// can).
pub type Tried = Vec<SocketAddr>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_percent_plus_minimum() {
        let b = RetryBudget::new(20, 0);
        let now = 5;
        for _ in 0..100 {
            b.bucket(now).requests.fetch_add(1, Ordering::AcqRel);
        }
        let granted = (0..100).filter(|_| b.withdraw_at(now)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has moved on.
        assert!(!b.withdraw_at(now + 9));
        b.bucket(now + 10).requests.fetch_add(5, Ordering::AcqRel);
        assert_eq!((0..10).filter(|_| b.withdraw_at(now + 10)).count(), 1);
        let floor = RetryBudget::new(0, 2);
        assert_eq!((0..50).filter(|_| floor.withdraw_at(3)).count(), 20);
    }

    #[test]
    fn conditions_and_backoff() {
        let r = Retry {
            attempts: 3,
            on: vec![
                RetryOn::GatewayError,
                RetryOn::Grpc(14),
                RetryOn::ConnectFailure,
            ],
            per_try_timeout: None,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            budget: Arc::new(RetryBudget::new(20, 10)),
        };
        let h = HeaderMap::new();
        assert!(r.retriable_answer(StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!r.retriable_answer(StatusCode::INTERNAL_SERVER_ERROR, &h));
        let mut g = HeaderMap::new();
        g.insert("grpc-status", "14".parse().expect("v"));
        assert!(r.retriable_answer(StatusCode::OK, &g));
        assert!(r.retriable_failure(MeshError::ConnectFailure));
        assert!(!r.retriable_failure(MeshError::UpstreamReset));
        assert!(r.retriable_failure(MeshError::Timeout));
        for n in 1..8 {
            assert!(r.backoff(n, None) <= Duration::from_millis(40));
        }
        assert_eq!(
            r.backoff(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
