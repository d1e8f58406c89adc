//! Everything that can go wrong calling Kraken, and what to do about it.
//!
//! Kraken reports most failures with HTTP 200 and a non-empty `error` array of
//! strings such as `EAPI:Invalid nonce` or `EService:Throttled: 1700000000`.
//! [`classify_api_error`] maps one such string to a [`Reason`] (the contract's
//! metric label), a [`Class`] (permanent or transient) and an [`Action`] (what
//! the caller must do next). Transport failures map the same way through
//! [`KrakenError::reason`], [`KrakenError::class`] and [`KrakenError::action`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long Kraken keeps a key locked out at least, and so how long the
/// circuit stays open after `EGeneral:Temporary lockout`.
pub const LOCKOUT_CIRCUIT: Duration = Duration::from_secs(15 * 60);

/// The shortest back-off after a rate-limit answer: calls made while limited
/// extend the restriction, and the Starter tier decays one call in 3 s.
pub const RATE_LIMIT_MIN_BACKOFF: Duration = Duration::from_secs(10);

/// The contract's `reason` label values, a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Transport,
    Timeout,
    HttpStatus,
    MalformedResponse,
    InvalidKey,
    InvalidSignature,
    InvalidNonce,
    PermissionDenied,
    RateLimited,
    Lockout,
    Unavailable,
    Other,
    /// The key holds a permission the account forbids (from
    /// `GetApiKeyInfo`; no call to `GetWebSocketsToken` is made).
    KeyTooPowerful,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Transport,
        Reason::Timeout,
        Reason::HttpStatus,
        Reason::MalformedResponse,
        Reason::InvalidKey,
        Reason::InvalidSignature,
        Reason::InvalidNonce,
        Reason::PermissionDenied,
        Reason::RateLimited,
        Reason::Lockout,
        Reason::Unavailable,
        Reason::Other,
        Reason::KeyTooPowerful,
    ];

    /// The place of this reason in [`Reason::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Transport => "transport",
            Reason::Timeout => "timeout",
            Reason::HttpStatus => "http_status",
            Reason::MalformedResponse => "malformed_response",
            Reason::InvalidKey => "invalid_key",
            Reason::InvalidSignature => "invalid_signature",
            Reason::InvalidNonce => "invalid_nonce",
            Reason::PermissionDenied => "permission_denied",
            Reason::RateLimited => "rate_limited",
            Reason::Lockout => "lockout",
            Reason::Unavailable => "unavailable",
            Reason::Other => "other",
            Reason::KeyTooPowerful => "key_too_powerful",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying can help without a person changing something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Heals by itself: network, exchange load, rate limits, nonce races.
    Transient,
    /// Needs an operator: the key, its permissions, the account, a client bug.
    Permanent,
}

/// What the caller must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-sign with a fresh nonce and retry at once, a single time.
    RetryOnceNow,
    /// Retry with capped exponential back-off and jitter, never sooner than
    /// `at_least`.
    Backoff { at_least: Duration },
    /// Do not call before this absolute time (`EService:Throttled: <ts>`).
    WaitUntil(SystemTime),
    /// Do not call for this long (an edge's `Retry-After`).
    WaitFor(Duration),
    /// Do not call at all for this long (temporary lockout).
    OpenCircuit(Duration),
    /// Stop, alert an operator, retry only slowly so the key is never pushed
    /// into a lockout. `hint` says what to fix.
    Alert { hint: &'static str },
}

/// One classified Kraken error string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub reason: Reason,
    pub class: Class,
    pub action: Action,
    /// Kraken's code, sanitised and bounded, fit for a log line.
    pub code: String,
}

/// A failed `GetWebSocketsToken` call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KrakenError {
    #[error("Kraken answered with an error: {}", .0.code)]
    Api(ApiFailure),
    #[error("could not reach Kraken: {0}")]
    Transport(String),
    #[error("no answer from Kraken within {0:?}")]
    Timeout(Duration),
    #[error("Kraken's edge answered HTTP {status}")]
    HttpStatus {
        status: u16,
        /// Parsed from a `Retry-After` header, when the edge sent one.
        retry_after: Option<Duration>,
    },
    #[error("Kraken's answer was malformed: {0}")]
    MalformedResponse(String),
    /// Refused by the broker before any call, for what `GetApiKeyInfo`
    /// reported of the key.
    #[error("{0}")]
    KeyRefused(KeyRefusal),
}

/// Why the broker will not call `GetWebSocketsToken` with a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error(
        "the API key lacks Kraken's `create-ws-token` permission (\"WebSocket interface\" in the key form), as GetApiKeyInfo reports: no GetWebSocketsToken call is made with it"
    )]
    MissingWsPermission,
    #[error(
        "the API key holds {}, which the account's forbid_permissions refuses (as GetApiKeyInfo reports): no GetWebSocketsToken call is made with it",
        .0.join(", ")
    )]
    TooPowerful(Vec<String>),
}

/// What to fix for a key without the WebSocket permission.
pub const MISSING_WS_PERMISSION_HINT: &str = "enable the \"WebSocket interface\" permission (create-ws-token) on the API key at Kraken; the broker sees it at its next GetApiKeyInfo (every key_info_interval) or at once on a reload";

/// What to fix for a key holding forbidden permissions.
pub const TOO_POWERFUL_HINT: &str = "install a key without the funding permissions (deposit, withdraw) that no token needs, or remove them from this key at Kraken and reload; forbid_permissions = [] opts out";

/// What to do when Kraken refuses the nonce again after a re-signed retry.
pub const NONCE_AHEAD_HINT: &str = "another signer has moved the key's nonce ahead of this broker's clock (the key is used elsewhere): rotate the key and find the other user, or raise the key's Custom Nonce Window at Kraken";

impl KrakenError {
    pub fn reason(&self) -> Reason {
        match self {
            KrakenError::Api(f) => f.reason,
            KrakenError::Transport(_) => Reason::Transport,
            KrakenError::Timeout(_) => Reason::Timeout,
            KrakenError::HttpStatus { .. } => Reason::HttpStatus,
            KrakenError::MalformedResponse(_) => Reason::MalformedResponse,
            KrakenError::KeyRefused(KeyRefusal::MissingWsPermission) => Reason::PermissionDenied,
            KrakenError::KeyRefused(KeyRefusal::TooPowerful(_)) => Reason::KeyTooPowerful,
        }
    }

    pub fn class(&self) -> Class {
        match self {
            KrakenError::Api(f) => f.class,
            KrakenError::KeyRefused(_) => Class::Permanent,
            _ => Class::Transient,
        }
    }

    /// Whether the failure was Kraken's answer to a call (a refusal decided
    /// by the broker made none: it counts toward no lockout).
    pub fn reached_kraken(&self) -> bool {
        !matches!(self, KrakenError::KeyRefused(_))
    }

    pub fn action(&self) -> Action {
        match self {
            KrakenError::Api(f) => f.action,
            KrakenError::KeyRefused(KeyRefusal::MissingWsPermission) => Action::Alert {
                hint: MISSING_WS_PERMISSION_HINT,
            },
            KrakenError::KeyRefused(KeyRefusal::TooPowerful(_)) => Action::Alert {
                hint: TOO_POWERFUL_HINT,
            },
            KrakenError::HttpStatus {
                retry_after: Some(after),
                ..
            } => Action::WaitFor(*after),
            _ => Action::Backoff {
                at_least: Duration::ZERO,
            },
        }
    }
}

/// The longest Kraken code kept for logs; Kraken's own are far shorter.
const MAX_CODE_LEN: usize = 120;

/// Keeps a code printable and bounded before it goes near a log line.
fn sanitise(code: &str) -> String {
    code.chars().filter(|c| !c.is_control()).take(MAX_CODE_LEN).collect()
}

/// Whether `code` is `category:message`, tolerating what Kraken appends:
/// spaces after the colon, and detail after the message (`:<field>`, ` <ts>`).
fn matches(code: &str, category: &str, message: &str) -> bool {
    let Some((cat, rest)) = code.split_once(':') else {
        return false;
    };
    if !cat.trim().eq_ignore_ascii_case(category) {
        return false;
    }
    let rest = rest.trim_start();
    let Some(head) = rest.get(..message.len()) else {
        return false;
    };
    if !head.eq_ignore_ascii_case(message) {
        return false;
    }
    // The message must end here: "Invalid key" is not "Invalid keys".
    rest[message.len()..]
        .chars()
        .next()
        .is_none_or(|c| c == ':' || c.is_whitespace())
}

/// The unix time after `EService:Throttled:`, if Kraken sent one.
fn throttled_until(code: &str) -> Option<SystemTime> {
    let digits: String = code
        .split_once(':')?
        .1
        .trim_start()
        .get("Throttled".len()..)?
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let secs: u64 = digits.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// What to fix when Kraken answers `EAPI:Invalid key`. Kraken's answer to a
/// call from an address not on the key's IP allowlist, and to a key past its
/// expiration, is not documented; both are named as likely causes.
pub const INVALID_KEY_HINT: &str = "the API key is unknown, revoked or expired, or the broker's egress IP address is not on the key's IP allowlist: install a valid key, or check its expiration and IP Address Restriction at Kraken";

/// What to fix when Kraken answers `Permission denied`.
pub const PERMISSION_HINT: &str = "enable the \"WebSocket interface\" permission on the API key, and check that its IP Address Restriction allows the broker's egress IP address";

/// Whether `code`'s category (before the first colon) is `category`.
fn category_is(code: &str, category: &str) -> bool {
    code.split_once(':')
        .is_some_and(|(cat, _)| cat.trim().eq_ignore_ascii_case(category))
}

/// Classifies one Kraken error string. Warnings (`W…`) are not failures and
/// give `None`; unknown `E…` strings give [`Reason::Other`], transient.
pub fn classify_api_error(code: &str) -> Option<ApiFailure> {
    let trimmed = code.trim();
    if !trimmed.starts_with('E') {
        return None;
    }
    let permanent = |reason, hint| (reason, Class::Permanent, Action::Alert { hint });
    let backoff = |reason, at_least| (reason, Class::Transient, Action::Backoff { at_least });
    let m = |cat, msg| matches(trimmed, cat, msg);

    let (reason, class, action) = if m("EAPI", "Invalid key") {
        permanent(Reason::InvalidKey, INVALID_KEY_HINT)
    } else if m("EAPI", "Invalid signature") {
        permanent(
            Reason::InvalidSignature,
            "the API secret does not match the key, or the key has 2FA and the otp is missing or wrong",
        )
    } else if m("EAPI", "Invalid nonce") {
        (Reason::InvalidNonce, Class::Transient, Action::RetryOnceNow)
    } else if m("EGeneral", "Permission denied")
        || m("EAPI", "Permission denied")
        || m("EAccount", "Invalid permissions")
    {
        permanent(Reason::PermissionDenied, PERMISSION_HINT)
    } else if m("EGeneral", "Temporary lockout") {
        (Reason::Lockout, Class::Transient, Action::OpenCircuit(LOCKOUT_CIRCUIT))
    } else if m("EAPI", "Rate limit exceeded")
        || m("EGeneral", "Too many requests")
        || m("EAuth", "Rate limit exceeded")
        || m("EAuth", "Too many requests")
    {
        backoff(Reason::RateLimited, RATE_LIMIT_MIN_BACKOFF)
    } else if m("EService", "Throttled") {
        let action = throttled_until(trimmed).map_or(
            Action::Backoff {
                at_least: RATE_LIMIT_MIN_BACKOFF,
            },
            Action::WaitUntil,
        );
        (Reason::RateLimited, Class::Transient, action)
    } else if m("EService", "Unavailable")
        || m("EService", "Busy")
        || m("EService", "Deadline elapsed")
        || m("EService", "Market in cancel_only mode")
        || m("EGeneral", "Internal error")
    {
        backoff(Reason::Unavailable, Duration::ZERO)
    } else if m("EGeneral", "Invalid arguments") || m("EAPI", "Bad request") || m("EGeneral", "Unknown method") {
        permanent(
            Reason::Other,
            "Kraken rejected the request itself: a broker bug, please report it",
        )
    } else if m("EAuth", "Account temporary disabled") || m("EAuth", "Account unconfirmed") {
        permanent(
            Reason::Other,
            "the Kraken account is disabled or unconfirmed: resolve it with Kraken",
        )
    } else if category_is(trimmed, "EAuth") {
        // `EAuth:Failed` and any other account-authentication refusal.
        permanent(
            Reason::Other,
            "Kraken refused to authenticate the account: check the account's state and the key with Kraken",
        )
    } else {
        backoff(Reason::Other, Duration::ZERO)
    };
    Some(ApiFailure {
        reason,
        class,
        action,
        code: sanitise(trimmed),
    })
}

/// Classifies a whole `error` array: the first error decides; warnings alone
/// are no failure.
pub fn classify_api_errors<S: AsRef<str>>(codes: &[S]) -> Option<ApiFailure> {
    codes.iter().find_map(|c| classify_api_error(c.as_ref()))
}

#[cfg(test)]
mod tests;
