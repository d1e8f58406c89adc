//! Talking to Kraken: signing, nonces, the `GetWebSocketsToken` call and the
//! classification of everything that can go wrong. Knows no cache and no HTTP
//! server; `token/` decides when to call, this module only how.

pub mod client;
pub mod error;
pub mod key_info;
pub mod nonce;
pub mod otp;
pub mod sign;
pub mod source;
pub mod wire;
pub mod ws;

pub use client::{ApiCredentials, KeyLane, KrakenClient, USER_AGENT};
pub use error::{
    Action, ApiFailure, Class, KeyRefusal, KrakenError, LOCKOUT_CIRCUIT, NONCE_AHEAD_HINT, Reason, classify_api_error,
    classify_api_errors,
};
pub use key_info::{ForeignUse, KeyCheck, KeyInfo, PERMISSIONS, Verdict};
pub use nonce::NonceSource;
pub use otp::Otp;
pub use sign::{WS_TOKEN_PATH, decode_secret, sign, verify};
pub use source::KrakenSource;
pub use wire::{MAX_TOKEN_LIFETIME, WsToken};
