//! Clusters: what this cluster exports to others, and what it imports
//! from them.
//!
//! - **Export**: `GET /api/v1/exports` lists the live endpoints of every
//!   Service with `export: true` (this cluster's own, never what it
//!   imported), with their zones. Another cluster reads it with the export
//!   credential (`<data>/export.token`), which allows nothing else.
//! - **Import**: for each `RemoteCluster` of the config, [`follow`] reads
//!   that cluster's exports every second (its API addresses in turn) and
//!   hands their endpoints, marked with the cluster's name, to the mesh.
//!   Proxies use them only when no endpoint of their own cluster is left
//!   (`crate::registry`, the proxy's balancer). When a remote cluster does
//!   not answer, its last endpoints stay (its sidecars may well be up) and
//!   the status says since when.
//!
//! Hops to another cluster go straight to its sidecars' advertised
//! addresses (the networks must route to each other), as mTLS between
//! identities of one trust domain: the clusters share a root CA.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tandem_config::snapshot::Endpoint;
use tandem_runtime::sync::Mutex;

use crate::mesh::Mesh;
use crate::registry::ServiceKey;

/// The key of the export credential in the store.
pub const EXPORT_CREDENTIAL: &str = "export.token";
/// How often remote clusters are read.
const EVERY: Duration = Duration::from_secs(1);

/// What a cluster exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Exports {
    /// The exporting cluster's own name (`--cluster`).
    pub cluster: String,
    pub services: Vec<ExportedService>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedService {
    pub namespace: String,
    pub service: String,
    pub endpoints: Vec<ExportedEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedEndpoint {
    pub address: String,
    pub instance: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

/// This cluster's exports, from the config and the live endpoints.
pub fn exports(mesh: &Mesh) -> Exports {
    let config = mesh.config();
    let services = config
        .services
        .iter()
        .filter(|s| s.spec.export)
        .map(|s| ExportedService {
            namespace: s.namespace.clone(),
            service: s.name.clone(),
            endpoints: mesh
                .local_endpoints(&s.namespace, &s.name)
                .into_iter()
                .filter(|e| e.meshed)
                .map(|e| ExportedEndpoint {
                    address: e.address,
                    instance: e.instance,
                    zone: e.zone,
                })
                .collect(),
        })
        .collect();
    Exports {
        cluster: mesh.cluster().to_string(),
        services,
    }
}

/// One remote cluster, as `tandem status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RemoteStatus {
    pub name: String,
    /// The API address that answered last.
    pub api: String,
    /// What it exports: `namespace/service` and its endpoint count.
    pub services: Vec<(String, usize)>,
    /// Unix seconds of the last good read (0: never).
    pub fetched: u64,
    /// Why the last read failed.
    pub error: Option<String>,
}

#[derive(Default)]
pub struct Remotes {
    /// By cluster name: the last exports read, and the status.
    state: Mutex<BTreeMap<String, (Exports, RemoteStatus)>>,
}

impl Remotes {
    pub fn status(&self) -> Vec<RemoteStatus> {
        self.state.lock().values().map(|(_, s)| s.clone()).collect()
    }

    /// Reads every remote cluster of the config, for good.
    pub async fn follow(self: Arc<Self>, mesh: Arc<Mesh>) {
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        loop {
            let config = mesh.config();
            let mut seen = Vec::new();
            for rc in &config.remote_clusters {
                seen.push(rc.name.clone());
                let addrs: Vec<String> = rc.spec.api.iter().map(|a| a.value.clone()).collect();
                let result = if rc.name == mesh.cluster() {
                    Err(format!(
                        "`{}` is this cluster's own name (--cluster); each cluster needs its own",
                        rc.name
                    ))
                } else {
                    read(&client, &addrs, &rc.spec.credential_file.value, &rc.name).await
                };
                let mut st = self.state.lock();
                let entry = st.entry(rc.name.clone()).or_insert_with(|| {
                    (
                        Exports::default(),
                        RemoteStatus {
                            name: rc.name.clone(),
                            ..RemoteStatus::default()
                        },
                    )
                });
                match result {
                    Ok((api, exports)) => {
                        entry.1.api = api;
                        entry.1.fetched = tandem_identity::ca::unix_now();
                        entry.1.error = None;
                        entry.1.services = exports
                            .services
                            .iter()
                            .map(|s| (format!("{}/{}", s.namespace, s.service), s.endpoints.len()))
                            .collect();
                        entry.0 = exports;
                    }
                    Err(e) => {
                        if entry.1.error.as_deref() != Some(e.as_str()) {
                            tracing::warn!(cluster = %rc.name, error = %e, "cannot read the remote cluster's exports; its last endpoints stay");
                        }
                        entry.1.error = Some(e);
                    }
                }
            }
            let endpoints = {
                let mut st = self.state.lock();
                st.retain(|name, _| seen.contains(name));
                imported(&st)
            };
            mesh.set_remote(endpoints);
            tokio::time::sleep(EVERY).await;
        }
    }
}

/// Every remote cluster's endpoints by service, each marked with its
/// cluster.
fn imported(st: &BTreeMap<String, (Exports, RemoteStatus)>) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
    let mut out: BTreeMap<ServiceKey, Vec<Endpoint>> = BTreeMap::new();
    for (cluster, (exports, _)) in st {
        for s in &exports.services {
            let eps = out
                .entry((s.namespace.clone(), s.service.clone()))
                .or_default();
            eps.extend(s.endpoints.iter().map(|e| Endpoint {
                address: e.address.clone(),
                instance: e.instance.clone(),
                meshed: true,
                cluster: cluster.clone(),
                zone: e.zone.clone(),
            }));
        }
    }
    for eps in out.values_mut() {
        eps.sort();
    }
    out
}

/// Reads one remote cluster's exports from the first of `addrs` that
/// answers.
async fn read(
    client: &Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    addrs: &[String],
    credential_file: &str,
    name: &str,
) -> Result<(String, Exports), String> {
    let credential = std::fs::read_to_string(credential_file)
        .map_err(|e| format!("credential file {credential_file}: {e}"))?;
    let credential = credential.trim();
    let mut errors = Vec::new();
    for addr in addrs {
        let req = hyper::Request::get(format!("http://{addr}/api/v1/exports"))
            .header(hyper::header::HOST, addr.as_str())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {credential}"))
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            serde_json::from_slice::<Exports>(&body).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer in 2s".into()));
        match answer {
            Ok(e) if !e.cluster.is_empty() && e.cluster != name => {
                return Err(format!(
                    "{addr} is a control plane of cluster `{}`, not `{name}`",
                    e.cluster
                ))
            }
            Ok(e) => return Ok((addr.clone(), e)),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imported_endpoints_carry_their_cluster() {
        let mut st = BTreeMap::new();
        st.insert(
            "west".to_string(),
            (
                Exports {
                    cluster: "west".into(),
                    services: vec![ExportedService {
                        namespace: "default".into(),
                        service: "payments".into(),
                        endpoints: vec![ExportedEndpoint {
                            address: "10.1.0.5:8443".into(),
                            instance: "p1".into(),
                            zone: "w1".into(),
                        }],
                    }],
                },
                RemoteStatus::default(),
            ),
        );
        let got = imported(&st);
        let eps = &got[&("default".to_string(), "payments".to_string())];
        assert_eq!(eps.len(), 1);
        assert_eq!(
            (eps[0].cluster.as_str(), eps[0].zone.as_str()),
            ("west", "w1")
        );
        assert!(eps[0].meshed);
    }
}
