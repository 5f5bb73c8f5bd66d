//! The registry's view for snapshots: from every registration, the
//! endpoints of each service, with a version per service that moves only
//! when that service's endpoints change (so only the snapshots that list
//! them are compiled again).
//!
//! Rules:
//! - an instance that is leaving is no endpoint;
//! - an instance whose stream ended stays an endpoint (for the grace
//!   period, until its registration is removed), unless a connected
//!   instance of another service now registers the same address (the port
//!   was reused): a connected owner wins;
//! - an instance without an inbound address is no endpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tandem_config::snapshot::Endpoint;
use tandem_store::{Presence, Registration};

/// Namespace and service.
pub type ServiceKey = (String, String);

/// The endpoints of one service.
#[derive(Debug, Default, PartialEq)]
pub struct ServiceEndpoints {
    /// Moves whenever `endpoints` changes.
    pub version: u64,
    /// Sorted.
    pub endpoints: Vec<Endpoint>,
}

/// Every service's endpoints, as of one registry revision.
#[derive(Clone, Debug, Default)]
pub struct EndpointTable {
    pub revision: u64,
    /// The generation of the remote clusters' endpoints it holds.
    pub remote_generation: u64,
    /// By namespace, then service (looked up by `&str` without allocating).
    services: HashMap<String, HashMap<String, Arc<ServiceEndpoints>>>,
    next_version: u64,
}

impl EndpointTable {
    /// The endpoints of a service (none if it has no registered instance).
    pub fn get(&self, namespace: &str, service: &str) -> Option<&Arc<ServiceEndpoints>> {
        self.services.get(namespace)?.get(service)
    }

    /// The version of a service's endpoints (0: none registered).
    pub fn version(&self, namespace: &str, service: &str) -> u64 {
        self.get(namespace, service).map_or(0, |e| e.version)
    }

    /// Recomputes the table from `regs` (the registry at `revision`) and
    /// the endpoints imported from remote clusters; returns the services
    /// whose endpoints changed.
    pub fn update(
        &mut self,
        revision: u64,
        regs: &[Registration],
        remote: &Remote,
    ) -> Vec<ServiceKey> {
        let mut next = endpoints_by_service(regs);
        for (key, eps) in &remote.endpoints {
            let all = next.entry(key.clone()).or_default();
            all.extend(eps.iter().cloned());
            all.sort();
            all.dedup();
        }
        self.remote_generation = remote.generation;
        let mut changed = Vec::new();
        for ((ns, svc), endpoints) in &next {
            let same = self.get(ns, svc).is_some_and(|e| e.endpoints == *endpoints);
            if !same {
                self.next_version += 1;
                self.services.entry(ns.clone()).or_default().insert(
                    svc.clone(),
                    Arc::new(ServiceEndpoints {
                        version: self.next_version,
                        endpoints: endpoints.clone(),
                    }),
                );
                changed.push((ns.clone(), svc.clone()));
            }
        }
        for (ns, services) in self.services.iter_mut() {
            services.retain(|svc, _| {
                let keep = next.contains_key(&(ns.clone(), svc.clone()));
                if !keep {
                    changed.push((ns.clone(), svc.clone()));
                }
                keep
            });
        }
        self.services.retain(|_, s| !s.is_empty());
        self.revision = revision;
        changed
    }
}

/// Endpoints imported from remote clusters, by service (each carries its
/// cluster), and their generation.
#[derive(Debug, Default, PartialEq)]
pub struct Remote {
    pub generation: u64,
    pub endpoints: BTreeMap<ServiceKey, Vec<Endpoint>>,
}

fn endpoints_by_service(regs: &[Registration]) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
    let mut live_owner: HashMap<&str, (&str, &str)> = HashMap::new();
    for r in regs {
        if r.presence == Presence::Connected && !r.inbound.is_empty() {
            live_owner.insert(
                r.inbound.as_str(),
                (r.namespace.as_str(), r.service.as_str()),
            );
        }
    }
    let mut table: BTreeMap<ServiceKey, Vec<Endpoint>> = BTreeMap::new();
    for r in regs {
        if r.inbound.is_empty() || r.presence == Presence::Leaving {
            continue;
        }
        if r.presence == Presence::Disconnected {
            if let Some(owner) = live_owner.get(r.inbound.as_str()) {
                if *owner != (r.namespace.as_str(), r.service.as_str()) {
                    continue;
                }
            }
        }
        table
            .entry((r.namespace.clone(), r.service.clone()))
            .or_default()
            .push(Endpoint {
                address: r.inbound.clone(),
                instance: r.instance.clone(),
                meshed: true,
                cluster: String::new(),
                zone: r.zone.clone(),
            });
    }
    for eps in table.values_mut() {
        eps.sort();
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(svc: &str, inst: &str, addr: &str, presence: Presence) -> Registration {
        Registration {
            namespace: "default".into(),
            service: svc.into(),
            instance: inst.into(),
            inbound: addr.into(),
            presence,
            holder: format!("cp/{inst}"),
            roots: Vec::new(),
            zone: String::new(),
        }
    }

    fn addrs(t: &EndpointTable, svc: &str) -> Vec<String> {
        t.get("default", svc)
            .map(|e| e.endpoints.iter().map(|e| e.address.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn leaving_and_address_conflicts() {
        let mut t = EndpointTable::default();
        t.update(
            1,
            &[
                reg("web", "w1", "10.0.0.1:80", Presence::Connected),
                reg("web", "w2", "10.0.0.2:80", Presence::Leaving),
                reg("web", "w3", "10.0.0.3:80", Presence::Disconnected),
                reg("web", "w4", "", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        // Leaving and address-less instances are no endpoints; one in its
        // grace period still is.
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:80", "10.0.0.3:80"]);
        // The grace-period instance's port is reused by a connected
        // instance of another service: the connected one owns it.
        t.update(
            2,
            &[
                reg("web", "w1", "10.0.0.1:80", Presence::Connected),
                reg("web", "w3", "10.0.0.3:80", Presence::Disconnected),
                reg("api", "a1", "10.0.0.3:80", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        assert_eq!(addrs(&t, "web"), ["10.0.0.1:80"]);
        assert_eq!(addrs(&t, "api"), ["10.0.0.3:80"]);
        // Two connected instances of two services on one address: both
        // listed (the proxies refuse to connect to it, see the routing
        // table).
        t.update(
            3,
            &[
                reg("web", "w1", "10.0.0.9:80", Presence::Connected),
                reg("api", "a1", "10.0.0.9:80", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        assert_eq!(addrs(&t, "web"), ["10.0.0.9:80"]);
        assert_eq!(addrs(&t, "api"), ["10.0.0.9:80"]);
    }

    #[test]
    fn versions_move_only_for_services_that_changed() {
        let mut t = EndpointTable::default();
        let first = t.update(
            1,
            &[
                reg("web", "w1", "10.0.0.1:80", Presence::Connected),
                reg("api", "a1", "10.0.0.2:80", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        assert_eq!(first.len(), 2);
        let (web, api) = (t.version("default", "web"), t.version("default", "api"));
        assert!(web > 0 && api > 0 && web != api);
        // A second web instance: web moves, api does not.
        let changed = t.update(
            2,
            &[
                reg("web", "w1", "10.0.0.1:80", Presence::Connected),
                reg("web", "w2", "10.0.0.4:80", Presence::Connected),
                reg("api", "a1", "10.0.0.2:80", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        assert_eq!(changed, [("default".to_string(), "web".to_string())]);
        assert!(t.version("default", "web") > web);
        assert_eq!(t.version("default", "api"), api);
        // The same endpoints again (a reconnect): nothing moves.
        let again = t.update(
            3,
            &[
                reg("web", "w2", "10.0.0.4:80", Presence::Connected),
                reg("web", "w1", "10.0.0.1:80", Presence::Disconnected),
                reg("api", "a1", "10.0.0.2:80", Presence::Connected),
            ],
            &super::Remote::default(),
        );
        assert!(again.is_empty(), "{again:?}");
        // The last api instance goes: api is gone, its version 0.
        t.update(
            4,
            &[reg("web", "w2", "10.0.0.4:80", Presence::Connected)],
            &super::Remote::default(),
        );
        assert_eq!(t.version("default", "api"), 0);
        assert!(t.get("default", "api").is_none());
    }
}
