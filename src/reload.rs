//! Reload triggers besides SIGHUP: polling the config file and the secret
//! files it names, so a rotated Kubernetes Secret (whose mounted files the
//! kubelet swaps in place) takes effect without a restart or a signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{Config, SecretSource};

/// A digest of the config file and every secret file it names. A config
/// that does not load still has a digest (of its bytes and the error), so a
/// fix to it is noticed too.
pub fn sources_digest(path: &Path) -> [u8; 32] {
    let mut h = Sha256::new();
    match std::fs::read(path) {
        Ok(bytes) => h.update(&bytes),
        Err(e) => h.update(e.to_string().as_bytes()),
    }
    match Config::load(path) {
        Ok(config) => {
            for account in &config.accounts {
                for (_, source) in &account.sources {
                    if let SecretSource::File(file) = source {
                        h.update(file.as_os_str().as_encoded_bytes());
                        h.update(std::fs::read(file).unwrap_or_default());
                    }
                }
            }
        }
        Err(e) => h.update(e.to_string().as_bytes()),
    }
    h.finalize().into()
}

/// Every `interval`, checks whether the config or its secret files changed
/// and, if so, asks for a reload on `events`. Ends when `events` closes.
/// The baseline is taken before this returns, so no change made after the
/// call is missed.
pub fn poll_sources(path: PathBuf, interval: Duration, events: mpsc::Sender<()>) {
    let mut seen = sources_digest(&path);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let p = path.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || sources_digest(&p)).await else {
                continue;
            };
            if now != seen {
                seen = now;
                tracing::info!(config = %path.display(), "config or secret files changed; reloading");
                if events.send(()).await.is_err() {
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_changed_secret_file_triggers_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("key"), "KEY-1").unwrap();
        std::fs::write(d.join("secret"), "AAECAw==").unwrap();
        let config = d.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "[[account]]\nname = \"main\"\napi_key = {{ file = \"{0}/key\" }}\napi_secret = {{ file = \"{0}/secret\" }}\n\
                 [[consumer]]\nname = \"c\"\ncredential_sha256 = \"{1}\"\naccounts = [\"main\"]\n",
                d.display(),
                "0".repeat(64)
            ),
        )
        .unwrap();
        let before = sources_digest(&config);
        assert_eq!(before, sources_digest(&config), "stable while nothing changes");

        let (tx, mut rx) = mpsc::channel(1);
        poll_sources(config.clone(), Duration::from_millis(20), tx);
        std::fs::write(d.join("key"), "KEY-2").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a reload within 5 s")
            .unwrap();
        assert_ne!(before, sources_digest(&config));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "one change, one reload"
        );
    }
}
