//! Following the keys under a prefix: read them all, then watch from the
//! revision read; after any break (a member died, etcd was out of reach)
//! read them all again, so nothing missed in between is lost.

use std::io;
use std::time::Duration;

use tokio::sync::watch;

use super::pb::mvccpb::{event::EventType, KeyValue};
use super::Etcd;

pub(crate) enum Update {
    /// Every key under the prefix, as of now.
    Reset(Vec<KeyValue>),
    Put(KeyValue),
    /// The key (its value is empty).
    Delete(KeyValue),
}

/// Calls `apply` with every update of the keys under `under` until `stop`.
pub(crate) async fn follow(
    etcd: Etcd,
    under: Vec<u8>,
    mut stop: watch::Receiver<bool>,
    mut apply: impl FnMut(Update) + Send,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let run = async {
            let (rev, kvs) = etcd.range(under.clone(), true).await?;
            apply(Update::Reset(kvs));
            let mut stream = etcd.watch(under.clone(), rev + 1).await?;
            backoff = Duration::from_millis(100);
            loop {
                let resp = stream
                    .message()
                    .await
                    .map_err(|s| io::Error::other(s.message().to_string()))?
                    .ok_or_else(|| io::Error::other("the watch ended"))?;
                if resp.canceled {
                    return Err(io::Error::other(format!(
                        "the watch was cancelled: {}",
                        resp.cancel_reason
                    )));
                }
                for ev in resp.events {
                    let Some(kv) = ev.kv else { continue };
                    if ev.r#type == EventType::Delete as i32 {
                        apply(Update::Delete(kv));
                    } else {
                        apply(Update::Put(kv));
                    }
                }
            }
        };
        let result: io::Result<()> = tokio::select! {
            r = run => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, prefix = %String::from_utf8_lossy(&under), "etcd: watch broken; reading again");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
