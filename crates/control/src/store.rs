//! Where the control plane keeps its state: its data directory (one
//! control plane alone), or etcd shared by replicas (`--store etcd://`).
//! Either way the rest of the control plane sees the same seams: a
//! [`Kv`], a [`RegistryStore`] and a [`Leadership`].

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use tandem_store::etcd::{
    Election, Etcd, EtcdKv, EtcdRegistry, EtcdTls, EtcdUrl, Leadership, Lease, MemberStatus,
    ReplicaInfo, Replicas,
};
use tandem_store::sealed::Sealed;
use tandem_store::{Kv, LocalDir, MemoryRegistry, RegistryStore};
use tokio::sync::watch;

/// Which store.
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// The data directory; the registry in the process.
    #[default]
    Local,
    /// etcd, shared by every replica pointed at the same URL.
    Etcd { url: EtcdUrl, tls: Option<EtcdTls> },
}

pub(crate) struct Stores {
    pub kv: Arc<dyn Kv>,
    pub registry: Arc<dyn RegistryStore>,
    pub leadership: Leadership,
    pub shared: Option<Arc<Shared>>,
}

/// What replicas sharing etcd know of each other and of the store.
pub struct Shared {
    pub name: String,
    etcd: Etcd,
    replicas: Replicas,
}

/// `tandem status`'s view of the store.
#[derive(Debug, Serialize)]
pub struct StoreStatus {
    pub kind: &'static str,
    /// The URL (etcd) or the data directory.
    pub location: String,
    /// This replica's name.
    pub replica: String,
    /// The replica that runs the work done once (rollouts, rotation).
    pub leader: Option<String>,
    pub replicas: Vec<ReplicaInfo>,
    pub members: Vec<MemberStatus>,
    /// Why the store could not be read, when it could not.
    pub error: Option<String>,
}

impl Shared {
    /// The other live replicas: name and API address.
    pub async fn peers(&self) -> std::io::Result<Vec<(String, String)>> {
        Ok(self
            .replicas
            .list()
            .await?
            .into_iter()
            .filter(|r| r.name != self.name)
            .map(|r| (r.name, r.api))
            .collect())
    }

    pub async fn status(&self) -> StoreStatus {
        let (leader, replicas) = tokio::join!(Election::leader(&self.etcd), self.replicas.list());
        let error = match (&leader, &replicas) {
            (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
            _ => None,
        };
        StoreStatus {
            kind: "etcd",
            location: self.etcd.url().to_string(),
            replica: self.name.clone(),
            leader: leader.ok().flatten(),
            replicas: replicas.unwrap_or_default(),
            members: self.etcd.members().await,
            error,
        }
    }
}

/// The store with the CA's private keys sealed by `--seal-key` (or
/// refused clearly when they are sealed and no key is given).
fn sealed(kv: Arc<dyn Kv>, cfg: &crate::ControlConfig) -> anyhow::Result<Arc<dyn Kv>> {
    Ok(match &cfg.seal_key {
        Some(file) => Arc::new(Sealed::open(kv, file)?),
        None => Arc::new(Sealed::clear(kv)),
    })
}

impl Stores {
    /// Opens the store; with etcd, takes the replica's lease and starts
    /// following the registry and campaigning for leadership until `stop`.
    pub async fn open(
        cfg: &crate::ControlConfig,
        name: &str,
        dir: LocalDir,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Stores> {
        match &cfg.store {
            StoreConfig::Local => Ok(Stores {
                kv: sealed(Arc::new(dir), cfg)?,
                registry: Arc::new(MemoryRegistry::default()),
                leadership: Leadership::always(),
                shared: None,
            }),
            StoreConfig::Etcd { url, tls } => {
                let etcd = Etcd::new(url, tls.as_ref()).context("etcd")?;
                let lease = Lease::start(etcd.clone(), stop.clone())
                    .await
                    .with_context(|| format!("cannot reach the store at {url}"))?;
                let registry = EtcdRegistry::start(etcd.clone(), lease.clone(), stop.clone());
                let leadership =
                    Election::start(etcd.clone(), lease.clone(), name.to_string(), stop.clone());
                let replicas = Replicas::start(
                    etcd.clone(),
                    lease,
                    ReplicaInfo {
                        name: name.to_string(),
                        grpc: cfg
                            .advertise
                            .clone()
                            .unwrap_or_else(|| cfg.listen.to_string()),
                        api: cfg.api.to_string(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        started: tandem_identity::ca::unix_now(),
                    },
                    stop,
                );
                tracing::info!(store = %url, replica = %name, "state in etcd, shared with the other replicas");
                Ok(Stores {
                    kv: sealed(Arc::new(EtcdKv::new(etcd.clone())), cfg)?,
                    registry: Arc::new(registry),
                    leadership,
                    shared: Some(Arc::new(Shared {
                        name: name.to_string(),
                        etcd,
                        replicas,
                    })),
                })
            }
        }
    }
}
