//! Opaque TCP: bytes are relayed as they are, in both directions, with
//! connection and byte counters. No protocol detection, so server-speaks-first
//! protocols never stall. Between sidecars the bytes travel inside mTLS.

use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::telemetry::metrics::{Metrics, TcpLabels};
use crate::transport::tls::{connect_tcp, MeshTls};

/// Where a relayed connection goes.
pub(crate) enum Target {
    /// Plain TCP: the local app, or a static endpoint outside the mesh.
    Plain(SocketAddr),
    /// A sidecar, over mTLS, which must prove this identity.
    Mesh(SocketAddr, ServerName<'static>, MeshTls),
    /// A connection already open (a `CONNECT` tunnel's host outside the
    /// mesh).
    Open(TcpStream),
}

pub(crate) async fn relay<C>(mut client: C, target: Target, metrics: &Metrics, labels: TcpLabels)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let m = metrics;
    m.tcp_open.get_or_create(&labels).inc();
    m.tcp_active.get_or_create(&labels).inc();
    // copy_bidirectional reports the totals only at the end; on an error the
    // counts are lost, so count what it reports.
    let copied = match target {
        Target::Plain(addr) => match connect_tcp(addr).await {
            Ok(mut up) => tokio::io::copy_bidirectional(&mut client, &mut up)
                .await
                .ok(),
            Err(e) => {
                tracing::warn!(target = %addr, error = %e, "tcp connect failed");
                None
            }
        },
        Target::Open(mut up) => tokio::io::copy_bidirectional(&mut client, &mut up)
            .await
            .ok(),
        Target::Mesh(addr, name, tls) => match tls.connect(addr, name).await {
            Ok(mut up) => tokio::io::copy_bidirectional(&mut client, &mut up)
                .await
                .ok(),
            Err(e) => {
                tracing::warn!(target = %addr, error = %e, "mTLS connect failed");
                None
            }
        },
    };
    if let Some((read, written)) = copied {
        m.tcp_read.get_or_create(&labels).inc_by(read);
        m.tcp_write.get_or_create(&labels).inc_by(written);
    }
    m.tcp_active.get_or_create(&labels).dec();
    m.tcp_close.get_or_create(&labels).inc();
}
