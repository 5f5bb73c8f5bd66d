//! The sidecar's own limits: past them it sheds load instead of growing.
//! `--max-connections` closes new connections on the data listeners at
//! once; `--max-requests` answers `503 overloaded` before any work is done,
//! counting inbound and outbound apart (an app's own calls must not be
//! starved by the requests waiting on them). A request holds its place
//! until its response body ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};
use crate::telemetry::metrics::OverloadLabels;

pub(crate) struct Limits {
    max_connections: usize,
    open: AtomicUsize,
    pub(crate) inbound_requests: Arc<Semaphore>,
    pub(crate) outbound_requests: Arc<Semaphore>,
    rejected: Family<OverloadLabels, Counter>,
}

/// One open connection on a data listener.
pub(crate) struct ConnSlot(Arc<Limits>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    pub(crate) fn new(
        max_connections: usize,
        max_requests: usize,
        rejected: Family<OverloadLabels, Counter>,
    ) -> Arc<Self> {
        Arc::new(Limits {
            max_connections: max_connections.max(1),
            open: AtomicUsize::new(0),
            inbound_requests: Arc::new(Semaphore::new(max_requests.max(1))),
            outbound_requests: Arc::new(Semaphore::new(max_requests.max(1))),
            rejected,
        })
    }

    /// A slot for a new connection, or `None` (counted) when full.
    pub(crate) fn connection(self: &Arc<Self>) -> Option<ConnSlot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.rejected
                .get_or_create(&OverloadLabels { what: "connection" })
                .inc();
            return None;
        }
        Some(ConnSlot(self.clone()))
    }
}

layer!(
    /// `--max-requests` for one direction.
    AdmitLayer => Admit {
        permits: Arc<Semaphore>,
        limits: Arc<Limits>,
    }
);

impl<S: Service> Service for Admit<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.limits
                .rejected
                .get_or_create(&OverloadLabels { what: "request" })
                .inc();
            return Err(Error::new(
                MeshError::Overloaded,
                "this sidecar is at its limit of requests in progress",
            ));
        };
        ctx.held.permit = Some(permit);
        self.inner.call(req, ctx).await
    }
}
