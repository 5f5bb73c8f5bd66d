//! The routing table a proxy runs on, built from a snapshot and swapped in
//! whole: a request loads one `Arc<Routing>` and sees one consistent config.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use http::uri::Authority;
use rustls_pki_types::ServerName;
use tandem_config::snapshot::{CircuitBreaker, Inbound, LoadBalancer, Protocol, Route, Snapshot};

use crate::balance::{p2c, EndpointLoad};
use crate::metrics::Name;
use crate::outlier::{max_ejected, now_ms, Outcome};
use crate::retry::{BudgetCache, RuntimePolicy};
use crate::transport::PeerNames;

pub struct Routing {
    pub version: u64,
    pub snapshot: Arc<Snapshot>,
    pub inbound: Option<Inbound>,
    /// Keyed by `name` (same namespace as the proxy) and `name.namespace`.
    destinations: HashMap<Box<str>, Arc<Destination>>,
    unknown: HashSet<Box<str>>,
    pub peer_names: Arc<PeerNames>,
    /// The inbound rate limit of this proxy's service, if any.
    pub limiter: Option<Arc<crate::ratelimit::Limiter>>,
}

pub struct Destination {
    pub name: Name,
    pub protocol: Protocol,
    pub default_port: u16,
    pub routes: Vec<Route>,
    /// Sum of each route's backend weights, parallel to `routes`.
    pub totals: Vec<u64>,
    pub backends: Vec<Backend>,
    /// Timeout and retries, when a TrafficPolicy targets the destination.
    pub policy: Option<RuntimePolicy>,
    /// Parallel to `routes`: the policy of a rule with its own timeouts or
    /// retry (the destination's policy with the rule's overrides).
    pub route_policies: Vec<Option<RuntimePolicy>>,
}

pub struct Backend {
    pub name: Name,
    pub endpoints: Vec<Endpoint>,
    lb: Lb,
    /// Held while counting ejected endpoints and ejecting one, so two
    /// endpoints failing at once cannot both pass `maxEjectionPercent`.
    ejecting: std::sync::Mutex<()>,
}

/// The load balancer of one backend, built with the routing table.
enum Lb {
    PeakEwma,
    RoundRobin(std::sync::atomic::AtomicUsize),
    LeastRequest,
    /// Sorted `(point, endpoint index)`, 100 points per endpoint.
    RingHash(Vec<(u64, usize)>),
}

/// FNV-1a: stable across processes and versions, so every sidecar maps a
/// key to the same endpoint.
pub fn fnv1a(bytes: &[u8]) -> u64 {
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

const RING_POINTS: usize = 100;

impl Lb {
    fn new(kind: &LoadBalancer, endpoints: &[Endpoint]) -> Lb {
        match kind {
            LoadBalancer::PeakEwma => Lb::PeakEwma,
            LoadBalancer::RoundRobin => {
                Lb::RoundRobin(std::sync::atomic::AtomicUsize::new(fastrand::usize(..)))
            }
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

#[derive(Clone)]
pub struct Endpoint {
    pub authority: Authority,
    /// Set for an endpoint with a sidecar: the name the mTLS connection is
    /// made with, naming the identity the peer must prove.
    pub server_name: Option<ServerName<'static>>,
    pub meshed: bool,
    pub load: Arc<EndpointLoad>,
    /// Its connections (HTTP destinations), kept across tables.
    pub pool: Arc<crate::pool::Pool>,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        self.load.addr
    }
}

impl Backend {
    /// An endpoint, by the destination's load balancer (default: power of
    /// two choices over peak-EWMA cost). `key` is the hash of the ring-hash
    /// header, when the request has it.
    pub fn pick_for(&self, key: Option<u64>) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        let i = match &self.lb {
            Lb::PeakEwma => return self.pick(),
            Lb::RoundRobin(next) => {
                if n == 0 {
                    return None;
                }
                let now = now_ms();
                let mut i = 0;
                // The next endpoint in turn that is not ejected.
                for _ in 0..n {
                    i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
                    if !self.endpoints[i].load.outlier.is_ejected(now) {
                        break;
                    }
                }
                i
            }
            Lb::LeastRequest => {
                let now = now_ms();
                let i = p2c(n, |i| {
                    let l = &self.endpoints[i].load;
                    if l.outlier.is_ejected(now) {
                        f64::INFINITY
                    } else {
                        l.pending() as f64
                    }
                })?;
                return self.unless_ejected(i, &[]);
            }
            Lb::RingHash(ring) => match key {
                None => return self.pick(),
                Some(k) => {
                    let k = mix(k);
                    let at = ring.partition_point(|(p, _)| *p < k);
                    let now = now_ms();
                    // The key's point, or the next one whose endpoint is
                    // not ejected.
                    let mut found = ring.get(at).or_else(|| ring.first())?.1;
                    for j in 0..ring.len() {
                        let idx = ring[(at + j) % ring.len()].1;
                        if !self.endpoints[idx].load.outlier.is_ejected(now) {
                            found = idx;
                            break;
                        }
                    }
                    found
                }
            },
        };
        self.endpoints.get(i)
    }

    /// Counts the outcome of a try for outlier detection, and ejects the
    /// endpoint when it has failed enough in a row and the backend can
    /// spare it. Returns the ejection's length when it ejected.
    pub fn record_outcome(
        &self,
        ep: &Endpoint,
        outcome: Outcome,
        cb: &CircuitBreaker,
    ) -> Option<std::time::Duration> {
        let now = now_ms();
        let state = &ep.load.outlier;
        if !state.record(outcome, cb, now) {
            return None;
        }
        // Rare (an endpoint just crossed its threshold): the lock is never
        // taken on the way of a healthy request.
        let _one_at_a_time = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_ejected(now) {
            return None;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.load.outlier.is_ejected(now))
            .count();
        if ejected >= max_ejected(self.endpoints.len(), cb.max_ejection_percent) {
            return None;
        }
        Some(state.eject(cb, now))
    }

    /// Power of two choices over the endpoints' peak-EWMA cost.
    pub fn pick(&self) -> Option<&Endpoint> {
        let now = tokio::time::Instant::now();
        let i = p2c(self.endpoints.len(), |i| self.endpoints[i].load.cost(now))?;
        self.unless_ejected(i, &[])
    }

    /// Endpoint `i`, unless outlier detection ejected it and another (not
    /// in `tried`) is in: then a power-of-two pick among those. Both random
    /// candidates of a pick can be ejected; this keeps them out anyway.
    fn unless_ejected(&self, i: usize, tried: &[SocketAddr]) -> Option<&Endpoint> {
        let ep = self.endpoints.get(i)?;
        let now = now_ms();
        if !ep.load.outlier.is_ejected(now) {
            return Some(ep);
        }
        let live: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| !e.load.outlier.is_ejected(now) && !tried.contains(&e.addr()))
            .collect();
        let t = tokio::time::Instant::now();
        match p2c(live.len(), |j| live[j].load.cost(t)) {
            Some(j) => live.get(j).copied(),
            None => Some(ep),
        }
    }

    /// A pick that avoids the endpoints already tried when others exist.
    pub fn pick_avoiding(&self, tried: &[SocketAddr]) -> Option<&Endpoint> {
        if tried.is_empty() || tried.len() >= self.endpoints.len() {
            return self.pick();
        }
        let now = tokio::time::Instant::now();
        let fresh: Vec<&Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| !tried.contains(&e.addr()))
            .collect();
        let i = p2c(fresh.len(), |i| fresh[i].load.cost(now))?;
        let ep = fresh.get(i).copied()?;
        let pos = self.endpoints.iter().position(|e| e.addr() == ep.addr())?;
        self.unless_ejected(pos, tried)
    }
}

impl Routing {
    pub fn empty() -> Self {
        Routing {
            version: 0,
            snapshot: Arc::new(Snapshot::default()),
            inbound: None,
            destinations: HashMap::new(),
            unknown: HashSet::new(),
            peer_names: Arc::new(PeerNames::new()),
            limiter: None,
        }
    }

    /// Looks a destination up by the host the application used.
    pub fn destination(&self, host: &str) -> Option<&Arc<Destination>> {
        self.destinations.get(host)
    }

    pub fn is_unknown(&self, host: &str) -> bool {
        self.unknown.contains(host)
    }

    /// Builds a table; `loads` keeps endpoint load state across snapshots.
    pub fn build(version: u64, snapshot: Snapshot, loads: &LoadCache) -> Result<Self, String> {
        let mut destinations = HashMap::new();
        let mut peer_names = PeerNames::new();
        let mut conflicts = HashSet::new();
        for d in &snapshot.destinations {
            let mut backends = Vec::with_capacity(d.backends.len());
            for b in &d.backends {
                let mut endpoints = Vec::with_capacity(b.endpoints.len());
                for e in &b.endpoints {
                    let addr: SocketAddr = e.address.parse().map_err(|_| {
                        format!("endpoint `{}` of {} is not an ip:port", e.address, b.name)
                    })?;
                    let authority = Authority::try_from(addr.to_string().as_str())
                        .map_err(|err| format!("endpoint `{}`: {err}", e.address))?;
                    let server_name = e
                        .meshed
                        .then(|| tandem_identity::tls::server_name(&b.namespace, &b.name));
                    if let Some(n) = &server_name {
                        let key: Box<str> = authority.as_str().into();
                        match peer_names.get(&key) {
                            Some(other) if other != n => {
                                conflicts.insert(key);
                            }
                            _ => {
                                peer_names.insert(key, n.clone());
                            }
                        }
                    }
                    endpoints.push(Endpoint {
                        pool: loads.pool(&authority, e.meshed, d.protocol.is_h2()),
                        authority,
                        server_name,
                        meshed: e.meshed,
                        load: loads.get(addr),
                    });
                }
                let lb = Lb::new(
                    &d.policy
                        .as_ref()
                        .map(|p| p.load_balancer.clone())
                        .unwrap_or_default(),
                    &endpoints,
                );
                backends.push(Backend {
                    name: Name::from(b.name.as_str()),
                    endpoints,
                    lb,
                    ejecting: std::sync::Mutex::new(()),
                });
            }
            let mut totals = Vec::with_capacity(d.routes.len());
            for r in &d.routes {
                let mut total = 0u64;
                for wb in &r.backends {
                    if wb.backend >= backends.len() {
                        return Err(format!(
                            "route {} rule {} names backend {} of {}",
                            r.route,
                            r.rule,
                            wb.backend,
                            backends.len()
                        ));
                    }
                    total += u64::from(wb.weight);
                }
                totals.push(total);
            }
            if backends.is_empty() {
                return Err(format!("destination {} has no backends", d.name));
            }
            let dest_key = format!("{}.{}", d.name, d.namespace);
            let route_policies = d
                .routes
                .iter()
                .map(|r| {
                    r.policy.as_ref().map(|o| {
                        let merged =
                            tandem_config::snapshot::Policy::with_overrides(d.policy.as_ref(), o);
                        let mut p = RuntimePolicy::build(&dest_key, &merged, &loads.budgets);
                        p.source = std::sync::Arc::from(
                            format!("HTTPRoute {} rule {}", r.route, r.rule).as_str(),
                        );
                        p
                    })
                })
                .collect();
            let dest = Arc::new(Destination {
                name: Name::from(d.name.as_str()),
                protocol: d.protocol,
                default_port: d.ports.first().copied().unwrap_or(80),
                routes: d.routes.clone(),
                totals,
                backends,
                policy: d
                    .policy
                    .as_ref()
                    .map(|p| RuntimePolicy::build(&dest_key, p, &loads.budgets)),
                route_policies,
            });
            destinations.insert(
                format!("{}.{}", d.name, d.namespace).into_boxed_str(),
                dest.clone(),
            );
            if d.namespace == snapshot.namespace {
                destinations.insert(d.name.clone().into_boxed_str(), dest);
            }
        }
        // One address claimed by two identities: no connection to it is
        // made at all, rather than accepting one service's certificate for
        // the other's traffic.
        for addr in conflicts {
            tracing::warn!(%addr, "endpoint address registered for two services; not connecting to it");
            peer_names.remove(&addr);
        }
        let limiter = snapshot
            .inbound
            .as_ref()
            .and_then(|i| i.rate_limit.as_ref())
            .map(|rl| loads.limiter.get(rl));
        let unknown = snapshot
            .unknown
            .iter()
            .map(|u| u.clone().into_boxed_str())
            .collect();
        Ok(Routing {
            version,
            inbound: snapshot.inbound.clone(),
            snapshot: Arc::new(snapshot),
            destinations,
            unknown,
            peer_names: Arc::new(peer_names),
            limiter,
        })
    }
}

/// A connection pool's endpoint: address, mTLS, HTTP/2.
type PoolKey = (Box<str>, bool, bool);

/// Endpoint load state by address, shared by successive routing tables.
#[derive(Default)]
pub struct LoadCache {
    map: Mutex<HashMap<SocketAddr, Weak<EndpointLoad>>>,
    /// Connection pools by (address, mTLS, HTTP/2).
    pools: Mutex<HashMap<PoolKey, Weak<crate::pool::Pool>>>,
    /// Retry budgets by destination, also kept across tables.
    pub budgets: BudgetCache,
    /// The inbound rate limiter, while its settings stay the same.
    pub limiter: crate::ratelimit::LimiterCache,
}

impl LoadCache {
    fn pool(&self, authority: &Authority, meshed: bool, h2: bool) -> Arc<crate::pool::Pool> {
        let mut map = match self.pools.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let key = (Box::from(authority.as_str()), meshed, h2);
        if let Some(p) = map.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        let uri = http::Uri::builder()
            .scheme(if meshed { "https" } else { "http" })
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        let p = crate::pool::Pool::new(uri, h2);
        map.insert(key, Arc::downgrade(&p));
        map.retain(|_, w| w.strong_count() > 0);
        p
    }

    fn get(&self, addr: SocketAddr) -> Arc<EndpointLoad> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(l) = map.get(&addr).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(EndpointLoad::new(addr));
        map.insert(addr, Arc::downgrade(&l));
        // Forget endpoints no table uses any more.
        map.retain(|_, w| w.strong_count() > 0);
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::snapshot::{
        Backend as SBackend, Destination as SDest, Endpoint as SEndpoint,
    };

    fn snapshot(address: &str) -> Snapshot {
        Snapshot {
            namespace: "default".into(),
            service: "web".into(),
            inbound: None,
            destinations: vec![SDest {
                name: "api".into(),
                namespace: "default".into(),
                protocol: Protocol::Http,
                ports: vec![80],
                routes: vec![],
                backends: vec![SBackend {
                    name: "api".into(),
                    namespace: "default".into(),
                    endpoints: vec![SEndpoint {
                        address: address.into(),
                        instance: "a".into(),
                        meshed: true,
                    }],
                }],
                policy: None,
            }],
            unknown: vec!["ghost".into()],
            trust: None,
        }
    }

    /// A table whose one destination `api` has three endpoints.
    fn three_endpoints() -> Routing {
        let mut s = snapshot("127.0.0.1:9");
        let eps = &mut s.destinations[0].backends[0].endpoints;
        for port in [10, 11] {
            let mut e = eps[0].clone();
            e.address = format!("127.0.0.1:{port}");
            eps.push(e);
        }
        Routing::build(1, s, &LoadCache::default()).expect("build")
    }

    #[test]
    fn endpoints_failing_at_once_never_pass_the_ejection_cap() {
        let cb = CircuitBreaker {
            consecutive_errors: 1,
            consecutive_gateway_errors: 0,
            interval_ms: 1000,
            base_ejection_ms: 60_000,
            max_ejection_percent: 34,
            max_requests: None,
            max_connections: None,
            max_pending_requests: None,
        };
        for _ in 0..100 {
            let r = three_endpoints();
            let b = &r.destination("api").expect("api").backends[0];
            // Two endpoints cross their threshold at the same instant.
            let go = std::sync::Barrier::new(2);
            let ejected: usize = std::thread::scope(|t| {
                let runs: Vec<_> = b.endpoints[..2]
                    .iter()
                    .map(|e| {
                        let (go, cb) = (&go, &cb);
                        t.spawn(move || {
                            go.wait();
                            b.record_outcome(e, Outcome::Error, cb).is_some() as usize
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().expect("thread")).sum()
            });
            assert_eq!(ejected, 1);
        }
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
        let live = b.endpoints[2].addr();
        for _ in 0..200 {
            assert_eq!(b.pick().map(|e| e.addr()), Some(live));
            assert_eq!(b.pick_for(None).map(|e| e.addr()), Some(live));
        }
    }

    #[test]
    fn an_address_claimed_by_two_services_gets_no_identity() {
        let mut s = snapshot("127.0.0.1:9");
        let mut other = s.destinations[0].clone();
        other.name = "billing".into();
        other.backends[0].name = "billing".into();
        s.destinations.push(other);
        let r = Routing::build(1, s, &LoadCache::default()).expect("build");
        assert!(r.peer_names.get("127.0.0.1:9").is_none());
    }

    #[test]
    fn builds_lookup_by_short_and_qualified_name() {
        let loads = LoadCache::default();
        let r = Routing::build(7, snapshot("127.0.0.1:9"), &loads).expect("build");
        assert_eq!(r.version, 7);
        assert!(r.destination("api").is_some());
        assert!(r.destination("api.default").is_some());
        assert!(r.destination("web").is_none());
        assert!(r.is_unknown("ghost"));
        // The meshed endpoint's sidecar must prove the identity of `api`.
        assert_eq!(
            r.peer_names
                .get("127.0.0.1:9")
                .map(|n| n.to_str().into_owned()),
            Some("api.default.tandem".to_string())
        );
    }

    #[test]
    fn refuses_a_snapshot_it_cannot_use() {
        let loads = LoadCache::default();
        let err = Routing::build(1, snapshot("not-an-address"), &loads)
            .err()
            .expect("refused");
        assert!(err.contains("not-an-address"), "{err}");
    }

    #[test]
    fn endpoint_load_survives_a_new_snapshot() {
        let loads = LoadCache::default();
        let a = Routing::build(1, snapshot("127.0.0.1:9"), &loads).expect("build");
        let b = Routing::build(2, snapshot("127.0.0.1:9"), &loads).expect("build");
        let ea = &a.destination("api").expect("api").backends[0].endpoints[0];
        let eb = &b.destination("api").expect("api").backends[0].endpoints[0];
        assert!(Arc::ptr_eq(&ea.load, &eb.load));
    }
}
