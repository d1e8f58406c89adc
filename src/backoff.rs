//! The one back-off of the project: the refresher's retries toward Kraken
//! and the agent's reconnects to the broker both wait this long.

use std::time::Duration;

/// The back-off after `failures` consecutive failures (1 for the first):
/// exponential from `initial`, capped at `max`, with "equal jitter" (half
/// fixed, half random: `jitter_fraction` in 0..=1) so a fleet spreads out
/// but never retries at once.
pub fn delay(failures: u32, initial: Duration, max: Duration, jitter_fraction: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1u32 << exponent).min(max);
    let half = base / 2;
    half + half.mul_f64(jitter_fraction.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_half_jitter() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(delay(1, i, m, 0.0), Duration::from_millis(500));
        assert_eq!(delay(1, i, m, 1.0), Duration::from_secs(1));
        assert_eq!(delay(3, i, m, 1.0), Duration::from_secs(4));
        assert_eq!(delay(7, i, m, 1.0), Duration::from_secs(60));
        assert_eq!(delay(u32::MAX, i, m, 1.0), Duration::from_secs(60));
        assert_eq!(delay(0, i, m, 1.0), Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn backoff_is_bounded_and_grows(
            failures in 1u32..100,
            initial_ms in 1u64..10_000,
            max_ms in 1u64..1_000_000,
            fraction in 0.0f64..1.0,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis(max_ms.max(initial_ms));
            let d = delay(failures, initial, max, fraction);
            prop_assert!(d <= max);
            prop_assert!(d >= initial.min(max) / 2);
            prop_assert!(delay(failures + 1, initial, max, 1.0) >= delay(failures, initial, max, 1.0));
        }
    }
}
