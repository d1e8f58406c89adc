//! The simulator's REST surface: Kraken's `/0/private/*` and the control API
//! under `/_sim/`, a prefix Kraken never uses.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::SimShared;
use super::state::{FaultSpec, PrivateCall, Reply, SimKey, SimOtp};

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
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = PrivateCall {
        http_method: method.as_str(),
        path: uri.path(),
        api_key: header_str(&headers, "api-key"),
        api_sign: header_str(&headers, "api-sign"),
        content_type: header_str(&headers, "content-type"),
        body: &body,
    };
    // The delay comes first, as on a slow network: Kraken checks the nonce
    // when the call arrives, so delayed calls can be overtaken.
    let (fault, delay) = sim.state.take_fault();
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
        Reply::Html(status, html) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            [(header::CONTENT_TYPE, "text/html")],
            html,
        )
            .into_response(),
        Reply::Hang => {
            sim.shutdown.cancelled().await;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
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

pub(super) async fn get_state(State(sim): State<Arc<SimShared>>) -> Json<Value> {
    let s = &sim.state;
    Json(json!({
        "token_ttl_secs": s.token_ttl().as_secs(),
        "tier": s.tier(),
        "keys": s.keys(),
        "fault": s.fault(),
        "rest_url": sim.rest_url,
        "ws_url": sim.ws_url,
    }))
}

pub(super) async fn put_fault(State(sim): State<Arc<SimShared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultSpec>(&body) {
        Ok(spec) => {
            sim.state.set_fault(spec);
            Json(json!({ "fault": sim.state.fault() })).into_response()
        }
        Err(e) => bad_request(format!("not a fault: {e}")),
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

pub(super) async fn get_tokens(State(sim): State<Arc<SimShared>>) -> Json<Value> {
    Json(json!({ "tokens": sim.state.tokens() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeRequest {
    /// The token to revoke; absent revokes every token.
    #[serde(default)]
    token: Option<String>,
}

pub(super) async fn revoke_tokens(State(sim): State<Arc<SimShared>>, body: Bytes) -> Response {
    let request = if body.is_empty() {
        RevokeRequest { token: None }
    } else {
        match serde_json::from_slice::<RevokeRequest>(&body) {
            Ok(r) => r,
            Err(e) => return bad_request(e),
        }
    };
    let revoked = sim.state.revoke_tokens(request.token.as_deref());
    Json(json!({ "revoked": revoked })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TtlRequest {
    secs: u64,
}

pub(super) async fn put_token_ttl(State(sim): State<Arc<SimShared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<TtlRequest>(&body) {
        Ok(TtlRequest { secs }) if secs > 0 => {
            sim.state.set_token_ttl(Duration::from_secs(secs));
            Json(json!({ "token_ttl_secs": secs })).into_response()
        }
        Ok(_) => bad_request("secs must be positive"),
        Err(e) => bad_request(e),
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
}

/// Adds a key; missing parts are generated. Answers the whole key.
pub(super) async fn post_key(State(sim): State<Arc<SimShared>>, body: Bytes) -> Response {
    let request = if body.is_empty() {
        NewKeyRequest::default()
    } else {
        match serde_json::from_slice::<NewKeyRequest>(&body) {
            Ok(r) => r,
            Err(e) => return bad_request(e),
        }
    };
    let generated = SimKey::generate();
    let key = SimKey {
        api_key: request.api_key.unwrap_or(generated.api_key),
        api_secret: request.api_secret.unwrap_or(generated.api_secret),
        otp: request.otp,
        ws_permission: request.ws_permission.unwrap_or(true),
    };
    match sim.state.add_key(key.clone()) {
        Ok(()) => (StatusCode::CREATED, Json(json!(key))).into_response(),
        Err(e) => bad_request(e),
    }
}

pub(super) async fn reset_limits(State(sim): State<Arc<SimShared>>) -> StatusCode {
    sim.state.reset_limits();
    StatusCode::NO_CONTENT
}
