//! State shared by control-plane replicas, in etcd (v3 gRPC API).
//!
//! - [`Etcd`]: the client. One lazily connected channel per member; a call
//!   goes to the member that answered last and moves to the next when that
//!   one is unreachable or has no leader, so a dead member costs one failed
//!   attempt, not an outage.
//! - [`EtcdKv`]: the [`Kv`](crate::Kv) seam on etcd keys: a revision is
//!   the key's `mod_revision`, compare-and-swap a transaction.
//! - [`EtcdRegistry`]: the [`RegistryStore`](crate::RegistryStore) seam:
//!   registrations under the replica's lease (a dead replica's expire),
//!   every replica's view kept by a watch.
//! - [`Lease`], [`Election`], [`Replicas`]: the replica's lease (kept
//!   alive, granted again after it was lost), the leader election that
//!   gates work done once per mesh, and the directory of live replicas.
//!
//! Keys live under a prefix (`/tandem` unless the URL names another), so
//! several meshes can share one etcd:
//! `<prefix>/kv/...`, `<prefix>/registry/<ns>/<svc>/<instance>`,
//! `<prefix>/leader`, `<prefix>/replicas/<id>`.

mod client;
mod election;
mod kv;
mod lease;
mod registry;
mod watch;

pub use client::{Etcd, EtcdTls, EtcdUrl, MemberStatus};
pub use election::{Election, Leadership};
pub use kv::EtcdKv;
pub use lease::{Lease, LEASE_TTL};
pub use registry::{EtcdRegistry, ReplicaInfo, Replicas};

/// The generated gRPC types (etcd's own package names, so the paths on
/// the wire are etcd's).
#[allow(clippy::all, missing_docs)]
pub(crate) mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}
