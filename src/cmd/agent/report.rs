//! `--report-listen ADDR`: a loopback endpoint through which an engine that
//! reads the token file reports the token Kraken rejected
//! (`ESession:Invalid session`, `Token(s) not found`). The agent holds the
//! consumer's identity, so it reports to the broker
//! (`POST /v1/token/invalidate`) and writes the new token before it
//! answers: when the engine's `POST /v1/report` returns, the file holds the
//! replacement. Loopback only and unauthenticated: it is shared by the
//! containers of one pod, which may read the file anyway.
//!
//! `POST /v1/report` with `Content-Type: application/json` and no body
//! reports the token the file holds; with `{"token": "..."}` it reports
//! that one only if the file still holds it (an engine that reread the file
//! after a refresh has nothing to report). Reports are taken one at a time,
//! and one that arrived before the file last changed has nothing left to
//! report: several engines reporting one token make one report.
//! Answers 200 `{"reported": bool, "expires_at": ...}`, 429 or 503 with
//! `Retry-After` when the broker says so, 502 when the broker refuses or
//! cannot be reached.
//!
//! Loopback is shared by the host's users and browsers where the agent runs
//! outside a pod: a request naming an `Origin`, a `Host` that is not a
//! loopback name (DNS rebinding), or a body type other than JSON (which a
//! page cannot send cross-origin without a preflight this endpoint never
//! answers) is refused. At most [`MAX_CONNECTIONS`] connections at once,
//! each with [`HEAD_TIMEOUT`] for its request head and [`CONNECTION_TIMEOUT`]
//! in all: a crowd of idle connections cannot use up the agent's files.

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
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection's whole life: its request, the broker's answer (30 s at
/// most) and the answer back.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

struct Reporter {
    consumer: Arc<Consumer>,
    out: Arc<Output>,
    /// One report at a time.
    reporting: tokio::sync::Mutex<()>,
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
        .with_state(Arc::new(Reporter {
            consumer,
            out,
            reporting: tokio::sync::Mutex::new(()),
        }));
    info!(%addr, "report endpoint listening: POST /v1/report when Kraken rejects the token");
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of files or the like: wait a little rather than spin.
                warn!(error = %e, "the report endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            drop(stream); // full: closed at once
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false);
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// Why a request is not one the pod's engine would send, if it is not.
fn foreign(headers: &axum::http::HeaderMap) -> Option<(StatusCode, &'static str)> {
    if headers.contains_key(header::ORIGIN) {
        return Some((
            StatusCode::FORBIDDEN,
            "a browser's request (it names an Origin) is refused",
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = host
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']').map(|(ip, _)| ip))
        .unwrap_or_else(|| host.rsplit_once(':').map_or(host, |(name, _)| name));
    let loopback =
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Some((
            StatusCode::FORBIDDEN,
            "the Host must be a loopback address or localhost",
        ));
    }
    if !crate::http::is_json(headers) {
        return Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json (with no body, or {\"token\": \"...\"})",
        ));
    }
    None
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

async fn report(State(r): State<Arc<Reporter>>, headers: axum::http::HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some((status, why)) = foreign(&headers) {
        return answer(status, serde_json::json!({"reported": false, "detail": why}), None);
    }
    // A report made before the file last changed has nothing left to report
    // (another engine's report, or a refresh, replaced the token).
    let seen = r.out.generation();
    let _one_at_a_time = r.reporting.lock().await;
    if r.out.generation() != seen {
        return answer(
            StatusCode::OK,
            serde_json::json!({"reported": false, "detail": "the file holds a newer token: read it again"}),
            None,
        );
    }
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
    if matches!(status.as_u16(), 429 | 503) {
        // The broker's own answer and wait: too many forced refreshes, or no
        // token now.
        return answer(
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            serde_json::json!({"reported": status.as_u16() == 503, "detail": detail_of(status, &text)}),
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
    match r.out.write_hooks_behind(&text).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_a_local_json_request_without_an_origin_is_taken() {
        let json = ("content-type", "application/json");
        for host in [
            "127.0.0.1:8181",
            "localhost:8181",
            "[::1]:8181",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert_eq!(foreign(&headers(&[("host", host), json])), None, "{host}");
        }
        for host in ["evil.example:8181", "10.0.0.1:8181", "", "[::1"] {
            assert_eq!(
                foreign(&headers(&[("host", host), json])).map(|(s, _)| s),
                Some(StatusCode::FORBIDDEN),
                "{host}"
            );
        }
        let browser = headers(&[("host", "127.0.0.1:8181"), json, ("origin", "https://evil.example")]);
        assert_eq!(foreign(&browser).map(|(s, _)| s), Some(StatusCode::FORBIDDEN));
        for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"] {
            let form = headers(&[("host", "127.0.0.1:8181"), ("content-type", kind)]);
            assert_eq!(
                foreign(&form).map(|(s, _)| s),
                Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{kind}"
            );
        }
        let untyped = headers(&[("host", "127.0.0.1:8181")]);
        assert_eq!(
            foreign(&untyped).map(|(s, _)| s),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
    }
}
