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
use crate::identity::service_account::KeysState;
use crate::token::{Health, Published};

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}

#[derive(Serialize)]
struct AccountReadiness {
    /// A token can be served for this account now.
    ready: bool,
    /// `serving`, `starting`, `refreshing`, `failing`, `rejected` or `locked_out`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct KrakenReadiness {
    /// RFC 3339 end of a lockout that holds every account's calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    lockout_until: Option<String>,
    /// The account the lockout was answered to.
    #[serde(skip_serializing_if = "Option::is_none")]
    lockout_account: Option<String>,
    rejected_calls_last_15m: u32,
    max_rejected_calls: u32,
}

/// ServiceAccount token checks, with `[kubernetes]`.
#[derive(Serialize)]
struct KubernetesReadiness {
    /// `loaded`: forged tokens are refused without a TokenReview;
    /// `pending` (just started) or `unreadable`: every token that passes
    /// the claim checks is reviewed.
    signing_keys: &'static str,
    keys: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl KubernetesReadiness {
    fn of(state: KeysState) -> Self {
        match state {
            KeysState::Pending => Self {
                signing_keys: "pending",
                keys: 0,
                error: None,
            },
            KeysState::Loaded { keys, .. } => Self {
                signing_keys: "loaded",
                keys,
                error: None,
            },
            KeysState::Failing { keys, error } => Self {
                signing_keys: "unreadable",
                keys,
                error: Some(error),
            },
        }
    }
}

#[derive(Serialize)]
struct Readiness {
    status: &'static str,
    /// Why this replica is (not) taking traffic, in words.
    why: String,
    accounts: BTreeMap<String, AccountReadiness>,
    kraken: KrakenReadiness,
    #[serde(skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesReadiness>,
}

fn why_not_servable(published: &Published, now: Instant) -> String {
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
            "Kraken locked out this broker's address; next attempt in {} s",
            until.saturating_duration_since(now).as_secs()
        ),
    };
    format!("{short}{health}")
}

/// An account's state, by whose making its failure is.
fn state_of(published: &Published, servable: bool) -> &'static str {
    match (&published.health, servable) {
        (_, true) => "serving",
        (Health::Starting, false) => "starting",
        (Health::Healthy, false) => "refreshing",
        (Health::Failing { permanent: true, .. }, false) => "rejected",
        (Health::Failing { .. }, false) => "failing",
        (Health::CircuitOpen { .. }, false) => "locked_out",
    }
}

/// `GET /readyz`: whether this replica should receive traffic.
///
/// The policy (runbooks.md, "Readiness"): 503 until every account's first
/// refresh has been tried; after that 503 only when no account can be served
/// and every one fails by this replica's own making (its key rejected,
/// expired, or lacking permission), so another replica may serve. A failure
/// every replica would share (a Kraken outage, a rate limit, a lockout, short
/// tokens) keeps it ready: taking every replica out of the Service would turn
/// the documented 503 with `Retry-After` into refused connections. The body
/// names every account's state and reason whatever the status.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let table = state.table.load();
    let now = Instant::now();
    let mut accounts = BTreeMap::new();
    for (name, handle) in &table.accounts {
        let published = handle.published();
        let servable = published.servable(Duration::ZERO, now);
        let readiness = AccountReadiness {
            ready: servable.is_some(),
            state: state_of(&published, servable.is_some()),
            expires_in: servable.map(|t| t.remaining(now).as_secs()),
            reason: servable.is_none().then(|| why_not_servable(&published, now)),
        };
        accounts.insert(name.clone(), readiness);
    }
    let starting: Vec<&str> = accounts
        .iter()
        .filter(|(_, a)| a.state == "starting")
        .map(|(n, _)| n.as_str())
        .collect();
    let all_own_fault = !accounts.is_empty() && accounts.values().all(|a| a.state == "rejected");
    let (ready, why) = if !starting.is_empty() {
        (
            false,
            format!("the first refresh of {} is not done yet", starting.join(", ")),
        )
    } else if all_own_fault {
        (
            false,
            "every account's key is rejected by Kraken (this replica's own keys): another replica may serve".to_owned(),
        )
    } else if accounts.values().all(|a| a.ready) {
        (true, "every account can be served".to_owned())
    } else {
        (
            true,
            "some accounts cannot be served now, for reasons other replicas share or that pass: consumers get 503 with Retry-After".to_owned(),
        )
    };
    let gate = state.gate.status(now);
    let kraken = KrakenReadiness {
        lockout_until: gate.lockout.as_ref().map(|(until, _)| {
            let left = until.saturating_duration_since(now);
            humantime::format_rfc3339_seconds(state.clock.now() + left).to_string()
        }),
        lockout_account: gate.lockout.map(|(_, account)| account),
        rejected_calls_last_15m: gate.rejected_in_window,
        max_rejected_calls: gate.max_rejected_calls,
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        why,
        accounts,
        kraken,
        kubernetes: table.reviewer.as_ref().map(|r| KubernetesReadiness::of(r.keys_state())),
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
    // The gate's window slides without events: read it at scrape time.
    let now = Instant::now();
    let gate = state.gate.status(now);
    let lockout_until = gate.lockout.as_ref().map_or(0.0, |(until, _)| {
        crate::clock::unix_secs_f64(state.clock.now() + until.saturating_duration_since(now))
    });
    state
        .metrics
        .gate()
        .set(lockout_until, gate.rejected_in_window, gate.max_rejected_calls);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}
