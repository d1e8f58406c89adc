//! The audit trail: one JSON line per decision (`token.served`,
//! `token.invalidated`, `auth.failed`, `config.reloaded`), on its own stream
//! (stdout, or a file appended to; logs go to stderr), naming tokens only by
//! a keyed fingerprint: HMAC-SHA256 under `[audit] fingerprint_key`, so a
//! security team holding that key can answer "which consumer received token
//! X, and when" (`kraken-token-broker audit fingerprint` prints a token's
//! fingerprint), while the audit never holds a token.
//!
//! Auditing never blocks serving: lines go through a bounded queue to a
//! writer task. When the sink cannot keep up and the queue is full, the line
//! is dropped, `kraken_token_broker_audit_events_dropped_total` counts it,
//! and a WARN says so (at most every 10 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::config::{AuditConfig, AuditSink};
use crate::metrics::Metrics;
use crate::secret::SecretBytes;

/// Lines queued for the writer at most.
pub const QUEUE: usize = 16_384;
/// Fingerprints remembered (tokens change every few minutes per account).
const FINGERPRINT_CACHE: usize = 256;

/// HMAC-SHA256 of `token` under `key`, as 64 lowercase hex characters.
pub fn fingerprint(key: &[u8], token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Where audit lines are handed over.
pub struct Auditor {
    key: SecretBytes,
    sink: AuditSink,
    tx: mpsc::Sender<String>,
    /// Token SHA-256 → fingerprint: one HMAC per token, not per request.
    fingerprints: DashMap<[u8; 32], Arc<str>>,
    metrics: Metrics,
    last_drop_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Starts the writer task, which opens the sink (a file is created 0600
    /// and appended to; `serve` checks at start-up that it can be).
    pub fn start(config: &AuditConfig, metrics: Metrics) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sink = config.sink.clone();
        tokio::spawn(async move {
            match sink {
                AuditSink::Stdout => write_all(tokio::io::stdout(), rx).await,
                AuditSink::File(path) => match open(&path).await {
                    Ok(file) => write_all(file, rx).await,
                    Err(error) => {
                        tracing::error!(%error, path = %path.display(), "cannot open the audit file: audit lines are lost")
                    }
                },
            }
        });
        Arc::new(Self {
            key: config.key.clone(),
            sink: config.sink.clone(),
            tx,
            fingerprints: DashMap::new(),
            metrics,
            last_drop_warning: Mutex::new(None),
        })
    }

    /// Whether this auditor writes `config` (else a reload starts another).
    pub fn serves(&self, config: &AuditConfig) -> bool {
        self.sink == config.sink && self.key == config.key
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
    pub fn record(&self, event: &'static str, mut fields: Value) {
        fields["event"] = json!(event);
        fields["time"] = json!(humantime::format_rfc3339_micros(SystemTime::now()).to_string());
        let line = fields.to_string();
        if self.tx.try_send(line).is_err() {
            self.metrics.audit_dropped();
            let mut last = self
                .last_drop_warning
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                warn!(
                    queue = QUEUE,
                    "audit sink is not keeping up: audit lines are being dropped (counted in audit_events_dropped_total)"
                );
            }
        }
    }
}

/// Opens (creating, 0600) an audit file for appending.
pub async fn open(path: &std::path::Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await
}

async fn write_all<W: tokio::io::AsyncWrite + Unpin>(mut sink: W, mut rx: mpsc::Receiver<String>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut bytes = Vec::with_capacity(batch.len() * 256);
        for line in batch.drain(..) {
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        if let Err(error) = sink.write_all(&bytes).await {
            warn!(%error, "cannot write audit lines");
        }
        let _ = sink.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            fingerprint(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(fingerprint(b"k1", "tok"), fingerprint(b"k2", "tok"));
    }

    #[tokio::test]
    async fn lines_reach_the_file_and_a_full_queue_drops_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            sink: AuditSink::File(path.clone()),
            key: SecretBytes::new(b"0123456789abcdef".to_vec()),
        };
        let metrics = Metrics::new();
        let auditor = Auditor::start(&config, metrics.clone());
        auditor.record("token.served", json!({"consumer": "engine"}));
        let line = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["event"], "token.served");
        assert_eq!(v["consumer"], "engine");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A queue nobody drains fills and drops, never blocks.
        let (tx, _rx) = mpsc::channel(1);
        let stuck = Auditor {
            key: config.key.clone(),
            sink: AuditSink::Stdout,
            tx,
            fingerprints: DashMap::new(),
            metrics: metrics.clone(),
            last_drop_warning: Mutex::new(None),
        };
        for _ in 0..10 {
            stuck.record("auth.failed", json!({}));
        }
        assert!(metrics.encode().contains("audit_events_dropped_total 9"));
    }
}
