//! Egress: calls from the app to hosts outside the mesh, through the HTTP
//! proxy port.
//!
//! A host that is not a mesh service is looked up in the ExternalServices
//! of the snapshot (exact names, then `*.` wildcards, longest first). A
//! listed host is called as that ExternalService: its ports, its access
//! policy (checked here, by the caller's own sidecar, with the caller's
//! own identity) and, for plain HTTP, its TrafficPolicy (timeouts,
//! retries) through the usual stack. A host no ExternalService lists is
//! called only in the `allow-all` egress mode, and is counted under one
//! label ([`UNLISTED`]) so that the golden signals stay bounded whatever
//! the app calls. A refusal is `403 egress-denied`.
//!
//! Plain HTTP goes down the outbound stack like a mesh call: [`Egress`]
//! builds the destination for a host and port on first use (one backend,
//! one endpoint named by the host, resolved when a connection is opened,
//! with a pool of plain connections) and keeps it while the routing table
//! lasts. `CONNECT host:port` ([`ConnectLayer`], above discovery) opens a
//! tunnel: the sidecar connects, answers `200`, and relays bytes; the
//! app's TLS passes through untouched.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::Authority;
use http::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tandem_config::authz::{AuthzRequest, Caller, Verdict};
use tandem_config::snapshot::{
    self, Authz, EgressMode, ExternalPort, ExternalProtocol, Policy, Protocol,
};
use tandem_runtime::sync::Mutex;

use crate::balance::ewma::EndpointLoad;
use crate::balance::pick::Lb;
use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::policy::overload::Limits;
use crate::policy::RuntimePolicy;
use crate::routing::{Backend, Destination, Endpoint, Kept, Routes};
use crate::svc::{layer, Service};
use crate::telemetry::metrics::{Direction, Metrics, Name, TcpLabels};
use crate::transport::tcp::{relay, Target};

/// The destination label of every call to a host no ExternalService lists.
pub(crate) use tandem_config::snapshot::UNLISTED_EGRESS as UNLISTED;

/// Destinations one routing table keeps built; past this it starts over
/// (an app calling ever new hosts cannot grow the sidecar).
const MAX_BUILT: usize = 1024;

/// This sidecar's own identity: the caller of its egress.
pub(crate) struct Me {
    pub(crate) id: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    /// Its listeners, which no call outside the mesh may go to.
    pub(crate) own: Arc<crate::transport::tls::OwnAddrs>,
}

impl Me {
    fn caller(&self) -> Caller<'_> {
        Caller {
            id: &self.id,
            namespace: &self.namespace,
            service: &self.service,
        }
    }
}

/// The egress half of a routing table.
pub(crate) struct Egress {
    mode: EgressMode,
    services: Vec<External>,
    exact: HashMap<Box<str>, usize>,
    /// `.example.com` for `*.example.com`, longest first.
    wildcards: Vec<(Box<str>, usize)>,
    built: Mutex<HashMap<HostPort, Arc<Destination>>>,
    unlisted: Name,
    /// The namespaces of the mesh's services ([`maybe_mesh`]).
    namespaces: HashSet<Box<str>>,
}

type HostPort = (Box<str>, u16);

struct External {
    name: Name,
    /// `external/namespace/name`: keys what is kept across tables.
    key: String,
    ports: Vec<ExternalPort>,
    policy: Option<Policy>,
    authz: Authz,
}

/// Whom an outside host belongs to: an ExternalService (its index) or
/// none.
pub(crate) type Listed = Option<usize>;

impl Egress {
    pub(crate) fn build(e: &snapshot::Egress) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, s) in e.services.iter().enumerate() {
            for h in &s.hosts {
                match h.strip_prefix('*') {
                    Some(suffix) => wildcards.push((Box::from(suffix), i)),
                    None => {
                        exact.entry(Box::from(h.as_str())).or_insert(i);
                    }
                }
            }
        }
        wildcards.sort_by_key(|(s, _): &(Box<str>, usize)| std::cmp::Reverse(s.len()));
        Egress {
            mode: e.mode,
            services: e
                .services
                .iter()
                .map(|s| External {
                    name: Name::from(s.name.as_str()),
                    key: format!("external/{}/{}", s.namespace, s.name),
                    ports: s.ports.clone(),
                    policy: s.policy.clone(),
                    authz: s.authz.clone(),
                })
                .collect(),
            exact,
            wildcards,
            built: Mutex::new(HashMap::new()),
            unlisted: Name::from(UNLISTED),
            namespaces: e.namespaces.iter().map(|n| Box::from(n.as_str())).collect(),
        }
    }

    /// Whether `host` may name a mesh service ([`maybe_mesh`]).
    pub(crate) fn maybe_mesh(&self, host: &str) -> bool {
        maybe_mesh(host, &self.namespaces)
    }

    /// The ExternalService listing `host` (lower case), if any.
    pub(crate) fn listed(&self, host: &str) -> Listed {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(&**suffix))
            .map(|&(_, i)| i)
    }

    /// The label of calls to `listed`.
    pub(crate) fn name(&self, listed: Listed) -> &Name {
        match listed {
            Some(i) => &self.services[i].name,
            None => &self.unlisted,
        }
    }

    /// May this sidecar call `host:port`? The egress mode for an unlisted
    /// host; for a listed one its ports (no tunnel to an `http` one) and
    /// its access policy (`method` and `path` empty: a tunnel).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check<'a>(
        &self,
        listed: Listed,
        host: &str,
        port: u16,
        me: &'a Me,
        method: &'a str,
        path: &'a str,
        query: &'a str,
        header: &'a dyn Fn(&str) -> Vec<&'a str>,
    ) -> Result<(), Error> {
        let denied = |why: String| Err(Error::new(MeshError::EgressDenied, why));
        let Some(i) = listed else {
            return match self.mode {
                EgressMode::AllowAll => Ok(()),
                EgressMode::RegistryOnly => denied(format!(
                    "`{host}` is outside the mesh and no ExternalService lists it (egress mode registry-only)"
                )),
            };
        };
        let s = &self.services[i];
        // A tunnel (no method: CONNECT, or bytes relayed) to a port that
        // takes plain HTTP would carry requests past the HTTP rules.
        if method.is_empty()
            && s.ports
                .iter()
                .any(|p| p.port == port && p.protocol == ExternalProtocol::Http)
        {
            return denied(format!(
                "port {port} of ExternalService `{}` is http: send it requests, not a tunnel",
                s.name.0
            ));
        }
        if !s.ports.iter().any(|p| p.port == port) {
            let ports: Vec<String> = s.ports.iter().map(|p| p.port.to_string()).collect();
            return denied(format!(
                "ExternalService `{}` does not list port {port} (it lists {})",
                s.name.0,
                ports.join(", ")
            ));
        }
        if s.authz.is_open() {
            return Ok(());
        }
        let r = AuthzRequest {
            caller: Some(me.caller()),
            port,
            method,
            path,
            query,
            header,
        };
        let d = s.authz.decide(&r);
        if d.verdict == Verdict::Allow {
            return Ok(());
        }
        tracing::info!(
            external = %s.name.0,
            %host,
            port,
            method,
            path,
            "access policy: egress denied"
        );
        denied(format!(
            "the access policy of ExternalService `{}` does not let {} call it",
            s.name.0, me.id
        ))
    }

    /// Whether calls to `listed` are checked against an access policy.
    pub(crate) fn has_policy(&self, listed: Listed) -> bool {
        listed.is_some_and(|i| !self.services[i].authz.is_open())
    }

    /// The destination plain HTTP calls to `host:port` go to, built on
    /// first use.
    pub(crate) fn destination(
        &self,
        listed: Listed,
        host: &str,
        port: u16,
        kept: &Kept,
    ) -> Result<Arc<Destination>, Error> {
        let key = (Box::from(host), port);
        if let Some(d) = self.built.lock().get(&key) {
            return Ok(d.clone());
        }
        let bad = || {
            Error::new(
                MeshError::BadRequest,
                format!("`{host}:{port}` is not a host"),
            )
        };
        let authority = Authority::try_from(join(host, port).as_str()).map_err(|_| bad())?;
        let header = http::HeaderValue::try_from(authority.as_str()).map_err(|_| bad())?;
        // The endpoint's load is its own: an outside host is never
        // balanced against another.
        let addr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_or_else(
                |_| SocketAddr::from(([0, 0, 0, 0], port)),
                |ip| SocketAddr::new(ip, port),
            );
        let name = self.name(listed).clone();
        let external = listed.map(|i| &self.services[i]);
        let endpoints = vec![Endpoint {
            pool: kept.pool(&authority, false, false),
            authority,
            server_name: None,
            meshed: false,
            load: Arc::new(EndpointLoad::new(addr)),
        }];
        let lb = Lb::new(&Default::default(), &endpoints);
        let dest = Arc::new(Destination {
            name: name.clone(),
            protocol: Protocol::Http,
            default_port: port,
            authority: header,
            routes: Vec::new(),
            route_names: Vec::new(),
            totals: Vec::new(),
            backends: vec![Backend {
                name,
                endpoints,
                tiers: vec![1],
                lb,
                ejecting: Mutex::new(()),
            }],
            policy: external.and_then(|e| {
                let p = e.policy.as_ref()?;
                Some(RuntimePolicy::build(&e.key, p, kept))
            }),
            route_policies: Vec::new(),
            filters: Vec::new(),
        });
        let mut built = self.built.lock();
        if built.len() >= MAX_BUILT {
            built.clear();
        }
        built.insert(key, dest.clone());
        Ok(dest)
    }
}

/// `host:port`, with an IPv6 address in brackets.
fn join(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Whether `host` may be a mesh service's name: `name`, `name.namespace`
/// or `name.namespace.svc...`, where `namespace` has services (when the
/// snapshot says which do). Anything else (an IP address, `example.com`,
/// a name of three labels or more not under `.svc`) is outside the mesh,
/// without asking the control plane.
pub(crate) fn maybe_mesh(host: &str, namespaces: &HashSet<Box<str>>) -> bool {
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return false;
    }
    let mut labels = host.split('.');
    let _ = labels.next();
    let ns = labels.next();
    let known = |ns: &str| namespaces.is_empty() || namespaces.contains(ns);
    match (ns, labels.next()) {
        (None, _) => true,
        (Some(ns), None | Some("svc")) => known(ns),
        _ => false,
    }
}

layer!(
    /// The HTTP proxy port's `CONNECT host:port`: a tunnel to a host
    /// outside the mesh, under the egress rules. Every other request
    /// passes, and so does every request on a port other than the HTTP
    /// proxy port (`enabled` false).
    ConnectLayer => Connect {
        enabled: bool,
        routes: Arc<Routes>,
        me: Arc<Me>,
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
    }
);

impl<S: Service> Service for Connect<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        if !self.enabled || req.method() != Method::CONNECT {
            return self.inner.call(req, ctx).await;
        }
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(Error::new(
                MeshError::BadRequest,
                "CONNECT names no host:port",
            ));
        };
        let host = authority.host().to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Some(port) = authority.port_u16() else {
            return Err(Error::new(MeshError::BadRequest, "CONNECT needs host:port"));
        };
        // One table for the decision; none is held while connecting.
        {
            let routing = self.routes.load();
            if routing
                .destination(super::discover::destination_key(host))
                .is_some()
            {
                return Err(Error::new(
                    MeshError::BadRequest,
                    format!("`{host}` is a mesh service: call it over plain HTTP, and its sidecar adds mTLS"),
                ));
            }
            let listed = routing.egress.listed(host);
            let none = |_: &str| -> Vec<&str> { Vec::new() };
            routing
                .egress
                .check(listed, host, port, &self.me, "", "", "", &none)?;
            ctx.dst = routing.egress.name(listed).clone();
        }
        ctx.port = Some(port);
        let Some(slot) = self.limits.connection() else {
            return Err(Error::new(
                MeshError::Overloaded,
                "this sidecar is at its limit of connections",
            ));
        };
        let up = crate::transport::tls::connect_host(host, port, &self.me.own)
            .await
            .map_err(|e| {
                Error::new(
                    MeshError::ConnectFailure,
                    format!("connect to {}: {e}", join(host, port)),
                )
            })?;
        let labels = TcpLabels {
            direction: Direction::outbound,
            src_service: ctx.src.clone(),
            dst_service: ctx.dst.clone(),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match upgrade.await {
                Ok(down) => relay(TokioIo::new(down), Target::Open(up), &metrics, labels).await,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT: the client's connection was not upgraded")
                }
            }
        });
        Ok(Response::new(Body::empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::snapshot::{External as SExternal, ExternalProtocol};

    fn egress(mode: EgressMode) -> Egress {
        Egress::build(&snapshot::Egress {
            mode,
            namespaces: vec!["default".into()],
            services: vec![
                SExternal {
                    name: "stripe".into(),
                    namespace: "default".into(),
                    hosts: vec!["api.stripe.com".into(), "*.stripe.net".into()],
                    ports: vec![ExternalPort {
                        port: 443,
                        protocol: ExternalProtocol::Tls,
                    }],
                    policy: None,
                    authz: Authz::default(),
                },
                SExternal {
                    name: "deep".into(),
                    namespace: "default".into(),
                    hosts: vec!["*.eu.stripe.net".into()],
                    ports: vec![ExternalPort {
                        port: 80,
                        protocol: ExternalProtocol::Http,
                    }],
                    policy: None,
                    authz: Authz::default(),
                },
            ],
        })
    }

    fn me() -> Me {
        Me {
            id: "spiffe://tandem.local/ns/default/svc/web".into(),
            namespace: "default".into(),
            service: "web".into(),
            own: Default::default(),
        }
    }

    #[test]
    fn hosts_are_matched_exactly_then_by_the_longest_wildcard() {
        let e = egress(EgressMode::AllowAll);
        assert_eq!(e.listed("api.stripe.com"), Some(0));
        assert_eq!(e.listed("files.stripe.net"), Some(0));
        assert_eq!(e.listed("a.eu.stripe.net"), Some(1));
        // A wildcard needs a label in front of it.
        assert_eq!(e.listed("stripe.net"), None);
        assert_eq!(e.listed("example.com"), None);
    }

    #[test]
    fn the_mode_and_the_ports_decide() {
        let none = |_: &str| -> Vec<&str> { Vec::new() };
        let me = me();
        let open = egress(EgressMode::AllowAll);
        assert!(open
            .check(None, "example.com", 80, &me, "GET", "/", "", &none)
            .is_ok());
        let closed = egress(EgressMode::RegistryOnly);
        let e = closed
            .check(None, "example.com", 80, &me, "GET", "/", "", &none)
            .expect_err("unlisted");
        assert_eq!(e.kind, MeshError::EgressDenied);
        assert!(e.detail.contains("registry-only"), "{}", e.detail);
        assert!(closed
            .check(Some(0), "api.stripe.com", 443, &me, "", "", "", &none)
            .is_ok());
        let e = closed
            .check(Some(0), "api.stripe.com", 80, &me, "", "", "", &none)
            .expect_err("port");
        assert!(e.detail.contains("does not list port 80"), "{}", e.detail);
        // A tunnel to an http port is refused; requests to it pass.
        let e = closed
            .check(Some(1), "a.eu.stripe.net", 80, &me, "", "", "", &none)
            .expect_err("tunnel");
        assert!(e.detail.contains("not a tunnel"), "{}", e.detail);
        assert!(closed
            .check(Some(1), "a.eu.stripe.net", 80, &me, "GET", "/", "", &none)
            .is_ok());
    }

    #[test]
    fn mesh_names_are_told_from_outside_hosts() {
        let unknown = HashSet::new();
        assert!(maybe_mesh("catalog", &unknown));
        assert!(maybe_mesh("catalog.shop", &unknown));
        assert!(maybe_mesh("catalog.shop.svc.cluster.local", &unknown));
        assert!(!maybe_mesh("api.stripe.com", &unknown));
        assert!(!maybe_mesh("10.0.0.1", &unknown));
        assert!(!maybe_mesh("::1", &unknown));
        // With the mesh's namespaces known, `example.com` is outside
        // without a question to the control plane.
        let known: HashSet<Box<str>> = ["default".into(), "shop".into()].into();
        assert!(maybe_mesh("catalog", &known));
        assert!(maybe_mesh("catalog.shop", &known));
        assert!(maybe_mesh("catalog.shop.svc.cluster.local", &known));
        assert!(!maybe_mesh("example.com", &known));
        assert!(!maybe_mesh("api.example.svc", &known));
    }

    #[test]
    fn destinations_are_built_once_per_host_and_port() {
        let e = egress(EgressMode::AllowAll);
        let kept = Kept::default();
        let a = e
            .destination(None, "example.com", 80, &kept)
            .expect("built");
        let b = e
            .destination(None, "example.com", 80, &kept)
            .expect("built");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a.name.0, UNLISTED);
        let c = e
            .destination(Some(1), "x.eu.stripe.net", 80, &kept)
            .expect("built");
        assert_eq!(&*c.name.0, "deep");
        assert_eq!(
            c.backends[0].endpoints[0].authority.as_str(),
            "x.eu.stripe.net:80"
        );
        let v6 = e.destination(None, "::1", 8080, &kept).expect("built");
        assert_eq!(v6.backends[0].endpoints[0].authority.as_str(), "[::1]:8080");
    }
}
