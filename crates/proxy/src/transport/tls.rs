//! Connections between sidecars: every hop to a meshed endpoint is mTLS
//! (TLS 1.3, both sides proving a SPIFFE identity); connections to the local
//! app and to static endpoints outside the mesh are plain TCP.
//!
//! The HTTP clients see endpoints as URIs: `https://ip:port` for a meshed
//! endpoint and `http://ip:port` otherwise, so the connection pools never
//! mix the two. The identity the peer must prove comes from the routing
//! table ([`PeerNames`]), never from the request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Scheme;
use http::Uri;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tandem_identity::tls::failure_reason;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::telemetry::metrics::{Direction, HandshakeLabels};

/// Endpoint address → the identity its sidecar must have, for the
/// connector (which sees only the address); built with each routing table.
pub(crate) type PeerNames = std::collections::HashMap<Box<str>, ServerName<'static>>;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS records a connection keeps waiting for a peer that does not
/// read: one full record (rustls' default is 64 KiB, which a thousand
/// stalled streams would multiply).
pub(crate) const TLS_SEND_BUFFER: usize = 16 * 1024 + 256;
/// For a permissive TCP service: how long a silent new connection is given
/// to start a TLS handshake before it is served as plaintext.
pub(crate) const PLAINTEXT_SILENCE: Duration = Duration::from_millis(200);

pub(crate) type Handshakes = Family<HandshakeLabels, Counter>;

/// Opens mTLS connections to sidecars, counting handshakes.
#[derive(Clone)]
pub(crate) struct MeshTls {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) handshakes: Handshakes,
}

impl MeshTls {
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        name: ServerName<'static>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = connect_tcp(addr).await?;
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp),
        )
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        });
        let mut result = result;
        if let Ok(s) = &mut result {
            s.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
        }
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => failure_reason(e),
        };
        self.handshakes
            .get_or_create(&HandshakeLabels {
                direction: Direction::outbound,
                result: label,
            })
            .inc();
        result
    }
}

pub(crate) async fn connect_tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The sidecar's own listeners: a plain connection to one of them (an
/// app asking its sidecar to call the sidecar) would loop, and is refused.
#[derive(Default)]
pub(crate) struct OwnAddrs(pub(crate) Vec<SocketAddr>);

impl OwnAddrs {
    pub(crate) fn contains(&self, a: SocketAddr) -> bool {
        let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
        self.0.iter().any(|l| {
            l.port() == a.port() && (l.ip() == a.ip() || (l.ip().is_unspecified() && local(a.ip())))
        })
    }

    fn refuse(&self, a: SocketAddr) -> io::Result<()> {
        if self.contains(a) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{a} is this sidecar's own listener"),
            ));
        }
        Ok(())
    }
}

/// Connects to `host:port` outside the mesh: an IP address as it is, a
/// name through the system's resolver, each of its addresses in turn,
/// within the connect timeout; never to one of the sidecar's `own`
/// listeners.
pub(crate) async fn connect_host(host: &str, port: u16, own: &OwnAddrs) -> io::Result<TcpStream> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        own.refuse(addr)?;
        return connect_tcp(addr).await;
    }
    let attempt = async {
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("`{host}` does not resolve"),
        );
        for addr in tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("`{host}` does not resolve: {e}")))?
        {
            if let Err(e) = own.refuse(addr) {
                last = e;
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
            }
        }
        Err(last)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The connector of the HTTP clients.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) tls: MeshTls,
    pub(crate) names: Arc<ArcSwap<PeerNames>>,
    /// Plain connections never go to these.
    pub(crate) own: Arc<OwnAddrs>,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    /// Opens a connection to `https://ip:port` (mTLS, the peer proving the
    /// identity the routing table names for that address) or
    /// `http://ip:port` (plain TCP).
    pub(crate) async fn open(&self, uri: &Uri) -> Result<Conn, BoxError> {
        let auth = uri.authority().ok_or("URI without authority")?;
        let Ok(addr) = auth.as_str().parse::<SocketAddr>() else {
            // A host outside the mesh, by name: plain TCP only.
            if uri.scheme() == Some(&Scheme::HTTPS) {
                return Err(format!("endpoint `{auth}` is not an ip:port").into());
            }
            let port = auth.port_u16().unwrap_or(80);
            return Ok(Conn::plain(
                connect_host(auth.host(), port, &self.own).await?,
            ));
        };
        if uri.scheme() == Some(&Scheme::HTTPS) {
            let name = self
                .names
                .load()
                .get(auth.as_str())
                .cloned()
                .ok_or_else(|| format!("no identity known for endpoint {auth}"))?;
            Ok(Conn::tls(self.tls.connect(addr, name).await?))
        } else {
            self.own.refuse(addr)?;
            Ok(Conn::plain(connect_tcp(addr).await?))
        }
    }
}

/// A client connection: plain TCP or mTLS.
pub(crate) struct Conn(TokioIo<Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>>);

impl Conn {
    fn plain(s: TcpStream) -> Self {
        Conn(TokioIo::new(Either::Left(s)))
    }

    fn tls(s: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        Conn(TokioIo::new(Either::Right(Box::new(s))))
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// An accepted inbound connection: mTLS, or plaintext in permissive mode.
pub(crate) type Inbound = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listeners_are_recognized() {
        let own = OwnAddrs(vec![
            "127.0.0.1:4140".parse().expect("addr"),
            "0.0.0.0:8443".parse().expect("addr"),
            "169.254.7.1:15001".parse().expect("addr"),
        ]);
        let is = |a: &str| own.contains(a.parse().expect("addr"));
        assert!(is("127.0.0.1:4140"));
        assert!(is("127.0.0.1:8443") && is("0.0.0.0:8443"));
        assert!(is("169.254.7.1:15001"));
        assert!(!is("127.0.0.1:4141"));
        assert!(!is("10.0.0.9:4140"));
        assert!(!is("169.254.7.2:15001"));
    }

    #[tokio::test]
    async fn a_host_outside_the_mesh_is_never_the_sidecar_itself() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let own = OwnAddrs(vec![l.local_addr().expect("addr")]);
        let port = l.local_addr().expect("addr").port();
        let e = connect_host("127.0.0.1", port, &own)
            .await
            .expect_err("own");
        assert!(e.to_string().contains("own listener"), "{e}");
        let e = connect_host("localhost", port, &own)
            .await
            .expect_err("own");
        assert!(e.to_string().contains("own listener"), "{e}");
        assert!(connect_host("127.0.0.1", port, &OwnAddrs::default())
            .await
            .is_ok());
    }
}
