//! `GET /v1/relay?account=NAME`: engines trade through the broker and never
//! hold a token.
//!
//! A WebSocket upgrade on the consumer listener, proven as `/v1/token` is.
//! The consumer speaks Kraken's WebSocket v2 without tokens; for each relay
//! connection the broker opens one connection to `[kraken] ws_url` and
//! relays frames both ways ([`session`]). On every request whose method
//! needs a token it sets `params.token` to the account's current token
//! (overwriting any the consumer sent); a request outside the consumer's
//! `relay.allow` is answered by the broker in Kraken's error shape and never
//! reaches Kraken. The token is never in a frame sent to the consumer (each
//! frame is scanned for the tokens this connection injected), a log line or
//! the audit trail.
//!
//! Bounds: `relay.max_connections` per consumer; frames from the consumer
//! up to [`MAX_CONSUMER_FRAME`]; [`CONSUMER_QUEUE`] messages waiting for a
//! consumer that does not read (then it is closed, as Kraken closes slow
//! readers), besides the listener's write-stall deadline. A connection ends
//! with code 1008 when a reload revokes the consumer, its grant of the
//! account or a method it used, or its proof of identity lapses; with 1001
//! after the broker's drain on shutdown; with Kraken's own code when Kraken
//! closes.

mod audit;
mod injected;
pub mod metrics;
mod session;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::response::Response;
use tracing::{debug, warn};

use super::AppState;
use super::api::parse_query;
use super::auth::Authenticated;
use super::problem::ApiError;
use crate::config::Identity;
use crate::secret::SecretString;

/// The largest frame a consumer may send (Kraken's requests are small: a
/// `batch_add` of 15 orders is a few KiB). A larger one closes the
/// connection with 1009.
pub const MAX_CONSUMER_FRAME: usize = 64 * 1024;
/// Messages waiting for a consumer that does not read; past this it is
/// closed with 1008.
pub const CONSUMER_QUEUE: usize = 1024;
/// What `Retry-After` says to a consumer at its relay connection limit.
const LIMIT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// What `Retry-After` says when Kraken's WebSocket cannot be reached.
const UNREACHABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why the relay refused a request or ended a connection: the `reason` of
/// `relay_refused_total`, a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A request outside the consumer's `relay.allow`.
    NotAllowed,
    /// A `relay_only` consumer asked for a token.
    RelayOnly,
    /// The consumer had `relay.max_connections` open already.
    ConnectionLimit,
    /// A frame that is not a JSON request with a `method`.
    Malformed,
    /// A frame over [`MAX_CONSUMER_FRAME`].
    TooLarge,
    /// No token could be had for a request that needs one.
    NoToken,
    /// Ended by a reload, or the consumer's proof of identity lapsed.
    Revoked,
    /// The consumer read too slowly.
    SlowReader,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::NotAllowed,
        Refusal::RelayOnly,
        Refusal::ConnectionLimit,
        Refusal::Malformed,
        Refusal::TooLarge,
        Refusal::NoToken,
        Refusal::Revoked,
        Refusal::SlowReader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::RelayOnly => "relay_only",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::NoToken => "no_token",
            Refusal::Revoked => "revoked",
            Refusal::SlowReader => "slow_reader",
        }
    }
}

/// `GET /v1/relay?account=NAME`
pub async fn relay(
    auth: Authenticated,
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let query = parse_query(raw.as_deref(), false)?;
    let grant = auth.grant(query.account.as_deref())?;
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::BadRequest(
            "GET /v1/relay is a WebSocket upgrade: send `Connection: Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key`".into(),
        ));
    };
    if state.streams.stop.is_cancelled() {
        return Err(ApiError::Unavailable {
            retry_after: Duration::from_secs(1),
            detail: "the broker is shutting down: connect to another replica".into(),
        });
    }
    let consumer = Arc::clone(&auth.consumer);
    let Ok(permit) = Arc::clone(&consumer.relays).try_acquire_owned() else {
        state.metrics.relay().refused(&consumer.name, Refusal::ConnectionLimit);
        return Err(ApiError::RateLimited {
            retry_after: LIMIT_RETRY_AFTER,
            detail: format!(
                "consumer `{}` has {} relay connections open already (relay.max_connections)",
                consumer.name, consumer.relay.max_connections
            ),
        });
    };
    // Kraken first: an engine that cannot be relayed hears it as an HTTP
    // answer, not as a WebSocket that closes at once.
    let ws_url = auth.table.ws_url.clone();
    let kraken = match upstream::connect(&ws_url).await {
        Ok(socket) => socket,
        Err(error) => {
            warn!(%error, url = %ws_url, consumer = %consumer.name, "relay: Kraken's WebSocket cannot be reached");
            return Err(ApiError::Unavailable {
                retry_after: UNREACHABLE_RETRY_AFTER,
                detail: format!("Kraken's WebSocket ({ws_url}) cannot be reached now"),
            });
        }
    };
    // A ServiceAccount token is checked again while the relay lasts.
    let bearer = match consumer.identity {
        Identity::ServiceAccount { .. } => headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(SecretString::new),
        _ => None,
    };
    let session = session::Session::new(session::Start {
        state: state.clone(),
        table: Arc::clone(&auth.table),
        consumer,
        account: grant.account.clone(),
        handle: grant.handle.clone(),
        peer: auth.peer,
        reprove_at: auth.reprove_at,
        bearer,
        permit,
    });
    let tracker = state.streams.relays.clone();
    Ok(upgrade
        .max_message_size(MAX_CONSUMER_FRAME)
        .max_frame_size(MAX_CONSUMER_FRAME)
        .read_buffer_size(upstream::READ_BUFFER)
        .on_failed_upgrade(|error| debug!(%error, "relay: the WebSocket upgrade failed"))
        .on_upgrade(move |socket| tracker.track_future(session.run(socket, kraken))))
}

/// A close frame's reason holds at most 123 bytes: cut at a character.
pub(crate) fn close_reason(reason: &str) -> String {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason.to_owned();
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && long.starts_with(&cut));
        for reason in Refusal::ALL {
            assert!(!reason.as_str().is_empty());
        }
    }
}
