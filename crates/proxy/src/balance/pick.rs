//! Picking an endpoint of a backend, by the destination's load balancer:
//! power of two choices over peak-EWMA cost (the default), round-robin,
//! least-request, or a ring hash of a request header. Every algorithm skips
//! endpoints that outlier detection has ejected while others are in.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_config::snapshot::LoadBalancer;

use crate::policy::outlier::now_ms;
use crate::routing::{Backend, Endpoint};

/// The load balancer of one backend, built with the routing table.
pub(crate) enum Lb {
    PeakEwma,
    RoundRobin(AtomicUsize),
    LeastRequest,
    /// Sorted `(point, endpoint index)`, [`RING_POINTS`] per endpoint.
    RingHash(Vec<(u64, usize)>),
}

const RING_POINTS: usize = 100;

/// FNV-1a: stable across processes and versions, so every sidecar maps a
/// key to the same endpoint.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Spreads a hash over the ring (FNV alone clusters similar inputs).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl Lb {
    pub(crate) fn new(kind: &LoadBalancer, endpoints: &[Endpoint]) -> Lb {
        match kind {
            LoadBalancer::PeakEwma => Lb::PeakEwma,
            LoadBalancer::RoundRobin => Lb::RoundRobin(AtomicUsize::new(fastrand::usize(..))),
            LoadBalancer::LeastRequest => Lb::LeastRequest,
            LoadBalancer::RingHash { .. } => {
                let mut ring = Vec::with_capacity(endpoints.len() * RING_POINTS);
                for (i, e) in endpoints.iter().enumerate() {
                    for v in 0..RING_POINTS {
                        let key = format!("{}#{v}", e.authority);
                        ring.push((mix(fnv1a(key.as_bytes())), i));
                    }
                }
                ring.sort_unstable();
                Lb::RingHash(ring)
            }
        }
    }
}

/// Picks one of `n` endpoints by power of two choices over `cost(i)`.
pub(crate) fn p2c(n: usize, cost: impl Fn(usize) -> f64) -> Option<usize> {
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

impl Backend {
    /// The endpoints picks choose from: the nearest locality tier with an
    /// endpoint that outlier detection has not ejected (all of them when
    /// there is one tier, or when every endpoint is ejected).
    fn active(&self) -> Range<usize> {
        let n = self.endpoints.len();
        if self.tiers.len() <= 1 {
            return 0..n;
        }
        let now = now_ms();
        let mut start = 0;
        for &end in &self.tiers {
            if self.endpoints[start..end]
                .iter()
                .any(|e| !e.load.outlier.is_ejected(now))
            {
                return start..end;
            }
            start = end;
        }
        0..n
    }

    /// The index of an endpoint for a first try, by the backend's load
    /// balancer. `key` is the hash of the ring-hash header, when the
    /// request has it.
    pub(crate) fn pick_for(&self, key: Option<u64>) -> Option<usize> {
        let range = self.active();
        let n = range.len();
        match &self.lb {
            Lb::PeakEwma => self.pick_in(range),
            Lb::RoundRobin(next) => {
                if n == 0 {
                    return None;
                }
                let now = now_ms();
                let mut i = range.start;
                // The next endpoint in turn that is not ejected.
                for _ in 0..n {
                    i = range.start + next.fetch_add(1, Ordering::Relaxed) % n;
                    if !self.endpoints[i].load.outlier.is_ejected(now) {
                        break;
                    }
                }
                Some(i)
            }
            Lb::LeastRequest => {
                let now = now_ms();
                let i = range.start
                    + p2c(n, |i| {
                        let l = &self.endpoints[range.start + i].load;
                        if l.outlier.is_ejected(now) {
                            f64::INFINITY
                        } else {
                            l.pending() as f64
                        }
                    })?;
                self.unless_ejected(i, &[], range)
            }
            Lb::RingHash(ring) => match key {
                None => self.pick_in(range),
                Some(k) => {
                    let k = mix(k);
                    let at = ring.partition_point(|(p, _)| *p < k);
                    let now = now_ms();
                    // The key's point, or the next one whose endpoint is
                    // in the nearest tier and not ejected.
                    let mut found = ring.get(at).or_else(|| ring.first())?.1;
                    for j in 0..ring.len() {
                        let idx = ring[(at + j) % ring.len()].1;
                        if range.contains(&idx) && !self.endpoints[idx].load.outlier.is_ejected(now)
                        {
                            found = idx;
                            break;
                        }
                    }
                    Some(found)
                }
            },
        }
    }

    /// Power of two choices over the endpoints' peak-EWMA cost.
    pub(crate) fn pick(&self) -> Option<usize> {
        self.pick_in(self.active())
    }

    fn pick_in(&self, range: Range<usize>) -> Option<usize> {
        let now = tokio::time::Instant::now();
        let i = range.start
            + p2c(range.len(), |i| {
                self.endpoints[range.start + i].load.cost(now)
            })?;
        self.unless_ejected(i, &[], range)
    }

    /// Endpoint `i`, unless outlier detection ejected it and another of
    /// `range` (not in `tried`) is in: then a power-of-two pick among
    /// those. Both random candidates of a pick can be ejected; this keeps
    /// them out anyway.
    fn unless_ejected(&self, i: usize, tried: &[SocketAddr], range: Range<usize>) -> Option<usize> {
        let ep = self.endpoints.get(i)?;
        let now = now_ms();
        if !ep.load.outlier.is_ejected(now) {
            return Some(i);
        }
        let live: Vec<usize> = range
            .filter(|&j| {
                let e = &self.endpoints[j];
                !e.load.outlier.is_ejected(now) && !tried.contains(&e.addr())
            })
            .collect();
        let t = tokio::time::Instant::now();
        match p2c(live.len(), |j| self.endpoints[live[j]].load.cost(t)) {
            Some(j) => live.get(j).copied(),
            None => Some(i),
        }
    }

    /// A pick for a retry: one of the endpoints not tried yet when there
    /// are any, the nearest first.
    pub(crate) fn pick_avoiding(&self, tried: &[SocketAddr]) -> Option<usize> {
        if tried.is_empty() || tried.len() >= self.endpoints.len() {
            return self.pick();
        }
        let now = tokio::time::Instant::now();
        let untried = |r: Range<usize>| -> Vec<usize> {
            r.filter(|&j| !tried.contains(&self.endpoints[j].addr()))
                .collect()
        };
        let range = self.active();
        let mut fresh = untried(range.clone());
        let mut within = range;
        if fresh.is_empty() {
            within = 0..self.endpoints.len();
            fresh = untried(within.clone());
        }
        let i = p2c(fresh.len(), |i| self.endpoints[fresh[i]].load.cost(now))?;
        self.unless_ejected(*fresh.get(i)?, tried, within)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::three_endpoints;
    use tandem_config::snapshot::CircuitBreaker;

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

    #[test]
    fn ejected_endpoints_are_never_picked_while_others_are_in() {
        let r = three_endpoints();
        let b = &r.destination("api").expect("api").backends[0];
        let cb = CircuitBreaker {
            consecutive_errors: 1,
            consecutive_gateway_errors: 0,
            interval_ms: 1000,
            base_ejection_ms: 60_000,
            max_ejection_percent: 100,
            max_requests: None,
            max_connections: None,
            max_pending_requests: None,
        };
        for e in &b.endpoints[..2] {
            e.load.outlier.eject(&cb, now_ms());
        }
        for _ in 0..200 {
            assert_eq!(b.pick(), Some(2));
            assert_eq!(b.pick_for(None), Some(2));
        }
    }

    /// Endpoints 127.0.0.1:20.. in (cluster, zone) pairs, seen by a proxy
    /// of cluster `home` in zone `z1`.
    fn located(eps: &[(&str, &str)], lb: &str) -> crate::routing::Routing {
        use crate::routing::tests::snapshot;
        let mut s = snapshot("127.0.0.1:20");
        s.cluster = "home".into();
        if lb == "round-robin" {
            s.destinations[0].policy = Some(tandem_config::snapshot::Policy {
                source: String::new(),
                timeout_ms: None,
                retry: None,
                load_balancer: LoadBalancer::RoundRobin,
                circuit_breaker: None,
            });
        }
        let proto = s.destinations[0].backends[0].endpoints[0].clone();
        s.destinations[0].backends[0].endpoints = eps
            .iter()
            .enumerate()
            .map(|(i, (cluster, zone))| {
                let mut e = proto.clone();
                e.address = format!("127.0.0.1:{}", 20 + i);
                e.cluster = cluster.to_string();
                e.zone = zone.to_string();
                e
            })
            .collect();
        let kept = crate::routing::Kept::in_zone("z1");
        crate::routing::Routing::build(1, s, &kept).expect("build")
    }

    fn eject(e: &Endpoint) {
        let cb = CircuitBreaker {
            consecutive_errors: 1,
            consecutive_gateway_errors: 0,
            interval_ms: 1000,
            base_ejection_ms: 60_000,
            max_ejection_percent: 100,
            max_requests: None,
            max_connections: None,
            max_pending_requests: None,
        };
        e.load.outlier.eject(&cb, now_ms());
    }

    #[test]
    fn picks_stay_in_the_nearest_locality_with_a_live_endpoint() {
        for lb in ["peak-ewma", "round-robin"] {
            // Another cluster, the proxy's zone, its cluster elsewhere.
            let r = located(&[("west", ""), ("", "z1"), ("", "z2"), ("home", "z1")], lb);
            let b = &r.destination("api").expect("api").backends[0];
            let port = |i: usize| b.endpoints[i].addr().port();
            assert_eq!(b.tiers, [2, 3, 4], "{lb}");
            for _ in 0..100 {
                let i = b.pick_for(None).expect("pick");
                assert!([21, 23].contains(&port(i)), "{lb}: {}", port(i));
            }
            // The zone's endpoints ejected: the rest of the cluster.
            eject(&b.endpoints[0]);
            eject(&b.endpoints[1]);
            for _ in 0..50 {
                assert_eq!(port(b.pick_for(None).expect("pick")), 22, "{lb}");
            }
            // Nothing left in the cluster: the other cluster.
            eject(&b.endpoints[2]);
            for _ in 0..50 {
                assert_eq!(port(b.pick_for(None).expect("pick")), 20, "{lb}");
            }
        }
    }

    #[test]
    fn a_retry_moves_to_the_next_locality_once_the_nearest_is_tried() {
        let r = located(&[("", "z1"), ("west", "")], "peak-ewma");
        let b = &r.destination("api").expect("api").backends[0];
        let local = b.endpoints[0].addr();
        assert_eq!(
            b.pick_avoiding(&[local])
                .map(|i| b.endpoints[i].addr().port()),
            Some(21)
        );
        // Without zones or clusters, one tier: every endpoint is a peer.
        let flat = three_endpoints();
        assert_eq!(flat.destination("api").expect("api").backends[0].tiers, [3]);
    }

    #[test]
    fn a_retry_goes_to_an_endpoint_not_tried() {
        let r = three_endpoints();
        let b = &r.destination("api").expect("api").backends[0];
        let tried = [b.endpoints[0].addr(), b.endpoints[2].addr()];
        for _ in 0..100 {
            assert_eq!(b.pick_avoiding(&tried), Some(1));
        }
        // All tried: any of them.
        let all: Vec<_> = b.endpoints.iter().map(Endpoint::addr).collect();
        assert!(b.pick_avoiding(&all).is_some());
    }
}
