//! Helpers shared by the integration tests, by what they start: a simulator
//! ([`sim`]), a broker inside the test process ([`broker`]), the real binary
//! ([`process`]); and here, condition waits with deadlines (never a bare
//! sleep), a consumer loop and readings of metrics and memory.
#![allow(dead_code, unused_imports)]

pub mod apiserver;
pub mod broker;
pub mod kraken_ws;
pub mod pki;
pub mod process;
pub mod sim;
pub mod sse;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kraken_token_broker::token::RefreshPolicy;

pub use broker::{Broker, account, test_config};
pub use process::{BIN, Served, config_tables, config_text, credential_consumer, run_bin, write, write_key};
pub use sim::{sim_with_key, start_sim};

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

/// `[refresh]` lines for the simulator's short tokens (a few seconds):
/// refreshed 1.5 s ahead, retried quickly.
pub const FAST_REFRESH: &str = r#"
refresh_before_expiry = "1500ms"
min_served_ttl = "1s"
jitter = "200ms"
retry_initial = "200ms"
retry_max = "1s"
"#;

/// A refresh policy in seconds, for short simulator lifetimes.
pub fn policy(before_expiry: f64, min_served: f64, jitter: f64, retry: (f64, f64)) -> RefreshPolicy {
    RefreshPolicy {
        refresh_before_expiry: Duration::from_secs_f64(before_expiry),
        min_served_ttl: Duration::from_secs_f64(min_served),
        jitter: Duration::from_secs_f64(jitter),
        retry_initial: Duration::from_secs_f64(retry.0),
        retry_max: Duration::from_secs_f64(retry.1),
        ..RefreshPolicy::default()
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
    kraken_token_broker::clock::now_unix_millis()
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
