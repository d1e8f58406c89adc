//! The one token bucket of the project: a consumer's request rate, each
//! consumer's and each account's forced refreshes, the TokenReview budget,
//! and the failed authentications of a client address are all one of these.

use std::time::Duration;

use tokio::time::Instant;

/// Up to `capacity` tokens, refilled at `per_second`; time is passed in, so
/// callers (and tests) decide the clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilling at `per_second` (both
    /// positive: a bucket that never refills is a bug, not a setting).
    pub fn new(capacity: f64, per_second: f64, now: Instant) -> Self {
        debug_assert!(capacity >= 1.0 && per_second > 0.0);
        Self {
            tokens: capacity,
            capacity,
            per_second: per_second.max(f64::MIN_POSITIVE),
            at: now,
        }
    }

    /// A full bucket of `burst` tokens, one more every `every`.
    pub fn every(burst: u32, every: Duration, now: Instant) -> Self {
        Self::new(f64::from(burst), 1.0 / every.as_secs_f64().max(1e-9), now)
    }

    /// The tokens held at `now`.
    pub fn level(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * self.per_second).min(self.capacity)
    }

    /// Whether it has refilled to the brim (its holder may forget it).
    pub fn is_full(&self, now: Instant) -> bool {
        self.level(now) >= self.capacity
    }

    /// How long until one token is held; zero if one is.
    pub fn wait(&self, now: Instant) -> Duration {
        let missing = 1.0 - self.level(now);
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(missing / self.per_second).unwrap_or(Duration::MAX)
    }

    /// Takes one token; otherwise how long until one is held (nothing taken).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.tokens = self.level(now);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait(now))
        }
    }

    /// Spends one token if any is left (a failure counted against it).
    pub fn spend(&mut self, now: Instant) {
        self.tokens = (self.level(now) - 1.0).max(0.0);
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3.0, 2.0, t0);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        assert_eq!(b.take(t0), Err(Duration::from_millis(500)));
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(500)).is_err());
        let later = t0 + Duration::from_secs(60);
        assert!(b.is_full(later), "idle time refills up to the capacity, not beyond");
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn every_gives_one_token_per_period_and_spend_never_goes_below_zero() {
        let t0 = Instant::now();
        let mut b = TokenBucket::every(1, Duration::from_secs(10), t0);
        assert!(b.take(t0).is_ok());
        assert_eq!(b.take(t0 + Duration::from_secs(4)), Err(Duration::from_secs(6)));
        b.spend(t0 + Duration::from_secs(5));
        b.spend(t0 + Duration::from_secs(5));
        assert_eq!(b.level(t0 + Duration::from_secs(5)), 0.0);
        assert_eq!(b.wait(t0 + Duration::from_secs(5)), Duration::from_secs(10));
    }

    proptest! {
        #[test]
        fn the_level_stays_within_the_bucket_and_waits_are_finite(
            capacity in 1.0f64..1e6,
            per_second in 1e-6f64..1e6,
            steps in prop::collection::vec((0u64..100_000, any::<bool>()), 1..50),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(capacity, per_second, t0);
            let mut now = t0;
            for (ms, take) in steps {
                now += Duration::from_millis(ms);
                if take { let _ = b.take(now); } else { b.spend(now); }
                let level = b.level(now);
                prop_assert!((0.0..=capacity).contains(&level));
                prop_assert!(b.wait(now) <= Duration::MAX);
            }
        }
    }
}
