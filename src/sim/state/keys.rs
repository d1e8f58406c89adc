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
}

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
}

impl KeyState {
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
