//! The simulator's memory and its decisions, free of HTTP.
//!
//! [`SimState::private_call`] decides Kraken's answer to one private REST call
//! exactly as Kraken orders its checks: lockout, key, call counter, signature,
//! 2FA, nonce, permission. The REST layer only carries bytes in and out.
//! One std `Mutex` guards everything: every critical section is a few map
//! operations and never spans an `.await`.

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

/// One API key the simulator accepts. Simulator keys are test material, so
/// this type prints them: users need to see them to configure a client.
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
        }
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

/// Start-up settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub keys: Vec<SimKey>,
    pub token_ttl: Duration,
    pub tier: Tier,
    /// Invalid key/signature/nonce calls in a row that lock a key out.
    pub lockout_threshold: u32,
    pub lockout_duration: Duration,
    pub heartbeat_interval: Duration,
    pub fault: Option<FaultSpec>,
}

/// Kraken's documented token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(900);
/// Kraken does not publish its threshold; ten bad calls in a row is a guess
/// on the careful side.
pub const DEFAULT_LOCKOUT_THRESHOLD: u32 = 10;
pub const DEFAULT_LOCKOUT_DURATION: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Calls kept for read-back; older ones are dropped first.
pub const MAX_CALL_RECORDS: usize = 10_000;
/// Distinct presented keys tracked for lockouts before the table is reset,
/// so random garbage keys cannot grow memory without bound.
const MAX_TRACKED_PRESENTED_KEYS: usize = 10_000;

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

/// A simulated key, with its secrets decoded.
struct KeyState {
    config: SimKey,
    secret: SecretBytes,
    otp: Option<Otp>,
    last_nonce: Option<u64>,
    counter: f64,
    counter_at: Instant,
}

#[derive(Default)]
struct Strikes {
    invalid_in_a_row: u32,
    locked_until: Option<Instant>,
}

struct ActiveFault {
    spec: FaultSpec,
    remaining: Option<u32>,
}

struct Inner {
    keys: HashMap<String, KeyState>,
    strikes: HashMap<String, Strikes>,
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
}

/// What a private REST call presented.
pub struct PrivateCall<'a> {
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
    /// This status with an HTML body.
    Html(u16, String),
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
        let state = KeyState {
            config: key.clone(),
            secret,
            otp,
            last_nonce: None,
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

    /// Clears call counters, nonce memory and lockouts.
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
                    Reply::Html(status, edge_html(status)),
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

    /// Counts one invalid call against a presented key; may start a lockout.
    fn strike(&mut self, presented: &str, now: Instant) {
        if self.strikes.len() >= MAX_TRACKED_PRESENTED_KEYS && !self.strikes.contains_key(presented) {
            self.strikes.clear();
        }
        let threshold = self.lockout_threshold;
        let duration = self.lockout_duration;
        let strikes = self.strikes.entry(presented.to_owned()).or_default();
        strikes.invalid_in_a_row += 1;
        if strikes.invalid_in_a_row >= threshold {
            strikes.locked_until = Some(now + duration);
            strikes.invalid_in_a_row = 0;
        }
    }

    /// Kraken's checks in Kraken's order; on success a token is issued.
    /// Returns the reply, the nonce presented, and the token issued.
    fn check_and_issue(
        &mut self,
        call: &PrivateCall<'_>,
        fixed_token: Option<String>,
    ) -> (Reply, Option<String>, Option<String>) {
        let now = Instant::now();
        if !call.path.starts_with("/0/private/") || call.path != WS_TOKEN_PATH {
            return (kraken_error("EGeneral:Unknown method"), None, None);
        }
        if !call.http_method.eq_ignore_ascii_case("POST") {
            return (kraken_error("EGeneral:Invalid arguments"), None, None);
        }
        let presented = call.api_key.unwrap_or("").trim();
        if let Some(strikes) = self.strikes.get_mut(presented) {
            match strikes.locked_until {
                Some(until) if now < until => return (kraken_error("EGeneral:Temporary lockout"), None, None),
                Some(_) => strikes.locked_until = None,
                None => {}
            }
        }
        let tier = self.tier;
        let Some(key) = self.keys.get_mut(presented) else {
            self.strike(presented, now);
            return (kraken_error("EAPI:Invalid key"), None, None);
        };

        // Every call counts, failed ones too, and calls made while limited
        // keep the counter up.
        let elapsed = now.duration_since(key.counter_at).as_secs_f64();
        key.counter = (key.counter - elapsed * tier.decay_per_sec()).max(0.0) + 1.0;
        key.counter_at = now;
        if key.counter > tier.max_counter() {
            return (kraken_error("EAPI:Rate limit exceeded"), None, None);
        }

        let Some((nonce, otp)) = body_fields(call.content_type, call.body) else {
            self.strike(presented, now);
            return (kraken_error("EAPI:Invalid nonce"), None, None);
        };
        let signed = call
            .api_sign
            .is_some_and(|sig| verify(&key.secret, call.path, &nonce, call.body, sig));
        if !signed {
            self.strike(presented, now);
            return (kraken_error("EAPI:Invalid signature"), Some(nonce), None);
        }
        if let Some(expected) = &key.otp {
            let unix = unix_secs(SystemTime::now());
            if !otp.as_deref().is_some_and(|code| expected.accepts(code, unix)) {
                self.strike(presented, now);
                return (kraken_error("EAPI:Invalid signature"), Some(nonce), None);
            }
        }
        let parsed: Option<u64> = nonce.parse().ok();
        let fresh = match (parsed, key.last_nonce) {
            (None, _) => false,
            (Some(n), Some(last)) => n > last,
            (Some(_), None) => true,
        };
        if !fresh {
            self.strike(presented, now);
            return (kraken_error("EAPI:Invalid nonce"), Some(nonce), None);
        }
        key.last_nonce = parsed;
        if !key.config.ws_permission {
            return (kraken_error("EGeneral:Permission denied"), Some(nonce), None);
        }
        let api_key = key.config.api_key.clone();
        if let Some(strikes) = self.strikes.get_mut(presented) {
            strikes.invalid_in_a_row = 0;
        }

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
        let secret = decode_secret(&key.api_secret).unwrap();
        let sig = sign(&secret, WS_TOKEN_PATH, nonce, body.as_bytes());
        state.private_call(&PrivateCall {
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
        assert!(matches!(&d.reply, Reply::Html(502, html) if html.contains("502 Bad Gateway")));

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
}
