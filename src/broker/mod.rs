//! The broker assembled: one refresher per account, the serving table the
//! HTTP layer reads, the two listeners, reloads, supervision of the
//! refreshers, and an orderly shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests bind
//! port 0 and stop it at will.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the broker: assembly, the control loop, shutdown |
//! | `accounts` | the account table: refreshers started, reconfigured, stopped, watched |
//! | `table` | the serving table built from a config |
//! | `reload` | reload requests, one read at a time, the typed outcome |
//! | [`poll`] | reloads when the config or its secret files change |

mod accounts;
pub mod poll;
mod reload;
mod table;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use accounts::ReloadSummary;
pub use reload::{ReloadOutcome, ReloadRequest, Reloads};

use crate::audit::Auditor;
use crate::clock::WallClock;
use crate::config::Config;
use crate::http::server::{Listener, ServerLimits, serve};
use crate::http::throttle::AuthThrottle;
use crate::http::{self, AppState, ServeTable};
use crate::identity::service_account::TokenReviewer;
use crate::kraken::KrakenClient;
use crate::metrics::{ListenerName, Metrics};
use crate::token::refresher::{self, Jitter};
use crate::token::{Applied, KeyEvent, KeyEvents, KrakenGate};
use accounts::AccountTable;
use reload::ReloadQueue;

/// How long a request may wait for a refresh: a Kraken call, its nonce
/// retry, and slack. Requests, and the shutdown drain, are bounded by it.
pub fn request_timeout(kraken_timeout: Duration) -> Duration {
    kraken_timeout * 2 + Duration::from_secs(5)
}

/// Why the broker stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the HTTP client for Kraken: {0}")]
    KrakenClient(#[source] reqwest::Error),
    #[error(transparent)]
    RefresherDied(#[from] RefresherDeath),
    #[error("the {which} server {end}")]
    ServerEnded { which: &'static str, end: ServerEnd },
    #[error("a listener has no local address: {0}")]
    Listener(#[source] std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::identity::service_account::SetupError),
}

/// How a refresher ended without being asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeathCause {
    #[error("it panicked")]
    Panicked,
    #[error("it returned")]
    Returned,
    #[error("it was aborted")]
    Aborted,
}

/// A refresher that ended without being asked to: the process must exit
/// so that it is restarted, rather than live on without tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the refresher of account `{account}` died: {cause}")]
pub struct RefresherDeath {
    pub account: String,
    pub cause: DeathCause,
}

/// How a listener's server ended.
#[derive(Debug, thiserror::Error)]
pub enum ServerEnd {
    #[error("stopped unexpectedly")]
    Stopped,
    #[error("failed: {0}")]
    Failed(#[source] std::io::Error),
    #[error("task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// The two listeners, bound by the caller.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

/// What the broker reads from the world besides its config: metrics, the
/// randomness of jitter, the wall clock and listener limits. Parameters, so
/// tests are exact; the default is production's.
#[derive(Clone)]
pub struct Options {
    pub metrics: Metrics,
    pub jitter: Jitter,
    pub clock: WallClock,
    pub limits: ServerLimits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            metrics: Metrics::new(),
            jitter: refresher::random_jitter,
            clock: WallClock::system(),
            limits: ServerLimits::default(),
        }
    }
}

/// The refreshers, the serving table, and what they share.
pub struct Broker {
    options: Options,
    /// In front of Kraken for every account: the rejected-call budget and
    /// the address-wide lockout.
    gate: Arc<KrakenGate>,
    /// With `[listen.tls]`: what new handshakes use, swapped on reload.
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    reviewer: Option<Arc<TokenReviewer>>,
    auditor: Option<Arc<Auditor>>,
    table: Arc<ArcSwap<ServeTable>>,
    streams: http::watch::Streams,
    throttle: Arc<AuthThrottle>,
    accounts: AccountTable,
    /// The auditor as refreshers' key events find it (it may change on reload).
    auditor_slot: Arc<ArcSwapOption<Auditor>>,
    config: Config,
}

/// Key events go to the audit trail in force when they happen.
fn key_events(slot: &Arc<ArcSwapOption<Auditor>>) -> KeyEvents {
    let slot = Arc::clone(slot);
    KeyEvents::new(move |event| {
        let Some(auditor) = slot.load_full() else {
            return;
        };
        match event {
            KeyEvent::ForeignUse { account, key, evidence } => {
                auditor.record(crate::audit::Event::KeyForeignUse { account, key, evidence })
            }
        }
    })
}

impl Broker {
    /// Starts a refresher per account.
    pub fn start(config: Config, options: Options) -> Result<Self, Error> {
        let empty = ServeTable::empty(&config.kraken.ws_url);
        let auditor_slot = Arc::new(ArcSwapOption::empty());
        let mut broker = Self {
            gate: Arc::new(KrakenGate::new(config.kraken.max_rejected_calls)),
            tls: config
                .listen
                .tls
                .as_ref()
                .map(|t| Arc::new(ArcSwap::new(Arc::clone(&t.server)))),
            reviewer: None,
            auditor: None,
            options,
            table: Arc::new(ArcSwap::from_pointee(empty)),
            streams: http::watch::Streams::default(),
            throttle: Arc::new(AuthThrottle::new()),
            accounts: AccountTable::new(key_events(&auditor_slot)),
            auditor_slot,
            config: config.clone(),
        };
        broker.apply(config)?;
        Ok(broker)
    }

    pub fn state(&self) -> AppState {
        AppState {
            table: Arc::clone(&self.table),
            metrics: self.options.metrics.clone(),
            throttle: Arc::clone(&self.throttle),
            gate: Arc::clone(&self.gate),
            clock: self.options.clock.clone(),
            streams: self.streams.clone(),
        }
    }

    /// Brings refreshers and the serving table in line with `config`.
    /// Never waits: each change is sent to its refresher in order, and the
    /// returned [`Applied`]s resolve once they are in force.
    fn apply(&mut self, config: Config) -> Result<(ReloadSummary, Vec<Applied>), Error> {
        let client = KrakenClient::new(&config.kraken.rest_url, config.kraken.timeout).map_err(Error::KrakenClient)?;
        self.gate.set_max_rejected_calls(config.kraken.max_rejected_calls);
        self.apply_identity_and_audit(&config)?;
        let (summary, applied) = self.accounts.apply(&config, &client, &self.gate, &self.options);
        let parts = table::Parts {
            accounts: &self.accounts,
            reviewer: self.reviewer.clone(),
            audit: self.auditor.clone(),
            metrics: &self.options.metrics,
        };
        let table = table::build(&config, &self.table.load(), parts);
        self.table.store(Arc::new(table));
        self.streams.tables.send_modify(|version| *version += 1);
        self.config = config;
        Ok((summary, applied))
    }

    /// The TokenReview client and the auditor for `config`: kept while their
    /// settings are the same (so caches and the audit writer go on), rebuilt
    /// when they change.
    fn apply_identity_and_audit(&mut self, config: &Config) -> Result<(), Error> {
        self.reviewer = match &config.kubernetes {
            None => None,
            Some(k) if self.reviewer.as_ref().is_some_and(|r| r.config() == k) => self.reviewer.clone(),
            Some(k) => Some(Arc::new(
                TokenReviewer::new(k.clone(), self.options.metrics.clone()).map_err(Error::Kubernetes)?,
            )),
        };
        self.auditor = match &config.audit {
            None => None,
            Some(a) if self.auditor.as_ref().is_some_and(|x| x.serves(a)) => {
                // A reload (SIGHUP after logrotate) reopens the audit file.
                if let Some(auditor) = &self.auditor {
                    auditor.reopen();
                }
                self.auditor.clone()
            }
            Some(a) => Some(Auditor::start(a, self.options.metrics.clone())),
        };
        self.auditor_slot.store(self.auditor.clone());
        if let (Some(tls), Some(new)) = (&self.tls, &config.listen.tls)
            && self
                .config
                .listen
                .tls
                .as_ref()
                .is_none_or(|old| old.digest != new.digest)
        {
            // New handshakes use the new files; open connections go on.
            tls.store(Arc::clone(&new.server));
            info!("TLS certificate, key or client CA reloaded: new handshakes use them");
        }
        Ok(())
    }

    /// The consumer API's TLS configuration, swapped on reload, if TLS is on.
    pub fn tls(&self) -> Option<Arc<ArcSwap<rustls::ServerConfig>>> {
        self.tls.clone()
    }

    /// Applies a reloaded configuration; the [`Applied`]s resolve once every
    /// refresher has taken its change.
    pub fn reload(&mut self, config: Config) -> Result<(ReloadSummary, Vec<Applied>), Error> {
        if config.listen != self.config.listen {
            warn!(
                api = %config.listen.api,
                admin = %config.listen.admin,
                "listen addresses changed in the config; they take effect only after a restart"
            );
        }
        self.apply(config)
    }

    /// Stops every refresher and waits for them.
    pub async fn stop(self) {
        self.accounts.stop().await;
    }
}

/// The two servers, running.
struct Servers {
    api: JoinHandle<std::io::Result<()>>,
    admin: JoinHandle<std::io::Result<()>>,
    /// Stops both from accepting, then they drain.
    stop: CancellationToken,
}

impl Servers {
    fn start(broker: &Broker, listeners: Listeners, limits: ServerLimits) -> Self {
        let state = broker.state();
        let stop = CancellationToken::new();
        let api = tokio::spawn(serve(
            Listener {
                name: ListenerName::Api,
                socket: listeners.api,
                tls: broker.tls(),
            },
            http::router(state.clone()),
            stop.clone(),
            limits,
            state.metrics.clone(),
        ));
        let admin = tokio::spawn(serve(
            Listener {
                name: ListenerName::Admin,
                socket: listeners.admin,
                tls: None,
            },
            http::admin_router(state.clone()),
            stop.clone(),
            limits.for_admin(),
            state.metrics.clone(),
        ));
        Self { api, admin, stop }
    }
}

/// Runs the broker on bound listeners until `shutdown` is cancelled.
///
/// Returns an error (so the process exits non-zero) if a refresher dies or a
/// listener fails. On shutdown: stop accepting, let in-flight requests finish
/// (they may be waiting on a refresh, so refreshers stop last), stop refreshers.
///
/// The listeners' drain time is set from the config.
pub async fn run(
    config: Config,
    listeners: Listeners,
    reloads: Option<Reloads>,
    shutdown: CancellationToken,
    options: Options,
) -> Result<(), Error> {
    let timeout = request_timeout(config.kraken.timeout);
    let limits = ServerLimits {
        drain_timeout: timeout,
        ..options.limits
    };
    let api_addr = listeners.api.local_addr().map_err(Error::Listener)?;
    let admin_addr = listeners.admin.local_addr().map_err(Error::Listener)?;
    let mut broker = Broker::start(config, options)?;
    let mut servers = Servers::start(&broker, listeners, limits);
    info!(api = %api_addr, admin = %admin_addr, accounts = broker.accounts.len(), "broker serving");
    let (outcome, ended) = control_loop(&mut broker, &mut servers, reloads, &shutdown).await;
    // Watch streams end first, so the drain waits only for short requests.
    broker.streams.stop.cancel();
    servers.stop.cancel();
    let _ = tokio::time::timeout(timeout + Duration::from_secs(1), async {
        if ended != Some(ListenerName::Api) {
            let _ = (&mut servers.api).await;
        }
        if ended != Some(ListenerName::Admin) {
            let _ = (&mut servers.admin).await;
        }
    })
    .await;
    // Relays close after the drain (1001), each at a frame boundary, and
    // their Kraken connections with them.
    broker.streams.relays_stop.cancel();
    broker.streams.relays.close();
    if tokio::time::timeout(RELAY_CLOSE_TIMEOUT, broker.streams.relays.wait())
        .await
        .is_err()
    {
        warn!("relay connections did not close in time; they are cut");
    }
    // Every audit line of the requests just answered, and the last summary.
    if let Some(auditor) = &broker.auditor {
        auditor.close(AUDIT_CLOSE_TIMEOUT).await;
    }
    broker.stop().await;
    info!("broker stopped");
    outcome
}

/// How long shutdown waits for relay connections to close.
const RELAY_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the audit trail to be written out.
const AUDIT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until shutdown, a refresher's death or a server's end, taking
/// reloads meanwhile; the outcome, and which server ended if one did.
async fn control_loop(
    broker: &mut Broker,
    servers: &mut Servers,
    mut reloads: Option<Reloads>,
    shutdown: &CancellationToken,
) -> (Result<(), Error>, Option<ListenerName>) {
    let mut queue = ReloadQueue::default();
    let path = reloads.as_ref().map(|r| r.path.clone()).unwrap_or_default();
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break (Ok(()), None),
            Some(request) = async {
                match reloads.as_mut() {
                    Some(r) => r.requests.recv().await,
                    None => std::future::pending().await,
                }
            } => queue.request(request, &path),
            read = queue.read() => {
                let replies = queue.finished(&path);
                reload::finish(broker, read, replies);
            }
            death = broker.accounts.died() => {
                error!(error = %death, "a refresher died; exiting so the broker is restarted");
                break (Err(death.into()), None);
            }
            result = &mut servers.api => break (Err(server_ended("consumer API", result)), Some(ListenerName::Api)),
            result = &mut servers.admin => break (Err(server_ended("admin", result)), Some(ListenerName::Admin)),
        }
    };
    queue.abort();
    outcome
}

fn server_ended(which: &'static str, result: Result<std::io::Result<()>, tokio::task::JoinError>) -> Error {
    let end = match result {
        Ok(Ok(())) => ServerEnd::Stopped,
        Ok(Err(e)) => ServerEnd::Failed(e),
        Err(e) => ServerEnd::Task(e),
    };
    Error::ServerEnded { which, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_leaves_room_for_a_call_and_its_retry() {
        assert_eq!(request_timeout(Duration::from_secs(10)), Duration::from_secs(25));
    }
}
