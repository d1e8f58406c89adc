//! The simulator's keys: as configured ([`SimKey`], in Kraken's key-form
//! terms), and as held ([`KeyState`]: the secret decoded, the nonce and TOTP
//! steps seen, the call counter).

use std::time::{Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::MAX_WINDOW_NONCES;
use crate::kraken::Otp;
use crate::kraken::key_info::{PERMISSIONS, WS_TOKEN_PERMISSION};
use crate::secret::SecretBytes;

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
    /// The key's permissions in Kraken's names, as `GetApiKeyInfo` reports
    /// them (e.g. `create-ws-token`, `withdraw-funds`). When set, it decides
    /// `ws_permission` (`create-ws-token`) and `trade_permission`
    /// (`modify-trades`); when not, a trading key's set follows from those
    /// two flags ([`SimKey::permissions`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
}

/// A trading key's permissions when none are listed: query funds, query
/// and manage orders, and the WebSocket one (each of the last two only with
/// its flag). Kraken's names (see [`crate::kraken::key_info::PERMISSIONS`]).
const QUERY_PERMISSIONS: &[&str] = &["query-funds", "query-open-trades", "query-closed-trades"];
const TRADE_PERMISSIONS: &[&str] = &["modify-trades", "close-trades"];

pub(super) fn yes() -> bool {
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
            permissions: None,
        }
    }

    /// The key's permissions in Kraken's names.
    pub fn permissions(&self) -> Vec<String> {
        if let Some(listed) = &self.permissions {
            return listed.clone();
        }
        let mut held: Vec<&str> = QUERY_PERMISSIONS.to_vec();
        if self.trade_permission {
            held.extend(TRADE_PERMISSIONS);
        }
        if self.ws_permission {
            held.push(WS_TOKEN_PERMISSION);
        }
        held.into_iter().map(str::to_owned).collect()
    }

    /// A listed set of permissions decides the two flags, so they never
    /// disagree with it; an unknown name is refused (a typo would otherwise
    /// make a key silently weaker).
    pub(super) fn normalise(mut self) -> Result<Self, KeyError> {
        if let Some(listed) = &self.permissions {
            if let Some(unknown) = listed.iter().find(|p| !PERMISSIONS.iter().any(|(name, _)| name == p)) {
                return Err(KeyError::BadPermission(unknown.clone()));
            }
            self.ws_permission = listed.iter().any(|p| p == WS_TOKEN_PERMISSION);
            self.trade_permission = listed.iter().any(|p| p == "modify-trades");
        }
        Ok(self)
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
            "permissions": self.permissions(),
        })
    }
}

/// A simulated key, with its secrets decoded and its settings parsed.
pub(super) struct KeyState {
    pub(super) config: SimKey,
    pub(super) secret: SecretBytes,
    pub(super) otp: Option<Otp>,
    pub(super) valid_until: Option<SystemTime>,
    pub(super) allowlist: Vec<ipnet::IpNet>,
    /// The highest nonce accepted.
    pub(super) last_nonce: Option<u64>,
    /// Nonces accepted within the window below the highest (so one is
    /// never accepted twice).
    pub(super) window_nonces: std::collections::BTreeSet<u64>,
    /// The last TOTP step whose code was accepted: a code is taken once.
    pub(super) last_totp_step: Option<u64>,
    pub(super) counter: f64,
    pub(super) counter_at: Instant,
    /// When the key was first added (Kraken's `createdTime`) and last
    /// replaced (`modifiedTime`).
    pub(super) created: SystemTime,
    pub(super) modified: SystemTime,
    /// The last call the key made that Kraken accepted (`lastUsed`).
    pub(super) last_used: Option<SystemTime>,
}

/// A bad key given to [`super::SimState::add_key`].
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
    #[error(
        "permissions holds `{0}`, not one of Kraken's permission names (query-funds, create-ws-token, withdraw-funds, ...)"
    )]
    BadPermission(String),
}

/// A fixed stand-in for the account's IBAN: the documented answer carries
/// one, and a client must not keep or print it.
const SIM_IBAN: &str = "AA00 SIMU LATO R000";

fn unix_text(t: Option<SystemTime>) -> String {
    t.map_or(0, crate::clock::unix_secs).to_string()
}

impl KeyState {
    /// `GetApiKeyInfo`'s `result`, in the documented shape: times as Unix
    /// seconds in strings (`"0"`: none), the nonce a string, the window a
    /// number. Assumed (not documented): `nonce` is the highest accepted,
    /// this call's included, and `lastUsed` the time of the last accepted
    /// call; `apiKeyName` is the simulator's own.
    pub(super) fn info(&self) -> Value {
        json!({
            "apiKeyName": format!("sim-{}", crate::secret::fingerprint(self.config.api_key.as_bytes())),
            "apiKey": self.config.api_key,
            "nonce": self.last_nonce.unwrap_or(0).to_string(),
            "nonceWindow": self.config.nonce_window,
            "permissions": self.config.permissions(),
            "iban": SIM_IBAN,
            "validUntil": unix_text(self.valid_until),
            "queryFrom": "0",
            "queryTo": "0",
            "createdTime": unix_text(Some(self.created)),
            "modifiedTime": unix_text(Some(self.modified)),
            "ipAllowlist": self.config.ip_allowlist,
            "lastUsed": unix_text(self.last_used),
        })
    }

    /// Whether `nonce` is acceptable under the key's nonce window, and if so
    /// remembers it: above the highest seen, or within the window below it
    /// and not seen before.
    pub(super) fn accept_nonce(&mut self, nonce: Option<u64>) -> bool {
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
