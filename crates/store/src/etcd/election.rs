//! Leader election among the replicas: the leader is the replica whose
//! name `<prefix>/leader` holds, written under its lease. Work that must
//! happen once per mesh (rollout steps, root rotation steps) runs on the
//! leader only. A leader that dies loses the key with its lease; one that
//! stops resigns at once.
//!
//! Two leaders at once is possible for a moment (an old leader cut off
//! from etcd learns it is no longer one only when its lease is past);
//! the work it gates writes with compare-and-swap, so the second writer's
//! step is refused, not doubled.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::client::When;
use super::pb::etcdserverpb as rpc;
use super::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use super::{Etcd, Lease, LEASE_TTL};

const KEY: &str = "leader";
/// How often a replica checks (or tries to take) the leadership.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);

/// Whether this replica leads.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    _sender: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A control plane alone on its store always leads.
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        Leadership {
            rx,
            _sender: Some(Arc::new(tx)),
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this replica leads.
    pub async fn until_leader(&mut self) {
        let _ = self.rx.wait_for(|l| *l).await;
    }

    /// Announced on every change.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

pub struct Election;

impl Election {
    /// Campaigns for `me` until `stop`, then resigns.
    pub fn start(
        etcd: Etcd,
        lease: Lease,
        me: String,
        mut stop: watch::Receiver<bool>,
    ) -> Leadership {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut lease_ids = lease.id();
            let mut confirmed = Instant::now();
            loop {
                let id = lease.current();
                let leads = if id == 0 {
                    Ok(false)
                } else {
                    campaign(&etcd, &me, id).await
                };
                match leads {
                    Ok(l) => {
                        confirmed = Instant::now();
                        if l != *tx.borrow() {
                            tracing::info!(replica = %me, leader = l, "leader election");
                            let _ = tx.send(l);
                        }
                    }
                    Err(e) => {
                        // Unconfirmed for half the lease: step down before
                        // the lease (and the key) can have expired.
                        if *tx.borrow()
                            && confirmed.elapsed() > Duration::from_secs(LEASE_TTL as u64 / 2)
                        {
                            tracing::warn!(error = %e, "leader election: etcd out of reach; stepping down");
                            let _ = tx.send(false);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
                    _ = lease_ids.changed() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            if *tx.borrow() {
                let _ = tx.send(false);
                if let Err(e) = resign(&etcd, &me).await {
                    tracing::warn!(error = %e, "leader election: cannot resign");
                }
            }
        });
        Leadership { rx, _sender: None }
    }

    /// The leading replica's name, if any.
    pub async fn leader(etcd: &Etcd) -> io::Result<Option<String>> {
        let (_, kvs) = etcd.range(etcd.key(KEY), false).await?;
        Ok(kvs
            .into_iter()
            .next()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

/// Takes the key if nobody holds it; whether `me` holds it (under `lease`)
/// now.
async fn campaign(etcd: &Etcd, me: &str, lease: i64) -> io::Result<bool> {
    let key = etcd.key(KEY);
    let req = rpc::TxnRequest {
        compare: vec![rpc::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.clone(),
            target_union: Some(TargetUnion::CreateRevision(0)),
        }],
        success: vec![rpc::RequestOp {
            request: Some(rpc::request_op::Request::RequestPut(rpc::PutRequest {
                key: key.clone(),
                value: me.as_bytes().to_vec(),
                lease,
                prev_kv: false,
            })),
        }],
        failure: vec![rpc::RequestOp {
            request: Some(rpc::request_op::Request::RequestRange(rpc::RangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }],
    };
    let resp = etcd.txn(req).await?;
    if resp.succeeded {
        return Ok(true);
    }
    let holder = resp.responses.into_iter().find_map(|r| match r.response {
        Some(rpc::response_op::Response::ResponseRange(r)) => r.kvs.into_iter().next(),
        _ => None,
    });
    match holder {
        Some(kv) if kv.value == me.as_bytes() && kv.lease == lease => Ok(true),
        // Ours under a lease we lost: hang it on the new one.
        Some(kv) if kv.value == me.as_bytes() => Ok(etcd
            .put_when(key, When::ModRevision(kv.mod_revision), kv.value, lease)
            .await?
            .is_some()),
        _ => Ok(false),
    }
}

async fn resign(etcd: &Etcd, me: &str) -> io::Result<()> {
    let key = etcd.key(KEY);
    let (_, kvs) = etcd.range(key.clone(), false).await?;
    if let Some(kv) = kvs.into_iter().find(|kv| kv.value == me.as_bytes()) {
        etcd.delete_when(key, When::ModRevision(kv.mod_revision))
            .await?;
    }
    Ok(())
}
