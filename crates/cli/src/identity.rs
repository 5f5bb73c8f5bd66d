//! `tandem token ...` (offline, with the control plane's data directory)
//! and `tandem ca ...` (through the control plane's API).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tandem_identity::ca::Authority;
use tandem_identity::spiffe::{valid_label, SYSTEM_NAMESPACE};

use crate::api::{block_on, call_json, get_json, human, ApiArgs};

/// Longest lifetime of a reusable token: anyone who copies it can join
/// until it expires.
pub const MAX_REUSABLE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where the CA lives, for the commands that work on it offline: the
/// control plane's data directory, or the etcd its replicas share.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The control plane's data directory.
    #[arg(long, required_unless_present = "store")]
    data: Option<PathBuf>,
    /// The etcd the control-plane replicas share
    /// (`etcd://host:port[,host:port...][/prefix]`).
    #[arg(long, conflicts_with = "data")]
    store: Option<String>,
    /// TLS towards etcd: the CA of its members' certificates.
    #[arg(long, requires = "store")]
    etcd_ca: Option<PathBuf>,
    /// TLS towards etcd: a client certificate (PEM).
    #[arg(long, requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// TLS towards etcd: the key of --etcd-cert (PEM).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The key that seals the CA's private keys in the store (as given to
    /// `tandem control --seal-key`).
    #[arg(long)]
    seal_key: Option<PathBuf>,
}

impl StoreArgs {
    fn describe(&self) -> String {
        match (&self.store, &self.data) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d.display().to_string(),
            (None, None) => String::new(),
        }
    }

    /// The store, and whether a missing CA may be created in it (only in
    /// a data directory, as before the control plane first started).
    fn open(&self) -> anyhow::Result<(Box<dyn tandem_store::Kv>, bool)> {
        let (kv, create) = self.open_raw()?;
        let kv: std::sync::Arc<dyn tandem_store::Kv> = std::sync::Arc::from(kv);
        let sealed = match &self.seal_key {
            Some(f) => tandem_store::sealed::Sealed::open(kv, f)?,
            None => tandem_store::sealed::Sealed::clear(kv),
        };
        Ok((Box::new(sealed), create))
    }

    fn open_raw(&self) -> anyhow::Result<(Box<dyn tandem_store::Kv>, bool)> {
        if let Some(url) = &self.store {
            let url: tandem_store::etcd::EtcdUrl =
                url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let tls = self.etcd_ca.clone().map(|ca| tandem_store::etcd::EtcdTls {
                ca,
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
            let etcd = tandem_store::etcd::Etcd::new(&url, tls.as_ref())?;
            return Ok((Box::new(tandem_store::etcd::EtcdKv::new(etcd)), false));
        }
        let data = self
            .data
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--data or --store is needed"))?;
        Ok((Box::new(tandem_store::LocalDir::open(data)?), true))
    }
}

pub fn token_create(
    store: &StoreArgs,
    namespace: &str,
    service: &str,
    ttl: Duration,
    reusable: bool,
    json: bool,
) -> anyhow::Result<()> {
    for (what, v) in [("namespace", namespace), ("service", service)] {
        if !valid_label(v) {
            anyhow::bail!("`{v}` is not a valid {what} name (lower-case letters, digits and `-`)");
        }
    }
    if namespace == SYSTEM_NAMESPACE {
        anyhow::bail!("namespace `{SYSTEM_NAMESPACE}` is reserved for the mesh itself");
    }
    if ttl.is_zero() {
        anyhow::bail!("--ttl must be more than zero");
    }
    if reusable && ttl > MAX_REUSABLE_TTL {
        anyhow::bail!(
            "a reusable token lives at most 24h (--ttl); for longer, mint one single-use token per proxy"
        );
    }
    let ca = block_on(async {
        let (kv, create) = store.open()?;
        Ok(if create {
            Authority::open(&*kv, None, None).await?
        } else {
            Authority::load(&*kv).await?
        })
    })
    .with_context(|| format!("certificate authority in {}", store.describe()))?;
    let (claims, token) = ca.mint_token(namespace, service, ttl, reusable)?;
    let kind = if reusable { "reusable" } else { "single-use" };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "token": token,
                "id": claims.id,
                "spiffe_id": format!("spiffe://{}/ns/{}/svc/{}", claims.td, claims.ns, claims.svc),
                "expires": claims.exp,
                "use": kind,
            }))?
        );
    } else {
        println!("{token}");
        let how = if reusable {
            "any number of proxies may bootstrap with it until it expires"
        } else {
            "one proxy bootstraps with it, once; it renews with its certificate afterwards"
        };
        eprintln!(
            "{kind} token {} for spiffe://{}/ns/{}/svc/{}, valid for {}: {how}",
            claims.id,
            claims.td,
            claims.ns,
            claims.svc,
            human(ttl.as_secs())
        );
    }
    Ok(())
}

pub fn token_revoke(store: &StoreArgs, id: &str) -> anyhow::Result<()> {
    block_on(async {
        let (kv, _) = store.open()?;
        // The CA must exist: a revocation in an empty directory would
        // revoke nothing anyone uses.
        Authority::load(&*kv).await?;
        Ok(Authority::revoke(&*kv, id).await?)
    })
    .with_context(|| format!("certificate authority in {}", store.describe()))?;
    eprintln!("token {id} revoked: proxies bootstrapped with it are expelled by the control plane within seconds, and neither it nor their certificates obtain new ones");
    Ok(())
}

pub fn ca_show(api: &ApiArgs, json: bool) -> anyhow::Result<()> {
    let api = &api.target()?;
    block_on(async {
        let v = get_json(api, "/api/v1/ca").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        println!("trust domain:  {}", s("trust_domain"));
        println!("signing root:  {}", s("signer"));
        let roots: Vec<String> = v["roots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect();
        println!("trust bundle:  {}", roots.join(", "));
        println!(
            "rotation:      {}",
            v["rotation"]["phase"].as_str().unwrap_or("idle")
        );
        Ok(())
    })
}

/// Starts a rotation and follows it until the new root signs.
pub fn ca_rotate(api: &ApiArgs, wait: bool) -> anyhow::Result<()> {
    let api = &api.target()?;
    block_on(async {
        let r = call_json(api, hyper::Method::POST, "/api/v1/ca/rotate").await?;
        let root = r["new_root"].as_str().unwrap_or("").to_string();
        println!("new root {root} added to the trust bundle; proxies are learning it");
        if !wait {
            return Ok(());
        }
        let end = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let v = get_json(api, "/api/v1/ca").await?;
            if v["signer"].as_str() == Some(root.as_str()) {
                println!("root {root} now signs; proxies renew under it. Retire the old root with `tandem ca retire` once `tandem status` shows every proxy signed by {root}.");
                return Ok(());
            }
            if tokio::time::Instant::now() > end {
                anyhow::bail!(
                    "the new root did not start signing within 2 minutes; see `tandem ca show`"
                );
            }
        }
    })
}

pub fn ca_retire(api: &ApiArgs, force: bool) -> anyhow::Result<()> {
    let api = &api.target()?;
    block_on(async {
        let path = if force {
            "/api/v1/ca/retire?force=true"
        } else {
            "/api/v1/ca/retire"
        };
        let v = call_json(api, hyper::Method::POST, path).await?;
        let retired: Vec<String> = v["retired"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect();
        if retired.is_empty() {
            println!("nothing to retire: the bundle holds only the signing root");
        } else {
            println!("retired: {}", retired.join(", "));
        }
        Ok(())
    })
}
