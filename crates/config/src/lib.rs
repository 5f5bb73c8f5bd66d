//! Tandem's configuration: the resource model users write (Kubernetes-style
//! YAML), loading with `file:line:col` diagnostics, whole-set validation, and
//! compilation of a validated set into the per-proxy [`snapshot::Snapshot`].
//!
//! Everything here is pure logic without I/O beyond reading the config files,
//! so the control plane and `tandem validate` share exactly the same code.
#![forbid(unsafe_code)]

pub mod authz;
pub mod compile;
pub mod diag;
pub mod duration;
pub mod explain;
pub mod filters;
pub mod load;
pub mod matching;
pub mod model;
pub mod policy;
pub mod rollout;
pub mod snapshot;
pub mod validate;

pub use diag::Diagnostic;
pub use load::{config_files, load_dir, load_files, load_str};
pub use model::ResourceSet;
