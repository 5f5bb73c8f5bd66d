//! Which proxy instances are registered, and where other sidecars reach
//! them. A registration belongs to the control plane that holds the
//! proxy's stream (its `holder`): it marks it disconnected when the stream
//! ends, and removes it after the grace period, unless another stream (a
//! reconnect, perhaps to another control plane) has taken it over since.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tandem_runtime::sync::Mutex;
use tokio::sync::watch;

use crate::StoreFuture;

/// Namespace, service, instance.
pub type InstanceKey = (String, String, String);

/// Where a registered instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    /// Its stream is up.
    Connected,
    /// Its stream ended; it stays an endpoint for the grace period.
    Disconnected,
    /// It said it is shutting down: no longer an endpoint.
    Leaving,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub namespace: String,
    pub service: String,
    pub instance: String,
    /// The inbound address other sidecars use (empty: none).
    pub inbound: String,
    pub presence: Presence,
    /// The stream that holds the registration: which control plane, which
    /// connection.
    pub holder: String,
    /// The roots of the trust bundle the proxy last acknowledged (a root
    /// rotation waits for every proxy, whichever replica holds it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<String>,
    /// The zone the proxy runs in (empty: not said).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

impl Registration {
    pub fn key(&self) -> InstanceKey {
        (
            self.namespace.clone(),
            self.service.clone(),
            self.instance.clone(),
        )
    }
}

pub trait RegistryStore: Send + Sync + 'static {
    /// Puts a registration, replacing any for the same instance (a new
    /// stream takes an instance over).
    fn put(&self, reg: Registration) -> StoreFuture<'_, ()>;
    /// Changes the presence of an instance's registration if `holder`
    /// still holds it; returns whether it did.
    fn set_presence<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        presence: Presence,
    ) -> StoreFuture<'a, bool>;
    /// Records the trust roots an instance acknowledged, if `holder` still
    /// holds it; returns whether it does.
    fn set_roots<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        roots: Vec<String>,
    ) -> StoreFuture<'a, bool>;
    /// Removes an instance's registration if `holder` still holds it.
    fn remove<'a>(&'a self, key: &'a InstanceKey, holder: &'a str) -> StoreFuture<'a, bool>;
    /// Every registration, with the revision of the registry they make.
    fn list(&self) -> StoreFuture<'_, (u64, Vec<Registration>)>;
    /// The registry's revision, announced on every change.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Registrations in the process.
pub struct MemoryRegistry {
    regs: Mutex<HashMap<InstanceKey, Registration>>,
    revision: watch::Sender<u64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        MemoryRegistry {
            regs: Mutex::new(HashMap::new()),
            revision: watch::channel(0).0,
        }
    }
}

impl MemoryRegistry {
    fn changed(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    /// Applies `change` to an instance's registration if `holder` holds
    /// it; whether it does.
    fn modify(
        &self,
        key: &InstanceKey,
        holder: &str,
        change: impl FnOnce(&mut Registration),
    ) -> bool {
        let changed = {
            let mut regs = self.regs.lock();
            match regs.get_mut(key) {
                Some(r) if r.holder == holder => {
                    let before = r.clone();
                    change(r);
                    Some(*r != before)
                }
                _ => None,
            }
        };
        if changed == Some(true) {
            self.changed();
        }
        changed.is_some()
    }
}

impl RegistryStore for MemoryRegistry {
    fn put(&self, reg: Registration) -> StoreFuture<'_, ()> {
        let changed = {
            let mut regs = self.regs.lock();
            let key = reg.key();
            let same = regs.get(&key) == Some(&reg);
            regs.insert(key, reg);
            !same
        };
        if changed {
            self.changed();
        }
        Box::pin(async { Ok(()) })
    }

    fn set_presence<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        presence: Presence,
    ) -> StoreFuture<'a, bool> {
        let held = self.modify(key, holder, |r| r.presence = presence);
        Box::pin(async move { Ok(held) })
    }

    fn set_roots<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        roots: Vec<String>,
    ) -> StoreFuture<'a, bool> {
        let held = self.modify(key, holder, |r| r.roots = roots);
        Box::pin(async move { Ok(held) })
    }

    fn remove<'a>(&'a self, key: &'a InstanceKey, holder: &'a str) -> StoreFuture<'a, bool> {
        let removed = {
            let mut regs = self.regs.lock();
            let held = regs.get(key).is_some_and(|r| r.holder == holder);
            if held {
                regs.remove(key);
            }
            held
        };
        if removed {
            self.changed();
        }
        Box::pin(async move { Ok(removed) })
    }

    fn list(&self) -> StoreFuture<'_, (u64, Vec<Registration>)> {
        // The revision is read under the same lock as the registrations,
        // so a reader never pairs a revision with older registrations.
        let listed = {
            let regs = self.regs.lock();
            (*self.revision.borrow(), regs.values().cloned().collect())
        };
        Box::pin(async move { Ok(listed) })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(instance: &str, holder: &str) -> Registration {
        Registration {
            namespace: "default".into(),
            service: "web".into(),
            instance: instance.into(),
            inbound: "127.0.0.1:1".into(),
            presence: Presence::Connected,
            holder: holder.into(),
            roots: Vec::new(),
            zone: String::new(),
        }
    }

    #[tokio::test]
    async fn only_the_holder_changes_or_removes_a_registration() {
        let r = MemoryRegistry::default();
        let changes = r.changes();
        r.put(reg("a", "cp1/1")).await.expect("put");
        let key = reg("a", "").key();
        assert!(r
            .set_presence(&key, "cp1/1", Presence::Disconnected)
            .await
            .expect("io"));
        // A reconnect elsewhere takes it over; the old holder's grace
        // timer then removes nothing.
        r.put(reg("a", "cp2/7")).await.expect("put");
        assert!(!r.remove(&key, "cp1/1").await.expect("io"));
        assert!(!r
            .set_presence(&key, "cp1/1", Presence::Leaving)
            .await
            .expect("io"));
        let (rev, all) = r.list().await.expect("list");
        assert_eq!(all, vec![reg("a", "cp2/7")]);
        assert_eq!(rev, 3);
        assert!(changes.has_changed().expect("open"));
        assert!(r.remove(&key, "cp2/7").await.expect("io"));
        assert!(r.list().await.expect("list").1.is_empty());
    }
}
