//! The inbound rate limit of a TrafficPolicy: a token bucket per sidecar,
//! for the whole service or per calling identity. Over the limit a request
//! gets `429` with `Retry-After` and never reaches the app.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_config::snapshot::RateLimit;

use crate::metrics::Name;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Limiter {
    rate: f64,
    burst: f64,
    per_caller: bool,
    buckets: Mutex<HashMap<Name, Bucket>>,
}

/// One bucket per caller at most this many callers (labels are interned
/// and bounded too; further callers share the last bucket).
const MAX_CALLERS: usize = 1024;

impl Limiter {
    pub fn new(rl: &RateLimit) -> Self {
        Limiter {
            rate: rl.requests_per_second,
            burst: f64::from(rl.burst),
            per_caller: rl.per_caller,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `caller`; when none is left, how long until one is.
    pub fn check(&self, caller: &Name, now: Instant) -> Result<(), Duration> {
        let key = if self.per_caller {
            caller.clone()
        } else {
            Name::from("")
        };
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if !buckets.contains_key(&key) && buckets.len() >= MAX_CALLERS {
            buckets.clear();
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((1.0 - b.tokens) / self.rate.max(1e-3)).min(86_400.0),
            ))
        }
    }
}

/// The limiter in force, kept across snapshots while its settings stay.
#[derive(Default)]
pub struct LimiterCache(Mutex<Option<(RateLimit, Arc<Limiter>)>>);

impl LimiterCache {
    pub fn get(&self, rl: &RateLimit) -> Arc<Limiter> {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((k, l)) = g.as_ref() {
            if k == rl {
                return l.clone();
            }
        }
        let l = Arc::new(Limiter::new(rl));
        *g = Some((rl.clone(), l.clone()));
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate() {
        let l = Limiter::new(&RateLimit {
            requests_per_second: 10.0,
            burst: 3,
            per_caller: true,
        });
        let t0 = Instant::now();
        let a = Name::from("a");
        for _ in 0..3 {
            assert!(l.check(&a, t0).is_ok());
        }
        let wait = l.check(&a, t0).expect_err("over the burst");
        assert!(wait <= Duration::from_millis(100));
        // Another caller has its own bucket.
        assert!(l.check(&Name::from("b"), t0).is_ok());
        // 100 ms later one token is back.
        assert!(l.check(&a, t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(&a, t0 + Duration::from_millis(100)).is_err());
    }
}
