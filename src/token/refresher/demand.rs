//! On-demand requests: consumers wanting a token good enough for them, and
//! reports of a token Kraken rejected. A refresh one of them forces comes out
//! of the account's budget and the asking consumer's own share, so one
//! consumer in a loop cannot burn the key's call counter or another's share.
//! Waiters are answered when a call lands, or at once when none can.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::warn;

use super::super::policy::Next;
use super::Refresher;
use super::handle::{Answer, Cause, Request, Unavailable};
use super::state::{State, Trigger, Waiter};
use crate::bucket::TokenBucket;

/// On-demand refreshes (a `min_ttl` above what is held, a rejected token)
/// each consumer may cause in a burst ...
pub const FORCED_REFRESH_BURST: u32 = 3;
/// ... and how often one more after that: each consumer's own share, so one
/// consumer in a loop cannot spend another's.
pub const FORCED_REFRESH_EVERY: Duration = Duration::from_secs(10);
/// On-demand refreshes an account allows in a burst, whoever asks ...
pub const ACCOUNT_FORCED_BURST: u32 = 10;
/// ... and how often one more after that. Kraken's Starter tier decays one
/// call in 3 s: many consumers together still cannot burn the key's counter.
pub const ACCOUNT_FORCED_EVERY: Duration = Duration::from_secs(5);
/// Consumers whose shares are remembered at most (consumers are few).
const MAX_SHARES: usize = 1024;

impl Refresher {
    pub(super) fn on_request(&mut self, request: Request) {
        match request {
            Request::Want {
                min_ttl,
                consumer,
                reply,
            } => self.serve_or_wait(min_ttl, &consumer, reply),
            Request::Invalidate {
                sha256,
                consumer,
                reply,
            } => {
                let now = Instant::now();
                let reported_current = self.current.as_ref().is_some_and(|t| t.sha256 == sha256);
                // Beyond the reporter's share the token stays in place for
                // everyone else: the refusal is the reporter's alone.
                if reported_current
                    && self.forced_now(now)
                    && let Err(wait) = self.take_share(&consumer, now)
                {
                    warn!(
                        account = %self.name, consumer = %consumer, retry_in = ?wait,
                        "a consumer's report of a rejected token refused: its share of forced refreshes is spent; the token stays"
                    );
                    let _ = reply.send(Err(Unavailable {
                        retry_after: wait,
                        cause: Cause::ConsumerShareSpent,
                    }));
                    return;
                }
                if let Some(current) = self.current.take_if(|t| t.sha256 == sha256) {
                    warn!(
                        account = %self.name,
                        consumer = %consumer,
                        token = %current.fingerprint,
                        "consumer reports the token rejected by Kraken; minting a new one"
                    );
                    self.metrics.token_dropped();
                    self.valid_reported = Some(false);
                    self.publish();
                }
                // The share, if a refresh is forced, was taken above.
                self.serve_or_wait_taken(Duration::ZERO, reply);
            }
        }
    }

    /// Whether a call now would be an on-demand (forced) refresh: nothing
    /// is due, nothing is under way, no failure is being waited out.
    pub(super) fn forced_now(&self, now: Instant) -> bool {
        matches!(self.state, State::Due { at } if now < at)
    }

    /// Takes one forced refresh from `consumer`'s own share.
    pub(super) fn take_share(&mut self, consumer: &Arc<str>, now: Instant) -> Result<(), Duration> {
        if self.shares.len() >= MAX_SHARES && !self.shares.contains_key(consumer) {
            self.shares.clear();
        }
        self.shares
            .entry(Arc::clone(consumer))
            .or_insert_with(|| TokenBucket::every(FORCED_REFRESH_BURST, FORCED_REFRESH_EVERY, now))
            .take(now)
    }

    pub(super) fn serve_or_wait(&mut self, min_ttl: Duration, consumer: &Arc<str>, reply: oneshot::Sender<Answer>) {
        let now = Instant::now();
        let need = self.rule().need(min_ttl);
        let good_enough = self.current.as_ref().is_some_and(|t| t.lasts(need, now));
        if !good_enough
            && self.forced_now(now)
            && min_ttl <= self.lifetime_hint()
            && let Err(wait) = self.take_share(consumer, now)
        {
            let _ = reply.send(Err(Unavailable {
                retry_after: wait,
                cause: Cause::ConsumerShareSpent,
            }));
            return;
        }
        self.serve_or_wait_taken(min_ttl, reply);
    }

    /// Serves the token, or waits for one (a forced refresh's share taken).
    pub(super) fn serve_or_wait_taken(&mut self, min_ttl: Duration, reply: oneshot::Sender<Answer>) {
        let now = Instant::now();
        let need = self.rule().need(min_ttl);
        if let Some(token) = self.current.as_ref().filter(|t| t.lasts(need, now)) {
            let _ = reply.send(Ok(Arc::clone(token)));
            return;
        }
        let lifetime = self.lifetime_hint();
        // Only a consumer's own min_ttl beyond what tokens ever have is its
        // mistake; a lifetime below min_served_ttl is Kraken's (a 503).
        if min_ttl > lifetime {
            let _ = reply.send(Err(Unavailable {
                retry_after: Duration::ZERO,
                cause: Cause::Unsatisfiable { lifetime },
            }));
            return;
        }
        self.waiters.push(Waiter { need, reply });
        self.demand(now);
    }

    /// Someone waits for a better token than the one held.
    pub(super) fn demand(&mut self, now: Instant) {
        let due = match &self.state {
            State::Calling { .. } => return, // answered when it lands
            State::Failed { .. } => {
                let unavailable = self.failed_unavailable(now);
                self.answer_waiters(now, unavailable);
                return;
            }
            State::Due { at } => *at,
        };
        if now >= due {
            // Due anyway (cold start, or the schedule): not a forced refresh.
            self.start_call(Trigger::Automatic);
            return;
        }
        match self.budget.take(now) {
            Ok(()) => self.start_call(Trigger::Automatic),
            Err(wait) => {
                warn!(
                    account = %self.name,
                    retry_in = ?wait,
                    "on-demand refresh refused: too many lately (min_ttl or invalidation requests)"
                );
                if self.current.is_none() {
                    // Nothing to serve: refresh as soon as the budget allows.
                    self.state = State::Due {
                        at: due.min(now + wait),
                    };
                }
                let unavailable = Unavailable {
                    retry_after: wait,
                    cause: Cause::ForcedRefreshLimited,
                };
                self.answer_waiters(now, Some(unavailable));
            }
        }
    }

    /// What waiters are told while the last call's failure stands.
    pub(super) fn failed_unavailable(&self, now: Instant) -> Option<Unavailable> {
        let State::Failed { failure, .. } = &self.state else {
            return None;
        };
        let cause = match (failure.next, failure.short_lifetime) {
            (Next::LockedOut { .. }, _) => Cause::CircuitOpen,
            (_, Some(lifetime)) => Cause::TokensTooShort {
                lifetime,
                min_served_ttl: self.setup.policy.min_served_ttl,
            },
            _ => Cause::RefreshFailing(failure.reason),
        };
        Some(Unavailable {
            retry_after: failure.next.at(now).saturating_duration_since(now),
            cause,
        })
    }

    /// Answers every waiter that can be answered: with the current token when
    /// it is good enough, else (when nothing is in flight) with `otherwise`.
    pub(super) fn answer_waiters(&mut self, now: Instant, otherwise: Option<Unavailable>) {
        let in_flight = matches!(self.state, State::Calling { .. });
        let lifetime = self.lifetime_hint();
        for waiter in std::mem::take(&mut self.waiters) {
            if waiter.reply.is_closed() {
                continue; // the consumer gave up
            }
            let answer = match self.current.as_ref().filter(|t| t.lasts(waiter.need, now)) {
                Some(token) => Ok(Arc::clone(token)),
                None if in_flight => {
                    self.waiters.push(waiter);
                    continue;
                }
                None if waiter.need > lifetime && otherwise.is_none() => Err(Unavailable {
                    retry_after: Duration::ZERO,
                    cause: Cause::Unsatisfiable { lifetime },
                }),
                // Called without `otherwise` only after a fresh token landed:
                // it is the most there is to give.
                None => Err(otherwise.clone().unwrap_or_else(|| Unavailable {
                    retry_after: Duration::ZERO,
                    cause: Cause::Unsatisfiable {
                        lifetime: self.current.as_ref().map_or(lifetime, |t| t.remaining(now)),
                    },
                })),
            };
            let _ = waiter.reply.send(answer);
        }
    }
}
