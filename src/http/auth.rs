//! Consumer authentication as an extractor, so no handler can forget it.
//!
//! A consumer proves who it is in one of three ways, tried in this order:
//! a client certificate verified by TLS whose SAN names a `client_cert`
//! consumer (no bearer needed); a bearer that is a projected ServiceAccount
//! token, checked against the cluster's signing keys and a TokenReview
//! (`identity::service_account`); a bearer credential,
//! hashed with SHA-256 and compared against every consumer's stored hash in
//! constant time (`subtle`). The credential itself is never stored, logged
//! or echoed.
//!
//! Order of the guards: identity first, then the consumer's own rate limit.
//! The per-address throttle of failed authentications is consulted only for
//! a request that failed: a request that proves a valid identity is never
//! refused because another client at its address (a mesh sidecar's, say)
//! sent bad credentials.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tokio::time::Instant;

use super::problem::ApiError;
use super::server::Standing;
use super::{AppState, Consumer, Grant, ServeTable};
use crate::config::Identity;
use crate::identity::ClientCertificate;
use crate::identity::credential::{self, digest_eq};
use crate::identity::service_account::{ReviewError, Signature, looks_like_jwt};
use crate::metrics::{AuthFailure, Metrics};

/// A request whose consumer proved who it is.
pub struct Authenticated {
    pub consumer: Arc<Consumer>,
    /// The serving table the consumer was found in, so the request sees one
    /// consistent configuration even if a reload lands meanwhile.
    pub table: Arc<ServeTable>,
    /// The client's address, for audit lines.
    pub peer: Option<SocketAddr>,
    /// When the proof stops being trusted, for a stream that outlives the
    /// request: a ServiceAccount token's review after `cache_ttl`, a client
    /// certificate at its `notAfter`. The stream ends then; the client
    /// reconnects and proves itself again.
    pub reprove_at: Option<Instant>,
    /// To count a refused account; so handlers need not take the whole state.
    metrics: Metrics,
}

impl Authenticated {
    /// Refuses a `relay_only` consumer a token (403), counted.
    pub fn may_hold_tokens(&self) -> Result<(), ApiError> {
        self.consumer.may_hold_tokens().inspect_err(|_| {
            self.metrics
                .relay()
                .refused(&self.consumer.name, super::relay::Refusal::RelayOnly);
        })
    }

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
            self.metrics.consumers().auth_failure(AuthFailure::Forbidden);
            audit_failure(&self.table, "forbidden", self.consumer.identity.kind(), self.peer);
            ApiError::Forbidden
        })
    }
}

/// Counts an `auth.failed` in the audit trail (summarised per address and
/// reason), when auditing is on.
fn audit_failure(table: &ServeTable, reason: &'static str, identity: &'static str, peer: Option<SocketAddr>) {
    if let Some(audit) = &table.audit {
        audit.auth_failed(peer.map(|p| p.ip()), reason, identity);
    }
}

/// The credential of an `Authorization: Bearer <credential>` header.
fn bearer(value: &[u8]) -> Result<&[u8], AuthFailure> {
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

/// The credential consumer whose credential hashes to `hash`: every stored
/// hash is compared, each in constant time.
pub fn find_consumer(table: &ServeTable, hash: &[u8; 32]) -> Option<Arc<Consumer>> {
    let mut found = None;
    for consumer in &table.consumers {
        if let Identity::Credential { sha256 } = &consumer.identity
            && bool::from(digest_eq(sha256, hash))
        {
            found = Some(Arc::clone(consumer));
        }
    }
    found
}

/// Why a request has no consumer.
enum Refusal {
    /// No proof, or a wrong one.
    Auth(AuthFailure, &'static str),
    /// The request is malformed (two `Authorization` headers).
    Malformed(&'static str),
    /// The proof cannot be checked now (the API server is down or busy).
    Unavailable(Duration),
    /// The proof would need a review, and the client's address has failed
    /// too often to be given one (only while the cluster's signing keys
    /// cannot be read).
    Throttled(Duration),
}

/// Finds the consumer a request proves it is.
async fn identify(parts: &Parts, table: &ServeTable, state: &AppState) -> Result<Arc<Consumer>, Refusal> {
    if let Some(cert) = parts.extensions.get::<ClientCertificate>()
        && let Some(consumer) = table.by_certificate(cert)
    {
        return Ok(consumer);
    }
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Refusal::Auth(AuthFailure::Missing, "none"));
    };
    if values.next().is_some() {
        return Err(Refusal::Malformed("send one Authorization header, not several"));
    }
    let credential = bearer(value.as_bytes()).map_err(|f| Refusal::Auth(f, "none"))?;
    if let Some(reviewer) = &table.reviewer
        && looks_like_jwt(credential)
    {
        let invalid = || Refusal::Auth(AuthFailure::Invalid, "service_account");
        let token = std::str::from_utf8(credential).map_err(|_| invalid())?;
        if let Some(username) = reviewer.cached(token) {
            return table.by_service_account(&username).ok_or_else(invalid);
        }
        // Unverified claims first: a token that names no consumer, or is
        // expired or for another audience, would end in 401 whatever the
        // review said.
        let claims = reviewer.precheck(token).map_err(|_| invalid())?;
        if table.by_service_account(&claims.subject).is_none() {
            return Err(invalid());
        }
        match reviewer.signature(token).await {
            Signature::Valid => {}
            Signature::Invalid(_) => return Err(invalid()),
            Signature::Busy => return Err(Refusal::Unavailable(Duration::from_secs(1))),
            Signature::Unchecked => {
                if let Some(retry_after) = state.throttle.blocked(super::peer_ip(parts)) {
                    return Err(Refusal::Throttled(retry_after));
                }
            }
        }
        let username = match reviewer.review(token, &claims).await {
            Ok(username) => username,
            Err(ReviewError::Rejected(_)) => return Err(invalid()),
            Err(ReviewError::Unavailable { retry_after }) => return Err(Refusal::Unavailable(retry_after)),
        };
        return table.by_service_account(&username).ok_or_else(invalid);
    }
    let hash = credential::hash(credential);
    find_consumer(table, &hash).ok_or(Refusal::Auth(AuthFailure::Invalid, "credential"))
}

/// When `consumer`'s proof in this request stops being trusted.
fn reprove_at(parts: &Parts, consumer: &Consumer, table: &ServeTable) -> Option<Instant> {
    let now = Instant::now();
    match &consumer.identity {
        Identity::Credential { .. } => None,
        Identity::ServiceAccount { .. } => table
            .reviewer
            .as_ref()
            .and_then(|r| now.checked_add(r.config().cache_ttl)),
        Identity::ClientCert { .. } => parts
            .extensions
            .get::<ClientCertificate>()
            .and_then(|cert| now.checked_add(cert.time_left(std::time::SystemTime::now()).unwrap_or_default())),
    }
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let table = state.table.load_full();
        let peer = super::peer_addr(parts);
        let ip = peer.map(|p| p.ip());
        match identify(parts, &table, state).await {
            Ok(consumer) => {
                if let Err(retry_after) = consumer.limiter.check(Instant::now()) {
                    consumer.rate_limited.inc();
                    let limit = consumer.limiter.limit();
                    return Err(ApiError::RateLimited {
                        retry_after,
                        detail: format!(
                            "consumer `{}` sends requests faster than its rate limit ({}/s, burst {})",
                            consumer.name, limit.per_second, limit.burst
                        ),
                    });
                }
                // The connection proved an identity within its consumer's
                // limits: it is not a stranger's to be evicted for a newcomer.
                if let Some(standing) = parts.extensions.get::<Standing>() {
                    standing.prove(&consumer.proven);
                }
                let reprove_at = reprove_at(parts, &consumer, &table);
                Ok(Self {
                    consumer,
                    table,
                    peer,
                    reprove_at,
                    metrics: state.metrics.clone(),
                })
            }
            Err(Refusal::Malformed(why)) => Err(ApiError::BadRequest(why.into())),
            Err(Refusal::Unavailable(retry_after)) => Err(ApiError::Unavailable {
                retry_after,
                detail:
                    "ServiceAccount tokens cannot be checked now (the Kubernetes API server is unreachable or busy)"
                        .into(),
            }),
            Err(Refusal::Throttled(retry_after)) => {
                audit_failure(&table, "throttled", "service_account", peer);
                Err(ApiError::TooManyRequests { retry_after })
            }
            Err(Refusal::Auth(failure, identity)) => {
                state.metrics.consumers().auth_failure(failure);
                audit_failure(&table, failure.as_str(), identity, peer);
                if failure == AuthFailure::Invalid {
                    state.throttle.record_failure(ip);
                }
                if let Some(retry_after) = state.throttle.blocked(ip) {
                    return Err(ApiError::TooManyRequests { retry_after });
                }
                Err(ApiError::Unauthorized {
                    missing: failure == AuthFailure::Missing,
                })
            }
        }
    }
}

/// Whether a relay's consumer still proves who it is.
pub enum Reproof {
    /// It does; prove it again then (if ever).
    Proven(Option<Instant>),
    /// It does not: the relay ends.
    Refused,
    /// It cannot be told now (the API server is down or busy).
    Unknown,
}

/// Proves again, for a relay that outlives its request, the `Authorization`
/// value (`bearer`) that proved `consumer`: a ServiceAccount token is
/// reviewed again (a cached review counts) and must still name the same
/// consumer, under the table in force now.
pub async fn prove_again(state: &AppState, bearer: &crate::secret::SecretString, consumer: &Consumer) -> Reproof {
    let Ok(value) = axum::http::HeaderValue::from_str(bearer.expose()) else {
        return Reproof::Refused;
    };
    let mut request = axum::http::Request::new(());
    request.headers_mut().insert(AUTHORIZATION, value);
    let (parts, ()) = request.into_parts();
    let table = state.table.load_full();
    match identify(&parts, &table, state).await {
        Ok(found) if found.name == consumer.name && found.identity == consumer.identity => {
            Reproof::Proven(reprove_at(&parts, &found, &table))
        }
        Ok(_) | Err(Refusal::Auth(..) | Refusal::Malformed(_)) => Reproof::Refused,
        Err(Refusal::Unavailable(_) | Refusal::Throttled(_)) => Reproof::Unknown,
    }
}
