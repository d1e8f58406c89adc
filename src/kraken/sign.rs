//! Kraken's request signature, as a pure function.
//!
//! `API-Sign = base64(HMAC-SHA512(key = base64decode(secret),
//!                                msg = uri_path ‖ SHA256(nonce ‖ body)))`
//!
//! `body` is exactly the bytes sent on the wire, and `nonce` the decimal digits
//! of the nonce inside it. The caller builds the body once, signs that string
//! and sends that string; nothing here re-encodes anything.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::secret::SecretBytes;

/// The one private path the broker ever calls.
pub const WS_TOKEN_PATH: &str = "/0/private/GetWebSocketsToken";

/// The API secret could not be decoded into an HMAC key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretDecodeError {
    #[error("the API secret is not valid standard base64")]
    NotBase64,
    #[error("the API secret decodes to no bytes")]
    Empty,
}

/// Decodes a Kraken API secret (standard base64, as Kraken shows it) into the
/// HMAC key. Surrounding whitespace is ignored; nothing else is forgiven.
pub fn decode_secret(secret_b64: &str) -> Result<SecretBytes, SecretDecodeError> {
    let bytes = STANDARD
        .decode(secret_b64.trim())
        .map_err(|_| SecretDecodeError::NotBase64)?;
    if bytes.is_empty() {
        return Err(SecretDecodeError::Empty);
    }
    Ok(SecretBytes::new(bytes))
}

/// The raw 64-byte HMAC-SHA512 signature.
fn signature(secret: &[u8], uri_path: &str, nonce: &str, body: &[u8]) -> [u8; 64] {
    let mut inner = Sha256::new();
    inner.update(nonce.as_bytes());
    inner.update(body);
    let inner = inner.finalize();

    let mut mac = Hmac::<Sha512>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(uri_path.as_bytes());
    mac.update(&inner);
    mac.finalize().into_bytes().into()
}

/// The `API-Sign` header value: standard base64 with padding (88 characters).
pub fn sign(secret: &SecretBytes, uri_path: &str, nonce: &str, body: &[u8]) -> String {
    STANDARD.encode(signature(secret.expose(), uri_path, nonce, body))
}

/// Checks a presented `API-Sign` in constant time (the simulator's side).
pub fn verify(secret: &SecretBytes, uri_path: &str, nonce: &str, body: &[u8], presented: &str) -> bool {
    let Ok(presented) = STANDARD.decode(presented.trim()) else {
        return false;
    };
    let expected = signature(secret.expose(), uri_path, nonce, body);
    presented.len() == expected.len() && bool::from(presented.as_slice().ct_eq(&expected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        id: String,
        secret_b64: String,
        uri_path: String,
        nonce: String,
        body: String,
        api_sign: String,
    }

    fn vectors() -> Vec<Vector> {
        serde_json::from_str(include_str!("../../tests/data/kraken-api-sign.json")).expect("test vectors parse")
    }

    #[test]
    fn every_published_vector_signs_exactly() {
        let vectors = vectors();
        assert_eq!(vectors.len(), 8, "the shared file holds 8 vectors");
        for v in vectors {
            let secret = decode_secret(&v.secret_b64).expect("vector secret decodes");
            let got = sign(&secret, &v.uri_path, &v.nonce, v.body.as_bytes());
            assert_eq!(got, v.api_sign, "vector {}", v.id);
            assert_eq!(got.len(), 88, "vector {}", v.id);
            assert!(verify(&secret, &v.uri_path, &v.nonce, v.body.as_bytes(), &v.api_sign));
        }
    }

    #[test]
    fn signature_covers_nonce_prefix_path_and_body() {
        let v = &vectors()[3];
        let secret = decode_secret(&v.secret_b64).unwrap();
        let body = v.body.as_bytes();
        // One peer hashed the body without the nonce prefix.
        assert_ne!(sign(&secret, &v.uri_path, "", body), v.api_sign);
        // The path is part of the message, the URL is not.
        let url = format!("https://api.kraken.com{}", v.uri_path);
        assert_ne!(sign(&secret, &url, &v.nonce, body), v.api_sign);
        // A single changed body byte breaks it.
        let mut changed = body.to_vec();
        changed[0] ^= 1;
        assert!(!verify(&secret, &v.uri_path, &v.nonce, &changed, &v.api_sign));
    }

    #[test]
    fn verify_rejects_garbage_and_truncated_signatures() {
        let v = &vectors()[0];
        let secret = decode_secret(&v.secret_b64).unwrap();
        let body = v.body.as_bytes();
        assert!(!verify(&secret, &v.uri_path, &v.nonce, body, "not base64!"));
        assert!(!verify(&secret, &v.uri_path, &v.nonce, body, &v.api_sign[..44]));
        assert!(!verify(&secret, &v.uri_path, &v.nonce, body, ""));
    }

    #[test]
    fn decode_secret_rejects_bad_input() {
        assert_eq!(decode_secret("***").unwrap_err(), SecretDecodeError::NotBase64);
        assert_eq!(decode_secret("").unwrap_err(), SecretDecodeError::Empty);
        assert!(
            decode_secret("AAECAw==\n").is_ok(),
            "a trailing newline from a file is fine"
        );
    }

    proptest! {
        #[test]
        fn signing_is_deterministic_and_keyed(
            secret in proptest::collection::vec(any::<u8>(), 1..96),
            other in proptest::collection::vec(any::<u8>(), 1..96),
            nonce in 0u64..u64::MAX,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let key = SecretBytes::new(secret.clone());
            let nonce = nonce.to_string();
            let a = sign(&key, WS_TOKEN_PATH, &nonce, &body);
            let b = sign(&key, WS_TOKEN_PATH, &nonce, &body);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), 88);
            prop_assert!(verify(&key, WS_TOKEN_PATH, &nonce, &body, &a));
            // HMAC pads keys with zero bytes, so keys equal but for trailing
            // zeros are the same key.
            let trim = |k: &[u8]| k.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            if other[..trim(&other)] != secret[..trim(&secret)] {
                prop_assert!(!verify(&SecretBytes::new(other), WS_TOKEN_PATH, &nonce, &body, &a));
            }
        }
    }
}
