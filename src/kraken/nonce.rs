//! Per-key nonces: nanoseconds since the epoch, strictly increasing forever.
//!
//! Kraken rejects any nonce not above the last one it accepted for the key,
//! and never lets a key go back. `next` returns `max(previous + 1, now_ns)`, so
//! bursts within one nanosecond and backward clock steps still increase. The
//! scale is nanoseconds, which Kraken recommends: a key used once with
//! nanosecond nonces can never again be used with millisecond ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A clock in nanoseconds since the Unix epoch; a parameter so tests can step it.
pub type NanoClock = fn() -> u64;

/// The wall clock in nanoseconds (0 if the clock is before 1970).
pub fn system_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A lock-free, strictly increasing nonce sequence for one API key.
#[derive(Debug)]
pub struct NonceSource {
    last: AtomicU64,
    clock: NanoClock,
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceSource {
    pub fn new() -> Self {
        Self::with_clock(system_nanos)
    }

    pub fn with_clock(clock: NanoClock) -> Self {
        Self {
            last: AtomicU64::new(0),
            clock,
        }
    }

    /// The next nonce: above every nonce this source returned before.
    pub fn next(&self) -> u64 {
        let now = (self.clock)();
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => prev = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn follows_the_clock_when_it_moves_forward() {
        let source = NonceSource::new();
        let a = source.next();
        assert!(a > 1_600_000_000_000_000_000, "nanoseconds since the epoch, got {a}");
    }

    #[test]
    fn a_frozen_clock_still_gives_increasing_nonces() {
        fn frozen() -> u64 {
            42
        }
        let source = NonceSource::with_clock(frozen);
        assert_eq!(source.next(), 42);
        assert_eq!(source.next(), 43);
        assert_eq!(source.next(), 44);
    }

    #[test]
    fn a_clock_stepping_back_never_lowers_the_nonce() {
        static STEP: AtomicU64 = AtomicU64::new(0);
        fn stepping() -> u64 {
            // 1000, 500, 1500, 10 ...
            [1000, 500, 1500, 10][STEP.fetch_add(1, Ordering::SeqCst) as usize % 4]
        }
        let source = NonceSource::with_clock(stepping);
        let got: Vec<u64> = (0..4).map(|_| source.next()).collect();
        assert_eq!(got, vec![1000, 1001, 1500, 1501]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn nonces_strictly_increase_per_thread_and_never_repeat_across_threads(
            threads in 2usize..8,
            per_thread in 1usize..500,
        ) {
            let source = Arc::new(NonceSource::new());
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let source = Arc::clone(&source);
                    std::thread::spawn(move || (0..per_thread).map(|_| source.next()).collect::<Vec<_>>())
                })
                .collect();
            let mut all = HashSet::new();
            for handle in handles {
                let seen = handle.join().unwrap();
                prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "increasing within a thread");
                for n in seen {
                    prop_assert!(all.insert(n), "nonce {} handed out twice", n);
                }
            }
            prop_assert_eq!(all.len(), threads * per_thread);
        }
    }
}
