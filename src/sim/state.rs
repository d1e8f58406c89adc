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
//!   signed body, lockouts by IP address after too many failed calls
//!   (support: "Temporary lockout error messages are IP based").
//! - Assumed (Kraken does not say): the lockout threshold and window (10
//!   failed calls in 15 minutes here; invalid key, signature, nonce and
//!   permission denied all count), the answer to an expired key (`EAPI:Invalid
//!   key`) and to an address off the key's allowlist (`EGeneral:Permission
//!   denied`), the order of checks, that a nonce inside the window may not
//!   repeat, and that a TOTP code is accepted once (RFC 6238 §5.2 allows a
//!   verifier to refuse a reused one).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::{unix_millis, unix_secs};
use crate::kraken::{Otp, WS_TOKEN_PATH, decode_secret, verify};
use crate::secret::{SecretBytes, SecretString, fingerprint};

/// Kraken's account tiers and their REST call counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Starter,
    Intermediate,
    Pro,
}

impl Tier {
    /// The counter's maximum.
    pub fn max_counter(self) -> f64 {
        match self {
            Tier::Starter => 15.0,
            Tier::Intermediate | Tier::Pro => 20.0,
        }
    }

    /// How much the counter decays per second.
    pub fn decay_per_sec(self) -> f64 {
        match self {
            Tier::Starter => 0.33,
            Tier::Intermediate => 0.5,
            Tier::Pro => 1.0,
        }
    }
}

/// 2FA on a simulated key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SimOtp {
    /// A static password.
    Password(String),
    /// A base32 TOTP seed.
    TotpSecret(String),
}

/// One API key the simulator accepts, with the settings of Kraken's key
/// form. Simulator keys are test material, so this type prints them: users
/// need to see them to configure a client (the control API never echoes a
/// secret back, though).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SimKey {
    pub api_key: String,
    /// Standard base64, as Kraken shows secrets.
    pub api_secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otp: Option<SimOtp>,
    /// Whether the key has the "WebSocket interface" permission.
    #[serde(default = "yes")]
    pub ws_permission: bool,
    /// Whether the key may create and cancel orders (WebSocket `add_order`).
    #[serde(default = "yes")]
    pub trade_permission: bool,
    /// "Custom Nonce Window": a nonce up to this much below the highest seen
    /// is accepted (once), counted in nonce units (Kraken: "nonce amount to
    /// accept from highest nonce"). 0: strictly increasing.
    #[serde(default)]
    pub nonce_window: u64,
    /// "Key Expiration", RFC 3339: calls after it get `EAPI:Invalid key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
    /// "IP Address Restriction": addresses or CIDR ranges allowed to call;
    /// empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_allowlist: Vec<String>,
}

fn yes() -> bool {
    true
}

impl SimKey {
    /// A fresh random key pair: a 56-character key and a 64-byte secret, the
    /// shapes Kraken issues.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let key: [u8; 42] = rng.random();
        let secret: [u8; 64] = rng.random();
        Self {
            api_key: STANDARD.encode(key),
            api_secret: STANDARD.encode(secret),
            otp: None,
            ws_permission: true,
            trade_permission: true,
            nonce_window: 0,
            valid_until: None,
            ip_allowlist: Vec::new(),
        }
    }

    /// The key as the control API shows it: every setting, never a secret.
    pub fn public_view(&self) -> Value {
        json!({
            "api_key": self.api_key,
            "two_factor": match &self.otp {
                None => Value::Null,
                Some(SimOtp::Password(_)) => json!("password"),
                Some(SimOtp::TotpSecret(_)) => json!("totp"),
            },
            "ws_permission": self.ws_permission,
            "trade_permission": self.trade_permission,
            "nonce_window": self.nonce_window,
            "valid_until": self.valid_until,
            "ip_allowlist": self.ip_allowlist,
        })
    }
}

/// A fault to inject into the REST endpoint. Fields combine: `delay_ms`
/// first, then the first of `hang`, `http_status`, `error`, `malformed`; the
/// rest (`truncated`, `token`, `expires`) reshape an otherwise real answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// A Kraken error string answered with HTTP 200, e.g. `EAPI:Invalid key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An HTTP status answered with an HTML body, as Cloudflare does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Milliseconds to wait before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Up to this many more milliseconds, at random per call: calls then
    /// overtake each other, as on a real network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_jitter_ms: Option<u64>,
    /// Answer HTTP 200 with a body that is not JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    /// Answer the real JSON cut off halfway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Never answer (the connection stays open until the client gives up).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hang: bool,
    /// With `http_status`: send this `Retry-After` (seconds), as an edge may
    /// on 429 and 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// Answer this token (registered as valid) instead of a fresh one; an
    /// empty string answers an empty token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Put this JSON value in `expires` (e.g. 0, -5, 1e12, "900"), or the
    /// string `"omit"` to leave the field out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
    /// Apply to the next `count` calls only; absent: until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// One call the simulator received, for tests to read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallRecord {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub http_method: String,
    pub path: String,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub nonce: Option<String>,
    /// `ok`, the Kraken error string answered, or `fault:<what>`.
    pub outcome: String,
    /// SHA-256 fingerprint of the token issued, on success.
    #[serde(default)]
    pub token_fingerprint: Option<String>,
}

/// One token the simulator issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedToken {
    pub token: String,
    pub api_key: String,
    pub issued_at_unix_ms: u64,
    pub expires_at_unix_ms: u64,
    pub revoked: bool,
}

/// Kraken's exchange status, as `/0/public/SystemStatus` and the WebSocket
/// status channel report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SystemStatus {
    #[default]
    Online,
    /// Private REST calls answer `EService:Unavailable`.
    Maintenance,
    /// Orders can only be cancelled.
    CancelOnly,
    /// Only post-only limit orders are accepted.
    PostOnly,
}

impl SystemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemStatus::Online => "online",
            SystemStatus::Maintenance => "maintenance",
            SystemStatus::CancelOnly => "cancel_only",
            SystemStatus::PostOnly => "post_only",
        }
    }
}

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

/// A simulated key, with its secrets decoded and its settings parsed.
struct KeyState {
    config: SimKey,
    secret: SecretBytes,
    otp: Option<Otp>,
    valid_until: Option<SystemTime>,
    allowlist: Vec<ipnet::IpNet>,
    /// The highest nonce accepted.
    last_nonce: Option<u64>,
    /// Nonces accepted within the window below the highest (so one is
    /// never accepted twice).
    window_nonces: std::collections::BTreeSet<u64>,
    /// The last TOTP step whose code was accepted: a code is taken once.
    last_totp_step: Option<u64>,
    counter: f64,
    counter_at: Instant,
}

/// One caller address's failed calls and lockout.
#[derive(Default)]
struct Strikes {
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

struct ActiveFault {
    spec: FaultSpec,
    remaining: Option<u32>,
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

/// A bad key given to [`SimState::add_key`].
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the API secret is not valid base64")]
    BadSecret,
    #[error("the TOTP secret is not valid base32")]
    BadTotp,
    #[error("the API key is empty or holds whitespace")]
    BadKey,
    #[error("valid_until is not an RFC 3339 time like 2027-03-01T00:00:00Z")]
    BadValidUntil,
    #[error("ip_allowlist holds `{0}`, not an address or CIDR range")]
    BadAllowlist(String),
}

/// What a private REST call presented.
pub struct PrivateCall<'a> {
    /// The caller's address (lockouts and allowlists go by it).
    pub peer: Option<std::net::IpAddr>,
    pub http_method: &'a str,
    pub path: &'a str,
    pub api_key: Option<&'a str>,
    pub api_sign: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

/// The answer the REST layer must give.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// HTTP 200 with this JSON.
    Json(Value),
    /// HTTP 200 with these raw bytes (malformed or truncated).
    Raw(Vec<u8>),
    /// This status with an HTML body, and maybe a `Retry-After` (seconds).
    Html(u16, String, Option<u64>),
    /// Never answer.
    Hang,
}

/// The reply, and how long to wait before giving it (for tests: the REST
/// layer takes the fault, waits, then asks for the answer).
#[cfg(test)]
pub struct Decision {
    pub delay: Duration,
    pub reply: Reply,
}

fn kraken_error(code: &str) -> Reply {
    Reply::Json(json!({ "error": [code] }))
}

/// Cloudflare-style HTML for an edge status.
pub fn edge_html(status: u16) -> String {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
    )
}

/// Nonce and otp from a form or JSON body.
fn body_fields(content_type: Option<&str>, body: &[u8]) -> Option<(String, Option<String>)> {
    let is_json = content_type.is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    if is_json {
        let value: Value = serde_json::from_slice(body).ok()?;
        let nonce = match value.get("nonce")? {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return None,
        };
        let otp = value.get("otp").and_then(Value::as_str).map(str::to_owned);
        Some((nonce, otp))
    } else {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
        let nonce = pairs.iter().find(|(k, _)| k == "nonce")?.1.clone();
        let otp = pairs.iter().find(|(k, _)| k == "otp").map(|(_, v)| v.clone());
        Some((nonce, otp))
    }
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
        };
        self.lock().keys.insert(key.api_key, state);
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

    /// Takes the fault for one arriving call (counting it down), and how long
    /// the call is delayed before Kraken sees it.
    pub fn take_fault(&self) -> (Option<FaultSpec>, Duration) {
        let fault = self.lock().take_fault();
        let jitter = fault.as_ref().and_then(|f| f.delay_jitter_ms).unwrap_or(0);
        let delay = Duration::from_millis(
            fault.as_ref().and_then(|f| f.delay_ms).unwrap_or(0) + rand::rng().random_range(0..=jitter),
        );
        (fault, delay)
    }

    /// Decides the answer to a private REST call at once (no delay applied).
    #[cfg(test)]
    pub fn private_call(&self, call: &PrivateCall<'_>) -> Decision {
        let (fault, delay) = self.take_fault();
        Decision {
            delay,
            reply: self.answer(call, fault),
        }
    }

    /// Kraken's answer to a call that has arrived, under `fault`. The REST
    /// layer sleeps the fault's delay first, as a slow network would, so
    /// delayed calls can overtake each other before their nonces are checked.
    pub fn answer(&self, call: &PrivateCall<'_>, fault: Option<FaultSpec>) -> Reply {
        let mut inner = self.lock();
        let api_key = call.api_key.map(str::to_owned);
        let early = fault.as_ref().and_then(|f| {
            if f.hang {
                Some((Reply::Hang, "fault:hang".to_owned()))
            } else if let Some(status) = f.http_status {
                Some((
                    Reply::Html(status, edge_html(status), f.retry_after_secs),
                    format!("fault:http_status {status}"),
                ))
            } else if let Some(error) = &f.error {
                Some((kraken_error(error), error.clone()))
            } else if f.malformed {
                Some((
                    Reply::Raw(b"Internal Server Error: upstream sent garbage".to_vec()),
                    "fault:malformed".to_owned(),
                ))
            } else {
                None
            }
        });
        if let Some((reply, outcome)) = early {
            inner.record(call.http_method, call.path, api_key, None, outcome, None);
            return reply;
        }

        let fixed_token = fault.as_ref().and_then(|f| f.token.clone());
        let (reply, nonce, token) = inner.check_and_issue(call, fixed_token);
        let outcome = match &reply {
            Reply::Json(v) => v["error"]
                .get(0)
                .and_then(Value::as_str)
                .map_or_else(|| "ok".to_owned(), str::to_owned),
            _ => "ok".to_owned(),
        };
        let mut reply = reply;
        if let (Some(f), Some(_)) = (&fault, &token) {
            reply = reshape(reply, f);
        }
        let token_fp = token.as_deref().map(|t| fingerprint(t.as_bytes()));
        let outcome = match (&fault, &token) {
            (Some(f), Some(_)) if f.truncated => "ok (fault:truncated)".to_owned(),
            _ => outcome,
        };
        inner.record(call.http_method, call.path, api_key, nonce, outcome, token_fp);
        reply
    }
}

/// Applies the answer-shaping parts of a fault to a success reply.
fn reshape(reply: Reply, fault: &FaultSpec) -> Reply {
    let Reply::Json(mut value) = reply else {
        return reply;
    };
    match &fault.expires {
        Some(Value::String(s)) if s == "omit" => {
            if let Some(result) = value["result"].as_object_mut() {
                result.remove("expires");
            }
        }
        Some(other) => value["result"]["expires"] = other.clone(),
        None => {}
    }
    if fault.truncated {
        let full = value.to_string().into_bytes();
        return Reply::Raw(full[..full.len() / 2].to_vec());
    }
    Reply::Json(value)
}

impl Inner {
    fn take_fault(&mut self) -> Option<FaultSpec> {
        let active = self.fault.as_mut()?;
        let spec = active.spec.clone();
        if let Some(remaining) = active.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.fault = None;
            }
        }
        Some(spec)
    }

    fn record(
        &mut self,
        http_method: &str,
        path: &str,
        api_key: Option<String>,
        nonce: Option<String>,
        outcome: String,
        token_fingerprint: Option<String>,
    ) {
        if self.calls.len() >= MAX_CALL_RECORDS {
            self.calls.pop_front();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.calls.push_back(CallRecord {
            seq,
            at_unix_ms: unix_millis(SystemTime::now()),
            http_method: http_method.to_owned(),
            path: path.to_owned(),
            api_key,
            nonce,
            outcome,
            token_fingerprint,
        });
    }

    /// Counts one failed call from `peer`; enough of them within the lockout
    /// window lock the address out (every key called from it).
    fn strike(&mut self, peer: std::net::IpAddr, now: Instant) {
        if self.strikes.len() >= MAX_TRACKED_ADDRESSES && !self.strikes.contains_key(&peer) {
            self.strikes.clear();
        }
        let threshold = self.lockout_threshold as usize;
        let window = self.lockout_duration;
        let strikes = self.strikes.entry(peer).or_default();
        while strikes.failures.front().is_some_and(|at| *at + window <= now) {
            strikes.failures.pop_front();
        }
        strikes.failures.push_back(now);
        if strikes.failures.len() >= threshold {
            strikes.locked_until = Some(now + window);
            strikes.failures.clear();
        }
    }

    /// Whether `peer` is locked out now (clearing a lockout that has passed).
    fn locked_out(&mut self, peer: std::net::IpAddr, now: Instant) -> bool {
        let Some(strikes) = self.strikes.get_mut(&peer) else {
            return false;
        };
        match strikes.locked_until {
            Some(until) if now < until => true,
            Some(_) => {
                strikes.locked_until = None;
                false
            }
            None => false,
        }
    }

    /// Kraken's checks in this simulator's order; on success a token is
    /// issued. Returns the reply, the nonce presented, and the token issued.
    fn check_and_issue(
        &mut self,
        call: &PrivateCall<'_>,
        fixed_token: Option<String>,
    ) -> (Reply, Option<String>, Option<String>) {
        let now = Instant::now();
        let peer = call
            .peer
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if !call.path.starts_with("/0/private/") || call.path != WS_TOKEN_PATH {
            return (kraken_error("EGeneral:Unknown method"), None, None);
        }
        if !call.http_method.eq_ignore_ascii_case("POST") {
            return (kraken_error("EGeneral:Invalid arguments"), None, None);
        }
        if self.system == SystemStatus::Maintenance {
            return (kraken_error("EService:Unavailable"), None, None);
        }
        if self.locked_out(peer, now) {
            return (kraken_error("EGeneral:Temporary lockout"), None, None);
        }
        let presented = call.api_key.unwrap_or("").trim();
        let tier = self.tier;
        let wall = SystemTime::now();
        let Some(key) = self
            .keys
            .get_mut(presented)
            .filter(|k| k.valid_until.is_none_or(|until| wall < until))
        else {
            self.strike(peer, now);
            return (kraken_error("EAPI:Invalid key"), None, None);
        };
        if !key.allowlist.is_empty() && !key.allowlist.iter().any(|net| net.contains(&peer)) {
            self.strike(peer, now);
            return (kraken_error("EGeneral:Permission denied"), None, None);
        }

        // Every call counts, failed ones too, and calls made while limited
        // keep the counter up.
        let elapsed = now.duration_since(key.counter_at).as_secs_f64();
        key.counter = (key.counter - elapsed * tier.decay_per_sec()).max(0.0) + 1.0;
        key.counter_at = now;
        if key.counter > tier.max_counter() {
            return (kraken_error("EAPI:Rate limit exceeded"), None, None);
        }

        let Some((nonce, otp)) = body_fields(call.content_type, call.body) else {
            self.strike(peer, now);
            return (kraken_error("EAPI:Invalid nonce"), None, None);
        };
        let signed = call
            .api_sign
            .is_some_and(|sig| verify(&key.secret, call.path, &nonce, call.body, sig));
        if !signed {
            self.strike(peer, now);
            return (kraken_error("EAPI:Invalid signature"), Some(nonce), None);
        }
        if let Some(expected) = &key.otp {
            let unix = unix_secs(wall);
            let accepted = otp.as_deref().and_then(|code| expected.accepted_step(code, unix));
            // A TOTP code is taken once: a step at or before the last one
            // accepted is a reused (or older) code.
            let fresh = match (accepted, key.last_totp_step) {
                (None, _) => false,
                (Some(step), Some(last)) if expected.is_time_based() => step > last,
                (Some(_), _) => true,
            };
            if !fresh {
                self.strike(peer, now);
                return (kraken_error("EAPI:Invalid signature"), Some(nonce), None);
            }
            if expected.is_time_based() {
                key.last_totp_step = accepted;
            }
        }
        if !key.accept_nonce(nonce.parse().ok()) {
            self.strike(peer, now);
            return (kraken_error("EAPI:Invalid nonce"), Some(nonce), None);
        }
        if !key.config.ws_permission {
            self.strike(peer, now);
            return (kraken_error("EGeneral:Permission denied"), Some(nonce), None);
        }
        let api_key = key.config.api_key.clone();

        let token = fixed_token.unwrap_or_else(|| {
            let bytes: [u8; 32] = rand::rng().random();
            STANDARD_NO_PAD.encode(bytes)
        });
        let ttl = self.token_ttl;
        let issued = SystemTime::now();
        self.tokens.insert(
            token.clone(),
            IssuedToken {
                token: token.clone(),
                api_key,
                issued_at_unix_ms: unix_millis(issued),
                expires_at_unix_ms: unix_millis(issued + ttl),
                revoked: false,
            },
        );
        let reply = Reply::Json(json!({
            "error": [],
            // Kraken answers whole seconds; a sub-second test lifetime
            // rounds up here but is enforced as set.
            "result": { "token": token, "expires": ttl.as_secs_f64().ceil() as u64 }
        }));
        (reply, Some(nonce), Some(token))
    }
}

impl KeyState {
    /// Whether `nonce` is acceptable under the key's nonce window, and if so
    /// remembers it: above the highest seen, or within the window below it
    /// and not seen before.
    fn accept_nonce(&mut self, nonce: Option<u64>) -> bool {
        let Some(n) = nonce else { return false };
        let window = self.config.nonce_window;
        let fresh = match self.last_nonce {
            None => true,
            Some(last) if n > last => true,
            Some(last) => window > 0 && n >= last.saturating_sub(window) && !self.window_nonces.contains(&n),
        };
        if !fresh {
            return false;
        }
        let highest = self.last_nonce.map_or(n, |last| last.max(n));
        self.last_nonce = Some(highest);
        if window > 0 {
            self.window_nonces.insert(n);
            let floor = highest.saturating_sub(window);
            self.window_nonces = self.window_nonces.split_off(&floor);
            while self.window_nonces.len() > MAX_WINDOW_NONCES {
                self.window_nonces.pop_first();
            }
        }
        true
    }
}

/// An address (`10.0.0.7`) or a CIDR range (`10.0.0.0/24`).
pub fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::sign;

    fn key() -> SimKey {
        SimKey::generate()
    }

    fn state(keys: Vec<SimKey>) -> SimState {
        SimState::new(SimConfig {
            keys,
            ..SimConfig::default()
        })
        .unwrap()
    }

    /// A correctly signed form call with `nonce` and maybe `otp`.
    fn call(state: &SimState, key: &SimKey, nonce: u64, otp: Option<&str>) -> Decision {
        let mut body = format!("nonce={nonce}");
        if let Some(otp) = otp {
            body.push_str(&format!("&otp={otp}"));
        }
        signed_call(
            state,
            key,
            &nonce.to_string(),
            &body,
            "application/x-www-form-urlencoded",
        )
    }

    fn signed_call(state: &SimState, key: &SimKey, nonce: &str, body: &str, content_type: &str) -> Decision {
        signed_call_from(state, key, nonce, body, content_type, None)
    }

    fn call_from(state: &SimState, key: &SimKey, nonce: u64, peer: &str) -> Decision {
        let body = format!("nonce={nonce}");
        let peer = Some(peer.parse().unwrap());
        signed_call_from(
            state,
            key,
            &nonce.to_string(),
            &body,
            "application/x-www-form-urlencoded",
            peer,
        )
    }

    fn signed_call_from(
        state: &SimState,
        key: &SimKey,
        nonce: &str,
        body: &str,
        content_type: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Decision {
        let secret = decode_secret(&key.api_secret).unwrap();
        let sig = sign(&secret, WS_TOKEN_PATH, nonce, body.as_bytes());
        state.private_call(&PrivateCall {
            peer,
            http_method: "POST",
            path: WS_TOKEN_PATH,
            api_key: Some(&key.api_key),
            api_sign: Some(&sig),
            content_type: Some(content_type),
            body: body.as_bytes(),
        })
    }

    fn error_of(decision: &Decision) -> Option<String> {
        match &decision.reply {
            Reply::Json(v) => v["error"].get(0).and_then(Value::as_str).map(str::to_owned),
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    fn token_of(decision: &Decision) -> String {
        match &decision.reply {
            Reply::Json(v) => v["result"]["token"].as_str().expect("a token").to_owned(),
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    #[test]
    fn a_signed_call_gets_a_token_with_the_configured_lifetime() {
        let k = key();
        let s = state(vec![k.clone()]);
        s.set_token_ttl(Duration::from_secs(42));
        let d = call(&s, &k, 1, None);
        let Reply::Json(v) = &d.reply else { panic!() };
        assert_eq!(v["error"], json!([]));
        assert_eq!(v["result"]["expires"], 42);
        let token = token_of(&d);
        assert!(s.token_is_valid(&token));
        assert!(!s.token_is_valid("other"));
        let calls = s.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].outcome, "ok");
        assert_eq!(
            calls[0].token_fingerprint.as_deref(),
            Some(fingerprint(token.as_bytes()).as_str())
        );
    }

    #[test]
    fn json_bodies_with_numeric_or_string_nonces_are_accepted() {
        let k = key();
        let s = state(vec![k.clone()]);
        let d = signed_call(&s, &k, "5", r#"{"nonce":5}"#, "application/json");
        assert_eq!(error_of(&d), None);
        let d = signed_call(&s, &k, "6", r#"{"nonce": "6"}"#, "application/json");
        assert_eq!(error_of(&d), None);
    }

    #[test]
    fn nonces_must_strictly_increase_per_key() {
        let (a, b) = (key(), key());
        let s = state(vec![a.clone(), b.clone()]);
        assert_eq!(error_of(&call(&s, &a, 100, None)), None);
        assert_eq!(
            error_of(&call(&s, &a, 100, None)).as_deref(),
            Some("EAPI:Invalid nonce")
        );
        assert_eq!(error_of(&call(&s, &a, 99, None)).as_deref(), Some("EAPI:Invalid nonce"));
        assert_eq!(error_of(&call(&s, &b, 50, None)), None, "each key has its own sequence");
        assert_eq!(error_of(&call(&s, &a, 101, None)), None);
    }

    #[test]
    fn wrong_method_path_key_or_signature_get_krakens_errors() {
        let k = key();
        let s = state(vec![k.clone()]);
        let base = PrivateCall {
            peer: None,
            http_method: "GET",
            path: WS_TOKEN_PATH,
            api_key: Some(&k.api_key),
            api_sign: Some("AAAA"),
            content_type: None,
            body: b"nonce=1",
        };
        assert_eq!(
            error_of(&s.private_call(&base)).as_deref(),
            Some("EGeneral:Invalid arguments")
        );
        let other = PrivateCall {
            http_method: "POST",
            path: "/0/private/AddOrder",
            ..base
        };
        assert_eq!(
            error_of(&s.private_call(&other)).as_deref(),
            Some("EGeneral:Unknown method")
        );
        let unknown = PrivateCall {
            http_method: "POST",
            api_key: Some("nobody"),
            ..other
        };
        let unknown = PrivateCall {
            path: WS_TOKEN_PATH,
            ..unknown
        };
        assert_eq!(error_of(&s.private_call(&unknown)).as_deref(), Some("EAPI:Invalid key"));
        let bad_sig = PrivateCall {
            api_key: Some(&k.api_key),
            ..unknown
        };
        assert_eq!(
            error_of(&s.private_call(&bad_sig)).as_deref(),
            Some("EAPI:Invalid signature")
        );
        let no_nonce = PrivateCall {
            body: b"x=1",
            ..bad_sig
        };
        assert_eq!(
            error_of(&s.private_call(&no_nonce)).as_deref(),
            Some("EAPI:Invalid nonce")
        );
    }

    #[test]
    fn a_2fa_key_needs_the_right_otp_in_the_signed_body() {
        let mut k = key();
        k.otp = Some(SimOtp::Password("letmein".into()));
        let s = state(vec![k.clone()]);
        assert_eq!(
            error_of(&call(&s, &k, 1, None)).as_deref(),
            Some("EAPI:Invalid signature")
        );
        assert_eq!(
            error_of(&call(&s, &k, 2, Some("wrong"))).as_deref(),
            Some("EAPI:Invalid signature")
        );
        assert_eq!(error_of(&call(&s, &k, 3, Some("letmein"))), None);

        let mut t = key();
        t.otp = Some(SimOtp::TotpSecret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".into()));
        let s = state(vec![t.clone()]);
        let seed = Otp::totp_from_base32(&SecretString::new("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")).unwrap();
        let now = unix_secs(SystemTime::now());
        let code = seed.code_at(now);
        assert_eq!(error_of(&call(&s, &t, 1, Some(code.expose()))), None);
        let wrong = if code.expose() == "000000" { "111111" } else { "000000" };
        assert_eq!(
            error_of(&call(&s, &t, 2, Some(wrong))).as_deref(),
            Some("EAPI:Invalid signature")
        );
    }

    #[test]
    fn a_key_without_websocket_permission_is_denied() {
        let mut k = key();
        k.ws_permission = false;
        let s = state(vec![k.clone()]);
        assert_eq!(
            error_of(&call(&s, &k, 1, None)).as_deref(),
            Some("EGeneral:Permission denied")
        );
    }

    #[test]
    fn the_call_counter_limits_each_tier() {
        for (tier, max) in [(Tier::Starter, 15), (Tier::Intermediate, 20), (Tier::Pro, 20)] {
            let k = key();
            let s = SimState::new(SimConfig {
                keys: vec![k.clone()],
                tier,
                ..SimConfig::default()
            })
            .unwrap();
            for n in 1..=max {
                assert_eq!(error_of(&call(&s, &k, n, None)), None, "{tier:?} call {n}");
            }
            assert_eq!(
                error_of(&call(&s, &k, max + 1, None)).as_deref(),
                Some("EAPI:Rate limit exceeded"),
                "{tier:?}"
            );
            s.reset_limits();
            assert_eq!(error_of(&call(&s, &k, max + 2, None)), None, "{tier:?} after reset");
        }
    }

    #[test]
    fn repeated_invalid_calls_lock_the_key_out() {
        let k = key();
        let s = SimState::new(SimConfig {
            keys: vec![k.clone()],
            lockout_threshold: 3,
            ..SimConfig::default()
        })
        .unwrap();
        assert_eq!(error_of(&call(&s, &k, 10, None)), None);
        for _ in 0..3 {
            assert_eq!(error_of(&call(&s, &k, 5, None)).as_deref(), Some("EAPI:Invalid nonce"));
        }
        assert_eq!(
            error_of(&call(&s, &k, 11, None)).as_deref(),
            Some("EGeneral:Temporary lockout")
        );
        s.reset_limits();
        assert_eq!(error_of(&call(&s, &k, 12, None)), None);
    }

    #[test]
    fn a_counted_fault_applies_to_that_many_calls_then_clears() {
        let k = key();
        let s = state(vec![k.clone()]);
        s.set_fault(FaultSpec {
            error: Some("EService:Unavailable".into()),
            count: Some(2),
            ..FaultSpec::default()
        });
        assert_eq!(
            error_of(&call(&s, &k, 1, None)).as_deref(),
            Some("EService:Unavailable")
        );
        assert_eq!(s.fault().unwrap().count, Some(1));
        assert_eq!(
            error_of(&call(&s, &k, 2, None)).as_deref(),
            Some("EService:Unavailable")
        );
        assert_eq!(s.fault(), None);
        assert_eq!(error_of(&call(&s, &k, 3, None)), None);
    }

    #[test]
    fn faults_shape_the_answer() {
        let k = key();
        let s = state(vec![k.clone()]);
        s.set_fault(FaultSpec {
            http_status: Some(502),
            delay_ms: Some(5),
            ..FaultSpec::default()
        });
        let d = call(&s, &k, 1, None);
        assert_eq!(d.delay, Duration::from_millis(5));
        assert!(matches!(&d.reply, Reply::Html(502, html, None) if html.contains("502 Bad Gateway")));

        s.set_fault(FaultSpec {
            hang: true,
            ..FaultSpec::default()
        });
        assert_eq!(call(&s, &k, 2, None).reply, Reply::Hang);

        s.set_fault(FaultSpec {
            truncated: true,
            ..FaultSpec::default()
        });
        let Reply::Raw(bytes) = call(&s, &k, 3, None).reply else {
            panic!("raw")
        };
        assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "cut short");

        s.set_fault(FaultSpec {
            malformed: true,
            ..FaultSpec::default()
        });
        assert!(matches!(call(&s, &k, 4, None).reply, Reply::Raw(_)));

        s.set_fault(FaultSpec {
            token: Some("same-token".into()),
            expires: Some(json!(-5)),
            ..FaultSpec::default()
        });
        let Reply::Json(v) = call(&s, &k, 5, None).reply else {
            panic!("json")
        };
        assert_eq!(v["result"]["token"], "same-token");
        assert_eq!(v["result"]["expires"], -5);

        s.set_fault(FaultSpec {
            expires: Some(json!("omit")),
            ..FaultSpec::default()
        });
        let Reply::Json(v) = call(&s, &k, 6, None).reply else {
            panic!("json")
        };
        assert!(v["result"].get("expires").is_none());
    }

    #[test]
    fn revoked_and_expired_tokens_are_not_valid() {
        let k = key();
        let s = state(vec![k.clone()]);
        let a = token_of(&call(&s, &k, 1, None));
        let b = token_of(&call(&s, &k, 2, None));
        assert_eq!(s.revoke_tokens(Some(&a)), 1);
        assert!(!s.token_is_valid(&a));
        assert!(s.token_is_valid(&b));
        assert_eq!(s.revoke_tokens(None), 1);
        assert!(!s.token_is_valid(&b));
        s.set_token_ttl(Duration::from_millis(1));
        let c = token_of(&call(&s, &k, 3, None));
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.token_is_valid(&c) {
            assert!(Instant::now() < deadline, "a 1 ms token expires");
            std::thread::yield_now();
        }
    }

    #[test]
    fn bad_keys_are_refused() {
        let s = state(vec![]);
        let mut k = key();
        k.api_secret = "***".into();
        assert!(matches!(s.add_key(k), Err(KeyError::BadSecret)));
        let mut k = key();
        k.api_key = "has space".into();
        assert!(matches!(s.add_key(k), Err(KeyError::BadKey)));
        let mut k = key();
        k.otp = Some(SimOtp::TotpSecret("!!".into()));
        assert!(matches!(s.add_key(k), Err(KeyError::BadTotp)));
    }

    #[test]
    fn lockouts_are_per_address_and_stop_every_key_called_from_it() {
        let (bad, good) = (key(), key());
        let locking = || {
            SimState::new(SimConfig {
                keys: vec![good.clone()],
                lockout_threshold: 3,
                ..SimConfig::default()
            })
            .unwrap()
        };
        let s = locking();
        // A key the simulator does not know, three times from 10.0.0.1.
        for n in 1..=3 {
            assert_eq!(
                error_of(&call_from(&s, &bad, n, "10.0.0.1")).as_deref(),
                Some("EAPI:Invalid key")
            );
        }
        assert_eq!(
            error_of(&call_from(&s, &good, 10, "10.0.0.1")).as_deref(),
            Some("EGeneral:Temporary lockout"),
            "the good key is locked out too, from that address"
        );
        assert_eq!(
            error_of(&call_from(&s, &good, 11, "10.0.0.2")),
            None,
            "another address is not"
        );
        // Successes do not wipe the count: failures within the window add up.
        let s = locking();
        for n in 1..=2 {
            call_from(&s, &bad, n, "10.0.0.1");
            assert_eq!(error_of(&call_from(&s, &good, 100 + n, "10.0.0.1")), None);
        }
        call_from(&s, &bad, 3, "10.0.0.1");
        assert_eq!(
            error_of(&call_from(&s, &good, 200, "10.0.0.1")).as_deref(),
            Some("EGeneral:Temporary lockout")
        );
    }

    #[test]
    fn a_nonce_window_accepts_a_late_nonce_once_in_nonce_units() {
        let mut k = key();
        k.nonce_window = 10_000;
        let s = state(vec![k.clone()]);
        assert_eq!(error_of(&call(&s, &k, 1_000_000, None)), None);
        assert_eq!(
            error_of(&call(&s, &k, 995_000, None)),
            None,
            "5000 below: inside the window"
        );
        assert_eq!(
            error_of(&call(&s, &k, 995_000, None)).as_deref(),
            Some("EAPI:Invalid nonce"),
            "but only once"
        );
        assert_eq!(
            error_of(&call(&s, &k, 989_999, None)).as_deref(),
            Some("EAPI:Invalid nonce"),
            "10001 below: outside"
        );
        let strict = key();
        let s = state(vec![strict.clone()]);
        assert_eq!(error_of(&call(&s, &strict, 1_000_000, None)), None);
        assert_eq!(
            error_of(&call(&s, &strict, 999_999, None)).as_deref(),
            Some("EAPI:Invalid nonce")
        );
    }

    #[test]
    fn an_expired_key_is_an_invalid_key_and_an_address_off_the_allowlist_is_denied() {
        let mut old = key();
        old.valid_until = Some("2020-01-01T00:00:00Z".into());
        let mut fenced = key();
        fenced.ip_allowlist = vec!["10.1.0.0/16".into(), "192.168.7.7".into()];
        let s = state(vec![old.clone(), fenced.clone()]);
        assert_eq!(error_of(&call(&s, &old, 1, None)).as_deref(), Some("EAPI:Invalid key"));
        assert_eq!(error_of(&call_from(&s, &fenced, 1, "10.1.2.3")), None);
        assert_eq!(error_of(&call_from(&s, &fenced, 2, "192.168.7.7")), None);
        assert_eq!(
            error_of(&call_from(&s, &fenced, 3, "10.2.0.1")).as_deref(),
            Some("EGeneral:Permission denied")
        );
        let mut bad = key();
        bad.ip_allowlist = vec!["not-an-ip".into()];
        assert!(matches!(s.add_key(bad), Err(KeyError::BadAllowlist(_))));
        let mut bad = key();
        bad.valid_until = Some("tomorrow".into());
        assert!(matches!(s.add_key(bad), Err(KeyError::BadValidUntil)));
    }

    #[test]
    fn a_totp_code_is_accepted_once() {
        let mut t = key();
        t.otp = Some(SimOtp::TotpSecret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".into()));
        let s = state(vec![t.clone()]);
        let seed = Otp::totp_from_base32(&SecretString::new("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")).unwrap();
        let now = unix_secs(SystemTime::now());
        let code = seed.code_at(now);
        assert_eq!(error_of(&call(&s, &t, 1, Some(code.expose()))), None);
        assert_eq!(
            error_of(&call(&s, &t, 2, Some(code.expose()))).as_deref(),
            Some("EAPI:Invalid signature"),
            "the same code again is refused"
        );
        let next = seed.code_at(now + 30);
        assert_eq!(
            error_of(&call(&s, &t, 3, Some(next.expose()))),
            None,
            "the next one is taken"
        );
    }

    #[test]
    fn maintenance_answers_service_unavailable() {
        let k = key();
        let s = state(vec![k.clone()]);
        s.set_system_status(SystemStatus::Maintenance);
        assert_eq!(
            error_of(&call(&s, &k, 1, None)).as_deref(),
            Some("EService:Unavailable")
        );
        s.set_system_status(SystemStatus::CancelOnly);
        assert_eq!(error_of(&call(&s, &k, 2, None)), None, "tokens are still issued");
    }

    #[test]
    fn the_public_view_of_a_key_holds_no_secret() {
        let mut k = key();
        k.otp = Some(SimOtp::Password("pw-123".into()));
        let view = k.public_view().to_string();
        assert!(!view.contains(&k.api_secret) && !view.contains("pw-123"), "{view}");
        assert!(view.contains(&k.api_key));
    }
}
