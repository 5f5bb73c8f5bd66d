//! `tandem proxy`: the sidecar. It listens for inbound traffic to its service
//! and forwards it to the local app; it gives the app outbound ports (an HTTP
//! proxy port and per-upstream ports) and sends that traffic to the
//! destination's endpoints, routed and load-balanced per the snapshot the
//! control plane pushes.
//!
//! A request goes down one stack of layers per direction, each layer one
//! concern, all of them reading and writing the request's context:
//! [`inbound`] and [`outbound`] build and document the two stacks. The
//! layers live by concern: [`outbound`] (destination, route), [`policy`]
//! (deadline, timeouts, retries, circuit breaking, rate limit, overload),
//! [`balance`], [`transport`] (pools, mTLS, forwarding, TCP relays) and
//! [`telemetry`] (metrics, traces, admin). [`control`] holds the stream to
//! the control plane and the proxy's certificate; [`routing`] the table it
//! swaps in; [`sidecar`] assembles it all.
#![forbid(unsafe_code)]

mod balance;
mod body;
mod cache;
mod control;
mod ctx;
mod edge;
mod error;
mod inbound;
mod listen;
mod outbound;
mod policy;
mod routing;
mod sidecar;
mod svc;
mod telemetry;
mod transport;

pub use control::identity::channel as control_channel;
pub use sidecar::{run, ProxyConfig};
pub use telemetry::access::{AccessLogConfig, Redact};
pub use telemetry::otlp::{OtlpProtocol, TraceConfig};
pub use telemetry::trace::Sampler;
