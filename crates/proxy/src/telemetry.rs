//! What the sidecar tells about itself: its request traffic ([`traffic`]),
//! the other metrics ([`metrics`]), the trace a request belongs to
//! ([`trace`]), what is kept of a sampled request ([`record`]) for its
//! spans, exported with OTLP ([`otlp`]), its access log line
//! ([`access`]) and its tap summary ([`tap`]), and the admin endpoint that
//! serves the metrics ([`admin`]).

pub(crate) mod access;
pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod otlp;
pub(crate) mod record;
pub(crate) mod tap;
pub(crate) mod trace;
pub(crate) mod traffic;
