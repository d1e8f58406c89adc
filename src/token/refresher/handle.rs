//! The readers' side of one account's refresher: [`AccountHandle`] (the
//! published state, lock-free; requests and reload changes, on their own
//! channels) and the answers a consumer's request gets.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use super::super::published::{CachedToken, Published};
use super::super::source::AccountSetup;
use crate::kraken::Reason;

/// Why no good-enough token can be had now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Refreshing is failing; the reason of the last failure.
    RefreshFailing(Reason),
    /// Kraken locked out this broker's address.
    CircuitOpen,
    /// Kraken grants tokens that live less than `min_served_ttl`.
    TokensTooShort {
        lifetime: Duration,
        min_served_ttl: Duration,
    },
    /// Too many on-demand refreshes lately on this account, by all consumers.
    ForcedRefreshLimited,
    /// This consumer has spent its own share of on-demand refreshes.
    ConsumerShareSpent,
    /// More time left was asked for than a token ever has.
    Unsatisfiable { lifetime: Duration },
    /// The broker is stopping, or the refresher did not answer in time.
    NotAnswering,
}

/// The answer to a consumer who asked for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub retry_after: Duration,
    pub cause: Cause,
}

pub type Answer = Result<Arc<CachedToken>, Unavailable>;

/// A consumer's request, queued on the bounded channel.
pub(super) enum Request {
    Want {
        min_ttl: Duration,
        consumer: Arc<str>,
        reply: oneshot::Sender<Answer>,
    },
    Invalidate {
        sha256: [u8; 32],
        consumer: Arc<str>,
        reply: oneshot::Sender<Answer>,
    },
}

/// A change from a reload, on its own unbounded channel: sent without
/// waiting, so the sender can never reorder two of them.
pub(super) enum Control {
    Reconfigure(Box<AccountSetup>, oneshot::Sender<()>),
    RetryNow(oneshot::Sender<()>),
}

/// Resolves once a refresher has taken a change (or is gone).
pub struct Applied(pub(super) oneshot::Receiver<()>);

impl Applied {
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}

/// Requests queued per account before senders wait: bounded, so a storm of
/// consumers costs a wait, never unbounded memory.
pub(super) const REQUEST_QUEUE: usize = 1024;

/// The readers' side of one account.
#[derive(Clone)]
pub struct AccountHandle {
    pub(super) name: Arc<str>,
    pub(super) published: Arc<ArcSwap<Published>>,
    /// Ticks whenever a new state is published (watch streams follow it).
    pub(super) changes: watch::Receiver<()>,
    pub(super) requests: mpsc::Sender<Request>,
    pub(super) control: mpsc::UnboundedSender<Control>,
    pub(super) answer_timeout: Duration,
}

impl AccountHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current published state, lock-free.
    pub fn published(&self) -> arc_swap::Guard<Arc<Published>> {
        self.published.load()
    }

    /// Wakes at every new published state (a refresh, an invalidation, a
    /// failure); errs once the account's refresher has ended.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changes.clone()
    }

    async fn ask(&self, request: impl FnOnce(oneshot::Sender<Answer>) -> Request) -> Answer {
        let not_answering = Unavailable {
            retry_after: Duration::from_secs(1),
            cause: Cause::NotAnswering,
        };
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            self.requests.send(request(tx)).await.ok()?;
            rx.await.ok()
        };
        match tokio::time::timeout(self.answer_timeout, exchange).await {
            Ok(Some(answer)) => answer,
            _ => Err(not_answering),
        }
    }

    /// A token good enough for a consumer asking for `min_ttl` (zero: no
    /// more than the serving rule), refreshing first if needed; a refresh
    /// this forces comes out of `consumer`'s share.
    pub async fn want_as(&self, consumer: &str, min_ttl: Duration) -> Answer {
        let consumer = Arc::from(consumer);
        self.ask(|reply| Request::Want {
            min_ttl,
            consumer,
            reply,
        })
        .await
    }

    /// [`AccountHandle::want_as`] for no consumer in particular (tests, tools).
    pub async fn want(&self, min_ttl: Duration) -> Answer {
        self.want_as("", min_ttl).await
    }

    /// Reports the token with this SHA-256 as rejected by Kraken; answers the
    /// token to use now.
    pub async fn invalidate(&self, sha256: [u8; 32], consumer: &str) -> Answer {
        let consumer: Arc<str> = Arc::from(consumer);
        self.ask(|reply| Request::Invalidate {
            sha256,
            consumer,
            reply,
        })
        .await
    }

    fn control(&self, make: impl FnOnce(oneshot::Sender<()>) -> Control) -> Applied {
        let (tx, rx) = oneshot::channel();
        // A refresher that is gone has nothing to apply: `Applied` resolves.
        let _ = self.control.send(make(tx));
        Applied(rx)
    }

    /// Replaces the account's credentials, client or policy. Never waits;
    /// changes are applied in the order they were made.
    pub fn reconfigure(&self, setup: AccountSetup) -> Applied {
        self.control(|ack| Control::Reconfigure(Box::new(setup), ack))
    }

    /// If the account waits out a permanent rejection (invalid key,
    /// permission denied), retries now: an operator says it is fixed. A
    /// lockout circuit or a throttle is never cut short.
    pub fn retry_now(&self) -> Applied {
        self.control(Control::RetryNow)
    }
}
