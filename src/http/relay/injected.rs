//! The tokens a relay connection injected, and the promise kept with them:
//! none of them is ever in a frame sent to the consumer. Kraken is not
//! documented to echo a token; this holds the promise whatever it sends.

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::debug;

use crate::token::CachedToken;

/// Tokens a connection remembers having injected (a token lives 15
/// minutes; a connection sees a new one at each refresh or invalidation).
const REMEMBERED: usize = 4;

#[derive(Default)]
pub(super) struct Injected(VecDeque<Arc<CachedToken>>);

impl Injected {
    /// Remembers `token` as injected (the oldest is forgotten past
    /// [`REMEMBERED`]).
    pub(super) fn note(&mut self, token: &Arc<CachedToken>) {
        if self.0.iter().any(|t| t.sha256 == token.sha256) {
            return;
        }
        if self.0.len() == REMEMBERED {
            self.0.pop_front();
        }
        self.0.push_back(Arc::clone(token));
    }

    /// `text` with every remembered token cut out.
    pub(super) fn scrub(&self, text: &str) -> String {
        let mut out: Option<String> = None;
        for token in &self.0 {
            let value = token.token.expose();
            if !value.is_empty() && out.as_deref().unwrap_or(text).contains(value) {
                debug!(token = %token.fingerprint, "relay: a token was cut out of a frame for the consumer");
                out = Some(out.as_deref().unwrap_or(text).replace(value, crate::secret::REDACTED));
            }
        }
        out.unwrap_or_else(|| text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::secret::SecretString;

    fn token(value: &str) -> Arc<CachedToken> {
        Arc::new(CachedToken::new(
            SecretString::new(value),
            Duration::from_secs(900),
            tokio::time::Instant::now(),
            SystemTime::now(),
        ))
    }

    #[test]
    fn every_remembered_token_is_cut_out_and_the_oldest_forgotten() {
        let mut injected = Injected::default();
        let tokens: Vec<_> = (0..=REMEMBERED).map(|i| token(&format!("tok{i}-secret"))).collect();
        for t in &tokens {
            injected.note(t);
            injected.note(t);
        }
        let frame = format!(r#"{{"echo":"{}","again":"tok{}-secret"}}"#, "tok1-secret", REMEMBERED);
        let scrubbed = injected.scrub(&frame);
        assert!(!scrubbed.contains("tok1-secret") && !scrubbed.contains(&format!("tok{REMEMBERED}-secret")));
        assert_eq!(scrubbed.matches(crate::secret::REDACTED).count(), 2);
        // The first was forgotten once REMEMBERED newer ones came.
        assert!(injected.scrub("tok0-secret").contains("tok0-secret"));
        assert_eq!(
            injected.scrub(r#"{"channel":"heartbeat"}"#),
            r#"{"channel":"heartbeat"}"#
        );
    }
}
