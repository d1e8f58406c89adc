//! The simulator's memory and its decisions, free of HTTP.
//!
//! [`SimState::answer`] decides Kraken's answer to one private REST call in
//! this order: the system status, the caller's address locked out, the key
//! (known, not past its expiration), the key's IP allowlist, the call
//! counter, the signature, 2FA, the nonce (with the key's nonce window), the
//! permission. The REST layer only carries bytes in and out. One std `Mutex`
//! guards everything: every critical section is a few map operations and
//! never spans an `.await`.
//!
//! What is Kraken's documented behaviour and what is assumed here:
//! - Documented: the error strings, the call counter per tier, strictly
//!   increasing nonces per key, the nonce window "in nonce units", 2FA in the
//!   signed body, lockouts after too many failed calls (by IP address and
//!   about 15 minutes, says Kraken's support article; by account, "typically
//!   a few minutes", each attempt resetting the timer, says its error guide:
//!   modelled here by address, each call during a lockout extending it),
//!   `GetApiKeyInfo`'s fields and their forms (its documented example).
//! - Assumed (Kraken does not say): what `GetApiKeyInfo`'s `nonce` and
//!   `lastUsed` count (here: the highest accepted and the last accepted
//!   call, the asking one included), permission names beyond the four of its
//!   example, the lockout threshold and window (10
//!   failed calls in 15 minutes here; invalid key, signature, nonce and
//!   permission denied all count), the answer to an expired key (`EAPI:Invalid
//!   key`) and to an address off the key's allowlist (`EGeneral:Permission
//!   denied`), the order of checks, that a nonce inside the window may not
//!   repeat, and that a TOTP code is accepted once (RFC 6238 §5.2 allows a
//!   verifier to refuse a reused one).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the state and its settings |
//! | `keys` | keys as configured and as held |
//! | `calls` | deciding one private call, and its record |
//! | `faults` | faults and the exchange's status |

mod calls;
mod faults;
mod keys;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rand::RngExt as _;

use crate::clock::unix_millis;
use crate::kraken::{Otp, decode_secret};
use crate::secret::SecretString;

#[cfg(test)]
pub use calls::Decision;
pub use calls::{CallRecord, IssuedToken, PrivateCall, Reply};
pub use faults::{FaultSpec, SystemStatus, edge_html};
pub use keys::{KeyError, SimKey, SimOtp, Tier, parse_net};

use calls::Strikes;
use faults::ActiveFault;
use keys::KeyState;

/// Start-up settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub keys: Vec<SimKey>,
    pub token_ttl: Duration,
    pub tier: Tier,
    /// Failed calls (invalid key, signature, nonce, permission denied) from
    /// one address within `lockout_duration` that lock the address out.
    pub lockout_threshold: u32,
    /// How long a lockout lasts, and the window failures are counted over.
    pub lockout_duration: Duration,
    pub heartbeat_interval: Duration,
    pub fault: Option<FaultSpec>,
}

/// Kraken's documented token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(900);
/// Kraken does not publish its threshold; ten failed calls from an address
/// in 15 minutes is a guess on the careful side (an assumption).
pub const DEFAULT_LOCKOUT_THRESHOLD: u32 = 10;
pub const DEFAULT_LOCKOUT_DURATION: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Calls kept for read-back; older ones are dropped first.
pub const MAX_CALL_RECORDS: usize = 10_000;
/// Distinct caller addresses tracked for lockouts before the table is
/// reset, so a flood cannot grow memory without bound.
const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// Accepted nonces remembered per key inside its nonce window.
const MAX_WINDOW_NONCES: usize = 4096;

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            token_ttl: DEFAULT_TOKEN_TTL,
            tier: Tier::default(),
            lockout_threshold: DEFAULT_LOCKOUT_THRESHOLD,
            lockout_duration: DEFAULT_LOCKOUT_DURATION,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            fault: None,
        }
    }
}

struct Inner {
    keys: HashMap<String, KeyState>,
    strikes: HashMap<std::net::IpAddr, Strikes>,
    system: SystemStatus,
    tokens: HashMap<String, IssuedToken>,
    calls: VecDeque<CallRecord>,
    next_seq: u64,
    fault: Option<ActiveFault>,
    token_ttl: Duration,
    tier: Tier,
    lockout_threshold: u32,
    lockout_duration: Duration,
}

/// The simulator's shared state.
pub struct SimState {
    inner: Mutex<Inner>,
    pub heartbeat_interval: Duration,
}

impl SimState {
    pub fn new(config: SimConfig) -> Result<Self, KeyError> {
        let state = Self {
            inner: Mutex::new(Inner {
                keys: HashMap::new(),
                strikes: HashMap::new(),
                system: SystemStatus::Online,
                tokens: HashMap::new(),
                calls: VecDeque::new(),
                next_seq: 1,
                fault: None,
                token_ttl: config.token_ttl,
                tier: config.tier,
                lockout_threshold: config.lockout_threshold.max(1),
                lockout_duration: config.lockout_duration,
            }),
            heartbeat_interval: config.heartbeat_interval,
        };
        for key in config.keys {
            state.add_key(key)?;
        }
        if let Some(fault) = config.fault {
            state.set_fault(fault);
        }
        Ok(state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds (or replaces) an accepted key.
    pub fn add_key(&self, key: SimKey) -> Result<(), KeyError> {
        let key = key.normalise()?;
        if key.api_key.is_empty() || key.api_key.chars().any(char::is_whitespace) {
            return Err(KeyError::BadKey);
        }
        let secret = decode_secret(&key.api_secret).map_err(|_| KeyError::BadSecret)?;
        let otp = match &key.otp {
            None => None,
            Some(SimOtp::Password(p)) => {
                Some(Otp::static_password(SecretString::new(p.clone())).map_err(|_| KeyError::BadTotp)?)
            }
            Some(SimOtp::TotpSecret(s)) => {
                Some(Otp::totp_from_base32(&SecretString::new(s.clone())).map_err(|_| KeyError::BadTotp)?)
            }
        };
        let valid_until = match &key.valid_until {
            None => None,
            Some(t) => Some(humantime::parse_rfc3339(t.trim()).map_err(|_| KeyError::BadValidUntil)?),
        };
        let allowlist = key
            .ip_allowlist
            .iter()
            .map(|entry| parse_net(entry).ok_or_else(|| KeyError::BadAllowlist(entry.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let state = KeyState {
            config: key.clone(),
            secret,
            otp,
            valid_until,
            allowlist,
            last_nonce: None,
            window_nonces: std::collections::BTreeSet::new(),
            last_totp_step: None,
            counter: 0.0,
            counter_at: Instant::now(),
            created: SystemTime::now(),
            modified: SystemTime::now(),
            last_used: None,
        };
        let mut inner = self.lock();
        let created = inner.keys.get(&key.api_key).map_or(state.created, |old| old.created);
        inner.keys.insert(key.api_key, KeyState { created, ..state });
        Ok(())
    }

    pub fn keys(&self) -> Vec<SimKey> {
        let mut keys: Vec<SimKey> = self.lock().keys.values().map(|k| k.config.clone()).collect();
        keys.sort_by(|a, b| a.api_key.cmp(&b.api_key));
        keys
    }

    pub fn set_fault(&self, spec: FaultSpec) {
        let remaining = spec.count;
        self.lock().fault = Some(ActiveFault { spec, remaining });
    }

    pub fn clear_fault(&self) {
        self.lock().fault = None;
    }

    pub fn fault(&self) -> Option<FaultSpec> {
        self.lock().fault.as_ref().map(|f| {
            let mut spec = f.spec.clone();
            spec.count = f.remaining;
            spec
        })
    }

    pub fn token_ttl(&self) -> Duration {
        self.lock().token_ttl
    }

    pub fn set_token_ttl(&self, ttl: Duration) {
        self.lock().token_ttl = ttl;
    }

    pub fn tier(&self) -> Tier {
        self.lock().tier
    }

    pub fn system_status(&self) -> SystemStatus {
        self.lock().system
    }

    pub fn set_system_status(&self, status: SystemStatus) {
        self.lock().system = status;
    }

    /// The key a token was issued for, if the token is known.
    pub fn key_of_token(&self, token: &str) -> Option<SimKey> {
        let inner = self.lock();
        let issued = inner.tokens.get(token)?;
        inner.keys.get(&issued.api_key).map(|k| k.config.clone())
    }

    /// Whether `token` was issued and not revoked (its use-by aside: a token
    /// bound to a connection goes on after it).
    pub fn token_is_live(&self, token: &str) -> bool {
        self.lock().tokens.get(token).is_some_and(|t| !t.revoked)
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.iter().cloned().collect()
    }

    /// The calls to `GetWebSocketsToken` only (not `GetApiKeyInfo`).
    pub fn token_calls(&self) -> Vec<CallRecord> {
        let mut calls = self.calls();
        calls.retain(|c| c.path == crate::kraken::WS_TOKEN_PATH);
        calls
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    pub fn tokens(&self) -> Vec<IssuedToken> {
        let mut tokens: Vec<IssuedToken> = self.lock().tokens.values().cloned().collect();
        tokens.sort_by_key(|t| t.issued_at_unix_ms);
        tokens
    }

    /// Revokes one token, or all when `token` is `None`; returns how many.
    pub fn revoke_tokens(&self, token: Option<&str>) -> usize {
        let mut inner = self.lock();
        let mut revoked = 0;
        for issued in inner.tokens.values_mut() {
            if token.is_none_or(|t| t == issued.token) && !issued.revoked {
                issued.revoked = true;
                revoked += 1;
            }
        }
        revoked
    }

    /// Clears call counters and lockouts.
    pub fn reset_limits(&self) {
        let mut inner = self.lock();
        inner.strikes.clear();
        for key in inner.keys.values_mut() {
            key.counter = 0.0;
        }
    }

    /// Whether `token` may open a private subscription now.
    pub fn token_is_valid(&self, token: &str) -> bool {
        let now = unix_millis(SystemTime::now());
        self.lock()
            .tokens
            .get(token)
            .is_some_and(|t| !t.revoked && now < t.expires_at_unix_ms)
    }

    /// Moves a token's use-by to now (tests of what a use-by changes).
    #[cfg(test)]
    pub fn expire_token_now(&self, token: &str) {
        let now = unix_millis(SystemTime::now());
        if let Some(t) = self.lock().tokens.get_mut(token) {
            t.expires_at_unix_ms = now;
        }
    }

    /// Records a call that did not reach the private endpoint logic.
    pub fn record_other(&self, http_method: &str, path: &str, outcome: &str) {
        let mut inner = self.lock();
        inner.record(http_method, path, None, None, outcome.to_owned(), None);
    }

    /// Takes the fault for one arriving call to `path` (counting it down),
    /// and how long the call is delayed before Kraken sees it.
    pub fn take_fault(&self, path: &str) -> (Option<FaultSpec>, Duration) {
        let fault = self.lock().take_fault(path);
        let jitter = fault.as_ref().and_then(|f| f.delay_jitter_ms).unwrap_or(0);
        let delay = Duration::from_millis(
            fault.as_ref().and_then(|f| f.delay_ms).unwrap_or(0) + rand::rng().random_range(0..=jitter),
        );
        (fault, delay)
    }
}
