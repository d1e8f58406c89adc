//! The HTTP surfaces: the consumer API (`router`) and the admin API
//! (`admin_router`), each on its own listener (`server::serve`).
//!
//! Reads tokens only through `token::AccountHandle`; never calls Kraken.

pub mod address;
pub mod admin;
pub mod api;
pub mod auth;
pub mod limits;
pub mod metrics;
pub mod problem;
pub mod relay;
pub mod server;
pub mod throttle;
pub mod watch;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::metrics::{Metrics, Route};
use crate::token::AccountHandle;
use throttle::AuthThrottle;

/// The largest request body accepted (an invalidation report is ~100 bytes).
pub const MAX_BODY_BYTES: usize = 4 * 1024;
/// The largest request head (target and headers) the API answers; larger
/// ones get 431 as problem+json. The server's own, larger limit
/// ([`server::ServerLimits::max_header_bytes`]) cuts off anything beyond.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The longest a request body may take to arrive once its head is in: an
/// invalidation report is ~100 bytes, so only a stalling client needs longer.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// One account a consumer may fetch.
pub struct Grant {
    pub account: String,
    pub handle: AccountHandle,
    /// `tokens_served_total{account, consumer}`, resolved once.
    pub served: IntCounter,
}

/// A consumer as the API knows it.
pub struct Consumer {
    pub name: String,
    pub identity: crate::config::Identity,
    pub grants: Vec<Grant>,
    /// Its request-rate limit (kept across reloads while unchanged).
    pub limiter: Arc<limits::RateLimiter>,
    /// `rate_limited_total{consumer}`, resolved once.
    pub rate_limited: IntCounter,
    /// Its open watch streams, at most [`watch::MAX_WATCHERS_PER_CONSUMER`]
    /// (kept across reloads, as the limiter is).
    pub watchers: Arc<tokio::sync::Semaphore>,
    /// Its connections protected from eviction, at most
    /// [`server::ServerLimits::max_proven_per_consumer`] (kept across reloads).
    pub proven: server::ProvenConnections,
    /// What it may send through the relay.
    pub relay: crate::config::RelayPolicy,
    /// Whether it may use the relay only (no token is handed to it).
    pub relay_only: bool,
    /// Its open relay connections, at most `relay.max_connections` (kept
    /// across reloads that leave that number be).
    pub relays: Arc<tokio::sync::Semaphore>,
}

impl Consumer {
    /// A consumer with a fresh limiter of `rate_limit`.
    pub fn new(
        name: &str,
        identity: crate::config::Identity,
        grants: Vec<Grant>,
        rate_limit: crate::config::RateLimit,
        metrics: &Metrics,
    ) -> Self {
        Self {
            name: name.to_owned(),
            identity,
            grants,
            limiter: Arc::new(limits::RateLimiter::new(rate_limit)),
            rate_limited: metrics.consumers().rate_limited(name),
            watchers: Arc::new(tokio::sync::Semaphore::new(watch::MAX_WATCHERS_PER_CONSUMER)),
            proven: server::ProvenConnections::default(),
            relay: crate::config::RelayPolicy::default(),
            relay_only: false,
            relays: Arc::new(tokio::sync::Semaphore::new(crate::config::DEFAULT_RELAY_CONNECTIONS)),
        }
    }

    /// `relay_only`: refuses a request for a token (403).
    pub fn may_hold_tokens(&self) -> Result<(), problem::ApiError> {
        if self.relay_only {
            return Err(problem::ApiError::RelayOnly);
        }
        Ok(())
    }
}

/// Everything a request needs, swapped whole on reload so that a request
/// never sees half of an old configuration and half of a new one.
pub struct ServeTable {
    pub consumers: Vec<Arc<Consumer>>,
    pub accounts: BTreeMap<String, AccountHandle>,
    pub ws_url: String,
    /// TokenReviews for ServiceAccount consumers, with `[kubernetes]`.
    pub reviewer: Option<Arc<crate::identity::service_account::TokenReviewer>>,
    /// The audit trail, with `[audit]`.
    pub audit: Option<Arc<crate::audit::Auditor>>,
}

impl ServeTable {
    /// An empty table (before the first config is applied, and in tests).
    pub fn empty(ws_url: &str) -> Self {
        Self {
            consumers: Vec::new(),
            accounts: BTreeMap::new(),
            ws_url: ws_url.to_owned(),
            reviewer: None,
            audit: None,
        }
    }

    /// The consumer a reviewed ServiceAccount username maps to.
    pub fn by_service_account(&self, username: &str) -> Option<Arc<Consumer>> {
        self.consumers
            .iter()
            .find(|c| match &c.identity {
                crate::config::Identity::ServiceAccount {
                    namespace,
                    service_account,
                } => crate::identity::service_account::is_service_account(username, namespace, service_account),
                _ => false,
            })
            .cloned()
    }

    /// The consumer a verified client certificate proves, by a SAN of the
    /// type the consumer names.
    pub fn by_certificate(&self, cert: &crate::identity::ClientCertificate) -> Option<Arc<Consumer>> {
        self.consumers
            .iter()
            .find(|c| matches!(&c.identity, crate::config::Identity::ClientCert { san } if san.matches(cert)))
            .cloned()
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub table: Arc<ArcSwap<ServeTable>>,
    pub metrics: Metrics,
    pub throttle: Arc<AuthThrottle>,
    /// For readiness and metrics: the lockout and the rejected-call budget.
    pub gate: Arc<crate::token::KrakenGate>,
    /// To show Unix times of monotonic deadlines.
    pub clock: crate::clock::WallClock,
    /// Ends watch streams on shutdown and tells them of reloads.
    pub streams: watch::Streams,
}

/// The client's address and port, when the server recorded it.
pub fn peer_addr(parts: &Parts) -> Option<SocketAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

/// The client's address, when the server recorded it.
pub fn peer_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// Holds a gauge up for as long as something lives (a request being
/// answered, a watch stream, a relay connection), however it ends: a
/// client that goes away mid-way, a panic.
pub(crate) struct Held(prometheus::IntGauge);

impl Held {
    pub(crate) fn enter(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts every answered request by route and status (the admin API).
async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let recorder = metrics.http().request(Route::of_path(request.uri().path()));
    let _in_flight = Held::enter(recorder.in_flight());
    let response = next.run(request).await;
    recorder.record(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// Refuses request heads over [`MAX_HEAD_BYTES`] (431), and bodies declared
/// over [`MAX_BODY_BYTES`] (413) before reading a byte of them.
fn refuse_oversized(request: &Request) -> Option<problem::ApiError> {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Some(problem::ApiError::PayloadTooLarge);
    }
    let head: usize = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len())
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    (head > MAX_HEAD_BYTES).then_some(problem::ApiError::HeadTooLarge)
}

/// Everything around a consumer API request, as one layer (one boxed future
/// on the hot path rather than one per concern): size limits, the handler,
/// `no-store` and problem+json on every answer, metrics.
async fn api_layer(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let recorder = metrics.http().request(Route::of_path(request.uri().path()));
    let _in_flight = Held::enter(recorder.in_flight());
    let response = match refuse_oversized(&request) {
        Some(refusal) => axum::response::IntoResponse::into_response(refusal),
        None => next.run(request).await,
    };
    let response = problem::finish(response);
    recorder.record(response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// A handler that panicked (a bug): answered 500 in problem+json, logged;
/// the connection's slot is given back by its guard either way.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; answered 500");
    let body = problem::problem_json(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "the broker failed to answer",
    );
    axum::response::IntoResponse::into_response((
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        [(axum::http::header::CONTENT_TYPE, problem::PROBLEM_JSON)],
        body,
    ))
}

async fn not_found() -> Response {
    axum::response::IntoResponse::into_response(problem::ApiError::NotFound)
}

/// The consumer API's routes and methods, as `router` serves them and as
/// proto-docs/openapi.yaml documents them (a test holds the three together).
pub const API_ROUTES: &[(&str, &str)] = &[
    ("/v1/token", "GET"),
    ("/v1/token/invalidate", "POST"),
    ("/v1/token/watch", "GET"),
    ("/v1/relay", "GET"),
];

/// The consumer API. Every wait inside it is bounded where it happens (a
/// refresh by the refresher's answer deadline, a body by
/// [`BODY_READ_TIMEOUT`]), so no outer per-request timer is needed.
pub fn router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/v1/token", get(api::get_token))
        .route("/v1/token/invalidate", post(api::invalidate))
        .route("/v1/token/watch", get(watch::watch))
        .route("/v1/relay", get(relay::relay))
        .fallback(not_found)
        .with_state(state)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(metrics, api_layer))
}

/// The admin API: health, readiness and metrics; never a token.
pub fn admin_router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .with_state(state)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(metrics, track))
}

/// Whether a request's body is declared JSON (`Content-Type:
/// application/json`, any parameters): what a page elsewhere cannot send
/// without a CORS preflight.
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}
