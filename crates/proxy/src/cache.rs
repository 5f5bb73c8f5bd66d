//! State that outlives one routing table: endpoint load, connection pools,
//! retry budgets, request and connection counts. Each table asks for the
//! state of what it lists and gets the same value as the table before it,
//! so a config change forgets nothing; once no table lists a thing, its
//! state goes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Weak};

use tandem_runtime::sync::Mutex;

/// Values shared by whoever holds them, remembered while anyone does.
pub(crate) struct WeakCache<K, V> {
    map: Mutex<HashMap<K, Weak<V>>>,
}

impl<K, V> Default for WeakCache<K, V> {
    fn default() -> Self {
        WeakCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V> WeakCache<K, V> {
    /// The value for `key` that someone still holds, or a new one from
    /// `make`. Adding one forgets the values nobody holds any more.
    pub(crate) fn get_or_make(&self, key: K, make: impl FnOnce() -> V) -> Arc<V> {
        let mut map = self.map.lock();
        if let Some(v) = map.get(&key).and_then(Weak::upgrade) {
            return v;
        }
        let v = Arc::new(make());
        map.insert(key, Arc::downgrade(&v));
        map.retain(|_, w| w.strong_count() > 0);
        v
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_while_held_forgotten_after() {
        let c: WeakCache<&str, u32> = WeakCache::default();
        let a = c.get_or_make("a", || 1);
        let again = c.get_or_make("a", || 2);
        assert!(Arc::ptr_eq(&a, &again));
        drop((a, again));
        // Nobody holds `a`: a new value, and the old entry is swept.
        let b = c.get_or_make("b", || 3);
        assert_eq!(c.len(), 1);
        assert_eq!(*c.get_or_make("a", || 4), 4);
        assert_eq!(*b, 3);
    }
}
