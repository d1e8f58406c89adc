//! The wall clock, injected, and the one set of Unix-time helpers.
//!
//! Serving decisions use tokio's monotonic clock; the wall clock is only for
//! what leaves the process: nonces, TOTP codes, Kraken's `Throttled`
//! timestamps, RFC 3339 strings and metric timestamps. Every reader of it
//! takes a [`WallClock`], so a test can step it (a wall clock jumping back an
//! hour) or let it follow tokio's paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a [`WallClock`] reads the time before its step is applied.
#[derive(Debug)]
enum Base {
    /// The operating system's clock.
    System,
    /// `start` plus the time tokio's clock has moved since `origin`: with
    /// paused tokio time in tests, the wall clock advances as tokio does.
    Tokio {
        origin: tokio::time::Instant,
        start: SystemTime,
    },
}

#[derive(Debug)]
struct Inner {
    base: Base,
    /// Nanoseconds added to the base (negative: the clock stepped back).
    step_nanos: AtomicI64,
}

/// A wall clock. Cloning shares it: a step is seen by every clone.
#[derive(Debug, Clone)]
pub struct WallClock(Arc<Inner>);

impl Default for WallClock {
    fn default() -> Self {
        Self::system()
    }
}

impl WallClock {
    /// The operating system's clock.
    pub fn system() -> Self {
        Self::with_base(Base::System)
    }

    /// A clock that starts at `start` and moves with tokio's clock (for
    /// tests under `start_paused`).
    pub fn following_tokio(start: SystemTime) -> Self {
        Self::with_base(Base::Tokio {
            origin: tokio::time::Instant::now(),
            start,
        })
    }

    fn with_base(base: Base) -> Self {
        Self(Arc::new(Inner {
            base,
            step_nanos: AtomicI64::new(0),
        }))
    }

    /// Moves the clock by `by` (negative: back), as an NTP step or an
    /// operator's `date -s` would.
    pub fn step(&self, by_nanos: i64) {
        self.0.step_nanos.fetch_add(by_nanos, Ordering::SeqCst);
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        let base = match &self.0.base {
            Base::System => SystemTime::now(),
            Base::Tokio { origin, start } => *start + origin.elapsed(),
        };
        let step = self.0.step_nanos.load(Ordering::SeqCst);
        let magnitude = Duration::from_nanos(step.unsigned_abs());
        if step >= 0 {
            base + magnitude
        } else {
            base.checked_sub(magnitude).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH)
        }
    }

    /// Nanoseconds since the Unix epoch, now (0 before 1970).
    pub fn unix_nanos(&self) -> u64 {
        unix_nanos(self.now())
    }

    /// Whole seconds since the Unix epoch, now.
    pub fn unix_secs(&self) -> u64 {
        unix_secs(self.now())
    }
}

/// Time since the Unix epoch (zero for a time before it).
pub fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

/// Whole seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    since_epoch(t).as_secs()
}

/// Seconds since the Unix epoch as a float, as Prometheus timestamps are.
pub fn unix_secs_f64(t: SystemTime) -> f64 {
    since_epoch(t).as_secs_f64()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_millis()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the Unix epoch (saturating in the year 2554).
pub fn unix_nanos(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_nanos()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, by the operating system's clock.
pub fn now_unix_millis() -> u64 {
    unix_millis(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stepped_clock_moves_both_ways_and_never_before_the_epoch() {
        let clock = WallClock::system();
        let before = clock.now();
        clock.step(-3_600_000_000_000);
        let back = clock.now();
        assert!(back < before - Duration::from_secs(3599), "{back:?} vs {before:?}");
        clock.step(7_200_000_000_000);
        assert!(clock.now() > before + Duration::from_secs(3599));
        clock.step(i64::MIN / 2);
        assert!(clock.now() >= UNIX_EPOCH);
    }

    #[test]
    fn clones_share_steps() {
        let a = WallClock::system();
        let b = a.clone();
        a.step(10_000_000_000);
        assert!(b.now() > SystemTime::now() + Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_following_clock_moves_with_paused_time() {
        let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = WallClock::following_tokio(start);
        assert_eq!(clock.now(), start);
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(clock.unix_secs(), 1_800_000_090);
        assert_eq!(clock.unix_nanos(), 1_800_000_090 * 1_000_000_000);
    }

    #[test]
    fn unix_helpers_agree() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(unix_secs(t), 1);
        assert_eq!(unix_millis(t), 1_500);
        assert_eq!(unix_nanos(t), 1_500_000_000);
        assert!((unix_secs_f64(t) - 1.5).abs() < 1e-9);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }
}
