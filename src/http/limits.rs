//! Per-consumer request-rate limits, so one consumer in a loop cannot crowd
//! out another: a token bucket per consumer, checked once its identity is
//! proven (an unauthenticated request never spends anyone's budget).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::bucket::TokenBucket;
use crate::config::RateLimit;

/// One consumer's bucket. A std `Mutex`: the critical section is a few
/// float operations, and only that consumer's requests contend for it.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    bucket: Mutex<TokenBucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            bucket: Mutex::new(TokenBucket::new(limit.burst, limit.per_second, Instant::now())),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one request; otherwise how long until one is allowed.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        self.bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_steady_rate() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(t0).is_ok());
        }
        let wait = limiter.check(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.check(t0 + Duration::from_millis(500)).is_ok());
        assert!(limiter.check(t0 + Duration::from_millis(500)).is_err());
        // Idle time refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check(later).is_ok());
        }
        assert!(limiter.check(later).is_err());
    }
}
