//! The gRPC protocol between the control plane and the proxies (and the demo
//! Echo service). Generated from `proto/tandem.proto` at build time.
#![allow(clippy::all, clippy::unwrap_used)]

pub mod v1 {
    tonic::include_proto!("tandem.v1");
}
