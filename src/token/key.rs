//! What the refresher knows of its account's key from Kraken
//! (`GetApiKeyInfo`), as readers see it, and the events it reports beyond
//! metrics (another signer using the key) to whoever listens: the audit
//! trail, wired in by the broker.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::kraken::{KeyInfo, Verdict};

/// The key as last reported by Kraken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// The last answer that could be read, and when.
    pub info: Option<(KeyInfo, SystemTime)>,
    pub verdict: Option<Verdict>,
    /// Why the last attempt to read it failed, if it did.
    pub error: Option<String>,
    /// Times the key was seen used by another signer since start.
    pub foreign_uses: u64,
}

/// Something about the key that the audit trail records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvent {
    /// Another signer holds the key: `evidence` says how it showed.
    ForeignUse {
        account: String,
        /// The key's fingerprint (never the key).
        key: String,
        evidence: String,
    },
}

/// Where key events go (nowhere by default).
#[derive(Clone, Default)]
pub struct KeyEvents(Option<Arc<dyn Fn(KeyEvent) + Send + Sync>>);

impl KeyEvents {
    pub fn new(sink: impl Fn(KeyEvent) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(sink)))
    }

    pub fn send(&self, event: KeyEvent) {
        if let Some(sink) = &self.0 {
            sink(event);
        }
    }
}

impl fmt::Debug for KeyEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "KeyEvents(sink)"
        } else {
            "KeyEvents(none)"
        })
    }
}
