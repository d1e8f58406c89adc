//! When to refresh, and how long to back off: pure functions of the clock,
//! the token, the policy and a random fraction, so they can be tested
//! exhaustively without waiting.

use std::time::Duration;

use tokio::time::Instant;

/// The `[refresh]` section of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Start refreshing once this little use-by is left.
    pub refresh_before_expiry: Duration,
    /// Never hand out a token with less than this left.
    pub min_served_ttl: Duration,
    /// Refresh up to this much earlier, at random, so replicas spread out.
    pub jitter: Duration,
    /// First back-off after a failed refresh.
    pub retry_initial: Duration,
    /// Longest back-off after failed refreshes.
    pub retry_max: Duration,
    /// The first retry after Kraken rejects the key itself; doubles per
    /// rejection in a row, up to [`MAX_REJECTED_RETRY`].
    pub retry_rejected: Duration,
}

/// The longest wait between retries of a rejected key.
pub const MAX_REJECTED_RETRY: Duration = Duration::from_secs(3600);

impl RefreshPolicy {
    /// The `[refresh]` defaults, as the contract documents them.
    pub const DEFAULT: RefreshPolicy = RefreshPolicy {
        // Half of Kraken's 900 s lifetime, as Kraken's own SDK refreshes.
        refresh_before_expiry: Duration::from_secs(450),
        min_served_ttl: Duration::from_secs(60),
        jitter: Duration::from_secs(30),
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(60),
        retry_rejected: Duration::from_secs(300),
    };
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A refresh comes no sooner than this fraction of a token's lifetime after
/// it was issued, unless the token would stop being servable first: a policy
/// meant for 900 s tokens must not make the broker hammer Kraken when tokens
/// live 10 s.
pub const MIN_AGE_FRACTION: f64 = 0.25;

/// And never sooner than this after issue, whatever else holds: even a token
/// that can never be served (lifetime under `min_served_ttl`) must not put
/// the broker in a loop of calls.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// When to refresh a token issued at `issued_at` that may be used until
/// `expires_at`. `jitter_fraction` is in `[0, 1)`.
///
/// The aim is `expires_at - refresh_before_expiry - jitter * fraction`,
/// kept within `[issued_at + lifetime * MIN_AGE_FRACTION, expires_at - min_served_ttl]`
/// (the upper bound wins if the two cross): after that point the token can
/// no longer be served, so the refresh must have started. Whatever the
/// numbers, the result is at least [`MIN_REFRESH_INTERVAL`] after issue.
pub fn next_refresh_at(
    issued_at: Instant,
    expires_at: Instant,
    policy: &RefreshPolicy,
    jitter_fraction: f64,
) -> Instant {
    let lifetime = expires_at.saturating_duration_since(issued_at);
    let fraction = jitter_fraction.clamp(0.0, 1.0);
    let lead = policy.refresh_before_expiry + policy.jitter.mul_f64(fraction);
    let target = expires_at.checked_sub(lead).unwrap_or(issued_at).max(issued_at);
    let latest = expires_at
        .checked_sub(policy.min_served_ttl)
        .unwrap_or(issued_at)
        .max(issued_at);
    let earliest = (issued_at + lifetime.mul_f64(MIN_AGE_FRACTION)).min(latest);
    target.clamp(earliest, latest).max(issued_at + MIN_REFRESH_INTERVAL)
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    #[test]
    fn default_policy_refreshes_between_420_and_450_seconds_into_a_900_second_token() {
        let t0 = Instant::now();
        let exp = t0 + Duration::from_secs(900);
        assert_eq!(next_refresh_at(t0, exp, &policy(), 0.0), t0 + Duration::from_secs(450));
        assert_eq!(next_refresh_at(t0, exp, &policy(), 0.5), t0 + Duration::from_secs(435));
        let late = next_refresh_at(t0, exp, &policy(), 0.999_999);
        assert!(late > t0 + Duration::from_secs(420) && late <= t0 + Duration::from_secs(421));
    }

    #[test]
    fn short_lived_tokens_are_not_refreshed_in_a_loop() {
        let t0 = Instant::now();
        // A 10 s token under a policy for 900 s tokens: not before 2.5 s.
        let policy = RefreshPolicy {
            min_served_ttl: Duration::from_secs(2),
            ..policy()
        };
        let at = next_refresh_at(t0, t0 + Duration::from_secs(10), &policy, 0.3);
        assert_eq!(at, t0 + Duration::from_millis(2500));
    }

    #[test]
    fn the_refresh_starts_before_the_token_stops_being_servable() {
        let t0 = Instant::now();
        // 100 s token, min_served_ttl 90 s: latest is 10 s in, below the 25 s minimum age.
        let policy = RefreshPolicy {
            min_served_ttl: Duration::from_secs(90),
            ..policy()
        };
        let at = next_refresh_at(t0, t0 + Duration::from_secs(100), &policy, 0.0);
        assert_eq!(at, t0 + Duration::from_secs(10));
    }

    #[test]
    fn a_token_that_can_never_be_served_does_not_cause_a_loop_of_calls() {
        let t0 = Instant::now();
        // 30 s tokens under min_served_ttl 60 s: not servable at all.
        let at = next_refresh_at(t0, t0 + Duration::from_secs(30), &policy(), 0.0);
        assert_eq!(at, t0 + MIN_REFRESH_INTERVAL);
        let at = next_refresh_at(t0, t0 + Duration::from_millis(10), &policy(), 0.0);
        assert_eq!(at, t0 + MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    fn arb_policy() -> impl Strategy<Value = RefreshPolicy> {
        (1u64..2000, 1u64..1000, 0u64..300, 1u64..10_000, 1u64..100_000).prop_map(|(rbe, mst, jit, ri, rm)| {
            RefreshPolicy {
                refresh_before_expiry: Duration::from_secs(rbe),
                min_served_ttl: Duration::from_secs(mst),
                jitter: Duration::from_secs(jit),
                retry_initial: Duration::from_millis(ri),
                retry_max: Duration::from_millis(ri.max(rm)),
                retry_rejected: Duration::from_secs(300),
            }
        })
    }

    proptest! {
        #[test]
        fn refresh_time_stays_within_the_tokens_servable_life(
            policy in arb_policy(),
            lifetime_ms in 1u64..2_000_000,
            fraction in 0.0f64..1.0,
        ) {
            let t0 = Instant::now();
            let exp = t0 + Duration::from_millis(lifetime_ms);
            let at = next_refresh_at(t0, exp, &policy, fraction);
            prop_assert!(at >= t0, "never before issue");
            prop_assert!(at >= t0 + MIN_REFRESH_INTERVAL, "never a loop of calls");
            let servable_until = exp.checked_sub(policy.min_served_ttl).unwrap_or(t0).max(t0);
            if servable_until >= t0 + MIN_REFRESH_INTERVAL {
                prop_assert!(at <= servable_until, "before the token stops being servable");
            }
            let min_age = Duration::from_millis(lifetime_ms).mul_f64(MIN_AGE_FRACTION);
            prop_assert!(at >= (t0 + min_age).min(servable_until), "not sooner than the minimum age");
        }

        #[test]
        fn more_jitter_never_means_a_later_refresh(
            policy in arb_policy(),
            lifetime_ms in 1u64..2_000_000,
            a in 0.0f64..1.0,
            b in 0.0f64..1.0,
        ) {
            let t0 = Instant::now();
            let exp = t0 + Duration::from_millis(lifetime_ms);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(next_refresh_at(t0, exp, &policy, hi) <= next_refresh_at(t0, exp, &policy, lo));
        }

    }
}
