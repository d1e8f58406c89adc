//! Consumers that prove who they are with a projected Kubernetes
//! ServiceAccount token: the broker asks the API server (a `TokenReview`,
//! `authentication.k8s.io/v1`, with the configured audience) and maps
//! `system:serviceaccount:<namespace>:<name>` to a consumer.
//!
//! One typed call over reqwest rather than kube-rs: the broker needs two
//! requests and their answer shapes; kube-rs would add a client, a runtime
//! and a dependency tree for it. Calls to the API server never go through
//! an egress proxy (`HTTPS_PROXY` is for Kraken): the API server is inside
//! the cluster.
//!
//! What a review costs, and how a flood of forged JWTs is kept from
//! becoming a flood of reviews:
//! - Cheap local checks on the token's unverified claims first
//!   ([`claims::precheck`]): its shape, `exp` not past, our audience in
//!   `aud`, a `sub` that names a configured consumer.
//! - Then its signature, against the cluster's signing keys ([`jwks`]): a
//!   forged token is refused here, without a review. Where the keys cannot
//!   be read, tokens go on to review, and the per-address throttle of failed
//!   authentications is consulted before each review is spent.
//! - Successful reviews are cached (keyed by the token's SHA-256) for
//!   `cache_ttl`, never past the token's own `exp`. Rejections and errors
//!   are never cached: TokenReview also rejects tokens of deleted pods,
//!   which only the API server knows (and why a review stays after the
//!   signature check).
//! - Concurrent requests with one token make one review (single flight).
//! - At most [`MAX_CONCURRENT_REVIEWS`] reviews at once, and at most
//!   [`REVIEWS_PER_SEC`] new reviews per second (burst [`REVIEW_BURST`]);
//!   beyond that, 503 with `Retry-After`, without a review.
//! - Each review has a [`REVIEW_TIMEOUT`]; the API server unreachable or
//!   answering 5xx is a 503 with `Retry-After`, never a 200.

pub mod claims;
pub mod jwks;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, warn};

pub use claims::{Claims, looks_like_jwt, precheck};
pub use jwks::{JwksError, KeysState, Signature};

use crate::bucket::TokenBucket;
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

/// How a TokenReview ended, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewResult {
    Authenticated,
    Rejected,
    /// The API server could not be asked, or reviews were saturated.
    Error,
}

impl ReviewResult {
    pub const ALL: [ReviewResult; 3] = [ReviewResult::Authenticated, ReviewResult::Rejected, ReviewResult::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            ReviewResult::Authenticated => "authenticated",
            ReviewResult::Rejected => "rejected",
            ReviewResult::Error => "error",
        }
    }
}

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

/// Why the TokenReview client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("kubernetes.ca is not a PEM certificate bundle")]
    Ca(#[source] reqwest::Error),
    #[error("cannot build the Kubernetes API client")]
    Client(#[source] reqwest::Error),
}

/// Why the broker could not ask the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot read the broker's token {path}: {source}")]
    OwnToken {
        path: PathBuf,
        #[source]
        source: crate::files::FileError,
    },
    #[error("the broker's own token is not a valid header value")]
    OwnTokenHeader,
    #[error("the API server refused the broker's own token")]
    OwnTokenRefused,
    #[error("the API server is unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error("the API server answered HTTP {0}")]
    Status(u16),
    #[error("the answer was cut off: {0}")]
    CutOff(#[source] reqwest::Error),
    #[error("the JWKS document is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
}

/// The API server as the broker calls it: its own client (the cluster CA
/// only, no proxy, no redirects) and the broker's own projected token.
struct ApiServer {
    http: reqwest::Client,
    url: String,
    token_file: PathBuf,
    own_token: Mutex<Option<(SecretString, Instant)>>,
}

impl ApiServer {
    /// The broker's own token, re-read as it rotates.
    fn own_token(&self, force: bool) -> Result<SecretString, ApiError> {
        let mut own = self.own_token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, at)) = own.as_ref()
            && !force
            && at.elapsed() < OWN_TOKEN_REREAD
        {
            return Ok(token.clone());
        }
        let read = crate::files::read_regular(&self.token_file, crate::files::MAX_SECRET_BYTES).map_err(|source| {
            ApiError::OwnToken {
                path: self.token_file.clone(),
                source,
            }
        })?;
        let token = SecretString::new(read.text.trim());
        *own = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    fn bearer(&self, force: bool) -> Result<reqwest::header::HeaderValue, ApiError> {
        let own = self.own_token(force)?;
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", own.expose()))
            .map_err(|_| ApiError::OwnTokenHeader)?;
        auth.set_sensitive(true);
        Ok(auth)
    }

    /// `GET /openid/v1/jwks`: the cluster's token signing keys.
    async fn jwks(&self) -> Result<Vec<u8>, ApiError> {
        let url = format!("{}/openid/v1/jwks", self.url);
        for attempt in 0..2 {
            let response = self
                .http
                .get(&url)
                .header(reqwest::header::AUTHORIZATION, self.bearer(attempt > 0)?)
                .send()
                .await
                .map_err(|e| ApiError::Unreachable(e.without_url()))?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                continue; // the broker's own token rotated: re-read it once
            }
            if !status.is_success() {
                return Err(ApiError::Status(status.as_u16()));
            }
            let body = response.bytes().await.map_err(|e| ApiError::CutOff(e.without_url()))?;
            if body.len() > MAX_JWKS_BYTES {
                return Err(ApiError::TooLarge);
            }
            return Ok(body.to_vec());
        }
        Err(ApiError::OwnTokenRefused)
    }
}

/// The largest JWKS document read (a cluster has a handful of keys).
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Checks ServiceAccount tokens: their signature against the cluster's
/// keys, then with the API server.
pub struct TokenReviewer {
    config: KubernetesConfig,
    api: Arc<ApiServer>,
    endpoint: String,
    jwks: Arc<jwks::Jwks>,
    cache: DashMap<[u8; 32], Cached>,
    inflight: DashMap<[u8; 32], Arc<OnceCell<Outcome>>>,
    slots: Semaphore,
    /// New reviews per second ([`REVIEWS_PER_SEC`], burst [`REVIEW_BURST`]).
    budget: Mutex<TokenBucket>,
    metrics: Metrics,
    /// Stops the keys' refresher when the reviewer goes (a reload that
    /// changes `[kubernetes]`, or shutdown).
    _keys_refresher: DropGuard,
}

impl TokenReviewer {
    /// The reviewer for `config`; starts reading the cluster's signing keys
    /// (so it must be called inside the runtime).
    pub fn new(config: KubernetesConfig, metrics: Metrics) -> Result<Self, SetupError> {
        // Only the cluster CA is trusted for the API server, not the OS store.
        let ca = reqwest::Certificate::from_pem_bundle(&config.ca_pem).map_err(SetupError::Ca)?;
        let http = reqwest::Client::builder()
            .timeout(REVIEW_TIMEOUT)
            .connect_timeout(REVIEW_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // The API server is in the cluster: HTTPS_PROXY is for Kraken.
            .no_proxy()
            .tls_certs_only(ca)
            .user_agent(concat!("kraken-token-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SetupError::Client)?;
        let api = Arc::new(ApiServer {
            http,
            url: config.api_url.clone(),
            token_file: config.token_file.clone(),
            own_token: Mutex::new(None),
        });
        let reader = Arc::clone(&api);
        let fetch: jwks::Fetch = Arc::new(move || {
            let api = Arc::clone(&reader);
            Box::pin(async move { api.jwks().await })
        });
        let jwks = Arc::new(jwks::Jwks::new(&config.audience, fetch));
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&jwks).keep_fresh(stop.clone()));
        let endpoint = format!("{}/apis/authentication.k8s.io/v1/tokenreviews", config.api_url);
        Ok(Self {
            config,
            api,
            endpoint,
            jwks,
            cache: DashMap::new(),
            inflight: DashMap::new(),
            slots: Semaphore::new(MAX_CONCURRENT_REVIEWS),
            budget: Mutex::new(TokenBucket::new(REVIEW_BURST, REVIEWS_PER_SEC, Instant::now())),
            metrics,
            _keys_refresher: stop.drop_guard(),
        })
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// Whether the cluster's signing keys are held, for `/readyz`.
    pub fn keys_state(&self) -> KeysState {
        self.jwks.state()
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

    /// The token's unverified claims, if they pass the cheap checks.
    pub fn precheck(&self, token: &str) -> Result<Claims, claims::Refusal> {
        precheck(token, &self.config.audience, SystemTime::now())
    }

    /// The token's signature, against the cluster's keys.
    pub async fn signature(&self, token: &str) -> Signature {
        self.jwks.check(token).await
    }

    /// The reviewed username (`system:serviceaccount:NS:SA`) of `token`,
    /// whose claims passed [`Self::precheck`].
    pub async fn review(&self, token: &str, claims: &Claims) -> Result<Arc<str>, ReviewError> {
        if let Some(username) = self.cached(token) {
            return Ok(username);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let left = claims
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let cell = Arc::clone(self.inflight.entry(key).or_default().value());
        let outcome = cell
            .get_or_init(|| async {
                // A flight that ended between our cache check and our taking
                // this cell has cached its answer: no second review.
                if let Some(username) = self.cached(token) {
                    return Ok(username);
                }
                let outcome = self.ask(token).await;
                if let Ok(username) = &outcome {
                    // Trusted up to cache_ttl, never past the token's exp.
                    if self.cache.len() >= MAX_CACHED {
                        self.cache.retain(|_, c| c.until > Instant::now());
                        if self.cache.len() >= MAX_CACHED {
                            self.cache.clear();
                        }
                    }
                    if let Some(until) = Instant::now().checked_add(left.min(self.config.cache_ttl)) {
                        self.cache.insert(
                            key,
                            Cached {
                                username: Arc::clone(username),
                                until,
                            },
                        );
                    }
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
        self.budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(Instant::now())
            .is_ok()
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
            self.metrics.consumers().token_review(ReviewResult::Error);
            return Err(busy);
        }
        let Ok(_slot) = tokio::time::timeout(REVIEW_TIMEOUT, self.slots.acquire()).await else {
            self.metrics.consumers().token_review(ReviewResult::Error);
            return Err(busy);
        };
        let outcome = self.call(token).await;
        self.metrics.consumers().token_review(match &outcome {
            Ok(_) => ReviewResult::Authenticated,
            Err(ReviewError::Rejected(_)) => ReviewResult::Rejected,
            Err(ReviewError::Unavailable { .. }) => ReviewResult::Error,
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
            let auth = self.api.bearer(attempt > 0).map_err(|e| {
                error!(error = %e, "cannot review ServiceAccount tokens");
                unavailable.clone()
            })?;
            let response = match self
                .api
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
                    fix = "bind the broker's ServiceAccount to a role allowing tokenreviews create (the chart does, with kubernetes.enabled)",
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
}
