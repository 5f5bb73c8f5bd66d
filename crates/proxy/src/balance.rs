//! Endpoint selection: power of two choices over a peak-EWMA latency
//! estimate (as in Finagle and Linkerd). Each endpoint's cost is its decayed
//! peak latency times its outstanding requests plus one; of two endpoints
//! picked at random, the cheaper one wins. A slow or failing endpoint is
//! avoided at once (peaks count immediately) and forgiven gradually: the
//! estimate decays with time even when the endpoint gets no traffic, so it
//! is tried again and can prove itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// Estimate used for an endpoint that has answered nothing yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Time constant of the decay towards newer, lower latencies.
const DECAY: Duration = Duration::from_secs(10);
/// Latency charged for a failed request (connect refused, reset): failing
/// fast must not make an endpoint look attractive.
pub const FAILURE_PENALTY: Duration = Duration::from_millis(250);

/// A peak-sensitive exponentially weighted moving average of latency, in
/// nanoseconds, lock-free: readers never wait for writers. The two fields
/// may be updated by racing writers; either outcome is a valid estimate.
#[derive(Debug)]
pub struct PeakEwma {
    rtt_bits: AtomicU64,
    stamp_ns: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_nanos() as u64
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            rtt_bits: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(nanos_since_epoch(now)),
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt_bits.load(Ordering::Relaxed));
        let stamp = self.stamp_ns.load(Ordering::Relaxed);
        let elapsed = nanos_since_epoch(now).saturating_sub(stamp) as f64 / 1e9;
        rtt * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// The estimate at `now`, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }

    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        let next = if rtt > current {
            rtt
        } else {
            // The decayed value already weighs the old estimate by recency;
            // blend the new observation in with the remaining weight.
            let stamp = self.stamp_ns.load(Ordering::Relaxed);
            let elapsed = nanos_since_epoch(now).saturating_sub(stamp) as f64 / 1e9;
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            current + rtt * (1.0 - w)
        };
        self.rtt_bits.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns
            .store(nanos_since_epoch(now), Ordering::Relaxed);
    }
}

/// Load state of one endpoint, shared by every snapshot that lists it so
/// that a config change does not forget what was learned.
#[derive(Debug)]
pub struct EndpointLoad {
    pub addr: SocketAddr,
    ewma: PeakEwma,
    pending: AtomicUsize,
}

impl EndpointLoad {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            ewma: PeakEwma::new(Instant::now()),
            pending: AtomicUsize::new(0),
        }
    }

    pub fn cost(&self, now: Instant) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        self.ewma.estimate(now) * (pending + 1.0)
    }

    /// Marks a request as dispatched. Finish it with [`InFlight::complete`]
    /// (latency observed) or [`InFlight::failed`] (penalty observed);
    /// dropping it only ends the pending count (a cancelled request, or a
    /// long-lived TCP connection whose duration says nothing of latency).
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// An outstanding request on one endpoint.
pub struct InFlight {
    load: Arc<EndpointLoad>,
    started: Instant,
}

impl InFlight {
    pub fn complete(self) -> Duration {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        self.load.ewma.observe(rtt, now);
        rtt
    }

    pub fn failed(self) {
        let now = Instant::now();
        let rtt = now
            .saturating_duration_since(self.started)
            .max(FAILURE_PENALTY);
        self.load.ewma.observe(rtt, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks one of `n` endpoints by power of two choices over `cost(i)`.
pub fn p2c(n: usize, cost: impl Fn(usize) -> f64) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    #[test]
    fn peaks_count_at_once_and_decay_with_time() {
        let t0 = Instant::now();
        let e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.estimate(t0), 100.0 * MS);
        // A fast answer one second later moves the estimate only a little.
        let t1 = t0 + Duration::from_secs(1);
        e.observe(Duration::from_millis(1), t1);
        let est = e.estimate(t1);
        assert!(est > 85.0 * MS && est < 95.0 * MS, "{est}");
        // With no traffic at all, the peak is forgotten over time, so a
        // shunned endpoint is tried again.
        let later = t1 + Duration::from_secs(60);
        assert!(e.estimate(later) < 1.0 * MS, "{}", e.estimate(later));
    }

    #[test]
    fn p2c_avoids_the_expensive_endpoint() {
        let costs = [1.0, 1.0, 100.0];
        let mut hits = [0usize; 3];
        for _ in 0..3000 {
            hits[p2c(3, |i| costs[i]).expect("some")] += 1;
        }
        // The expensive endpoint only wins when picked twice, which p2c never does.
        assert_eq!(hits[2], 0, "{hits:?}");
        assert!(hits[0] > 1000 && hits[1] > 1000, "{hits:?}");
    }

    #[test]
    fn p2c_edge_cases() {
        assert_eq!(p2c(0, |_| 0.0), None);
        assert_eq!(p2c(1, |_| 0.0), Some(0));
    }

    #[tokio::test]
    async fn pending_requests_raise_cost_and_failures_are_penalised() {
        let load = Arc::new(EndpointLoad::new("127.0.0.1:1".parse().expect("addr")));
        let now = Instant::now();
        let idle = load.cost(now);
        let g1 = load.start();
        let g2 = load.start();
        assert_eq!(load.pending(), 2);
        assert!(load.cost(now) >= idle * 3.0 * 0.99);
        drop(g1);
        g2.failed();
        assert_eq!(load.pending(), 0);
        // A fast failure costs like a slow answer.
        assert!(
            load.cost(Instant::now()) > 200.0 * MS,
            "{}",
            load.cost(Instant::now())
        );
    }
}
