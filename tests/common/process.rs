//! The real binary as a subprocess.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::sim::{SimHandle, SimKey};

use super::wait_for;

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
    /// The thread copying stderr: joined once the process exits, so every
    /// line it wrote is in `logs`.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A config for one account `main` whose key and secret are in `dir`.
pub fn config_text(sim: &SimHandle, dir: &Path, credential_sha256: &str, refresh: &str, extra_account: &str) -> String {
    config_text_with(sim, dir, credential_sha256, "", refresh, extra_account)
}

/// Writes `key`'s API key and secret to `dir/api-key` and `dir/api-secret`.
pub fn write_key(dir: &Path, key: &SimKey) {
    write(dir, "api-key", &format!("{}\n", key.api_key));
    write(dir, "api-secret", &format!("{}\n", key.api_secret));
}

/// The tables every test config shares: both listeners on 127.0.0.1:0,
/// `[kraken]` on `sim` (plus `kraken` lines), `[refresh]` (the `refresh`
/// lines) and one account `main` whose key and secret are in `dir`. Append
/// consumers and sections (`[listen.tls]`, `[kubernetes]`, `[audit]`) to it.
pub fn config_tables(sim: &SimHandle, dir: &Path, kraken: &str, refresh: &str) -> String {
    format!(
        r#"
[listen]
api = "127.0.0.1:0"
admin = "127.0.0.1:0"

[kraken]
rest_url = "{rest}"
ws_url = "{ws}"
timeout = "2s"
{kraken}

[refresh]
{refresh}

[[account]]
name = "main"
api_key = {{ file = "{dir}/api-key" }}
api_secret = {{ file = "{dir}/api-secret" }}
"#,
        rest = sim.rest_url(),
        ws = sim.ws_url(),
        dir = dir.display(),
    )
}

/// A consumer `name` with a credential (its SHA-256 in hex) granted `main`,
/// under a rate limit that never binds: tests play many engines with one
/// consumer.
pub fn credential_consumer(name: &str, credential_sha256: &str) -> String {
    format!(
        r#"
[[consumer]]
name = "{name}"
credential_sha256 = "{credential_sha256}"
accounts = ["main"]
rate_limit = {{ per_second = 10000, burst = 100000 }}
"#
    )
}

/// As [`config_text`], with more lines for the `[kraken]` table.
pub fn config_text_with(
    sim: &SimHandle,
    dir: &Path,
    credential_sha256: &str,
    kraken: &str,
    refresh: &str,
    extra_account: &str,
) -> String {
    format!(
        "{}{extra_account}\n{}",
        config_tables(sim, dir, kraken, refresh),
        credential_consumer("engine", credential_sha256)
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
        Self::start_full(sim, key, "", refresh, extra_account, env).await
    }

    /// As [`Served::start_with`], with more lines for the `[kraken]` table.
    pub async fn start_full(
        sim: &SimHandle,
        key: &SimKey,
        kraken: &str,
        refresh: &str,
        extra_account: &str,
        env: &[(&str, &str)],
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        write_key(dir.path(), key);
        let (credential, hash) = new_credential();
        let text = config_text_with(sim, dir.path(), &hex::encode(hash), kraken, refresh, extra_account);
        let config = write(dir.path(), "broker.toml", &text);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Self::spawn(&config, dir, credential.expose(), http, env).await
    }

    /// Runs `serve --config config` (files in `dir`), waits until it
    /// listens; `http` is the client for its API (`https://` when the
    /// config has `[listen.tls]`, which `http` must then trust).
    pub async fn spawn(
        config: &Path,
        dir: tempfile::TempDir,
        credential: &str,
        http: reqwest::Client,
        env: &[(&str, &str)],
    ) -> Served {
        let tls = std::fs::read_to_string(config).unwrap().contains("[listen.tls]");
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config"])
            .arg(config)
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
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut served = Served {
            child,
            logs,
            api: String::new(),
            admin: String::new(),
            credential: credential.to_owned(),
            dir,
            http,
            reader: Some(reader),
        };
        let line = served
            .wait_log("the broker to listen", Duration::from_secs(10), |l| {
                l["message"] == "broker serving"
            })
            .await;
        let scheme = if tls { "https" } else { "http" };
        served.api = format!("{scheme}://{}", line["api"].as_str().unwrap());
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
                // The pipe ends with the process: read it to the end.
                if let Some(reader) = self.reader.take() {
                    tokio::task::spawn_blocking(move || reader.join())
                        .await
                        .unwrap()
                        .unwrap();
                }
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
