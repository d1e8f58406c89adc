//! The admin endpoints, on their own listener and never serving tokens:
//! `/healthz`, `/readyz`, `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::time::Instant;

use super::AppState;
use crate::token::{Health, Published};

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}

#[derive(Serialize)]
struct AccountReadiness {
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    accounts: BTreeMap<String, AccountReadiness>,
}

fn why_not_ready(published: &Published, now: Instant) -> String {
    let short = published
        .token
        .as_ref()
        .map(|t| {
            format!(
                "the held token has {} s left, below min_served_ttl; ",
                t.remaining(now).as_secs()
            )
        })
        .unwrap_or_default();
    let health = match &published.health {
        Health::Starting => "the first refresh is in progress".to_owned(),
        Health::Healthy => "a refresh is in progress".to_owned(),
        Health::Failing {
            reason,
            detail,
            consecutive,
            next_attempt,
            permanent,
        } => format!(
            "refresh failing ({reason}, {consecutive} in a row{}): {detail}; next attempt in {} s",
            if *permanent { ", needs an operator" } else { "" },
            next_attempt.saturating_duration_since(now).as_secs()
        ),
        Health::CircuitOpen { until } => format!(
            "Kraken locked the key out; next attempt in {} s",
            until.saturating_duration_since(now).as_secs()
        ),
    };
    format!("{short}{health}")
}

/// `GET /readyz`: 200 when every account holds a token with at least
/// `min_served_ttl` left, else 503 naming the accounts that are not and why.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let table = state.table.load();
    let now = Instant::now();
    let mut accounts = BTreeMap::new();
    for (name, handle) in &table.accounts {
        let published = handle.published();
        let readiness = match published.servable(Duration::ZERO, now) {
            Some(token) => AccountReadiness {
                ready: true,
                expires_in: Some(token.remaining(now).as_secs()),
                reason: None,
            },
            None => AccountReadiness {
                ready: false,
                expires_in: None,
                reason: Some(why_not_ready(&published, now)),
            },
        };
        accounts.insert(name.clone(), readiness);
    }
    let ready = accounts.values().all(|a| a.ready);
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        accounts,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}
