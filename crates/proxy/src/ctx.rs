//! The request context: one value per request, made when the request
//! arrives and carried to the end of its response body ([`crate::body::Served`]).
//! Every layer reads what the layers above decided (the caller, the
//! destination, the route rule, the deadline) and writes what it decides
//! (the endpoint, the tries, the flag), so a new layer needs no new
//! arguments anywhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use rustls_pki_types::ServerName;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::error::MeshError;
use crate::policy::circuit::InProgress;
use crate::policy::deadline::Propagated;
use crate::routing::{Destination, Endpoint};
use crate::telemetry::metrics::{Direction, Name};
use crate::telemetry::record::Recording;
use crate::telemetry::trace::TraceContext;
use crate::transport::pool::Stream;

/// The verified caller of an inbound connection.
pub(crate) struct Peer {
    /// Its full SPIFFE ID (`spiffe://td/ns/NS/svc/SVC`): what per-caller
    /// policy keys on, so services of the same name in two namespaces are
    /// two callers.
    pub(crate) id: Arc<str>,
    /// Its namespace and service, as the ID names them (access policy).
    pub(crate) namespace: Arc<str>,
    pub(crate) name: Arc<str>,
    /// Metric label: the calling service's name.
    pub(crate) service: Name,
    /// The `tandem-client-id` value handed to the app.
    pub(crate) client_id: HeaderValue,
}

/// When things happened to the request.
pub(crate) struct Timings {
    /// The request's head was read (its deadline counts from here).
    pub(crate) accepted: Instant,
    /// The upstream's response headers arrived (last try).
    pub(crate) upstream_headers: Option<Instant>,
    /// The response body ended or the caller went away.
    pub(crate) done: Option<Instant>,
    /// Time spent waiting on others before the response headers: tries
    /// (connection, network, the destination or the app), a retry's
    /// backoff, an injected delay. The rest is the sidecar's own.
    pub(crate) waited: Duration,
    /// The sidecar's own time up to the response headers.
    pub(crate) own: Option<Duration>,
    /// Since when the request waits, while it does (a wait cut short by a
    /// deadline is closed by [`Timings::own`]).
    waiting_since: Option<Instant>,
}

impl Timings {
    pub(crate) fn wait_start(&mut self) {
        self.waiting_since = Some(Instant::now());
    }

    pub(crate) fn wait_end(&mut self) {
        if let Some(t) = self.waiting_since.take() {
            self.waited += t.elapsed();
        }
    }

    /// The time from arrival to `now` and the sidecar's own part of it.
    pub(crate) fn own(&mut self, now: Instant) -> (Duration, Duration) {
        if let Some(t) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(t);
        }
        let total = now.saturating_duration_since(self.accepted);
        let own = total.saturating_sub(self.waited);
        self.own = Some(own);
        (total, own)
    }
}

/// Places the request holds until its response body ends.
#[derive(Default)]
pub(crate) struct Held {
    /// In the sidecar's `--max-requests`.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
    /// In the destination's `circuitBreaker.maxRequests`.
    pub(crate) in_progress: Option<InProgress>,
    /// A stream of an HTTP/2 connection to the endpoint or the app.
    pub(crate) stream: Option<Stream>,
}

pub(crate) struct RequestCtx {
    pub(crate) direction: Direction,
    /// Metric labels: the calling service and the service called (the
    /// backend once one is chosen).
    pub(crate) src: Name,
    pub(crate) dst: Name,
    /// Inbound: the caller's verified identity (`None` for plaintext in
    /// permissive mode).
    pub(crate) caller: Option<Arc<Peer>>,
    /// Inbound: the address of the connection's other end.
    pub(crate) remote: Option<SocketAddr>,
    /// What earlier hops sent along (`tandem-ctx-*`, `grpc-timeout`).
    pub(crate) propagated: Propagated,
    /// Outbound: the destination, and the route rule, backend and ring-hash
    /// key chosen for the request.
    pub(crate) dest: Option<Arc<Destination>>,
    pub(crate) port: Option<u16>,
    pub(crate) rule: Option<usize>,
    pub(crate) backend: usize,
    /// The rule's backendRef the request goes to (an index into the
    /// rule's weighted backends).
    pub(crate) backend_ref: Option<usize>,
    pub(crate) hash_key: Option<u64>,
    /// The endpoint of the current try (an index into the backend's).
    pub(crate) endpoint: Option<usize>,
    /// Endpoints of earlier tries (a retry goes elsewhere when it can).
    pub(crate) tried: Vec<SocketAddr>,
    pub(crate) tries: u32,
    /// This sidecar may try the request more than once.
    pub(crate) retrying: bool,
    /// When the request must be answered: the sooner of the policy's
    /// timeout and the caller's deadline, and whether it is the caller's
    /// (a try cut off by the policy's own counts against the endpoint; by
    /// the caller's, it says nothing about it).
    pub(crate) deadline: Option<Instant>,
    pub(crate) deadline_is_callers: bool,
    /// The current try was cut off by the caller's deadline.
    pub(crate) cut_by_caller: bool,
    /// The current try has a connection (or is opening one): time from
    /// here on is the endpoint's, not this sidecar's queue.
    pub(crate) sent: bool,
    /// The flag of the answer, when the mesh made or changed it.
    pub(crate) flag: Option<MeshError>,
    /// The flag another sidecar put on the answer it sent (read from the
    /// wire once, by the layer that received it).
    pub(crate) upstream_flag: Option<MeshError>,
    pub(crate) status: u16,
    pub(crate) timings: Timings,
    /// The trace the request belongs to: this sidecar's span in it (or,
    /// with tracing off, the caller's trace as it came).
    pub(crate) span: Option<TraceContext>,
    /// A request sampled for spans or the access log, or tapped, recorded
    /// as it goes.
    pub(crate) recording: Option<Box<Recording>>,
    /// Bytes of the response body sent so far.
    pub(crate) response_bytes: u64,
    pub(crate) held: Held,
}

impl RequestCtx {
    pub(crate) fn new(direction: Direction, src: Name, dst: Name) -> Self {
        RequestCtx {
            direction,
            src,
            dst,
            caller: None,
            remote: None,
            propagated: Propagated::default(),
            dest: None,
            port: None,
            rule: None,
            backend: 0,
            backend_ref: None,
            hash_key: None,
            endpoint: None,
            tried: Vec::new(),
            tries: 0,
            retrying: false,
            deadline: None,
            deadline_is_callers: false,
            cut_by_caller: false,
            sent: false,
            flag: None,
            upstream_flag: None,
            status: 0,
            timings: Timings {
                accepted: Instant::now(),
                upstream_headers: None,
                done: None,
                waited: Duration::ZERO,
                own: None,
                waiting_since: None,
            },
            span: None,
            recording: None,
            response_bytes: 0,
            held: Held::default(),
        }
    }

    /// The current try's endpoint.
    fn endpoint(&self) -> Option<&Endpoint> {
        self.dest
            .as_ref()?
            .backends
            .get(self.backend)?
            .endpoints
            .get(self.endpoint?)
    }

    /// The address of the current try's endpoint.
    pub(crate) fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.endpoint().map(Endpoint::addr)
    }

    /// The mTLS server name of the current try's endpoint, if meshed: it
    /// names the identity the endpoint must prove
    /// (`tandem_identity::tls::expected_id`).
    pub(crate) fn endpoint_server_name(&self) -> Option<ServerName<'static>> {
        self.endpoint()?.server_name.clone()
    }

    /// The response body ended (`complete`) or was dropped: the request
    /// gives back what it holds, and is summed up in a debug log line.
    pub(crate) fn finish(&mut self, complete: bool) {
        if self.timings.done.is_some() {
            return;
        }
        let now = Instant::now();
        self.timings.done = Some(now);
        self.held = Held::default();
        self.end_recording(now);
        let t = &self.timings;
        tracing::debug!(
            direction = ?self.direction,
            src = %self.src.0,
            dst = %self.dst.0,
            caller = self.caller.as_ref().map(|c| &*c.id),
            status = self.status,
            flag = self.flag.map(MeshError::reason),
            upstream_flag = self.upstream_flag.map(MeshError::reason),
            tries = self.tries,
            endpoint = ?self.endpoint_addr(),
            total_ms = now.duration_since(t.accepted).as_secs_f64() * 1e3,
            upstream_ms = t.upstream_headers.map(|u| u.duration_since(t.accepted).as_secs_f64() * 1e3),
            waited_ms = t.waited.as_secs_f64() * 1e3,
            trace_id = self.span.as_ref().map(|s| s.trace_id_hex()),
            complete,
            "request done"
        );
    }
}
