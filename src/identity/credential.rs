//! A bearer credential as proof of identity: random, prefixed so a leaked
//! one is recognisable, and stored only as its SHA-256, compared in constant
//! time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of a presented credential.
pub fn hash(credential: &[u8]) -> [u8; 32] {
    Sha256::digest(credential).into()
}

/// Whether two SHA-256 digests are equal, in constant time: every word is
/// compared, with no early exit, and `subtle` makes the final decision.
/// (`subtle`'s slice comparison works byte by byte; this is 8x fewer steps.)
pub fn digest_eq(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    let mut diff = 0u64;
    for (x, y) in a.as_chunks::<8>().0.iter().zip(b.as_chunks::<8>().0) {
        diff |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y);
    }
    diff.ct_eq(&0)
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
