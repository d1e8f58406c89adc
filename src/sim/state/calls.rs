//! One private REST call, decided: who called, the key, the counter, the
//! signature, 2FA, the nonce, the permission; the answer, and the record of
//! it for read-back.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rand::RngExt as _;

use super::faults::{FaultSpec, edge_html, reshape};
use super::{Inner, MAX_CALL_RECORDS, MAX_TRACKED_ADDRESSES, SimState, SystemStatus};
use crate::clock::{unix_millis, unix_secs};
use crate::kraken::key_info::KEY_INFO_PATH;
use crate::kraken::{WS_TOKEN_PATH, verify};
use crate::secret::fingerprint;

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

/// One caller address's failed calls and lockout.
#[derive(Default)]
pub(super) struct Strikes {
    pub(super) failures: VecDeque<Instant>,
    pub(super) locked_until: Option<Instant>,
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
    pub delay: std::time::Duration,
    pub reply: Reply,
}

pub(super) fn kraken_error(code: &str) -> Reply {
    Reply::Json(json!({ "error": [code] }))
}

/// Nonce and otp from a form or JSON body.
pub(super) fn body_fields(content_type: Option<&str>, body: &[u8]) -> Option<(String, Option<String>)> {
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
    /// Decides the answer to a private REST call at once (no delay applied).
    #[cfg(test)]
    pub fn private_call(&self, call: &PrivateCall<'_>) -> Decision {
        let (fault, delay) = self.take_fault(call.path);
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

impl Inner {
    pub(super) fn record(
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
    pub(super) fn strike(&mut self, peer: std::net::IpAddr, now: Instant) {
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

    /// Whether `peer` is locked out now (clearing a lockout that has
    /// passed). A call during a lockout extends it by the whole lockout
    /// length: Kraken's error guide says "each attempt resets the timer".
    pub(super) fn locked_out(&mut self, peer: std::net::IpAddr, now: Instant) -> bool {
        let window = self.lockout_duration;
        let Some(strikes) = self.strikes.get_mut(&peer) else {
            return false;
        };
        match strikes.locked_until {
            Some(until) if now < until => {
                strikes.locked_until = Some(now + window);
                true
            }
            Some(_) => {
                strikes.locked_until = None;
                false
            }
            None => false,
        }
    }

    /// Kraken's checks in this simulator's order; on success a token is
    /// issued. Returns the reply, the nonce presented, and the token issued.
    pub(super) fn check_and_issue(
        &mut self,
        call: &PrivateCall<'_>,
        fixed_token: Option<String>,
    ) -> (Reply, Option<String>, Option<String>) {
        let now = Instant::now();
        let peer = call
            .peer
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if call.path != WS_TOKEN_PATH && call.path != KEY_INFO_PATH {
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
        // keep the counter up. This is Kraken's counter (it rises past the
        // limit and decays at the tier's rate), not `bucket::TokenBucket`,
        // which stops at empty: a refused call there costs nothing, here it
        // pushes the reopening further away, as Kraken documents.
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
        if call.path == KEY_INFO_PATH {
            // "API Key Permissions Required: None".
            key.last_used = Some(wall);
            return (
                Reply::Json(json!({ "error": [], "result": key.info() })),
                Some(nonce),
                None,
            );
        }
        if !key.config.ws_permission {
            self.strike(peer, now);
            return (kraken_error("EGeneral:Permission denied"), Some(nonce), None);
        }
        key.last_used = Some(wall);
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
