//! Identity for the mesh: SPIFFE IDs and X509-SVID rules ([`spiffe`]), the
//! certificate authority in the control plane's data directory ([`ca`]),
//! join tokens ([`token`]) and the rustls configurations of every TLS hop
//! ([`tls`]).
#![forbid(unsafe_code)]

pub mod ca;
pub mod spiffe;
pub mod tls;
pub mod token;

pub use spiffe::SpiffeId;
