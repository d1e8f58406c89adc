//! Reload triggers besides SIGHUP: polling the config file and the secret
//! files it names, so a rotated Kubernetes Secret (whose mounted files the
//! kubelet swaps in place) takes effect without a restart or a signal.
//! Every read is off the runtime, bounded and with a deadline
//! ([`crate::files`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::ReloadRequest;
use crate::config::{Config, SecretSource};
use crate::files::{MAX_CONFIG_BYTES, MAX_SECRET_BYTES, READ_TIMEOUT, read_off_runtime, read_regular};

/// A digest of the config file and every secret file it names. A config
/// that does not load still has a digest (of its bytes and the error), so a
/// fix to it is noticed too. Blocking: call it off the runtime.
pub fn sources_digest(path: &Path) -> [u8; 32] {
    let mut h = Sha256::new();
    match read_regular(path, MAX_CONFIG_BYTES) {
        Ok(read) => h.update(read.text.as_bytes()),
        Err(e) => h.update(e.to_string().as_bytes()),
    }
    match Config::load(path) {
        Ok(config) => {
            for account in &config.accounts {
                for (_, source) in &account.sources {
                    if let SecretSource::File(file) = source {
                        h.update(file.as_os_str().as_encoded_bytes());
                        match read_regular(file, MAX_SECRET_BYTES) {
                            Ok(read) => h.update(read.text.as_bytes()),
                            Err(e) => h.update(e.to_string().as_bytes()),
                        }
                    }
                }
            }
            // The serving certificate, key and client CA (cert-manager
            // renews them in place), the cluster CA, the audit key.
            if let Some(tls) = &config.listen.tls {
                h.update(tls.digest);
            }
            if let Some(k) = &config.kubernetes {
                h.update(Sha256::digest(&k.ca_pem));
            }
            if let Some(audit) = &config.audit {
                h.update(Sha256::digest(audit.key.expose()));
            }
        }
        Err(e) => h.update(e.to_string().as_bytes()),
    }
    h.finalize().into()
}

/// [`sources_digest`] on the blocking pool within [`READ_TIMEOUT`]; `None`
/// when the read stalled.
async fn digest_off_runtime(path: &Path) -> Option<[u8; 32]> {
    let path = path.to_owned();
    read_off_runtime(READ_TIMEOUT, move || sources_digest(&path)).await.ok()
}

/// Every `interval`, checks whether the config or its secret files changed
/// and, if so, asks for a reload on `requests`. Ends when `requests` closes.
/// The baseline is taken before this returns, so no change made after the
/// call is missed.
pub async fn poll_sources(path: PathBuf, interval: Duration, requests: mpsc::Sender<ReloadRequest>) {
    let mut seen = digest_off_runtime(&path).await;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(now) = digest_off_runtime(&path).await else {
                tracing::warn!(config = %path.display(), "reading the config or its secret files stalled; will look again");
                continue;
            };
            if seen != Some(now) {
                seen = Some(now);
                tracing::info!(config = %path.display(), "config or secret files changed; reloading");
                if requests.send(ReloadRequest::default()).await.is_err() {
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
        poll_sources(config.clone(), Duration::from_millis(20), tx).await;
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

    fn leaf() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_renewed_certificate_changes_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("key"), "KEY").unwrap();
        std::fs::write(d.join("secret"), "AAECAw==").unwrap();
        let (cert, key) = leaf();
        std::fs::write(d.join("tls.crt"), cert).unwrap();
        std::fs::write(d.join("tls.key"), key).unwrap();
        let config = d.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "[listen.tls]\ncert = {{ file = \"{0}/tls.crt\" }}\nkey = {{ file = \"{0}/tls.key\" }}\n\
                 [[account]]\nname = \"main\"\napi_key = {{ file = \"{0}/key\" }}\napi_secret = {{ file = \"{0}/secret\" }}\n\
                 [[consumer]]\nname = \"c\"\ncredential_sha256 = \"{1}\"\naccounts = [\"main\"]\n",
                d.display(),
                "0".repeat(64)
            ),
        )
        .unwrap();
        Config::load(&config).expect("a valid config");
        let before = sources_digest(&config);
        assert_eq!(before, sources_digest(&config));
        let (cert, key) = leaf();
        std::fs::write(d.join("tls.crt"), cert).unwrap();
        std::fs::write(d.join("tls.key"), key).unwrap();
        assert_ne!(
            before,
            sources_digest(&config),
            "a renewed certificate is a change to reload"
        );
    }
}
