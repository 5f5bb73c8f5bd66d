//! Serving connections: every listener runs the shared accept loop
//! (`tandem_runtime::accept_loop`) and serves HTTP connections here, with
//! the sidecar's header limits and a graceful close when the proxy stops.
//! [`Drain`] lets shutdown wait for open connections to finish.

use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{mpsc, watch};

use crate::transport::pool;

/// Largest request head (request line and headers) a sidecar reads; a
/// larger one is answered with 431.
pub(crate) const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Held by each open connection; shutdown waits until none is left.
#[derive(Clone)]
pub(crate) struct Drain(#[allow(dead_code)] mpsc::Sender<()>);

impl Drain {
    /// A drain handle, and what resolves once every clone is gone.
    pub(crate) fn new() -> (Drain, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(1);
        (Drain(tx), rx)
    }
}

/// Resolves once `stop` says so (or its sender is gone).
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) with upgrades on one
/// connection, closing it gracefully when `stop` fires. `keep` lives as
/// long as the connection (its drain handle and connection slot).
pub(crate) async fn serve_http_conn<I, F, Fut, B, K>(
    io: I,
    stop: watch::Receiver<bool>,
    keep: K,
    handler: F,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    K: Send,
{
    let _keep = keep;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timer enables hyper's header read timeout (30 s): a client that
    // trickles its request headers is cut off instead of holding a
    // connection forever. HTTP/2 peers are pinged so dead ones are noticed.
    // Request headers above MAX_HEADER_BYTES are refused with 431.
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES);
    // HTTP/2: a peer gets the streams and windows the pools use (see
    // `transport/pool.rs`): every stream's window fits in the connection's,
    // so a request body the app does not read holds up no other stream.
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .timer(TokioTimer::new())
        .max_concurrent_streams(pool::H2_MAX_STREAMS as u32)
        .initial_stream_window_size(pool::H2_STREAM_WINDOW)
        .initial_connection_window_size(pool::H2_CONN_WINDOW)
        .max_send_buf_size(pool::H2_SEND_BUFFER)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service_fn(handler));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
