//! Endpoint selection: power of two choices over a peak-EWMA latency
//! estimate (as in Finagle and Linkerd). Each endpoint's cost is its decayed
//! peak latency times its outstanding requests plus one; of two endpoints
//! picked at random, the cheaper one wins. A slow or overloaded endpoint is
//! avoided quickly (peaks count at once) and forgiven slowly (decay).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Estimate used for an endpoint that has answered nothing yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Time constant of the decay towards newer, lower latencies.
const DECAY: Duration = Duration::from_secs(10);

/// A peak-sensitive exponentially weighted moving average of latency.
#[derive(Debug)]
pub struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    /// The current estimate, in nanoseconds.
    pub fn estimate(&self) -> f64 {
        self.rtt_ns
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_ns {
            self.rtt_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.rtt_ns = self.rtt_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }
}

/// Load state of one endpoint, shared by every snapshot that lists it so
/// that a config change does not forget what was learned.
#[derive(Debug)]
pub struct EndpointLoad {
    pub addr: SocketAddr,
    ewma: Mutex<PeakEwma>,
    pending: AtomicUsize,
}

impl EndpointLoad {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            ewma: Mutex::new(PeakEwma::new(Instant::now())),
            pending: AtomicUsize::new(0),
        }
    }

    pub fn cost(&self) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        let rtt = match self.ewma.lock() {
            Ok(e) => e.estimate(),
            Err(p) => p.into_inner().estimate(),
        };
        rtt * (pending + 1.0)
    }

    /// Marks a request as dispatched; the guard records its latency.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// An outstanding request. Dropping it without [`InFlight::complete`] (an
/// error or a cancelled request) counts the elapsed time as a latency peak.
pub struct InFlight {
    load: std::sync::Arc<EndpointLoad>,
    started: Instant,
    done: bool,
}

impl InFlight {
    pub fn complete(mut self) -> Duration {
        self.finish()
    }

    fn finish(&mut self) -> Duration {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started);
        if !self.done {
            self.done = true;
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
            match self.load.ewma.lock() {
                Ok(mut e) => e.observe(rtt, now),
                Err(p) => p.into_inner().observe(rtt, now),
            }
        }
        rtt
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish();
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

    #[test]
    fn peaks_count_at_once_and_decay_slowly() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.estimate(), 100e6);
        // A fast answer one second later only moves the estimate a little.
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(1));
        let est = e.estimate();
        assert!(est > 85e6 && est < 95e6, "{est}");
        // Much later, fast answers win.
        e.observe(Duration::from_millis(1), t0 + Duration::from_secs(60));
        assert!(e.estimate() < 2e6);
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
    async fn pending_requests_raise_cost() {
        let load = std::sync::Arc::new(EndpointLoad::new("127.0.0.1:1".parse().expect("addr")));
        let idle = load.cost();
        let g1 = load.start();
        let g2 = load.start();
        assert_eq!(load.pending(), 2);
        assert!(load.cost() >= idle * 3.0 - 1.0);
        drop(g1);
        g2.complete();
        assert_eq!(load.pending(), 0);
    }
}
