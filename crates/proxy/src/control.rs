//! The stream to the control plane: register, receive snapshots, apply them
//! atomically, answer ACK or NACK. While the control plane is unreachable the
//! proxy keeps its last good routing table and reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use tandem_api::v1::discovery_client::DiscoveryClient;
use tandem_api::v1::{
    control_message, proxy_message, Ack, Hello, Leave, Nack, ProxyMessage, Subscribe,
};
use tandem_config::snapshot::Snapshot;
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
    let endpoint = tonic::transport::Endpoint::from_shared(proxy.cfg.control.clone())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await?;
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
            Routing::build(version, s, &proxy.loads)
        });
    match result {
        Ok(routing) => {
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
