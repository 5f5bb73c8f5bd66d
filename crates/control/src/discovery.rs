//! The gRPC side: one bidirectional stream per proxy.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tandem_api::v1::discovery_server::Discovery;
use tandem_api::v1::{control_message, proxy_message, ControlMessage, Hello, ProxyMessage};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::identity::Ca;
use crate::mesh::Mesh;

pub struct DiscoveryService {
    pub mesh: Arc<Mesh>,
    pub ca: Arc<Ca>,
}

fn check_hello(h: &mut Hello) -> Result<(), Status> {
    if h.namespace.is_empty() {
        h.namespace = tandem_config::model::DEFAULT_NAMESPACE.to_string();
    }
    if h.service.is_empty() || h.instance.is_empty() {
        return Err(Status::invalid_argument(
            "hello must name a service and an instance",
        ));
    }
    if !h.inbound_addr.is_empty() && h.inbound_addr.parse::<SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "inbound address `{}` is not an ip:port",
            h.inbound_addr
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
        // Only a holder of the service's join token may register as it.
        self.ca
            .check_token(&hello.token, &hello.namespace, &hello.service)
            .await?;
        hello.token.clear();
        let (tx, rx) = watch::channel(None);
        let mesh = self.mesh.clone();
        let (key, conn) = mesh.connect(hello, tx).await;
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.kind {
                    Some(proxy_message::Kind::Ack(a)) => mesh.ack(&key, conn, a.version),
                    Some(proxy_message::Kind::Nack(n)) => {
                        mesh.nack(&key, conn, n.version, n.reason)
                    }
                    Some(proxy_message::Kind::Subscribe(s)) => {
                        mesh.subscribe(&key, conn, s.services)
                    }
                    Some(proxy_message::Kind::Leave(_)) => mesh.leave(&key, conn).await,
                    Some(proxy_message::Kind::Hello(_)) | None => {}
                }
            }
            mesh.disconnect(key, conn).await;
        });
        let snapshots = WatchStream::new(rx).filter_map(|s| {
            s.map(|snapshot| {
                Ok(ControlMessage {
                    kind: Some(control_message::Kind::Snapshot(snapshot)),
                })
            })
        });
        Ok(Response::new(Box::pin(snapshots)))
    }
}
