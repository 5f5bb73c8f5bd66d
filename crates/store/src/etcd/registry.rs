//! The registry in etcd, shared by the replicas.
//!
//! Each registration is a key `<prefix>/registry/<ns>/<svc>/<instance>`
//! written under the lease of the replica that holds the proxy's stream,
//! so a replica that dies takes its registrations with it once its lease
//! runs out (by then its proxies have reconnected to another replica,
//! which took them over).
//!
//! Each replica keeps two things:
//! - what etcd holds (`seen`), kept by a watch of the registry's keys;
//! - the registrations it holds (`mine`), its own truth while it holds the
//!   proxies' streams. Its view of the registry is `seen` with `mine`
//!   over it, so its own proxies stay endpoints while etcd is out of reach
//!   or its lease was lost; a writer task brings etcd back in line.
//!
//! Changes of a held registration (presence, removal) are conditional on
//! the revision this replica last wrote: when a proxy has meanwhile
//! reconnected to another replica, which took its registration over, the
//! change is refused and this replica lets the registration go.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_runtime::sync::Mutex;
use tokio::sync::{watch, Notify};

use super::client::When;
use super::pb::mvccpb::KeyValue;
use super::watch::{follow, Update};
use super::{Etcd, Lease};
use crate::{InstanceKey, Presence, Registration, RegistryStore, StoreFuture};

const UNDER: &str = "registry";

pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    etcd: Etcd,
    lease: Lease,
    state: Mutex<State>,
    revision: watch::Sender<u64>,
    /// Wakes the writer.
    dirty: Notify,
}

#[derive(Default)]
struct State {
    /// What etcd holds, and each key's revision.
    seen: HashMap<InstanceKey, (Registration, i64)>,
    /// What this replica holds.
    mine: HashMap<InstanceKey, Mine>,
    /// Registrations this replica let go of whose keys etcd still has (it
    /// was out of reach): key revision to delete at.
    removals: HashMap<InstanceKey, i64>,
}

struct Mine {
    reg: Registration,
    /// The revision this replica last wrote it at (0: not yet).
    rev: i64,
    write: Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// etcd has it as it is here.
    Done,
    /// A new stream took the instance over: write it whatever etcd holds.
    TakeOver,
    /// Changed here, or lost from etcd: write it unless another replica
    /// took it over.
    Update,
}

impl EtcdRegistry {
    /// The registry under `etcd`'s prefix, followed until `stop`.
    pub fn start(etcd: Etcd, lease: Lease, stop: watch::Receiver<bool>) -> EtcdRegistry {
        let inner = Arc::new(Inner {
            etcd,
            lease,
            state: Mutex::new(State::default()),
            revision: watch::channel(0).0,
            dirty: Notify::new(),
        });
        let mut under = inner.etcd.key(UNDER);
        under.push(b'/');
        tokio::spawn(follow(inner.etcd.clone(), under, stop.clone(), {
            let inner = inner.clone();
            move |u| inner.seen(u)
        }));
        tokio::spawn(inner.clone().writer(stop));
        EtcdRegistry { inner }
    }
}

impl Inner {
    fn changed(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    fn key(&self, k: &InstanceKey) -> Vec<u8> {
        self.etcd.key(&format!(
            "{UNDER}/{}/{}/{}",
            escape(&k.0),
            escape(&k.1),
            escape(&k.2)
        ))
    }

    /// The instance a registry key names (the inverse of [`Inner::key`]).
    fn instance_of(&self, key: &[u8]) -> Option<InstanceKey> {
        let mut parts = self.etcd.strip(key, UNDER)?.split('/').map(unescape);
        let k = (parts.next()?, parts.next()?, parts.next()?);
        parts.next().is_none().then_some(k)
    }

    /// A watch update: etcd's view moves; a registration another replica
    /// took over stops being this one's.
    fn seen(&self, u: Update) {
        let decode = |kv: &KeyValue| -> Option<(InstanceKey, Registration)> {
            let reg: Registration = serde_json::from_slice(&kv.value).ok()?;
            Some((reg.key(), reg))
        };
        let mut st = self.state.lock();
        let st = &mut *st;
        let mut moved = false;
        match u {
            Update::Reset(kvs) => {
                st.seen.clear();
                for kv in &kvs {
                    if let Some((k, reg)) = decode(kv) {
                        taken(st, &k, &reg.holder, kv.mod_revision);
                        st.seen.insert(k, (reg, kv.mod_revision));
                    }
                }
                // Held here but gone from etcd (the lease ran out while
                // etcd was out of reach): written again.
                for (k, m) in st.mine.iter_mut() {
                    if m.write == Write::Done && !st.seen.contains_key(k) {
                        m.write = Write::Update;
                    }
                }
                moved = true;
            }
            Update::Put(kv) => {
                if let Some((k, reg)) = decode(&kv) {
                    taken(st, &k, &reg.holder, kv.mod_revision);
                    // An echo of this replica's own write changes nothing
                    // in its view.
                    moved = st.mine.get(&k).is_none_or(|m| m.reg != reg);
                    st.seen.insert(k, (reg, kv.mod_revision));
                }
            }
            Update::Delete(kv) => {
                let k = self.instance_of(&kv.key);
                if let Some(k) = k.filter(|k| st.seen.remove(k).is_some()) {
                    match st.mine.get_mut(&k) {
                        Some(m) if m.write == Write::Done => m.write = Write::Update,
                        Some(_) => {}
                        None => moved = true,
                    }
                }
            }
        }
        if st.mine.values().any(|m| m.write != Write::Done) {
            self.dirty.notify_one();
        }
        if moved {
            self.changed();
        }
    }

    /// Brings etcd in line with `mine`: on every change here, on every new
    /// lease, and every second while something is left to write.
    async fn writer(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut lease = self.lease.id();
        loop {
            tokio::select! {
                _ = self.dirty.notified() => {}
                r = lease.changed() => {
                    if r.is_err() { return }
                    // Everything hung on the old lease goes with it.
                    let mut st = self.state.lock();
                    for m in st.mine.values_mut() {
                        if m.write == Write::Done {
                            m.write = Write::Update;
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let (writes, removals): (Vec<InstanceKey>, Vec<(InstanceKey, i64)>) = {
                let st = self.state.lock();
                (
                    st.mine
                        .iter()
                        .filter(|(_, m)| m.write != Write::Done)
                        .map(|(k, _)| k.clone())
                        .collect(),
                    st.removals.iter().map(|(k, r)| (k.clone(), *r)).collect(),
                )
            };
            for k in writes {
                if let Err(e) = self.write(&k).await {
                    tracing::debug!(error = %e, "etcd: registration not written yet");
                }
            }
            for (k, rev) in removals {
                if self
                    .etcd
                    .delete_when(self.key(&k), When::ModRevision(rev))
                    .await
                    .is_ok()
                {
                    self.state.lock().removals.remove(&k);
                }
            }
        }
    }

    /// Writes one held registration to etcd, as its `write` says.
    async fn write(&self, k: &InstanceKey) -> io::Result<()> {
        let Some((reg, rev, write)) = self
            .state
            .lock()
            .mine
            .get(k)
            .map(|m| (m.reg.clone(), m.rev, m.write))
        else {
            return Ok(());
        };
        if write == Write::Done {
            return Ok(());
        }
        let lease = self.lease.current();
        if lease == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "etcd is out of reach (no lease)",
            ));
        }
        let key = self.key(k);
        let value = serde_json::to_vec(&reg).map_err(io::Error::other)?;
        let written = match write {
            Write::TakeOver => Some(self.etcd.put(key, value, lease).await?),
            _ => {
                let when = if rev > 0 {
                    When::ModRevision(rev)
                } else {
                    When::Absent
                };
                match self
                    .etcd
                    .put_when(key.clone(), when, value.clone(), lease)
                    .await?
                {
                    Some(r) => Some(r),
                    // Moved on since: lost with the lease, rewritten by
                    // this replica, or taken over by another.
                    None => {
                        let (_, kvs) = self.etcd.range(key.clone(), false).await?;
                        let current = kvs.into_iter().next();
                        let now = current.as_ref().and_then(|kv| {
                            serde_json::from_slice::<Registration>(&kv.value)
                                .ok()
                                .map(|r| (r.holder, kv.mod_revision))
                        });
                        match now {
                            None => self.etcd.put_when(key, When::Absent, value, lease).await?,
                            Some((holder, at)) if holder == reg.holder => {
                                self.etcd
                                    .put_when(key, When::ModRevision(at), value, lease)
                                    .await?
                            }
                            Some((holder, _)) => {
                                let mut st = self.state.lock();
                                if st.mine.get(k).is_some_and(|m| m.reg.holder == reg.holder) {
                                    tracing::info!(service = %k.1, instance = %k.2, by = %holder, "registration taken over by another replica");
                                    st.mine.remove(k);
                                    drop(st);
                                    self.changed();
                                }
                                return Ok(());
                            }
                        }
                    }
                }
            }
        };
        if let Some(r) = written {
            let mut st = self.state.lock();
            if let Some(m) = st.mine.get_mut(k) {
                if m.reg.holder == reg.holder {
                    m.rev = r;
                    if m.reg == reg {
                        m.write = Write::Done;
                    } else {
                        m.write = Write::Update;
                        self.dirty.notify_one();
                    }
                }
            }
        }
        Ok(())
    }
}

impl EtcdRegistry {
    /// Applies `change` to a registration this replica holds for `holder`,
    /// here at once and in etcd when it answers; whether it still holds it.
    fn modify<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        change: impl FnOnce(&mut Registration) + Send + 'a,
    ) -> StoreFuture<'a, bool> {
        let held = {
            let mut st = self.inner.state.lock();
            match st.mine.get_mut(key) {
                Some(m) if m.reg.holder == holder => {
                    let before = m.reg.clone();
                    change(&mut m.reg);
                    if m.reg != before {
                        if m.write == Write::Done {
                            m.write = Write::Update;
                        }
                        drop(st);
                        self.inner.changed();
                    }
                    true
                }
                _ => false,
            }
        };
        Box::pin(async move {
            if !held {
                return Ok(false);
            }
            if let Err(e) = self.inner.write(key).await {
                tracing::warn!(error = %e, "etcd: change kept here, written once etcd answers");
            }
            Ok(self
                .inner
                .state
                .lock()
                .mine
                .get(key)
                .is_some_and(|m| m.reg.holder == holder))
        })
    }
}

impl RegistryStore for EtcdRegistry {
    fn put(&self, reg: Registration) -> StoreFuture<'_, ()> {
        let k = reg.key();
        {
            let mut st = self.inner.state.lock();
            st.removals.remove(&k);
            let rev = st.mine.get(&k).map_or(0, |m| m.rev);
            st.mine.insert(
                k.clone(),
                Mine {
                    reg,
                    rev,
                    write: Write::TakeOver,
                },
            );
        }
        self.inner.changed();
        Box::pin(async move {
            if let Err(e) = self.inner.write(&k).await {
                tracing::warn!(error = %e, service = %k.1, instance = %k.2, "etcd: registration kept here, written once etcd answers");
            }
            Ok(())
        })
    }

    fn set_presence<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        presence: Presence,
    ) -> StoreFuture<'a, bool> {
        self.modify(key, holder, move |r| r.presence = presence)
    }

    fn set_roots<'a>(
        &'a self,
        key: &'a InstanceKey,
        holder: &'a str,
        roots: Vec<String>,
    ) -> StoreFuture<'a, bool> {
        self.modify(key, holder, move |r| r.roots = roots)
    }

    fn remove<'a>(&'a self, key: &'a InstanceKey, holder: &'a str) -> StoreFuture<'a, bool> {
        let removed = {
            let mut st = self.inner.state.lock();
            match st.mine.get(key) {
                Some(m) if m.reg.holder == holder => {
                    let rev = m.rev;
                    st.mine.remove(key);
                    if st.seen.get(key).is_some_and(|(r, _)| r.holder == holder) {
                        st.seen.remove(key);
                    }
                    Some(rev)
                }
                _ => None,
            }
        };
        Box::pin(async move {
            let Some(rev) = removed else {
                return Ok(false);
            };
            self.inner.changed();
            if rev > 0 {
                let k = self.inner.key(key);
                if let Err(e) = self.inner.etcd.delete_when(k, When::ModRevision(rev)).await {
                    tracing::warn!(error = %e, "etcd: removal kept here, made once etcd answers");
                    self.inner.state.lock().removals.insert(key.clone(), rev);
                }
            }
            Ok(true)
        })
    }

    fn list(&self) -> StoreFuture<'_, (u64, Vec<Registration>)> {
        let listed = {
            let st = self.inner.state.lock();
            let mut all: HashMap<&InstanceKey, &Registration> =
                st.seen.iter().map(|(k, (r, _))| (k, r)).collect();
            for (k, m) in &st.mine {
                all.insert(k, &m.reg);
            }
            (
                *self.inner.revision.borrow(),
                all.into_values().cloned().collect(),
            )
        };
        Box::pin(async move { Ok(listed) })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }
}

/// Another replica wrote `k` after this one: it holds the proxy's stream
/// now, and this replica lets the registration go (unless a stream here
/// has just taken it over again).
fn taken(st: &mut State, k: &InstanceKey, holder: &str, rev: i64) {
    if let Some(m) = st.mine.get(k) {
        if m.reg.holder != holder && rev > m.rev && m.write != Write::TakeOver {
            tracing::info!(service = %k.1, instance = %k.2, by = %holder, "registration taken over by another replica");
            st.mine.remove(k);
        }
    }
}

/// A name as one key segment (`/` and `%` escaped).
fn escape(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

fn unescape(s: &str) -> String {
    s.replace("%2F", "/").replace("%25", "%")
}

/// A live replica, as it announces itself to the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub name: String,
    /// Where proxies reach it (gRPC).
    pub grpc: String,
    /// Its HTTP API.
    pub api: String,
    pub version: String,
    /// Unix seconds.
    pub started: u64,
}

/// The directory of live replicas: each under its own lease, so a dead
/// one drops out.
pub struct Replicas {
    etcd: Etcd,
}

impl Replicas {
    /// Announces `me` (again on every new lease) until `stop`.
    pub fn start(
        etcd: Etcd,
        lease: Lease,
        me: ReplicaInfo,
        mut stop: watch::Receiver<bool>,
    ) -> Replicas {
        let key = etcd.key(&format!("replicas/{}", escape(&me.name)));
        let e = etcd.clone();
        tokio::spawn(async move {
            let mut ids = lease.id();
            let value = serde_json::to_vec(&me).unwrap_or_default();
            let mut written = 0;
            loop {
                let id = lease.current();
                if id != 0 && id != written {
                    match e.put(key.clone(), value.clone(), id).await {
                        Ok(_) => written = id,
                        Err(err) => {
                            tracing::debug!(error = %err, "etcd: cannot announce the replica yet")
                        }
                    }
                }
                tokio::select! {
                    _ = ids.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            // Leaving on purpose: out of the directory at once.
            let _ = e.delete(key, false).await;
        });
        Replicas { etcd }
    }

    /// Every live replica.
    pub async fn list(&self) -> io::Result<Vec<ReplicaInfo>> {
        let mut under = self.etcd.key("replicas");
        under.push(b'/');
        let (_, kvs) = self.etcd.range(under, true).await?;
        let mut out: Vec<ReplicaInfo> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
