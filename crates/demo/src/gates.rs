//! Gates and counters that make tests deterministic instead of timed.
//!
//! - `/hold?key=K[&max_ms=N]` waits until gate K is open (at most `max_ms`,
//!   60 s by default, then `504`), so a test can have exactly N requests in
//!   progress at the app before it looks at what the mesh does with the
//!   next one. `/open?key=K` opens the gate for good (current and later
//!   holders go on); `/close?key=K` closes it again.
//! - `/held?key=K`: how many requests arrived at gate K, wait there now,
//!   were released, or gave up (their caller or a mesh timeout dropped
//!   them), and the most that waited at once.
//! - `/counters?key=K`: every request whose query has `key=K` (whatever
//!   its path, `/slow` included) is counted: started, completed (its answer
//!   was made), cancelled (dropped before), in flight, and the most in
//!   flight at once. `/counters` without a key counts every request but
//!   the gates' own, and `/counters?key=mirrored` the requests marked as
//!   a sidecar's shadow copies (`tandem-mirror`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tandem_runtime::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct Gate {
    open: bool,
    held: Held,
    wake: Arc<Notify>,
}

#[derive(Clone, Copy, Default, Serialize)]
pub(crate) struct Held {
    arrived: u64,
    waiting: u64,
    released: u64,
    cancelled: u64,
    max_waiting: u64,
}

#[derive(Clone, Copy, Default, Serialize)]
pub(crate) struct Counters {
    started: u64,
    completed: u64,
    cancelled: u64,
    in_flight: u64,
    max_in_flight: u64,
}

#[derive(Default)]
pub(crate) struct Gates {
    gates: Mutex<HashMap<String, Gate>>,
    counters: Mutex<HashMap<String, Counters>>,
}

/// Outcome of a hold.
pub(crate) enum Hold {
    Released,
    TimedOut,
}

impl Gates {
    /// Waits at gate `key` until it is open, or `max` passes.
    pub(crate) async fn hold(self: &Arc<Self>, key: &str, max: Duration) -> Hold {
        let wake = {
            let mut gates = self.gates.lock();
            let g = gates.entry(key.to_string()).or_default();
            g.held.arrived += 1;
            if g.open {
                g.held.released += 1;
                return Hold::Released;
            }
            g.held.waiting += 1;
            g.held.max_waiting = g.held.max_waiting.max(g.held.waiting);
            g.wake.clone()
        };
        // Counted as cancelled if the request is dropped while it waits.
        let mut waiting = Waiting {
            gates: self.clone(),
            key: key.to_string(),
            done: false,
        };
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut gates = self.gates.lock();
                if let Some(g) = gates.get_mut(key) {
                    if g.open {
                        g.held.waiting -= 1;
                        g.held.released += 1;
                        waiting.done = true;
                        return Hold::Released;
                    }
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some(g) = self.gates.lock().get_mut(key) {
                        g.held.waiting -= 1;
                    }
                    waiting.done = true;
                    return Hold::TimedOut;
                }
            }
        }
    }

    /// Opens (or closes) gate `key`; returns how many were waiting.
    pub(crate) fn set_open(&self, key: &str, open: bool) -> u64 {
        let mut gates = self.gates.lock();
        let g = gates.entry(key.to_string()).or_default();
        g.open = open;
        if open {
            g.wake.notify_waiters();
        }
        g.held.waiting
    }

    pub(crate) fn held(&self, key: &str) -> Held {
        self.gates
            .lock()
            .get(key)
            .map(|g| g.held)
            .unwrap_or_default()
    }

    pub(crate) fn counters(&self, key: &str) -> Counters {
        self.counters.lock().get(key).copied().unwrap_or_default()
    }

    /// Counts a request of `key` as started; the guard counts how it ends.
    pub(crate) fn start(self: &Arc<Self>, key: &str) -> Started {
        let mut all = self.counters.lock();
        let c = all.entry(key.to_string()).or_default();
        c.started += 1;
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
        Started {
            gates: self.clone(),
            key: key.to_string(),
            done: false,
        }
    }
}

struct Waiting {
    gates: Arc<Gates>,
    key: String,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done {
            if let Some(g) = self.gates.gates.lock().get_mut(&self.key) {
                g.held.waiting -= 1;
                g.held.cancelled += 1;
            }
        }
    }
}

/// A counted request: `complete` when its answer is made; dropped before,
/// it counts as cancelled.
pub(crate) struct Started {
    gates: Arc<Gates>,
    key: String,
    done: bool,
}

impl Started {
    pub(crate) fn complete(mut self) {
        self.end(true);
    }

    fn end(&mut self, completed: bool) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(c) = self.gates.counters.lock().get_mut(&self.key) {
            c.in_flight -= 1;
            if completed {
                c.completed += 1;
            } else {
                c.cancelled += 1;
            }
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holders_wait_for_the_gate_and_cancellations_are_counted() {
        let g = Arc::new(Gates::default());
        let a = tokio::spawn({
            let g = g.clone();
            async move { matches!(g.hold("k", Duration::from_secs(5)).await, Hold::Released) }
        });
        let b = tokio::spawn({
            let g = g.clone();
            async move { g.hold("k", Duration::from_secs(5)).await }
        });
        while g.held("k").waiting < 2 {
            tokio::task::yield_now().await;
        }
        b.abort();
        let _ = b.await;
        assert_eq!(g.held("k").cancelled, 1);
        assert_eq!(g.set_open("k", true), 1);
        assert!(a.await.expect("task"));
        let h = g.held("k");
        assert_eq!(
            (h.arrived, h.waiting, h.released, h.max_waiting),
            (2, 0, 1, 2)
        );
        // Open: later holders go on at once.
        assert!(matches!(
            g.hold("k", Duration::from_secs(5)).await,
            Hold::Released
        ));
        let started = g.start("c");
        let dropped = g.start("c");
        started.complete();
        drop(dropped);
        let c = g.counters("c");
        assert_eq!(
            (
                c.started,
                c.completed,
                c.cancelled,
                c.in_flight,
                c.max_in_flight
            ),
            (2, 1, 1, 0, 2)
        );
    }

    #[tokio::test]
    async fn a_hold_times_out() {
        let g = Arc::new(Gates::default());
        assert!(matches!(
            g.hold("t", Duration::from_millis(10)).await,
            Hold::TimedOut
        ));
        assert_eq!(g.held("t").waiting, 0);
    }
}
