//! The cluster's ServiceAccount token signing keys (the API server's
//! `/openid/v1/jwks`, which the chart's own ClusterRole lets it read, as
//! the built-in `system:service-account-issuer-discovery` would), so that a token's
//! signature is checked here before any TokenReview is spent on it: a forged
//! token costs a signature check, never a review, and so can never use up
//! the review budget real engines need.
//!
//! The keys are fetched at start, every [`REFRESH`], and again when a token
//! names a key id not held (the API server rotated its keys), at most every
//! [`MIN_REFETCH`]. While none could ever be read (no permission, an API
//! server that does not serve them), tokens go to TokenReview as before and
//! the log and `/readyz` say so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

/// How often the keys are read again while all is well.
pub const REFRESH: Duration = Duration::from_secs(300);
/// How soon after a failed read the keys are read again.
pub const RETRY: Duration = Duration::from_secs(30);
/// The fewest seconds between two reads caused by unknown key ids, so that
/// tokens naming random key ids cannot make the broker hammer the API server.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// How long a token waits for its turn at a signature check.
const VERIFY_WAIT: Duration = Duration::from_secs(1);
/// Clock skew allowed on `exp` when checking a signed token.
const LEEWAY_SECS: u64 = 30;
/// Signature algorithms a ServiceAccount token may use: asymmetric only
/// (an HMAC "key" from a JWKS would be a shared secret anyone holds).
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// What a signature check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// Signature checks are all taken (a flood of tokens): try again shortly.
    Busy,
    /// Signed by one of the cluster's keys, unexpired, of our audience.
    Valid,
    /// Not a token of this cluster for us: refuse it without a review.
    Invalid(&'static str),
    /// No keys could be read: fall back to a review.
    Unchecked,
}

/// Whether the keys could be read, for the log and `/readyz`.
#[derive(Debug, Clone)]
pub enum KeysState {
    /// Not read yet (the broker has just started).
    Pending,
    /// Held, read at this Unix time.
    Loaded { keys: usize, at: SystemTime },
    /// The last read failed; `keys` are still held from an earlier one.
    Failing { keys: usize, error: Arc<JwksError> },
}

/// Why the keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error(transparent)]
    Api(#[from] super::ApiError),
    #[error("not a JWKS document: {0}")]
    NotJwks(#[source] serde_json::Error),
    #[error("the JWKS document holds no usable signing key")]
    NoUsableKey,
}

/// The signing keys, by key id.
type KeySet = HashMap<String, Arc<DecodingKey>>;

/// Reads the keys with the broker's own token; given by the reviewer.
pub type Fetch = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, super::ApiError>> + Send>>
        + Send
        + Sync,
>;

/// The cluster's signing keys and their refreshing.
pub struct Jwks {
    audience: String,
    keys: ArcSwap<KeySet>,
    state: Mutex<KeysState>,
    /// Signature checks under way: one at a time, so a flood of forged
    /// tokens takes at most one core from serving everyone else.
    verifying: tokio::sync::Semaphore,
    /// When a read last started, so unknown key ids refetch at most every
    /// [`MIN_REFETCH`]; an async mutex, so concurrent misses make one read.
    last_read: tokio::sync::Mutex<Option<Instant>>,
    fetch: Fetch,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

/// The usable signing keys of a JWKS document.
pub fn parse(document: &[u8]) -> Result<KeySet, JwksError> {
    let doc: Document = serde_json::from_slice(document).map_err(JwksError::NotJwks)?;
    let mut keys = KeySet::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue; // a key type this broker does not know: not ours to use
        };
        let signing = jwk
            .common
            .public_key_use
            .as_ref()
            .is_none_or(|u| *u == PublicKeyUse::Signature);
        let asymmetric = !matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_));
        let (Some(kid), true, true) = (jwk.common.key_id.clone(), signing, asymmetric) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, Arc::new(key));
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(keys)
}

impl Jwks {
    pub fn new(audience: &str, fetch: Fetch) -> Self {
        Self {
            audience: audience.to_owned(),
            keys: ArcSwap::from_pointee(KeySet::new()),
            state: Mutex::new(KeysState::Pending),
            verifying: tokio::sync::Semaphore::new(1),
            last_read: tokio::sync::Mutex::new(None),
            fetch,
        }
    }

    pub fn state(&self) -> KeysState {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_state(&self, state: KeysState) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }

    /// Reads the keys now; whether it worked.
    pub async fn read(&self) -> bool {
        *self.last_read.lock().await = Some(Instant::now());
        self.read_unlocked().await
    }

    async fn read_unlocked(&self) -> bool {
        let outcome = (self.fetch)()
            .await
            .map_err(JwksError::Api)
            .and_then(|body| parse(&body));
        let before = self.state();
        match outcome {
            Ok(keys) => {
                if !matches!(before, KeysState::Loaded { keys: n, .. } if n == keys.len()) {
                    info!(
                        keys = keys.len(),
                        "ServiceAccount token signing keys read: forged tokens are refused without a TokenReview"
                    );
                }
                self.set_state(KeysState::Loaded {
                    keys: keys.len(),
                    at: SystemTime::now(),
                });
                self.keys.store(Arc::new(keys));
                true
            }
            Err(error) => {
                let keys = self.keys.load().len();
                if !matches!(&before, KeysState::Failing { error: e, .. } if e.to_string() == error.to_string()) {
                    warn!(
                        %error,
                        keys,
                        fix = "let the broker's ServiceAccount get the non-resource URL /openid/v1/jwks (the chart's ClusterRole <namespace>-<release>-tokenreview grants it; or the built-in system:service-account-issuer-discovery)",
                        "cannot read the ServiceAccount token signing keys: tokens signed by an unknown key are checked by TokenReview alone"
                    );
                }
                self.set_state(KeysState::Failing {
                    keys,
                    error: Arc::new(error),
                });
                false
            }
        }
    }

    /// Refreshes the keys until `stop`: now, then every [`REFRESH`] (every
    /// [`RETRY`] while reads fail).
    pub async fn keep_fresh(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let wait = if self.read().await { REFRESH } else { RETRY };
            tokio::select! {
                _ = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The key named `kid`; a miss reads the keys again (at most every
    /// [`MIN_REFETCH`], one read for any number of concurrent misses).
    async fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        if let Some(key) = self.keys.load().get(kid) {
            return Some(Arc::clone(key));
        }
        let mut last = self.last_read.lock().await;
        // Another miss may have read them while this one waited.
        if let Some(key) = self.keys.load().get(kid) {
            return Some(Arc::clone(key));
        }
        if last.is_none_or(|at| at.elapsed() >= MIN_REFETCH) {
            *last = Some(Instant::now());
            self.read_unlocked().await;
        }
        drop(last);
        self.keys.load().get(kid).cloned()
    }

    /// Checks `token`'s signature, expiry and audience against the keys.
    pub async fn check(&self, token: &str) -> Signature {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Signature::Invalid("malformed header");
        };
        if !ALGORITHMS.contains(&header.alg) {
            return Signature::Invalid("signature algorithm not allowed");
        }
        let key = match &header.kid {
            Some(kid) => self.key(kid).await,
            None => None,
        };
        let Some(key) = key else {
            // No key of that id (after a fresh read, if one was allowed):
            // forged, whenever any keys are held. Only while none could
            // ever be read does the review decide alone.
            return if self.keys.load().is_empty() {
                Signature::Unchecked
            } else {
                Signature::Invalid("signed by a key the cluster does not hold")
            };
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.leeway = LEEWAY_SECS;
        let Ok(Ok(_turn)) = tokio::time::timeout(VERIFY_WAIT, self.verifying.acquire()).await else {
            return Signature::Busy;
        };
        match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
            Ok(_) => Signature::Valid,
            Err(error) => Signature::Invalid(match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired",
                jsonwebtoken::errors::ErrorKind::InvalidAudience => "wrong audience",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad signature",
                _ => "not a valid signed token",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An EC P-256 signing key and its JWK.
    fn signing_key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw(); // 0x04 || x || y
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                         "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        (EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
    }

    fn sign(key: &EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    fn claims(aud: &str, exp_in: i64) -> serde_json::Value {
        let now = crate::clock::unix_secs(SystemTime::now()) as i64;
        json!({"aud": [aud], "exp": now + exp_in, "sub": "system:serviceaccount:t:mm"})
    }

    /// A JWKS that serves `documents` in turn (the last one from then on),
    /// counting reads.
    fn jwks(documents: Vec<Result<serde_json::Value, u16>>) -> (Jwks, Arc<AtomicUsize>) {
        let reads = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&reads);
        let documents = Arc::new(documents);
        let fetch: Fetch = Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let doc = documents[n.min(documents.len() - 1)].clone();
            Box::pin(async move {
                doc.map(|d| d.to_string().into_bytes())
                    .map_err(super::super::ApiError::Status)
            })
        });
        (Jwks::new("ktb", fetch), reads)
    }

    #[tokio::test]
    async fn tokens_signed_by_the_cluster_pass_and_forgeries_do_not() {
        let (key, jwk) = signing_key("k1");
        let (other, _) = signing_key("k1");
        let (jwks, _) = jwks(vec![Ok(json!({"keys": [jwk]}))]);
        assert!(jwks.read().await);
        assert_eq!(
            jwks.check(&sign(&key, "k1", claims("ktb", 600))).await,
            Signature::Valid
        );
        let forged = sign(&other, "k1", claims("ktb", 600));
        assert_eq!(jwks.check(&forged).await, Signature::Invalid("bad signature"));
        let expired = sign(&key, "k1", claims("ktb", -600));
        assert_eq!(jwks.check(&expired).await, Signature::Invalid("expired"));
        let elsewhere = sign(&key, "k1", claims("api", 600));
        assert_eq!(jwks.check(&elsewhere).await, Signature::Invalid("wrong audience"));
        // An unsigned token, or one signed with HMAC, is never accepted.
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","kid":"k1"}"#),
            b64(claims("ktb", 600).to_string().as_bytes())
        );
        assert!(matches!(jwks.check(&unsigned).await, Signature::Invalid(_)));
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let hmac = jsonwebtoken::encode(&header, &claims("ktb", 600), &EncodingKey::from_secret(b"k")).unwrap();
        assert_eq!(
            jwks.check(&hmac).await,
            Signature::Invalid("signature algorithm not allowed")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_key_id_reads_the_keys_again_at_most_every_min_refetch() {
        let (old, old_jwk) = signing_key("old");
        let (new, new_jwk) = signing_key("new");
        let (jwks, reads) = jwks(vec![
            Ok(json!({"keys": [old_jwk.clone()]})),
            Ok(json!({"keys": [old_jwk, new_jwk]})),
        ]);
        assert!(jwks.read().await);
        assert_eq!(
            jwks.check(&sign(&old, "old", claims("ktb", 600))).await,
            Signature::Valid
        );
        // Just read: a miss does not read again yet.
        let rotated = sign(&new, "new", claims("ktb", 600));
        assert!(matches!(jwks.check(&rotated).await, Signature::Invalid(_)));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        tokio::time::advance(MIN_REFETCH).await;
        assert_eq!(jwks.check(&rotated).await, Signature::Valid, "the rotated key is read");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // Random key ids: one read per MIN_REFETCH at most.
        for i in 0..50 {
            let _ = jwks
                .check(&sign(&new, &format!("random-{i}"), claims("ktb", 600)))
                .await;
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_held_from_an_earlier_read_still_refuse_unknown_key_ids() {
        let (key, jwk) = signing_key("k1");
        let (other, _) = signing_key("k2");
        let (jwks, _) = jwks(vec![Ok(json!({"keys": [jwk]})), Err(502)]);
        assert!(jwks.read().await);
        tokio::time::advance(MIN_REFETCH).await;
        assert!(!jwks.read().await, "the API server is gone");
        assert!(matches!(jwks.state(), KeysState::Failing { keys: 1, .. }));
        tokio::time::advance(MIN_REFETCH).await;
        let forged = sign(&other, "k2", claims("ktb", 600));
        assert!(
            matches!(jwks.check(&forged).await, Signature::Invalid(_)),
            "no review for it"
        );
        assert_eq!(
            jwks.check(&sign(&key, "k1", claims("ktb", 600))).await,
            Signature::Valid
        );
    }

    #[tokio::test]
    async fn without_readable_keys_tokens_fall_back_to_review() {
        let (key, _) = signing_key("k1");
        let (jwks, _) = jwks(vec![Err(403)]);
        assert_eq!(
            jwks.check(&sign(&key, "k1", claims("ktb", 600))).await,
            Signature::Unchecked
        );
        assert!(!jwks.read().await);
        assert!(matches!(jwks.state(), KeysState::Failing { keys: 0, .. }));
        assert_eq!(
            jwks.check(&sign(&key, "k1", claims("ktb", 600))).await,
            Signature::Unchecked
        );
    }

    #[test]
    fn only_asymmetric_signing_keys_with_ids_are_kept() {
        let (_, ec) = signing_key("ec");
        let doc = json!({"keys": [
            ec,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "enc", "use": "enc"},
            {"kty": "weird", "kid": "w"}
        ]});
        let keys = parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ec"]);
        assert!(parse(b"{}").is_err());
        assert!(parse(br#"{"keys": []}"#).is_err());
    }
}
