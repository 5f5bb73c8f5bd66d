//! Transparent interception: the app's outbound TCP connections arrive
//! here, redirected by the kernel (`iptables ... -j REDIRECT`, set up by
//! `tandem run --transparent`), and the address the app meant is read back
//! with `SO_ORIGINAL_DST`.
//!
//! - An address this sidecar's DNS gave out for a mesh service ([`Vips`],
//!   `dns.rs`) is that service: HTTP goes down the outbound stack (routed
//!   by its Host, as on the HTTP proxy port), opaque TCP is relayed to an
//!   endpoint over mTLS.
//! - Any other address is outside the mesh, and what the app speaks is
//!   detected from its first bytes (at most [`MAX_PEEK`]): HTTP/1.1 and
//!   HTTP/2 go down the same stack (egress by their Host); TLS is checked
//!   under the egress rules by its SNI name (and, when an ExternalService
//!   lists that name, connected to by the name, so that an SNI cannot carry
//!   the app elsewhere) and relayed untouched; anything
//!   else is opaque, checked by the address, and relayed. Detection never
//!   stalls a protocol where the server speaks first: when the egress rules
//!   allow the address, the connection to it is opened at once, and its
//!   first bytes end the wait.
//!
//! The sidecar's own connections never come back here: it runs outside
//! the app's network namespace, and only what enters from the app's side
//! is redirected.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tandem_config::snapshot::Protocol;
use tandem_runtime::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::egress::Listed;
use super::{relay_to, serve_conn, stack, Listen, Parts};
use crate::edge::Edge;
use crate::listen::{stopped, Drain};
use crate::telemetry::metrics::{Direction, InterceptLabels, TcpLabels};
use crate::transport::tcp::{relay, Target};
use crate::transport::tls::{connect_host, connect_tcp};

/// The most of a connection's first bytes read to tell its protocol (a TLS
/// ClientHello with its SNI fits).
pub(crate) const MAX_PEEK: usize = 16 * 1024;
/// How long a silent client of a server that is silent too is waited for
/// before its connection is taken as opaque.
const DETECT_WAIT: Duration = Duration::from_secs(5);

/// The addresses this sidecar's DNS answers for mesh services: one per
/// name, from 198.18.0.0/15 (set aside for tests of networks, so never a
/// real host), kept for the sidecar's life.
#[derive(Default)]
pub(crate) struct Vips(Mutex<VipTable>);

#[derive(Default)]
struct VipTable {
    by_name: HashMap<Box<str>, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, Arc<str>>,
}

const VIP_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Names one sidecar gives addresses to; past this its DNS answers
/// SERVFAIL for new mesh names.
const MAX_VIPS: usize = 65_536;

impl Vips {
    /// The address of mesh destination `name` (`catalog`, `catalog.shop`).
    pub(crate) fn for_name(&self, name: &str) -> Option<Ipv4Addr> {
        let mut t = self.0.lock();
        if let Some(ip) = t.by_name.get(name) {
            return Some(*ip);
        }
        if t.by_name.len() >= MAX_VIPS {
            return None;
        }
        // .0 is skipped: an address ending in 0 confuses some clients.
        let ip = Ipv4Addr::from(VIP_BASE + 1 + t.by_name.len() as u32);
        t.by_name.insert(Box::from(name), ip);
        t.by_ip.insert(ip, Arc::from(name));
        Some(ip)
    }

    fn name(&self, ip: Ipv4Addr) -> Option<Arc<str>> {
        self.0.lock().by_ip.get(&ip).cloned()
    }
}

/// The app's address before the kernel redirected the connection here.
fn original_dst(sock: &TcpStream) -> io::Result<SocketAddr> {
    let sa = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::OriginalDst)
        .map_err(io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sa.sin_port))))
}

/// Serves the transparent listener until `stop`.
pub(crate) async fn serve(
    p: Parts,
    vips: Arc<Vips>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    drain: Drain,
) {
    let edge = Edge::new(
        stack(&p, Listen::ByAuthority),
        p.metrics.clone(),
        p.recorder.clone(),
    );
    let limits = p.limits.clone();
    tandem_runtime::accept_loop(listener, "transparent", stopped(stop.clone()), |sock, _| {
        let Some(slot) = limits.connection() else {
            return;
        };
        let orig = match original_dst(&sock) {
            Ok(a) => a,
            Err(e) => {
                // Not redirected (someone connected to the port itself):
                // nowhere to send it.
                tracing::debug!(error = %e, "transparent: no original destination; closing");
                count(&p, "refused");
                return;
            }
        };
        // The app connecting to the sidecar's own listeners (this one
        // included): following it would loop.
        if p.me.own.contains(orig) {
            tracing::debug!(%orig, "transparent: a connection to the sidecar itself; closing");
            count(&p, "refused");
            return;
        }
        let (p, edge, vips, stop, keep) = (
            p.clone(),
            edge.clone(),
            vips.clone(),
            stop.clone(),
            (drain.clone(), slot),
        );
        tokio::spawn(async move {
            let mesh = vips.name(ip4(orig));
            match mesh {
                Some(name) => to_mesh(&p, &edge, &name, sock, stop, keep),
                None => outside(&p, &edge, orig, sock, stop, keep).await,
            }
        });
    })
    .await;
}

fn ip4(a: SocketAddr) -> Ipv4Addr {
    match a {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

fn count(p: &Parts, kind: &'static str) {
    p.metrics
        .intercepted
        .get_or_create(&InterceptLabels { kind })
        .inc();
}

/// A connection to a mesh service's address.
fn to_mesh<S: crate::svc::Service>(
    p: &Parts,
    edge: &Arc<Edge<S>>,
    name: &str,
    sock: TcpStream,
    stop: watch::Receiver<bool>,
    keep: impl Send + 'static,
) {
    count(p, "mesh");
    let dest = p.routes.load().destination(name).cloned();
    match dest {
        Some(d) if d.protocol == Protocol::Tcp => relay_to(p, &d, sock, keep),
        _ => serve_conn(edge, p, sock, stop, keep),
    }
}

/// What a connection's first bytes say it is.
#[derive(Debug, PartialEq)]
enum Detected {
    /// Not enough bytes yet.
    More,
    Http,
    /// TLS, with the name of its SNI.
    Tls(Option<String>),
    Opaque,
}

/// A connection to an address outside the mesh.
async fn outside<S: crate::svc::Service>(
    p: &Parts,
    edge: &Arc<Edge<S>>,
    orig: SocketAddr,
    mut sock: TcpStream,
    stop: watch::Receiver<bool>,
    keep: impl Send + 'static,
) {
    let ip = orig.ip().to_string();
    let none = |_: &str| -> Vec<&str> { Vec::new() };
    let by_ip: Listed = p.routes.load().egress.listed(&ip);
    let ip_allowed = p
        .routes
        .load()
        .egress
        .check(by_ip, &ip, orig.port(), &p.me, "", "", "", &none)
        .is_ok();
    // The server is called at once when the rules let the address be, so a
    // server that speaks first ends the wait.
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    if ip_allowed {
        tokio::spawn(async move {
            let _ = tx.send(connect_tcp(orig).await.ok());
        });
    } else {
        drop(tx);
    }
    let mut up: Option<TcpStream> = None;
    let mut connecting = ip_allowed;
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + DETECT_WAIT;
    let detected = loop {
        tokio::select! {
            r = read_some(&mut sock, &mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => match detect(&buf) {
                    Detected::More if buf.len() < MAX_PEEK => continue,
                    Detected::More => break Detected::Opaque,
                    d => break d,
                },
            },
            c = &mut rx, if connecting => {
                connecting = false;
                up = c.ok().flatten();
            }
            _ = readable(up.as_ref()) => break Detected::Opaque,
            _ = tokio::time::sleep_until(deadline) => break Detected::Opaque,
        }
    };
    // A name an ExternalService lists is called by that name, not at the
    // address the app connected to: an SNI claiming a listed name cannot
    // carry the app to another address.
    let mut by_name = None;
    let (kind, host, listed) = match &detected {
        Detected::Http => {
            count(p, "http");
            drop(up);
            // Routed by its Host, under the egress rules, like a request
            // on the HTTP proxy port.
            serve_conn(edge, p, Prefixed::new(buf, sock), stop, keep);
            return;
        }
        Detected::Tls(Some(name)) => match p.routes.load().egress.listed(name) {
            Some(i) => {
                by_name = Some(name.clone());
                ("tls", name.clone(), Some(i))
            }
            None => ("tls", name.clone(), by_ip),
        },
        Detected::Tls(None) => ("tls", ip, by_ip),
        _ => ("opaque", ip, by_ip),
    };
    count(p, kind);
    let checked =
        p.routes
            .load()
            .egress
            .check(listed, &host, orig.port(), &p.me, "", "", "", &none);
    if let Err(e) = checked {
        tracing::info!(%orig, %host, why = %e.detail, "transparent: egress denied; closing");
        return;
    }
    let connected = match (up, &by_name) {
        (_, Some(name)) => connect_host(name, orig.port(), &p.me.own).await,
        (Some(u), None) => Ok(u),
        (None, None) => connect_tcp(orig).await,
    };
    let mut up = match connected {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%orig, %host, error = %e, "transparent: connect failed");
            return;
        }
    };
    if up.write_all(&buf).await.is_err() {
        return;
    }
    let labels = TcpLabels {
        direction: Direction::outbound,
        src_service: p.service.clone(),
        dst_service: p.routes.load().egress.name(listed).clone(),
    };
    let _keep = keep;
    relay(sock, Target::Open(up), &p.metrics, labels).await;
}

/// Reads what is there (up to [`MAX_PEEK`] in all) onto `buf`.
async fn read_some(sock: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let room = MAX_PEEK.saturating_sub(buf.len()).min(4096);
    let mut chunk = [0u8; 4096];
    let n = sock.read(&mut chunk[..room.max(1)]).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn readable(s: Option<&TcpStream>) {
    match s {
        Some(s) => {
            let _ = s.readable().await;
        }
        None => std::future::pending().await,
    }
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

fn detect(b: &[u8]) -> Detected {
    if b.is_empty() {
        return Detected::More;
    }
    if b[0] == 0x16 {
        if b.len() < 5 {
            return Detected::More;
        }
        if b[1] != 3 {
            return Detected::Opaque;
        }
        let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
        return match b.get(5..5 + len) {
            Some(record) => Detected::Tls(sni(record)),
            None if 5 + len > MAX_PEEK => Detected::Tls(None),
            None => Detected::More,
        };
    }
    let mut partial = false;
    for m in METHODS.iter().copied().chain([H2_PREFACE]) {
        let n = m.len().min(b.len());
        if b[..n] == m[..n] {
            if b.len() >= m.len() {
                return Detected::Http;
            }
            partial = true;
        }
    }
    if partial {
        Detected::More
    } else {
        Detected::Opaque
    }
}

/// The host name of a ClientHello's `server_name` extension.
fn sni(hs: &[u8]) -> Option<String> {
    let u16_at = |b: &[u8], i: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *b.get(i)?,
            *b.get(i + 1)?,
        ])))
    };
    if *hs.first()? != 1 {
        return None;
    }
    let body = hs.get(4..)?;
    // version (2), random (32), then the session id.
    let mut i = 34;
    i += 1 + usize::from(*body.get(i)?);
    i += 2 + u16_at(body, i)?;
    i += 1 + usize::from(*body.get(i)?);
    let end = (i + 2 + u16_at(body, i)?).min(body.len());
    i += 2;
    while i + 4 <= end {
        let (kind, len) = (u16_at(body, i)?, u16_at(body, i + 2)?);
        let ext = body.get(i + 4..i + 4 + len)?;
        if kind == 0 {
            // server_name_list: a list of (type, name); type 0 is a host.
            let mut j = 2;
            while j + 3 <= ext.len() {
                let n = u16_at(ext, j + 1)?;
                if ext[j] == 0 {
                    let name = std::str::from_utf8(ext.get(j + 3..j + 3 + n)?).ok()?;
                    return Some(name.to_ascii_lowercase());
                }
                j += 3 + n;
            }
            return None;
        }
        i += 4 + len;
    }
    None
}

/// A connection whose first bytes were read already: they are read again
/// first.
pub(crate) struct Prefixed {
    first: Vec<u8>,
    at: usize,
    io: TcpStream,
}

impl Prefixed {
    fn new(first: Vec<u8>, io: TcpStream) -> Self {
        Prefixed { first, at: 0, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = (self.first.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            if self.at == self.first.len() {
                self.first = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_from_their_first_bytes() {
        assert_eq!(detect(b""), Detected::More);
        assert_eq!(detect(b"GE"), Detected::More);
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Detected::Http);
        assert_eq!(detect(b"POST /x"), Detected::Http);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n\r\nSM"), Detected::Http);
        assert_eq!(detect(b"PRI * HT"), Detected::More);
        assert_eq!(detect(b"\x00\x00\x00\x08"), Detected::Opaque);
        assert_eq!(detect(b"EHLO mail"), Detected::Opaque);
        assert_eq!(detect(b"\x16\x03\x01\x00"), Detected::More);
        assert_eq!(detect(b"\x16\x01"), Detected::More);
        assert_eq!(detect(b"\x16\x01\x00\x00\x00"), Detected::Opaque);
    }

    /// A ClientHello as rustls writes it, for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.roots.clear();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn the_sni_of_a_real_client_hello() {
        let hello = client_hello("api.example.com");
        assert_eq!(
            detect(&hello),
            Detected::Tls(Some("api.example.com".to_string()))
        );
        // Cut short: more is needed.
        assert_eq!(detect(&hello[..hello.len() - 1]), Detected::More);
        // An IP address has no SNI.
        let hello = client_hello("10.0.0.1");
        assert_eq!(detect(&hello), Detected::Tls(None));
    }

    #[test]
    fn addresses_are_given_once_per_name() {
        let v = Vips::default();
        let a = v.for_name("catalog").expect("vip");
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(v.for_name("catalog"), Some(a));
        let b = v.for_name("orders.shop").expect("vip");
        assert_ne!(a, b);
        assert_eq!(v.name(b).as_deref(), Some("orders.shop"));
        assert_eq!(v.name(Ipv4Addr::new(198, 18, 9, 9)), None);
    }

    #[tokio::test]
    async fn prefixed_bytes_are_read_again_first() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b" world").await.expect("write");
        });
        let (sock, _) = l.accept().await.expect("accept");
        let mut p = Prefixed::new(b"hello".to_vec(), sock);
        let mut all = String::new();
        p.read_to_string(&mut all).await.expect("read");
        client.await.expect("client");
        assert_eq!(all, "hello world");
    }
}
