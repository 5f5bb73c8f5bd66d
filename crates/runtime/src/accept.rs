//! The accept loop of every listener (sidecar data ports, admin port,
//! control-plane gRPC and API ports, the demo app).
//!
//! `accept` fails for two kinds of reasons. A connection that was reset
//! before it was taken (`ECONNABORTED`) concerns that connection only: the
//! next one is taken at once. Running out of a resource (`EMFILE`,
//! `ENFILE`, `ENOBUFS`, `ENOMEM`) lasts until connections close: the
//! pending connection stays in the backlog and every retry fails again at
//! once, so a loop that retries at once burns a core and floods the log.
//! The loop then waits, 5 ms at first and twice as long after each failure
//! in a row (at most 1 s), and logs the first failure of a streak and every
//! tenth.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connections the kernel completes and queues for a listener before it
/// takes them (it caps the figure at `net.core.somaxconn`, 4096 by default
/// since Linux 5.4). Past the queue a connecting peer's SYN is dropped and
/// it tries again only after a second; tokio's `TcpListener::bind` queues
/// 128, which 150 proxies joining at once already overflowed.
pub const BACKLOG: u32 = 4096;

/// A listener on `addr` with a queue of [`BACKLOG`] (and `SO_REUSEADDR`,
/// as tokio's `bind` sets it: a restarted process binds again at once).
pub async fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The pause after the first failure of a streak.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Pauses between failed accepts: doubling while the failures go on, back
/// to the start after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause after one more failure in a row.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(16);
        FIRST_PAUSE
            .saturating_mul(1 << doublings)
            .min(LONGEST_PAUSE)
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures in the current streak.
    pub fn streak(&self) -> u32 {
        self.failures
    }
}

/// Whether an accept error concerns only the connection being accepted.
fn connection_only(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Accepts connections on `listener` until `stop` resolves, handing each
/// (with `TCP_NODELAY` set) to `on_conn`. `what` names the listener in logs.
pub async fn accept_loop<F>(
    listener: TcpListener,
    what: &'static str,
    stop: impl Future<Output = ()>,
    mut on_conn: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    tokio::pin!(stop);
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut stop => return,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff.succeeded();
                let _ = sock.set_nodelay(true);
                on_conn(sock, peer);
            }
            Err(e) if connection_only(&e) => {}
            Err(e) => {
                let pause = backoff.failed();
                let streak = backoff.streak();
                if streak == 1 || streak % 10 == 0 {
                    tracing::warn!(listener = what, error = %e, failures = streak, ?pause, "accept failed; pausing before the next one");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = &mut stop => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_reset() {
        let mut b = Backoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(b.failed(), LONGEST_PAUSE);
        }
        b.succeeded();
        assert_eq!(b.failed(), FIRST_PAUSE);
    }

    #[test]
    fn a_reset_connection_is_not_a_streak() {
        assert!(connection_only(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        // EMFILE: "Too many open files".
        assert!(!connection_only(&io::Error::from_raw_os_error(24)));
    }

    /// Connections beyond the queue would never complete while nobody
    /// accepts: their SYNs are dropped and retried for minutes.
    #[tokio::test]
    async fn queues_a_burst_of_connections_nobody_has_taken_yet() {
        let listener = listen("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        // Well past tokio's default queue of 128, within the kernel's cap.
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let burst = somaxconn.min(600);
        let mut held = Vec::with_capacity(burst);
        for i in 0..burst {
            let conn = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} not queued"))
                .expect("connect");
            held.push(conn);
        }
        // And they are all there to take.
        for _ in 0..burst {
            listener.accept().await.expect("accept");
        }
    }

    #[tokio::test]
    async fn hands_over_connections_until_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let looping = tokio::spawn(accept_loop(
            listener,
            "test",
            async {
                let _ = stop_rx.await;
            },
            move |s, _| {
                let _ = tx.send(s.nodelay().unwrap_or(false));
            },
        ));
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(rx.recv().await, Some(true));
        assert_eq!(rx.recv().await, Some(true));
        let _ = stop_tx.send(());
        looping.await.expect("loop ends");
        // The listener is gone with the loop.
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
