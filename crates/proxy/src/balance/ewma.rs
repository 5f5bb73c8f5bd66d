//! The load of one endpoint as this sidecar sees it: a peak-EWMA latency
//! estimate (as in Finagle and Linkerd) and the requests outstanding. An
//! endpoint's cost is its decayed peak latency times its outstanding
//! requests plus one; of two endpoints picked at random, the cheaper one
//! wins. A slow or failing endpoint is
//! avoided at once (peaks count immediately) and forgiven gradually: the
//! estimate decays with time even when the endpoint gets no traffic, so it
//! is tried again and can prove itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::time::Duration;
use tandem_runtime::sync::{Mutex, MutexGuard};

use tokio::time::Instant;

/// Estimate used for an endpoint that has answered nothing yet, and the
/// value every estimate returns to as its information ages.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Time constant of the decay.
const DECAY: Duration = Duration::from_secs(10);
/// Latency charged for a failed request (connect refused, reset): failing
/// fast must not make an endpoint look attractive.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_millis(250);

/// A peak-sensitive exponentially weighted moving average of latency, in
/// nanoseconds. Peaks count at once; lower values blend in with a weight
/// that grows with the time since the last observation; and with no
/// observations the estimate returns towards [`DEFAULT_RTT`], so a shunned
/// endpoint is tried again without an idle one ever looking free.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// The estimate at `now`, in nanoseconds.
    pub(crate) fn estimate(&self, now: Instant) -> f64 {
        let floor = DEFAULT_RTT.as_nanos() as f64;
        floor + (self.rtt_ns - floor) * self.weight(now)
    }

    pub(crate) fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate(now);
        self.rtt_ns = if rtt > current {
            rtt
        } else {
            let w = self.weight(now);
            self.rtt_ns * w + rtt * (1.0 - w)
        };
        self.stamp = now;
    }
}

/// Load state of one endpoint, shared by every snapshot that lists it so
/// that a config change does not forget what was learned.
#[derive(Debug)]
pub(crate) struct EndpointLoad {
    pub(crate) addr: SocketAddr,
    ewma: Mutex<PeakEwma>,
    pending: AtomicUsize,
    /// Outlier detection (see [`crate::policy::outlier`]).
    pub(crate) outlier: crate::policy::outlier::OutlierState,
}

impl EndpointLoad {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            ewma: Mutex::new(PeakEwma::new(Instant::now())),
            pending: AtomicUsize::new(0),
            outlier: Default::default(),
        }
    }

    fn ewma(&self) -> MutexGuard<'_, PeakEwma> {
        self.ewma.lock()
    }

    pub(crate) fn cost(&self, now: Instant) -> f64 {
        if self.outlier.is_ejected(crate::policy::outlier::now_ms()) {
            return f64::INFINITY;
        }
        let pending = self.pending.load(Ordering::Relaxed) as f64;
        self.ewma().estimate(now) * (pending + 1.0)
    }

    /// Marks a request as dispatched. Finish it with [`InFlight::complete`]
    /// (latency observed) or [`InFlight::failed`] (penalty observed); a
    /// request dropped unfinished (the caller gave up) counts its elapsed
    /// time as a latency peak, so an endpoint that hangs is avoided.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    /// Marks a long-lived connection (opaque TCP): it counts as outstanding
    /// while open, and its duration, which says nothing of latency, is not
    /// observed.
    pub(crate) fn open(self: &Arc<Self>) -> Connection {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Connection { load: self.clone() }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// An outstanding request on one endpoint.
pub(crate) struct InFlight {
    load: Arc<EndpointLoad>,
    started: Instant,
    done: bool,
}

impl InFlight {
    pub(crate) fn complete(mut self) -> Duration {
        self.finish(Duration::ZERO)
    }

    pub(crate) fn failed(mut self) {
        self.finish(FAILURE_PENALTY);
    }

    /// Never reached the endpoint: no longer outstanding, nothing observed.
    pub(crate) fn cancel(mut self) {
        if !self.done {
            self.done = true;
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn finish(&mut self, at_least: Duration) -> Duration {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.started).max(at_least);
        if !self.done {
            self.done = true;
            self.load.ewma().observe(rtt, now);
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
        }
        rtt
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

/// An open opaque-TCP connection on one endpoint.
pub(crate) struct Connection {
    load: Arc<EndpointLoad>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    #[test]
    fn peaks_count_at_once_and_decay_with_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.estimate(t0), 100.0 * MS);
        // A fast answer one second later moves the estimate only a little.
        let t1 = t0 + Duration::from_secs(1);
        e.observe(Duration::from_millis(1), t1);
        let est = e.estimate(t1);
        assert!(est > 85.0 * MS && est < 95.0 * MS, "{est}");
        // With no traffic at all, the peak is forgotten over time, so a
        // shunned endpoint is tried again; it returns to the default, never
        // below it, so an idle endpoint never looks free.
        let later = t1 + Duration::from_secs(60);
        assert!(e.estimate(later) < 1.3 * MS, "{}", e.estimate(later));
        let much_later = t1 + Duration::from_secs(7200);
        assert!(
            (e.estimate(much_later) - 1.0 * MS).abs() < 1.0,
            "{}",
            e.estimate(much_later)
        );
    }

    #[tokio::test]
    async fn a_request_given_up_on_counts_as_slow_and_tcp_counts_only_as_pending() {
        let load = Arc::new(EndpointLoad::new("127.0.0.1:1".parse().expect("addr")));
        let g = load.start();
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(g);
        assert!(
            load.cost(Instant::now()) > 25.0 * MS,
            "{}",
            load.cost(Instant::now())
        );

        let tcp = Arc::new(EndpointLoad::new("127.0.0.1:2".parse().expect("addr")));
        let c = tcp.open();
        assert_eq!(tcp.pending(), 1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(c);
        assert_eq!(tcp.pending(), 0);
        assert!(
            tcp.cost(Instant::now()) <= 1.0 * MS + 1.0,
            "{}",
            tcp.cost(Instant::now())
        );
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
