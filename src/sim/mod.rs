//! A Kraken simulator: the REST `GetWebSocketsToken` call and the WebSocket v2
//! private endpoint, faithful to Kraken's checks, shapes and error strings,
//! with faults that can be set at start and changed while it runs.
//!
//! Used by `demo`, by `simulate` (for consumers' own tests) and by this
//! project's tests. Nothing in the product imports it.
//!
//! | route | what |
//! |---|---|
//! | `POST /0/private/GetWebSocketsToken` | Kraken's call, checked as Kraken checks it |
//! | `GET /0/public/Time`, `GET /0/public/SystemStatus` | Kraken's public shapes |
//! | `/0/*` anything else | `EGeneral:Unknown method` |
//! | `GET /v2` (WebSocket) | `subscribe`/`unsubscribe` `executions`/`balances`, `add_order`, `cancel_order`, `ping` |
//! | `GET /_sim/state` | lifetime, tier, system status, keys (never secrets), active fault, URLs |
//! | `PUT /_sim/fault`, `DELETE /_sim/fault` | set or clear the fault ([`FaultSpec`] as JSON) |
//! | `GET /_sim/calls`, `DELETE /_sim/calls` | the calls received, oldest first |
//! | `GET /_sim/tokens`, `POST /_sim/tokens/revoke` | issued tokens by fingerprint; revoke one (`{"token":…}`) or all |
//! | `PUT /_sim/token-ttl` | `{"secs": N}`: lifetime of tokens issued from now on |
//! | `PUT /_sim/system` | `{"status": "maintenance"}` (`online`, `cancel_only`, `post_only`) |
//! | `POST /_sim/keys` | add a key with its settings (`{}` generates one) |
//! | `POST /_sim/reset-limits` | clear call counters and lockouts |
//! | `POST /_sim/ws/drop` | close every WebSocket connection (a network blip) |
//!
//! Every control request that changes something must be JSON
//! (`Content-Type: application/json`).

pub mod rest;
pub mod state;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{any, get, post, put};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use state::{
    CallRecord, DEFAULT_TOKEN_TTL, FaultSpec, IssuedToken, KeyError, SimConfig, SimKey, SimOtp, SimState, SystemStatus,
    Tier,
};

/// What the handlers share.
pub(crate) struct SimShared {
    state: Arc<SimState>,
    shutdown: CancellationToken,
    rest_url: String,
    ws_url: String,
    /// System status changes, for every open WebSocket's status channel.
    status_tx: broadcast::Sender<SystemStatus>,
    /// "Drop every WebSocket connection now."
    drop_tx: broadcast::Sender<()>,
}

/// The simulator's router.
fn router(shared: Arc<SimShared>) -> Router {
    Router::new()
        .route("/0/private/{method}", any(rest::private))
        .route("/0/public/Time", get(rest::public_time))
        .route("/0/public/SystemStatus", get(rest::public_system_status))
        .route("/0/{*rest}", any(rest::unknown_method))
        .route("/v2", get(ws::upgrade))
        .route("/_sim/state", get(rest::get_state))
        .route("/_sim/fault", put(rest::put_fault).delete(rest::delete_fault))
        .route("/_sim/calls", get(rest::get_calls).delete(rest::delete_calls))
        .route("/_sim/tokens", get(rest::get_tokens))
        .route("/_sim/tokens/revoke", post(rest::revoke_tokens))
        .route("/_sim/token-ttl", put(rest::put_token_ttl))
        .route("/_sim/keys", post(rest::post_key))
        .route("/_sim/reset-limits", post(rest::reset_limits))
        .route("/_sim/system", put(rest::put_system))
        .route("/_sim/ws/drop", post(rest::drop_websockets))
        .with_state(shared)
}

/// A running simulator.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The REST root to configure as `kraken.rest_url`.
    pub fn rest_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The WebSocket URL consumers connect to.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v2", self.addr)
    }

    pub fn state(&self) -> &Arc<SimState> {
        &self.state
    }

    /// Stops serving and waits until the server has stopped.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap_or(Ok(()))
    }

    /// Waits until the server stops (after its shutdown token is cancelled).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.unwrap_or(Ok(()))
    }
}

/// The simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bad simulator key: {0}")]
    Key(#[from] KeyError),
    #[error("the listener has no local address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Starts the simulator on an already-bound listener. It stops when
/// `shutdown` is cancelled (or [`SimHandle::shutdown`] is called).
pub fn start(config: SimConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<SimHandle, StartError> {
    let addr = listener.local_addr()?;
    let state = Arc::new(SimState::new(config)?);
    let shared = Arc::new(SimShared {
        state: Arc::clone(&state),
        shutdown: shutdown.clone(),
        rest_url: format!("http://{addr}"),
        ws_url: format!("ws://{addr}/v2"),
        status_tx: broadcast::channel(16).0,
        drop_tx: broadcast::channel(16).0,
    });
    let app = router(shared).into_make_service_with_connect_info::<SocketAddr>();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    Ok(SimHandle {
        addr,
        state,
        shutdown,
        task,
    })
}
