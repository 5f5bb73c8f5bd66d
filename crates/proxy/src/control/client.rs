//! The stream to the control plane: register, receive snapshots, apply them
//! atomically, answer ACK or NACK, and report the traffic as often as the
//! control plane asks. While the control plane is unreachable the proxy
//! keeps its last good routing table and reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use tandem_api::v1::discovery_client::DiscoveryClient;
use tandem_api::v1::{
    control_message, proxy_message, Ack, Certificate, Hello, Leave, Nack, ProxyMessage, Subscribe,
    TapEvent,
};
use tandem_config::snapshot::{Snapshot, Trust};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::control::identity::Identity;
use crate::control::{Subscriptions, ToControl};
use crate::routing::Routes;
use crate::telemetry::metrics::{ConfigLabels, Metrics};
use crate::telemetry::tap::{TapFilter, Taps};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reports come at most this often, whatever the control plane asks.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// What the proxy registers as.
pub(crate) struct Registration {
    /// The control plane's URL, for logs.
    pub(crate) control: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) instance: String,
    /// The inbound address other sidecars use.
    pub(crate) advertise: String,
    pub(crate) admin: String,
    pub(crate) http_proxy: String,
    pub(crate) zone: String,
}

/// What the stream works with.
pub(crate) struct Client {
    pub(crate) me: Registration,
    pub(crate) identity: Arc<Identity>,
    pub(crate) routes: Arc<Routes>,
    pub(crate) subscriptions: Arc<Subscriptions>,
    pub(crate) metrics: Arc<Metrics>,
    /// The taps the control plane asked for, and their summaries.
    pub(crate) taps: Arc<Taps>,
}

impl Client {
    pub(crate) async fn run(
        self,
        mut asks: mpsc::UnboundedReceiver<ToControl>,
        mut tap_events: mpsc::Receiver<(u64, String)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = tokio::select! {
                r = self.session(&mut asks, &mut tap_events, &mut backoff) => r,
                _ = stop.changed() => return,
            };
            self.connected(false);
            // Taps belong to the stream that asked for them.
            self.taps.clear();
            while tap_events.try_recv().is_ok() {}
            match result {
                Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, control = %self.me.control, "control plane unreachable; serving on last config")
                }
            }
            // Full jitter keeps a fleet of proxies from reconnecting in lockstep.
            let wait = Duration::from_millis(fastrand::u64(
                backoff.as_millis() as u64 / 2..=backoff.as_millis() as u64,
            ));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn connected(&self, up: bool) {
        self.subscriptions.set_connected(up);
        self.metrics.control_connected.set(i64::from(up));
    }

    async fn session(
        &self,
        asks: &mut mpsc::UnboundedReceiver<ToControl>,
        tap_events: &mut mpsc::Receiver<(u64, String)>,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let channel = self.identity.control_channel().await?;
        let mut client = DiscoveryClient::new(channel);
        let (tx, rx) = mpsc::channel::<ProxyMessage>(64);
        let me = &self.me;
        let hello = Hello {
            service: me.service.clone(),
            instance: me.instance.clone(),
            namespace: me.namespace.clone(),
            inbound_addr: me.advertise.clone(),
            admin_addr: me.admin.clone(),
            http_proxy_addr: me.http_proxy.clone(),
            interest: self.subscriptions.interest(),
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
            applied_version: self.routes.load().version,
            zone: me.zone.clone(),
            // The certificate on the channel is the credential.
            token: String::new(),
            certificate: self.identity.tls.leaf().map(|l| Certificate {
                spiffe_id: l.id.uri(),
                not_after: l.not_after_unix(),
                signer: l.signer.clone(),
                serial: l.serial.clone(),
            }),
        };
        tx.send(msg(proxy_message::Kind::Hello(hello))).await?;
        let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        self.connected(true);
        tracing::info!(control = %me.control, "connected to control plane");
        *backoff = BACKOFF_MIN;
        // Reports of the traffic, once the control plane asks for them.
        let mut reports: Option<tokio::time::Interval> = None;
        loop {
            tokio::select! {
                m = stream.message() => {
                    let Some(m) = m? else { return Ok(()) };
                    let s = match m.kind {
                        Some(control_message::Kind::Snapshot(s)) => s,
                        Some(control_message::Kind::TapStart(t)) => {
                            let method = (!t.method.is_empty())
                                .then(|| http::Method::from_bytes(t.method.as_bytes()).ok())
                                .flatten();
                            let filter = TapFilter {
                                id: t.id,
                                path_prefix: t.path_prefix,
                                method,
                                per_second: t.per_second,
                                reveal_headers: t.reveal_headers,
                            };
                            if let Err(e) = self.taps.start(filter) {
                                tracing::warn!(error = %e, "tap refused");
                            }
                            continue;
                        }
                        Some(control_message::Kind::TapStop(t)) => {
                            self.taps.stop(t.id);
                            continue;
                        }
                        Some(control_message::Kind::ReportEvery(r)) => {
                            let every = Duration::from_millis(u64::from(r.interval_ms))
                                .max(MIN_REPORT_INTERVAL);
                            let mut tick = tokio::time::interval(every);
                            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            reports = Some(tick);
                            continue;
                        }
                        None => continue,
                    };
                    let reply = match self.apply(s.version, &s.body) {
                        Ok(()) => proxy_message::Kind::Ack(Ack { version: s.version }),
                        Err(reason) => {
                            tracing::warn!(version = s.version, %reason, "refusing snapshot");
                            proxy_message::Kind::Nack(Nack { version: s.version, reason })
                        }
                    };
                    tx.send(msg(reply)).await?;
                }
                Some(m) = asks.recv() => {
                    let kind = match m {
                        ToControl::Subscribe(name) => proxy_message::Kind::Subscribe(Subscribe { services: vec![name] }),
                        ToControl::Leave => proxy_message::Kind::Leave(Leave {}),
                    };
                    tx.send(msg(kind)).await?;
                }
                Some((id, json)) = tap_events.recv() => {
                    tx.send(msg(proxy_message::Kind::TapEvent(TapEvent { id, json }))).await?;
                }
                _ = next_tick(&mut reports) => {
                    let report = self.metrics.traffic.report();
                    tx.send(msg(proxy_message::Kind::Report(report))).await?;
                }
            }
        }
    }

    /// Parses and swaps in a snapshot; on any problem the current table
    /// stays.
    fn apply(&self, version: u64, body: &[u8]) -> Result<(), String> {
        let current = self.routes.load().version;
        if version < current {
            return Err(format!(
                "version {version} is older than the applied version {current}"
            ));
        }
        let result = Snapshot::from_json(body)
            .map_err(|e| format!("snapshot does not parse: {e}"))
            .and_then(|s| {
                if s.service != self.me.service || s.namespace != self.me.namespace {
                    return Err(format!(
                        "snapshot is for {}/{}, this proxy is {}/{}",
                        s.namespace, s.service, self.me.namespace, self.me.service
                    ));
                }
                // The bundle first, on its own: a routing problem in the
                // same snapshot must not keep a new root from this proxy.
                if let Some(trust) = &s.trust {
                    self.apply_trust(trust)?;
                }
                self.routes.apply(version, s)
            });
        let label = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        self.metrics
            .config_updates
            .get_or_create(&ConfigLabels { result: label })
            .inc();
        if result.is_ok() {
            self.metrics.config_version.set(version as i64);
            tracing::debug!(version, "applied snapshot");
        }
        result
    }

    /// Takes the trust bundle of a snapshot; a new signing root means
    /// renewing under it.
    fn apply_trust(&self, trust: &Trust) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = Vec::with_capacity(trust.roots.len());
        for pem in &trust.roots {
            roots.push(
                rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| format!("trust bundle: {e}"))?,
            );
        }
        if roots.is_empty() {
            return Err("trust bundle is empty".into());
        }
        let tls = &self.identity.tls;
        tls.set_allow_intermediates(trust.intermediates);
        tls.set_revoked(trust.revoked.clone());
        if tls
            .set_bundle(roots)
            .map_err(|e| format!("trust bundle: {e}"))?
        {
            tracing::info!(roots = trust.roots.len(), signer = %trust.signer, "trust bundle updated");
        }
        if tls.leaf().is_some_and(|l| l.signer != trust.signer) {
            self.identity.renew_now.notify_one();
        }
        Ok(())
    }
}

/// The next tick of `reports`, or never while there is none.
async fn next_tick(reports: &mut Option<tokio::time::Interval>) {
    match reports {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn msg(kind: proxy_message::Kind) -> ProxyMessage {
    ProxyMessage { kind: Some(kind) }
}
