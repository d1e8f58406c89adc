//! `--report-listen ADDR`: a loopback endpoint through which an engine that
//! reads the token file reports the token Kraken rejected
//! (`ESession:Invalid session`, `Token(s) not found`). The agent holds the
//! consumer's identity, so it reports to the broker
//! (`POST /v1/token/invalidate`) and writes the new token before it
//! answers: when the engine's `POST /v1/report` returns, the file holds the
//! replacement. Loopback only and unauthenticated: it is shared by the
//! containers of one pod, which may read the file anyway.
//!
//! `POST /v1/report` with no body reports the token the file holds; with
//! `{"token": "..."}` it reports that one only if the file still holds it
//! (an engine that reread the file after a refresh has nothing to report).
//! Answers 200 `{"reported": bool, "expires_at": ...}`, 503 with
//! `Retry-After` when the broker has no token now, 502 when the broker
//! refuses or cannot be reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::output::{Output, Written};
use crate::cmd::Error;
use crate::cmd::client::{ANSWER_BODY_TIMEOUT, Consumer, detail_of, error_chain, read_answer, retry_after};

/// The largest report body read: a token's JSON.
const MAX_REPORT_BYTES: usize = 4096;

struct Reporter {
    consumer: Arc<Consumer>,
    out: Arc<Output>,
}

/// Binds `addr` (loopback only) at once, so a port in use fails the start.
pub(super) async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    if !addr.ip().is_loopback() {
        return Err(Error::Usage(format!(
            "--report-listen {addr}: the report endpoint has no authentication, so it listens on loopback only (e.g. 127.0.0.1:{})",
            addr.port()
        )));
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("--report-listen {addr}: {e}")))
}

/// Serves reports until `stop`.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    consumer: Arc<Consumer>,
    out: Arc<Output>,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let app = axum::Router::new()
        .route("/v1/report", post(report))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(Arc::new(Reporter { consumer, out }));
    info!(%addr, "report endpoint listening: POST /v1/report when Kraken rejects the token");
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "the report endpoint failed");
    }
}

fn answer(status: StatusCode, body: serde_json::Value, retry: Option<Duration>) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Some(wait) = retry
        && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn report(State(r): State<Arc<Reporter>>, body: axum::body::Bytes) -> Response {
    let Some(current) = r.out.current() else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"reported": false, "detail": "the agent has written no token yet"}),
            Some(Duration::from_secs(1)),
        );
    };
    if !body.is_empty() {
        let named = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_owned));
        let Some(named) = named else {
            return answer(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"reported": false, "detail": "the body must be empty or {\"token\": \"...\"}"}),
                None,
            );
        };
        if !bool::from(named.as_bytes().ct_eq(current.expose().as_bytes())) {
            return answer(
                StatusCode::OK,
                serde_json::json!({"reported": false, "detail": "the file holds a newer token: read it again"}),
                None,
            );
        }
    }
    let request = match r.consumer.post(r.consumer.url("/v1/token/invalidate", &[])) {
        Ok(request) => request
            .json(&serde_json::json!({"token": current.expose()}))
            .timeout(Duration::from_secs(30)),
        Err(e) => return broken(&e.to_string()),
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            return broken(&format!(
                "cannot reach the broker at {}: {}",
                r.consumer.origin(),
                error_chain(&e.without_url())
            ));
        }
    };
    let (status, retry) = (response.status(), retry_after(&response));
    let text = match read_answer(response, ANSWER_BODY_TIMEOUT).await {
        Ok(text) => text,
        Err(why) => return broken(&format!("the broker's answer cannot be read: {why}")),
    };
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"reported": true, "detail": detail_of(status, &text)}),
            retry.or(Some(Duration::from_secs(1))),
        );
    }
    if !status.is_success() {
        return broken(&format!(
            "the broker answered HTTP {}: {}",
            status.as_u16(),
            detail_of(status, &text)
        ));
    }
    match r.out.write(&text).await {
        Ok(Written::Yes | Written::Unchanged) => {
            let expires_at = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["expires_at"].as_str().map(str::to_owned));
            info!("a rejected token was reported; the file holds the replacement");
            answer(
                StatusCode::OK,
                serde_json::json!({"reported": true, "expires_at": expires_at}),
                None,
            )
        }
        Ok(Written::NoToken) => broken("the broker's answer holds no token"),
        Err(why) => broken(&why),
    }
}

fn broken(why: &str) -> Response {
    warn!(%why, "a report could not be passed on");
    answer(
        StatusCode::BAD_GATEWAY,
        serde_json::json!({"reported": false, "detail": why}),
        None,
    )
}
