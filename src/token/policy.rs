//! What a refresher does after a failed call: one pure function of the
//! failures so far, the error, the policy, the clocks and a random fraction.
//!
//! [`after_failure`] reads like [`crate::kraken::classify_api_error`]: every
//! error's [`Action`] becomes a [`Next`] step, and a table of tests holds it
//! to that. The refresher only carries the step out (and logs it).
//!
//! The retry rules, decided once here:
//! - `EAPI:Invalid nonce`: every attempt gets one immediate re-signed retry.
//!   A nonce race with another holder of the key is a one-off collision, so
//!   an attempt made after a back-off deserves its own retry just as the
//!   first one did. The retry belongs to its attempt: it does not count as a
//!   further failure. A nonce rejected again means another signer keeps
//!   the key's nonce ahead of this broker's: rejected, with the cure in the
//!   hint (rotate the key, or raise its nonce window).
//! - `EAPI:Invalid signature` with a TOTP seed: once per streak, wait for the
//!   next code and retry (a code may have been refused as reused or late);
//!   after that, the rejection is treated as permanent.
//! - Permanent rejections are retried slowly; a lockout opens the circuit;
//!   a throttle timestamp is obeyed but never shorter than the back-off.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::schedule::{MAX_REJECTED_RETRY, RefreshPolicy};
use crate::kraken::{Action, KrakenError, NONCE_AHEAD_HINT, Reason};

/// The longest an `EService:Throttled` timestamp or an edge `Retry-After` is
/// obeyed, in case Kraken's clock and ours disagree wildly.
pub const MAX_THROTTLE_WAIT: Duration = Duration::from_secs(3600);

/// A little past the moment the next TOTP code appears, so the code made
/// then is the new one even with a few milliseconds of clock jitter.
pub const NEXT_CODE_MARGIN: Duration = Duration::from_millis(100);

/// The failures in a row so far: all the failure policy needs to remember.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    /// Failed attempts in a row. A re-signed nonce retry is part of its
    /// attempt, not one more.
    pub failures: u32,
    /// The call in flight (or the last one made) was an attempt's immediate
    /// re-signed retry after `EAPI:Invalid nonce`.
    pub nonce_retried: bool,
    /// This streak already waited for the next TOTP code once.
    pub totp_retried: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Re-sign with a fresh nonce and call again at once.
    ResignNow,
    /// Call again at `at`, when the authenticator shows its next code.
    NextCode { at: Instant },
    /// A transient failure: call again at `at`.
    Backoff { at: Instant },
    /// Kraken asked to wait (a `Throttled` timestamp, an edge `Retry-After`):
    /// no call before `at`.
    Throttled { at: Instant },
    /// Kraken rejects the key for good: an operator must act. Retried slowly
    /// at `at` so the key is never pushed into a lockout.
    Rejected { at: Instant, hint: &'static str },
    /// Kraken locked the key out: no call before `until`.
    LockedOut { until: Instant },
}

impl Next {
    /// When the next call may be made.
    pub fn at(&self, now: Instant) -> Instant {
        match *self {
            Next::ResignNow => now,
            Next::NextCode { at }
            | Next::Backoff { at }
            | Next::Throttled { at }
            | Next::Rejected { at, .. }
            | Next::LockedOut { until: at } => at,
        }
    }
}

/// Everything besides the streak and the error that the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub policy: &'a RefreshPolicy,
    pub now: Instant,
    /// The wall clock now, to read Kraken's absolute `Throttled` timestamps.
    pub wall_now: SystemTime,
    /// With a TOTP seed: how long until the next code appears.
    pub next_code_in: Option<Duration>,
    /// A random fraction in `[0, 1)` for the back-off's jitter.
    pub jitter: f64,
}

/// The step after a failed call, and the streak it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub next: Next,
    pub streak: Streak,
}

/// Decides what follows a failed call. Pure: the same inputs always give the
/// same decision.
pub fn after_failure(streak: Streak, error: &KrakenError, cx: &Context<'_>) -> Decision {
    let action = error.action();
    if action == Action::RetryOnceNow && !streak.nonce_retried {
        return Decision {
            next: Next::ResignNow,
            streak: Streak {
                nonce_retried: true,
                ..streak
            },
        };
    }
    // One more failed attempt; the next attempt gets its own nonce retry.
    let mut after = Streak {
        failures: streak.failures.saturating_add(1),
        nonce_retried: false,
        ..streak
    };
    let backoff = |at_least: Duration| {
        let policy = cx.policy;
        crate::backoff::delay(after.failures, policy.retry_initial, policy.retry_max, cx.jitter).max(at_least)
    };
    let next = match action {
        Action::Alert { .. } if error.reason() == Reason::InvalidSignature && !streak.totp_retried => {
            match cx.next_code_in {
                Some(wait) => {
                    after.totp_retried = true;
                    Next::NextCode {
                        at: cx.now + wait + NEXT_CODE_MARGIN,
                    }
                }
                None => rejected(error, after.failures, cx),
            }
        }
        Action::Alert { .. } => rejected(error, after.failures, cx),
        Action::OpenCircuit(open_for) => Next::LockedOut {
            until: cx.now + open_for,
        },
        Action::WaitUntil(until) => {
            // Never sooner than the ordinary back-off: a timestamp already
            // past must not turn into a retry loop.
            let until = until.duration_since(cx.wall_now).unwrap_or(Duration::ZERO);
            Next::Throttled {
                at: cx.now + backoff(until).min(MAX_THROTTLE_WAIT),
            }
        }
        Action::WaitFor(wait) => Next::Throttled {
            at: cx.now + backoff(wait).min(MAX_THROTTLE_WAIT),
        },
        Action::Backoff { at_least } => Next::Backoff {
            at: cx.now + backoff(at_least),
        },
        // The nonce was rejected again, after its re-signed retry: another
        // signer keeps the key's nonce ahead of this broker's. No call can
        // learn that nonce (every private call needs one above it): an
        // operator must act.
        Action::RetryOnceNow => Next::Rejected {
            at: cx.now + rejected_retry_delay(after.failures, cx.policy),
            hint: NONCE_AHEAD_HINT,
        },
    };
    Decision { next, streak: after }
}

/// The delay before retrying a key rejected `failures` times in a row:
/// `retry_rejected`, doubling, at most [`MAX_REJECTED_RETRY`]; the one
/// back-off of the project, without jitter (a rejected key is retried
/// rarely, and on the schedule its runbook states).
pub fn rejected_retry_delay(failures: u32, policy: &RefreshPolicy) -> Duration {
    crate::backoff::delay(failures, policy.retry_rejected, MAX_REJECTED_RETRY, 1.0)
}

fn rejected(error: &KrakenError, failures: u32, cx: &Context<'_>) -> Next {
    let hint = match error.action() {
        Action::Alert { hint } => hint,
        _ => "",
    };
    Next::Rejected {
        at: cx.now + rejected_retry_delay(failures, cx.policy),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::classify_api_error;
    use std::time::UNIX_EPOCH;

    const POLICY: RefreshPolicy = RefreshPolicy::DEFAULT;
    const WALL: u64 = 1_800_000_000;

    fn api(code: &str) -> KrakenError {
        KrakenError::Api(classify_api_error(code).unwrap())
    }

    fn streak(failures: u32, nonce_retried: bool, totp_retried: bool) -> Streak {
        Streak {
            failures,
            nonce_retried,
            totp_retried,
        }
    }

    /// The step, as (kind, seconds after now), so rows read as a table.
    fn kind(next: Next, now: Instant) -> (&'static str, f64) {
        let secs = |at: Instant| (at - now).as_secs_f64();
        match next {
            Next::ResignNow => ("resign-now", 0.0),
            Next::NextCode { at } => ("next-code", secs(at)),
            Next::Backoff { at } => ("backoff", secs(at)),
            Next::Throttled { at } => ("throttled", secs(at)),
            Next::Rejected { at, .. } => ("rejected", secs(at)),
            Next::LockedOut { until } => ("locked-out", secs(until)),
        }
    }

    struct Row {
        before: Streak,
        error: KrakenError,
        /// TOTP: the next code in this many seconds.
        next_code_in: Option<u64>,
        want: (&'static str, f64),
        after: Streak,
    }

    fn row(
        before: Streak,
        error: KrakenError,
        next_code_in: Option<u64>,
        want: (&'static str, f64),
        after: Streak,
    ) -> Row {
        Row {
            before,
            error,
            next_code_in,
            want,
            after,
        }
    }

    /// The failure policy as a table: the streak before, the error, the
    /// step (kind and delay, with jitter 0.5) and the streak after.
    /// Back-off with jitter 0.5 is 3/4 of `min(1 s * 2^(n-1), 60 s)`; a
    /// rejected key waits `min(5 min * 2^(n-1), 60 min)`.
    fn table() -> Vec<Row> {
        let fresh = Streak::default();
        let throttled_in_30 =
            KrakenError::Api(classify_api_error(&format!("EService:Throttled: {}", WALL + 30)).unwrap());
        let throttled_past = api("EService:Throttled: 1000000000");
        vec![
            // A nonce race: re-signed at once, not a failure yet ...
            row(
                fresh,
                api("EAPI:Invalid nonce"),
                None,
                ("resign-now", 0.0),
                streak(0, true, false),
            ),
            // ... rejected again: another signer keeps the nonce ahead, an
            // operator must act (retried slowly; the next attempt gets its
            // own re-signed retry).
            row(
                streak(0, true, false),
                api("EAPI:Invalid nonce"),
                None,
                ("rejected", 300.0),
                streak(1, false, false),
            ),
            row(
                streak(3, false, false),
                api("EAPI:Invalid nonce"),
                None,
                ("resign-now", 0.0),
                streak(3, true, false),
            ),
            row(
                streak(3, true, false),
                api("EAPI:Invalid nonce"),
                None,
                ("rejected", 2400.0),
                streak(4, false, false),
            ),
            // Transient failures back off exponentially, capped at retry_max.
            row(
                fresh,
                api("EService:Unavailable"),
                None,
                ("backoff", 0.75),
                streak(1, false, false),
            ),
            row(
                streak(1, false, false),
                KrakenError::Timeout(Duration::from_secs(10)),
                None,
                ("backoff", 1.5),
                streak(2, false, false),
            ),
            row(
                streak(9, false, false),
                KrakenError::Transport("refused".into()),
                None,
                ("backoff", 45.0),
                streak(10, false, false),
            ),
            row(
                streak(2, true, false),
                KrakenError::HttpStatus {
                    status: 502,
                    retry_after: None,
                },
                None,
                ("backoff", 3.0),
                streak(3, false, false),
            ),
            // A rate limit backs off at least 10 s.
            row(
                fresh,
                api("EAPI:Rate limit exceeded"),
                None,
                ("backoff", 10.0),
                streak(1, false, false),
            ),
            row(
                streak(7, false, false),
                api("EAPI:Rate limit exceeded"),
                None,
                ("backoff", 45.0),
                streak(8, false, false),
            ),
            // Throttled until a timestamp: waited out; one already past still backs off.
            row(
                fresh,
                throttled_in_30,
                None,
                ("throttled", 30.0),
                streak(1, false, false),
            ),
            row(
                fresh,
                throttled_past,
                None,
                ("throttled", 0.75),
                streak(1, false, false),
            ),
            // An edge Retry-After: waited out, never shorter than the back-off.
            row(
                fresh,
                KrakenError::HttpStatus {
                    status: 429,
                    retry_after: Some(Duration::from_secs(20)),
                },
                None,
                ("throttled", 20.0),
                streak(1, false, false),
            ),
            // Rejections: an operator must act; retried slowly.
            row(
                fresh,
                api("EAPI:Invalid key"),
                None,
                ("rejected", 300.0),
                streak(1, false, false),
            ),
            // Rejections in a row double the wait: 5, 10, 20 ... at most 60 minutes.
            row(
                streak(1, false, false),
                api("EAPI:Invalid key"),
                None,
                ("rejected", 600.0),
                streak(2, false, false),
            ),
            row(
                streak(4, false, false),
                api("EGeneral:Permission denied"),
                None,
                ("rejected", 3600.0),
                streak(5, false, false),
            ),
            row(
                fresh,
                api("EAPI:Invalid signature"),
                None,
                ("rejected", 300.0),
                streak(1, false, false),
            ),
            // With a TOTP seed, a rejected signature waits once for the next code.
            row(
                fresh,
                api("EAPI:Invalid signature"),
                Some(12),
                ("next-code", 12.1),
                streak(1, false, true),
            ),
            row(
                streak(1, false, true),
                api("EAPI:Invalid signature"),
                Some(30),
                ("rejected", 600.0),
                streak(2, false, true),
            ),
            // A TOTP seed does not help an invalid key.
            row(
                fresh,
                api("EAPI:Invalid key"),
                Some(12),
                ("rejected", 300.0),
                streak(1, false, false),
            ),
            // A lockout opens the circuit for 15 minutes.
            row(
                fresh,
                api("EGeneral:Temporary lockout"),
                None,
                ("locked-out", 900.0),
                streak(1, false, false),
            ),
            row(
                streak(0, true, false),
                api("EGeneral:Temporary lockout"),
                None,
                ("locked-out", 900.0),
                streak(1, false, false),
            ),
            // Client bugs and account states are permanent.
            row(
                fresh,
                api("EGeneral:Invalid arguments"),
                None,
                ("rejected", 300.0),
                streak(1, false, false),
            ),
            row(
                fresh,
                KrakenError::MalformedResponse("x".into()),
                None,
                ("backoff", 0.75),
                streak(1, false, false),
            ),
        ]
    }

    #[test]
    fn the_failure_policy_table() {
        let now = Instant::now();
        for (i, r) in table().into_iter().enumerate() {
            let cx = Context {
                policy: &POLICY,
                now,
                wall_now: UNIX_EPOCH + Duration::from_secs(WALL),
                next_code_in: r.next_code_in.map(Duration::from_secs),
                jitter: 0.5,
            };
            let d = after_failure(r.before, &r.error, &cx);
            let (got_kind, got_secs) = kind(d.next, now);
            let (want_kind, want_secs) = r.want;
            assert_eq!(got_kind, want_kind, "row {i}: {:?}", r.error);
            assert!(
                (got_secs - want_secs).abs() < 0.001,
                "row {i}: {:?}: {got_secs} s, want {want_secs} s",
                r.error
            );
            assert_eq!(d.streak, r.after, "row {i}: {:?}", r.error);
        }
    }

    #[test]
    fn rejections_carry_the_classifiers_hint() {
        let cx = Context {
            policy: &POLICY,
            now: Instant::now(),
            wall_now: SystemTime::now(),
            next_code_in: None,
            jitter: 0.0,
        };
        let Next::Rejected { hint, .. } =
            after_failure(Streak::default(), &api("EGeneral:Permission denied"), &cx).next
        else {
            panic!("permission denied is a rejection");
        };
        assert!(hint.contains("WebSocket interface"), "{hint}");
    }

    #[test]
    fn rejected_retries_double_from_retry_rejected_to_an_hour() {
        let p = RefreshPolicy {
            retry_rejected: Duration::from_secs(1),
            ..POLICY
        };
        let delays: Vec<u64> = (1..=14).map(|n| rejected_retry_delay(n, &p).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600]);
        assert_eq!(rejected_retry_delay(u32::MAX, &POLICY), MAX_REJECTED_RETRY);
        assert_eq!(rejected_retry_delay(1, &POLICY), Duration::from_secs(300));
    }

    proptest::proptest! {
        #[test]
        fn no_failure_ever_means_calling_again_at_once_twice(
            failures in 0u32..50,
            jitter in 0.0f64..1.0,
            code in proptest::sample::select(vec![
                "EAPI:Invalid nonce", "EService:Unavailable", "EAPI:Invalid key",
                "EAPI:Rate limit exceeded", "EGeneral:Temporary lockout", "EAPI:Invalid signature",
            ]),
        ) {
            let cx = Context {
                policy: &POLICY,
                now: Instant::now(),
                wall_now: SystemTime::now(),
                next_code_in: Some(Duration::from_secs(1)),
                jitter,
            };
            let first = after_failure(streak(failures, false, false), &api(code), &cx);
            let second = after_failure(first.streak, &api(code), &cx);
            proptest::prop_assert!(
                !(first.next == Next::ResignNow && second.next == Next::ResignNow),
                "two immediate retries in a row for {}", code
            );
            proptest::prop_assert!(second.next.at(cx.now) >= cx.now + POLICY.retry_initial / 2 || second.next == Next::ResignNow);
        }
    }
}
