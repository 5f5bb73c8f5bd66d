//! Policy at run time, one layer each: the caller's deadline and the
//! policy's timeout ([`deadline`]), the per-try timeout ([`timeout`]),
//! retries with replayed bodies and budgets ([`retry`], [`replay`],
//! [`budget`]), the circuit breaker's admission and outlier detection
//! ([`circuit`], [`outlier`]), the inbound access policy ([`authz`]) and
//! rate limit ([`ratelimit`]), and the sidecar's own overload limits
//! ([`overload`]).
//!
//! [`RuntimePolicy`] is a destination's TrafficPolicy (or an HTTPRoute
//! rule's overrides of it) made ready to use with the routing table: its
//! counters and budgets are the ones earlier tables used.

pub(crate) mod authz;
pub(crate) mod budget;
pub(crate) mod circuit;
pub(crate) mod deadline;
pub(crate) mod fault;
pub(crate) mod outlier;
pub(crate) mod overload;
pub(crate) mod ratelimit;
pub(crate) mod replay;
pub(crate) mod retry;
pub(crate) mod timeout;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::snapshot::{CircuitBreaker, LoadBalancer, Policy};

use crate::routing::Kept;
use crate::transport::pool::ConnLimits;

/// A destination's TrafficPolicy, ready to use.
pub(crate) struct RuntimePolicy {
    /// Where it comes from, for messages.
    pub(crate) source: Arc<str>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: Option<retry::Retry>,
    /// The header whose value picks the endpoint (ring-hash).
    pub(crate) hash_header: Option<http::HeaderName>,
    pub(crate) circuit_breaker: Option<CircuitBreaker>,
    /// `circuitBreaker.maxRequests`, with the destination's count of
    /// requests in progress (kept across snapshots).
    pub(crate) max_requests: Option<(usize, Arc<AtomicUsize>)>,
    /// `circuitBreaker.maxConnections` and `maxPendingRequests`, with the
    /// destination's counts (kept across snapshots).
    pub(crate) conn_limits: Option<ConnLimits>,
}

impl RuntimePolicy {
    pub(crate) fn build(dest: &str, p: &Policy, kept: &Kept) -> Self {
        let cb = p.circuit_breaker.as_ref();
        RuntimePolicy {
            hash_header: match &p.load_balancer {
                LoadBalancer::RingHash { header } => {
                    http::HeaderName::from_bytes(header.as_bytes()).ok()
                }
                _ => None,
            },
            circuit_breaker: p.circuit_breaker.clone(),
            max_requests: cb
                .and_then(|c| c.max_requests)
                .map(|m| (m as usize, kept.in_progress(dest))),
            conn_limits: cb.and_then(|c| {
                Some(ConnLimits {
                    max_connections: c.max_connections? as usize,
                    max_pending: c.max_pending_requests.unwrap_or(0) as usize,
                    conns: kept.conns(dest),
                })
            }),
            source: Arc::from(p.source.as_str()),
            timeout: p.timeout_ms.map(Duration::from_millis),
            retry: p.retry.as_ref().map(|r| retry::Retry::build(dest, r, kept)),
        }
    }
}
