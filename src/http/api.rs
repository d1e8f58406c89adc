//! The consumer API: `GET /v1/token` and `POST /v1/token/invalidate`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::debug;

use super::Grant;
use super::auth::Authenticated;
use super::problem::ApiError;
use crate::audit::{Event, Via};
use crate::token::{CachedToken, Cause, Unavailable, token_sha256};

/// The largest `min_ttl` accepted: Kraken's documented token lifetime.
const MAX_MIN_TTL_SECS: u64 = crate::token::MAX_TOKEN_LIFETIME.as_secs();

/// The 200 body of both endpoints.
#[derive(Serialize)]
struct TokenBody<'a> {
    token: &'a str,
    account: &'a str,
    issued_at: &'a str,
    expires_at: &'a str,
    expires_in: u64,
    ws_url: &'a str,
}

fn token_response(token: &CachedToken, account: &str, ws_url: &str, now: Instant) -> Response {
    let json = token_json(token, account, ws_url, now);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], json).into_response()
}

/// The 200 body of the token endpoints, and the `data` of a watch stream's
/// `token` event.
pub(super) fn token_json(token: &CachedToken, account: &str, ws_url: &str, now: Instant) -> Vec<u8> {
    let body = TokenBody {
        token: token.token.expose(),
        account,
        issued_at: &token.issued_at_rfc3339,
        expires_at: &token.expires_at_rfc3339,
        expires_in: token.remaining(now).as_secs(),
        ws_url,
    };
    serde_json::to_vec(&body).expect("a token body always serialises")
}

/// The query's parameters; unknown, repeated or badly encoded ones are refused.
pub(super) struct Query {
    pub(super) account: Option<String>,
    min_ttl: Option<u64>,
}

pub(super) fn parse_query(raw: Option<&str>, allow_min_ttl: bool) -> Result<Query, ApiError> {
    let mut query = Query {
        account: None,
        min_ttl: None,
    };
    // Borrowing parser: no allocation unless a value needs decoding.
    for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "account" if query.account.is_some() => {
                return Err(ApiError::BadRequest("`account` is given more than once".into()));
            }
            "account" => query.account = Some(value.into_owned()),
            "min_ttl" if allow_min_ttl && query.min_ttl.is_some() => {
                return Err(ApiError::BadRequest("`min_ttl` is given more than once".into()));
            }
            "min_ttl" if allow_min_ttl => {
                let secs = value
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s <= MAX_MIN_TTL_SECS)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "`min_ttl` must be a whole number of seconds from 0 to {MAX_MIN_TTL_SECS}"
                        ))
                    })?;
                query.min_ttl = Some(secs);
            }
            other => {
                let name: String = other.chars().filter(|c| !c.is_control()).take(64).collect();
                return Err(ApiError::BadRequest(format!("unknown query parameter `{name}`")));
            }
        }
    }
    Ok(query)
}

pub(super) fn unavailable(u: Unavailable, account: &str) -> ApiError {
    let detail = match u.cause {
        Cause::Unsatisfiable { lifetime } => {
            return ApiError::BadRequest(format!(
                "`min_ttl` asks for more than even a fresh token has ({} s)",
                lifetime.as_secs()
            ));
        }
        Cause::RefreshFailing(reason) => {
            format!("no token good enough is held for account `{account}` and refreshing is failing ({reason})")
        }
        Cause::CircuitOpen => {
            format!(
                "Kraken has locked out this broker's address; refreshing account `{account}` resumes after the lockout"
            )
        }
        Cause::TokensTooShort {
            lifetime,
            min_served_ttl,
        } => format!(
            "Kraken grants tokens of {} s for account `{account}`, no more than min_served_ttl ({} s): none can be served; the broker retries with back-off",
            lifetime.as_secs_f64().round() as u64,
            min_served_ttl.as_secs()
        ),
        Cause::ForcedRefreshLimited => {
            format!("account `{account}` has had too many forced refreshes lately; retry shortly")
        }
        Cause::ConsumerShareSpent => {
            return ApiError::RateLimited {
                retry_after: u.retry_after,
                detail: format!(
                    "this consumer has spent its share of forced refreshes of account `{account}` (min_ttl above what is held, or reports of rejected tokens); the current token stays served"
                ),
            };
        }
        Cause::NotAnswering => format!("no token could be had for account `{account}` in time"),
    };
    ApiError::Unavailable {
        retry_after: u.retry_after,
        detail,
    }
}

/// Counts a token handed out, names it at debug level (by fingerprint) and
/// in the audit trail (by keyed fingerprint). A HEAD request is answered
/// without the token, so it is not a token served.
fn count_served(auth: &Authenticated, grant: &Grant, token: &CachedToken, method: &Method) {
    if method == Method::HEAD {
        return;
    }
    record_served(&auth.table, &auth.consumer, grant, auth.peer, token, Via::Get);
}

/// Counts one token handed to `consumer` (by `via`: `get`, `invalidate`,
/// `watch`), in the metric, the debug log and the audit trail.
pub(super) fn record_served(
    table: &super::ServeTable,
    consumer: &super::Consumer,
    grant: &Grant,
    peer: Option<std::net::SocketAddr>,
    token: &CachedToken,
    via: Via,
) {
    grant.served.inc();
    debug!(consumer = %consumer.name, account = %grant.account, token = %token.fingerprint, via = via.as_str(), "token served");
    if let Some(audit) = &table.audit {
        audit.record(Event::TokenServed {
            consumer: consumer.name.clone(),
            identity: consumer.identity.kind(),
            account: grant.account.clone(),
            peer: peer.map(|p| p.to_string()),
            token: audit.token_fingerprint(&token.sha256, token.token.expose()).to_string(),
            expires_at: token.expires_at_rfc3339.clone(),
            via,
        });
    }
}

/// The problem for a refused request, counting the consumer's own 429s.
fn refused(auth: &Authenticated, u: Unavailable, account: &str) -> ApiError {
    if u.cause == Cause::ConsumerShareSpent {
        auth.consumer.rate_limited.inc();
    }
    unavailable(u, account)
}

/// `GET /v1/token?account=NAME&min_ttl=SECONDS`
pub async fn get_token(auth: Authenticated, method: Method, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    auth.may_hold_tokens()?;
    let query = parse_query(raw.as_deref(), true)?;
    let grant = auth.grant(query.account.as_deref())?;
    let table = &auth.table;
    let min_ttl = Duration::from_secs(query.min_ttl.unwrap_or(0));
    let now = Instant::now();
    // The hot path: a cached token good enough, no task hop, no lock.
    if let Some(token) = grant.handle.published().servable(min_ttl, now) {
        count_served(&auth, grant, token, &method);
        return Ok(token_response(token, &grant.account, &table.ws_url, now));
    }
    let token = grant
        .handle
        .want_as(&auth.consumer.name, min_ttl)
        .await
        .map_err(|u| refused(&auth, u, &grant.account))?;
    count_served(&auth, grant, &token, &method);
    Ok(token_response(&token, &grant.account, &table.ws_url, Instant::now()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    token: String,
}

/// `POST /v1/token/invalidate?account=NAME` with `{"token": "..."}`.
pub async fn invalidate(
    auth: Authenticated,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    auth.may_hold_tokens()?;
    let query = parse_query(raw.as_deref(), false)?;
    let grant = auth.grant(query.account.as_deref())?;
    if !super::is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    // Read only now, after auth: within a deadline and a size limit.
    let body = tokio::time::timeout(
        super::BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, super::MAX_BODY_BYTES),
    )
    .await
    .map_err(|_| ApiError::RequestTimeout)?
    .map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    let reported: InvalidateBody = serde_json::from_slice(&body)
        .map_err(|_| ApiError::BadRequest("the body must be {\"token\": \"<the token Kraken rejected>\"}".into()))?;
    if reported.token.is_empty() {
        return Err(ApiError::BadRequest("`token` is empty".into()));
    }
    let table = &auth.table;
    let reported_sha = token_sha256(&reported.token);
    let token = grant
        .handle
        .invalidate(reported_sha, &auth.consumer.name)
        .await
        .map_err(|u| refused(&auth, u, &grant.account))?;
    if let Some(audit) = &table.audit {
        audit.record(Event::TokenInvalidated {
            consumer: auth.consumer.name.clone(),
            identity: auth.consumer.identity.kind(),
            account: grant.account.clone(),
            peer: auth.peer.map(|p| p.to_string()),
            reported: audit.token_fingerprint(&reported_sha, &reported.token).to_string(),
            replaced: token.sha256 != reported_sha,
        });
    }
    record_served(&auth.table, &auth.consumer, grant, auth.peer, &token, Via::Invalidate);
    Ok(token_response(&token, &grant.account, &table.ws_url, Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_parsed_strictly() {
        let q = parse_query(Some("account=main&min_ttl=120"), true).unwrap();
        assert_eq!(q.account.as_deref(), Some("main"));
        assert_eq!(q.min_ttl, Some(120));
        let q = parse_query(None, true).unwrap();
        assert!(q.account.is_none() && q.min_ttl.is_none());
        for bad in [
            "min_ttl=-1",
            "min_ttl=1.5",
            "min_ttl=abc",
            "min_ttl=",
            "min_ttl=99999999999999999999999",
            "min_ttl=901",
            "account=a&account=b",
            "min_ttl=1&min_ttl=2",
            "acount=main",
        ] {
            assert!(
                matches!(parse_query(Some(bad), true), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
        assert!(
            parse_query(Some("min_ttl=5"), false).is_err(),
            "invalidate takes no min_ttl"
        );
    }
}
