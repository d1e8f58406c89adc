//! What one account's refresher publishes for readers: the current token (if
//! any), the account's health, and the serving rule. Readers load it
//! lock-free (`arc-swap`) and never wait on the refresher.
//!
//! The serving rule lives here alone: a token is handed out only with at
//! least `max(min_ttl, min_served_ttl)` left ([`ServingRule::need`],
//! [`CachedToken::lasts`]). The HTTP layer, readiness and the refresher all
//! ask it; none decides "enough time left" by itself.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::kraken::Reason;
use crate::secret::SecretString;

/// A token as the broker holds it.
#[derive(Debug)]
pub struct CachedToken {
    pub token: SecretString,
    /// SHA-256 of the token: how invalidation reports are matched, without
    /// keeping a second copy of the token around.
    pub sha256: [u8; 32],
    /// First 8 hex characters of `sha256`, for logs.
    pub fingerprint: String,
    /// When Kraken's answer arrived (monotonic).
    pub issued_at: Instant,
    /// Use-by for opening a connection (monotonic): what serving decisions use.
    pub expires_at: Instant,
    pub lifetime: Duration,
    /// RFC 3339 UTC, seconds: for the API body, rendered once.
    pub issued_at_rfc3339: String,
    pub expires_at_rfc3339: String,
}

impl CachedToken {
    /// A token that arrived at `issued_at` (monotonic) / `issued_wall`.
    pub fn new(token: SecretString, lifetime: Duration, issued_at: Instant, issued_wall: SystemTime) -> Self {
        let sha256: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        let fingerprint = hex::encode(&sha256[..4]);
        Self {
            token,
            sha256,
            fingerprint,
            issued_at,
            expires_at: issued_at + lifetime,
            lifetime,
            issued_at_rfc3339: humantime::format_rfc3339_seconds(issued_wall).to_string(),
            expires_at_rfc3339: humantime::format_rfc3339_seconds(issued_wall + lifetime).to_string(),
        }
    }

    /// Use-by left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// Whether the token still has `need` left at `now`: the one
    /// "enough time left" check.
    pub fn lasts(&self, need: Duration, now: Instant) -> bool {
        self.remaining(now) >= need
    }
}

/// How much use-by a token must have left to be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingRule {
    /// Never hand out a token with less than this left (`[refresh]`).
    pub min_served_ttl: Duration,
}

impl ServingRule {
    /// What a consumer asking for `min_ttl` needs: at least `min_served_ttl`.
    pub fn need(&self, min_ttl: Duration) -> Duration {
        min_ttl.max(self.min_served_ttl)
    }
}

/// SHA-256 of a token string, as [`CachedToken::sha256`] holds it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// How an account's refreshing is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No attempt has finished yet.
    Starting,
    /// The last refresh succeeded.
    Healthy,
    /// The last refresh failed; the next attempt is at `next_attempt`.
    Failing {
        reason: Reason,
        /// Kraken's code or the transport error, sanitised.
        detail: String,
        consecutive: u32,
        next_attempt: Instant,
        /// An operator must act (invalid key, permission, ...).
        permanent: bool,
        /// What the operator should do, when known.
        hint: Option<&'static str>,
    },
    /// Kraken locked the key out; no call before `until`.
    CircuitOpen { until: Instant },
}

/// One account's published state.
#[derive(Debug, Clone)]
pub struct Published {
    pub token: Option<std::sync::Arc<CachedToken>>,
    pub health: Health,
    pub rule: ServingRule,
    /// What Kraken says of the key (`GetApiKeyInfo`).
    pub key: std::sync::Arc<super::key::KeyReport>,
}

impl Published {
    pub fn starting(rule: ServingRule) -> Self {
        Self {
            token: None,
            health: Health::Starting,
            rule,
            key: Default::default(),
        }
    }

    /// The token to hand a consumer asking for `min_ttl` (zero: none) at
    /// `now`, if the held one is good enough under the serving rule.
    pub fn servable(&self, min_ttl: Duration, now: Instant) -> Option<&std::sync::Arc<CachedToken>> {
        let need = self.rule.need(min_ttl);
        self.token.as_ref().filter(|t| t.lasts(need, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_token_knows_its_use_by_and_hides_itself() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let t = CachedToken::new(SecretString::new("tok-123"), Duration::from_secs(900), t0, wall);
        assert_eq!(t.remaining(t0), Duration::from_secs(900));
        assert_eq!(t.remaining(t0 + Duration::from_secs(1000)), Duration::ZERO);
        assert_eq!(t.issued_at_rfc3339, "2026-11-18T11:06:40Z");
        assert_eq!(t.expires_at_rfc3339, "2026-11-18T11:21:40Z");
        assert_eq!(t.sha256, token_sha256("tok-123"));
        assert_eq!(t.fingerprint, t.token.fingerprint());
        assert!(!format!("{t:?}").contains("tok-123"));
    }

    #[test]
    fn servable_requires_enough_time_left() {
        let t0 = Instant::now();
        let t = std::sync::Arc::new(CachedToken::new(
            SecretString::new("x"),
            Duration::from_secs(100),
            t0,
            SystemTime::now(),
        ));
        let p = Published {
            token: Some(t),
            health: Health::Healthy,
            rule: ServingRule {
                min_served_ttl: Duration::from_secs(60),
            },
            key: Default::default(),
        };
        assert!(p.servable(Duration::from_secs(100), t0).is_some());
        assert!(p.servable(Duration::from_secs(101), t0).is_none());
        assert!(
            p.servable(Duration::from_secs(60), t0 + Duration::from_secs(41))
                .is_none()
        );
        // Asking for less than min_served_ttl still needs min_served_ttl.
        assert!(p.servable(Duration::ZERO, t0 + Duration::from_secs(40)).is_some());
        assert!(p.servable(Duration::ZERO, t0 + Duration::from_secs(41)).is_none());
    }
}
