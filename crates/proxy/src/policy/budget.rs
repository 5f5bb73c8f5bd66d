//! The retry budget: retries allowed over the last ten seconds are a share
//! of the requests plus a floor per second (Linkerd's design), so one
//! service's incident cannot become a retry storm. Counted in one-second
//! buckets with atomics: no lock on the request path. A destination's
//! budget is kept across routing tables (a config change must not hand out
//! a fresh budget in the middle of an incident).

use std::sync::atomic::{AtomicU64, Ordering};

/// The window the budget looks back over.
const WINDOW_SECS: u64 = 10;

pub(crate) struct RetryBudget {
    percent: u64,
    min_per_second: u64,
    buckets: [Bucket; WINDOW_SECS as usize],
}

#[derive(Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

fn now_secs() -> u64 {
    // +1 so that second 0 never matches a fresh bucket's 0.
    crate::policy::outlier::now_ms() / 1000 + 1
}

impl RetryBudget {
    pub(crate) fn new(percent: u32, min_per_second: u32) -> Self {
        RetryBudget {
            percent: u64::from(percent),
            min_per_second: u64::from(min_per_second),
            buckets: Default::default(),
        }
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let b = &self.buckets[(now % WINDOW_SECS) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != now
            && b.second
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.retries.store(0, Ordering::Release);
        }
        b
    }

    /// A request was sent (the first try).
    pub(crate) fn deposit(&self) {
        self.bucket(now_secs())
            .requests
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.withdraw_at(now_secs())
    }

    fn withdraw_at(&self, now: u64) -> bool {
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s != 0 && now.saturating_sub(s) < WINDOW_SECS {
                requests += b.requests.load(Ordering::Acquire);
                retries += b.retries.load(Ordering::Acquire);
            }
        }
        let allowed = requests * self.percent / 100 + self.min_per_second * WINDOW_SECS;
        if retries >= allowed {
            return false;
        }
        self.bucket(now).retries.fetch_add(1, Ordering::AcqRel);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_percent_plus_minimum() {
        let b = RetryBudget::new(20, 0);
        let now = 5;
        for _ in 0..100 {
            b.bucket(now).requests.fetch_add(1, Ordering::AcqRel);
        }
        let granted = (0..100).filter(|_| b.withdraw_at(now)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has moved on.
        assert!(!b.withdraw_at(now + 9));
        b.bucket(now + 10).requests.fetch_add(5, Ordering::AcqRel);
        assert_eq!((0..10).filter(|_| b.withdraw_at(now + 10)).count(), 1);
        let floor = RetryBudget::new(0, 2);
        assert_eq!((0..50).filter(|_| floor.withdraw_at(3)).count(), 20);
    }
}
