//! What every long-running `tandem` process shares: its listeners (with a
//! connection queue that absorbs bursts) and the accept loop (one for every
//! listener, backing off when the process runs out of file descriptors
//! instead of spinning), and locks that do not poison.
#![forbid(unsafe_code)]

mod accept;
pub mod sync;

pub use accept::{accept_loop, listen, Backoff, BACKLOG};
