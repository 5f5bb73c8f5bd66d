//! Opaque TCP: bytes are relayed as they are, in both directions, with
//! connection and byte counters. No protocol detection, so server-speaks-first
//! protocols never stall. Between sidecars the bytes travel inside mTLS.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::metrics::{Direction, Name, TcpLabels};
use crate::transport::connect_tcp;
use crate::Proxy;

/// Where a relayed connection goes.
pub enum Target {
    /// Plain TCP: the local app, or a static endpoint outside the mesh.
    Plain(SocketAddr),
    /// A sidecar, over mTLS, which must prove this identity.
    Mesh(SocketAddr, ServerName<'static>),
}

pub async fn relay<C>(
    proxy: Arc<Proxy>,
    mut client: C,
    target: Target,
    direction: Direction,
    src: Name,
    dst: Name,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let labels = TcpLabels {
        direction,
        src_service: src,
        dst_service: dst,
    };
    let m = &proxy.metrics;
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
        Target::Mesh(addr, name) => match proxy.tcp_tls.connect(addr, name).await {
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
