//! The sidecar's request traffic: one cell of counters per label set
//! (direction, service pair, route, status, flag), each with two
//! histograms: the time to the response headers, and the part of it spent
//! in this sidecar itself. The same cells feed `/metrics` (as a Prometheus
//! collector) and the reports sent to the control plane over the control
//! stream (`tandem stat`), so both always tell the same story.
//!
//! Recording is one read-locked hash lookup and a few relaxed atomic adds;
//! a label set seen for the first time takes the write lock once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tandem_api::v1::{PairTraffic, Report};
use tandem_runtime::sync::RwLock;

use crate::telemetry::metrics::{Direction, RequestLabels, RetryLabels};

/// Upper bounds (seconds) of the request-duration buckets: from 100 µs,
/// fine below 10 ms, up to a minute.
pub(crate) const LATENCY_BUCKETS: [f64; 30] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Upper bounds (seconds) of the proxy's own time: from 10 µs, where a
/// sidecar's share of a request normally lies, up to 10 s (a request that
/// waited for discovery).
pub(crate) const PROXY_BUCKETS: [f64; 23] = [
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075, 0.001,
    0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const LATENCY_N: usize = LATENCY_BUCKETS.len() + 1;
const PROXY_N: usize = PROXY_BUCKETS.len() + 1;

/// A histogram with fixed bounds (`N` counts: one per bound and `+Inf`).
struct Histogram<const N: usize> {
    counts: [AtomicU64; N],
    sum_ns: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: [const { AtomicU64::new(0) }; N],
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64], d: Duration) {
        let secs = d.as_secs_f64();
        // `le` semantics: the first bucket whose bound is at least the value.
        let i = bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts per bucket (not cumulative).
    fn counts(&self) -> [u64; N] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    fn encode(
        &self,
        bounds: &[f64],
        enc: &mut prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let counts = self.counts();
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        enc.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }
}

#[derive(Default)]
struct Cell {
    requests: AtomicU64,
    latency: Histogram<LATENCY_N>,
    proxy: Histogram<PROXY_N>,
}

/// Cells by label set, for label sets from a bounded domain (service
/// names, routes, statuses and flags: never raw request data).
struct Table<L, C> {
    cells: RwLock<HashMap<L, C>>,
}

impl<L: Clone + Eq + Hash, C: Default> Table<L, C> {
    fn new() -> Self {
        Table {
            cells: RwLock::new(HashMap::new()),
        }
    }

    fn with(&self, labels: &L, f: impl FnOnce(&C)) {
        if let Some(c) = self.cells.read().get(labels) {
            return f(c);
        }
        let mut w = self.cells.write();
        f(w.entry(labels.clone()).or_default());
    }
}

/// The request counters and histograms of one sidecar.
pub(crate) struct Traffic {
    requests: Table<RequestLabels, Cell>,
    retries: Table<RetryLabels, AtomicU64>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Traffic")
    }
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            requests: Table::new(),
            retries: Table::new(),
        }
    }
}

impl Traffic {
    /// One answered request: `total` from its arrival to its response
    /// headers, `own` the part of it spent in this sidecar.
    pub(crate) fn record(&self, labels: &RequestLabels, total: Duration, own: Duration) {
        self.requests.with(labels, |c| {
            c.requests.fetch_add(1, Ordering::Relaxed);
            c.latency.observe(&LATENCY_BUCKETS, total);
            c.proxy.observe(&PROXY_BUCKETS, own);
        });
    }

    /// A retry sent under a TrafficPolicy.
    pub(crate) fn retried(&self, labels: &RetryLabels) {
        self.retries.with(labels, |c| {
            c.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Everything counted so far, summed per direction, service pair and
    /// route: what `tandem stat` and `tandem top` are made of.
    pub(crate) fn report(&self) -> Report {
        let mut pairs: HashMap<(Direction, &str, &str, &str), PairTraffic> = HashMap::new();
        let cells = self.requests.cells.read();
        for (l, c) in cells.iter() {
            let p = pairs
                .entry((l.direction, &l.src_service.0, &l.dst_service.0, &l.route.0))
                .or_insert_with(|| PairTraffic {
                    inbound: l.direction == Direction::inbound,
                    source: l.src_service.0.to_string(),
                    destination: l.dst_service.0.to_string(),
                    route: l.route.0.to_string(),
                    latency: vec![0; LATENCY_N],
                    proxy_latency: vec![0; PROXY_N],
                    ..PairTraffic::default()
                });
            let n = c.requests.load(Ordering::Relaxed);
            p.requests += n;
            if l.status_code >= 500 || !l.tandem_error.is_empty() {
                p.failures += n;
            }
            for (acc, v) in p.latency.iter_mut().zip(c.latency.counts()) {
                *acc += v;
            }
            for (acc, v) in p.proxy_latency.iter_mut().zip(c.proxy.counts()) {
                *acc += v;
            }
        }
        let retries = self.retries.cells.read();
        for (l, n) in retries.iter() {
            let p = pairs
                .entry((Direction::outbound, &l.src_service.0, &l.dst_service.0, ""))
                .or_insert_with(|| PairTraffic {
                    source: l.src_service.0.to_string(),
                    destination: l.dst_service.0.to_string(),
                    latency: vec![0; LATENCY_N],
                    proxy_latency: vec![0; PROXY_N],
                    ..PairTraffic::default()
                });
            p.retries += n.load(Ordering::Relaxed);
        }
        Report {
            latency_bounds: LATENCY_BUCKETS.to_vec(),
            proxy_bounds: PROXY_BUCKETS.to_vec(),
            pairs: pairs.into_values().collect(),
        }
    }
}

fn family<L: EncodeLabelSet>(
    enc: &mut prometheus_client::encoding::MetricEncoder,
    labels: &L,
    f: impl FnOnce(&mut prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_family(labels)?;
    f(&mut m)
}

impl Collector for Traffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cells = self.requests.cells.read();
        {
            let mut enc = encoder.encode_descriptor(
                "requests",
                "HTTP requests answered, by direction, service pair, route, status and the mesh's flag",
                None,
                MetricType::Counter,
            )?;
            for (l, c) in cells.iter() {
                family(&mut enc, l, |m| {
                    m.encode_counter::<NoLabelSet, _, u64>(
                        &c.requests.load(Ordering::Relaxed),
                        None,
                    )
                })?;
            }
        }
        {
            let mut enc = encoder.encode_descriptor(
                "request_duration_seconds",
                "Time from receiving a request to having its response headers",
                None,
                MetricType::Histogram,
            )?;
            for (l, c) in cells.iter() {
                family(&mut enc, l, |m| c.latency.encode(&LATENCY_BUCKETS, m))?;
            }
        }
        {
            let mut enc = encoder.encode_descriptor(
                "proxy_duration_seconds",
                "The part of tandem_request_duration_seconds spent in this sidecar itself: not waiting on the upstream (or the app), the network, a retry's backoff or an injected delay",
                None,
                MetricType::Histogram,
            )?;
            for (l, c) in cells.iter() {
                family(&mut enc, l, |m| c.proxy.encode(&PROXY_BUCKETS, m))?;
            }
        }
        drop(cells);
        let retries = self.retries.cells.read();
        let mut enc = encoder.encode_descriptor(
            "retries",
            "Retries sent under a TrafficPolicy, by calling service and destination",
            None,
            MetricType::Counter,
        )?;
        for (l, n) in retries.iter() {
            family(&mut enc, l, |m| {
                m.encode_counter::<NoLabelSet, _, u64>(&n.load(Ordering::Relaxed), None)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Name;

    fn labels(direction: Direction, status: u16, flag: &'static str) -> RequestLabels {
        RequestLabels {
            direction,
            src_service: Name::from("web"),
            dst_service: Name::from("orders"),
            status_code: status,
            tandem_error: flag,
            route: Name::from("default/orders"),
        }
    }

    #[test]
    fn buckets_follow_le() {
        let h = Histogram::<LATENCY_N>::default();
        h.observe(&LATENCY_BUCKETS, Duration::from_micros(100));
        h.observe(&LATENCY_BUCKETS, Duration::from_micros(101));
        h.observe(&LATENCY_BUCKETS, Duration::from_secs(61));
        let c = h.counts();
        assert_eq!((c[0], c[1], c[LATENCY_N - 1]), (1, 1, 1));
        assert_eq!(c.iter().sum::<u64>(), 3);
    }

    #[test]
    fn report_sums_per_pair_and_direction() {
        let t = Traffic::default();
        let ms = Duration::from_millis;
        t.record(&labels(Direction::outbound, 200, ""), ms(3), ms(0));
        t.record(&labels(Direction::outbound, 200, ""), ms(3), ms(0));
        t.record(
            &labels(Direction::outbound, 503, "no-endpoints"),
            ms(1),
            ms(1),
        );
        t.record(&labels(Direction::outbound, 404, "no-route"), ms(1), ms(1));
        t.record(&labels(Direction::inbound, 200, ""), ms(2), ms(0));
        t.retried(&RetryLabels {
            src_service: Name::from("web"),
            dst_service: Name::from("orders"),
        });
        let r = t.report();
        // Outbound: one entry for the route, one for the retries (counted
        // per destination, not per route).
        let out: Vec<&PairTraffic> = r.pairs.iter().filter(|p| !p.inbound).collect();
        assert_eq!(out.len(), 2);
        let routed = out
            .iter()
            .find(|p| p.route == "default/orders")
            .expect("route");
        assert_eq!((routed.requests, routed.failures), (4, 2));
        assert_eq!(routed.latency.iter().sum::<u64>(), 4);
        assert_eq!(routed.latency.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(routed.proxy_latency.len(), PROXY_BUCKETS.len() + 1);
        assert_eq!(out.iter().map(|p| p.retries).sum::<u64>(), 1);
        let inb = r.pairs.iter().find(|p| p.inbound).expect("inbound");
        assert_eq!((inb.requests, inb.failures, inb.retries), (1, 0, 0));
    }
}
