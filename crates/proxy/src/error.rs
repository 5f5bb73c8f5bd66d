//! Why the mesh answered instead of an application: one table of every
//! answer the mesh makes up, reason and status side by side.
//!
//! A layer that cannot go on fails with an [`Error`]: the typed kind and a
//! sentence for the body. The edge (`edge.rs`) turns it into the response,
//! which carries the kind in its extensions, so no layer above has to read
//! a header back; the `tandem-error` header is written from there, once, at
//! the edge. A layer may also flag an application's answer the same way
//! (retries out of attempts or budget) by putting the kind in the answer's
//! extensions.

use http::header::HeaderName;
use http::{HeaderValue, Response, StatusCode};

use crate::body::Body;

pub(crate) const ERROR_HEADER: HeaderName = HeaderName::from_static("tandem-error");

/// Declares the table: one line per kind, with its reason (the header
/// value and metric label) and the status of the answer the mesh makes.
/// `MeshError::ALL` comes from the same lines, so no kind can be missing
/// from it.
macro_rules! mesh_errors {
    ($( $(#[$doc:meta])* $kind:ident = $reason:literal, $status:ident; )*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum MeshError {
            $( $(#[$doc])* $kind, )*
        }

        impl MeshError {
            pub(crate) const ALL: &'static [MeshError] = &[$( MeshError::$kind, )*];

            pub(crate) fn reason(self) -> &'static str {
                match self { $( MeshError::$kind => $reason, )* }
            }

            pub(crate) fn status(self) -> StatusCode {
                match self { $( MeshError::$kind => StatusCode::$status, )* }
            }
        }
    };
}

mesh_errors! {
    /// The destination has routes but none matched the request.
    NoRoute = "no-route", NOT_FOUND;
    /// The host named no service the mesh knows.
    UnknownService = "unknown-service", NOT_FOUND;
    /// The chosen backend has no live endpoint.
    NoEndpoints = "no-endpoints", SERVICE_UNAVAILABLE;
    /// Connecting to the endpoint (or the local app) failed.
    ConnectFailure = "upstream-connect-failure", SERVICE_UNAVAILABLE;
    /// The upstream connection failed after the request was sent.
    UpstreamReset = "upstream-reset", BAD_GATEWAY;
    /// The request could not be forwarded as it was (bad URI, no host).
    BadRequest = "bad-request", BAD_REQUEST;
    /// The proxy has no configuration yet for this traffic.
    NotConfigured = "not-configured", SERVICE_UNAVAILABLE;
    /// A destination the proxy has not seen before could not be looked up
    /// (control plane unreachable or slow).
    DiscoveryUnavailable = "discovery-unavailable", SERVICE_UNAVAILABLE;
    /// The mTLS handshake with the peer sidecar failed (wrong identity,
    /// untrusted certificate, or the peer refused this proxy's).
    UpstreamTls = "upstream-tls-failure", SERVICE_UNAVAILABLE;
    /// This proxy's certificate expired and could not be renewed: it
    /// refuses mesh traffic rather than send it without mTLS.
    IdentityExpired = "identity-expired", SERVICE_UNAVAILABLE;
    /// No answer within the request timeout, the per-try timeout or the
    /// caller's deadline.
    Timeout = "upstream-timeout", GATEWAY_TIMEOUT;
    /// Every attempt the retry policy allows failed.
    RetryLimitExhausted = "retry-limit-exhausted", SERVICE_UNAVAILABLE;
    /// A retry was due but the destination's retry budget was spent.
    RetryBudgetExhausted = "retry-budget-exhausted", SERVICE_UNAVAILABLE;
    /// Over the destination's rate limit.
    RateLimited = "rate-limited", TOO_MANY_REQUESTS;
    /// The service's access policy does not let this caller make this
    /// request.
    Forbidden = "forbidden", FORBIDDEN;
    /// A call to a host outside the mesh that the egress mode, the
    /// ExternalService's ports or its access policy do not allow.
    EgressDenied = "egress-denied", FORBIDDEN;
    /// The sidecar is at its limit of requests in progress.
    Overloaded = "overloaded", SERVICE_UNAVAILABLE;
    /// The destination's `circuitBreaker.maxRequests` is reached.
    Overflow = "overflow", SERVICE_UNAVAILABLE;
    /// A FaultInjection aborted the request (with its own status; this
    /// one is only the default).
    FaultInjected = "fault-injected", SERVICE_UNAVAILABLE;
}

impl MeshError {
    /// The reason named in a `tandem-error` header that another sidecar
    /// (or an app passing one on) sent, if it is one of ours.
    pub(crate) fn from_reason(reason: &[u8]) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|e| e.reason().as_bytes() == reason)
    }

    /// The answer the mesh makes: the status, a plain-text body
    /// `tandem: REASON: detail`, and the kind in the extensions.
    pub(crate) fn response(self, detail: &str) -> Response<Body> {
        let body = format!("tandem: {}: {detail}\n", self.reason());
        let mut resp = Response::new(Body::full(body));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp.extensions_mut().insert(self);
        resp
    }

    /// The header value for this kind.
    pub(crate) fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.reason())
    }
}

/// A layer's failure: what kind, and what happened in words.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) kind: MeshError,
    pub(crate) detail: String,
}

impl Error {
    pub(crate) fn new(kind: MeshError, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: detail.into(),
        }
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        self.kind.response(&self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_reason_and_answer() {
        let mut seen = std::collections::HashSet::new();
        for &e in MeshError::ALL {
            assert!(seen.insert(e.reason()), "{} twice", e.reason());
            assert_eq!(MeshError::from_reason(e.reason().as_bytes()), Some(e));
            let r = e.response("detail");
            assert_eq!(r.status(), e.status());
            assert_eq!(r.extensions().get::<MeshError>(), Some(&e));
            assert!(e.status().is_client_error() || e.status().is_server_error());
        }
        assert_eq!(MeshError::from_reason(b"made-up"), None);
    }
}
