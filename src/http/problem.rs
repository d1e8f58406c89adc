//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! [`ApiError`] is what handlers return; its `detail` is written for the
//! consumer and never carries internal error text, a token or a credential.
//! [`finish`] turns any other error response of the API (axum's 404/405, a
//! body-limit 413, a timeout) into the same shape, so every error a consumer
//! sees is problem+json, and marks every API response `no-store`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::token::retry_after_secs;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Problem `type`s are tag URIs (RFC 4151): stable identifiers, not links.
const TYPE_PREFIX: &str = "tag:kraken-token-broker,2026:problem:";

/// An error answered to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the request is malformed.
    BadRequest(String),
    /// 401: no credential, or a wrong one.
    Unauthorized { missing: bool },
    /// 403: the account is not granted to this consumer (or does not exist:
    /// the same answer either way).
    Forbidden,
    /// 403: the consumer is `relay_only`: it may not hold tokens.
    RelayOnly,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 408: the body did not arrive in time.
    RequestTimeout,
    /// 413: the body is too large.
    PayloadTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 431: the request head is too large.
    HeadTooLarge,
    /// 429: too many failed authentications from this address.
    TooManyRequests { retry_after: Duration },
    /// 429: this consumer's own request-rate limit or share of forced
    /// refreshes is spent.
    RateLimited { retry_after: Duration, detail: String },
    /// 503: no good-enough token can be had now.
    Unavailable { retry_after: Duration, detail: String },
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::RelayOnly => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::TooManyRequests { .. } | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::RelayOnly => "relay-only",
            ApiError::NotFound => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::RequestTimeout => "request-timeout",
            ApiError::PayloadTooLarge => "payload-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::HeadTooLarge => "request-header-fields-too-large",
            ApiError::TooManyRequests { .. } => "too-many-requests",
            ApiError::RateLimited { .. } => "rate-limited",
            ApiError::Unavailable { .. } => "token-unavailable",
        }
    }

    fn detail(&self) -> &str {
        match self {
            ApiError::BadRequest(detail)
            | ApiError::Unavailable { detail, .. }
            | ApiError::RateLimited { detail, .. } => detail,
            ApiError::Unauthorized { missing: true } => {
                "send the consumer credential as `Authorization: Bearer <credential>`"
            }
            ApiError::Unauthorized { missing: false } => "the credential is not valid",
            ApiError::Forbidden => "this consumer is not granted that account",
            ApiError::RelayOnly => {
                "this consumer is relay_only: it trades through GET /v1/relay and is never handed a token"
            }
            ApiError::NotFound => "no such endpoint: tokens are served at GET /v1/token",
            ApiError::MethodNotAllowed => "this endpoint does not take that method: see the Allow header",
            ApiError::RequestTimeout => "the request body did not arrive in time",
            ApiError::PayloadTooLarge => "the request body is too large",
            ApiError::UnsupportedMediaType => "send the body as application/json",
            ApiError::HeadTooLarge => "the request's target and headers are too large",
            ApiError::TooManyRequests { .. } => "too many failed authentications from this address: wait and retry",
        }
    }
}

fn problem_body(kind: String, status: StatusCode, detail: &str) -> Vec<u8> {
    let problem = Problem {
        kind,
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
    };
    serde_json::to_vec(&problem).expect("a problem always serialises")
}

/// A problem+json body for `status`, as every answer of the API has it.
pub fn problem_json(status: StatusCode, detail: &str) -> Vec<u8> {
    let slug = status
        .canonical_reason()
        .unwrap_or("error")
        .to_lowercase()
        .replace(' ', "-");
    problem_body(format!("{TYPE_PREFIX}{slug}"), status, detail)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = problem_body(format!("{TYPE_PREFIX}{}", self.slug()), status, self.detail());
        let mut response = (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized { .. } => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Unavailable { retry_after, .. }
            | ApiError::TooManyRequests { retry_after }
            | ApiError::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
            }
            _ => {}
        }
        response
    }
}

/// Applied to every consumer API response: `Cache-Control: no-store`, and
/// error responses not already problem+json rewritten as such, keeping their
/// status and headers (`Allow`, `Retry-After`).
pub fn finish(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let is_problem = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(parts.status.is_client_error() || parts.status.is_server_error()) || is_problem {
        return Response::from_parts(parts, body);
    }
    let status = parts.status;
    let detail = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound.detail().to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed.detail().to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge.detail().to_owned(),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => "the request took too long".to_owned(),
        other => other.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let slug = status
        .canonical_reason()
        .unwrap_or("error")
        .to_lowercase()
        .replace(' ', "-");
    let body = problem_body(format!("{TYPE_PREFIX}{slug}"), status, &detail);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::Value;

    async fn json(response: Response) -> Value {
        serde_json::from_slice(&to_bytes(response.into_body(), 1 << 16).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn errors_are_rfc_9457_problems_with_their_headers() {
        let r = ApiError::Unauthorized { missing: true }.into_response();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = json(r).await;
        assert_eq!(body["status"], 401);
        assert_eq!(body["title"], "Unauthorized");
        assert_eq!(body["type"], "tag:kraken-token-broker,2026:problem:unauthorized");
        assert!(body["detail"].as_str().unwrap().contains("Bearer"));

        let r = ApiError::Unavailable {
            retry_after: Duration::from_millis(2500),
            detail: "refreshing".into(),
        }
        .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[tokio::test]
    async fn finish_rewrites_bare_errors_and_marks_no_store() {
        let bare = (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "GET,HEAD")], "").into_response();
        let r = finish(bare);
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[header::ALLOW], "GET,HEAD");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(json(r).await["status"], 405);

        let ok = finish((StatusCode::OK, "fine").into_response());
        assert_eq!(ok.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(to_bytes(ok.into_body(), 100).await.unwrap(), "fine");

        let problem = finish(ApiError::Forbidden.into_response());
        assert_eq!(
            json(problem).await["type"],
            "tag:kraken-token-broker,2026:problem:forbidden"
        );
    }
}
