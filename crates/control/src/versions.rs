//! Snapshot versions: monotonic per control plane, and across its restarts
//! (and across the replicas that share a store). Versions are handed out
//! in blocks; only the top of the reserved block, the floor, is stored,
//! with compare-and-swap so that two writers never reserve the same block.

use std::io;
use std::sync::Arc;

use tandem_store::{Kv, Record};

/// Versions reserved at a time.
pub const BLOCK: u64 = 1000;
const FLOOR_KEY: &str = "snapshot-version-floor";

pub struct Floor(Record<u64>);

impl Floor {
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Floor(Record::new(kv, FLOOR_KEY))
    }

    /// Reserves a block of at least `count` versions, all at least
    /// `at_least`; returns `(first, ceiling)`: the versions
    /// `first..=ceiling` are this writer's.
    pub async fn reserve(&self, at_least: u64, count: u64) -> io::Result<(u64, u64)> {
        let reserved = self
            .0
            .update(|floor| {
                let first = floor.unwrap_or(0).max(at_least.saturating_sub(1)) + 1;
                let ceiling = first + count.max(BLOCK) - 1;
                Ok::<_, std::convert::Infallible>((ceiling, (first, ceiling)))
            })
            .await?;
        Ok(match reserved {
            Ok(r) => r,
            Err(never) => match never {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocks_never_overlap_and_survive_a_restart() {
        let kv: Arc<dyn Kv> = Arc::new(tandem_store::Memory::default());
        let a = Floor::new(kv.clone());
        let (f1, c1) = a.reserve(1, 1).await.expect("io");
        assert_eq!((f1, c1), (1, BLOCK));
        // A second writer (or a restart) gets the next block.
        let b = Floor::new(kv.clone());
        let (f2, c2) = b.reserve(1, 1).await.expect("io");
        assert_eq!((f2, c2), (BLOCK + 1, 2 * BLOCK));
        // A proxy that applied a high version: the next block starts above.
        let (f3, c3) = a.reserve(5000, 1).await.expect("io");
        assert!(f3 >= 5000 && f3 > c2);
        // A round that needs more than a block gets all it needs.
        let (f4, c4) = a.reserve(1, 3 * BLOCK).await.expect("io");
        assert!(f4 > c3 && c4 - f4 + 1 == 3 * BLOCK);
    }
}
