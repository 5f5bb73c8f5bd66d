//! Responses the mesh itself generates. Each names its reason in the
//! `tandem-error` header (and in the `tandem_error` metric label), so a
//! caller can always tell a mesh failure from an application's answer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::replay::Replay;

/// Every body the proxy sends: one streamed from a peer, one it made, or a
/// request body that a retry may send again.
pub enum Body {
    Stream(Incoming),
    Full(Full<Bytes>),
    Replay(Replay),
    /// An answer read whole (kept while a retry replaces it).
    Collected(http_body_util::Collected<Bytes>),
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Body::Stream(b)
    }
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Full::new(b.into()))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Stream(b) => Pin::new(b).poll_frame(cx),
            Body::Replay(b) => Pin::new(b).poll_frame(cx),
            Body::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
            Body::Collected(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(b) => b.is_end_stream(),
            Body::Full(b) => b.is_end_stream(),
            Body::Replay(b) => b.is_end_stream(),
            Body::Collected(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
            Body::Replay(b) => b.size_hint(),
            Body::Collected(b) => b.size_hint(),
        }
    }
}

pub const ERROR_HEADER: &str = "tandem-error";

/// Why the mesh answered instead of the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshError {
    /// The destination has routes but none matched the request.
    NoRoute,
    /// The host named no service the mesh knows.
    UnknownService,
    /// The chosen backend has no live endpoint.
    NoEndpoints,
    /// Connecting to the endpoint (or the local app) failed.
    ConnectFailure,
    /// The upstream connection failed after the request was sent.
    UpstreamReset,
    /// The request could not be forwarded as it was (bad URI, bad host).
    BadRequest,
    /// The proxy has no configuration yet for this traffic.
    NotConfigured,
    /// A destination the proxy has not seen before could not be looked up
    /// (control plane unreachable or slow).
    DiscoveryUnavailable,
    /// The mTLS handshake with the peer sidecar failed (wrong identity,
    /// untrusted certificate, or the peer refused this proxy's).
    UpstreamTls,
    /// This proxy's certificate expired and could not be renewed: it
    /// refuses mesh traffic rather than send it without mTLS.
    IdentityExpired,
    /// No answer within the request timeout or the per-try timeout.
    Timeout,
    /// Every attempt the retry policy allows failed.
    RetryLimitExhausted,
    /// A retry was due but the destination's retry budget was spent.
    RetryBudgetExhausted,
    /// Over the destination's rate limit.
    RateLimited,
    /// The sidecar is at its limit of requests in progress.
    Overloaded,
    /// The destination's `circuitBreaker.maxRequests` is reached.
    Overflow,
}

const ALL: [MeshError; 16] = [
    MeshError::NoRoute,
    MeshError::UnknownService,
    MeshError::NoEndpoints,
    MeshError::ConnectFailure,
    MeshError::UpstreamReset,
    MeshError::BadRequest,
    MeshError::NotConfigured,
    MeshError::DiscoveryUnavailable,
    MeshError::UpstreamTls,
    MeshError::IdentityExpired,
    MeshError::Timeout,
    MeshError::RetryLimitExhausted,
    MeshError::RetryBudgetExhausted,
    MeshError::RateLimited,
    MeshError::Overloaded,
    MeshError::Overflow,
];

impl MeshError {
    pub fn reason(self) -> &'static str {
        match self {
            MeshError::NoRoute => "no-route",
            MeshError::UnknownService => "unknown-service",
            MeshError::NoEndpoints => "no-endpoints",
            MeshError::ConnectFailure => "upstream-connect-failure",
            MeshError::UpstreamReset => "upstream-reset",
            MeshError::BadRequest => "bad-request",
            MeshError::NotConfigured => "not-configured",
            MeshError::DiscoveryUnavailable => "discovery-unavailable",
            MeshError::UpstreamTls => "upstream-tls-failure",
            MeshError::IdentityExpired => "identity-expired",
            MeshError::Timeout => "upstream-timeout",
            MeshError::RetryLimitExhausted => "retry-limit-exhausted",
            MeshError::RetryBudgetExhausted => "retry-budget-exhausted",
            MeshError::RateLimited => "rate-limited",
            MeshError::Overloaded => "overloaded",
            MeshError::Overflow => "overflow",
        }
    }

    /// The reason named in a `tandem-error` header, if it is one of ours.
    pub fn from_reason(reason: &[u8]) -> Option<Self> {
        ALL.iter()
            .copied()
            .find(|e| e.reason().as_bytes() == reason)
    }

    pub fn status(self) -> StatusCode {
        match self {
            MeshError::NoRoute | MeshError::UnknownService => StatusCode::NOT_FOUND,
            MeshError::NoEndpoints
            | MeshError::ConnectFailure
            | MeshError::NotConfigured
            | MeshError::DiscoveryUnavailable
            | MeshError::UpstreamTls
            | MeshError::IdentityExpired
            | MeshError::RetryLimitExhausted
            | MeshError::RetryBudgetExhausted
            | MeshError::Overloaded
            | MeshError::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            MeshError::UpstreamReset => StatusCode::BAD_GATEWAY,
            MeshError::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// The response sent to the caller; `detail` goes into the body.
    pub fn response(self, detail: &str) -> Response<Body> {
        let body = format!("tandem: {}: {detail}\n", self.reason());
        let mut resp = Response::new(Body::full(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for e in ALL {
            assert_eq!(MeshError::from_reason(e.reason().as_bytes()), Some(e));
            let r = e.response("detail");
            assert_eq!(r.status(), e.status());
            assert_eq!(r.headers()[ERROR_HEADER], e.reason());
        }
        assert_eq!(MeshError::from_reason(b"made-up"), None);
    }
}
