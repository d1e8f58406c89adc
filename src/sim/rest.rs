//! The simulator's REST surface: Kraken's `/0/private/*` and `/0/public/*`,
//! and the control API under `/_sim/`, a prefix Kraken never uses.
//!
//! The control API is a test tool, not a hazard: it never echoes a secret or
//! a token (tokens are named by fingerprint), and every request that changes
//! something must be `Content-Type: application/json`, which a web page
//! cannot send cross-origin without a CORS preflight this server never
//! grants.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::SimShared;
use super::state::{FaultSpec, PrivateCall, Reply, SimKey, SimOtp, SystemStatus};
use crate::secret::fingerprint;

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn json_body(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// `/0/private/{method}`: Kraken's private REST endpoints (only
/// `GetWebSocketsToken` exists here; the rest answer `EGeneral:Unknown method`).
pub(super) async fn private(
    State(sim): State<Arc<SimShared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = PrivateCall {
        peer: Some(peer.ip()),
        http_method: method.as_str(),
        path: uri.path(),
        api_key: header_str(&headers, "api-key"),
        api_sign: header_str(&headers, "api-sign"),
        content_type: header_str(&headers, "content-type"),
        body: &body,
    };
    // The delay comes first, as on a slow network: Kraken checks the nonce
    // when the call arrives, so delayed calls can be overtaken.
    let (fault, delay) = sim.state.take_fault(call.path);
    if !delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = sim.shutdown.cancelled() => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    }
    let reply = sim.state.answer(&call, fault);
    match reply {
        Reply::Json(value) => json_body(StatusCode::OK, value.to_string()),
        Reply::Raw(bytes) => json_body(StatusCode::OK, bytes),
        Reply::Html(status, html, retry_after) => {
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                [(header::CONTENT_TYPE, "text/html")],
                html,
            )
                .into_response();
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        Reply::Hang => {
            sim.shutdown.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

/// `GET /0/public/Time`, in Kraken's shape.
pub(super) async fn public_time() -> Response {
    let now = SystemTime::now();
    let unixtime = crate::clock::unix_secs(now);
    // Kraken's `rfc1123` looks like "Sun, 21 Mar 21 14:23:14 +0000" (a
    // two-digit year), from "Sun, 21 Mar 2021 14:23:14 GMT".
    let http = httpdate::fmt_http_date(now);
    let parts: Vec<&str> = http.split(' ').collect();
    let rfc1123 = match parts.as_slice() {
        [day, date, month, year, time, _gmt] => {
            format!(
                "{day} {date} {month} {} {time} +0000",
                &year[year.len().saturating_sub(2)..]
            )
        }
        _ => http.clone(),
    };
    json_body(
        StatusCode::OK,
        json!({ "error": [], "result": { "unixtime": unixtime, "rfc1123": rfc1123 } }).to_string(),
    )
}

/// `GET /0/public/SystemStatus`, in Kraken's shape.
pub(super) async fn public_system_status(State(sim): State<Arc<SimShared>>) -> Response {
    let timestamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let status = sim.state.system_status().as_str();
    json_body(
        StatusCode::OK,
        // Kraken's Get System Status: the advisory arrays are additive, empty
        // when no maintenance or incident is reported (none is, here).
        json!({ "error": [], "result": { "status": status, "timestamp": timestamp,
            "upcoming_maintenance": [], "emergency": [] } })
        .to_string(),
    )
}

/// Anything else under `/0/`: Kraken's answer to a method it does not know.
pub(super) async fn unknown_method(State(sim): State<Arc<SimShared>>, method: Method, uri: Uri) -> Response {
    sim.state
        .record_other(method.as_str(), uri.path(), "EGeneral:Unknown method");
    json_body(
        StatusCode::OK,
        json!({ "error": ["EGeneral:Unknown method"] }).to_string(),
    )
}

// ---- control API ---------------------------------------------------------

fn bad_request(message: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message.to_string() }))).into_response()
}

/// Why a control request was refused.
enum Refused {
    /// Not `Content-Type: application/json` (415): a browser page can send
    /// `text/plain` cross-origin without asking, never JSON.
    NotJson,
    /// The JSON did not fit (400).
    Bad(String),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::NotJson => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Json(json!({ "error": "control requests must be Content-Type: application/json" })),
            )
                .into_response(),
            Refused::Bad(message) => bad_request(message),
        }
    }
}

/// The simulator stands apart from the broker (tests/architecture.rs): its
/// own check, the same rule as `crate::http::is_json`.
fn require_json(headers: &HeaderMap) -> Result<(), Refused> {
    let json = header_str(headers, "content-type")
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if json { Ok(()) } else { Err(Refused::NotJson) }
}

/// A JSON body of `T`; where an empty body means something (`empty`), an
/// empty body needs no `Content-Type` (`curl -X POST URL` sends none),
/// unless a browser sent it (it names an `Origin`): a page elsewhere may
/// send an empty POST cross-origin without asking.
fn parse<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &Bytes, empty: Option<T>) -> Result<T, Refused> {
    if body.is_empty()
        && !headers.contains_key(axum::http::header::ORIGIN)
        && let Some(value) = empty
    {
        return Ok(value);
    }
    require_json(headers)?;
    serde_json::from_slice(body).map_err(|e| Refused::Bad(e.to_string()))
}

pub(super) async fn get_state(State(sim): State<Arc<SimShared>>) -> Json<Value> {
    let s = &sim.state;
    let keys: Vec<Value> = s.keys().iter().map(SimKey::public_view).collect();
    Json(json!({
        "token_ttl_secs": s.token_ttl().as_secs(),
        "tier": s.tier(),
        "system": s.system_status(),
        "keys": keys,
        "fault": s.fault(),
        "rest_url": sim.rest_url,
        "ws_url": sim.ws_url,
    }))
}

pub(super) async fn put_fault(State(sim): State<Arc<SimShared>>, headers: HeaderMap, body: Bytes) -> Response {
    match parse::<FaultSpec>(&headers, &body, None) {
        Ok(spec) => {
            sim.state.set_fault(spec);
            Json(json!({ "fault": sim.state.fault() })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

pub(super) async fn delete_fault(State(sim): State<Arc<SimShared>>) -> StatusCode {
    sim.state.clear_fault();
    StatusCode::NO_CONTENT
}

pub(super) async fn get_calls(State(sim): State<Arc<SimShared>>) -> Json<Value> {
    Json(json!({ "calls": sim.state.calls() }))
}

pub(super) async fn delete_calls(State(sim): State<Arc<SimShared>>) -> StatusCode {
    sim.state.clear_calls();
    StatusCode::NO_CONTENT
}

/// Issued tokens, each named by the first 8 hex characters of its SHA-256
/// (as the broker's logs name them), never by the token itself.
pub(super) async fn get_tokens(State(sim): State<Arc<SimShared>>) -> Json<Value> {
    let tokens: Vec<Value> = sim
        .state
        .tokens()
        .iter()
        .map(|t| {
            json!({
                "fingerprint": fingerprint(t.token.as_bytes()),
                "api_key": t.api_key,
                "issued_at_unix_ms": t.issued_at_unix_ms,
                "expires_at_unix_ms": t.expires_at_unix_ms,
                "revoked": t.revoked,
            })
        })
        .collect();
    Json(json!({ "tokens": tokens }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    /// The token to revoke; absent revokes every token.
    #[serde(default)]
    token: Option<String>,
}

pub(super) async fn revoke_tokens(State(sim): State<Arc<SimShared>>, headers: HeaderMap, body: Bytes) -> Response {
    match parse::<RevokeRequest>(&headers, &body, Some(RevokeRequest::default())) {
        Ok(request) => {
            let revoked = sim.state.revoke_tokens(request.token.as_deref());
            Json(json!({ "revoked": revoked })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TtlRequest {
    secs: u64,
}

pub(super) async fn put_token_ttl(State(sim): State<Arc<SimShared>>, headers: HeaderMap, body: Bytes) -> Response {
    match parse::<TtlRequest>(&headers, &body, None) {
        Ok(TtlRequest { secs }) if secs > 0 => {
            sim.state.set_token_ttl(Duration::from_secs(secs));
            Json(json!({ "token_ttl_secs": secs })).into_response()
        }
        Ok(_) => bad_request("secs must be positive"),
        Err(refused) => refused.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SystemRequest {
    status: SystemStatus,
}

/// `PUT /_sim/system`: `online`, `maintenance`, `cancel_only`, `post_only`.
pub(super) async fn put_system(State(sim): State<Arc<SimShared>>, headers: HeaderMap, body: Bytes) -> Response {
    match parse::<SystemRequest>(&headers, &body, None) {
        Ok(request) => {
            sim.state.set_system_status(request.status);
            // Every open WebSocket hears it on the status channel.
            let _ = sim.status_tx.send(request.status);
            Json(json!({ "system": request.status })).into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKeyRequest {
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    api_secret: Option<String>,
    #[serde(default)]
    otp: Option<SimOtp>,
    #[serde(default)]
    ws_permission: Option<bool>,
    #[serde(default)]
    trade_permission: Option<bool>,
    #[serde(default)]
    nonce_window: Option<u64>,
    #[serde(default)]
    valid_until: Option<String>,
    #[serde(default)]
    ip_allowlist: Option<Vec<String>>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
}

/// Adds a key; missing parts are generated. Answers the key's settings, and
/// the secret only when it was generated here (the caller needs it then).
pub(super) async fn post_key(State(sim): State<Arc<SimShared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match parse::<NewKeyRequest>(&headers, &body, Some(NewKeyRequest::default())) {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    let generated = SimKey::generate();
    let secret_generated = request.api_secret.is_none();
    let key = SimKey {
        api_key: request.api_key.unwrap_or(generated.api_key),
        api_secret: request.api_secret.unwrap_or(generated.api_secret),
        otp: request.otp,
        ws_permission: request.ws_permission.unwrap_or(true),
        trade_permission: request.trade_permission.unwrap_or(true),
        nonce_window: request.nonce_window.unwrap_or(0),
        valid_until: request.valid_until,
        ip_allowlist: request.ip_allowlist.unwrap_or_default(),
        permissions: request.permissions,
    };
    match sim.state.add_key(key.clone()) {
        Ok(()) => {
            let mut view = key.public_view();
            if secret_generated {
                view["api_secret"] = json!(key.api_secret);
            }
            (StatusCode::CREATED, Json(view)).into_response()
        }
        Err(e) => bad_request(e),
    }
}

pub(super) async fn reset_limits(State(sim): State<Arc<SimShared>>, headers: HeaderMap) -> Response {
    if let Err(refused) = require_json(&headers) {
        return refused.into_response();
    }
    sim.state.reset_limits();
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /_sim/ws/drop`: closes every open WebSocket connection, as a
/// network blip would, so engines can test their reconnect path.
pub(super) async fn drop_websockets(State(sim): State<Arc<SimShared>>, headers: HeaderMap) -> Response {
    if let Err(refused) = require_json(&headers) {
        return refused.into_response();
    }
    let dropped = sim.drop_tx.send(()).unwrap_or(0);
    Json(json!({ "dropped": dropped })).into_response()
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn an_empty_body_needs_no_content_type_unless_a_browser_sent_it() {
        let none = HeaderMap::new();
        let empty = Bytes::new();
        let revoke_all = parse::<RevokeRequest>(&none, &empty, Some(RevokeRequest::default()));
        assert!(
            revoke_all.is_ok_and(|r| r.token.is_none()),
            "curl -X POST URL revokes all"
        );
        let mut browser = HeaderMap::new();
        browser.insert(axum::http::header::ORIGIN, "https://elsewhere.example".parse().unwrap());
        assert!(matches!(
            parse::<RevokeRequest>(&browser, &empty, Some(RevokeRequest::default())),
            Err(Refused::NotJson)
        ));
        // A body still needs its JSON type, and where no body means nothing,
        // an empty one is refused.
        let body = Bytes::from_static(br#"{"token":"t"}"#);
        assert!(matches!(
            parse::<RevokeRequest>(&none, &body, Some(RevokeRequest::default())),
            Err(Refused::NotJson)
        ));
        assert!(parse::<TtlRequest>(&none, &empty, None).is_err());
    }
}
