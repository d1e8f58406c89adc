//! The broker assembled: one refresher per account, the serving table the
//! HTTP layer reads, the two listeners, reloads on SIGHUP, supervision of the
//! refreshers, and an orderly shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown token, so tests bind
//! port 0 and stop it at will.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{AccountConfig, Config};
use crate::http::server::{ServerLimits, serve};
use crate::http::throttle::AuthThrottle;
use crate::http::{self, AppState, Consumer, Grant, ServeTable};
use crate::kraken::{KeyLane, KrakenClient};
use crate::metrics::Metrics;
use crate::token::refresher::{self, Jitter};
use crate::token::{AccountHandle, AccountSetup, KrakenSource};

/// How long a request may wait for a refresh: a Kraken call, its nonce
/// retry, and slack. Requests, and the shutdown drain, are bounded by it.
pub fn request_timeout(kraken_timeout: Duration) -> Duration {
    kraken_timeout * 2 + Duration::from_secs(5)
}

/// The two listeners, bound by the caller.
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

/// Where reloads come from: the config file to re-read and a stream of
/// "reload now" events (SIGHUP in production).
pub struct Reloads {
    pub path: PathBuf,
    pub events: mpsc::Receiver<()>,
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
    metrics: Metrics,
    table: Arc<ArcSwap<ServeTable>>,
    throttle: Arc<AuthThrottle>,
    accounts: BTreeMap<String, RunningAccount>,
    /// One nonce lane per API key, shared by accounts using the same key.
    lanes: HashMap<[u8; 32], Arc<KeyLane>>,
    jitter: Jitter,
    /// Reports of refreshers that ended without being asked to.
    deaths_tx: mpsc::UnboundedSender<String>,
    deaths_rx: mpsc::UnboundedReceiver<String>,
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
        format!("{:?}{:?}", config.kraken.timeout, config.refresh).as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl Broker {
    /// Starts a refresher per account.
    pub fn start(config: Config, metrics: Metrics, jitter: Jitter) -> anyhow::Result<Self> {
        let (deaths_tx, deaths_rx) = mpsc::unbounded_channel();
        let empty = ServeTable {
            consumers: Vec::new(),
            accounts: BTreeMap::new(),
            min_served_ttl: config.refresh.min_served_ttl,
            ws_url: config.kraken.ws_url.clone(),
        };
        let mut broker = Self {
            metrics,
            table: Arc::new(ArcSwap::from_pointee(empty)),
            throttle: Arc::new(AuthThrottle::new()),
            accounts: BTreeMap::new(),
            lanes: HashMap::new(),
            jitter,
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
            metrics: self.metrics.clone(),
            throttle: Arc::clone(&self.throttle),
        }
    }

    fn setup(&mut self, account: &AccountConfig, client: &KrakenClient, config: &Config) -> AccountSetup {
        let key_id: [u8; 32] = Sha256::digest(account.credentials.api_key.expose().as_bytes()).into();
        let lane = Arc::clone(self.lanes.entry(key_id).or_insert_with(|| Arc::new(KeyLane::new())));
        AccountSetup {
            source: Arc::new(KrakenSource {
                client: client.clone(),
                credentials: Arc::new(account.credentials.clone()),
                lane,
            }),
            policy: config.refresh,
            call_timeout: config.kraken.timeout,
        }
    }

    /// Brings refreshers and the serving table in line with `config`:
    /// starts new accounts, reconfigures changed ones, stops removed ones.
    fn apply(&mut self, config: Config) -> anyhow::Result<ReloadSummary> {
        let client = KrakenClient::new(&config.kraken.rest_url, config.kraken.timeout)
            .context("cannot build the HTTP client for Kraken")?;
        let mut summary = ReloadSummary::default();
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
                self.metrics.remove_account(&name);
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
                    let handle = running.handle.clone();
                    tokio::spawn(async move { handle.retry_now().await });
                }
                Some(running) => {
                    running.setup_digest = digest;
                    let handle = running.handle.clone();
                    // The refresher takes it at its next command; no request waits on this.
                    tokio::spawn(async move { handle.reconfigure(setup).await });
                    summary.changed.push(account.name.clone());
                }
                None => {
                    let cancel = CancellationToken::new();
                    let (handle, task) = refresher::spawn(
                        &account.name,
                        setup,
                        self.metrics.account(&account.name),
                        self.jitter,
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
        Ok(summary)
    }

    fn install_table(&self, config: &Config) {
        let old = self.table.load();
        let mut consumers = Vec::new();
        for c in &config.consumers {
            let grants = c
                .accounts
                .iter()
                .filter_map(|name| {
                    let running = self.accounts.get(name)?;
                    Some(Grant {
                        account: name.clone(),
                        handle: running.handle.clone(),
                        served: self.metrics.served(name, &c.name),
                    })
                })
                .collect();
            consumers.push(Arc::new(Consumer {
                name: c.name.clone(),
                credential_sha256: c.credential_sha256,
                grants,
            }));
        }
        // Series of grants that no longer exist go away.
        for old_consumer in &old.consumers {
            for grant in &old_consumer.grants {
                let kept = config
                    .consumers
                    .iter()
                    .any(|c| c.name == old_consumer.name && c.accounts.contains(&grant.account));
                if !kept {
                    self.metrics.remove_served(&grant.account, &old_consumer.name);
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
            min_served_ttl: config.refresh.min_served_ttl,
            ws_url: config.kraken.ws_url.clone(),
        }));
    }

    /// Applies a reloaded configuration.
    pub fn reload(&mut self, config: Config) -> anyhow::Result<ReloadSummary> {
        if config.listen != self.config.listen {
            warn!(
                api = %config.listen.api,
                admin = %config.listen.admin,
                "listen addresses changed in the config; they take effect only after a restart"
            );
        }
        self.apply(config)
    }

    /// Resolves when a refresher ended without being asked to.
    pub async fn refresher_died(&mut self) -> String {
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
    deaths: mpsc::UnboundedSender<String>,
) -> JoinHandle<()> {
    let (name, cancel) = (name.to_owned(), cancel.clone());
    tokio::spawn(async move {
        let outcome = task.await;
        if !cancel.is_cancelled() {
            let why = match outcome {
                Err(e) if e.is_panic() => "it panicked".to_owned(),
                Err(e) => format!("it was aborted: {e}"),
                Ok(()) => "it returned".to_owned(),
            };
            let _ = deaths.send(format!("the refresher of account `{name}` died: {why}"));
        }
    })
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// Runs the broker on bound listeners until `shutdown` is cancelled.
///
/// Returns an error (so the process exits non-zero) if a refresher dies or a
/// listener fails. On shutdown: stop accepting, let in-flight requests finish
/// (they may be waiting on a refresh, so refreshers stop last), stop refreshers.
///
/// `limits` bound the listeners; their drain time is set from the config.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Config,
    listeners: Listeners,
    mut reloads: Option<Reloads>,
    shutdown: CancellationToken,
    metrics: Metrics,
    jitter: Jitter,
    limits: ServerLimits,
) -> anyhow::Result<()> {
    let timeout = request_timeout(config.kraken.timeout);
    let limits = ServerLimits {
        drain_timeout: timeout,
        ..limits
    };
    let mut broker = Broker::start(config, metrics, jitter)?;
    let state = broker.state();
    let stop_serving = CancellationToken::new();
    let api_addr = listeners.api.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let mut api = tokio::spawn(serve(
        listeners.api,
        http::router(state.clone()),
        stop_serving.clone(),
        limits,
    ));
    let mut admin = tokio::spawn(serve(
        listeners.admin,
        http::admin_router(state),
        stop_serving.clone(),
        limits,
    ));
    info!(api = %api_addr, admin = %admin_addr, accounts = broker.accounts.len(), "broker serving");

    let (mut api_done, mut admin_done) = (false, false);
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(()) = async {
                match reloads.as_mut() {
                    Some(r) => r.events.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let path = reloads.as_ref().map(|r| r.path.clone()).expect("events come with a path");
                match Config::load(&path) {
                    Ok(config) => match broker.reload(config) {
                        Ok(s) => info!(added = ?s.added, changed = ?s.changed, removed = ?s.removed, "config reloaded"),
                        Err(error) => error!(error = %format!("{error:#}"), "config reload failed; the running config stays in force"),
                    },
                    Err(error) => error!(%error, "config reload refused; the running config stays in force"),
                }
            }
            death = broker.refresher_died() => {
                error!(error = %death, "a refresher died; exiting so the broker is restarted");
                break Err(anyhow!(death));
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

fn server_ended(which: &str, result: Result<std::io::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow!("the {which} server stopped unexpectedly"),
        Ok(Err(e)) => anyhow!("the {which} server failed: {e}"),
        Err(e) => anyhow!("the {which} server task failed: {e}"),
    }
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
        assert_eq!(report, "the refresher of account `main` died: it panicked");

        let returns = tokio::spawn(async {});
        watch_refresher("quiet", &running, returns, tx.clone()).await.unwrap();
        assert!(rx.recv().await.unwrap().contains("`quiet` died: it returned"));

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
