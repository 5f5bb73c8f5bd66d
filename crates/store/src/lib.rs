//! Where the control plane's state lives: the seams a replicated control
//! plane plugs its store into, and the implementations that run today.
//!
//! - [`Kv`]: durable values with revisions and compare-and-swap (CA
//!   material, token revocations, the snapshot version floor, rollout
//!   state). [`LocalDir`] keeps them as files in the data directory;
//!   [`Memory`] in the process (tests).
//! - [`RegistryStore`]: which proxy instances are registered, and at what
//!   addresses. Each registration is held by the control plane that holds
//!   the proxy's stream; [`MemoryRegistry`] keeps them in the process (a
//!   restarted control plane starts empty, as proxies reconnect).
//!
//! A store shared by several control planes (etcd) implements the same two
//! traits: registrations under a lease of the replica that holds them, so
//! a dead replica's expire; values with etcd's mod revisions.
#![forbid(unsafe_code)]

pub mod etcd;
mod kv;
mod registry;
pub mod sealed;

use std::future::Future;
use std::io;
use std::pin::Pin;

pub use kv::{Kv, LocalDir, Memory, Record, Versioned};
pub use registry::{InstanceKey, MemoryRegistry, Presence, Registration, RegistryStore};

/// What a store call returns: store calls may go over the network.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;
