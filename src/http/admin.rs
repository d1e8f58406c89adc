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
use crate::kraken::Verdict;
use crate::token::{Health, KeyReport, Published};

/// `GET /healthz`: 200 while the process serves.
pub async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#).into_response()
}

/// Whether this replica takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ready,
    NotReady,
}

/// An account's state, by whose making its failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum AccountState {
    /// A token can be served now.
    Serving,
    /// The first refresh is not done.
    Starting,
    /// The held token is too short and a refresh is in flight.
    Refreshing,
    /// Refreshes fail for a reason that passes or every replica shares.
    Failing,
    /// Kraken refuses this replica's own key: an operator must act.
    Rejected,
    /// Kraken locked out this broker's address.
    LockedOut,
}

#[derive(Serialize)]
struct AccountReadiness {
    /// A token can be served for this account now.
    ready: bool,
    state: AccountState,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
    /// While the held token is served: how its refresh goes when it is not
    /// going well (`failing`, `rejected`, `locked_out`), with the reason in
    /// `reason`; absent while refreshes succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    refreshing: Option<AccountState>,
    /// Why the account cannot be served, or why its refresh fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// What Kraken says of the account's key (`GetApiKeyInfo`).
    key: KeyReadiness,
}

/// An account's key as Kraken last reported it: never the key, the secret
/// or the account's IBAN.
#[derive(Serialize, Default)]
struct KeyReadiness {
    /// `usable`, `missing_ws_permission`, `too_powerful`; `unknown` until
    /// Kraken has answered.
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    permissions: Option<Vec<String>>,
    /// The permissions held that `forbid_permissions` refuses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    forbidden_held: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    /// RFC 3339; absent: the key does not expire (or is not read yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    valid_until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce_window: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_allowlist: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used: Option<String>,
    /// When Kraken last answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    checked_at: Option<String>,
    /// Times another signer was seen using the key since start.
    foreign_uses: u64,
    /// Why the last GetApiKeyInfo failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl KeyReadiness {
    fn of(report: &KeyReport) -> Self {
        let (verdict, forbidden_held) = match &report.verdict {
            None => ("unknown", Vec::new()),
            Some(Verdict::Usable) => ("usable", Vec::new()),
            Some(Verdict::MissingWsPermission) => ("missing_ws_permission", Vec::new()),
            Some(Verdict::TooPowerful(held)) => ("too_powerful", held.clone()),
        };
        let mut view = Self {
            verdict,
            forbidden_held,
            foreign_uses: report.foreign_uses,
            error: report.error.clone(),
            ..Self::default()
        };
        if let Some((info, at)) = &report.info {
            view.permissions = Some(info.permissions.clone());
            view.name = Some(info.name.clone());
            view.valid_until = info.valid_until.map(rfc3339);
            view.nonce_window = Some(info.nonce_window);
            view.ip_allowlist = Some(info.ip_allowlist.clone());
            view.last_used = info.last_used.map(rfc3339);
            view.checked_at = Some(rfc3339(*at));
        }
        view
    }
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
    signing_keys: SigningKeys,
    keys: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum SigningKeys {
    Pending,
    Loaded,
    Unreadable,
}

impl KubernetesReadiness {
    fn of(state: KeysState) -> Self {
        match state {
            KeysState::Pending => Self {
                signing_keys: SigningKeys::Pending,
                keys: 0,
                error: None,
            },
            KeysState::Loaded { keys, .. } => Self {
                signing_keys: SigningKeys::Loaded,
                keys,
                error: None,
            },
            KeysState::Failing { keys, error } => Self {
                signing_keys: SigningKeys::Unreadable,
                keys,
                error: Some(error.to_string()),
            },
        }
    }
}

#[derive(Serialize)]
struct Readiness {
    status: Status,
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
        failing => refresh_trouble(failing, now).unwrap_or_default(),
    };
    format!("{short}{health}")
}

/// What goes wrong with an account's refreshes, in words; `None` while they
/// succeed (or the first is under way).
fn refresh_trouble(health: &Health, now: Instant) -> Option<String> {
    Some(match health {
        Health::Starting | Health::Healthy => return None,
        Health::Failing {
            reason,
            detail,
            consecutive,
            next_attempt,
            permanent,
            hint,
        } => format!(
            "refresh failing ({reason}, {consecutive} in a row{}): {detail}; next attempt in {} s{}",
            if *permanent { ", needs an operator" } else { "" },
            next_attempt.saturating_duration_since(now).as_secs(),
            hint.map(|h| format!("; fix: {h}")).unwrap_or_default()
        ),
        Health::CircuitOpen { until } => format!(
            "Kraken locked out this broker's address; next attempt in {} s",
            until.saturating_duration_since(now).as_secs()
        ),
    })
}

impl AccountState {
    fn of(published: &Published, servable: bool) -> Self {
        match (&published.health, servable) {
            (_, true) => Self::Serving,
            (Health::Starting, false) => Self::Starting,
            (Health::Healthy, false) => Self::Refreshing,
            (Health::Failing { permanent: true, .. }, false) => Self::Rejected,
            (Health::Failing { .. }, false) => Self::Failing,
            (Health::CircuitOpen { .. }, false) => Self::LockedOut,
        }
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
    let accounts: BTreeMap<String, AccountReadiness> = table
        .accounts
        .iter()
        .map(|(name, handle)| (name.clone(), AccountReadiness::of(&handle.published(), now)))
        .collect();
    let (status, why) = verdict(&accounts);
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
        status,
        why,
        accounts,
        kraken,
        kubernetes: table.reviewer.as_ref().map(|r| KubernetesReadiness::of(r.keys_state())),
    };
    let code = match status {
        Status::Ready => StatusCode::OK,
        Status::NotReady => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, axum::Json(body)).into_response()
}

impl AccountReadiness {
    fn of(published: &Published, now: Instant) -> Self {
        let servable = published.servable(Duration::ZERO, now);
        // While the held token is served, a failing refresh is shown too:
        // the alert fires then, minutes before the token runs out.
        let (refreshing, reason) = match servable {
            Some(_) => {
                let trouble = refresh_trouble(&published.health, now);
                (trouble.is_some().then(|| AccountState::of(published, false)), trouble)
            }
            None => (None, Some(why_not_servable(published, now))),
        };
        Self {
            ready: servable.is_some(),
            state: AccountState::of(published, servable.is_some()),
            expires_in: servable.map(|t| t.remaining(now).as_secs()),
            refreshing,
            reason,
            key: KeyReadiness::of(&published.key),
        }
    }
}

/// The readiness policy applied to the accounts' states, with its reason.
fn verdict(accounts: &BTreeMap<String, AccountReadiness>) -> (Status, String) {
    let starting: Vec<&str> = accounts
        .iter()
        .filter(|(_, a)| a.state == AccountState::Starting)
        .map(|(n, _)| n.as_str())
        .collect();
    if !starting.is_empty() {
        return (
            Status::NotReady,
            format!("the first refresh of {} is not done yet", starting.join(", ")),
        );
    }
    if !accounts.is_empty() && accounts.values().all(|a| a.state == AccountState::Rejected) {
        return (
            Status::NotReady,
            "every account's key is rejected by Kraken (this replica's own keys): another replica may serve".to_owned(),
        );
    }
    if accounts.values().all(|a| a.ready) {
        return (Status::Ready, "every account can be served".to_owned());
    }
    (
        Status::Ready,
        "some accounts cannot be served now, for reasons other replicas share or that pass: consumers get 503 with Retry-After".to_owned(),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn account(state: AccountState) -> AccountReadiness {
        AccountReadiness {
            ready: state == AccountState::Serving,
            state,
            expires_in: None,
            refreshing: None,
            reason: None,
            key: KeyReadiness::default(),
        }
    }

    fn verdict_of(states: &[AccountState]) -> Status {
        let accounts = states
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("a{i}"), account(*s)))
            .collect();
        verdict(&accounts).0
    }

    #[test]
    fn the_states_keep_their_documented_names() {
        let names: Vec<String> = [
            AccountState::Serving,
            AccountState::Starting,
            AccountState::Refreshing,
            AccountState::Failing,
            AccountState::Rejected,
            AccountState::LockedOut,
        ]
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
        assert_eq!(
            names,
            [
                r#""serving""#,
                r#""starting""#,
                r#""refreshing""#,
                r#""failing""#,
                r#""rejected""#,
                r#""locked_out""#
            ]
        );
        assert_eq!(serde_json::to_string(&Status::NotReady).unwrap(), r#""not_ready""#);
        assert_eq!(
            serde_json::to_string(&SigningKeys::Unreadable).unwrap(),
            r#""unreadable""#
        );
    }

    #[test]
    fn not_ready_only_while_starting_or_when_every_key_is_rejected() {
        use AccountState::*;
        assert_eq!(verdict_of(&[Serving, Starting]), Status::NotReady);
        assert_eq!(verdict_of(&[Rejected, Rejected]), Status::NotReady);
        assert_eq!(verdict_of(&[Rejected, Failing]), Status::Ready);
        assert_eq!(verdict_of(&[LockedOut]), Status::Ready);
        assert_eq!(verdict_of(&[Serving, Rejected]), Status::Ready);
        assert_eq!(verdict_of(&[]), Status::Ready);
    }
}
