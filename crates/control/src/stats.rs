//! Golden signals per (source, destination) pair: the control plane scrapes
//! every connected proxy's `/metrics` each interval, keeps a short history
//! of the outbound counters, and answers `tandem stat` from the differences
//! over a window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tandem_runtime::sync::Mutex;
use tokio::time::Instant;

use crate::mesh::{Mesh, ProxyKey};

const HISTORY: Duration = Duration::from_secs(300);

/// Cumulative counters of one pair in one proxy at one time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairCounters {
    /// What the caller's sidecar answered (after retries).
    pub requests: f64,
    pub failures: f64,
    /// `(upper bound in seconds, cumulative count)`, ascending.
    pub buckets: Vec<(f64, f64)>,
    /// Every try, as the destination's sidecar saw it (before retries).
    pub tries: f64,
    pub try_failures: f64,
    /// Retries the caller's sidecar sent (counted under the destination the
    /// caller addressed).
    pub retries: f64,
}

pub type Pair = (String, String);

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    pairs: HashMap<Pair, PairCounters>,
}

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
}

/// A destination's golden signals over a window (a rollout's canary).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Signals {
    pub requests: u64,
    /// A fraction (0.995).
    pub success_rate: f64,
    pub p99_ms: f64,
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
}

impl Stats {
    fn record(&self, key: ProxyKey, pairs: HashMap<Pair, PairCounters>, at: Instant) {
        let mut h = self.history.lock();
        let q = h.entry(key).or_default();
        q.push_back(Sample { at, pairs });
        while q
            .front()
            .is_some_and(|s| at.saturating_duration_since(s.at) > HISTORY)
        {
            q.pop_front();
        }
    }

    fn forget_except(&self, keep: &[ProxyKey]) {
        let mut h = self.history.lock();
        h.retain(|k, _| keep.contains(k));
    }

    /// Each pair's counter differences over `span`, summed over every
    /// proxy, with its request rate.
    fn sums(&self, span: Span) -> HashMap<Pair, (PairCounters, f64)> {
        let h = self.history.lock();
        let mut sums: HashMap<Pair, (PairCounters, f64)> = HashMap::new();
        let now = Instant::now();
        for samples in h.values() {
            let Some(last) = samples.back() else { continue };
            // A proxy whose scrapes stopped answering has nothing to say
            // about this window.
            let stale = match span {
                Span::Since(t) => last.at < t,
                Span::Last(window) => now.saturating_duration_since(last.at) > window,
            };
            if stale {
                continue;
            }
            let base = samples
                .iter()
                .find(|s| match span {
                    Span::Since(t) => s.at >= t,
                    Span::Last(window) => last.at.saturating_duration_since(s.at) <= window,
                })
                .unwrap_or(last);
            let dt = last.at.saturating_duration_since(base.at).as_secs_f64();
            for (pair, now) in &last.pairs {
                let d = delta(now, base.pairs.get(pair));
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
    /// the first scrape at or after `since` and the last, summed over every
    /// caller (nothing from before `since` counts).
    pub fn destination(&self, destination: &str, since: Instant) -> Signals {
        let mut c = PairCounters::default();
        for ((_, dst), (d, _)) in self.sums(Span::Since(since)) {
            if dst == destination {
                add(&mut c, &d);
            }
        }
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

    /// Aggregates the last `window` over every proxy.
    pub fn query(&self, window: Duration) -> Vec<PairStat> {
        let sums = self.sums(Span::Last(window));
        let mut out: Vec<PairStat> = sums
            .into_iter()
            // Tries seen only by a destination (a caller without a sidecar,
            // or a caller's own sidecar not scraped) make no row.
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
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        out
    }
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
    let buckets = now
        .buckets
        .iter()
        .map(|(le, c)| {
            let b = base
                .buckets
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (*le, (c - b).max(0.0))
        })
        .collect();
    PairCounters {
        requests: now.requests - base.requests,
        failures: (now.failures - base.failures).max(0.0),
        buckets,
        tries: now.tries - base.tries,
        try_failures: (now.try_failures - base.try_failures).max(0.0),
        retries: now.retries - base.retries,
    }
}

fn add(acc: &mut PairCounters, d: &PairCounters) {
    acc.requests += d.requests;
    acc.failures += d.failures;
    acc.tries += d.tries;
    acc.try_failures += d.try_failures;
    acc.retries += d.retries;
    for (le, c) in &d.buckets {
        match acc.buckets.iter_mut().find(|(l, _)| l == le) {
            Some(b) => b.1 += c,
            None => acc.buckets.push((*le, *c)),
        }
    }
    acc.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
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

/// Parses the outbound request metrics out of a proxy's Prometheus text.
pub fn parse_metrics(text: &str) -> HashMap<Pair, PairCounters> {
    let mut out: HashMap<Pair, PairCounters> = HashMap::new();
    for line in text.lines() {
        let (name, rest) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let is_total = name == "tandem_requests_total";
        let is_bucket = name == "tandem_request_duration_seconds_bucket";
        let is_retries = name == "tandem_retries_total";
        if !is_total && !is_bucket && !is_retries {
            continue;
        }
        let Some(end) = rest.rfind('}') else { continue };
        let labels = parse_labels(&rest[..end]);
        let value: f64 = match rest[end + 1..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
        {
            Some(v) => v,
            None => continue,
        };
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let pair = (
            get("src_service").to_string(),
            get("dst_service").to_string(),
        );
        if is_retries {
            out.entry(pair).or_default().retries += value;
            continue;
        }
        let failed = |labels_status: &str| {
            labels_status.parse::<u16>().unwrap_or(0) >= 500 || !get("tandem_error").is_empty()
        };
        if get("direction") == "inbound" {
            if is_total {
                let c = out.entry(pair).or_default();
                c.tries += value;
                if failed(get("status_code")) {
                    c.try_failures += value;
                }
            }
            continue;
        }
        if get("direction") != "outbound" {
            continue;
        }
        let c = out.entry(pair).or_default();
        if is_total {
            c.requests += value;
            let status: u16 = get("status_code").parse().unwrap_or(0);
            if status >= 500 || !get("tandem_error").is_empty() {
                c.failures += value;
            }
        } else {
            let le = match get("le") {
                "+Inf" => f64::INFINITY,
                v => match v.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            match c.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += value,
                None => c.buckets.push((le, value)),
            }
        }
    }
    for c in out.values_mut() {
        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            chars.next();
            if c != ',' && !c.is_whitespace() {
                name.push(c);
            }
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => {}
                },
                '"' => break,
                o => value.push(o),
            }
        }
        out.push((name, value));
    }
    out
}

/// Largest metrics page read from a proxy; a longer one is dropped (and
/// its connection closed) instead of filling the control plane's memory.
pub const MAX_STATS_BODY: usize = 8 << 20;

/// Scrapes every connected proxy each `interval`.
pub async fn collect(mesh: Arc<Mesh>, stats: Arc<Stats>, interval: Duration) {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets = mesh.admin_targets();
        let keys: Vec<ProxyKey> = targets.iter().map(|(k, _)| k.clone()).collect();
        let scrapes = targets.into_iter().map(|(key, admin)| {
            let client = client.clone();
            async move {
                let uri: hyper::Uri = format!("http://{admin}/metrics").parse().ok()?;
                let fut = async {
                    let resp = client.get(uri).await.ok()?;
                    let body = http_body_util::Limited::new(resp.into_body(), MAX_STATS_BODY);
                    let body = match body.collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => {
                            tracing::warn!(proxy = %key.2, error = %e, "metrics page refused");
                            return None;
                        }
                    };
                    Some(String::from_utf8_lossy(&body).into_owned())
                };
                let text = tokio::time::timeout(Duration::from_secs(2), fut)
                    .await
                    .ok()??;
                Some((key, parse_metrics(&text)))
            }
        });
        let now = Instant::now();
        for (key, pairs) in futures_util::future::join_all(scrapes)
            .await
            .into_iter()
            .flatten()
        {
            stats.record(key, pairs, now);
        }
        stats.forget_except(&keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tandem_requests HTTP requests
# TYPE tandem_requests counter
tandem_requests_total{direction="outbound",src_service="web",dst_service="catalog-v1",status_code="200",tandem_error=""} 90
tandem_requests_total{direction="outbound",src_service="web",dst_service="catalog-v1",status_code="503",tandem_error=""} 10
tandem_requests_total{direction="inbound",src_service="loadgen",dst_service="web",status_code="200",tandem_error=""} 100
tandem_retries_total{src_service="web",dst_service="catalog-v1"} 7
tandem_request_duration_seconds_bucket{le="0.001",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="200",tandem_error=""} 50
tandem_request_duration_seconds_bucket{le="0.002",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="200",tandem_error=""} 90
tandem_request_duration_seconds_bucket{le="+Inf",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="200",tandem_error=""} 90
tandem_request_duration_seconds_bucket{le="0.001",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="503",tandem_error=""} 10
tandem_request_duration_seconds_bucket{le="0.002",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="503",tandem_error=""} 10
tandem_request_duration_seconds_bucket{le="+Inf",direction="outbound",src_service="web",dst_service="catalog-v1",status_code="503",tandem_error=""} 10
"#;

    #[test]
    fn parses_outbound_pairs() {
        let m = parse_metrics(TEXT);
        assert_eq!(m.len(), 2);
        let c = &m[&("web".to_string(), "catalog-v1".to_string())];
        assert_eq!(c.requests, 100.0);
        assert_eq!(c.failures, 10.0);
        assert_eq!(c.retries, 7.0);
        let inbound = &m[&("loadgen".to_string(), "web".to_string())];
        assert_eq!((inbound.requests, inbound.tries), (0.0, 100.0));
        assert_eq!(
            c.buckets,
            vec![(0.001, 60.0), (0.002, 100.0), (f64::INFINITY, 100.0)]
        );
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
        stats.record(key.clone(), mk(100.0, 0.0), t0);
        stats.record(key.clone(), mk(200.0, 10.0), t0 + Duration::from_secs(10));
        let s = stats.query(Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].requests, 100);
        assert_eq!(s[0].rps, 10.0);
        assert_eq!(s[0].success_rate, 0.9);
        // A restarted proxy's counters start over; the new value is the delta.
        stats.record(key, mk(5.0, 0.0), t0 + Duration::from_secs(11));
        let s = stats.query(Duration::from_secs(1));
        assert_eq!(s[0].requests, 5);
    }
}
