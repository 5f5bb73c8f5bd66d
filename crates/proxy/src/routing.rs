//! The routing table a proxy runs on, built from a snapshot and swapped in
//! whole: a request loads one `Arc<Routing>` and sees one consistent
//! config. [`Routes`] is the handle the control-plane client swaps tables
//! through and the data path reads them from.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::Authority;
use rustls_pki_types::ServerName;
use tandem_config::snapshot::{Inbound, Protocol, Route, Snapshot};
use tandem_runtime::sync::Mutex;
use tokio::sync::watch;

use crate::balance::ewma::EndpointLoad;
use crate::balance::pick::Lb;
use crate::cache::WeakCache;
use crate::outbound::egress::Egress;
use crate::outbound::filter::RuleFilters;
use crate::policy::budget::RetryBudget;
use crate::policy::ratelimit::{Limiter, LimiterCache};
use crate::policy::RuntimePolicy;
use crate::telemetry::metrics::Name;
use crate::transport::pool::{DestConns, Pool};
use crate::transport::tls::PeerNames;

pub(crate) struct Routing {
    pub(crate) version: u64,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) inbound: Option<Inbound>,
    /// Keyed by `name` (same namespace as the proxy) and `name.namespace`.
    destinations: HashMap<Box<str>, Arc<Destination>>,
    unknown: HashSet<Box<str>>,
    pub(crate) peer_names: Arc<PeerNames>,
    /// The inbound rate limit of this proxy's service, if any.
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// Calls to hosts outside the mesh.
    pub(crate) egress: Egress,
}

pub(crate) struct Destination {
    pub(crate) name: Name,
    pub(crate) protocol: Protocol,
    pub(crate) default_port: u16,
    /// `name:port` (or `name.namespace:port` in another namespace): the
    /// authority a request for this destination names.
    pub(crate) authority: http::HeaderValue,
    pub(crate) routes: Vec<Route>,
    /// Parallel to `routes`: the rule's route (`namespace/name`), the
    /// `route` label of its requests' metrics.
    pub(crate) route_names: Vec<Name>,
    /// Sum of each route's backend weights, parallel to `routes`.
    pub(crate) totals: Vec<u64>,
    pub(crate) backends: Vec<Backend>,
    /// The TrafficPolicy targeting the destination, if any.
    pub(crate) policy: Option<RuntimePolicy>,
    /// Parallel to `routes`: the policy of a rule with its own timeouts or
    /// retry (the destination's policy with the rule's overrides).
    pub(crate) route_policies: Vec<Option<RuntimePolicy>>,
    /// Parallel to `routes`: the rule's filters, if it has any.
    pub(crate) filters: Vec<Option<RuleFilters>>,
}

impl Destination {
    /// The policy in force for a request matched by `rule`: the rule's own
    /// timeouts and retry come before the destination's TrafficPolicy.
    pub(crate) fn policy_for(&self, rule: Option<usize>) -> Option<&RuntimePolicy> {
        rule.and_then(|i| self.route_policies.get(i)?.as_ref())
            .or(self.policy.as_ref())
    }
}

pub(crate) struct Backend {
    pub(crate) name: Name,
    /// Nearest first: the proxy's zone, its cluster, other clusters.
    pub(crate) endpoints: Vec<Endpoint>,
    /// Where each locality tier of `endpoints` ends (one entry when all
    /// are alike): picks stay in the first tier with an endpoint not
    /// ejected.
    pub(crate) tiers: Vec<usize>,
    pub(crate) lb: Lb,
    /// Held while counting ejected endpoints and ejecting one, so two
    /// endpoints failing at once cannot both pass `maxEjectionPercent`.
    pub(crate) ejecting: Mutex<()>,
}

pub(crate) struct Endpoint {
    pub(crate) authority: Authority,
    /// Set for an endpoint with a sidecar: the name the mTLS connection is
    /// made with, naming the identity the peer must prove.
    pub(crate) server_name: Option<ServerName<'static>>,
    pub(crate) meshed: bool,
    pub(crate) load: Arc<EndpointLoad>,
    /// Its connections (HTTP destinations), kept across tables.
    pub(crate) pool: Arc<Pool>,
}

impl Endpoint {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.load.addr
    }
}

/// A connection pool's endpoint: address, mTLS, HTTP/2.
type PoolKey = (Box<str>, bool, bool);
/// A retry budget's destination, percent and minimum per second.
type BudgetKey = (Box<str>, u32, u32);

/// What successive routing tables share (see [`crate::cache`]).
#[derive(Default)]
pub(crate) struct Kept {
    /// The proxy's zone (`--zone`), which locality tiers are counted from.
    pub(crate) zone: Box<str>,
    loads: WeakCache<SocketAddr, EndpointLoad>,
    pools: WeakCache<PoolKey, Pool>,
    budgets: WeakCache<BudgetKey, RetryBudget>,
    /// Requests in progress per destination (`maxRequests`).
    in_progress: WeakCache<Box<str>, AtomicUsize>,
    /// Connections and waiting requests per destination (`maxConnections`).
    conns: WeakCache<Box<str>, DestConns>,
    /// The inbound rate limiter, while its settings stay the same.
    limiter: LimiterCache,
}

impl Kept {
    /// Nothing kept yet, for a proxy in `zone`.
    pub(crate) fn in_zone(zone: &str) -> Kept {
        Kept {
            zone: zone.into(),
            ..Kept::default()
        }
    }

    fn load(&self, addr: SocketAddr) -> Arc<EndpointLoad> {
        self.loads.get_or_make(addr, || EndpointLoad::new(addr))
    }

    pub(crate) fn pool(&self, authority: &Authority, meshed: bool, h2: bool) -> Arc<Pool> {
        let key = (Box::from(authority.as_str()), meshed, h2);
        self.pools.get_or_make(key, || {
            let uri = http::Uri::builder()
                .scheme(if meshed { "https" } else { "http" })
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .unwrap_or_default();
            Pool::new(uri, h2)
        })
    }

    pub(crate) fn budget(&self, dest: &str, percent: u32, min_per_second: u32) -> Arc<RetryBudget> {
        self.budgets
            .get_or_make((Box::from(dest), percent, min_per_second), || {
                RetryBudget::new(percent, min_per_second)
            })
    }

    pub(crate) fn in_progress(&self, dest: &str) -> Arc<AtomicUsize> {
        self.in_progress
            .get_or_make(Box::from(dest), || AtomicUsize::new(0))
    }

    pub(crate) fn conns(&self, dest: &str) -> Arc<DestConns> {
        self.conns.get_or_make(Box::from(dest), DestConns::default)
    }
}

impl Routing {
    pub(crate) fn empty() -> Self {
        Routing {
            version: 0,
            snapshot: Arc::new(Snapshot::default()),
            inbound: None,
            destinations: HashMap::new(),
            unknown: HashSet::new(),
            peer_names: Arc::new(PeerNames::new()),
            limiter: None,
            egress: Egress::build(&Default::default()),
        }
    }

    /// Looks a destination up by the host the application used.
    pub(crate) fn destination(&self, host: &str) -> Option<&Arc<Destination>> {
        self.destinations.get(host)
    }

    pub(crate) fn is_unknown(&self, host: &str) -> bool {
        self.unknown.contains(host)
    }

    /// Builds a table; `kept` is the state shared with earlier tables.
    pub(crate) fn build(version: u64, snapshot: Snapshot, kept: &Kept) -> Result<Self, String> {
        let mut destinations = HashMap::new();
        let mut peer_names = PeerNames::new();
        let mut conflicts = HashSet::new();
        for d in &snapshot.destinations {
            let mut backends = Vec::with_capacity(d.backends.len());
            for b in &d.backends {
                let mut endpoints = Vec::with_capacity(b.endpoints.len());
                let mut tiers: Vec<u8> = b
                    .endpoints
                    .iter()
                    .map(|e| locality_tier(e, &snapshot.cluster, &kept.zone))
                    .collect();
                let mut order: Vec<usize> = (0..b.endpoints.len()).collect();
                order.sort_by_key(|&i| tiers[i]);
                tiers.sort_unstable();
                for e in order.iter().map(|&i| &b.endpoints[i]) {
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
                        pool: kept.pool(&authority, e.meshed, d.protocol.is_h2()),
                        authority,
                        server_name,
                        meshed: e.meshed,
                        load: kept.load(addr),
                    });
                }
                let lb = Lb::new(
                    &d.policy
                        .as_ref()
                        .map(|p| p.load_balancer.clone())
                        .unwrap_or_default(),
                    &endpoints,
                );
                let mut tier_ends: Vec<usize> = Vec::new();
                for (i, t) in tiers.iter().enumerate() {
                    if tiers.get(i + 1) != Some(t) {
                        tier_ends.push(i + 1);
                    }
                }
                backends.push(Backend {
                    name: Name::from(b.name.as_str()),
                    endpoints,
                    tiers: tier_ends,
                    lb,
                    ejecting: Mutex::new(()),
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
                        let mut p = RuntimePolicy::build(&dest_key, &merged, kept);
                        p.source = Arc::from(format!("HTTPRoute {} rule {}", r.route, r.rule));
                        p
                    })
                })
                .collect();
            let default_port = d.ports.first().copied().unwrap_or(80);
            let host = if d.namespace == snapshot.namespace {
                d.name.clone()
            } else {
                format!("{}.{}", d.name, d.namespace)
            };
            let dest = Arc::new(Destination {
                name: Name::from(d.name.as_str()),
                protocol: d.protocol,
                default_port,
                authority: http::HeaderValue::try_from(format!("{host}:{default_port}"))
                    .map_err(|_| format!("destination name `{host}`"))?,
                routes: d.routes.clone(),
                route_names: d
                    .routes
                    .iter()
                    .map(|r| Name::from(r.route.as_str()))
                    .collect(),
                totals,
                backends,
                policy: d
                    .policy
                    .as_ref()
                    .map(|p| RuntimePolicy::build(&dest_key, p, kept)),
                route_policies,
                filters: d
                    .routes
                    .iter()
                    .map(RuleFilters::build)
                    .collect::<Result<_, _>>()?,
            });
            destinations.insert(dest_key.into_boxed_str(), dest.clone());
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
            .map(|rl| kept.limiter.get(rl));
        let unknown = snapshot
            .unknown
            .iter()
            .map(|u| u.clone().into_boxed_str())
            .collect();
        Ok(Routing {
            egress: Egress::build(&snapshot.egress),
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

/// The table in force, swapped whole by the control-plane client.
pub(crate) struct Routes {
    current: ArcSwap<Routing>,
    changed: watch::Sender<u64>,
    kept: Kept,
    /// Endpoint → identity, for the connector (which sees only addresses).
    peer_names: Arc<ArcSwap<PeerNames>>,
}

/// How near an endpoint is: 0 in the proxy's zone (or anywhere in its
/// cluster when zones are not said), 1 elsewhere in its cluster, 2 in
/// another cluster.
fn locality_tier(e: &tandem_config::snapshot::Endpoint, cluster: &str, zone: &str) -> u8 {
    if !e.cluster.is_empty() && e.cluster != cluster {
        2
    } else if zone.is_empty() || e.zone == zone {
        0
    } else {
        1
    }
}

impl Routes {
    pub(crate) fn new(peer_names: Arc<ArcSwap<PeerNames>>, zone: &str) -> Self {
        Routes {
            current: ArcSwap::from_pointee(Routing::empty()),
            changed: watch::channel(0).0,
            kept: Kept::in_zone(zone),
            peer_names,
        }
    }

    /// What successive tables share (egress destinations are built on
    /// first use, from the same pools and budgets).
    pub(crate) fn kept(&self) -> &Kept {
        &self.kept
    }

    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.current.load()
    }

    /// A first snapshot has been applied.
    pub(crate) fn is_ready(&self) -> bool {
        self.current.load().version > 0
    }

    /// Fires each time a new table is swapped in.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Builds a table from `snapshot` and swaps it in; on an error the
    /// table in force stays.
    pub(crate) fn apply(&self, version: u64, snapshot: Snapshot) -> Result<(), String> {
        let routing = Routing::build(version, snapshot, &self.kept)?;
        self.peer_names.store(routing.peer_names.clone());
        self.current.store(Arc::new(routing));
        self.changed.send_replace(version);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tandem_config::snapshot::{
        Backend as SBackend, Destination as SDest, Endpoint as SEndpoint,
    };

    pub(crate) fn snapshot(address: &str) -> Snapshot {
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
                        cluster: String::new(),
                        zone: String::new(),
                    }],
                }],
                policy: None,
            }],
            unknown: vec!["ghost".into()],
            trust: None,
            cluster: String::new(),
            egress: Default::default(),
        }
    }

    /// A table whose one destination `api` has three endpoints.
    pub(crate) fn three_endpoints() -> Routing {
        let mut s = snapshot("127.0.0.1:9");
        let eps = &mut s.destinations[0].backends[0].endpoints;
        for port in [10, 11] {
            let mut e = eps[0].clone();
            e.address = format!("127.0.0.1:{port}");
            eps.push(e);
        }
        Routing::build(1, s, &Kept::default()).expect("build")
    }

    #[test]
    fn an_address_claimed_by_two_services_gets_no_identity() {
        let mut s = snapshot("127.0.0.1:9");
        let mut other = s.destinations[0].clone();
        other.name = "billing".into();
        other.backends[0].name = "billing".into();
        s.destinations.push(other);
        let r = Routing::build(1, s, &Kept::default()).expect("build");
        assert!(r.peer_names.get("127.0.0.1:9").is_none());
    }

    #[test]
    fn builds_lookup_by_short_and_qualified_name() {
        let r = Routing::build(7, snapshot("127.0.0.1:9"), &Kept::default()).expect("build");
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
    fn refuses_a_snapshot_it_cannot_use_and_keeps_the_last() {
        let routes = Routes::new(Arc::new(ArcSwap::from_pointee(PeerNames::new())), "");
        routes.apply(1, snapshot("127.0.0.1:9")).expect("applied");
        let err = routes
            .apply(2, snapshot("not-an-address"))
            .expect_err("refused");
        assert!(err.contains("not-an-address"), "{err}");
        assert_eq!(routes.load().version, 1);
        assert!(routes.is_ready());
    }

    #[test]
    fn endpoint_state_survives_a_new_snapshot() {
        let kept = Kept::default();
        let a = Routing::build(1, snapshot("127.0.0.1:9"), &kept).expect("build");
        let b = Routing::build(2, snapshot("127.0.0.1:9"), &kept).expect("build");
        let ea = &a.destination("api").expect("api").backends[0].endpoints[0];
        let eb = &b.destination("api").expect("api").backends[0].endpoints[0];
        assert!(Arc::ptr_eq(&ea.load, &eb.load));
        assert!(Arc::ptr_eq(&ea.pool, &eb.pool));
    }
}
