//! What ends a relay besides either side closing: a reload that revokes
//! the consumer, its grant or a method it used, and a proof of identity
//! that lapses.

use std::time::Duration;

use tokio::time::Instant;

use super::{End, Session};
use crate::http::auth::{Reproof, prove_again};
use crate::http::relay::Refusal;

/// After a ServiceAccount review could not be had, when to try again.
const REPROVE_RETRY: Duration = Duration::from_secs(5);

impl Session {
    /// After a reload: the same consumer (name and identity), still granted
    /// the account, still allowed every method it used; otherwise the end.
    pub(super) fn follow_reload(&mut self) -> Result<(), End> {
        let table = self.state.table.load_full();
        let name = self.consumer.name.clone();
        let revoked = |why: String| {
            self.state.metrics.relay().refused(&name, Refusal::Revoked);
            End::Close(1008, why)
        };
        let Some(consumer) = table
            .consumers
            .iter()
            .find(|c| c.name == self.consumer.name && c.identity == self.consumer.identity)
            .cloned()
        else {
            return Err(revoked(format!(
                "consumer `{name}` was removed from the broker's config"
            )));
        };
        let Some(grant) = consumer.grants.iter().find(|g| g.account == self.account) else {
            return Err(revoked(format!(
                "consumer `{name}` is no longer granted account `{}`",
                self.account
            )));
        };
        if let Some((method, channel)) = self.used.iter().find(|(m, c)| !consumer.relay.allows(m, c.as_deref())) {
            let what = channel.as_ref().map_or(method.clone(), |c| format!("{method}:{c}"));
            return Err(revoked(format!("`{what}` is no longer allowed for consumer `{name}`")));
        }
        self.handle = grant.handle.clone();
        self.consumer = consumer;
        self.table = table;
        Ok(())
    }

    /// The consumer's proof lapsed: a client certificate past its
    /// `notAfter` ends the relay; a ServiceAccount token is reviewed again.
    pub(super) async fn prove_again(&mut self) -> Result<(), End> {
        let outcome = match &self.bearer {
            None => Reproof::Refused,
            Some(bearer) => prove_again(&self.state, bearer, &self.consumer).await,
        };
        match outcome {
            Reproof::Proven(next) => {
                self.reprove_at = next;
                Ok(())
            }
            Reproof::Unknown => {
                // The API server is down or busy: the session goes on, and
                // the review is tried again shortly.
                self.reprove_at = Instant::now().checked_add(REPROVE_RETRY);
                Ok(())
            }
            Reproof::Refused => {
                self.state
                    .metrics
                    .relay()
                    .refused(&self.consumer.name, Refusal::Revoked);
                Err(End::Close(
                    1008,
                    "the consumer's proof of identity is no longer accepted: reconnect with a current one".into(),
                ))
            }
        }
    }
}
