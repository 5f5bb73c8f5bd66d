//! The gRPC side: one bidirectional stream per proxy.
//!
//! A stream is opened over TLS with the proxy's certificate: the first
//! message (`Hello`) must name the service that certificate is for, and the
//! join token it descends from must not be revoked. A Hello is checked
//! before anything is registered (see [`check_hello`]); the mesh then
//! refuses names and addresses that a live proxy holds
//! ([`Mesh::connect`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use rustls_pki_types::CertificateDer;
use tandem_api::v1::discovery_server::Discovery;
use tandem_api::v1::{
    control_message, proxy_message, ControlMessage, Hello, ProxyMessage, ReportEvery,
};
use tandem_identity::spiffe::{valid_label, SYSTEM_NAMESPACE};
use tandem_identity::SpiffeId;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};

use crate::identity::Ca;
use crate::mesh::{Mesh, StreamEnds};
use crate::stats::Stats;
use crate::tap::Taps;

/// Most destinations one proxy may ask for (its Hello's interest and its
/// subscriptions together).
pub const MAX_INTEREST: usize = 1024;
/// Longest instance name and proxy version string a Hello may carry.
const MAX_NAME: usize = 128;

/// The client certificate a gRPC connection presented, verified against
/// the trust bundle during the handshake: its identity and the join token
/// it descends from.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: SpiffeId,
    pub lineage: String,
}

impl Peer {
    /// What a verified chain says; `None` without a certificate.
    pub fn of(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Option<Peer> {
        let leaf = certs?.first()?;
        let id = tandem_identity::spiffe::check_svid(leaf, trust_domain).ok()?;
        let lineage = tandem_identity::ca::lineage(leaf)?;
        Some(Peer { id, lineage })
    }
}

/// The peer certificate of a request's connection.
pub fn peer_of<T>(request: &Request<T>) -> Option<Peer> {
    request
        .extensions()
        .get::<Option<Peer>>()
        .cloned()
        .flatten()
}

pub struct DiscoveryService {
    pub mesh: Arc<Mesh>,
    pub ca: Arc<Ca>,
    /// Where the proxies' traffic reports go, and how often they come.
    pub stats: Arc<Stats>,
    pub report_interval: Duration,
    /// Where the proxies' tap summaries go.
    pub taps: Arc<Taps>,
}

/// The fields of a Hello, each within its bounds. Conflicts with other
/// live proxies and the version bound are the mesh's to check.
pub fn check_hello(h: &mut Hello) -> Result<(), Status> {
    if h.namespace.is_empty() {
        h.namespace = tandem_config::model::DEFAULT_NAMESPACE.to_string();
    }
    if !valid_label(&h.namespace) || !valid_label(&h.service) || h.namespace == SYSTEM_NAMESPACE {
        return Err(Status::invalid_argument(
            "hello must name a service and a namespace (lower-case letters, digits and `-`)",
        ));
    }
    let instance_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if !instance_ok(&h.instance) {
        return Err(Status::invalid_argument(format!(
            "instance name must be 1 to {MAX_NAME} letters, digits, `-`, `_` or `.`"
        )));
    }
    if h.proxy_version.len() > MAX_NAME {
        return Err(Status::invalid_argument("proxy version is too long"));
    }
    for (what, addr) in [
        ("inbound", &h.inbound_addr),
        ("admin", &h.admin_addr),
        ("HTTP proxy", &h.http_proxy_addr),
    ] {
        if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "{what} address `{}` is not an ip:port",
                addr.chars().take(64).collect::<String>()
            )));
        }
    }
    if h.interest.len() > MAX_INTEREST {
        return Err(Status::invalid_argument(format!(
            "hello asks for {} destinations; at most {MAX_INTEREST}",
            h.interest.len()
        )));
    }
    if let Some(bad) = h.interest.iter().find(|s| !valid_label(s)) {
        return Err(Status::invalid_argument(format!(
            "`{}` is not a service name",
            bad.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream =
        Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send + 'static>>;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = peer_of(&request).ok_or_else(|| {
            Status::unauthenticated(
                "register with the certificate issued for your join token (no client certificate on this connection)",
            )
        })?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before hello"))?;
        let Some(proxy_message::Kind::Hello(mut hello)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        check_hello(&mut hello)?;
        // Only a holder of the service's certificate may register as it.
        if peer.id.namespace != hello.namespace || peer.id.service != hello.service {
            return Err(Status::permission_denied(format!(
                "this certificate is for {}, not {}/{}",
                peer.id, hello.namespace, hello.service
            )));
        }
        self.ca.check_lineage(&peer.lineage).await?;
        hello.token.clear();
        let (tx, rx) = watch::channel(None);
        let (end_tx, end_rx) = oneshot::channel::<Status>();
        let (commands, commands_rx) = tokio::sync::mpsc::channel::<ControlMessage>(16);
        let mesh = self.mesh.clone();
        let (key, conn) = mesh
            .connect(
                hello,
                peer.lineage,
                StreamEnds {
                    snapshots: tx,
                    end: end_tx,
                    commands,
                },
            )
            .await?;
        let stats = self.stats.clone();
        let taps = self.taps.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.kind {
                    Some(proxy_message::Kind::Ack(a)) => mesh.ack(&key, conn, a.version),
                    Some(proxy_message::Kind::Nack(n)) => {
                        mesh.nack(&key, conn, n.version, n.reason)
                    }
                    Some(proxy_message::Kind::Subscribe(s)) => {
                        if let Err(status) = mesh.subscribe(&key, conn, s.services) {
                            mesh.end_stream(&key, conn, status);
                        }
                    }
                    Some(proxy_message::Kind::Leave(_)) => mesh.leave(&key, conn).await,
                    Some(proxy_message::Kind::TapEvent(e)) => taps.deliver(&key, e.id, e.json),
                    Some(proxy_message::Kind::Report(r)) => {
                        if let Err(why) = stats.report(&key, r) {
                            tracing::warn!(proxy = %key.2, %why, "traffic report refused");
                        }
                    }
                    Some(proxy_message::Kind::Hello(_)) | None => {}
                }
            }
            mesh.disconnect(key, conn).await;
        });
        // Snapshots as they come; the stream ends with the status the mesh
        // ends it with (a revoked token, too many subscriptions).
        let snapshots = futures_util::StreamExt::filter_map(WatchStream::new(rx), |s| {
            std::future::ready(s.map(|snapshot| {
                Ok(ControlMessage {
                    kind: Some(control_message::Kind::Snapshot(snapshot)),
                })
            }))
        });
        let ended = futures_util::StreamExt::filter_map(futures_util::stream::once(end_rx), |r| {
            std::future::ready(r.ok().map(Err))
        });
        // First, how often to report the traffic.
        let report_every = futures_util::stream::once(std::future::ready(Ok(ControlMessage {
            kind: Some(control_message::Kind::ReportEvery(ReportEvery {
                interval_ms: u32::try_from(self.report_interval.as_millis()).unwrap_or(u32::MAX),
            })),
        })));
        let snapshots = futures_util::StreamExt::chain(report_every, snapshots);
        // Taps and the like, between snapshots.
        let commands = futures_util::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(commands_rx),
            Ok,
        );
        let snapshots = futures_util::stream::select(snapshots, commands);
        let both = futures_util::stream::select(snapshots, ended);
        // Nothing after the end.
        let mut over = false;
        let until_end = futures_util::StreamExt::take_while(both, move |item| {
            let go = !over;
            over = over || item.is_err();
            std::future::ready(go)
        });
        Ok(Response::new(Box::pin(until_end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            service: "web".into(),
            instance: "web-1".into(),
            inbound_addr: "127.0.0.1:8080".into(),
            admin_addr: "127.0.0.1:4191".into(),
            ..Default::default()
        }
    }

    type Edit = Box<dyn Fn(&mut Hello)>;

    #[test]
    fn hello_fields_are_bounded() {
        let mut ok = hello();
        check_hello(&mut ok).expect("valid");
        assert_eq!(ok.namespace, "default");
        let bad: Vec<Edit> = vec![
            Box::new(|h| h.admin_addr = "metadata.internal:80".into()),
            Box::new(|h| h.admin_addr = "http://127.0.0.1:80/x".into()),
            Box::new(|h| h.http_proxy_addr = "localhost:80".into()),
            Box::new(|h| h.inbound_addr = "10.0.0.1".into()),
            Box::new(|h| h.instance = "a/b".into()),
            Box::new(|h| h.instance = "x".repeat(129)),
            Box::new(|h| h.instance.clear()),
            Box::new(|h| h.service = "Web".into()),
            Box::new(|h| h.namespace = SYSTEM_NAMESPACE.into()),
            Box::new(|h| h.interest = vec!["ok".into(), "no/pe".into()]),
            Box::new(|h| h.interest = (0..=MAX_INTEREST).map(|i| format!("s{i}")).collect()),
            Box::new(|h| h.proxy_version = "v".repeat(200)),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut h = hello();
            f(&mut h);
            let e = check_hello(&mut h).expect_err(&format!("case {i}"));
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "case {i}: {e:?}");
        }
    }
}
