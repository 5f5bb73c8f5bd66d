//! Where the mesh's config comes from, and how its changes reach the mesh.
//! A [`ConfigSource`] yields whole config sets: the directory watcher
//! ([`crate::watch::DirSource`], GitOps) today; an API or a shared store
//! can yield them the same way. A set with problems is refused with its
//! `file:line:col` messages and the last good set stays in force.

use std::future::Future;
use std::sync::Arc;

use tandem_config::ResourceSet;

use crate::mesh::Mesh;

/// A change of config: a set to apply, or why one was refused.
pub type Change = Result<ResourceSet, Vec<String>>;

pub trait ConfigSource: Send + 'static {
    /// The next change, when there is one; `None` once the source ends.
    fn next(&mut self) -> impl Future<Output = Option<Change>> + Send;
}

/// Applies every change of `source` to `mesh`.
pub async fn follow(mut source: impl ConfigSource, mesh: Arc<Mesh>) {
    while let Some(change) = source.next().await {
        match change {
            Ok(set) => {
                tracing::info!(
                    services = set.services.len(),
                    routes = set.http_routes.len(),
                    "config reloaded"
                );
                mesh.set_config(set);
            }
            Err(problems) => {
                for m in &problems {
                    tracing::error!("config refused: {m}");
                }
                tracing::error!(
                    problems = problems.len(),
                    "config change refused; the last good config stays in force"
                );
                mesh.config_refused(problems);
            }
        }
    }
    tracing::error!("config source ended; the config in force stays");
}

/// Where config pushed through the API lives in the store.
pub const PUSHED_KEY: &str = "config/pushed.json";
/// How often a replica looks for config pushed through another one.
const POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A whole config set as pushed (`tandem apply`): file name → content.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Pushed {
    pub files: std::collections::BTreeMap<String, String>,
}

impl Pushed {
    pub fn load(&self) -> Result<ResourceSet, Vec<String>> {
        tandem_config::load_files(self.files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
            .map_err(|diags| diags.iter().map(|d| d.to_string()).collect())
    }
}

/// Config pushed through the API into a store the replicas share: every
/// replica follows the one key, so a push through any of them reaches
/// the proxies of all.
pub struct StoreSource {
    kv: Arc<dyn tandem_store::Kv>,
    last: Option<Vec<u8>>,
}

impl StoreSource {
    /// The source and the config in force (empty until the first push).
    pub async fn open(
        kv: Arc<dyn tandem_store::Kv>,
    ) -> std::io::Result<(StoreSource, ResourceSet)> {
        let current = kv.get(PUSHED_KEY).await?.map(|v| v.value);
        let set = match &current {
            None => ResourceSet::default(),
            Some(bytes) => match parse(bytes) {
                Ok(set) => set,
                Err(problems) => {
                    for p in &problems {
                        tracing::error!("stored config refused: {p}");
                    }
                    ResourceSet::default()
                }
            },
        };
        Ok((StoreSource { kv, last: current }, set))
    }
}

fn parse(bytes: &[u8]) -> Change {
    let pushed: Pushed =
        serde_json::from_slice(bytes).map_err(|e| vec![format!("{PUSHED_KEY}: {e}")])?;
    pushed.load()
}

impl ConfigSource for StoreSource {
    async fn next(&mut self) -> Option<Change> {
        loop {
            tokio::time::sleep(POLL).await;
            match self.kv.get(PUSHED_KEY).await {
                Ok(Some(v)) if self.last.as_ref() != Some(&v.value) => {
                    let change = parse(&v.value);
                    self.last = Some(v.value);
                    return Some(change);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the pushed config"),
            }
        }
    }
}
