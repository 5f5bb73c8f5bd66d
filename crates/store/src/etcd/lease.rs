//! The replica's lease: what its registrations, its place in the replica
//! directory and its leadership hang on. Kept alive every third of its
//! time to live; when it is lost (etcd was out of reach for longer than
//! that), a new one is granted and everything hung on the old one is
//! written again by whoever follows [`Lease::id`].

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Etcd;

/// The lease's time to live, in seconds: how long a dead replica's
/// registrations outlive it (proxies reconnect to another replica, which
/// takes them over, well within it).
pub const LEASE_TTL: i64 = 10;

#[derive(Clone)]
pub struct Lease {
    id: watch::Receiver<i64>,
}

impl Lease {
    /// Grants the lease and keeps it alive until `stop`. Fails when etcd
    /// cannot be reached at all.
    pub async fn start(etcd: Etcd, mut stop: watch::Receiver<bool>) -> std::io::Result<Lease> {
        let first = etcd.grant(LEASE_TTL).await?;
        let (tx, id) = watch::channel(first);
        tokio::spawn(async move {
            let every = Duration::from_secs(LEASE_TTL as u64 / 3);
            let mut kept = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let current = *tx.borrow();
                let alive = if current == 0 {
                    Ok(0)
                } else {
                    etcd.keep_alive_once(current).await
                };
                match alive {
                    Ok(ttl) if ttl > 0 => kept = Instant::now(),
                    Ok(_) => {
                        if current != 0 {
                            tracing::warn!(
                                lease = current,
                                "etcd: the replica's lease expired; taking a new one"
                            );
                        }
                        match etcd.grant(LEASE_TTL).await {
                            Ok(new) => {
                                kept = Instant::now();
                                let _ = tx.send(new);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "etcd: cannot take a new lease");
                                let _ = tx.send(0);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd: cannot keep the replica's lease alive");
                        // Past its time to live it is surely gone.
                        if kept.elapsed() > Duration::from_secs(LEASE_TTL as u64) && current != 0 {
                            let _ = tx.send(0);
                        }
                    }
                }
            }
        });
        Ok(Lease { id })
    }

    /// The lease in force (0: none, etcd is out of reach), announced when
    /// it changes.
    pub fn id(&self) -> watch::Receiver<i64> {
        self.id.clone()
    }

    pub fn current(&self) -> i64 {
        *self.id.borrow()
    }
}
