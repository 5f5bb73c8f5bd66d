//! Golden signals per (source, destination) pair: every connected proxy
//! reports its cumulative traffic counters over its control stream each
//! interval ([`Stats::report`]); the control plane keeps a short history
//! of them per proxy and answers `tandem stat` (and judges rollouts) from
//! the differences over a window.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_api::v1::Report;
use tandem_runtime::sync::Mutex;
use tokio::time::Instant;

use crate::mesh::ProxyKey;

const HISTORY: Duration = Duration::from_secs(300);

/// Cumulative counters of one pair in one proxy at one time (or their
/// sum: what replicas exchange to judge a rollout on every proxy's
/// traffic).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairCounters {
    /// What the caller's sidecar answered (after retries).
    pub requests: f64,
    pub failures: f64,
    /// `(upper bound in seconds, cumulative count)`, ascending.
    #[serde(with = "bounds")]
    pub buckets: Vec<(f64, f64)>,
    /// Every try, as the destination's sidecar saw it (before retries).
    pub tries: f64,
    pub try_failures: f64,
    /// Retries the caller's sidecar sent (counted under the destination the
    /// caller addressed).
    pub retries: f64,
    /// The time the caller's sidecar spent on the requests itself, and the
    /// destination's sidecar on the tries (cumulative buckets).
    #[serde(with = "bounds")]
    pub proxy: Vec<(f64, f64)>,
    #[serde(with = "bounds")]
    pub dst_proxy: Vec<(f64, f64)>,
}

/// Buckets in JSON: the last bound, +Inf, as `null` (JSON has no
/// infinity).
mod bounds {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[(f64, f64)], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|(le, c)| (le.is_finite().then_some(*le), *c))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(f64, f64)>, D::Error> {
        let v: Vec<(Option<f64>, f64)> = Deserialize::deserialize(d)?;
        Ok(v.into_iter()
            .map(|(le, c)| (le.unwrap_or(f64::INFINITY), c))
            .collect())
    }
}

pub type Pair = (String, String);

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    pairs: HashMap<Pair, PairCounters>,
    /// Outbound requests by (route, backend).
    routes: HashMap<Pair, PairCounters>,
}

/// Counters by pair, and by route, of one report.
type Reported = (HashMap<Pair, PairCounters>, HashMap<Pair, PairCounters>);

#[derive(Default)]
pub struct Stats {
    history: Mutex<HashMap<ProxyKey, VecDeque<Sample>>>,
}

/// The samples a figure is made from: those of the last `window`, or
/// those taken at or after an instant.
#[derive(Clone, Copy)]
enum Span {
    Last(Duration),
    Since(Instant),
    /// The samples taken from the first instant to the second.
    Between(Instant, Instant),
}

/// A destination's golden signals over a window (a rollout's canary).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Signals {
    pub requests: u64,
    /// A fraction (0.995).
    pub success_rate: f64,
    pub p99_ms: f64,
}

/// A destination's signals over one step of a series.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// How long ago the step ended, in seconds.
    pub ago_s: f64,
    pub rps: f64,
    /// `None` without requests.
    pub success_rate: Option<f64>,
    pub p99_ms: Option<f64>,
    pub requests: u64,
}

/// One route and backend's outbound requests (`tandem top`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteStat {
    /// `namespace/name` of the HTTPRoute or GRPCRoute.
    pub route: String,
    /// The backend that answered.
    pub backend: String,
    pub rps: f64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
}

/// One row of `tandem stat` (the API's JSON, read back by the CLI).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PairStat {
    pub source: String,
    pub destination: String,
    pub rps: f64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Success of every try as the destination answered it, before retries
    /// (when the destination has a sidecar).
    #[serde(default)]
    pub raw_success_rate: Option<f64>,
    /// Retries the caller's sidecar sent in the window.
    #[serde(default)]
    pub retries: u64,
    /// The time the caller's sidecar spent on a request itself (not
    /// waiting on the network, the destination or a backoff).
    #[serde(default)]
    pub proxy_p50_ms: Option<f64>,
    #[serde(default)]
    pub proxy_p99_ms: Option<f64>,
    /// The same, in the destination's sidecar (each try).
    #[serde(default)]
    pub dst_proxy_p50_ms: Option<f64>,
    #[serde(default)]
    pub dst_proxy_p99_ms: Option<f64>,
}

impl Stats {
    /// A proxy's report, received now. Only the proxy's own traffic
    /// counts: outbound pairs from its service, inbound pairs to it.
    pub fn report(&self, key: &ProxyKey, report: Report) -> Result<(), String> {
        let (pairs, routes) = from_report(&key.1, report)?;
        self.record(key.clone(), pairs, routes, Instant::now());
        Ok(())
    }

    fn record(
        &self,
        key: ProxyKey,
        pairs: HashMap<Pair, PairCounters>,
        routes: HashMap<Pair, PairCounters>,
        at: Instant,
    ) {
        let mut h = self.history.lock();
        let q = h.entry(key).or_default();
        q.push_back(Sample { at, pairs, routes });
        while q
            .front()
            .is_some_and(|s| at.saturating_duration_since(s.at) > HISTORY)
        {
            q.pop_front();
        }
        // Proxies gone for longer than the history are forgotten.
        h.retain(|_, q| {
            q.back()
                .is_some_and(|s| at.saturating_duration_since(s.at) <= HISTORY)
        });
    }

    /// Each pair's counter differences over `span`, summed over every
    /// proxy, with its request rate.
    fn sums(&self, span: Span) -> HashMap<Pair, (PairCounters, f64)> {
        self.sums_of(span, |s| &s.pairs)
    }

    /// The same over another set of counters of the samples.
    fn sums_of(
        &self,
        span: Span,
        of: impl Fn(&Sample) -> &HashMap<Pair, PairCounters>,
    ) -> HashMap<Pair, (PairCounters, f64)> {
        let h = self.history.lock();
        let mut sums: HashMap<Pair, (PairCounters, f64)> = HashMap::new();
        let now = Instant::now();
        for samples in h.values() {
            let last = match span {
                Span::Between(_, to) => samples.iter().rev().find(|s| s.at <= to),
                _ => samples.back(),
            };
            let Some(last) = last else { continue };
            // A proxy whose reports stopped has nothing to say about this
            // window.
            let stale = match span {
                Span::Since(t) => last.at < t,
                Span::Last(window) => now.saturating_duration_since(last.at) > window,
                Span::Between(from, _) => last.at < from,
            };
            if stale {
                continue;
            }
            let base = samples
                .iter()
                .find(|s| match span {
                    Span::Since(t) | Span::Between(t, _) => s.at >= t,
                    Span::Last(window) => last.at.saturating_duration_since(s.at) <= window,
                })
                .unwrap_or(last);
            let dt = last.at.saturating_duration_since(base.at).as_secs_f64();
            for (pair, now) in of(last) {
                let d = delta(now, of(base).get(pair));
                if d.requests <= 0.0 && d.tries <= 0.0 && d.retries <= 0.0 {
                    continue;
                }
                let entry = sums
                    .entry(pair.clone())
                    .or_insert_with(|| (PairCounters::default(), 0.0));
                add(&mut entry.0, &d);
                if dt > 0.0 {
                    entry.1 += d.requests / dt;
                }
            }
        }
        sums
    }

    /// What the callers' sidecars saw of calls to `destination` between
    /// the first report at or after `since` and the last, summed over every
    /// caller (nothing from before `since` counts).
    pub fn destination(&self, destination: &str, since: Instant) -> Signals {
        signals(&self.destination_counters(destination, since))
    }

    /// The sums behind [`Stats::destination`], to add to other replicas'.
    pub fn destination_counters(&self, destination: &str, since: Instant) -> PairCounters {
        let mut c = PairCounters::default();
        for ((_, dst), (d, _)) in self.sums(Span::Since(since)) {
            if dst == destination {
                add(&mut c, &d);
            }
        }
        c
    }
}

/// Adds `d` to `acc` (another replica's sums to this one's).
pub fn merge(acc: &mut PairCounters, d: &PairCounters) {
    add(acc, d);
}

/// The golden signals of summed counters.
pub fn signals(c: &PairCounters) -> Signals {
    Signals {
        requests: c.requests.round() as u64,
        success_rate: if c.requests > 0.0 {
            round(1.0 - c.failures / c.requests, 4)
        } else {
            1.0
        },
        p99_ms: round(quantile(&c.buckets, 0.99) * 1000.0, 3),
    }
}

impl Stats {
    /// What the callers of `destination` saw of it over the last `window`,
    /// in `step`s, oldest first (the dashboard's charts). A step's figures
    /// come from reports taken during it.
    pub fn series(&self, destination: &str, window: Duration, step: Duration) -> Vec<Point> {
        let now = Instant::now();
        let steps = (window.as_secs_f64() / step.as_secs_f64().max(0.001)).ceil() as u32;
        (0..steps.min(600))
            .rev()
            .map(|k| {
                let to = now.checked_sub(step * k).unwrap_or(now);
                let from = to.checked_sub(step).unwrap_or(to);
                let mut c = PairCounters::default();
                let mut rps = 0.0;
                for ((_, dst), (d, r)) in self.sums(Span::Between(from, to)) {
                    if dst == destination {
                        add(&mut c, &d);
                        rps += r;
                    }
                }
                Point {
                    ago_s: (step * k).as_secs_f64(),
                    rps: round(rps, 2),
                    success_rate: (c.requests > 0.0)
                        .then(|| round(1.0 - c.failures / c.requests, 4)),
                    p99_ms: ms_quantile(&c.buckets, 0.99),
                    requests: c.requests.round() as u64,
                }
            })
            .collect()
    }

    /// Outbound requests per route and backend over the last `window`, the
    /// busiest first (`tandem top`).
    pub fn routes(&self, window: Duration) -> Vec<RouteStat> {
        let mut out: Vec<RouteStat> = self
            .sums_of(Span::Last(window), |s| &s.routes)
            .into_iter()
            .filter(|(_, (c, _))| c.requests > 0.0)
            .map(|((route, backend), (c, rps))| RouteStat {
                route,
                backend,
                rps: round(rps, 2),
                success_rate: round(1.0 - c.failures / c.requests, 4),
                p50_ms: round(quantile(&c.buckets, 0.50) * 1000.0, 3),
                p99_ms: round(quantile(&c.buckets, 0.99) * 1000.0, 3),
                requests: c.requests.round() as u64,
            })
            .collect();
        out.sort_by(|a, b| b.rps.total_cmp(&a.rps).then_with(|| a.route.cmp(&b.route)));
        out
    }

    /// Aggregates the last `window` over every proxy.
    pub fn query(&self, window: Duration) -> Vec<PairStat> {
        let sums = self.sums(Span::Last(window));
        let mut out: Vec<PairStat> = sums
            .into_iter()
            // Tries seen only by a destination (a caller without a sidecar,
            // or a caller whose own sidecar has not reported) make no row.
            .filter(|(_, (c, _))| c.requests > 0.0 || c.retries > 0.0)
            .map(|((source, destination), (c, rps))| PairStat {
                source,
                destination,
                rps: round(rps, 2),
                success_rate: round(
                    if c.requests > 0.0 {
                        1.0 - c.failures / c.requests
                    } else {
                        1.0
                    },
                    4,
                ),
                p50_ms: round(quantile(&c.buckets, 0.50) * 1000.0, 3),
                p95_ms: round(quantile(&c.buckets, 0.95) * 1000.0, 3),
                p99_ms: round(quantile(&c.buckets, 0.99) * 1000.0, 3),
                requests: c.requests.round() as u64,
                raw_success_rate: (c.tries > 0.0).then(|| round(1.0 - c.try_failures / c.tries, 4)),
                retries: c.retries.round() as u64,
                proxy_p50_ms: ms_quantile(&c.proxy, 0.50),
                proxy_p99_ms: ms_quantile(&c.proxy, 0.99),
                dst_proxy_p50_ms: ms_quantile(&c.dst_proxy, 0.50),
                dst_proxy_p99_ms: ms_quantile(&c.dst_proxy, 0.99),
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        out
    }
}

/// A quantile in milliseconds, with a microsecond's resolution; `None`
/// without observations.
fn ms_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    buckets
        .last()
        .is_some_and(|(_, n)| *n > 0.0)
        .then(|| round(quantile(buckets, q) * 1000.0, 3))
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// `now - base`; a counter that went down means the proxy restarted, and
/// then `now` is the whole delta.
fn delta(now: &PairCounters, base: Option<&PairCounters>) -> PairCounters {
    let Some(base) = base else { return now.clone() };
    if now.requests < base.requests || now.tries < base.tries || now.retries < base.retries {
        return now.clone();
    }
    PairCounters {
        requests: now.requests - base.requests,
        failures: (now.failures - base.failures).max(0.0),
        buckets: bucket_delta(&now.buckets, &base.buckets),
        tries: now.tries - base.tries,
        try_failures: (now.try_failures - base.try_failures).max(0.0),
        retries: now.retries - base.retries,
        proxy: bucket_delta(&now.proxy, &base.proxy),
        dst_proxy: bucket_delta(&now.dst_proxy, &base.dst_proxy),
    }
}

fn bucket_delta(now: &[(f64, f64)], base: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|(le, c)| {
            let b = base
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (*le, (c - b).max(0.0))
        })
        .collect()
}

fn add(acc: &mut PairCounters, d: &PairCounters) {
    acc.requests += d.requests;
    acc.failures += d.failures;
    acc.tries += d.tries;
    acc.try_failures += d.try_failures;
    acc.retries += d.retries;
    add_buckets(&mut acc.buckets, &d.buckets);
    add_buckets(&mut acc.proxy, &d.proxy);
    add_buckets(&mut acc.dst_proxy, &d.dst_proxy);
}

fn add_buckets(acc: &mut Vec<(f64, f64)>, d: &[(f64, f64)]) {
    for (le, c) in d {
        match acc.iter_mut().find(|(l, _)| l == le) {
            Some(b) => b.1 += c,
            None => acc.push((*le, *c)),
        }
    }
    acc.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// Quantile from cumulative histogram buckets, interpolating linearly
/// inside the bucket (as Prometheus' `histogram_quantile` does).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev_le;
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return le;
            }
            return prev_le + (le - prev_le) * ((rank - prev_count) / in_bucket);
        }
        prev_le = le;
        prev_count = count;
    }
    prev_le
}

/// Most service pairs one report may carry, and most buckets a histogram
/// may have: a report beyond them is refused whole.
pub const MAX_REPORT_PAIRS: usize = 4096;
const MAX_BUCKETS: usize = 64;

/// A proxy's report as counters per pair, checked: bounds finite and
/// ascending, one count per bucket, names that are service names, and
/// only the reporting service's own traffic (outbound from `service`,
/// inbound to it).
fn from_report(service: &str, r: Report) -> Result<Reported, String> {
    if r.pairs.len() > MAX_REPORT_PAIRS {
        return Err(format!(
            "{} service pairs; at most {MAX_REPORT_PAIRS}",
            r.pairs.len()
        ));
    }
    let bounds_ok = |b: &[f64]| {
        b.len() <= MAX_BUCKETS
            && b.iter().all(|x| x.is_finite())
            && b.windows(2).all(|w| w[0] < w[1])
    };
    if !bounds_ok(&r.latency_bounds) || !bounds_ok(&r.proxy_bounds) {
        return Err("histogram bounds must be finite and ascending".into());
    }
    let cumulative = |bounds: &[f64], counts: &[u64]| -> Result<Vec<(f64, f64)>, String> {
        if counts.is_empty() {
            return Ok(Vec::new());
        }
        if counts.len() != bounds.len() + 1 {
            return Err(format!(
                "{} bucket counts for {} bounds",
                counts.len(),
                bounds.len()
            ));
        }
        let mut acc = 0.0;
        Ok(bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts)
            .map(|(le, c)| {
                acc += *c as f64;
                (le, acc)
            })
            .collect())
    };
    let mut out: HashMap<Pair, PairCounters> = HashMap::new();
    let mut routes: HashMap<Pair, PairCounters> = HashMap::new();
    for p in r.pairs {
        let own = if p.inbound { &p.destination } else { &p.source };
        // An inbound caller without a verified identity has an empty name.
        let names_ok = own == service
            && [&p.source, &p.destination].iter().all(|n| {
                n.is_empty()
                    || tandem_identity::spiffe::valid_label(n)
                    || (!p.inbound && *n == tandem_config::snapshot::UNLISTED_EGRESS)
            });
        if !names_ok {
            continue;
        }
        let latency = cumulative(&r.latency_bounds, &p.latency)?;
        let proxy = cumulative(&r.proxy_bounds, &p.proxy_latency)?;
        if !p.inbound && !p.route.is_empty() && p.route.len() <= 253 {
            let c = routes
                .entry((p.route.clone(), p.destination.clone()))
                .or_default();
            c.requests += p.requests as f64;
            c.failures += p.failures as f64;
            add_buckets(&mut c.buckets, &latency);
        }
        let c = out.entry((p.source, p.destination)).or_default();
        if p.inbound {
            c.tries += p.requests as f64;
            c.try_failures += p.failures as f64;
            add_buckets(&mut c.dst_proxy, &proxy);
        } else {
            c.requests += p.requests as f64;
            c.failures += p.failures as f64;
            c.retries += p.retries as f64;
            add_buckets(&mut c.buckets, &latency);
            add_buckets(&mut c.proxy, &proxy);
        }
    }
    Ok((out, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_cross_replicas_as_json_with_their_infinite_bucket() {
        let mut c = PairCounters {
            requests: 12.0,
            failures: 1.0,
            buckets: vec![(0.1, 10.0), (f64::INFINITY, 12.0)],
            ..PairCounters::default()
        };
        let wire = serde_json::to_string(&c).expect("json");
        let back: PairCounters = serde_json::from_str(&wire).expect("parse");
        assert_eq!(back, c);
        merge(&mut c, &back);
        let s = signals(&c);
        assert_eq!((s.requests, s.success_rate), (24, 0.9167));
    }

    use tandem_api::v1::PairTraffic;

    fn pair(inbound: bool, src: &str, dst: &str, requests: u64, failures: u64) -> PairTraffic {
        PairTraffic {
            inbound,
            source: src.into(),
            destination: dst.into(),
            requests,
            failures,
            latency: vec![requests / 2, requests - requests / 2, 0],
            proxy_latency: vec![requests, 0],
            retries: 0,
            route: String::new(),
        }
    }

    fn report(pairs: Vec<PairTraffic>) -> Report {
        Report {
            latency_bounds: vec![0.001, 0.002],
            proxy_bounds: vec![0.0001],
            pairs,
        }
    }

    #[test]
    fn reports_become_pair_counters() {
        let mut out = pair(false, "web", "catalog-v1", 100, 10);
        out.retries = 7;
        let (m, _) = from_report(
            "web",
            report(vec![
                out,
                pair(true, "loadgen", "web", 100, 0),
                // Not this proxy's traffic: ignored.
                pair(false, "orders", "payments", 5, 5),
                pair(true, "web", "orders", 5, 5),
                pair(false, "web", "Bad Name", 5, 5),
            ]),
        )
        .expect("valid");
        assert_eq!(m.len(), 2);
        let c = &m[&("web".to_string(), "catalog-v1".to_string())];
        assert_eq!((c.requests, c.failures, c.retries), (100.0, 10.0, 7.0));
        // Requests a route took are counted by route and backend too.
        let mut routed = pair(false, "web", "catalog-v2", 8, 1);
        routed.route = "default/catalog".into();
        let (_, routes) = from_report("web", report(vec![routed])).expect("valid");
        let r = &routes[&("default/catalog".to_string(), "catalog-v2".to_string())];
        assert_eq!((r.requests, r.failures), (8.0, 1.0));
        assert_eq!(
            c.buckets,
            vec![(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)]
        );
        assert_eq!(c.proxy, vec![(0.0001, 100.0), (f64::INFINITY, 100.0)]);
        let inbound = &m[&("loadgen".to_string(), "web".to_string())];
        assert_eq!((inbound.requests, inbound.tries), (0.0, 100.0));
        assert_eq!(inbound.dst_proxy.len(), 2);
        // Malformed reports are refused whole.
        let mut bad = report(vec![pair(false, "web", "x", 1, 0)]);
        bad.latency_bounds = vec![0.002, 0.001];
        assert!(from_report("web", bad).is_err());
        let mut bad = report(vec![pair(false, "web", "x", 1, 0)]);
        bad.pairs[0].latency.push(1);
        assert!(from_report("web", bad).is_err());
        let many = (0..=MAX_REPORT_PAIRS)
            .map(|i| pair(false, "web", &format!("s{i}"), 1, 0))
            .collect();
        assert!(from_report("web", report(many)).is_err());
    }

    #[test]
    fn quantiles_interpolate() {
        let b = vec![(0.001, 60.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&b, 0.5) - 0.000_833).abs() < 1e-5);
        assert!((quantile(&b, 0.8) - 0.0015).abs() < 1e-9);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn window_differences_and_restart() {
        let stats = Stats::default();
        let key: ProxyKey = ("default".into(), "web".into(), "web-1".into());
        let t0 = Instant::now();
        let pair = ("web".to_string(), "orders".to_string());
        let mk = |r: f64, f: f64| {
            let mut m = HashMap::new();
            m.insert(
                pair.clone(),
                PairCounters {
                    requests: r,
                    failures: f,
                    buckets: vec![(0.001, r), (f64::INFINITY, r)],
                    ..PairCounters::default()
                },
            );
            m
        };
        stats.record(key.clone(), mk(100.0, 0.0), HashMap::new(), t0);
        stats.record(
            key.clone(),
            mk(200.0, 10.0),
            HashMap::new(),
            t0 + Duration::from_secs(10),
        );
        let s = stats.query(Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].requests, 100);
        assert_eq!(s[0].rps, 10.0);
        assert_eq!(s[0].success_rate, 0.9);
        // A restarted proxy's counters start over; the new value is the delta.
        stats.record(
            key,
            mk(5.0, 0.0),
            HashMap::new(),
            t0 + Duration::from_secs(11),
        );
        let s = stats.query(Duration::from_secs(1));
        assert_eq!(s[0].requests, 5);
    }
}
