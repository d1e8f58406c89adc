//! Consumers that prove who they are with a projected Kubernetes
//! ServiceAccount token: the broker asks the API server (a `TokenReview`,
//! `authentication.k8s.io/v1`, with the configured audience) and maps
//! `system:serviceaccount:<namespace>:<name>` to a consumer.
//!
//! One typed call over reqwest rather than kube-rs: the broker needs one
//! request and one answer shape; kube-rs would add a client, a runtime and
//! a dependency tree for it.
//!
//! What the review costs, and how a flood of random JWTs is kept from
//! becoming a flood of reviews:
//! - Successful reviews are cached (keyed by the token's SHA-256) for
//!   `cache_ttl`, never past the token's own `exp`. Rejections and errors
//!   are never cached: TokenReview also rejects tokens of deleted pods,
//!   which only the API server knows.
//! - Concurrent requests with one token make one review (single flight).
//! - Before any review, cheap local checks on the token's unverified claims:
//!   its shape, `exp` not past, our audience in `aud`, a `sub` that names a
//!   configured consumer. A forged token can pass them; it then meets the
//!   last two bounds (which never depend on the client's address: behind a
//!   mesh sidecar, every engine shares the attacker's):
//! - at most [`MAX_CONCURRENT_REVIEWS`] reviews at once, and at most
//!   [`REVIEWS_PER_SEC`] new reviews per second (burst [`REVIEW_BURST`]);
//!   beyond that, 503 with `Retry-After`, without a review;
//! - each review has a [`REVIEW_TIMEOUT`]; the API server unreachable or
//!   answering 5xx is a 503 with `Retry-After`, never a 200.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tracing::{error, warn};

use crate::config::KubernetesConfig;
use crate::metrics::Metrics;
use crate::secret::SecretString;

/// Reviews in flight at once, at most.
pub const MAX_CONCURRENT_REVIEWS: usize = 8;
/// New (uncached) reviews per second, at most, after a burst of ...
pub const REVIEWS_PER_SEC: f64 = 20.0;
/// ... this many.
pub const REVIEW_BURST: f64 = 40.0;
/// The longest a review may take.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the broker's own projected token is re-read (the kubelet
/// rotates it well before it expires).
const OWN_TOKEN_REREAD: Duration = Duration::from_secs(60);
/// Successful reviews remembered at most; the oldest go first.
const MAX_CACHED: usize = 10_000;
/// What `Retry-After` says when reviews are saturated or failing.
pub const REVIEW_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a ServiceAccount token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewError {
    /// Not a valid token for this broker (malformed, expired, wrong
    /// audience, not a ServiceAccount, refused by the API server).
    Rejected(&'static str),
    /// The API server could not be asked (down, 5xx, timeout) or reviews are
    /// saturated: try again shortly.
    Unavailable { retry_after: Duration },
}

/// The part of the token's payload checked before a review (unverified:
/// only to refuse early and to bound the cache, never to accept).
#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    sub: Option<String>,
    #[serde(default)]
    aud: Audience,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

impl Audience {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(a) => a == audience,
            Audience::Many(all) => all.iter().any(|a| a == audience),
            Audience::None => false,
        }
    }
}

/// Whether a bearer value looks like a JWT (three base64url parts).
pub fn looks_like_jwt(bearer: &[u8]) -> bool {
    let parts: Vec<&[u8]> = bearer.split(|b| *b == b'.').collect();
    parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'=')
        })
}

/// The token's `sub` claim, unverified: `system:serviceaccount:NS:SA` in a
/// ServiceAccount token. Only to refuse early a token naming no consumer;
/// never to accept one.
pub fn unverified_subject(token: &str) -> Option<String> {
    claims(token)?.sub
}

fn claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[derive(Clone)]
struct Cached {
    username: Arc<str>,
    until: Instant,
}

/// The review's answer, as Kubernetes gives it.
#[derive(Deserialize)]
struct TokenReview {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    user: ReviewUser,
}

#[derive(Deserialize, Default)]
struct ReviewUser {
    #[serde(default)]
    username: String,
}

type Outcome = Result<Arc<str>, ReviewError>;

/// Checks ServiceAccount tokens with the API server.
pub struct TokenReviewer {
    config: KubernetesConfig,
    http: reqwest::Client,
    endpoint: String,
    cache: DashMap<[u8; 32], Cached>,
    inflight: DashMap<[u8; 32], Arc<OnceCell<Outcome>>>,
    slots: Semaphore,
    budget: Mutex<(f64, Instant)>,
    own_token: Mutex<Option<(SecretString, Instant)>>,
    metrics: Metrics,
}

impl TokenReviewer {
    pub fn new(config: KubernetesConfig, metrics: Metrics) -> Result<Self, String> {
        // Only the cluster CA is trusted for the API server, not the OS store.
        let ca = reqwest::Certificate::from_pem_bundle(&config.ca_pem).map_err(|e| format!("kubernetes.ca: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(REVIEW_TIMEOUT)
            .connect_timeout(REVIEW_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_only(ca)
            .user_agent(crate::kraken::USER_AGENT)
            .build()
            .map_err(|e| format!("cannot build the TokenReview client: {e}"))?;
        let endpoint = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", config.api_url);
        Ok(Self {
            config,
            http,
            endpoint,
            cache: DashMap::new(),
            inflight: DashMap::new(),
            slots: Semaphore::new(MAX_CONCURRENT_REVIEWS),
            budget: Mutex::new((REVIEW_BURST, Instant::now())),
            own_token: Mutex::new(None),
            metrics,
        })
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The username of `token` if a review of it is still trusted.
    pub fn cached(&self, token: &str) -> Option<Arc<str>> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        self.cache
            .get(&key)
            .filter(|c| c.until > now)
            .map(|hit| Arc::clone(&hit.username))
    }

    /// The reviewed username (`system:serviceaccount:NS:SA`) of `token`.
    pub async fn review(&self, token: &str) -> Result<Arc<str>, ReviewError> {
        if let Some(username) = self.cached(token) {
            return Ok(username);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let Some(claims) = claims(token) else {
            return Err(ReviewError::Rejected("not a JWT"));
        };
        let exp = claims
            .exp
            .map(|e| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(e.max(0.0)));
        let left = exp.map(|e| e.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        if left == Some(Duration::ZERO) {
            return Err(ReviewError::Rejected("expired"));
        }
        if !claims.aud.contains(&self.config.audience) {
            return Err(ReviewError::Rejected("wrong audience"));
        }
        let cell = Arc::clone(self.inflight.entry(key).or_default().value());
        let outcome = cell
            .get_or_init(|| async {
                // A flight that ended between our cache check and our taking
                // this cell has cached its answer: no second review.
                if let Some(username) = self.cached(token) {
                    return Ok(username);
                }
                let outcome = self.ask(token).await;
                if let Ok(username) = &outcome
                    && let Some(left) = left
                {
                    // Trusted up to cache_ttl, never past the token's exp; a
                    // token without exp is never cached.
                    if self.cache.len() >= MAX_CACHED {
                        self.cache.retain(|_, c| c.until > Instant::now());
                        if self.cache.len() >= MAX_CACHED {
                            self.cache.clear();
                        }
                    }
                    let until = Instant::now() + left.min(self.config.cache_ttl);
                    self.cache.insert(
                        key,
                        Cached {
                            username: Arc::clone(username),
                            until,
                        },
                    );
                }
                outcome
            })
            .await
            .clone();
        self.inflight.remove_if(&key, |_, v| Arc::ptr_eq(v, &cell));
        outcome
    }

    /// Takes one new review from the budget.
    fn take_budget(&self) -> bool {
        let mut budget = self.budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let tokens =
            (budget.0 + now.saturating_duration_since(budget.1).as_secs_f64() * REVIEWS_PER_SEC).min(REVIEW_BURST);
        let ok = tokens >= 1.0;
        *budget = (if ok { tokens - 1.0 } else { tokens }, now);
        ok
    }

    /// The broker's own token, re-read as it rotates.
    fn own_token(&self, force: bool) -> Result<SecretString, String> {
        let mut own = self.own_token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, at)) = own.as_ref()
            && !force
            && at.elapsed() < OWN_TOKEN_REREAD
        {
            return Ok(token.clone());
        }
        let read =
            crate::files::read_regular(&self.config.token_file, crate::files::MAX_SECRET_BYTES).map_err(|e| {
                format!(
                    "cannot read the broker's token {}: {e}",
                    self.config.token_file.display()
                )
            })?;
        let token = SecretString::new(read.text.trim());
        *own = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    async fn ask(&self, token: &str) -> Outcome {
        let busy = ReviewError::Unavailable {
            retry_after: REVIEW_RETRY_AFTER,
        };
        if !self.take_budget() {
            warn!(
                per_sec = REVIEWS_PER_SEC,
                "TokenReview budget spent: a ServiceAccount token is refused without a review (a flood of tokens?)"
            );
            self.metrics.token_review("error");
            return Err(busy);
        }
        let Ok(_slot) = tokio::time::timeout(REVIEW_TIMEOUT, self.slots.acquire()).await else {
            self.metrics.token_review("error");
            return Err(busy);
        };
        let outcome = self.call(token).await;
        self.metrics.token_review(match &outcome {
            Ok(_) => "authenticated",
            Err(ReviewError::Rejected(_)) => "rejected",
            Err(ReviewError::Unavailable { .. }) => "error",
        });
        outcome
    }

    async fn call(&self, token: &str) -> Outcome {
        let unavailable = ReviewError::Unavailable {
            retry_after: REVIEW_RETRY_AFTER,
        };
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [self.config.audience] },
        });
        for attempt in 0..2 {
            let own = self.own_token(attempt > 0).map_err(|e| {
                error!(error = %e, "cannot review ServiceAccount tokens");
                unavailable.clone()
            })?;
            let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", own.expose()))
                .map_err(|_| unavailable.clone())?;
            auth.set_sensitive(true);
            let response = match self
                .http
                .post(&self.endpoint)
                .header(reqwest::header::AUTHORIZATION, auth)
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e.without_url(), api = %self.config.api_url, "TokenReview failed: the API server is unreachable");
                    return Err(unavailable);
                }
            };
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                continue; // the broker's own token rotated: re-read it once
            }
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                warn!(
                    status = status.as_u16(),
                    "TokenReview failed: the API server answered an error"
                );
                return Err(unavailable);
            }
            if !status.is_success() {
                error!(
                    status = status.as_u16(),
                    fix = "bind the broker's ServiceAccount to the ClusterRole system:auth-delegator (the chart does, with kubernetes.enabled)",
                    "the API server refused the broker's TokenReview"
                );
                return Err(unavailable);
            }
            let bytes = response.bytes().await.map_err(|_| unavailable.clone())?;
            let review: TokenReview = serde_json::from_slice(&bytes).map_err(|_| unavailable.clone())?;
            let s = review.status;
            if !s.authenticated {
                return Err(ReviewError::Rejected("not authenticated"));
            }
            if !s.audiences.contains(&self.config.audience) {
                return Err(ReviewError::Rejected("wrong audience"));
            }
            if !s.user.username.starts_with("system:serviceaccount:") {
                return Err(ReviewError::Rejected("not a ServiceAccount"));
            }
            return Ok(Arc::from(s.user.username));
        }
        Err(unavailable)
    }
}

/// Whether `username` is `system:serviceaccount:NS:SA` for this namespace
/// and ServiceAccount (compared in place: no string is built per request).
pub fn is_service_account(username: &str, namespace: &str, service_account: &str) -> bool {
    username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.strip_prefix(namespace))
        .and_then(|rest| rest.strip_prefix(':'))
        == Some(service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256"}"#),
            b64(payload.to_string().as_bytes()),
            b64(b"sig")
        )
    }

    #[test]
    fn service_account_usernames_are_matched_exactly() {
        assert!(is_service_account("system:serviceaccount:trading:mm", "trading", "mm"));
        assert!(!is_service_account(
            "system:serviceaccount:trading:mm2",
            "trading",
            "mm"
        ));
        assert!(!is_service_account(
            "system:serviceaccount:trading-x:mm",
            "trading",
            "mm"
        ));
        assert!(!is_service_account("system:serviceaccount:tradingmm", "trading", "mm"));
        assert!(!is_service_account("system:node:trading:mm", "trading", "mm"));
    }

    #[test]
    fn jwts_are_told_from_credentials() {
        assert!(looks_like_jwt(jwt(json!({"aud": "x"})).as_bytes()));
        assert!(!looks_like_jwt(b"ktb_abcdefghijklmnop"));
        assert!(!looks_like_jwt(b"a.b"));
        assert!(!looks_like_jwt(b"a.b.c d"));
    }

    #[test]
    fn claims_are_read_unverified_for_the_early_checks() {
        let c = claims(&jwt(json!({"aud": ["kraken-token-broker", "other"], "exp": 1.9e9}))).unwrap();
        assert!(c.aud.contains("kraken-token-broker"));
        assert_eq!(c.exp, Some(1.9e9));
        let c = claims(&jwt(json!({"aud": "api"}))).unwrap();
        assert!(!c.aud.contains("kraken-token-broker"));
        assert!(claims("not.a.jwt").is_none());
    }
}
