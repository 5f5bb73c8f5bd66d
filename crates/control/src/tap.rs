//! Taps: `GET /api/v1/tap` asks every connected proxy of a service, over
//! its control stream, for summaries of the requests that match a filter,
//! and streams what they send back to the caller as JSON lines. The tap
//! ends when the caller goes away: the proxies are told to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tandem_api::v1::{control_message, ControlMessage, TapStart, TapStop};
use tandem_runtime::sync::Mutex;
use tokio::sync::mpsc;

use crate::mesh::{Mesh, ProxyKey};

/// Summaries waiting for the caller, at most; more are dropped.
const QUEUE: usize = 512;

/// A tap in progress: the service it is on (namespace, name), and where
/// its summaries go.
type Open = (String, String, mpsc::Sender<String>);

/// The taps in progress, by id.
#[derive(Default)]
pub struct Taps {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// What a tap asks for.
pub struct TapRequest {
    pub namespace: String,
    pub service: String,
    pub path_prefix: String,
    pub method: String,
    pub per_second: u32,
    pub reveal_headers: bool,
}

/// A tap in progress; dropping it stops the proxies' side.
pub struct Tap {
    pub id: u64,
    /// How many proxies took it.
    pub proxies: usize,
    pub events: mpsc::Receiver<String>,
    /// Stops the tap when the answer's stream is dropped.
    _stop: Stopper,
}

struct Stopper {
    id: u64,
    namespace: String,
    service: String,
    mesh: Arc<Mesh>,
    taps: Arc<Taps>,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.taps.open.lock().remove(&self.id);
        let stop = ControlMessage {
            kind: Some(control_message::Kind::TapStop(TapStop { id: self.id })),
        };
        self.mesh.command(&self.namespace, &self.service, &stop);
    }
}

impl Taps {
    pub fn start(self: &Arc<Self>, mesh: &Arc<Mesh>, req: TapRequest) -> Tap {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, events) = mpsc::channel(QUEUE);
        self.open
            .lock()
            .insert(id, (req.namespace.clone(), req.service.clone(), tx));
        let start = ControlMessage {
            kind: Some(control_message::Kind::TapStart(TapStart {
                id,
                path_prefix: req.path_prefix,
                method: req.method,
                per_second: req.per_second,
                reveal_headers: req.reveal_headers,
            })),
        };
        let proxies = mesh.command(&req.namespace, &req.service, &start);
        Tap {
            id,
            proxies,
            events,
            _stop: Stopper {
                id,
                namespace: req.namespace,
                service: req.service,
                mesh: mesh.clone(),
                taps: self.clone(),
            },
        }
    }

    /// A summary from proxy `from` for tap `id`: passed on only if the
    /// proxy is of the tapped service (another cannot slip lines into a
    /// tap), and dropped when the caller is behind or gone.
    pub fn deliver(&self, from: &ProxyKey, id: u64, json: String) {
        if json.len() > 64 << 10 || !json.starts_with('{') {
            return;
        }
        if let Some((ns, svc, tx)) = self.open.lock().get(&id) {
            if *ns == from.0 && *svc == from.1 {
                let _ = tx.try_send(json);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_only_from_the_tapped_service() {
        let taps = Taps::default();
        let (tx, mut rx) = mpsc::channel(4);
        taps.open
            .lock()
            .insert(1, ("default".into(), "web".into(), tx));
        let web: ProxyKey = ("default".into(), "web".into(), "web-1".into());
        let other: ProxyKey = ("default".into(), "orders".into(), "orders-1".into());
        taps.deliver(&other, 1, "{}".into());
        taps.deliver(&web, 1, "not json".into());
        taps.deliver(&web, 2, "{}".into());
        taps.deliver(&web, 1, r#"{"ok":1}"#.into());
        assert_eq!(rx.try_recv().ok().as_deref(), Some(r#"{"ok":1}"#));
        assert!(rx.try_recv().is_err());
    }
}
