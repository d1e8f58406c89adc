//! The broker assembled: one refresher per account, the serving table the
//! HTTP layer reads, the two listeners, reloads, supervision of the
//! refreshers, and an orderly shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests bind
//! port 0 and stop it at will.
//!
//! Reloads: the control loop never reads a file. A reload request starts a
//! read of the config and its secrets on the blocking pool, with a deadline;
//! its result comes back to the loop, which applies it at once (sending each
//! refresher its change on an ordered channel) and answers the request once
//! every refresher has acknowledged. One read at a time: requests that come
//! in meanwhile are served by the next read, so none is answered with a
//! config older than itself.

use std::collections::{BTreeMap, HashMap};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::audit::Auditor;
use crate::clock::WallClock;
use crate::config::{AccountConfig, Config, ConfigError};
use crate::http::kubernetes::TokenReviewer;
use crate::http::server::{Listener, ServerLimits, serve};
use crate::http::throttle::AuthThrottle;
use crate::http::{self, AppState, Consumer, Grant, ServeTable};
use crate::kraken::{KeyLane, KrakenClient, KrakenSource};
use crate::metrics::Metrics;
use crate::telemetry::list;
use crate::token::refresher::{self, Ambient, Jitter};
use crate::token::{AccountHandle, AccountSetup, Applied, KrakenGate};

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
    Kubernetes(#[from] crate::http::kubernetes::SetupError),
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

/// What a reload ended in: what changed, once every refresher has taken its
/// change, or why the running config stays in force.
pub type ReloadOutcome = Result<ReloadSummary, Arc<ConfigError>>;

/// "Reload now" (SIGHUP, the poller, a test), with an optional place for
/// the outcome.
#[derive(Debug, Default)]
pub struct ReloadRequest {
    pub reply: Option<oneshot::Sender<ReloadOutcome>>,
}

/// Where reloads come from: the config file to re-read and a stream of
/// requests.
pub struct Reloads {
    pub path: PathBuf,
    pub requests: mpsc::Receiver<ReloadRequest>,
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

struct RunningAccount {
    handle: AccountHandle,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// SHA-256 over everything that configures the refresher, to tell on
    /// reload whether it changed.
    setup_digest: [u8; 32],
}

/// The refreshers and the serving table.
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
    streams: crate::http::watch::Streams,
    throttle: Arc<AuthThrottle>,
    accounts: BTreeMap<String, RunningAccount>,
    /// One nonce lane per API key, shared by accounts using the same key.
    lanes: HashMap<[u8; 32], Arc<KeyLane>>,
    /// Reports of refreshers that ended without being asked to.
    deaths_tx: mpsc::UnboundedSender<RefresherDeath>,
    deaths_rx: mpsc::UnboundedReceiver<RefresherDeath>,
    config: Config,
}

fn setup_digest(account: &AccountConfig, config: &Config) -> [u8; 32] {
    let c = &account.credentials;
    let mut h = Sha256::new();
    for part in [
        c.api_key.expose().as_bytes(),
        c.api_secret.expose(),
        c.otp.as_ref().map_or(&[][..], |o| o.material()),
        config.kraken.rest_url.as_bytes(),
        format!(
            "{:?}{:?}{:?}",
            config.kraken.timeout, config.refresh, account.key_expires_at
        )
        .as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl Broker {
    /// Starts a refresher per account.
    pub fn start(config: Config, options: Options) -> Result<Self, Error> {
        let (deaths_tx, deaths_rx) = mpsc::unbounded_channel();
        let empty = ServeTable::empty(&config.kraken.ws_url);
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
            streams: crate::http::watch::Streams::default(),
            throttle: Arc::new(AuthThrottle::new()),
            accounts: BTreeMap::new(),
            lanes: HashMap::new(),
            deaths_tx,
            deaths_rx,
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

    fn setup(&mut self, account: &AccountConfig, client: &KrakenClient, config: &Config) -> AccountSetup {
        let key_id: [u8; 32] = Sha256::digest(account.credentials.api_key.expose().as_bytes()).into();
        let clock = &self.options.clock;
        let lane = Arc::clone(
            self.lanes
                .entry(key_id)
                .or_insert_with(|| Arc::new(KeyLane::with_clock(clock.clone()))),
        );
        AccountSetup {
            source: Arc::new(KrakenSource {
                client: client.clone(),
                credentials: Arc::new(account.credentials.clone()),
                lane,
            }),
            policy: config.refresh,
            call_timeout: config.kraken.timeout,
            key_expires_at: account.key_expires_at,
            key_fingerprint: crate::secret::fingerprint(account.credentials.api_key.expose().as_bytes()),
        }
    }

    /// Brings refreshers and the serving table in line with `config`:
    /// starts new accounts, reconfigures changed ones, stops removed ones.
    /// Never waits: each change is sent to its refresher in order, and the
    /// returned [`Applied`]s resolve once they are in force.
    fn apply(&mut self, config: Config) -> Result<(ReloadSummary, Vec<Applied>), Error> {
        let client = KrakenClient::new(&config.kraken.rest_url, config.kraken.timeout).map_err(Error::KrakenClient)?;
        self.gate.set_max_rejected_calls(config.kraken.max_rejected_calls);
        self.apply_identity_and_audit(&config)?;
        let mut summary = ReloadSummary::default();
        let mut applied = Vec::new();
        let wanted: Vec<&str> = config.accounts.iter().map(|a| a.name.as_str()).collect();
        let removed: Vec<String> = self
            .accounts
            .keys()
            .filter(|name| !wanted.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(running) = self.accounts.remove(&name) {
                running.cancel.cancel();
                self.options.metrics.remove_account(&name);
                summary.removed.push(name);
            }
        }
        for account in &config.accounts {
            let digest = setup_digest(account, &config);
            let setup = self.setup(account, &client, &config);
            match self.accounts.get_mut(&account.name) {
                Some(running) if running.setup_digest == digest => {
                    // Unchanged: a reload still means "retry now" for an
                    // account stuck on a rejection an operator has fixed.
                    applied.push(running.handle.retry_now());
                }
                Some(running) => {
                    running.setup_digest = digest;
                    applied.push(running.handle.reconfigure(setup));
                    summary.changed.push(account.name.clone());
                }
                None => {
                    let cancel = CancellationToken::new();
                    let ambient = Ambient {
                        jitter: self.options.jitter,
                        clock: self.options.clock.clone(),
                        gate: Arc::clone(&self.gate),
                    };
                    let (handle, task) = refresher::spawn(
                        &account.name,
                        setup,
                        self.options.metrics.account(&account.name),
                        ambient,
                        cancel.clone(),
                    );
                    let watch = watch_refresher(&account.name, &cancel, task, self.deaths_tx.clone());
                    self.accounts.insert(
                        account.name.clone(),
                        RunningAccount {
                            handle,
                            cancel,
                            task: watch,
                            setup_digest: digest,
                        },
                    );
                    summary.added.push(account.name.clone());
                }
            }
        }
        self.install_table(&config);
        self.config = config;
        Ok((summary, applied))
    }

    fn install_table(&self, config: &Config) {
        let metrics = &self.options.metrics;
        let old = self.table.load();
        let mut consumers = Vec::new();
        for c in &config.consumers {
            let before = old.consumers.iter().find(|o| o.name == c.name);
            // A consumer's limiter survives a reload that leaves its limit be ...
            let limiter = before.filter(|o| o.limiter.limit() == c.rate_limit).map_or_else(
                || Arc::new(crate::http::limits::RateLimiter::new(c.rate_limit)),
                |o| Arc::clone(&o.limiter),
            );
            let grants = c
                .accounts
                .iter()
                .filter_map(|name| {
                    let running = self.accounts.get(name)?;
                    Some(Grant {
                        account: name.clone(),
                        handle: running.handle.clone(),
                        served: metrics.consumers().served(name, &c.name),
                    })
                })
                .collect();
            // ... and its open watch streams' permits, any reload.
            let watchers = before.map_or_else(
                || {
                    Arc::new(tokio::sync::Semaphore::new(
                        crate::http::watch::MAX_WATCHERS_PER_CONSUMER,
                    ))
                },
                |o| Arc::clone(&o.watchers),
            );
            consumers.push(Arc::new(Consumer {
                name: c.name.clone(),
                identity: c.identity.clone(),
                grants,
                limiter,
                rate_limited: metrics.consumers().rate_limited(&c.name),
                watchers,
            }));
        }
        for gone in old
            .consumers
            .iter()
            .filter(|o| !config.consumers.iter().any(|c| c.name == o.name))
        {
            metrics.consumers().remove_rate_limited(&gone.name);
        }
        // Series of grants that no longer exist go away.
        for old_consumer in &old.consumers {
            for grant in &old_consumer.grants {
                let kept = config
                    .consumers
                    .iter()
                    .any(|c| c.name == old_consumer.name && c.accounts.contains(&grant.account));
                if !kept {
                    metrics.consumers().remove_served(&grant.account, &old_consumer.name);
                }
            }
        }
        let accounts = self
            .accounts
            .iter()
            .map(|(name, running)| (name.clone(), running.handle.clone()))
            .collect();
        self.table.store(Arc::new(ServeTable {
            consumers,
            accounts,
            ws_url: config.kraken.ws_url.clone(),
            reviewer: self.reviewer.clone(),
            audit: self.auditor.clone(),
        }));
        self.streams.tables.send_modify(|version| *version += 1);
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

    /// Writes a `config.reloaded` audit line, when auditing is on.
    fn audit_reload(&self, result: &'static str, summary: Option<&ReloadSummary>) {
        if let Some(audit) = &self.auditor {
            audit.record(crate::audit::Event::ConfigReloaded {
                result,
                added: summary.map(|s| s.added.clone()),
                changed: summary.map(|s| s.changed.clone()),
                removed: summary.map(|s| s.removed.clone()),
            });
        }
    }

    /// Resolves when a refresher ended without being asked to.
    pub async fn refresher_died(&mut self) -> RefresherDeath {
        match self.deaths_rx.recv().await {
            Some(report) => report,
            None => std::future::pending().await,
        }
    }

    /// Stops every refresher and waits for them.
    pub async fn stop(self) {
        for running in self.accounts.values() {
            running.cancel.cancel();
        }
        for (_, running) in self.accounts {
            let _ = running.task.await;
        }
    }
}

/// Watches a refresher task: if it ends while not cancelled (a panic, or a
/// bug that returns), the death is reported so the process can exit.
fn watch_refresher(
    name: &str,
    cancel: &CancellationToken,
    task: JoinHandle<()>,
    deaths: mpsc::UnboundedSender<RefresherDeath>,
) -> JoinHandle<()> {
    let (name, cancel) = (name.to_owned(), cancel.clone());
    tokio::spawn(async move {
        let outcome = task.await;
        if !cancel.is_cancelled() {
            let cause = match outcome {
                Err(e) if e.is_panic() => DeathCause::Panicked,
                Err(_) => DeathCause::Aborted,
                Ok(()) => DeathCause::Returned,
            };
            let _ = deaths.send(RefresherDeath { account: name, cause });
        }
    })
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// The reload under way, and the requests waiting for the next one.
#[derive(Default)]
struct ReloadQueue {
    reading: Option<JoinHandle<Result<Config, ConfigError>>>,
    /// Answered by the read under way.
    current: Vec<oneshot::Sender<ReloadOutcome>>,
    /// Came in during the read under way: answered by the next one.
    next: Vec<oneshot::Sender<ReloadOutcome>>,
    again: bool,
}

impl ReloadQueue {
    fn request(&mut self, request: ReloadRequest, path: &std::path::Path) {
        if self.reading.is_none() {
            self.current.extend(request.reply);
            self.start(path);
        } else {
            self.next.extend(request.reply);
            self.again = true;
        }
    }

    fn start(&mut self, path: &std::path::Path) {
        let path = path.to_owned();
        self.reading = Some(tokio::spawn(async move { Config::load_off_runtime(&path).await }));
    }

    /// The read under way finished: the requests it answers, and whether to
    /// start the next one.
    fn finished(&mut self, path: &std::path::Path) -> Vec<oneshot::Sender<ReloadOutcome>> {
        self.reading = None;
        let answered = std::mem::take(&mut self.current);
        if std::mem::take(&mut self.again) {
            self.current = std::mem::take(&mut self.next);
            self.start(path);
        }
        answered
    }
}

/// Applies a freshly read config, logs the outcome once it is in force, and
/// answers whoever asked.
fn finish_reload(
    broker: &mut Broker,
    read: Result<Result<Config, ConfigError>, tokio::task::JoinError>,
    replies: Vec<oneshot::Sender<ReloadOutcome>>,
) {
    let config = match read {
        Ok(Ok(config)) => config,
        Ok(Err(problems)) => {
            broker.options.metrics.process().reload(false);
            broker.audit_reload("refused", None);
            error!(error = %problems, "config reload refused; the running config stays in force");
            let problems = Arc::new(problems);
            for reply in replies {
                let _ = reply.send(Err(Arc::clone(&problems)));
            }
            return;
        }
        Err(join) => {
            broker.options.metrics.process().reload(false);
            error!(error = %join, "config reload failed; the running config stays in force");
            return;
        }
    };
    for warning in &config.warnings {
        warn!(warning = %warning, "config warning");
    }
    match broker.reload(config) {
        Ok((summary, applied)) => {
            broker.options.metrics.process().reload(true);
            broker.audit_reload("applied", Some(&summary));
            tokio::spawn(async move {
                for change in applied {
                    change.wait().await;
                }
                info!(
                    added = list(&summary.added),
                    changed = list(&summary.changed),
                    removed = list(&summary.removed),
                    "config reloaded"
                );
                for reply in replies {
                    let _ = reply.send(Ok(summary.clone()));
                }
            });
        }
        Err(error) => {
            broker.options.metrics.process().reload(false);
            error!(%error, "config reload failed; the running config stays in force");
        }
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
    mut reloads: Option<Reloads>,
    shutdown: CancellationToken,
    options: Options,
) -> Result<(), Error> {
    let timeout = request_timeout(config.kraken.timeout);
    let limits = ServerLimits {
        drain_timeout: timeout,
        ..options.limits
    };
    let mut broker = Broker::start(config, options)?;
    let state = broker.state();
    let stop_serving = CancellationToken::new();
    let api_addr = listeners.api.local_addr().map_err(Error::Listener)?;
    let admin_addr = listeners.admin.local_addr().map_err(Error::Listener)?;
    let mut api = tokio::spawn(serve(
        Listener {
            name: crate::metrics::ListenerName::Api,
            socket: listeners.api,
            tls: broker.tls(),
        },
        http::router(state.clone()),
        stop_serving.clone(),
        limits,
        state.metrics.clone(),
    ));
    let mut admin = tokio::spawn(serve(
        Listener {
            name: crate::metrics::ListenerName::Admin,
            socket: listeners.admin,
            tls: None,
        },
        http::admin_router(state.clone()),
        stop_serving.clone(),
        limits.for_admin(),
        state.metrics.clone(),
    ));
    info!(api = %api_addr, admin = %admin_addr, accounts = broker.accounts.len(), "broker serving");

    let mut queue = ReloadQueue::default();
    let path = reloads.as_ref().map(|r| r.path.clone()).unwrap_or_default();
    let (mut api_done, mut admin_done) = (false, false);
    let outcome: Result<(), Error> = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(request) = async {
                match reloads.as_mut() {
                    Some(r) => r.requests.recv().await,
                    None => std::future::pending().await,
                }
            } => queue.request(request, &path),
            read = async {
                match queue.reading.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            } => {
                let replies = queue.finished(&path);
                finish_reload(&mut broker, read, replies);
            }
            death = broker.refresher_died() => {
                error!(error = %death, "a refresher died; exiting so the broker is restarted");
                break Err(death.into());
            }
            result = &mut api, if !api_done => {
                api_done = true;
                break Err(server_ended("consumer API", result));
            }
            result = &mut admin, if !admin_done => {
                admin_done = true;
                break Err(server_ended("admin", result));
            }
        }
    };
    if let Some(reading) = queue.reading.take() {
        reading.abort();
    }
    // Watch streams end first, so the drain waits only for short requests.
    state.streams.stop.cancel();
    stop_serving.cancel();
    let _ = tokio::time::timeout(timeout + Duration::from_secs(1), async {
        if !api_done {
            let _ = (&mut api).await;
        }
        if !admin_done {
            let _ = (&mut admin).await;
        }
    })
    .await;
    broker.stop().await;
    info!("broker stopped");
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

    #[tokio::test]
    async fn a_refresher_that_dies_is_reported_and_one_that_is_stopped_is_not() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let running = CancellationToken::new();
        let dies = tokio::spawn(async { panic!("a bug in a refresher") });
        watch_refresher("main", &running, dies, tx.clone()).await.unwrap();
        let report = rx.recv().await.unwrap();
        assert_eq!(report.to_string(), "the refresher of account `main` died: it panicked");
        assert_eq!(report.cause, DeathCause::Panicked);

        let returns = tokio::spawn(async {});
        watch_refresher("quiet", &running, returns, tx.clone()).await.unwrap();
        assert!(
            rx.recv()
                .await
                .unwrap()
                .to_string()
                .contains("`quiet` died: it returned")
        );

        let stopped = CancellationToken::new();
        stopped.cancel();
        watch_refresher("other", &stopped, tokio::spawn(async {}), tx)
            .await
            .unwrap();
        assert!(rx.try_recv().is_err(), "a refresher asked to stop is no death");
    }

    #[test]
    fn request_timeout_leaves_room_for_a_call_and_its_retry() {
        assert_eq!(request_timeout(Duration::from_secs(10)), Duration::from_secs(25));
    }
}
