//! The control plane's live state: the last good config, the registry of
//! connected proxies, and the snapshot each was sent. Any change (config
//! reload, a proxy joining or leaving, a new subscription) recompiles the
//! snapshot of every proxy it could affect and pushes those that changed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tandem_api::v1::{Certificate, Hello, Snapshot as WireSnapshot};
use tandem_config::compile::{compile, Target};
use tandem_config::snapshot::{Endpoint, Trust};
use tandem_config::ResourceSet;
use tokio::sync::watch;

use crate::storage::Storage;

/// Versions are handed out in blocks; only the block boundary is stored.
const VERSION_BLOCK: u64 = 1000;
const VERSION_KEY: &str = "snapshot-version-floor";

pub type ProxyKey = (String, String, String); // namespace, service, instance

pub struct Mesh {
    inner: Mutex<Inner>,
    storage: Arc<dyn Storage>,
    pub grace: Duration,
    /// Set from start until the warm-up period is over: proxies that
    /// already run a config (they reconnect after a control-plane restart)
    /// keep it until the registry has had time to fill again, instead of
    /// getting snapshots that lack the endpoints of proxies not back yet.
    warming: std::sync::atomic::AtomicBool,
    /// One push at a time, through the storing of the version floor, so no
    /// version is handed out above the floor on disk.
    push_lock: tokio::sync::Mutex<()>,
}

struct Inner {
    config: Arc<ResourceSet>,
    config_generation: u64,
    config_errors: Vec<String>,
    proxies: HashMap<ProxyKey, ProxyEntry>,
    next_version: u64,
    version_ceiling: u64,
    next_conn: u64,
    /// The trust bundle every snapshot carries, and a counter of its changes.
    trust: Option<Trust>,
    trust_generation: u64,
}

/// The newest snapshot for one proxy. A slow proxy skips intermediate
/// versions instead of queueing them, and versions arrive in order.
pub type SnapshotTx = watch::Sender<Option<WireSnapshot>>;

struct ProxyEntry {
    hello: Hello,
    conn: u64,
    tx: Option<SnapshotTx>,
    /// Said it is shutting down: no longer an endpoint.
    leaving: bool,
    /// Reconnected during warm-up with a config of its own: it keeps that
    /// config until the warm-up ends or it asks for something new.
    held: bool,
    interest: BTreeSet<String>,
    last_body: Vec<u8>,
    sent_version: u64,
    acked_version: u64,
    nack: Option<String>,
    /// Trust generation in the last snapshot sent, and in the last one acked.
    trust_sent: u64,
    trust_acked: u64,
    certificate: Option<Certificate>,
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

impl Mesh {
    pub async fn new(
        config: ResourceSet,
        storage: Arc<dyn Storage>,
        grace: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let floor = match storage.get(VERSION_KEY).await? {
            Some(v) => String::from_utf8_lossy(&v)
                .trim()
                .parse::<u64>()
                .unwrap_or(0),
            None => 0,
        };
        let ceiling = floor + VERSION_BLOCK;
        storage
            .put(VERSION_KEY, ceiling.to_string().as_bytes())
            .await?;
        Ok(Arc::new(Mesh {
            inner: Mutex::new(Inner {
                config: Arc::new(config),
                config_generation: 1,
                config_errors: Vec::new(),
                proxies: HashMap::new(),
                next_version: floor + 1,
                version_ceiling: ceiling,
                next_conn: 1,
                trust: None,
                trust_generation: 0,
            }),
            storage,
            grace,
            warming: std::sync::atomic::AtomicBool::new(true),
            push_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Ends the warm-up period: every proxy gets its current snapshot.
    pub async fn end_warmup(self: &Arc<Self>) {
        self.warming
            .store(false, std::sync::atomic::Ordering::Relaxed);
        for p in self.lock().proxies.values_mut() {
            p.held = false;
        }
        tracing::info!("warm-up over; pushing to every proxy");
        self.push_all().await;
    }

    /// Swaps in a new, validated config and pushes what changed.
    pub async fn set_config(self: &Arc<Self>, config: ResourceSet) {
        {
            let mut g = self.lock();
            g.config = Arc::new(config);
            g.config_generation += 1;
            g.config_errors.clear();
        }
        self.push_all().await;
    }

    /// Records a refused config change; the last good config stays.
    pub fn config_refused(&self, errors: Vec<String>) {
        self.lock().config_errors = errors;
    }

    pub fn config_status(&self) -> ConfigStatus {
        let g = self.lock();
        ConfigStatus {
            generation: g.config_generation,
            services: g.config.services.len(),
            http_routes: g.config.http_routes.len(),
            errors: g.config_errors.clone(),
        }
    }

    /// Registers a proxy's stream; returns its connection id. The first
    /// snapshot is pushed right away.
    pub async fn connect(self: &Arc<Self>, hello: Hello, tx: SnapshotTx) -> (ProxyKey, u64) {
        let key = (
            hello.namespace.clone(),
            hello.service.clone(),
            hello.instance.clone(),
        );
        let conn = {
            let mut g = self.lock();
            let conn = g.next_conn;
            g.next_conn += 1;
            // A proxy that has applied a version from an earlier control
            // plane life must only ever see higher ones.
            if hello.applied_version >= g.next_version {
                g.next_version = hello.applied_version + 1;
                // push_all reserves (and stores) the new floor above it.
            }
            let interest = hello.interest.iter().cloned().collect();
            let held = hello.applied_version > 0
                && self.warming.load(std::sync::atomic::Ordering::Relaxed);
            let certificate = hello
                .certificate
                .clone()
                .filter(|c| !c.spiffe_id.is_empty());
            g.proxies.insert(
                key.clone(),
                ProxyEntry {
                    hello,
                    conn,
                    tx: Some(tx),
                    leaving: false,
                    held,
                    interest,
                    last_body: Vec::new(),
                    sent_version: 0,
                    acked_version: 0,
                    nack: None,
                    trust_sent: 0,
                    trust_acked: 0,
                    certificate,
                },
            );
            conn
        };
        tracing::info!(namespace = %key.0, service = %key.1, instance = %key.2, "proxy connected");
        // Its arrival changes the endpoints of its own service, which other
        // proxies may route to.
        self.push_all().await;
        (key, conn)
    }

    pub fn ack(&self, key: &ProxyKey, conn: u64, version: u64) {
        let mut g = self.lock();
        if let Some(p) = g.proxies.get_mut(key).filter(|p| p.conn == conn) {
            p.acked_version = p.acked_version.max(version);
            if version == p.sent_version {
                p.nack = None;
                p.trust_acked = p.trust_sent;
            }
        }
    }

    pub fn nack(&self, key: &ProxyKey, conn: u64, version: u64, reason: String) {
        tracing::warn!(service = %key.1, instance = %key.2, version, %reason, "proxy refused snapshot");
        let mut g = self.lock();
        if let Some(p) = g.proxies.get_mut(key).filter(|p| p.conn == conn) {
            p.nack = Some(reason);
        }
    }

    /// The proxy is shutting down: remove it as an endpoint at once.
    pub async fn leave(self: &Arc<Self>, key: &ProxyKey, conn: u64) {
        {
            let mut g = self.lock();
            let Some(p) = g.proxies.get_mut(key).filter(|p| p.conn == conn) else {
                return;
            };
            p.leaving = true;
        }
        tracing::info!(service = %key.1, instance = %key.2, "proxy leaving");
        self.push_all().await;
    }

    pub async fn subscribe(self: &Arc<Self>, key: &ProxyKey, conn: u64, names: Vec<String>) {
        {
            let mut g = self.lock();
            let Some(p) = g.proxies.get_mut(key).filter(|p| p.conn == conn) else {
                return;
            };
            // A proxy re-sends subscriptions it queued while disconnected;
            // names its hello already listed change nothing.
            let before = p.interest.len();
            p.interest.extend(names);
            if p.interest.len() == before {
                return;
            }
            // A new destination needs an answer now, even if not every peer
            // is back yet.
            p.held = false;
        }
        self.push_all().await;
    }

    /// The stream ended. The instance stays an endpoint for the grace
    /// period (a quick reconnect must not flap traffic), then is removed.
    pub async fn disconnect(self: &Arc<Self>, key: ProxyKey, conn: u64) {
        {
            let mut g = self.lock();
            let Some(p) = g.proxies.get_mut(&key).filter(|p| p.conn == conn) else {
                return;
            };
            p.tx = None;
        }
        tracing::info!(service = %key.1, instance = %key.2, grace = ?self.grace, "proxy disconnected");
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.grace).await;
            let removed = {
                let mut g = me.lock();
                let stale = g
                    .proxies
                    .get(&key)
                    .is_some_and(|p| p.conn == conn && p.tx.is_none());
                if stale {
                    g.proxies.remove(&key);
                }
                stale
            };
            if removed {
                tracing::info!(service = %key.1, instance = %key.2, "proxy removed from registry");
                me.push_all().await;
            }
        });
    }

    /// Recompiles every connected proxy's snapshot and sends those that
    /// changed. Sending happens under the lock, so versions reach each proxy
    /// in order.
    pub async fn push_all(self: &Arc<Self>) {
        let _serial = self.push_lock.lock().await;
        // Reserve the versions this round may use before handing any out, so
        // the stored floor is always above every version issued.
        let reserve = {
            let mut g = self.lock();
            let needed = g.next_version + g.proxies.len() as u64;
            if needed > g.version_ceiling {
                g.version_ceiling = needed + VERSION_BLOCK;
                Some(g.version_ceiling)
            } else {
                None
            }
        };
        if let Some(ceiling) = reserve {
            if let Err(e) = self
                .storage
                .put(VERSION_KEY, ceiling.to_string().as_bytes())
                .await
            {
                tracing::error!(error = %e, "cannot persist snapshot version floor");
            }
        }
        let mut g = self.lock();
        let config = g.config.clone();
        let endpoints = endpoint_table(&g.proxies);
        let lookup = |ns: &str, name: &str| -> Vec<Endpoint> {
            endpoints
                .get(&(ns.to_string(), name.to_string()))
                .cloned()
                .unwrap_or_default()
        };
        let keys: Vec<ProxyKey> = g.proxies.keys().cloned().collect();
        let (trust, trust_generation) = (g.trust.clone(), g.trust_generation);
        for key in keys {
            let body = {
                let Some(p) = g.proxies.get(&key) else {
                    continue;
                };
                if p.tx.is_none() || p.held {
                    continue;
                }
                let target = Target {
                    namespace: &p.hello.namespace,
                    service: &p.hello.service,
                    interest: &p.interest,
                };
                let mut snapshot = compile(&config, &target, &lookup);
                snapshot.trust = trust.clone();
                snapshot.to_json()
            };
            if g.proxies.get(&key).is_none_or(|p| p.last_body == body) {
                continue;
            }
            let version = g.next_version;
            g.next_version += 1;
            if let Some(p) = g.proxies.get_mut(&key) {
                p.sent_version = version;
                p.trust_sent = trust_generation;
                if let Some(tx) = &p.tx {
                    tx.send_replace(Some(WireSnapshot {
                        version,
                        body: body.clone(),
                    }));
                }
                p.last_body = body;
            }
        }
    }

    pub fn status(&self) -> Vec<ProxyStatus> {
        let g = self.lock();
        let mut out: Vec<ProxyStatus> = g
            .proxies
            .values()
            .map(|p| ProxyStatus {
                namespace: p.hello.namespace.clone(),
                service: p.hello.service.clone(),
                instance: p.hello.instance.clone(),
                inbound: p.hello.inbound_addr.clone(),
                admin: p.hello.admin_addr.clone(),
                http_proxy: p.hello.http_proxy_addr.clone(),
                config_version: p.sent_version,
                acked_version: p.acked_version,
                config_acked: p.sent_version > 0 && p.acked_version == p.sent_version,
                nack_reason: p.nack.clone(),
                connected: p.tx.is_some(),
                proxy_version: p.hello.proxy_version.clone(),
                spiffe_id: p.certificate.as_ref().map(|c| c.spiffe_id.clone()),
                cert_not_after: p.certificate.as_ref().map(|c| c.not_after),
                cert_signer: p.certificate.as_ref().map(|c| c.signer.clone()),
                cert_serial: p.certificate.as_ref().map(|c| c.serial.clone()),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.namespace, &a.service, &a.instance).cmp(&(&b.namespace, &b.service, &b.instance))
        });
        out
    }

    /// Sets the trust bundle carried by every snapshot and pushes it;
    /// returns its generation.
    pub async fn set_trust(self: &Arc<Self>, trust: Trust) -> u64 {
        let generation = {
            let mut g = self.lock();
            if g.trust.as_ref() == Some(&trust) {
                return g.trust_generation;
            }
            g.trust = Some(trust);
            g.trust_generation += 1;
            g.trust_generation
        };
        self.push_all().await;
        generation
    }

    /// Connected proxies that have not yet acknowledged a snapshot with
    /// trust generation `generation` (or a later one).
    pub fn trust_pending(&self, generation: u64) -> Vec<String> {
        let g = self.lock();
        g.proxies
            .iter()
            .filter(|(_, p)| p.tx.is_some() && !p.leaving && p.trust_acked < generation)
            .map(|((ns, svc, inst), _)| format!("{ns}/{svc}/{inst}"))
            .collect()
    }

    /// Records a certificate issued to (or reported by) a proxy.
    pub fn set_certificate(&self, namespace: &str, service: &str, instance: &str, c: Certificate) {
        let mut g = self.lock();
        let key = (
            namespace.to_string(),
            service.to_string(),
            instance.to_string(),
        );
        if let Some(p) = g.proxies.get_mut(&key) {
            p.certificate = Some(c);
        }
    }

    /// Connected proxies whose certificate was signed by one of `roots`.
    pub fn certificates_signed_by(&self, roots: &[String]) -> Vec<String> {
        let g = self.lock();
        g.proxies
            .iter()
            .filter(|(_, p)| p.tx.is_some())
            .filter(|(_, p)| {
                p.certificate
                    .as_ref()
                    .is_some_and(|c| roots.contains(&c.signer))
            })
            .map(|((ns, svc, inst), _)| format!("{ns}/{svc}/{inst}"))
            .collect()
    }

    /// Admin addresses of connected proxies, for stats collection.
    pub fn admin_targets(&self) -> Vec<(ProxyKey, String)> {
        let g = self.lock();
        g.proxies
            .iter()
            .filter(|(_, p)| p.tx.is_some() && !p.hello.admin_addr.is_empty())
            .map(|(k, p)| (k.clone(), p.hello.admin_addr.clone()))
            .collect()
    }
}

fn endpoint_table(
    proxies: &HashMap<ProxyKey, ProxyEntry>,
) -> HashMap<(String, String), Vec<Endpoint>> {
    // An address registered by proxies of two services: a connected proxy
    // wins over one in its disconnect grace period (its port was reused).
    let mut live_owner: HashMap<&str, (&str, &str)> = HashMap::new();
    for ((ns, svc, _), p) in proxies {
        if p.tx.is_some() && !p.leaving && !p.hello.inbound_addr.is_empty() {
            live_owner.insert(p.hello.inbound_addr.as_str(), (ns.as_str(), svc.as_str()));
        }
    }
    let mut table: HashMap<(String, String), Vec<Endpoint>> = HashMap::new();
    for ((ns, svc, instance), p) in proxies {
        if p.hello.inbound_addr.is_empty() || p.leaving {
            continue;
        }
        if p.tx.is_none() {
            if let Some(owner) = live_owner.get(p.hello.inbound_addr.as_str()) {
                if *owner != (ns.as_str(), svc.as_str()) {
                    continue;
                }
            }
        }
        table
            .entry((ns.clone(), svc.clone()))
            .or_default()
            .push(Endpoint {
                address: p.hello.inbound_addr.clone(),
                instance: instance.clone(),
                meshed: true,
            });
    }
    table
}
