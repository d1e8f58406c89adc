//! The refresher's log lines for failed calls: one per call, at the level
//! its step deserves.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, warn};

use super::super::policy::Next;
use crate::kraken::{KrakenError, Reason};

/// One log line per failed call, at the level its step deserves.
pub(super) fn log_failure(account: &str, key: &str, error: &KrakenError, next: Next, took: Duration, now: Instant) {
    let reason = error.reason();
    let duration_ms = took.as_millis() as u64;
    let retry_in = next.at(now).saturating_duration_since(now);
    match next {
        Next::ResignNow => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms,
            "Kraken rejected the nonce; retrying once with a fresh one"
        ),
        Next::NextCode { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken rejected the signature; retrying once with the next TOTP code"
        ),
        Next::Rejected { hint, .. } => error!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, fix = hint, ?retry_in,
            "Kraken rejects this account's key: an operator must act"
        ),
        Next::LockedOut { .. } => error!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken locked the key out; no calls until the lockout passes"
        ),
        Next::Throttled { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken asked to wait; refresh failed"
        ),
        Next::Backoff { .. } if reason == Reason::InvalidNonce => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken rejected the nonce again: is another process using this API key?"
        ),
        Next::Backoff { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "token refresh failed"
        ),
    }
}
