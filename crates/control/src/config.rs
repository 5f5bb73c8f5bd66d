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
