//! DNS for an app intercepted transparently: the app's resolver points
//! here (`tandem run --transparent` writes its `resolv.conf`). A name of a
//! mesh service (`catalog`, `catalog.shop`, `catalog.shop.svc...`, found
//! in the routing table or asked of the control plane) is answered with the
//! address [`Vips`] keeps for it, so the app's connection to it is
//! intercepted and known for what it is. Every other query is passed, as
//! it is, to the resolver of the sidecar's own `/etc/resolv.conf`, and its
//! answer back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tokio::net::UdpSocket;
use tokio::sync::{watch, Semaphore};

use super::discover::{destination_key, discover};
use super::transparent::Vips;
use crate::control::Subscriptions;
use crate::routing::Routes;

/// Queries answered at once; more are dropped (the app's resolver asks
/// again).
const IN_FLIGHT: usize = 256;
/// How long the upstream resolver gets to answer.
const UPSTREAM_WAIT: Duration = Duration::from_secs(5);
/// The TTL of a mesh name's answer: its address never changes while this
/// sidecar runs.
const TTL: u32 = 60;

pub(crate) struct Dns {
    pub(crate) routes: Arc<Routes>,
    pub(crate) control: Arc<Subscriptions>,
    pub(crate) vips: Arc<Vips>,
    /// The resolver other names are asked of.
    pub(crate) upstream: Option<SocketAddr>,
}

/// The first `nameserver` of a `resolv.conf`.
pub(crate) fn upstream_of(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// Answers queries on `socket` until `stop`.
pub(crate) async fn serve(dns: Arc<Dns>, socket: UdpSocket, mut stop: watch::Receiver<bool>) {
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: receive failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let (query, dns, socket) = (buf[..n].to_vec(), dns.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = dns.answer(&query).await {
                let _ = socket.send_to(&answer, peer).await;
            }
        });
    }
}

impl Dns {
    /// The answer to one query: a mesh name's address, else the upstream
    /// resolver's answer; `None` when there is none to give.
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let packet = Packet::parse(query).ok()?;
        let question = packet.questions.first()?;
        let name = question.qname.to_string().to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if !name.is_empty() && self.routes.load().egress.maybe_mesh(name) {
            let key = destination_key(name);
            let known = self.routes.load().destination(key).is_some();
            if known || discover(&self.routes, &self.control, key).await.is_ok() {
                let mut reply = Packet::new_reply(packet.id());
                reply.set_flags(
                    PacketFlag::AUTHORITATIVE_ANSWER
                        | PacketFlag::RECURSION_DESIRED
                        | PacketFlag::RECURSION_AVAILABLE,
                );
                reply.questions.push(question.clone());
                match self.vips.for_name(key) {
                    None => *reply.rcode_mut() = RCODE::ServerFailure,
                    // Other types (AAAA) get an empty answer: the name has
                    // an IPv4 address only.
                    Some(ip) if question.qtype == QTYPE::TYPE(TYPE::A) => {
                        reply.answers.push(ResourceRecord::new(
                            question.qname.clone(),
                            CLASS::IN,
                            TTL,
                            RData::A(A {
                                address: u32::from(ip),
                            }),
                        ));
                    }
                    Some(_) => {}
                }
                return reply.build_bytes_vec().ok();
            }
        }
        self.forward(query).await
    }

    /// Asks the upstream resolver, over UDP, and returns its answer.
    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        let upstream = self.upstream?;
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(bind).await.ok()?;
        s.connect(upstream).await.ok()?;
        s.send(query).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(UPSTREAM_WAIT, s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut q = Packet::new_query(id);
        q.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        q.build_bytes_vec().expect("query")
    }

    /// A resolver that answers every query with its own bytes, marked.
    async fn fake_upstream() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = s.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                let mut answer = buf[..n].to_vec();
                answer.extend_from_slice(b"upstream");
                let _ = s.send_to(&answer, peer).await;
            }
        });
        addr
    }

    fn dns(upstream: Option<SocketAddr>) -> Dns {
        let names = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::transport::tls::PeerNames::new(),
        ));
        let (control, _asks) = Subscriptions::new(std::iter::empty());
        Dns {
            routes: Arc::new(Routes::new(names, "")),
            control: Arc::new(control),
            vips: Arc::new(Vips::default()),
            upstream,
        }
    }

    #[tokio::test]
    async fn names_outside_the_mesh_are_asked_of_the_host_resolver() {
        let d = dns(Some(fake_upstream().await));
        let q = query("api.example.com", 7);
        let a = d.answer(&q).await.expect("answered");
        assert!(a.starts_with(&q) && a.ends_with(b"upstream"));
        // A mesh-like name the mesh does not know (here: no control plane
        // to ask) is asked upstream too.
        let q = query("catalog", 8);
        assert!(d.answer(&q).await.expect("answered").ends_with(b"upstream"));
        // Without a resolver there is no answer; garbage gets none either.
        assert_eq!(dns(None).answer(&query("example.com", 9)).await, None);
        assert_eq!(d.answer(b"\x01\x02").await, None);
    }

    #[test]
    fn the_first_nameserver_of_resolv_conf() {
        let conf = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(
            upstream_of(conf),
            Some("10.0.0.2:53".parse().expect("addr"))
        );
        assert_eq!(upstream_of("options ndots:5\n"), None);
    }
}
