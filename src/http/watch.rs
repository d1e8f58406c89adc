//! `GET /v1/token/watch?account=NAME`: a Server-Sent Events stream of the
//! account's token. The current token at once (event `token`, the same JSON
//! as `GET /v1/token`), then each new one as the broker holds it (a refresh,
//! an invalidation), an `unavailable` event (problem JSON) when none good
//! enough is held and refreshing is failing (or a refresh under way has not
//! brought one within `REFRESH_GRACE`), and a comment line every
//! [`KEEP_ALIVE`] through proxies.
//!
//! A stream holds no queue: on each wake it reads what is published now, so
//! a reader too slow to keep up gets the latest token, never a backlog, and
//! the broker never waits for it (the socket's own buffer is the only
//! buffer). It ends when the broker shuts down, when a reload removes the
//! consumer, its identity, or its grant of the account, and, for a consumer
//! proven by a ServiceAccount token, after `[kubernetes] cache_ttl` (as long
//! as a review is trusted): the client reconnects with its current token, so
//! a deleted pod's stream stops as soon as its `GET` would.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::api::{parse_query, record_served, token_json};
use super::auth::Authenticated;
use super::problem::{ApiError, problem_json};
use super::{AppState, Consumer, Grant, Held, ServeTable};
use crate::audit::Via;
use crate::token::Health;

/// Watch streams one consumer may hold open at once.
pub const MAX_WATCHERS_PER_CONSUMER: usize = 64;
/// A comment line this often keeps idle proxies from closing the stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// What `Retry-After` says to a consumer at its watcher limit.
const WATCHERS_RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a stream waits for a refresh under way (no token held, none
/// failed: an invalidation, a cold start) before it says `unavailable`.
/// A failed refresh says so at once.
const REFRESH_GRACE: Duration = Duration::from_secs(5);

/// What the reloadable parts of the broker tell open streams.
#[derive(Clone)]
pub struct Streams {
    /// Cancelled when the broker begins to shut down: every stream ends.
    pub stop: CancellationToken,
    /// Bumped whenever a new serving table is in force.
    pub tables: Arc<watch::Sender<u64>>,
    /// Cancelled after the drain on shutdown: relay connections close (1001).
    pub relays_stop: CancellationToken,
    /// The open relay connections, to wait for them at shutdown.
    pub relays: tokio_util::task::TaskTracker,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            stop: CancellationToken::new(),
            tables: Arc::new(watch::channel(0).0),
            relays_stop: CancellationToken::new(),
            relays: tokio_util::task::TaskTracker::new(),
        }
    }
}

/// What a stream sent last, so it sends only changes.
#[derive(PartialEq, Eq)]
enum Sent {
    Nothing,
    Token([u8; 32]),
    Unavailable,
}

struct Watcher {
    table: Arc<ServeTable>,
    consumer: Arc<Consumer>,
    account: String,
    peer: Option<std::net::SocketAddr>,
    tables: Arc<ArcSwap<ServeTable>>,
    table_changes: watch::Receiver<u64>,
    changes: watch::Receiver<()>,
    stop: CancellationToken,
    sent: Sent,
    /// Since when no token is held while no refresh has failed.
    waiting_since: Option<Instant>,
    /// When the identity must be proven again (a ServiceAccount token is
    /// trusted as long as a review is: `cache_ttl`); the stream ends then and
    /// the client reconnects with its current token.
    reprove_at: Option<Instant>,
    _permit: OwnedSemaphorePermit,
    /// `watch_streams{account}`, held up while the stream lives.
    _open: Held,
}

impl Watcher {
    /// After a reload: the same consumer (name and identity) still granted
    /// the account, in the new table; otherwise the stream ends.
    fn follow_reload(&mut self) -> bool {
        let table = self.tables.load_full();
        let Some(consumer) = table
            .consumers
            .iter()
            .find(|c| c.name == self.consumer.name && c.identity == self.consumer.identity)
            .cloned()
        else {
            return false;
        };
        let Some(grant) = consumer.grants.iter().find(|g| g.account == self.account) else {
            return false;
        };
        self.changes = grant.handle.changes();
        self.consumer = consumer;
        self.table = table;
        true
    }

    /// The next event, waiting for a change; `None` ends the stream.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let now = Instant::now();
            let consumer = Arc::clone(&self.consumer);
            let grant: &Grant = consumer.grants.iter().find(|g| g.account == self.account)?;
            let published = grant.handle.published();
            let need = published.rule.need(Duration::ZERO);
            match published.servable(Duration::ZERO, now) {
                Some(token) if self.sent != Sent::Token(token.sha256) => {
                    self.waiting_since = None;
                    self.sent = Sent::Token(token.sha256);
                    record_served(&self.table, &consumer, grant, self.peer, token, Via::Watch);
                    let json = token_json(token, &self.account, &self.table.ws_url, now);
                    return Some(
                        Event::default()
                            .event(crate::sse::TOKEN_EVENT)
                            .data(String::from_utf8_lossy(&json)),
                    );
                }
                // None held but none failing either: a refresh is under way
                // (an invalidation, a cold start). Wait for it, a while.
                None if self.sent != Sent::Unavailable
                    && matches!(published.health, Health::Healthy | Health::Starting)
                    && *self.waiting_since.get_or_insert(now) + REFRESH_GRACE > now => {}
                None if self.sent != Sent::Unavailable => {
                    self.waiting_since = None;
                    self.sent = Sent::Unavailable;
                    let detail = format!(
                        "no token good enough is held for account `{}` now; this stream sends one as soon as the broker has it",
                        self.account
                    );
                    let json = problem_json(StatusCode::SERVICE_UNAVAILABLE, &detail);
                    return Some(
                        Event::default()
                            .event(crate::sse::UNAVAILABLE_EVENT)
                            .data(String::from_utf8_lossy(&json)),
                    );
                }
                _ => {}
            }
            // The held token stops being servable with time alone.
            let unservable_in = published
                .token
                .as_ref()
                .filter(|t| t.lasts(need, now))
                .map(|t| t.remaining(now).saturating_sub(need) + Duration::from_millis(1))
                .or_else(|| {
                    self.waiting_since
                        .map(|since| (since + REFRESH_GRACE).saturating_duration_since(now) + Duration::from_millis(1))
                });
            drop(published);
            let expiry = async {
                match unservable_in {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            let reprove = async {
                match self.reprove_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None; // the account's refresher ended
                    }
                }
                changed = self.table_changes.changed() => {
                    if changed.is_err() || !self.follow_reload() {
                        return None;
                    }
                }
                () = expiry => {}
                () = reprove => return None,
            }
        }
    }
}

/// `GET /v1/token/watch?account=NAME`
pub async fn watch(
    auth: Authenticated,
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    auth.may_hold_tokens()?;
    let query = parse_query(raw.as_deref(), false)?;
    let grant = auth.grant(query.account.as_deref())?;
    let account = grant.account.clone();
    let Ok(permit) = Arc::clone(&auth.consumer.watchers).try_acquire_owned() else {
        auth.consumer.rate_limited.inc();
        return Err(ApiError::RateLimited {
            retry_after: WATCHERS_RETRY_AFTER,
            detail: format!(
                "consumer `{}` has {MAX_WATCHERS_PER_CONSUMER} watch streams open already",
                auth.consumer.name
            ),
        });
    };
    // At a cold start, wait for the first token as GET would (bounded by the
    // refresher's answer deadline); the stream then reports what it got.
    if grant
        .handle
        .published()
        .servable(Duration::ZERO, Instant::now())
        .is_none()
    {
        let _ = grant.handle.want_as(&auth.consumer.name, Duration::ZERO).await;
    }
    let reprove_at = auth.reprove_at;
    let open = Held::enter(state.metrics.consumers().watch_streams(&account));
    let mut changes = grant.handle.changes();
    changes.mark_unchanged();
    let watcher = Watcher {
        table: Arc::clone(&auth.table),
        consumer: Arc::clone(&auth.consumer),
        account,
        peer: auth.peer,
        tables: Arc::clone(&state.table),
        table_changes: state.streams.tables.subscribe(),
        changes,
        stop: state.streams.stop.clone(),
        sent: Sent::Nothing,
        waiting_since: None,
        reprove_at,
        _permit: permit,
        _open: open,
    };
    Ok(Sse::new(events(watcher))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

fn events(watcher: Watcher) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(watcher, |mut w| async move {
        let event = w.next().await?;
        Some((Ok(event), w))
    })
}
