//! The audit trail: one JSON line per decision ([`Event`]: `token.served`,
//! `token.invalidated`, `auth.failed`, `config.reloaded`), on its own stream
//! (stdout, or a file appended to; logs go to stderr), naming tokens only by
//! a keyed fingerprint: HMAC-SHA256 under `[audit] fingerprint_key`, so a
//! security team holding that key can answer "which consumer received token
//! X, and when" (`kraken-token-broker audit fingerprint` prints a token's
//! fingerprint), while the audit never holds a token.
//!
//! Auditing never blocks serving: lines go through a bounded queue to a
//! writer thread ([`writer`]), which writes whole lines or none, counts every
//! lost line in `kraken_token_broker_audit_events_dropped_total` with a WARN,
//! and follows a rotated or deleted file. Authentication failures are
//! summarised per address and reason ([`repeats`]): a flood costs a line per
//! [`SUMMARY_INTERVAL`], not a line per request.

pub mod event;
pub mod repeats;
pub mod writer;

pub use event::{Event, RelayOrder, ReloadResult, Via};
pub use writer::open;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AuditConfig, AuditSink};
use crate::http::address::AddressGroup;
use crate::metrics::Metrics;
use crate::secret::SecretBytes;

/// Lines queued for the writer at most.
pub const QUEUE: usize = 16_384;
/// Fingerprints remembered (tokens change every few minutes per account).
const FINGERPRINT_CACHE: usize = 256;
/// How often repeated authentication failures are summarised.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);
/// The fewest seconds between two WARNs about a full queue.
const QUEUE_WARN_EVERY: Duration = Duration::from_secs(10);

/// HMAC-SHA256 of `token` under `key`, as 64 lowercase hex characters.
pub fn fingerprint(key: &[u8], token: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The audit trail's family.
pub struct AuditMetrics {
    dropped: prometheus::IntCounter,
}

impl AuditMetrics {
    pub fn register(r: &crate::metrics::Register<'_>) -> Self {
        Self {
            dropped: r.counter(
                "audit_events_dropped_total",
                "Audit lines lost: the sink did not keep up, or a write to it failed (a full disk); serving never waits for it.",
            ),
        }
    }

    /// `lines` audit lines lost.
    pub fn dropped(&self, lines: u64) {
        self.dropped.inc_by(lines);
    }
}

/// What the auditor, its writer and its summariser share.
struct Inner {
    tx: mpsc::Sender<writer::Message>,
    metrics: Metrics,
    writer: Arc<writer::Shared>,
    repeats: Mutex<repeats::Repeats>,
    last_queue_warning: Mutex<Option<Instant>>,
}

impl Inner {
    /// Hands one event to the writer; never waits.
    fn record(&self, event: &Event) {
        let line = event::Line {
            event,
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return; // an event of strings and numbers always serialises
        };
        if self.tx.try_send(writer::Message::Line(text)).is_ok() {
            return;
        }
        self.metrics.audit().dropped(1);
        let mut last = self
            .last_queue_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() > QUEUE_WARN_EVERY) {
            *last = Some(Instant::now());
            warn!(
                queue = QUEUE,
                "audit sink is not keeping up: audit lines are being dropped (counted in audit_events_dropped_total)"
            );
        }
    }

    /// Writes one line per address and reason that failed again since the
    /// interval began.
    fn summarise(&self, since: SystemTime) {
        let repeated = self
            .repeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .end_interval();
        let since = humantime::format_rfc3339_micros(since).to_string();
        for (key, count) in repeated {
            self.record(&Event::AuthFailed {
                reason: key.reason,
                identity: key.identity,
                peer: key.peer,
                count,
                since: Some(since.clone()),
            });
        }
    }
}

/// Where audit lines are handed over.
pub struct Auditor {
    key: SecretBytes,
    sink: AuditSink,
    inner: Arc<Inner>,
    /// Token SHA-256 → fingerprint: one HMAC per token, not per request.
    fingerprints: DashMap<[u8; 32], Arc<str>>,
    /// Stops the summariser, which writes what it holds as it ends.
    stop_summarising: CancellationToken,
    /// The summariser, awaited by [`Auditor::close`].
    summariser: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Auditor {
    /// A replaced auditor (a reload changed `[audit]`) still writes its
    /// summary; its writer ends once the queue's last sender is gone.
    fn drop(&mut self) {
        self.stop_summarising.cancel();
    }
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Starts the writer thread (a file is created 0600 and appended to;
    /// `serve` checks at start-up that it can be) and the summariser.
    pub fn start(config: &AuditConfig, metrics: Metrics) -> Arc<Self> {
        Self::start_summarising_every(config, metrics, SUMMARY_INTERVAL)
    }

    /// [`Auditor::start`] with another summary interval (tests).
    pub fn start_summarising_every(config: &AuditConfig, metrics: Metrics, every: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(writer::Shared {
            metrics: metrics.clone(),
            reopen: AtomicBool::new(false),
        });
        writer::start(&config.sink, rx, Arc::clone(&shared));
        let inner = Arc::new(Inner {
            tx,
            metrics,
            writer: shared,
            repeats: Mutex::new(repeats::Repeats::default()),
            last_queue_warning: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let (summariser, stopped) = (Arc::clone(&inner), stop.clone());
        let summarising = tokio::spawn(async move {
            let mut since = SystemTime::now();
            loop {
                tokio::select! {
                    () = stopped.cancelled() => {
                        summariser.summarise(since);
                        return;
                    }
                    () = tokio::time::sleep(every) => {}
                }
                summariser.summarise(since);
                since = SystemTime::now();
            }
        });
        Arc::new(Self {
            key: config.key.clone(),
            sink: config.sink.clone(),
            inner,
            fingerprints: DashMap::new(),
            stop_summarising: stop,
            summariser: Mutex::new(Some(summarising)),
        })
    }

    /// Writes out everything recorded so far, the summary of repeated
    /// failures included, within `deadline` (the broker's shutdown): what
    /// cannot be written by then is counted as lost, with a WARN.
    pub async fn close(&self, deadline: Duration) {
        self.stop_summarising.cancel();
        let summariser = self
            .summariser
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let written = tokio::time::timeout(deadline, async {
            if let Some(summariser) = summariser {
                let _ = summariser.await;
            }
            let (ack, done) = tokio::sync::oneshot::channel();
            if self.inner.tx.send(writer::Message::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
        if written.is_err() {
            let queued = QUEUE.saturating_sub(self.inner.tx.capacity()) as u64;
            self.inner.metrics.audit().dropped(queued);
            warn!(
                lost = queued,
                ?deadline,
                "audit lines still queued at shutdown are lost: the sink did not take them in time"
            );
        }
    }

    /// Whether this auditor writes `config` (else a reload starts another).
    pub fn serves(&self, config: &AuditConfig) -> bool {
        self.sink == config.sink && self.key == config.key
    }

    /// Asks the writer to reopen its file before the next line (a reload:
    /// after logrotate, SIGHUP is the usual signal).
    pub fn reopen(&self) {
        self.inner.writer.reopen.store(true, Ordering::Relaxed);
    }

    /// The keyed fingerprint of a token, by its SHA-256 (cached).
    pub fn token_fingerprint(&self, sha256: &[u8; 32], token: &str) -> Arc<str> {
        if let Some(hit) = self.fingerprints.get(sha256) {
            return Arc::clone(&hit);
        }
        if self.fingerprints.len() >= FINGERPRINT_CACHE {
            self.fingerprints.clear();
        }
        let fp: Arc<str> = Arc::from(fingerprint(self.key.expose(), token));
        self.fingerprints.insert(*sha256, Arc::clone(&fp));
        fp
    }

    /// Records one decision; never waits.
    pub fn record(&self, event: Event) {
        self.inner.record(&event);
    }

    /// Records a refused proof of identity from `peer`: written at once the
    /// first time for its address and reason, then summarised.
    pub fn auth_failed(&self, peer: Option<IpAddr>, reason: &'static str, identity: &'static str) {
        let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| AddressGroup::of(ip).to_string());
        let key = repeats::Key { peer, reason, identity };
        let first = self
            .inner
            .repeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .count(key.clone());
        if first {
            self.inner.record(&Event::AuthFailed {
                reason,
                identity,
                peer: key.peer,
                count: 1,
                since: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn fingerprints_are_keyed_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            fingerprint(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(fingerprint(b"k1", "tok"), fingerprint(b"k2", "tok"));
    }

    fn lines(path: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    async fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = lines(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} lines in {}",
                got.len(),
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn config(path: &std::path::Path) -> AuditConfig {
        AuditConfig {
            sink: AuditSink::File(path.to_owned()),
            key: SecretBytes::new(b"0123456789abcdef".to_vec()),
        }
    }

    fn reloaded() -> Event {
        Event::ConfigReloaded {
            result: ReloadResult::Applied,
            added: None,
            changed: None,
            removed: None,
        }
    }

    #[tokio::test]
    async fn lines_reach_the_file_and_a_full_queue_drops_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let metrics = Metrics::new();
        let auditor = Auditor::start(&config(&path), metrics.clone());
        auditor.record(reloaded());
        let line = wait_for_lines(&path, 1).await.remove(0);
        assert_eq!(line["event"], "config.reloaded");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A queue nobody drains fills and drops, never blocks.
        let (tx, _rx) = mpsc::channel::<writer::Message>(1);
        let stuck = Inner {
            tx,
            metrics: metrics.clone(),
            writer: Arc::clone(&auditor.inner.writer),
            repeats: Mutex::default(),
            last_queue_warning: Mutex::new(None),
        };
        for _ in 0..10 {
            stuck.record(&reloaded());
        }
        assert!(metrics.encode().contains("audit_events_dropped_total 9"));
    }

    #[tokio::test]
    async fn a_rotated_or_deleted_file_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let auditor = Auditor::start(&config(&path), Metrics::new());
        auditor.record(reloaded());
        wait_for_lines(&path, 1).await;
        // logrotate: rename, then SIGHUP (a reload asks for a reopen).
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        auditor.reopen();
        auditor.record(reloaded());
        wait_for_lines(&path, 1).await;
        assert_eq!(lines(&dir.path().join("audit.jsonl.1")).len(), 1);
        // Deleted, with no signal: the path is checked and a new file made.
        std::fs::remove_file(&path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "the deleted file was never made again");
            auditor.record(reloaded());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!lines(&path).is_empty());
    }

    #[tokio::test]
    async fn closing_writes_everything_recorded_and_the_last_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // A summary interval that never ends by itself.
        let auditor = Auditor::start_summarising_every(&config(&path), Metrics::new(), Duration::from_secs(3600));
        for _ in 0..500 {
            auditor.auth_failed(Some("10.0.0.9".parse().unwrap()), "invalid", "credential");
        }
        for _ in 0..2000 {
            auditor.record(reloaded());
        }
        auditor.close(Duration::from_secs(10)).await;
        // No wait: everything is in the file when close returns.
        let got = lines(&path);
        assert_eq!(got.len(), 2 + 2000, "the first failure, 2000 lines, the last summary");
        assert_eq!(got.last().unwrap()["count"], 499);
    }

    #[tokio::test]
    async fn repeated_auth_failures_are_summarised_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let auditor = Auditor::start_summarising_every(&config(&path), Metrics::new(), Duration::from_millis(200));
        let attacker: IpAddr = "10.0.0.9".parse().unwrap();
        for _ in 0..10_000 {
            auditor.auth_failed(Some(attacker), "invalid", "credential");
        }
        auditor.auth_failed(Some("2001:db8::1".parse().unwrap()), "missing", "none");
        let got = wait_for_lines(&path, 3).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            (got[0]["peer"].as_str(), got[0]["count"].as_u64()),
            (Some("10.0.0.9"), Some(1))
        );
        assert_eq!(got[1]["peer"], "2001:db8::/64");
        assert_eq!(got[2]["count"], 9_999);
        assert_eq!(got[2]["event"], "auth.failed");
        assert!(got[2]["since"].is_string());
    }
}
