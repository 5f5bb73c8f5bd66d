//! Connection pools: one per endpoint (address, TLS or not, HTTP version),
//! kept with the endpoint across routing tables, plus one per HTTP version
//! towards the local app.
//!
//! - HTTP/1.1: a stack of idle connections. A request takes the most
//!   recently used one that is still open, or opens a new one. After the
//!   response body ends the connection goes back on the stack; idle ones
//!   are closed after [`IDLE_TIMEOUT`]; beyond the [`KEEP_IDLE`] most
//!   recently used, after [`BURST_IDLE_TIMEOUT`] (what a burst of
//!   concurrent requests left behind goes soon, with its buffers).
//! - HTTP/2: connections shared by up to [`H2_MAX_STREAMS`] requests each.
//!   When every one is that busy, the next request opens another while
//!   the ones after it wait for it. Each connection's window holds all its
//!   streams' windows, so streams whose reader stopped reading take only
//!   their own window, never the room of the other streams on the
//!   connection; and requests held for long (long polls, streaming calls)
//!   take only their own stream slot.
//!
//! A request that was never written (the connection closed just before)
//! is sent again on another connection. A connection switched to another
//! protocol (WebSocket) belongs to its tunnel: it leaves the pool and its
//! counts.
//!
//! A destination's `circuitBreaker.maxConnections` caps the connections
//! this sidecar keeps open to its endpoints: at the cap, a request waits
//! for one of the endpoint's connections to come back (HTTP/1.1) or for a
//! stream of one to end (HTTP/2); `maxPendingRequests` of them may wait,
//! more overflow at once. As in
//! Envoy, an endpoint without any connection may always open one, so idle
//! connections to other endpoints never starve it: the cap can be passed
//! by at most the number of endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tandem_runtime::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::Body;
use crate::transport::tls::{BoxError, Connector};

/// How long an idle HTTP/1.1 connection is kept.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections of an endpoint kept for [`IDLE_TIMEOUT`]; the
/// ones used less recently than these are closed after
/// [`BURST_IDLE_TIMEOUT`].
pub(crate) const KEEP_IDLE: usize = 16;
pub(crate) const BURST_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a request waits for a connection at the destination's cap.
pub(crate) const PENDING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a request not yet written is sent again on a fresh connection.
const UNSENT_RETRIES: usize = 3;

// What one connection may hold in memory for a peer that does not read
// (a stalled client must not grow the sidecar; see docs/policy/overload.md).
// An HTTP/1.1 connection buffers at most a response head or this much of
// a body; an HTTP/2 connection accepts at most these windows of data the
// sidecar has not forwarded yet, and buffers at most this much per stream
// for sending.
/// Most bytes an HTTP/1.1 client connection reads ahead, which is also the
/// largest response head it takes.
pub(crate) const H1_BUFFER: usize = 16 * 1024;
/// Most streams one HTTP/2 connection carries: the pool opens another
/// connection beyond, and the sidecar's listeners allow a peer this many.
pub(crate) const H2_MAX_STREAMS: usize = 100;
pub(crate) const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Room for the windows of all the streams of a connection (25 MiB), so a
/// stream whose data nobody reads cannot stop the others: the flow
/// control of HTTP/2 counts unread data against the stream and the
/// connection alike.
pub(crate) const H2_CONN_WINDOW: u32 = H2_STREAM_WINDOW * H2_MAX_STREAMS as u32;
pub(crate) const H2_SEND_BUFFER: usize = 64 * 1024;

/// Why a request got no response from the pool.
pub(crate) enum PoolError {
    /// No connection could be opened (TCP or TLS).
    Connect(BoxError),
    /// The connection failed once the request was (or may have been) sent.
    Send(hyper::Error),
    /// The destination is at its connection cap and its queue is full (or
    /// the wait was too long).
    Overflow(&'static str),
    /// Never written: the connection closed just before (internal).
    Unsent(Box<Request<Body>>),
}

/// Connections and waiting requests of one destination, shared by its
/// endpoints' pools and kept across routing tables.
#[derive(Default)]
pub(crate) struct DestConns {
    open: AtomicUsize,
    pending: AtomicUsize,
    /// A connection of the destination closed.
    freed: Notify,
}

/// A destination's limits, as its policy sets them.
#[derive(Clone)]
pub(crate) struct ConnLimits {
    pub(crate) max_connections: usize,
    pub(crate) max_pending: usize,
    pub(crate) conns: Arc<DestConns>,
}

pub(crate) struct Pool {
    /// `http://ip:port` or `https://ip:port`, for the connector.
    uri: Uri,
    h2: bool,
    /// Connections of this endpoint, busy or idle.
    open: AtomicUsize,
    state: Mutex<State>,
    /// A connection of this endpoint came back idle or closed, or an
    /// HTTP/2 connect attempt ended.
    returned: Notify,
}

#[derive(Default)]
struct State {
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The HTTP/2 connections, oldest first.
    shared: Vec<Shared>,
    /// An HTTP/2 connect attempt is under way.
    connecting: bool,
    /// HTTP/2 connect attempts so far, and the last one that failed with
    /// its error (for the requests that waited on it).
    attempt: u64,
    failed: Option<(u64, SharedError)>,
    sweeping: bool,
}

/// An HTTP/2 connection of the pool.
struct Shared {
    tx: http2::SendRequest<Body>,
    /// Its streams in flight (requests holding a [`Stream`]).
    streams: Arc<AtomicUsize>,
    /// When a request last took it.
    used: Instant,
}

impl Shared {
    fn take(&mut self, pool: &Arc<Pool>, now: Instant) -> Sender {
        self.streams.fetch_add(1, Ordering::AcqRel);
        self.used = now;
        Sender::H2(
            self.tx.clone(),
            Stream {
                streams: self.streams.clone(),
                pool: Arc::downgrade(pool),
            },
        )
    }
}

/// A request's stream on an HTTP/2 connection of the pool, held until its
/// response body ends (it rides in the request's context).
pub(crate) struct Stream {
    streams: Arc<AtomicUsize>,
    pool: Weak<Pool>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A connection that was full has room again: wake a request that
        // waits at the destination's connection cap.
        if self.streams.fetch_sub(1, Ordering::AcqRel) == H2_MAX_STREAMS {
            if let Some(p) = self.pool.upgrade() {
                p.returned.notify_one();
            }
        }
    }
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>, Stream),
}

/// A new connection, before the pool takes it.
enum Handshaken {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// What a request does next, decided under the pool's lock.
enum Next {
    Go(Go),
    /// Wait for HTTP/2 connect attempt n, made by another request.
    WaitConnect(u64),
    /// The destination is at its cap: wait for a connection.
    AtCap,
}

/// A request that can go now.
enum Go {
    Send(Sender),
    /// Open a connection (for HTTP/2: connect attempt n).
    Open(Opened, u64),
}

/// A failed connect, given to every request that waited on it.
#[derive(Clone, Debug)]
struct SharedError(Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection attempt this request waited for failed")
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Counts one open connection until the connection's task ends.
struct Opened {
    pool: Weak<Pool>,
    dest: Option<Arc<DestConns>>,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(p) = self.pool.upgrade() {
            p.open.fetch_sub(1, Ordering::AcqRel);
            p.returned.notify_one();
        }
        if let Some(d) = &self.dest {
            d.open.fetch_sub(1, Ordering::AcqRel);
            d.freed.notify_waiters();
        }
    }
}

/// Counts one waiting request.
struct Waiting<'a>(&'a DestConns);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    pub(crate) fn new(uri: Uri, h2: bool) -> Pool {
        Pool {
            uri,
            h2,
            open: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            returned: Notify::new(),
        }
    }

    /// `http://ip:port` or `https://ip:port`.
    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Sends `req` (origin-form URI for HTTP/1.1, absolute for HTTP/2) on
    /// a connection of this endpoint. `sent` is set once the request has a
    /// connection or is opening one: time spent before that is this
    /// sidecar's own queue.
    pub(crate) async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        mut req: Request<Body>,
        limits: Option<&ConnLimits>,
        sent: &mut bool,
    ) -> Result<(Response<Incoming>, Option<Stream>), PoolError> {
        let mut unsent = 0;
        let mut waiting: Option<Waiting<'_>> = None;
        let mut waited_since: Option<Instant> = None;
        'request: loop {
            let go = 'look: {
                if let Next::Go(go) = self.next(limits) {
                    break 'look go;
                }
                // Registered, then a second look: a connection coming back
                // between the look and the wait is not missed.
                let returned = self.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                let freed = limits.map(|l| l.conns.freed.notified());
                let attempt = match self.next(limits) {
                    Next::Go(go) => break 'look go,
                    Next::WaitConnect(n) => Some(n),
                    Next::AtCap => None,
                };
                self.wait(
                    attempt,
                    returned,
                    freed,
                    limits,
                    &mut waiting,
                    &mut waited_since,
                )
                .await?;
                continue 'request;
            };
            drop(waiting.take());
            match self.dispatch(connector, go, req, &mut *sent, unsent).await {
                Err(PoolError::Unsent(r)) => {
                    unsent += 1;
                    req = *r;
                }
                other => return other,
            }
        }
    }

    /// Waits for a request's turn: a connection of this endpoint coming
    /// back or closing, one of the destination's closing, or the end of
    /// HTTP/2 connect `attempt` (whose failure is the request's too). A
    /// request waiting at the cap counts in `maxPendingRequests` once, in
    /// `waiting`; no request waits longer than [`PENDING_TIMEOUT`].
    async fn wait<'a>(
        &self,
        attempt: Option<u64>,
        returned: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        freed: Option<tokio::sync::futures::Notified<'_>>,
        limits: Option<&'a ConnLimits>,
        waiting: &mut Option<Waiting<'a>>,
        waited_since: &mut Option<Instant>,
    ) -> Result<(), PoolError> {
        if let (None, Some(l), None) = (attempt, limits, &*waiting) {
            let queued = l.conns.pending.fetch_add(1, Ordering::AcqRel);
            let w = Waiting(&l.conns);
            if queued >= l.max_pending {
                return Err(PoolError::Overflow(
                    "the destination is at its maxConnections and its maxPendingRequests are waiting",
                ));
            }
            *waiting = Some(w);
        }
        let since = *waited_since.get_or_insert_with(Instant::now);
        let left = PENDING_TIMEOUT.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(PoolError::Overflow(
                "no connection of the destination came free in time",
            ));
        }
        let freed = async {
            match freed {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let _ = tokio::time::timeout(left, async {
            tokio::select! {
                _ = returned => {},
                _ = freed => {},
            }
        })
        .await;
        if let Some(n) = attempt {
            if let Some((m, e)) = &self.state().failed {
                if *m == n {
                    return Err(PoolError::Connect(Box::new(e.clone())));
                }
            }
        }
        Ok(())
    }

    /// Sends on the connection `go` names (opening it first if need be).
    /// A request never written, on a connection that closed just then,
    /// comes back as [`PoolError::Unsent`] for another try (a few times).
    async fn dispatch(
        self: &Arc<Self>,
        connector: &Connector,
        go: Go,
        req: Request<Body>,
        sent: &mut bool,
        unsent: usize,
    ) -> Result<(Response<Incoming>, Option<Stream>), PoolError> {
        // From here the endpoint has the request (a connect that hangs is
        // the endpoint's too).
        *sent = true;
        let sender = match go {
            Go::Send(s) => s,
            // Boxed: opening a connection (TCP, TLS handshake, HTTP
            // handshake) needs a large future, and only a few requests
            // open one; inline it would grow every request's future.
            Go::Open(opened, attempt) => Box::pin(self.connect(connector, opened, attempt))
                .await
                .map_err(PoolError::Connect)?,
        };
        let mut e = match sender {
            Sender::H1(mut tx) => match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.give_back_when_ready(tx, &resp);
                    return Ok((resp, None));
                }
                Err(e) => e,
            },
            Sender::H2(mut tx, stream) => match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(stream))),
                Err(e) => e,
            },
        };
        match e.take_message() {
            // Never written: another connection may take it.
            Some(r) if unsent < UNSENT_RETRIES => Err(PoolError::Unsent(Box::new(r))),
            _ => Err(PoolError::Send(e.into_error())),
        }
    }

    /// The next step of a request, decided under the lock: an idle HTTP/1.1
    /// connection or an HTTP/2 one with a stream free; else a new
    /// connection, unless the destination is at its cap and this endpoint
    /// already has one.
    fn next(self: &Arc<Self>, limits: Option<&ConnLimits>) -> Next {
        let mut st = self.state();
        let now = Instant::now();
        let has_one = if self.h2 {
            // Closed or draining (GOAWAY) connections take no new streams
            // and no longer count as this endpoint's connection.
            st.shared.retain(|c| !c.tx.is_closed());
            if let Some(c) = st
                .shared
                .iter_mut()
                .find(|c| c.streams.load(Ordering::Acquire) < H2_MAX_STREAMS)
            {
                return Next::Go(Go::Send(c.take(self, now)));
            }
            if st.connecting {
                return Next::WaitConnect(st.attempt);
            }
            !st.shared.is_empty()
        } else {
            while let Some((tx, since)) = st.idle.pop() {
                if tx.is_ready() && now.duration_since(since) < IDLE_TIMEOUT {
                    return Next::Go(Go::Send(Sender::H1(tx)));
                }
            }
            self.open.load(Ordering::Acquire) > 0
        };
        // Every connection is busy (HTTP/2: full), or there is none.
        match self.reserve(limits, has_one) {
            Some(opened) => {
                if self.h2 {
                    st.connecting = true;
                    st.attempt += 1;
                }
                Next::Go(Go::Open(opened, st.attempt))
            }
            None => Next::AtCap,
        }
    }

    /// Takes a place for a new connection: below the destination's cap,
    /// or as the endpoint's only one.
    fn reserve(self: &Arc<Self>, limits: Option<&ConnLimits>, has_one: bool) -> Option<Opened> {
        let dest = match limits {
            None => None,
            Some(l) => {
                l.conns
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < l.max_connections || !has_one).then_some(n + 1)
                    })
                    .ok()?;
                Some(l.conns.clone())
            }
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Opened {
            pool: Arc::downgrade(self),
            dest,
        })
    }

    async fn connect(
        self: &Arc<Self>,
        connector: &Connector,
        opened: Opened,
        attempt: u64,
    ) -> Result<Sender, BoxError> {
        /// Ends an HTTP/2 connect attempt however it ends (also when the
        /// request gives up), waking those who wait for it.
        struct Connecting<'a>(&'a Pool);
        impl Drop for Connecting<'_> {
            fn drop(&mut self) {
                if self.0.h2 {
                    self.0.state().connecting = false;
                    self.0.returned.notify_waiters();
                }
            }
        }
        let _connecting = Connecting(self);
        match self.handshake(connector, opened).await {
            Ok(Handshaken::H2(tx)) => {
                let (sender, sweep) = {
                    let mut st = self.state();
                    let mut c = Shared {
                        tx,
                        streams: Arc::new(AtomicUsize::new(0)),
                        used: Instant::now(),
                    };
                    let sender = c.take(self, Instant::now());
                    st.shared.push(c);
                    (sender, !std::mem::replace(&mut st.sweeping, true))
                };
                if sweep {
                    tokio::spawn(sweep_idle(Arc::downgrade(self)));
                }
                Ok(sender)
            }
            Ok(Handshaken::H1(tx)) => Ok(Sender::H1(tx)),
            Err(e) if self.h2 => {
                let shared = SharedError(Arc::from(e));
                self.state().failed = Some((attempt, shared.clone()));
                Err(Box::new(shared))
            }
            Err(e) => Err(e),
        }
    }

    async fn handshake(
        &self,
        connector: &Connector,
        opened: Opened,
    ) -> Result<Handshaken, BoxError> {
        let io = connector.open(&self.uri).await?;
        if self.h2 {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_connection_window_size(H2_CONN_WINDOW)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .max_send_buf_size(H2_SEND_BUFFER)
                .handshake(io)
                .await?;
            tokio::spawn(run(conn, opened));
            Ok(Handshaken::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .max_buf_size(H1_BUFFER)
                .handshake(io)
                .await?;
            tokio::spawn(run(conn.with_upgrades(), opened));
            Ok(Handshaken::H1(tx))
        }
    }

    /// Puts an HTTP/1.1 connection back once its response has been read
    /// (never after a protocol switch: the connection is the tunnel's).
    fn give_back_when_ready(
        self: &Arc<Self>,
        mut tx: http1::SendRequest<Body>,
        resp: &Response<Incoming>,
    ) {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if tx.ready().await.is_err() {
                return;
            }
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let sweep = {
                let mut st = pool.state();
                st.idle.push((tx, Instant::now()));
                !std::mem::replace(&mut st.sweeping, true)
            };
            pool.returned.notify_one();
            if sweep {
                tokio::spawn(sweep_idle(Arc::downgrade(&pool)));
            }
        });
    }
}

/// Drops the idle connections that have waited too long (`idle` is a
/// stack, most recently used last): the [`KEEP_IDLE`] on top may wait
/// [`IDLE_TIMEOUT`], the others [`BURST_IDLE_TIMEOUT`].
fn sweep<T: Idle>(idle: &mut Vec<(T, Instant)>, now: Instant) {
    let keep_from = idle.len().saturating_sub(KEEP_IDLE);
    let mut i = 0;
    idle.retain(|(tx, since)| {
        let limit = if i < keep_from {
            BURST_IDLE_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        i += 1;
        !tx.closed() && now.duration_since(*since) < limit
    });
}

/// What the sweep needs of an idle connection.
trait Idle {
    fn closed(&self) -> bool;
}

impl Idle for http1::SendRequest<Body> {
    fn closed(&self) -> bool {
        self.is_closed()
    }
}

/// Drives a connection; its place is given back when it ends.
async fn run<F: Future>(conn: F, opened: Opened) {
    let _ = conn.await;
    drop(opened);
}

/// Closes connections idle too long, while there are any: checks every
/// second while a burst's leftovers are there, else every 15 s.
async fn sweep_idle(pool: Weak<Pool>) {
    let mut pause = IDLE_TIMEOUT / 4;
    loop {
        tokio::time::sleep(pause).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut st = pool.state();
        let now = Instant::now();
        sweep(&mut st.idle, now);
        pause = if st.idle.len() > KEEP_IDLE {
            Duration::from_secs(1)
        } else {
            IDLE_TIMEOUT / 4
        };
        // An HTTP/2 connection no request took for that long is let go; it
        // closes once the streams still on it end.
        st.shared
            .retain(|c| !c.tx.is_closed() && now.duration_since(c.used) < IDLE_TIMEOUT);
        if st.idle.is_empty() && st.shared.is_empty() {
            st.sweeping = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(port: u16) -> Arc<Pool> {
        Arc::new(Pool::new(
            format!("http://127.0.0.1:{port}/").parse().expect("uri"),
            false,
        ))
    }

    fn opened(n: Next) -> Option<Opened> {
        match n {
            Next::Go(Go::Open(o, _)) => Some(o),
            _ => None,
        }
    }

    #[test]
    fn the_cap_holds_but_every_endpoint_may_have_one_connection() {
        let limits = ConnLimits {
            max_connections: 2,
            max_pending: 0,
            conns: Arc::new(DestConns::default()),
        };
        let l = Some(&limits);
        let (a, b, c) = (pool(1), pool(2), pool(3));
        let a1 = opened(a.next(l)).expect("under the cap");
        let a2 = opened(a.next(l)).expect("under the cap");
        assert!(matches!(a.next(l), Next::AtCap));
        // `b` has none yet: it may open one, past the cap, but not two.
        let b1 = opened(b.next(l)).expect("first of its endpoint");
        assert!(matches!(b.next(l), Next::AtCap));
        assert_eq!(limits.conns.open.load(Ordering::Acquire), 3);
        // Closing connections gives their places back.
        drop((a1, a2, b1));
        assert_eq!(limits.conns.open.load(Ordering::Acquire), 0);
        assert_eq!(a.open.load(Ordering::Acquire), 0);
        let _c = opened(c.next(l)).expect("room again");
        // Without limits nothing is refused.
        let all: Vec<_> = (0..10).filter_map(|_| opened(a.next(None))).collect();
        assert_eq!(all.len(), 10);
    }

    impl Idle for bool {
        fn closed(&self) -> bool {
            *self
        }
    }

    #[test]
    fn a_bursts_leftovers_go_soon_the_working_set_stays() {
        let t0 = Instant::now();
        // 40 idle connections, the oldest first; one of the recent ones
        // closed by its peer.
        let mut idle: Vec<(bool, Instant)> = (0..40)
            .map(|i| (i == 35, t0 + Duration::from_millis(i)))
            .collect();
        sweep(&mut idle, t0 + Duration::from_secs(1));
        assert_eq!(idle.len(), 39, "only the closed one goes at first");
        sweep(&mut idle, t0 + BURST_IDLE_TIMEOUT + Duration::from_secs(1));
        // The 16 most recently used stay (the closed one is gone already).
        assert_eq!(idle.len(), KEEP_IDLE);
        assert!(idle
            .iter()
            .all(|(_, since)| *since >= t0 + Duration::from_millis(23)));
        sweep(&mut idle, t0 + IDLE_TIMEOUT + Duration::from_secs(1));
        assert!(idle.is_empty());
    }

    /// A pool holding one HTTP/2 connection (to an in-memory server) that
    /// carries `streams` streams.
    async fn h2_pool(streams: usize) -> Arc<Pool> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                hyper_util::rt::TokioIo::new(b),
                hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
                }),
            ),
        );
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(a))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let p = Arc::new(Pool::new("http://127.0.0.1:1/".parse().expect("uri"), true));
        p.state().shared.push(Shared {
            tx,
            streams: Arc::new(AtomicUsize::new(streams)),
            used: Instant::now(),
        });
        p
    }

    #[tokio::test]
    async fn a_full_http2_connection_makes_the_next_request_open_another() {
        let p = h2_pool(H2_MAX_STREAMS - 1).await;
        let Next::Go(Go::Send(Sender::H2(_, last))) = p.next(None) else {
            panic!("room for one more stream");
        };
        // Full: the next request opens a second connection, and the ones
        // after it wait for that.
        assert!(matches!(p.next(None), Next::Go(Go::Open(_, 1))));
        assert!(matches!(p.next(None), Next::WaitConnect(1)));
        // A stream ends: the first connection has room again.
        drop(last);
        assert!(matches!(p.next(None), Next::Go(Go::Send(Sender::H2(..)))));
    }

    #[tokio::test]
    async fn at_the_cap_a_full_http2_endpoint_waits() {
        let p = h2_pool(H2_MAX_STREAMS).await;
        let limits = ConnLimits {
            max_connections: 1,
            max_pending: 10,
            conns: Arc::new(DestConns::default()),
        };
        limits.conns.open.store(1, Ordering::Release);
        assert!(matches!(p.next(Some(&limits)), Next::AtCap));
        // Without the cap it opens another.
        assert!(matches!(p.next(None), Next::Go(Go::Open(..))));
    }

    #[test]
    fn one_http2_connect_at_a_time() {
        let p = Arc::new(Pool::new("http://127.0.0.1:1/".parse().expect("uri"), true));
        let first = p.next(None);
        assert!(matches!(first, Next::Go(Go::Open(_, 1))));
        // Others wait for that attempt instead of connecting too.
        assert!(matches!(p.next(None), Next::WaitConnect(1)));
    }
}
