//! Connections: mTLS between sidecars and plain TCP to the app ([`tls`]),
//! per-endpoint connection pools with the destination's connection limits
//! ([`pool`]), the last step of each request path ([`forward`]), and opaque
//! TCP relays ([`tcp`]).

pub(crate) mod forward;
pub(crate) mod pool;
pub(crate) mod tcp;
pub(crate) mod tls;
