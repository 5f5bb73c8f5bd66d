//! The control plane's live state and the loop that pushes snapshots.
//!
//! - The **config** in force (swapped whole by the config source) and the
//!   **trust bundle** every snapshot carries.
//! - The **registry** of proxy instances lives in a [`RegistryStore`]: a
//!   proxy's registration is put when its stream opens, marked
//!   disconnected when the stream ends, and removed after the grace period
//!   (or marked leaving when the proxy says it shuts down). Its view for
//!   snapshots is the [`EndpointTable`].
//! - A **session** per proxy stream held here: its interest set, the
//!   snapshot last sent and acknowledged, its certificate.
//!
//! Every change wakes one push task. A push round reads what changed under
//! the state lock, compiles the snapshots whose inputs moved outside it
//! ([`crate::snapshots`]), and sends each proxy the body of its group when
//! it differs from the one it has. Events that arrive during a round are
//! handled by the next one, so a burst of N connections costs a few
//! rounds, not N. Versions are handed out by the one push task, in order:
//! a proxy sees its versions rise, and a slow one skips to the newest
//! (each proxy has a one-slot `watch` channel).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tandem_api::v1::{Certificate, ControlMessage, Hello, Snapshot as WireSnapshot};
use tandem_config::rollout::Splits;
use tandem_config::snapshot::{Endpoint, Trust};
use tandem_config::ResourceSet;
use tandem_runtime::sync::Mutex;
use tandem_store::{Kv, Presence, Registration, RegistryStore};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::registry::{EndpointTable, Remote, ServiceKey};
use crate::snapshots::{compile_groups, Group, Inputs, Snapshots};
use crate::versions::Floor;

pub type ProxyKey = (String, String, String); // namespace, service, instance

/// The newest snapshot for one proxy.
pub type SnapshotTx = watch::Sender<Option<WireSnapshot>>;

/// What the mesh holds of a proxy's stream: where its snapshots go, and
/// how to end it with a status.
pub struct StreamEnds {
    pub snapshots: SnapshotTx,
    pub end: oneshot::Sender<tonic::Status>,
    /// Other messages for the proxy (taps).
    pub commands: mpsc::Sender<ControlMessage>,
}

/// Highest config version a proxy may say it applied: versions stay exact
/// in JSON (2^53) and far from wrapping.
pub const MAX_VERSION: u64 = 1 << 53;
/// How far above the versions this mesh has reserved a reconnecting
/// proxy's applied version may be (it may come from a control plane whose
/// data directory was lost); beyond, the Hello is refused instead of
/// lifting every proxy's versions.
pub const MAX_VERSION_AHEAD: u64 = 1 << 32;

/// Groups compiled in one round beyond which compiling moves off the
/// async runtime's threads.
const COMPILE_INLINE: usize = 4;

pub struct Mesh {
    state: Mutex<State>,
    registry: Arc<dyn RegistryStore>,
    floor: Floor,
    /// This control plane, as the holder of registrations.
    id: String,
    pub grace: Duration,
    /// The cluster this control plane belongs to (named in snapshots).
    cluster: Arc<str>,
    /// Set from start until the warm-up period is over: proxies that
    /// already run a config (they reconnect after a control-plane restart)
    /// keep it until the registry has had time to fill again, instead of
    /// getting snapshots that lack the endpoints of proxies not back yet.
    warming: AtomicBool,
    /// Something changed: a push round is due.
    wake: Notify,
}

struct State {
    config: Arc<ResourceSet>,
    /// Moves with the config and with the rollouts' splits.
    config_generation: u64,
    /// The weights rollouts put on the rules they drive.
    splits: Arc<Splits>,
    config_errors: Vec<String>,
    trust: Option<Trust>,
    trust_generation: u64,
    /// The ids of the roots in `trust`.
    trust_roots: Arc<Vec<String>>,
    sessions: HashMap<ProxyKey, Session>,
    next_conn: u64,
    endpoints: Arc<EndpointTable>,
    /// Endpoints imported from remote clusters.
    remote: Arc<Remote>,
    snapshots: Snapshots,
    /// The next version to hand out, and the top of the reserved block.
    next_version: u64,
    ceiling: u64,
    rounds: u64,
}

/// One proxy's stream, held by this control plane.
struct Session {
    hello: Hello,
    conn: u64,
    /// The join token the proxy's certificate descends from.
    lineage: String,
    /// `None` once the stream ended (the grace period).
    tx: Option<SnapshotTx>,
    /// Ends the stream with a status (taken when used).
    end: Option<oneshot::Sender<tonic::Status>>,
    commands: mpsc::Sender<ControlMessage>,
    /// Reconnected during warm-up with a config of its own: it keeps that
    /// config until the warm-up ends or it asks for something new.
    held: bool,
    /// Said it is shutting down.
    leaving: bool,
    group: Group,
    /// The body last sent (shared with its group while current).
    sent_body: Option<Arc<Vec<u8>>>,
    sent_version: u64,
    acked_version: u64,
    nack: Option<String>,
    /// Trust generation in the last snapshot sent, and in the last one acked.
    trust_sent: u64,
    trust_acked: u64,
    /// The roots of the bundle in the last snapshot sent, and in the last
    /// one acked (recorded in the registration).
    trust_sent_roots: Arc<Vec<String>>,
    trust_acked_roots: Arc<Vec<String>>,
    certificate: Option<Certificate>,
}

impl Session {
    fn active(&self) -> bool {
        self.tx.is_some() && !self.held
    }
}

/// One row of `tandem status`.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub namespace: String,
    pub service: String,
    pub instance: String,
    pub inbound: String,
    pub admin: String,
    pub http_proxy: String,
    pub config_version: u64,
    pub acked_version: u64,
    pub config_acked: bool,
    pub nack_reason: Option<String>,
    pub connected: bool,
    pub proxy_version: String,
    /// The proxy's SPIFFE ID and certificate, as last reported or issued.
    pub spiffe_id: Option<String>,
    /// Unix seconds.
    pub cert_not_after: Option<u64>,
    pub cert_signer: Option<String>,
    pub cert_serial: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConfigStatus {
    pub generation: u64,
    pub services: usize,
    pub http_routes: usize,
    /// Problems of the last refused change, empty when the last load was good.
    pub errors: Vec<String>,
}

/// How the push loop is doing (for `GET /api/v1/control`).
#[derive(Clone, Debug, Serialize)]
pub struct PushStatus {
    pub rounds: u64,
    pub compiles: u64,
    pub sessions: usize,
    pub registry_revision: u64,
    pub next_version: u64,
}

impl Mesh {
    /// The mesh with its push task running.
    /// `id` names this control plane as the holder of registrations (a
    /// replica's name; unique among the replicas sharing a store).
    pub async fn start(
        config: ResourceSet,
        registry: Arc<dyn RegistryStore>,
        kv: Arc<dyn Kv>,
        grace: Duration,
        id: String,
        cluster: &str,
    ) -> std::io::Result<Arc<Self>> {
        let floor = Floor::new(kv);
        let (first, ceiling) = floor.reserve(1, 1).await?;
        let mesh = Arc::new(Mesh {
            state: Mutex::new(State {
                config: Arc::new(config),
                config_generation: 1,
                splits: Arc::new(Splits::new()),
                config_errors: Vec::new(),
                trust: None,
                trust_generation: 0,
                trust_roots: Arc::default(),
                sessions: HashMap::new(),
                next_conn: 1,
                endpoints: Arc::new(EndpointTable::default()),
                remote: Arc::default(),
                snapshots: Snapshots::default(),
                next_version: first,
                ceiling,
                rounds: 0,
            }),
            registry,
            floor,
            id,
            cluster: Arc::from(cluster),
            grace,
            warming: AtomicBool::new(true),
            wake: Notify::new(),
        });
        tokio::spawn(mesh.clone().push_loop());
        Ok(mesh)
    }

    fn holder(&self, conn: u64) -> String {
        format!("{}/{conn}", self.id)
    }

    /// Ends the warm-up period: every proxy gets its current snapshot.
    pub fn end_warmup(&self) {
        self.warming.store(false, Ordering::Relaxed);
        for s in self.state.lock().sessions.values_mut() {
            s.held = false;
        }
        tracing::info!("warm-up over; pushing to every proxy");
        self.wake.notify_one();
    }

    /// Swaps in a new, validated config.
    pub fn set_config(&self, config: ResourceSet) {
        {
            let mut st = self.state.lock();
            st.config = Arc::new(config);
            st.config_generation += 1;
            st.config_errors.clear();
        }
        self.wake.notify_one();
    }

    /// The config in force.
    pub fn config(&self) -> Arc<ResourceSet> {
        self.state.lock().config.clone()
    }

    /// The rollouts' splits in force.
    pub fn splits(&self) -> Arc<Splits> {
        self.state.lock().splits.clone()
    }

    /// Puts the rollouts' splits in force (every proxy's snapshot is
    /// compiled again when they changed).
    pub fn set_splits(&self, splits: Splits) {
        {
            let mut st = self.state.lock();
            if *st.splits == splits {
                return;
            }
            st.splits = Arc::new(splits);
            st.config_generation += 1;
        }
        self.wake.notify_one();
    }

    /// Records a refused config change; the last good config stays.
    pub fn config_refused(&self, errors: Vec<String>) {
        self.state.lock().config_errors = errors;
    }

    pub fn config_status(&self) -> ConfigStatus {
        let st = self.state.lock();
        ConfigStatus {
            generation: st.config_generation,
            services: st.config.services.len(),
            http_routes: st.config.http_routes.len(),
            errors: st.config_errors.clone(),
        }
    }

    pub fn push_status(&self) -> PushStatus {
        let st = self.state.lock();
        PushStatus {
            rounds: st.rounds,
            compiles: st.snapshots.compiles(),
            sessions: st.sessions.len(),
            registry_revision: st.endpoints.revision,
            next_version: st.next_version,
        }
    }

    /// Registers a proxy's stream; returns its connection id. Its first
    /// snapshot follows from the push task. Refused: an applied version out
    /// of bounds, an instance name a live proxy of another lineage holds,
    /// an inbound address a live proxy of another service holds. The same
    /// proxy reconnecting (same lineage) replaces its old stream.
    pub async fn connect(
        &self,
        hello: Hello,
        lineage: String,
        ends: StreamEnds,
    ) -> Result<(ProxyKey, u64), tonic::Status> {
        let key = (
            hello.namespace.clone(),
            hello.service.clone(),
            hello.instance.clone(),
        );
        let reg = Registration {
            namespace: hello.namespace.clone(),
            service: hello.service.clone(),
            instance: hello.instance.clone(),
            inbound: hello.inbound_addr.clone(),
            presence: Presence::Connected,
            holder: String::new(),
            roots: Vec::new(),
            zone: hello.zone.clone(),
        };
        let conn = {
            let mut st = self.state.lock();
            let bound = MAX_VERSION.min(st.ceiling.saturating_add(MAX_VERSION_AHEAD));
            if hello.applied_version > bound {
                return Err(tonic::Status::invalid_argument(format!(
                    "applied version {} is beyond any this mesh handed out (at most {bound})",
                    hello.applied_version
                )));
            }
            if let Some(live) = st.sessions.get(&key).filter(|s| s.tx.is_some()) {
                if live.lineage != lineage {
                    return Err(tonic::Status::already_exists(format!(
                        "instance `{}` of {}/{} is connected already; give this proxy another --instance",
                        key.2, key.0, key.1
                    )));
                }
            }
            if !hello.inbound_addr.is_empty() {
                if let Some(other) = st.sessions.values().find(|s| {
                    s.tx.is_some()
                        && s.hello.inbound_addr == hello.inbound_addr
                        && (s.hello.namespace != hello.namespace
                            || s.hello.service != hello.service)
                }) {
                    return Err(tonic::Status::already_exists(format!(
                        "inbound address {} is held by {}/{} instance `{}`",
                        hello.inbound_addr,
                        other.hello.namespace,
                        other.hello.service,
                        other.hello.instance
                    )));
                }
            }
            let conn = st.next_conn;
            st.next_conn += 1;
            // A proxy that has applied a version from an earlier control
            // plane life must only ever see higher ones (the push task
            // reserves a block above it).
            st.next_version = st.next_version.max(hello.applied_version + 1);
            let held = hello.applied_version > 0 && self.warming.load(Ordering::Relaxed);
            let certificate = hello
                .certificate
                .clone()
                .filter(|c| !c.spiffe_id.is_empty());
            let group = Group {
                namespace: hello.namespace.clone(),
                service: hello.service.clone(),
                interest: Arc::new(hello.interest.iter().cloned().collect()),
            };
            st.sessions.insert(
                key.clone(),
                Session {
                    hello,
                    conn,
                    lineage,
                    tx: Some(ends.snapshots),
                    end: Some(ends.end),
                    commands: ends.commands,
                    held,
                    leaving: false,
                    group,
                    sent_body: None,
                    sent_version: 0,
                    acked_version: 0,
                    nack: None,
                    trust_sent: 0,
                    trust_acked: 0,
                    trust_sent_roots: Arc::default(),
                    trust_acked_roots: Arc::default(),
                    certificate,
                },
            );
            conn
        };
        tracing::info!(namespace = %key.0, service = %key.1, instance = %key.2, "proxy connected");
        let reg = Registration {
            holder: self.holder(conn),
            ..reg
        };
        if let Err(e) = self.registry.put(reg).await {
            tracing::error!(error = %e, "cannot register the proxy");
        }
        self.wake.notify_one();
        Ok((key, conn))
    }

    /// Sends `msg` to every connected proxy of `namespace/service`; the
    /// number that took it (a proxy whose queue is full is skipped).
    pub fn command(&self, namespace: &str, service: &str, msg: &ControlMessage) -> usize {
        let st = self.state.lock();
        st.sessions
            .iter()
            .filter(|((ns, svc, _), s)| ns == namespace && svc == service && s.tx.is_some())
            .filter(|(_, s)| s.commands.try_send(msg.clone()).is_ok())
            .count()
    }

    /// Ends a proxy's stream with `status`.
    pub fn end_stream(&self, key: &ProxyKey, conn: u64, status: tonic::Status) {
        let mut st = self.state.lock();
        if let Some(s) = st.sessions.get_mut(key).filter(|s| s.conn == conn) {
            if let Some(end) = s.end.take() {
                tracing::warn!(service = %key.1, instance = %key.2, status = %status.message(), "ending the proxy's stream");
                let _ = end.send(status);
            }
        }
    }

    /// The proxies whose join tokens were revoked: their streams end and
    /// they stop being endpoints at once (not after the grace period).
    pub async fn expel(&self, revoked: &[String]) {
        let expelled: Vec<(ProxyKey, u64)> = {
            let mut st = self.state.lock();
            let mut out = Vec::new();
            for (key, s) in st.sessions.iter_mut() {
                if s.leaving || !revoked.contains(&s.lineage) {
                    continue;
                }
                s.leaving = true;
                if let Some(end) = s.end.take() {
                    let _ = end.send(tonic::Status::unauthenticated(
                        "join token revoked: this proxy's certificate is no longer accepted",
                    ));
                }
                out.push((key.clone(), s.conn));
            }
            out
        };
        for (key, conn) in expelled {
            tracing::warn!(namespace = %key.0, service = %key.1, instance = %key.2, "join token revoked: proxy expelled");
            if let Err(e) = self
                .registry
                .set_presence(&key, &self.holder(conn), Presence::Leaving)
                .await
            {
                tracing::error!(error = %e, "cannot remove the expelled proxy");
            }
        }
    }

    pub fn ack(&self, key: &ProxyKey, conn: u64, version: u64) {
        let roots = {
            let mut st = self.state.lock();
            let Some(s) = st.sessions.get_mut(key).filter(|s| s.conn == conn) else {
                return;
            };
            s.acked_version = s.acked_version.max(version);
            if version != s.sent_version {
                return;
            }
            s.nack = None;
            s.trust_acked = s.trust_sent;
            if s.trust_acked_roots == s.trust_sent_roots {
                return;
            }
            s.trust_acked_roots = s.trust_sent_roots.clone();
            (*s.trust_acked_roots).clone()
        };
        // Recorded in the registration, where a rotation led by any
        // replica counts it.
        let (registry, key, holder) = (self.registry.clone(), key.clone(), self.holder(conn));
        tokio::spawn(async move {
            if let Err(e) = registry.set_roots(&key, &holder, roots).await {
                tracing::warn!(error = %e, "cannot record the proxy's trust bundle");
            }
        });
    }

    pub fn nack(&self, key: &ProxyKey, conn: u64, version: u64, reason: String) {
        tracing::warn!(service = %key.1, instance = %key.2, version, %reason, "proxy refused snapshot");
        let mut st = self.state.lock();
        if let Some(s) = st.sessions.get_mut(key).filter(|s| s.conn == conn) {
            s.nack = Some(reason);
        }
    }

    /// The proxy is shutting down: no longer an endpoint, at once.
    pub async fn leave(&self, key: &ProxyKey, conn: u64) {
        {
            let mut st = self.state.lock();
            let Some(s) = st.sessions.get_mut(key).filter(|s| s.conn == conn) else {
                return;
            };
            s.leaving = true;
        }
        tracing::info!(service = %key.1, instance = %key.2, "proxy leaving");
        if let Err(e) = self
            .registry
            .set_presence(key, &self.holder(conn), Presence::Leaving)
            .await
        {
            tracing::error!(error = %e, "cannot mark the proxy as leaving");
        }
    }

    /// Adds destinations to a proxy's interest; refused beyond
    /// [`crate::discovery::MAX_INTEREST`] or for a name that is not one.
    pub fn subscribe(
        &self,
        key: &ProxyKey,
        conn: u64,
        names: Vec<String>,
    ) -> Result<(), tonic::Status> {
        if let Some(bad) = names
            .iter()
            .find(|n| !tandem_identity::spiffe::valid_label(n))
        {
            return Err(tonic::Status::invalid_argument(format!(
                "`{}` is not a service name",
                bad.chars().take(64).collect::<String>()
            )));
        }
        {
            let mut st = self.state.lock();
            let Some(s) = st.sessions.get_mut(key).filter(|s| s.conn == conn) else {
                return Ok(());
            };
            // A proxy re-sends subscriptions it queued while disconnected;
            // names its hello already listed change nothing.
            let mut interest: BTreeSet<String> = (*s.group.interest).clone();
            let before = interest.len();
            interest.extend(names);
            if interest.len() == before {
                return Ok(());
            }
            if interest.len() > crate::discovery::MAX_INTEREST {
                return Err(tonic::Status::resource_exhausted(format!(
                    "at most {} destinations per proxy",
                    crate::discovery::MAX_INTEREST
                )));
            }
            s.group.interest = Arc::new(interest);
            // A new destination needs an answer now, even if not every
            // peer is back yet.
            s.held = false;
        }
        self.wake.notify_one();
        Ok(())
    }

    /// The stream ended. The instance stays an endpoint for the grace
    /// period (a quick reconnect must not flap traffic), then is removed;
    /// one that said it was leaving stays out.
    pub async fn disconnect(self: &Arc<Self>, key: ProxyKey, conn: u64) {
        let leaving = {
            let mut st = self.state.lock();
            let Some(s) = st.sessions.get_mut(&key).filter(|s| s.conn == conn) else {
                return;
            };
            s.tx = None;
            s.leaving
        };
        tracing::info!(service = %key.1, instance = %key.2, grace = ?self.grace, "proxy disconnected");
        let holder = self.holder(conn);
        if !leaving {
            if let Err(e) = self
                .registry
                .set_presence(&key, &holder, Presence::Disconnected)
                .await
            {
                tracing::error!(error = %e, "cannot mark the proxy as disconnected");
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.grace).await;
            let stale = {
                let mut st = me.state.lock();
                let stale = st
                    .sessions
                    .get(&key)
                    .is_some_and(|s| s.conn == conn && s.tx.is_none());
                if stale {
                    st.sessions.remove(&key);
                }
                stale
            };
            if stale {
                match me.registry.remove(&key, &holder).await {
                    Ok(_) => {
                        tracing::info!(service = %key.1, instance = %key.2, "proxy removed from registry")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot remove the proxy"),
                }
            }
        });
    }

    /// Runs push rounds: one now, then one per wake-up (a change here) or
    /// registry change (here or, with a shared store, elsewhere).
    async fn push_loop(self: Arc<Self>) {
        let mut registry = self.registry.changes();
        loop {
            if let Err(e) = self.round().await {
                tracing::error!(error = %e, "push round failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.wake.notify_one();
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                r = registry.changed() => if r.is_err() { return },
            }
        }
    }

    /// One push round.
    async fn round(&self) -> std::io::Result<()> {
        // The registry and the remote clusters' endpoints, if either moved
        // since the table was made.
        let seen = *self.registry.changes().borrow();
        let moved = {
            let st = self.state.lock();
            seen != st.endpoints.revision || st.remote.generation != st.endpoints.remote_generation
        };
        if moved {
            let (revision, regs) = self.registry.list().await?;
            let mut st = self.state.lock();
            let remote = st.remote.clone();
            if revision != st.endpoints.revision
                || remote.generation != st.endpoints.remote_generation
            {
                let changed = Arc::make_mut(&mut st.endpoints).update(revision, &regs, &remote);
                tracing::debug!(revision, services = changed.len(), "endpoints changed");
            }
        }
        // What must be compiled for the proxies that take snapshots now.
        let (inputs, stale) = {
            let st = self.state.lock();
            let inputs = Inputs {
                config: st.config.clone(),
                config_generation: st.config_generation,
                splits: st.splits.clone(),
                trust: st.trust.clone(),
                trust_generation: st.trust_generation,
                endpoints: st.endpoints.clone(),
                cluster: self.cluster.clone(),
            };
            let groups = st
                .sessions
                .values()
                .filter(|s| s.active())
                .map(|s| &s.group);
            let stale = st.snapshots.stale(groups, &inputs);
            (inputs, stale)
        };
        let compiled = if stale.len() <= COMPILE_INLINE {
            compile_groups(stale, &inputs)
        } else {
            let inputs = inputs.clone();
            tokio::task::spawn_blocking(move || compile_groups(stale, &inputs))
                .await
                .map_err(std::io::Error::other)?
        };
        self.state.lock().snapshots.store(compiled);
        // Versions for every proxy whose snapshot changed, reserved before
        // any is handed out, so the stored floor is above all of them.
        loop {
            let (next, due, ceiling) = {
                let st = self.state.lock();
                let due = st
                    .sessions
                    .values()
                    .filter(|s| s.active() && differs(s, st.snapshots.body(&s.group)))
                    .count() as u64;
                (st.next_version, due, st.ceiling)
            };
            if next + due <= ceiling + 1 {
                break;
            }
            // The rest of the current block is skipped: versions only need
            // to rise.
            let (first, ceiling) = self.floor.reserve(next, due).await?;
            let mut st = self.state.lock();
            st.next_version = st.next_version.max(first);
            st.ceiling = st.ceiling.max(ceiling);
        }
        let mut st = self.state.lock();
        let st = &mut *st;
        st.rounds += 1;
        let trust_generation = st.trust_generation;
        let trust_roots = st.trust_roots.clone();
        for s in st.sessions.values_mut().filter(|s| s.active()) {
            let Some(body) = st.snapshots.body(&s.group) else {
                continue;
            };
            if !differs(s, Some(body)) || st.next_version > st.ceiling {
                continue;
            }
            let version = st.next_version;
            st.next_version += 1;
            s.sent_version = version;
            s.trust_sent = trust_generation;
            s.trust_sent_roots = trust_roots.clone();
            s.sent_body = Some(body.clone());
            if let Some(tx) = &s.tx {
                tx.send_replace(Some(WireSnapshot {
                    version,
                    body: (**body).clone(),
                }));
            }
        }
        let in_use: HashSet<&Group> = st.sessions.values().map(|s| &s.group).collect();
        st.snapshots.retain(&in_use);
        Ok(())
    }

    pub fn status(&self) -> Vec<ProxyStatus> {
        let st = self.state.lock();
        let mut out: Vec<ProxyStatus> = st
            .sessions
            .values()
            .map(|s| ProxyStatus {
                namespace: s.hello.namespace.clone(),
                service: s.hello.service.clone(),
                instance: s.hello.instance.clone(),
                inbound: s.hello.inbound_addr.clone(),
                admin: s.hello.admin_addr.clone(),
                http_proxy: s.hello.http_proxy_addr.clone(),
                config_version: s.sent_version,
                acked_version: s.acked_version,
                config_acked: s.sent_version > 0 && s.acked_version == s.sent_version,
                nack_reason: s.nack.clone(),
                connected: s.tx.is_some(),
                proxy_version: s.hello.proxy_version.clone(),
                spiffe_id: s.certificate.as_ref().map(|c| c.spiffe_id.clone()),
                cert_not_after: s.certificate.as_ref().map(|c| c.not_after),
                cert_signer: s.certificate.as_ref().map(|c| c.signer.clone()),
                cert_serial: s.certificate.as_ref().map(|c| c.serial.clone()),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance).cmp(&(&b.namespace, &b.service, &b.instance))
        });
        out
    }

    /// Replaces the endpoints imported from remote clusters (each carries
    /// its cluster); snapshots that list them are compiled again.
    pub fn set_remote(&self, endpoints: std::collections::BTreeMap<ServiceKey, Vec<Endpoint>>) {
        {
            let mut st = self.state.lock();
            if st.remote.endpoints == endpoints {
                return;
            }
            let generation = st.remote.generation + 1;
            st.remote = Arc::new(Remote {
                generation,
                endpoints,
            });
        }
        self.wake.notify_one();
    }

    /// This cluster's own endpoints of a service (none imported).
    pub fn local_endpoints(&self, namespace: &str, service: &str) -> Vec<Endpoint> {
        let st = self.state.lock();
        st.endpoints
            .get(namespace, service)
            .map(|e| {
                e.endpoints
                    .iter()
                    .filter(|e| e.cluster.is_empty())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cluster this control plane belongs to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Sets the trust bundle carried by every snapshot; returns its
    /// generation.
    pub fn set_trust(&self, trust: Trust, root_ids: Vec<String>) -> u64 {
        let generation = {
            let mut st = self.state.lock();
            if st.trust.as_ref() == Some(&trust) {
                return st.trust_generation;
            }
            st.trust = Some(trust);
            st.trust_roots = Arc::new(root_ids);
            st.trust_generation += 1;
            st.trust_generation
        };
        self.wake.notify_one();
        generation
    }

    /// Connected proxies, whichever control plane holds them, that have
    /// not yet acknowledged a trust bundle with `root` in it.
    pub async fn trust_pending(&self, root: &str) -> std::io::Result<Vec<String>> {
        let (_, regs) = self.registry.list().await?;
        let mut pending: Vec<String> = regs
            .iter()
            .filter(|r| r.presence == Presence::Connected && !r.roots.iter().any(|x| x == root))
            .map(|r| format!("{}/{}/{}", r.namespace, r.service, r.instance))
            .collect();
        pending.sort();
        Ok(pending)
    }

    /// Records a certificate issued to (or reported by) a proxy.
    pub fn set_certificate(&self, namespace: &str, service: &str, instance: &str, c: Certificate) {
        let key = (
            namespace.to_string(),
            service.to_string(),
            instance.to_string(),
        );
        if let Some(s) = self.state.lock().sessions.get_mut(&key) {
            s.certificate = Some(c);
        }
    }

    /// Connected proxies whose certificate was signed by one of `roots`.
    pub fn certificates_signed_by(&self, roots: &[String]) -> Vec<String> {
        let st = self.state.lock();
        st.sessions
            .iter()
            .filter(|(_, s)| s.tx.is_some())
            .filter(|(_, s)| {
                s.certificate
                    .as_ref()
                    .is_some_and(|c| roots.contains(&c.signer))
            })
            .map(|((ns, svc, inst), _)| format!("{ns}/{svc}/{inst}"))
            .collect()
    }
}

/// Whether `body` is not what the session was last sent.
fn differs(s: &Session, body: Option<&Arc<Vec<u8>>>) -> bool {
    match (body, &s.sent_body) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(b), Some(sent)) => !Arc::ptr_eq(b, sent) && b != sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::snapshot::Snapshot;
    use tandem_store::{Memory, MemoryRegistry};

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
"#;

    const GRACE: Duration = Duration::from_secs(2);

    async fn mesh_on(kv: Arc<dyn Kv>) -> Arc<Mesh> {
        let config = tandem_config::load_str("c.yaml", CONFIG).expect("config");
        Mesh::start(
            config,
            Arc::new(MemoryRegistry::default()),
            kv,
            GRACE,
            "cp".into(),
            "",
        )
        .await
        .expect("mesh")
    }

    async fn mesh() -> Arc<Mesh> {
        mesh_on(Arc::new(Memory::default())).await
    }

    fn hello(svc: &str, inst: &str, addr: &str, interest: &[&str], applied: u64) -> Hello {
        Hello {
            service: svc.into(),
            instance: inst.into(),
            namespace: "default".into(),
            inbound_addr: addr.into(),
            interest: interest.iter().map(|s| s.to_string()).collect(),
            applied_version: applied,
            ..Hello::default()
        }
    }

    type Rx = watch::Receiver<Option<WireSnapshot>>;

    async fn join(mesh: &Arc<Mesh>, h: Hello) -> (ProxyKey, u64, Rx) {
        let lineage = format!("token-of-{}", h.instance);
        let (key, conn, rx, _) = join_as(mesh, h, &lineage).await.expect("connect");
        (key, conn, rx)
    }

    type Ended = oneshot::Receiver<tonic::Status>;

    async fn join_as(
        mesh: &Arc<Mesh>,
        h: Hello,
        lineage: &str,
    ) -> Result<(ProxyKey, u64, Rx, Ended), tonic::Status> {
        let (tx, rx) = watch::channel(None);
        let (end, ended) = oneshot::channel();
        let (commands, _) = mpsc::channel(1);
        let ends = StreamEnds {
            snapshots: tx,
            end,
            commands,
        };
        let (key, conn) = mesh.connect(h, lineage.to_string(), ends).await?;
        Ok((key, conn, rx, ended))
    }

    #[tokio::test]
    async fn hellos_that_take_what_others_hold_are_refused() {
        let m = mesh().await;
        let (key, conn, _rx, _e) = join_as(&m, hello("api", "a1", "10.0.0.2:80", &[], 0), "t1")
            .await
            .expect("first");
        // The same instance name from another token: refused while live.
        let e = join_as(&m, hello("api", "a1", "10.0.0.9:80", &[], 0), "t2")
            .await
            .expect_err("name taken");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        // Another service claiming the same inbound address: refused.
        let e = join_as(&m, hello("web", "w1", "10.0.0.2:80", &[], 0), "t3")
            .await
            .expect_err("address taken");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        assert!(e.message().contains("default/api"), "{}", e.message());
        // The same proxy reconnecting before its old stream was noticed
        // dead: replaces it.
        let (_, conn2, _rx2, _e2) = join_as(&m, hello("api", "a1", "10.0.0.2:80", &[], 0), "t1")
            .await
            .expect("same lineage");
        assert_ne!(conn, conn2);
        // Once the stream is gone the name is free again.
        m.disconnect(key, conn2).await;
        join_as(&m, hello("api", "a1", "10.0.0.9:80", &[], 0), "t2")
            .await
            .expect("free");
    }

    #[tokio::test]
    async fn a_huge_applied_version_does_not_lift_everyone() {
        let m = mesh().await;
        for v in [u64::MAX, MAX_VERSION + 1, MAX_VERSION_AHEAD * 2] {
            let e = join_as(&m, hello("web", "w1", "", &[], v), "t")
                .await
                .expect_err("out of bounds");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{v}");
        }
        // Within bounds it is honoured: versions handed out rise above it.
        let (_, _, mut rx, _) = join_as(&m, hello("web", "w1", "", &[], 5000), "t")
            .await
            .expect("within bounds");
        m.end_warmup();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("sent")
            .expect("open");
        let v = rx.borrow().as_ref().map(|s| s.version).unwrap_or(0);
        assert!(v > 5000 && v < 6000, "{v}");
    }

    #[tokio::test]
    async fn subscriptions_are_capped() {
        let m = mesh().await;
        let (key, conn, _rx, _e) = join_as(&m, hello("web", "w1", "", &[], 0), "t")
            .await
            .expect("join");
        let names: Vec<String> = (0..crate::discovery::MAX_INTEREST)
            .map(|i| format!("s{i}"))
            .collect();
        m.subscribe(&key, conn, names).expect("up to the cap");
        let e = m
            .subscribe(&key, conn, vec!["one-more".into()])
            .expect_err("over the cap");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let e = m
            .subscribe(&key, conn, vec!["Not A Name".into()])
            .expect_err("not a name");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_revoked_lineage_is_expelled_and_stops_being_an_endpoint() {
        let m = mesh().await;
        m.end_warmup();
        let (_, _, mut web) = join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let (_, _, _a1, ended) = join_as(&m, hello("api", "a1", "10.0.0.2:80", &[], 0), "bad")
            .await
            .expect("a1");
        let (_, _, _a2, _) = join_as(&m, hello("api", "a2", "10.0.0.3:80", &[], 0), "good")
            .await
            .expect("a2");
        until_api(&mut web, &["10.0.0.2:80", "10.0.0.3:80"]).await;
        m.expel(&["bad".to_string()]).await;
        let status = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("ended in time")
            .expect("a status");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        until_api(&mut web, &["10.0.0.3:80"]).await;
    }

    /// The next snapshot sent on `rx` whose `api` endpoints are `want`.
    async fn until_api(rx: &mut Rx, want: &[&str]) -> u64 {
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                let snap = Snapshot::from_json(&s.body).expect("json");
                let have: Vec<String> = snap
                    .destinations
                    .iter()
                    .filter(|d| d.name == "api")
                    .flat_map(|d| d.backends[0].endpoints.iter().map(|e| e.address.clone()))
                    .collect();
                if have == want {
                    return s.version;
                }
            }
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("a snapshot in time")
                .expect("open");
        }
    }

    #[tokio::test]
    async fn endpoints_reach_callers_and_versions_rise() {
        let m = mesh().await;
        let (_, _, mut web) = join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let v1 = until_api(&mut web, &[]).await;
        let (_, _, _api) = join(&m, hello("api", "a1", "10.0.0.2:80", &[], 0)).await;
        let v2 = until_api(&mut web, &["10.0.0.2:80"]).await;
        assert!(v2 > v1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_stays_an_endpoint_for_the_grace_period() {
        let m = mesh().await;
        let (_, _, mut web) = join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let (key, conn, _api) = join(&m, hello("api", "a1", "10.0.0.2:80", &[], 0)).await;
        until_api(&mut web, &["10.0.0.2:80"]).await;
        m.disconnect(key.clone(), conn).await;
        tokio::time::sleep(GRACE / 2).await;
        assert!(m
            .status()
            .iter()
            .any(|s| s.instance == "a1" && !s.connected));
        assert!(
            !web.has_changed().expect("open"),
            "no change within the grace period"
        );
        tokio::time::sleep(GRACE).await;
        until_api(&mut web, &[]).await;
        assert!(m.status().iter().all(|s| s.instance != "a1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_within_the_grace_period_keeps_the_endpoint() {
        let m = mesh().await;
        let (_, _, mut web) = join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let (key, conn, _old) = join(&m, hello("api", "a1", "10.0.0.2:80", &[], 0)).await;
        until_api(&mut web, &["10.0.0.2:80"]).await;
        m.disconnect(key, conn).await;
        let (_, _, _new) = join(&m, hello("api", "a1", "10.0.0.2:80", &[], 7)).await;
        tokio::time::sleep(GRACE * 2).await;
        // The old stream's grace timer removed nothing: still listed (the
        // latest snapshot has it, or waiting for one times out).
        until_api(&mut web, &["10.0.0.2:80"]).await;
        assert!(m.status().iter().any(|s| s.instance == "a1" && s.connected));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_proxy_is_out_at_once_and_stays_out() {
        let m = mesh().await;
        let (_, _, mut web) = join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let (key, conn, _api) = join(&m, hello("api", "a1", "10.0.0.2:80", &[], 0)).await;
        let (_, _, _api2) = join(&m, hello("api", "a2", "10.0.0.3:80", &[], 0)).await;
        until_api(&mut web, &["10.0.0.2:80", "10.0.0.3:80"]).await;
        m.leave(&key, conn).await;
        until_api(&mut web, &["10.0.0.3:80"]).await;
        m.disconnect(key, conn).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        until_api(&mut web, &["10.0.0.3:80"]).await;
    }

    #[tokio::test(start_paused = true)]
    async fn during_warm_up_a_proxy_with_a_config_keeps_it() {
        let m = mesh().await;
        // A proxy that applied version 5000 from an earlier control plane.
        let (key, conn, mut old) =
            join(&m, hello("web", "w1", "10.0.0.1:80", &["api"], 5000)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(old.borrow().is_none(), "held during warm-up");
        // A new destination needs an answer now.
        m.subscribe(&key, conn, vec!["web".into()])
            .expect("subscribe");
        tokio::time::timeout(Duration::from_secs(5), old.changed())
            .await
            .expect("sent")
            .expect("open");
        let v = old.borrow().as_ref().map(|s| s.version).unwrap_or(0);
        assert!(v > 5000, "{v}");
        // Another one waits for the end of the warm-up.
        let (_, _, mut held) = join(&m, hello("web", "w2", "10.0.0.4:80", &["api"], 3)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(held.borrow().is_none());
        m.end_warmup();
        let v2 = until_api(&mut held, &[]).await;
        assert!(v2 > v, "{v2} after {v}");
    }

    #[tokio::test]
    async fn proxies_with_the_same_inputs_share_one_compile() {
        let m = mesh().await;
        let mut rxs = Vec::new();
        for i in 0..300 {
            let addr = format!("10.1.{}.{}:80", i / 250, i % 250);
            rxs.push(
                join(&m, hello("web", &format!("w{i}"), &addr, &["api"], 0))
                    .await
                    .2,
            );
        }
        for rx in &mut rxs {
            until_api(rx, &[]).await;
        }
        let s = m.push_status();
        // web's own endpoints changed with every join, but no snapshot of
        // this group lists web: one group, compiled once per config.
        assert!(s.compiles <= 2, "{s:?}");
        let versions: HashSet<u64> = rxs
            .iter()
            .map(|rx| rx.borrow().as_ref().map_or(0, |s| s.version))
            .collect();
        assert_eq!(versions.len(), 300, "every proxy its own version");
    }

    #[tokio::test]
    async fn versions_keep_rising_across_a_restart() {
        let kv: Arc<dyn Kv> = Arc::new(Memory::default());
        let first = mesh_on(kv.clone()).await;
        let (_, _, mut rx) = join(&first, hello("web", "w1", "10.0.0.1:80", &["api"], 0)).await;
        let before = until_api(&mut rx, &[]).await;
        let second = mesh_on(kv).await;
        let (_, _, mut rx) = join(&second, hello("web", "w2", "10.0.0.9:80", &["api"], 0)).await;
        second.end_warmup();
        let after = until_api(&mut rx, &[]).await;
        assert!(
            after > before + crate::versions::BLOCK - 1,
            "{after} after {before}"
        );
    }
}
