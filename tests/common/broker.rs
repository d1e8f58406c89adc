//! A broker running inside the test process, against a simulator.

use std::path::PathBuf;
use std::time::Duration;

use kraken_token_broker::broker::{self, Listeners, Options, ReloadOutcome, ReloadRequest, ReloadSummary};
use kraken_token_broker::clock::WallClock;
use kraken_token_broker::config::{
    AccountConfig, Config, ConsumerConfig, Identity, KrakenConfig, ListenConfig, RateLimit,
};
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::kraken::{ApiCredentials, decode_secret};
use kraken_token_broker::metrics::Metrics;
use kraken_token_broker::secret::SecretString;
use kraken_token_broker::sim::{SimHandle, SimKey};
use kraken_token_broker::token::RefreshPolicy;
use tokio_util::sync::CancellationToken;

use super::metric_value;
use super::process::config_text_with;

/// A config on 127.0.0.1:0 for `accounts` against `sim`, with one consumer
/// `engine` granted all of them.
pub fn test_config(
    sim: &SimHandle,
    accounts: Vec<AccountConfig>,
    policy: RefreshPolicy,
    credential_sha256: [u8; 32],
) -> Config {
    let names = accounts.iter().map(|a| a.name.clone()).collect();
    Config {
        listen: ListenConfig {
            api: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        },
        kraken: KrakenConfig {
            rest_url: sim.rest_url(),
            ws_url: sim.ws_url(),
            timeout: Duration::from_secs(2),
            max_rejected_calls: kraken_token_broker::token::gate::DEFAULT_MAX_REJECTED_CALLS,
            key_info_interval: kraken_token_broker::config::DEFAULT_KEY_INFO_INTERVAL,
        },
        refresh: policy,
        accounts,
        consumers: vec![ConsumerConfig {
            name: "engine".into(),
            identity: Identity::Credential {
                sha256: credential_sha256,
            },
            accounts: names,
            // Tests play many engines with this one consumer: a limit that
            // never binds here (the limit's own tests set theirs).
            rate_limit: UNLIMITED,
            relay: Default::default(),
            relay_only: false,
        }],
        kubernetes: None,
        audit: None,
        warnings: Vec::new(),
    }
}

/// A request-rate limit that never binds.
pub const UNLIMITED: RateLimit = RateLimit {
    per_second: 1e6,
    burst: 1e6,
};

/// A broker running in this process against a simulator.
pub struct Broker {
    pub api: String,
    pub admin: String,
    pub credential: String,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), broker::Error>>,
    pub http: reqwest::Client,
    /// Sends a reload (as SIGHUP does), when started from files.
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// Holds the config and secret files, when started from files.
    pub dir: Option<tempfile::TempDir>,
}

pub fn account(name: &str, key: &SimKey) -> AccountConfig {
    AccountConfig {
        name: name.into(),
        credentials: ApiCredentials {
            api_key: SecretString::new(key.api_key.clone()),
            api_secret: decode_secret(&key.api_secret).unwrap(),
            otp: None,
        },
        sources: Vec::new(),
        key_expires_at: None,
        forbid_permissions: kraken_token_broker::kraken::key_info::DEFAULT_FORBIDDEN
            .iter()
            .map(|p| (*p).to_owned())
            .collect(),
    }
}

/// A test broker to start against a simulator: its accounts, refresh
/// policy, listener limits and extra consumers; `start` runs it with one
/// consumer `engine` (unlimited) granted every account.
pub struct Start<'s> {
    sim: &'s SimHandle,
    accounts: Vec<AccountConfig>,
    policy: RefreshPolicy,
    limits: kraken_token_broker::http::server::ServerLimits,
    consumers: Vec<ConsumerConfig>,
    key_info_interval: Option<Duration>,
}

impl Start<'_> {
    /// `[kraken] key_info_interval`, below the bounds a config file allows
    /// (a test cannot wait ten minutes).
    pub fn key_info_interval(mut self, every: Duration) -> Self {
        self.key_info_interval = Some(every);
        self
    }

    /// One account `main` signing with `key`.
    pub fn key(self, key: &SimKey) -> Self {
        self.account(account("main", key))
    }

    pub fn account(mut self, account: AccountConfig) -> Self {
        self.accounts.push(account);
        self
    }

    pub fn accounts(mut self, accounts: Vec<AccountConfig>) -> Self {
        self.accounts.extend(accounts);
        self
    }

    pub fn policy(mut self, policy: RefreshPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn limits(mut self, limits: kraken_token_broker::http::server::ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Another consumer beside `engine`.
    pub fn consumer(mut self, consumer: ConsumerConfig) -> Self {
        self.consumers.push(consumer);
        self
    }

    pub async fn start(self) -> Broker {
        let (credential, credential_sha256) = new_credential();
        let mut config = test_config(self.sim, self.accounts, self.policy, credential_sha256);
        config.consumers.extend(self.consumers);
        if let Some(every) = self.key_info_interval {
            config.kraken.key_info_interval = every;
        }
        Broker::launch(config, credential.expose().to_owned(), None, self.limits).await
    }
}

impl Broker {
    /// A broker to start against `sim` (see [`Start`]).
    pub fn on(sim: &SimHandle) -> Start<'_> {
        Start {
            sim,
            accounts: Vec::new(),
            policy: RefreshPolicy::default(),
            limits: Default::default(),
            consumers: Vec::new(),
            key_info_interval: None,
        }
    }

    /// One account `main` whose key and secret are in files, loaded through
    /// `Config::load` as `serve` does (with `refresh` lines, the Kraken
    /// `timeout`, and more lines for `[kraken]`); `reload()` re-reads them.
    pub async fn from_files(sim: &SimHandle, key: &SimKey, refresh: &str, timeout: &str, kraken: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("api-key"), format!("{}\n", key.api_key)).unwrap();
        std::fs::write(d.join("api-secret"), format!("{}\n", key.api_secret)).unwrap();
        let (credential, hash) = new_credential();
        let text = config_text_with(sim, d, &hex::encode(hash), kraken, refresh, "")
            .replace("timeout = \"2s\"", &format!("timeout = \"{timeout}\""));
        let path = d.join("broker.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).expect("a valid test config");
        Self::launch(
            config,
            credential.expose().to_owned(),
            Some((path, dir)),
            Default::default(),
        )
        .await
    }

    /// A broker loading the config file `path` (in `dir`) as `serve` does;
    /// `reload()` re-reads it. `credential` is what `get_token` sends. With
    /// `[listen.tls]`, `api` is an `https://` URL and `http` must be given a
    /// client trusting the server's CA.
    pub async fn from_config(path: PathBuf, dir: tempfile::TempDir, credential: &str) -> Broker {
        let config = Config::load(&path).unwrap_or_else(|e| panic!("a valid test config: {e}"));
        let tls = config.listen.tls.is_some();
        let mut broker = Self::launch(config, credential.to_owned(), Some((path, dir)), Default::default()).await;
        if tls {
            broker.api = broker.api.replacen("http://", "https://", 1);
        }
        broker
    }

    /// Binds both listeners on 127.0.0.1:0 and runs the broker; with a
    /// config file, reloads re-read it.
    async fn launch(
        mut config: Config,
        credential: String,
        files: Option<(PathBuf, tempfile::TempDir)>,
        limits: kraken_token_broker::http::server::ServerLimits,
    ) -> Broker {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        config.listen.api = api.local_addr().unwrap();
        config.listen.admin = admin.local_addr().unwrap();
        let (api_addr, admin_addr) = (config.listen.api, config.listen.admin);
        let (reloads, reload, dir) = match files {
            Some((path, dir)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                (Some(broker::Reloads { path, requests: rx }), Some(tx), Some(dir))
            }
            None => (None, None, None),
        };
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let options = Options {
            metrics: metrics.clone(),
            jitter: || 0.5,
            clock: WallClock::system(),
            limits,
        };
        let task = tokio::spawn(broker::run(
            config,
            Listeners { api, admin },
            reloads,
            shutdown.clone(),
            options,
        ));
        Broker {
            api: format!("http://{api_addr}"),
            admin: format!("http://{admin_addr}"),
            credential,
            metrics,
            shutdown,
            task,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            reload,
            dir,
        }
    }

    /// Asks for a reload, as SIGHUP does, and waits until it is in force
    /// (every refresher has taken its change) or refused.
    pub async fn reload_outcome(&self) -> ReloadOutcome {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.reload
            .as_ref()
            .expect("started from files")
            .send(ReloadRequest { reply: Some(reply) })
            .await
            .unwrap();
        outcome.await.expect("the broker answers a reload")
    }

    /// A reload the test expects to apply; what it changed.
    pub async fn reload(&self) -> ReloadSummary {
        match self.reload_outcome().await {
            ReloadOutcome::Applied(summary) => summary,
            other => panic!("the reload was not applied: {other:?}"),
        }
    }

    /// `GET /v1/token` with a query; status, `Retry-After`, JSON body.
    pub async fn get_token(&self, query: &str) -> (u16, Option<String>, serde_json::Value) {
        let response = self
            .http
            .get(format!("{}/v1/token{query}", self.api))
            .bearer_auth(&self.credential)
            .send()
            .await
            .expect("the broker answers");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, retry_after, body)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("{}{path}", self.admin)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The value of one exposed series, e.g. `token_valid{account="main"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics.encode(), series)
    }

    pub async fn stop(self) -> Result<(), broker::Error> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}
