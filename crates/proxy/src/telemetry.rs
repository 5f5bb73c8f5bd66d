//! What the sidecar tells about itself: its request traffic ([`traffic`]),
//! the other metrics ([`metrics`]), the trace a request belongs to
//! ([`trace`]), and the admin endpoint that serves them ([`admin`]).

pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod trace;
pub(crate) mod traffic;
