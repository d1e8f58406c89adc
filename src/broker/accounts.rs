//! The account table: one refresher per account, started, reconfigured or
//! stopped to match the config, its settings compared by value; each
//! refresher watched, so one that dies is reported (the process exits and
//! is restarted rather than live on without tokens).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DeathCause, Options, RefresherDeath};
use crate::config::{AccountConfig, Config};
use crate::kraken::{ApiCredentials, KeyLane, KrakenClient, KrakenSource, Otp};
use crate::token::refresher::{self, Ambient};
use crate::token::{AccountHandle, AccountSetup, Applied, KeyEvents, KrakenGate, RefreshPolicy};

/// Everything that configures an account's refresher, compared by value to
/// tell on reload whether it changed. The credentials are kept only as a
/// digest: the table holds no second copy of any secret.
#[derive(Clone, PartialEq)]
struct Settings {
    credentials: [u8; 32],
    rest_url: String,
    timeout: Duration,
    policy: RefreshPolicy,
    key_expires_at: Option<SystemTime>,
    forbid_permissions: Vec<String>,
    key_info_interval: Duration,
}

impl Settings {
    fn of(account: &AccountConfig, config: &Config) -> Self {
        Self {
            credentials: credentials_digest(&account.credentials),
            rest_url: config.kraken.rest_url.clone(),
            timeout: config.kraken.timeout,
            policy: config.refresh,
            key_expires_at: account.key_expires_at,
            forbid_permissions: account.forbid_permissions.clone(),
            key_info_interval: config.kraken.key_info_interval,
        }
    }
}

/// SHA-256 over the key, the secret and the second factor (its kind and
/// material), each with its length, so no two different credentials share
/// an input.
fn credentials_digest(c: &ApiCredentials) -> [u8; 32] {
    let (kind, otp): (&[u8], &[u8]) = match &c.otp {
        None => (b"none", b""),
        Some(otp @ Otp::Static(_)) => (b"static", otp.material()),
        Some(otp @ Otp::Totp(_)) => (b"totp", otp.material()),
    };
    let mut digest = Sha256::new();
    for part in [c.api_key.expose().as_bytes(), c.api_secret.expose(), kind, otp] {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    digest.finalize().into()
}

struct RunningAccount {
    handle: AccountHandle,
    cancel: CancellationToken,
    /// The watcher of the refresher task (see [`watch_refresher`]).
    task: JoinHandle<()>,
    settings: Settings,
}

/// What a reload changed in the account table, by account name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// The running refreshers, by account name.
pub(super) struct AccountTable {
    running: BTreeMap<String, RunningAccount>,
    /// One nonce lane per API key, shared by accounts using the same key.
    lanes: HashMap<[u8; 32], Arc<KeyLane>>,
    /// Reports of refreshers that ended without being asked to.
    deaths_tx: mpsc::UnboundedSender<RefresherDeath>,
    deaths_rx: mpsc::UnboundedReceiver<RefresherDeath>,
    /// Where every refresher reports key events (the audit trail).
    events: KeyEvents,
}

impl AccountTable {
    pub fn new(events: KeyEvents) -> Self {
        let (deaths_tx, deaths_rx) = mpsc::unbounded_channel();
        Self {
            running: BTreeMap::new(),
            lanes: HashMap::new(),
            deaths_tx,
            deaths_rx,
            events,
        }
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Each account's handle, by name.
    pub fn handles(&self) -> impl Iterator<Item = (&String, &AccountHandle)> {
        self.running.iter().map(|(name, r)| (name, &r.handle))
    }

    pub fn handle(&self, name: &str) -> Option<&AccountHandle> {
        self.running.get(name).map(|r| &r.handle)
    }

    fn setup(
        &mut self,
        account: &AccountConfig,
        client: &KrakenClient,
        config: &Config,
        options: &Options,
    ) -> AccountSetup {
        let key_id: [u8; 32] = Sha256::digest(account.credentials.api_key.expose().as_bytes()).into();
        let lane = Arc::clone(
            self.lanes
                .entry(key_id)
                .or_insert_with(|| Arc::new(KeyLane::with_clock(options.clock.clone()))),
        );
        AccountSetup {
            source: Arc::new(KrakenSource::new(
                client.clone(),
                Arc::new(account.credentials.clone()),
                lane,
                account.forbid_permissions.clone(),
            )),
            policy: config.refresh,
            call_timeout: config.kraken.timeout,
            key_expires_at: account.key_expires_at,
            key_fingerprint: crate::secret::fingerprint(account.credentials.api_key.expose().as_bytes()),
            key_info_interval: Some(config.kraken.key_info_interval),
        }
    }

    /// Brings the refreshers in line with `config`: starts new accounts,
    /// reconfigures changed ones (and asks unchanged ones to retry now: an
    /// operator may have fixed their key at Kraken), stops removed ones.
    /// Never waits: the [`Applied`]s resolve once each change is in force.
    pub fn apply(
        &mut self,
        config: &Config,
        client: &KrakenClient,
        gate: &Arc<KrakenGate>,
        options: &Options,
    ) -> (ReloadSummary, Vec<Applied>) {
        let mut changes = ReloadSummary::default();
        let mut applied = Vec::new();
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| !config.accounts.iter().any(|a| &a.name == *name))
            .cloned()
            .collect();
        for name in removed {
            if let Some(running) = self.running.remove(&name) {
                running.cancel.cancel();
                options.metrics.remove_account(&name);
                changes.removed.push(name);
            }
        }
        for account in &config.accounts {
            let settings = Settings::of(account, config);
            let setup = self.setup(account, client, config, options);
            match self.running.get_mut(&account.name) {
                Some(running) if running.settings == settings => applied.push(running.handle.retry_now()),
                Some(running) => {
                    running.settings = settings;
                    applied.push(running.handle.reconfigure(setup));
                    changes.changed.push(account.name.clone());
                }
                None => {
                    self.start(&account.name, setup, settings, gate, options);
                    changes.added.push(account.name.clone());
                }
            }
        }
        (changes, applied)
    }

    fn start(
        &mut self,
        name: &str,
        setup: AccountSetup,
        settings: Settings,
        gate: &Arc<KrakenGate>,
        options: &Options,
    ) {
        let cancel = CancellationToken::new();
        let ambient = Ambient {
            jitter: options.jitter,
            clock: options.clock.clone(),
            gate: Arc::clone(gate),
            events: self.events.clone(),
        };
        let (handle, task) = refresher::spawn(name, setup, options.metrics.account(name), ambient, cancel.clone());
        let task = watch_refresher(name, &cancel, task, self.deaths_tx.clone());
        self.running.insert(
            name.to_owned(),
            RunningAccount {
                handle,
                cancel,
                task,
                settings,
            },
        );
    }

    /// Resolves when a refresher ended without being asked to.
    pub async fn died(&mut self) -> RefresherDeath {
        match self.deaths_rx.recv().await {
            Some(report) => report,
            None => std::future::pending().await,
        }
    }

    /// Stops every refresher and waits for them.
    pub async fn stop(self) {
        for running in self.running.values() {
            running.cancel.cancel();
        }
        for (_, running) in self.running {
            let _ = running.task.await;
        }
    }
}

/// Watches a refresher task: if it ends while not cancelled (a panic, or a
/// bug that returns), the death is reported so the process can exit.
pub(super) fn watch_refresher(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{SecretBytes, SecretString};

    fn credentials(key: &str, secret: &[u8], otp: Option<Otp>) -> ApiCredentials {
        ApiCredentials {
            api_key: SecretString::new(key),
            api_secret: SecretBytes::new(secret.to_vec()),
            otp,
        }
    }

    #[test]
    fn any_change_of_key_secret_or_second_factor_changes_the_digest() {
        let seed = "JBSWY3DPEHPK3PXP";
        let totp = || Otp::totp_from_base32(&SecretString::new(seed)).ok();
        let password = || Otp::static_password(SecretString::new(seed)).ok();
        let base = credentials_digest(&credentials("k", b"s", None));
        assert_eq!(base, credentials_digest(&credentials("k", b"s", None)));
        let others = [
            credentials_digest(&credentials("k2", b"s", None)),
            credentials_digest(&credentials("k", b"s2", None)),
            // The same bytes moved from the key to the secret.
            credentials_digest(&credentials("ks", b"", None)),
            credentials_digest(&credentials("k", b"s", totp())),
            credentials_digest(&credentials("k", b"s", password())),
        ];
        let mut all = vec![base];
        all.extend(others);
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "a change went unseen");
    }

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
}
