//! Opaque TCP: bytes are relayed as they are, in both directions, with
//! connection and byte counters. No protocol detection, so server-speaks-first
//! protocols never stall.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::metrics::{Direction, Name, TcpLabels};
use crate::Proxy;

pub async fn relay(
    proxy: Arc<Proxy>,
    mut client: TcpStream,
    target: SocketAddr,
    direction: Direction,
    src: Name,
    dst: Name,
) {
    let labels = TcpLabels {
        direction,
        src_service: src,
        dst_service: dst,
    };
    let m = &proxy.metrics;
    m.tcp_open.get_or_create(&labels).inc();
    m.tcp_active.get_or_create(&labels).inc();
    match TcpStream::connect(target).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let (mut read, mut written) = (0u64, 0u64);
            // copy_bidirectional reports the totals only at the end; on an
            // error the counts are lost, so count what it reports.
            if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                read = a;
                written = b;
            }
            m.tcp_read.get_or_create(&labels).inc_by(read);
            m.tcp_write.get_or_create(&labels).inc_by(written);
        }
        Err(e) => {
            tracing::warn!(%target, error = %e, "tcp connect failed");
        }
    }
    m.tcp_active.get_or_create(&labels).dec();
    m.tcp_close.get_or_create(&labels).inc();
}
