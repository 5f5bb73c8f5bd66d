//! Compiling snapshots once per distinct input. Proxies of one service
//! with the same interest set get the same snapshot, so they form a
//! [`Group`] and share one compiled body. A group's body is compiled again
//! only when an input it depends on moved: the config, the trust bundle,
//! or the endpoints of a service it lists (each service's endpoints carry
//! their own version, see [`crate::registry`]). Bringing up N proxies thus
//! costs a compile per group whose inputs changed, not per proxy per event.
//!
//! Compiling is pure (no locks, no I/O); the mesh runs it outside its lock.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tandem_config::compile::{compile_with, Target};
use tandem_config::rollout::Splits;
use tandem_config::snapshot::{Endpoint, Trust};
use tandem_config::ResourceSet;

use crate::registry::{EndpointTable, ServiceKey};

/// The proxies that share a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Group {
    pub namespace: String,
    pub service: String,
    pub interest: Arc<BTreeSet<String>>,
}

/// Everything a snapshot is compiled from besides its group.
#[derive(Clone)]
pub struct Inputs {
    pub config: Arc<ResourceSet>,
    /// Moves with the config and with `splits`.
    pub config_generation: u64,
    pub splits: Arc<Splits>,
    pub trust: Option<Trust>,
    pub trust_generation: u64,
    pub endpoints: Arc<EndpointTable>,
    /// The cluster of this control plane, named in every snapshot.
    pub cluster: Arc<str>,
}

/// What a compiled body was made from.
#[derive(Clone, Debug, PartialEq)]
struct Stamp {
    config: u64,
    trust: u64,
    /// The services whose endpoints it lists, and their versions.
    deps: Vec<(ServiceKey, u64)>,
}

impl Stamp {
    fn fresh(&self, inputs: &Inputs) -> bool {
        self.config == inputs.config_generation
            && self.trust == inputs.trust_generation
            && self
                .deps
                .iter()
                .all(|((ns, svc), v)| inputs.endpoints.version(ns, svc) == *v)
    }
}

/// A group's snapshot, compiled.
pub struct Compiled {
    stamp: Stamp,
    /// The snapshot as JSON, shared by every proxy of the group (and by
    /// the last one sent to each, to tell whether it changed).
    pub body: Arc<Vec<u8>>,
}

/// Compiles the snapshot of `group` from `inputs`.
/// Compiles each of `groups`; the pairs go to [`Snapshots::store`].
pub fn compile_groups(groups: Vec<Group>, inputs: &Inputs) -> Vec<(Group, Compiled)> {
    groups
        .into_iter()
        .map(|g| {
            let c = compile_group(&g, inputs);
            (g, c)
        })
        .collect()
}

fn compile_group(group: &Group, inputs: &Inputs) -> Compiled {
    let deps = RefCell::new(Vec::new());
    let lookup = |ns: &str, svc: &str| -> Vec<Endpoint> {
        let e = inputs.endpoints.get(ns, svc);
        deps.borrow_mut().push((
            (ns.to_string(), svc.to_string()),
            e.map_or(0, |e| e.version),
        ));
        e.map(|e| e.endpoints.clone()).unwrap_or_default()
    };
    let target = Target {
        namespace: &group.namespace,
        service: &group.service,
        interest: &group.interest,
    };
    let mut snapshot = compile_with(&inputs.config, &target, &lookup, &inputs.splits);
    snapshot.trust = inputs.trust.clone();
    snapshot.cluster = inputs.cluster.to_string();
    Compiled {
        stamp: Stamp {
            config: inputs.config_generation,
            trust: inputs.trust_generation,
            deps: deps.into_inner(),
        },
        body: Arc::new(snapshot.to_json()),
    }
}

/// The compiled snapshot of every group in use.
#[derive(Default)]
pub struct Snapshots {
    groups: HashMap<Group, Compiled>,
    compiles: u64,
}

impl Snapshots {
    /// Of `groups`, those whose snapshot must be compiled (again).
    pub fn stale<'a>(
        &self,
        groups: impl IntoIterator<Item = &'a Group>,
        inputs: &Inputs,
    ) -> Vec<Group> {
        let mut out: Vec<Group> = Vec::new();
        for g in groups {
            let fresh = self.groups.get(g).is_some_and(|c| c.stamp.fresh(inputs));
            if !fresh && !out.contains(g) {
                out.push(g.clone());
            }
        }
        out
    }

    /// Takes compiled snapshots in. A body equal to the one it replaces
    /// keeps the old one, so proxies that have it are not sent it again.
    pub fn store(&mut self, compiled: Vec<(Group, Compiled)>) {
        for (group, mut c) in compiled {
            self.compiles += 1;
            if let Some(old) = self.groups.get(&group) {
                if old.body == c.body {
                    c.body = old.body.clone();
                }
            }
            self.groups.insert(group, c);
        }
    }

    pub fn body(&self, group: &Group) -> Option<&Arc<Vec<u8>>> {
        self.groups.get(group).map(|c| &c.body)
    }

    /// Forgets the groups no proxy is in any more.
    pub fn retain(&mut self, in_use: &std::collections::HashSet<&Group>) {
        self.groups.retain(|g, _| in_use.contains(g));
    }

    /// Snapshots compiled since the start.
    pub fn compiles(&self) -> u64 {
        self.compiles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_store::{Presence, Registration};

    const CONFIG: &str = r#"
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80, protocol: http}]}
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: api}
spec: {ports: [{port: 80, protocol: http}]}
---
apiVersion: tandem.dev/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{port: 5432, protocol: tcp}]}
"#;

    fn reg(svc: &str, inst: &str, addr: &str) -> Registration {
        Registration {
            namespace: "default".into(),
            service: svc.into(),
            instance: inst.into(),
            inbound: addr.into(),
            presence: Presence::Connected,
            holder: format!("cp/{inst}"),
            roots: Vec::new(),
            zone: String::new(),
        }
    }

    fn group(svc: &str, interest: &[&str]) -> Group {
        Group {
            namespace: "default".into(),
            service: svc.into(),
            interest: Arc::new(interest.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn compile_stale(s: &mut Snapshots, groups: &[Group], inputs: &Inputs) -> usize {
        let stale = s.stale(groups, inputs);
        let n = stale.len();
        let compiled = stale
            .into_iter()
            .map(|g| {
                let c = compile_group(&g, inputs);
                (g, c)
            })
            .collect();
        s.store(compiled);
        n
    }

    #[test]
    fn compiled_once_per_group_and_again_only_when_an_input_moves() {
        let config = tandem_config::load_str("c.yaml", CONFIG).expect("config");
        let mut table = EndpointTable::default();
        table.update(
            1,
            &[
                reg("api", "a1", "10.0.0.1:80"),
                reg("db", "d1", "10.0.0.2:5432"),
            ],
            &crate::registry::Remote::default(),
        );
        let mut inputs = Inputs {
            config: Arc::new(config),
            config_generation: 1,
            splits: Arc::new(Splits::new()),
            trust: None,
            cluster: Arc::from(""),
            trust_generation: 0,
            endpoints: Arc::new(table.clone()),
        };
        // A thousand web proxies calling api, ten calling db: two groups.
        let mut groups = vec![group("web", &["api"]); 1000];
        groups.extend(vec![group("web", &["db"]); 10]);
        let mut s = Snapshots::default();
        assert_eq!(compile_stale(&mut s, &groups, &inputs), 2);
        let body = s.body(&groups[0]).expect("compiled").clone();
        // Nothing moved: nothing to compile.
        assert_eq!(compile_stale(&mut s, &groups, &inputs), 0);
        // db's endpoints change: only the group that lists db.
        table.update(
            2,
            &[
                reg("api", "a1", "10.0.0.1:80"),
                reg("db", "d2", "10.0.0.3:5432"),
            ],
            &crate::registry::Remote::default(),
        );
        inputs.endpoints = Arc::new(table.clone());
        assert_eq!(compile_stale(&mut s, &groups, &inputs), 1);
        assert!(Arc::ptr_eq(s.body(&groups[0]).expect("body"), &body));
        // A new config: every group, but an unchanged body stays the same
        // value (its proxies are not sent it again).
        inputs.config_generation = 2;
        assert_eq!(compile_stale(&mut s, &groups, &inputs), 2);
        assert!(Arc::ptr_eq(s.body(&groups[0]).expect("body"), &body));
        assert_eq!(s.compiles(), 5);
    }
}
