//! Per-key nonces: nanoseconds since the epoch, strictly increasing forever.
//!
//! Kraken rejects any nonce not above the last one it accepted for the key,
//! and never lets a key go back. `next` returns `max(previous + 1, now_ns)`, so
//! bursts within one nanosecond and backward clock steps still increase.
//!
//! Why nanoseconds: Kraken's docs call a millisecond timestamp the usual
//! choice and recommend no scale; nanoseconds are this broker's own choice,
//! because they are above any millisecond, microsecond or 1e-8 s nonce a key
//! may have seen before (so adopting a used key works), and a burst never
//! repeats a value. The cost: a key used once with nanosecond nonces can
//! never again be used with millisecond ones, and a Custom Nonce Window set
//! on the key counts nanoseconds here (see proto-docs/kraken.md).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::WallClock;

/// A lock-free, strictly increasing nonce sequence for one API key.
#[derive(Debug)]
pub struct NonceSource {
    last: AtomicU64,
    clock: WallClock,
}

impl Default for NonceSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NonceSource {
    pub fn new() -> Self {
        Self::with_clock(WallClock::system())
    }

    pub fn with_clock(clock: WallClock) -> Self {
        Self {
            last: AtomicU64::new(0),
            clock,
        }
    }

    /// The clock the nonces follow.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// The last nonce returned (0: none yet).
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// The next nonce: above every nonce this source returned before.
    pub fn next(&self) -> u64 {
        let now = self.clock.unix_nanos();
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

    #[tokio::test(start_paused = true)]
    async fn a_frozen_clock_still_gives_increasing_nonces() {
        // Paused tokio time does not move: the clock stands at 42 ns.
        let frozen = WallClock::following_tokio(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(42));
        let source = NonceSource::with_clock(frozen);
        assert_eq!(source.next(), 42);
        assert_eq!(source.next(), 43);
        assert_eq!(source.next(), 44);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_stepping_back_never_lowers_the_nonce() {
        let clock = WallClock::following_tokio(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1000));
        let source = NonceSource::with_clock(clock.clone());
        let mut got = vec![source.next()];
        // 1000, 500, 1500, 10 ...
        for step in [-500, 1000, -1490] {
            clock.step(step);
            got.push(source.next());
        }
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
