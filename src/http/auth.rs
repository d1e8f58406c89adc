//! Consumer authentication as an extractor, so no handler can forget it.
//!
//! The bearer credential is hashed with SHA-256 and compared against every
//! consumer's stored hash in constant time (`subtle`); the credential itself is
//! never stored, logged or echoed.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use super::{AppState, Consumer, Grant, ServeTable};
use crate::metrics::{AuthFailure, Metrics};

/// A request whose bearer credential matched a consumer.
pub struct Authenticated {
    pub consumer: Arc<Consumer>,
    /// The serving table the consumer was found in, so the request sees one
    /// consistent configuration even if a reload lands meanwhile.
    pub table: Arc<ServeTable>,
    /// To count a refused account; so handlers need not take the whole state.
    metrics: Metrics,
}

impl Authenticated {
    /// The grant of the account asked for, or the only one when none is
    /// named. An account not granted is refused the same way whether or not
    /// it exists.
    pub fn grant(&self, account: Option<&str>) -> Result<&Grant, ApiError> {
        let grants = &self.consumer.grants;
        let grant = match account {
            Some(name) => grants.iter().find(|g| g.account == name),
            None if grants.len() == 1 => grants.first(),
            None => {
                return Err(ApiError::BadRequest(
                    "this consumer is granted several accounts: name one with ?account=NAME".into(),
                ));
            }
        };
        grant.ok_or_else(|| {
            self.metrics.auth_failure(AuthFailure::Forbidden);
            ApiError::Forbidden
        })
    }
}

/// The credential of an `Authorization: Bearer <credential>` header.
fn bearer(parts: &Parts) -> Result<&[u8], AuthFailure> {
    let value = parts.headers.get(AUTHORIZATION).ok_or(AuthFailure::Missing)?;
    let value = value.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ').ok_or(AuthFailure::Invalid)?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthFailure::Invalid);
    }
    let credential = rest.trim_ascii();
    if credential.is_empty() {
        return Err(AuthFailure::Invalid);
    }
    Ok(credential)
}

/// Whether two SHA-256 digests are equal, in constant time: every word is
/// compared, with no early exit, and `subtle` makes the final decision.
/// (`subtle`'s slice comparison works byte by byte; this is 8x fewer steps.)
fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    let mut diff = 0u64;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let x = u64::from_ne_bytes(x.try_into().expect("8-byte chunk"));
        let y = u64::from_ne_bytes(y.try_into().expect("8-byte chunk"));
        diff |= x ^ y;
    }
    diff.ct_eq(&0)
}

/// The consumer whose credential hashes to `hash`: every stored hash is
/// compared, each in constant time.
pub fn find_consumer(table: &ServeTable, hash: &[u8; 32]) -> Option<Arc<Consumer>> {
    let mut found = None;
    for consumer in &table.consumers {
        if bool::from(digest_eq(&consumer.credential_sha256, hash)) {
            found = Some(Arc::clone(consumer));
        }
    }
    found
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = super::peer_ip(parts);
        if let Some(retry_after) = state.throttle.blocked(peer) {
            return Err(ApiError::TooManyRequests { retry_after });
        }
        let table = state.table.load_full();
        let failure = match bearer(parts) {
            Ok(credential) => {
                let hash: [u8; 32] = Sha256::digest(credential).into();
                match find_consumer(&table, &hash) {
                    Some(consumer) => {
                        return Ok(Self {
                            consumer,
                            table,
                            metrics: state.metrics.clone(),
                        });
                    }
                    None => AuthFailure::Invalid,
                }
            }
            Err(failure) => failure,
        };
        state.metrics.auth_failure(failure);
        if failure == AuthFailure::Invalid {
            state.throttle.record_failure(peer);
        }
        Err(ApiError::Unauthorized {
            missing: failure == AuthFailure::Missing,
        })
    }
}

/// Prefix of consumer credentials, so a leaked one is recognisable in scans.
pub const CREDENTIAL_PREFIX: &str = "ktb_";

/// A fresh random consumer credential (256 bits) and its SHA-256.
pub fn new_credential() -> (crate::secret::SecretString, [u8; 32]) {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    let credential = format!(
        "{CREDENTIAL_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
    (crate::secret::SecretString::new(credential), hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_eq_compares_every_byte() {
        let a = [7u8; 32];
        assert!(bool::from(digest_eq(&a, &a)));
        for i in 0..32 {
            let mut b = a;
            b[i] ^= 1;
            assert!(!bool::from(digest_eq(&a, &b)), "a difference in byte {i}");
        }
    }

    #[test]
    fn credentials_are_random_prefixed_and_hash_to_their_sha256() {
        let (a, hash) = new_credential();
        let (b, _) = new_credential();
        assert_ne!(a, b);
        assert!(a.expose().starts_with(CREDENTIAL_PREFIX));
        assert_eq!(a.expose().len(), CREDENTIAL_PREFIX.len() + 43);
        assert_eq!(hex::encode(hash), crate::secret::sha256_hex(a.expose().as_bytes()));
    }
}
