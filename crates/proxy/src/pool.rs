//! Connection pools: one per endpoint (address, TLS or not, HTTP version),
//! kept with the endpoint across routing tables, plus one per HTTP version
//! towards the local app.
//!
//! - HTTP/1.1: a stack of idle connections. A request takes the most
//!   recently used one that is still open, or opens a new one. After the
//!   response body ends the connection goes back on the stack; idle ones
//!   are closed after [`IDLE_TIMEOUT`].
//! - HTTP/2: one connection shared by every request, opened by the first
//!   request that needs it while the others wait for it.
//!
//! A request that was never written (the connection closed just before)
//! is sent again on another connection. A connection switched to another
//! protocol (WebSocket) belongs to its tunnel: it leaves the pool and its
//! counts.
//!
//! A destination's `circuitBreaker.maxConnections` caps the connections
//! this sidecar keeps open to its endpoints: at the cap, an HTTP/1.1
//! request waits for one of the endpoint's connections to come back
//! (`maxPendingRequests` of them may wait; more overflow at once). As in
//! Envoy, an endpoint without any connection may always open one, so idle
//! connections to other endpoints never starve it: the cap can be passed
//! by at most the number of endpoints.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Body;
use crate::transport::{BoxError, Connector};

/// How long an idle HTTP/1.1 connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a request waits for a connection at the destination's cap.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a request not yet written is sent again on a fresh connection.
const UNSENT_RETRIES: usize = 3;

/// Why a request got no response from the pool.
pub enum PoolError {
    /// No connection could be opened (TCP or TLS).
    Connect(BoxError),
    /// The connection failed once the request was (or may have been) sent.
    Send(hyper::Error),
    /// The destination is at its connection cap and its queue is full (or
    /// the wait was too long).
    Overflow(&'static str),
}

/// Connections and waiting requests of one destination, shared by its
/// endpoints' pools and kept across routing tables.
#[derive(Default)]
pub struct DestConns {
    open: AtomicUsize,
    pending: AtomicUsize,
    /// A connection of the destination closed.
    freed: Notify,
}

/// A destination's limits, as its policy sets them.
#[derive(Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub conns: Arc<DestConns>,
}

pub struct Pool {
    /// `http://ip:port` or `https://ip:port`, for the connector.
    uri: Uri,
    h2: bool,
    open: AtomicUsize,
    state: Mutex<State>,
    /// A connection of this endpoint came back idle, or the shared HTTP/2
    /// connection is up (or failed to come up).
    returned: Notify,
}

#[derive(Default)]
struct State {
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    shared: Option<http2::SendRequest<Body>>,
    connecting: bool,
    sweeping: bool,
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
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
    pub fn new(uri: Uri, h2: bool) -> Arc<Pool> {
        Arc::new(Pool {
            uri,
            h2,
            open: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            returned: Notify::new(),
        })
    }

    /// `http://ip:port` or `https://ip:port`.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `req` (origin-form URI for HTTP/1.1, absolute for HTTP/2) on
    /// a connection of this endpoint.
    pub async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        mut req: Request<Body>,
        limits: Option<&ConnLimits>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut unsent = 0;
        let mut waiting: Option<Waiting<'_>> = None;
        let mut waited_since: Option<Instant> = None;
        loop {
            // Registered before looking, so that a connection coming back
            // between the look and the wait is not missed.
            let returned = self.returned.notified();
            let freed = limits.map(|l| l.conns.freed.notified());
            tokio::pin!(returned);
            returned.as_mut().enable();
            let sender = match self.take() {
                Some(s) => Some(s),
                None => {
                    if self.h2 && self.state().connecting {
                        None
                    } else if let Some(opened) = self.try_open(limits) {
                        drop(waiting.take());
                        match self.connect(connector, opened).await {
                            Ok(s) => Some(s),
                            Err(e) => return Err(PoolError::Connect(e)),
                        }
                    } else {
                        None
                    }
                }
            };
            let Some(sender) = sender else {
                // At the cap (or the HTTP/2 connection is on its way): wait.
                if let (Some(l), None) = (limits, &waiting) {
                    if !self.h2 || !self.state().connecting {
                        let queued = l.conns.pending.fetch_add(1, Ordering::AcqRel);
                        let w = Waiting(&l.conns);
                        if queued >= l.max_pending {
                            return Err(PoolError::Overflow(
                                "the destination is at its maxConnections and its maxPendingRequests are waiting",
                            ));
                        }
                        waiting = Some(w);
                    }
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
                continue;
            };
            drop(waiting.take());
            let sent = match sender {
                Sender::H1(mut tx) => match tx.try_send_request(req).await {
                    Ok(resp) => {
                        self.give_back_when_ready(tx, &resp);
                        return Ok(resp);
                    }
                    Err(e) => e,
                },
                Sender::H2(mut tx) => match tx.try_send_request(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => {
                        if tx.is_closed() {
                            let mut st = self.state();
                            if st.shared.as_ref().is_some_and(|s| s.is_closed()) {
                                st.shared = None;
                            }
                        }
                        e
                    }
                },
            };
            let mut e = sent;
            match e.take_message() {
                // Never written: another connection may take it.
                Some(r) if unsent < UNSENT_RETRIES => {
                    unsent += 1;
                    req = r;
                }
                _ => return Err(PoolError::Send(e.into_error())),
            }
        }
    }

    /// An idle HTTP/1.1 connection or the shared HTTP/2 one, if open.
    fn take(&self) -> Option<Sender> {
        let mut st = self.state();
        if self.h2 {
            return match &st.shared {
                Some(tx) if !tx.is_closed() => Some(Sender::H2(tx.clone())),
                Some(_) => {
                    st.shared = None;
                    None
                }
                None => None,
            };
        }
        let now = Instant::now();
        while let Some((tx, since)) = st.idle.pop() {
            if tx.is_ready() && now.duration_since(since) < IDLE_TIMEOUT {
                return Some(Sender::H1(tx));
            }
        }
        None
    }

    /// Takes a place for a new connection, unless the destination is at
    /// its cap and this endpoint already has one.
    fn try_open(self: &Arc<Self>, limits: Option<&ConnLimits>) -> Option<Opened> {
        let dest = match limits {
            None => None,
            Some(l) => {
                let mine = self.open.load(Ordering::Acquire);
                let took = l
                    .conns
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < l.max_connections || mine == 0).then_some(n + 1)
                    })
                    .is_ok();
                if !took {
                    return None;
                }
                Some(l.conns.clone())
            }
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        if self.h2 {
            self.state().connecting = true;
        }
        Some(Opened {
            pool: Arc::downgrade(self),
            dest,
        })
    }

    async fn connect(
        self: &Arc<Self>,
        connector: &Connector,
        opened: Opened,
    ) -> Result<Sender, BoxError> {
        /// Ends the HTTP/2 "connecting" state however the attempt ends
        /// (also when the request gives up), waking those who wait for it.
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
        let result = self.handshake(connector, opened).await;
        if let Ok(Sender::H2(tx)) = &result {
            self.state().shared = Some(tx.clone());
        }
        result
    }

    async fn handshake(&self, connector: &Connector, opened: Opened) -> Result<Sender, BoxError> {
        let io = connector.open(&self.uri).await?;
        if self.h2 {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(run(conn, opened));
            Ok(Sender::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new().handshake(io).await?;
            tokio::spawn(run(conn.with_upgrades(), opened));
            Ok(Sender::H1(tx))
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

/// Drives a connection; its place is given back when it ends.
async fn run<F: Future>(conn: F, opened: Opened) {
    let _ = conn.await;
    drop(opened);
}

/// Closes connections idle longer than [`IDLE_TIMEOUT`], while any is idle.
async fn sweep_idle(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut st = pool.state();
        let now = Instant::now();
        st.idle
            .retain(|(tx, since)| !tx.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT);
        if st.idle.is_empty() {
            st.sweeping = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(port: u16) -> Arc<Pool> {
        Pool::new(
            format!("http://127.0.0.1:{port}/").parse().expect("uri"),
            false,
        )
    }

    #[test]
    fn the_cap_holds_but_every_endpoint_may_have_one_connection() {
        let limits = ConnLimits {
            max_connections: 2,
            max_pending: 0,
            conns: Arc::new(DestConns::default()),
        };
        let (a, b, c) = (pool(1), pool(2), pool(3));
        let a1 = a.try_open(Some(&limits)).expect("under the cap");
        let a2 = a.try_open(Some(&limits)).expect("under the cap");
        assert!(a.try_open(Some(&limits)).is_none(), "at the cap");
        // `b` has none yet: it may open one, past the cap, but not two.
        let b1 = b.try_open(Some(&limits)).expect("first of its endpoint");
        assert!(b.try_open(Some(&limits)).is_none());
        assert_eq!(limits.conns.open.load(Ordering::Acquire), 3);
        // Closing connections gives their places back.
        drop((a1, a2, b1));
        assert_eq!(limits.conns.open.load(Ordering::Acquire), 0);
        assert_eq!(a.open.load(Ordering::Acquire), 0);
        let _c = c.try_open(Some(&limits)).expect("room again");
        // Without limits nothing is refused.
        assert!((0..10).all(|_| a.try_open(None).is_some()));
    }
}
