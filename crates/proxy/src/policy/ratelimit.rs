//! The inbound rate limit of a TrafficPolicy: a token bucket per sidecar,
//! for the whole service or per calling identity (its full SPIFFE ID, so
//! two services of one name in two namespaces are two callers). Over the
//! limit a request gets `429` with `Retry-After` and never reaches the app.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};
use tandem_config::snapshot::RateLimit;
use tandem_runtime::sync::Mutex;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::routing::Routes;
use crate::svc::{layer, Service};

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub(crate) struct Limiter {
    rate: f64,
    burst: f64,
    per_caller: bool,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

/// One bucket per caller for at most this many callers; past it the
/// buckets start over (a flood of identities cannot grow the map).
const MAX_CALLERS: usize = 1024;

impl Limiter {
    pub(crate) fn new(rl: &RateLimit) -> Self {
        Limiter {
            rate: rl.requests_per_second,
            burst: f64::from(rl.burst),
            per_caller: rl.per_caller,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `caller` (a SPIFFE ID, or `None` for a plaintext
    /// caller); when none is left, how long until one is.
    pub(crate) fn check(&self, caller: Option<&Arc<str>>, now: Instant) -> Result<(), Duration> {
        let key: &str = match caller {
            Some(c) if self.per_caller => c,
            _ => "",
        };
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(key) {
            if buckets.len() >= MAX_CALLERS {
                buckets.clear();
            }
            let owned = match caller {
                Some(c) if self.per_caller => c.clone(),
                _ => Arc::from(""),
            };
            buckets.insert(
                owned,
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(b) = buckets.get_mut(key) else {
            return Ok(());
        };
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
pub(crate) struct LimiterCache(Mutex<Option<(RateLimit, Arc<Limiter>)>>);

impl LimiterCache {
    pub(crate) fn get(&self, rl: &RateLimit) -> Arc<Limiter> {
        let mut g = self.0.lock();
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

layer!(
    /// Inbound: the service's rate limit.
    RateLimitLayer => RateLimited {
        routes: Arc<Routes>,
    }
);

impl<S: Service> Service for RateLimited<S> {
    async fn call(
        &self,
        req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let limited = {
            let routing = self.routes.load();
            let caller = ctx.caller.as_ref().map(|p| &p.id);
            routing
                .limiter
                .as_ref()
                .and_then(|l| l.check(caller, Instant::now()).err())
        };
        let Some(wait) = limited else {
            return self.inner.call(req, ctx).await;
        };
        let mut r = MeshError::RateLimited.response(&format!(
            "`{}` is over its rate limit for this caller; retry in {wait:?}",
            ctx.dst.0
        ));
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        Ok(r)
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
        let a: Arc<str> = Arc::from("spiffe://td/ns/shop/svc/web");
        for _ in 0..3 {
            assert!(l.check(Some(&a), t0).is_ok());
        }
        let wait = l.check(Some(&a), t0).expect_err("over the burst");
        assert!(wait <= Duration::from_millis(100));
        // The same service name in another namespace is another caller.
        let b: Arc<str> = Arc::from("spiffe://td/ns/blog/svc/web");
        assert!(l.check(Some(&b), t0).is_ok());
        // 100 ms later one token is back.
        assert!(l.check(Some(&a), t0 + Duration::from_millis(100)).is_ok());
        assert!(l.check(Some(&a), t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn per_service_is_one_bucket_for_everyone() {
        let l = Limiter::new(&RateLimit {
            requests_per_second: 1.0,
            burst: 2,
            per_caller: false,
        });
        let t0 = Instant::now();
        let a: Arc<str> = Arc::from("spiffe://td/ns/shop/svc/web");
        assert!(l.check(Some(&a), t0).is_ok());
        assert!(l.check(None, t0).is_ok());
        assert!(l.check(Some(&a), t0).is_err());
    }
}
