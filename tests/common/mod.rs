//! Helpers shared by the integration tests: a simulator on 127.0.0.1:0 and
//! condition waits with deadlines (never a bare sleep).
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kraken_token_broker::sim::{self, SimConfig, SimHandle, SimKey};
use tokio_util::sync::CancellationToken;

/// Starts a simulator on an ephemeral loopback port.
pub async fn start_sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    sim::start(config, listener, CancellationToken::new()).expect("simulator starts")
}

/// A simulator with one generated key; returns the key too.
pub async fn sim_with_key(token_ttl: Duration) -> (SimHandle, SimKey) {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        token_ttl,
        ..SimConfig::default()
    })
    .await;
    (sim, key)
}

/// Polls `check` until it returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

use kraken_token_broker::broker::{self, Listeners};
use kraken_token_broker::config::{AccountConfig, Config, ConsumerConfig, KrakenConfig, ListenConfig};
use kraken_token_broker::http::auth::new_credential;
use kraken_token_broker::kraken::{ApiCredentials, decode_secret};
use kraken_token_broker::metrics::Metrics;
use kraken_token_broker::secret::SecretString;
use kraken_token_broker::token::RefreshPolicy;

/// A refresh policy in seconds, for short simulator lifetimes.
pub fn policy(before_expiry: f64, min_served: f64, jitter: f64, retry: (f64, f64)) -> RefreshPolicy {
    RefreshPolicy {
        refresh_before_expiry: Duration::from_secs_f64(before_expiry),
        min_served_ttl: Duration::from_secs_f64(min_served),
        jitter: Duration::from_secs_f64(jitter),
        retry_initial: Duration::from_secs_f64(retry.0),
        retry_max: Duration::from_secs_f64(retry.1),
    }
}

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
        },
        kraken: KrakenConfig {
            rest_url: sim.rest_url(),
            ws_url: sim.ws_url(),
            timeout: Duration::from_secs(2),
        },
        refresh: policy,
        accounts,
        consumers: vec![ConsumerConfig {
            name: "engine".into(),
            credential_sha256,
            accounts: names,
        }],
    }
}

/// A broker running in this process against a simulator.
pub struct Broker {
    pub api: String,
    pub admin: String,
    pub credential: String,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
    /// Sends a reload (as SIGHUP does), when started from files.
    pub reload: Option<tokio::sync::mpsc::Sender<()>>,
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
    }
}

impl Broker {
    /// One account `main` signing with `key`, one consumer granted it.
    pub async fn start(sim: &SimHandle, key: &SimKey, policy: RefreshPolicy) -> Broker {
        Self::start_with(sim, vec![account("main", key)], policy).await
    }

    pub async fn start_with(sim: &SimHandle, accounts: Vec<AccountConfig>, policy: RefreshPolicy) -> Broker {
        Self::start_limited(sim, accounts, policy, Default::default()).await
    }

    /// As `start_with`, with the listeners' limits given.
    pub async fn start_limited(
        sim: &SimHandle,
        accounts: Vec<AccountConfig>,
        policy: RefreshPolicy,
        limits: kraken_token_broker::http::server::ServerLimits,
    ) -> Broker {
        let (credential, credential_sha256) = new_credential();
        let config = test_config(sim, accounts, policy, credential_sha256);
        Self::launch(config, credential.expose().to_owned(), None, limits).await
    }

    /// One account `main` whose key and secret are in files, loaded through
    /// `Config::load` as `serve` does; `reload()` re-reads them.
    pub async fn start_from_files(sim: &SimHandle, key: &SimKey, refresh: &str, timeout: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("api-key"), format!("{}\n", key.api_key)).unwrap();
        std::fs::write(d.join("api-secret"), format!("{}\n", key.api_secret)).unwrap();
        let (credential, hash) = new_credential();
        let text = config_text(sim, d, &hex::encode(hash), refresh, "")
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
        config.listen = ListenConfig {
            api: api.local_addr().unwrap(),
            admin: admin.local_addr().unwrap(),
        };
        let (api_addr, admin_addr) = (config.listen.api, config.listen.admin);
        let (reloads, reload, dir) = match files {
            Some((path, dir)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                (Some(broker::Reloads { path, events: rx }), Some(tx), Some(dir))
            }
            None => (None, None, None),
        };
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(broker::run(
            config,
            Listeners { api, admin },
            reloads,
            shutdown.clone(),
            metrics.clone(),
            || 0.5,
            limits,
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

    /// Asks for a reload, as SIGHUP does.
    pub async fn reload(&self) {
        self.reload
            .as_ref()
            .expect("started from files")
            .send(())
            .await
            .unwrap();
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

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// The value of `kraken_token_broker_<series>` in Prometheus text, or panic.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let wanted = format!("kraken_token_broker_{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&wanted))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---- the real binary as a subprocess ---------------------------------------

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

pub const BIN: &str = env!("CARGO_BIN_EXE_kraken-token-broker");

/// A `kraken-token-broker serve` process with its stderr (JSON logs) captured.
pub struct Served {
    pub child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub api: String,
    pub admin: String,
    pub credential: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A config for one account `main` whose key and secret are in `dir`.
pub fn config_text(sim: &SimHandle, dir: &Path, credential_sha256: &str, refresh: &str, extra_account: &str) -> String {
    format!(
        r#"
[listen]
api = "127.0.0.1:0"
admin = "127.0.0.1:0"

[kraken]
rest_url = "{rest}"
ws_url = "{ws}"
timeout = "2s"

[refresh]
{refresh}

[[account]]
name = "main"
api_key = {{ file = "{dir}/api-key" }}
api_secret = {{ file = "{dir}/api-secret" }}
{extra_account}

[[consumer]]
name = "engine"
credential_sha256 = "{credential_sha256}"
accounts = ["main"]
"#,
        rest = sim.rest_url(),
        ws = sim.ws_url(),
        dir = dir.display(),
    )
}

impl Served {
    /// Starts `serve` with a config for `key` and waits until it listens.
    pub async fn start(sim: &SimHandle, key: &SimKey, refresh: &str, env: &[(&str, &str)]) -> Served {
        Self::start_with(sim, key, refresh, "", env).await
    }

    pub async fn start_with(
        sim: &SimHandle,
        key: &SimKey,
        refresh: &str,
        extra_account: &str,
        env: &[(&str, &str)],
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "api-key", &format!("{}\n", key.api_key));
        write(dir.path(), "api-secret", &format!("{}\n", key.api_secret));
        let (credential, hash) = new_credential();
        let text = config_text(sim, dir.path(), &hex::encode(hash), refresh, extra_account);
        let config = write(dir.path(), "broker.toml", &text);
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut served = Served {
            child,
            logs,
            api: String::new(),
            admin: String::new(),
            credential: credential.expose().to_owned(),
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        let line = served
            .wait_log("the broker to listen", Duration::from_secs(10), |l| {
                l["message"] == "broker serving"
            })
            .await;
        served.api = format!("http://{}", line["api"].as_str().unwrap());
        served.admin = format!("http://{}", line["admin"].as_str().unwrap());
        served
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Every log line so far, parsed as JSON.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a log line is not JSON: {l}")))
            .collect()
    }

    pub fn raw_logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits for a log line matching `pred`.
    pub async fn wait_log(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let logs = Arc::clone(&self.logs);
        wait_for(what, deadline, || {
            let found = logs
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| pred(l));
            async move { found }
        })
        .await
    }

    pub async fn get(&self, path_and_query: &str, credential: Option<&str>) -> (u16, String) {
        let mut request = self.http.get(format!("{}{path_and_query}", self.api));
        if let Some(c) = credential {
            request = request.bearer_auth(c);
        }
        let response = request.send().await.expect("the broker answers");
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The text of an admin page (`/metrics`, `/readyz`).
    pub async fn admin_text(&self, path: &str) -> String {
        let response = self.http.get(format!("{}{path}", self.admin)).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// Waits for the process to exit, at most `deadline`.
    pub async fn exit(&mut self, deadline: Duration) -> ExitStatus {
        let until = std::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < until,
                "the broker did not exit within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion: exit status, stdout, stderr.
pub fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(BIN);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One answer a consumer got.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub at_ms: u64,
    pub status: u16,
    pub retry_after: bool,
    pub token: Option<String>,
}

/// A consumer fetching `url` until `stop` is set, pausing `pause` between
/// fetches; the answers it got.
pub fn fetch_until(
    http: reqwest::Client,
    url: String,
    credential: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<Fetched>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let r = http
                .get(&url)
                .bearer_auth(&credential)
                .send()
                .await
                .expect("the broker answers");
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            seen.push(Fetched {
                at_ms: now_ms(),
                status,
                retry_after,
                token: body["token"].as_str().map(str::to_owned),
            });
            tokio::time::sleep(pause).await;
        }
        seen
    })
}

/// The resident set of a process, in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
