//! Secret material as types, so nothing secret can be printed by accident.
//!
//! Every API key, API secret, OTP, consumer credential and WebSocket token in
//! the broker lives in one of these types. Their `Debug` and `Display` print a
//! fixed redaction; the value is reachable only through an explicit `expose`.
//! Logs that must tell two tokens apart use [`fingerprint`].

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// What `Debug` and `Display` print in place of a secret.
pub const REDACTED: &str = "[redacted]";

/// A secret string: API key, static OTP, credential, token.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The value itself. Every call site is a place where a secret leaves its
    /// wrapper, so keep them few and obvious.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 8 hex characters of the value's SHA-256: enough to tell
    /// tokens apart in logs, useless to an attacker.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.expose().as_bytes())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Secret bytes: the decoded HMAC key of an API secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(value: Vec<u8>) -> Self {
        Self(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// SHA-256 of `bytes`, as 64 lowercase hex characters.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The first 8 hex characters of the SHA-256 of `bytes`.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut hex = sha256_hex(bytes);
    hex.truncate(8);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_string_debug_and_display_are_redacted() {
        let secret = SecretString::new("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(format!("{secret}"), REDACTED);
        assert_eq!(format!("{:#?}", Some(&secret)), format!("Some(\n    {REDACTED},\n)"));
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn secret_bytes_debug_and_display_are_redacted() {
        let secret = SecretBytes::new(vec![1, 2, 3]);
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(format!("{secret}"), REDACTED);
        assert_eq!(secret.expose(), &[1, 2, 3]);
    }

    #[test]
    fn fingerprint_is_first_eight_hex_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(fingerprint(b"abc"), "ba7816bf");
        assert_eq!(SecretString::new("abc").fingerprint(), "ba7816bf");
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
