//! Outlier detection (the `circuitBreaker` of a TrafficPolicy): an endpoint
//! that fails too many times in a row is ejected, left out of load
//! balancing for a while, which grows each time it is ejected again. No
//! more than a set share of a backend's endpoints is ejected at once.
//! State lives with the endpoint's load (per calling sidecar) in atomics.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_config::snapshot::CircuitBreaker;

/// Milliseconds since the process started (never 0).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Longest ejection, whatever the count.
const MAX_EJECTION_FACTOR: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx other than a gateway error, or a reset.
    Error,
    /// 502, 503, 504 or a connect failure.
    GatewayError,
    /// The try never reached the endpoint (this sidecar's own limits).
    Skipped,
}

#[derive(Debug, Default)]
pub struct OutlierState {
    errors: AtomicU32,
    gateway_errors: AtomicU32,
    last_failure_ms: AtomicU64,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl OutlierState {
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) > now
    }

    /// Counts an outcome; true when the endpoint has now failed enough
    /// times in a row to be ejected.
    pub fn record(&self, outcome: Outcome, cb: &CircuitBreaker, now: u64) -> bool {
        if outcome == Outcome::Skipped {
            return false;
        }
        if outcome == Outcome::Success {
            self.errors.store(0, Ordering::Release);
            self.gateway_errors.store(0, Ordering::Release);
            // A healthy stretch as long as one base ejection after the last
            // one brings the next ejection's length down a step.
            if self.ejections.load(Ordering::Acquire) > 0 {
                let until = self.ejected_until_ms.load(Ordering::Acquire);
                if now > until.saturating_add(cb.base_ejection_ms) {
                    let _ = self
                        .ejections
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            Some(n.saturating_sub(1))
                        });
                    // The next step down needs another full stretch.
                    self.ejected_until_ms.store(now, Ordering::Release);
                }
            }
            return false;
        }
        let last = self.last_failure_ms.swap(now, Ordering::AcqRel);
        if last != 0 && now.saturating_sub(last) > cb.interval_ms {
            // Too far apart to be "in a row".
            self.errors.store(0, Ordering::Release);
            self.gateway_errors.store(0, Ordering::Release);
        }
        let errors = self.errors.fetch_add(1, Ordering::AcqRel) + 1;
        let gateway = if outcome == Outcome::GatewayError {
            self.gateway_errors.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.gateway_errors.store(0, Ordering::Release);
            0
        };
        (cb.consecutive_errors > 0 && errors >= cb.consecutive_errors)
            || (cb.consecutive_gateway_errors > 0 && gateway >= cb.consecutive_gateway_errors)
    }

    /// Ejects for `base × n`, n being how many times this endpoint has been
    /// ejected (at most 10).
    pub fn eject(&self, cb: &CircuitBreaker, now: u64) -> Duration {
        let n = (self.ejections.fetch_add(1, Ordering::AcqRel) + 1).min(MAX_EJECTION_FACTOR);
        let len = cb.base_ejection_ms.saturating_mul(u64::from(n));
        self.ejected_until_ms.store(now + len, Ordering::Release);
        self.errors.store(0, Ordering::Release);
        self.gateway_errors.store(0, Ordering::Release);
        Duration::from_millis(len)
    }
}

/// How many of `n` endpoints may be ejected at once: the percentage,
/// at least one when it is above zero, and never all of them.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    if percent == 0 || n < 2 {
        return 0;
    }
    (n * percent as usize / 100).max(1).min(n - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb() -> CircuitBreaker {
        CircuitBreaker {
            consecutive_errors: 3,
            consecutive_gateway_errors: 0,
            interval_ms: 1000,
            base_ejection_ms: 100,
            max_ejection_percent: 50,
            max_requests: None,
            max_connections: None,
            max_pending_requests: None,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times() {
        let s = OutlierState::default();
        let c = cb();
        assert!(!s.record(Outcome::Error, &c, 10));
        assert!(!s.record(Outcome::GatewayError, &c, 20));
        // A success in between starts the count again.
        assert!(!s.record(Outcome::Success, &c, 30));
        assert!(!s.record(Outcome::Error, &c, 40));
        assert!(!s.record(Outcome::Error, &c, 50));
        assert!(s.record(Outcome::Error, &c, 60));
        assert_eq!(s.eject(&c, 60), Duration::from_millis(100));
        assert!(s.is_ejected(159) && !s.is_ejected(160));
        assert_eq!(s.eject(&c, 200), Duration::from_millis(200));
        // Failures further apart than the interval are not in a row.
        let s = OutlierState::default();
        assert!(!s.record(Outcome::Error, &c, 10));
        assert!(!s.record(Outcome::Error, &c, 20));
        assert!(!s.record(Outcome::Error, &c, 5000));
    }

    #[test]
    fn never_all_endpoints() {
        assert_eq!(max_ejected(1, 100), 0);
        assert_eq!(max_ejected(3, 50), 1);
        assert_eq!(max_ejected(3, 10), 1);
        assert_eq!(max_ejected(10, 50), 5);
        assert_eq!(max_ejected(4, 100), 3);
        assert_eq!(max_ejected(4, 0), 0);
    }
}
