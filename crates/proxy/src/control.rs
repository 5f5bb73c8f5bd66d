//! The proxy's side of the control plane: the discovery stream that
//! registers the proxy and applies the snapshots it receives ([`client`]),
//! the proxy's certificate from bootstrap to renewal ([`identity`]), and
//! [`Subscriptions`], through which the data path asks for destinations.

pub(crate) mod client;
pub(crate) mod identity;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use tandem_runtime::sync::Mutex;
use tokio::sync::mpsc;

/// Most destinations one proxy asks the control plane for.
pub(crate) const MAX_DESTINATIONS: usize = 1024;

/// What the data path asks of the control-plane stream.
pub(crate) enum ToControl {
    Subscribe(String),
    Leave,
}

/// The destinations this proxy needs (its interest set), and the way to
/// tell the control-plane stream about new ones.
pub(crate) struct Subscriptions {
    interest: Mutex<BTreeSet<String>>,
    to_control: mpsc::UnboundedSender<ToControl>,
    connected: AtomicBool,
}

impl Subscriptions {
    pub(crate) fn new(
        upstreams: impl IntoIterator<Item = String>,
    ) -> (Self, mpsc::UnboundedReceiver<ToControl>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let s = Subscriptions {
            interest: Mutex::new(upstreams.into_iter().collect()),
            to_control: tx,
            connected: AtomicBool::new(false),
        };
        (s, rx)
    }

    pub(crate) fn interest(&self) -> Vec<String> {
        self.interest.lock().iter().cloned().collect()
    }

    /// Adds a destination to the interest set, telling the control plane if
    /// it is new. Returns false when the set is full: hosts come from
    /// requests, and a caller inventing names must not grow it without bound.
    pub(crate) fn subscribe(&self, name: &str) -> bool {
        let mut interest = self.interest.lock();
        if interest.contains(name) {
            return true;
        }
        if interest.len() >= MAX_DESTINATIONS {
            return false;
        }
        interest.insert(name.to_string());
        drop(interest);
        let _ = self.to_control.send(ToControl::Subscribe(name.to_string()));
        true
    }

    /// Tells the control plane this proxy is shutting down (when connected).
    pub(crate) fn leave(&self) -> bool {
        self.is_connected() && self.to_control.send(ToControl::Leave).is_ok()
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interest_set_is_bounded_and_asks_once() {
        let (s, mut rx) = Subscriptions::new(["orders".to_string()]);
        assert!(s.subscribe("orders"));
        assert!(rx.try_recv().is_err(), "known already: nothing sent");
        assert!(s.subscribe("payments"));
        assert!(matches!(rx.try_recv(), Ok(ToControl::Subscribe(n)) if n == "payments"));
        for i in 0..MAX_DESTINATIONS {
            s.subscribe(&format!("svc-{i}"));
        }
        assert!(!s.subscribe("one-too-many"));
        assert_eq!(s.interest().len(), MAX_DESTINATIONS);
    }
}
