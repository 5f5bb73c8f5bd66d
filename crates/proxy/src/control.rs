//! The stream to the control plane: register, receive snapshots, apply them
//! atomically, answer ACK or NACK. While the control plane is unreachable the
//! proxy keeps its last good routing table and reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use tandem_api::v1::discovery_client::DiscoveryClient;
use tandem_api::v1::{
    control_message, proxy_message, Ack, Certificate, Hello, Leave, Nack, ProxyMessage, Subscribe,
};
use tandem_config::snapshot::{Snapshot, Trust};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::ConfigLabels;
use crate::state::Routing;
use crate::{Proxy, ToControl};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub async fn run(
    proxy: Arc<Proxy>,
    mut subscriptions: mpsc::UnboundedReceiver<ToControl>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let result = tokio::select! {
            r = session(&proxy, &mut subscriptions, &mut backoff) => r,
            _ = stop.changed() => return,
        };
        proxy.metrics.control_connected.set(0);
        match result {
            Ok(()) => tracing::warn!("control plane closed the stream; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, control = %proxy.cfg.control, "control plane unreachable; serving on last config")
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

async fn session(
    proxy: &Arc<Proxy>,
    subscriptions: &mut mpsc::UnboundedReceiver<ToControl>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let channel = proxy.identity.control_channel().await?;
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel::<ProxyMessage>(64);
    let hello = Hello {
        service: proxy.cfg.service.clone(),
        instance: proxy.cfg.instance.clone(),
        namespace: proxy.cfg.namespace.clone(),
        inbound_addr: proxy.advertise.clone(),
        admin_addr: proxy.cfg.admin.to_string(),
        http_proxy_addr: proxy
            .cfg
            .http_proxy
            .map(|a| a.to_string())
            .unwrap_or_default(),
        interest: proxy.interest(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        applied_version: proxy.routing.load().version,
        token: proxy.identity.token().to_string(),
        certificate: proxy.identity.tls.leaf().map(|l| Certificate {
            spiffe_id: l.id.uri(),
            not_after: l.not_after_unix(),
            signer: l.signer.clone(),
            serial: l.serial.clone(),
        }),
    };
    tx.send(msg(proxy_message::Kind::Hello(hello))).await?;
    let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    proxy.metrics.control_connected.set(1);
    tracing::info!(control = %proxy.cfg.control, "connected to control plane");
    *backoff = BACKOFF_MIN;
    loop {
        tokio::select! {
            m = stream.message() => {
                let Some(m) = m? else { return Ok(()) };
                let Some(control_message::Kind::Snapshot(s)) = m.kind else { continue };
                let reply = match apply(proxy, s.version, &s.body) {
                    Ok(()) => proxy_message::Kind::Ack(Ack { version: s.version }),
                    Err(reason) => {
                        tracing::warn!(version = s.version, %reason, "refusing snapshot");
                        proxy_message::Kind::Nack(Nack { version: s.version, reason })
                    }
                };
                tx.send(msg(reply)).await?;
            }
            Some(m) = subscriptions.recv() => {
                let kind = match m {
                    ToControl::Subscribe(name) => proxy_message::Kind::Subscribe(Subscribe { services: vec![name] }),
                    ToControl::Leave => proxy_message::Kind::Leave(Leave {}),
                };
                tx.send(msg(kind)).await?;
            }
        }
    }
}

fn msg(kind: proxy_message::Kind) -> ProxyMessage {
    ProxyMessage { kind: Some(kind) }
}

/// Parses and swaps in a snapshot; on any problem the current table stays.
fn apply(proxy: &Proxy, version: u64, body: &[u8]) -> Result<(), String> {
    let current = proxy.routing.load().version;
    if version < current {
        return Err(format!(
            "version {version} is older than the applied version {current}"
        ));
    }
    let result = Snapshot::from_json(body)
        .map_err(|e| format!("snapshot does not parse: {e}"))
        .and_then(|s| {
            if s.service != proxy.cfg.service || s.namespace != proxy.cfg.namespace {
                return Err(format!(
                    "snapshot is for {}/{}, this proxy is {}/{}",
                    s.namespace, s.service, proxy.cfg.namespace, proxy.cfg.service
                ));
            }
            // The bundle first, on its own: a routing problem in the same
            // snapshot must not keep a new root from this proxy.
            if let Some(trust) = &s.trust {
                apply_trust(proxy, trust)?;
            }
            Routing::build(version, s, &proxy.loads)
        });
    match result {
        Ok(routing) => {
            proxy.peer_names.store(routing.peer_names.clone());
            proxy.routing.store(Arc::new(routing));
            proxy.metrics.config_version.set(version as i64);
            proxy
                .metrics
                .config_updates
                .get_or_create(&ConfigLabels { result: "applied" })
                .inc();
            proxy.routing_changed.send_replace(version);
            tracing::debug!(version, "applied snapshot");
            Ok(())
        }
        Err(e) => {
            proxy
                .metrics
                .config_updates
                .get_or_create(&ConfigLabels { result: "rejected" })
                .inc();
            Err(e)
        }
    }
}

/// Takes the trust bundle of a snapshot; a new signing root means renewing
/// under it.
fn apply_trust(proxy: &Proxy, trust: &Trust) -> Result<(), String> {
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
    let tls = &proxy.identity.tls;
    if tls
        .set_bundle(roots)
        .map_err(|e| format!("trust bundle: {e}"))?
    {
        tracing::info!(roots = trust.roots.len(), signer = %trust.signer, "trust bundle updated");
    }
    if tls.leaf().is_some_and(|l| l.signer != trust.signer) {
        proxy.identity.renew_now.notify_one();
    }
    Ok(())
}
