//! One refresher task per account: the only writer of that account's token.
//!
//! It mints a token at start, refreshes it on the schedule of
//! [`next_refresh_at`](super::schedule::next_refresh_at), and takes every on-demand request (a consumer needing
//! more time left, a token reported rejected) through the same task, so a
//! single upstream call serves any number of waiting consumers by
//! construction. On failure it keeps serving the last good token while the
//! serving rule allows, and carries out the step [`after_failure`](super::policy::after_failure) decides:
//! retry once with a fresh nonce, back off with jitter, wait out a throttle,
//! open a circuit on a lockout, or retry slowly and alert on a key that can
//! never work.
//!
//! Reloads reach it on their own channel ([`AccountHandle::reconfigure`]):
//! sent without waiting, taken in the order sent, each acknowledged once in
//! force, so two quick reloads can never land out of order.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the task: its state, its event loop, what it publishes |
//! | [`handle`] | the readers' side: [`AccountHandle`] and the answers to requests |
//! | `state` | where it stands: one state value, the failure waited out |
//! | `calls` | calls to Kraken and what comes of them |
//! | `demand` | consumers' on-demand requests, waiters, forced-refresh budgets |
//! | `inspect` | asking Kraken about the key (`GetApiKeyInfo`) and what follows |
//! | `log` | the log line of each failed call |

mod calls;
mod demand;
pub mod handle;
mod inspect;
mod log;
mod state;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use demand::{ACCOUNT_FORCED_BURST, ACCOUNT_FORCED_EVERY, FORCED_REFRESH_BURST, FORCED_REFRESH_EVERY};
pub use handle::{AccountHandle, Answer, Applied, Cause, Unavailable};

use super::gate::KrakenGate;
use super::key::{KeyEvents, KeyReport};
use super::metrics::AccountMetrics;
use super::policy::{Next, Streak};
use super::published::{CachedToken, Health, Published, ServingRule};
use super::source::AccountSetup;
use crate::bucket::TokenBucket;
use crate::clock::WallClock;
use crate::kraken::{KeyCheck, KrakenError, MAX_TOKEN_LIFETIME, WsToken};
use handle::{Control, REQUEST_QUEUE, Request};
use state::{Failure, Inspection, State, Trigger, Waiter};

/// A random fraction in `[0, 1)` for jitter; a parameter so tests are exact.
pub type Jitter = fn() -> f64;

/// The jitter used in production.
pub fn random_jitter() -> f64 {
    rand::random::<f64>()
}

/// What a refresher shares with the world besides its token source: the
/// randomness of jitter, the wall clock, the process-wide gate in front
/// of Kraken, and where key events go (the audit trail). Parameters, so
/// tests are exact.
#[derive(Debug, Clone)]
pub struct Ambient {
    pub jitter: Jitter,
    pub clock: WallClock,
    pub gate: Arc<KrakenGate>,
    pub events: KeyEvents,
}

impl Default for Ambient {
    fn default() -> Self {
        Self {
            jitter: random_jitter,
            clock: WallClock::system(),
            gate: Arc::new(KrakenGate::default()),
            events: KeyEvents::default(),
        }
    }
}

/// Starts the refresher of one account. The task ends when `cancel` fires.
pub fn spawn(
    name: &str,
    setup: AccountSetup,
    metrics: AccountMetrics,
    ambient: Ambient,
    cancel: CancellationToken,
) -> (AccountHandle, JoinHandle<()>) {
    let name: Arc<str> = Arc::from(name);
    let rule = ServingRule {
        min_served_ttl: setup.policy.min_served_ttl,
    };
    let published = Arc::new(ArcSwap::from_pointee(Published::starting(rule)));
    let (changed, changes) = watch::channel(());
    let (requests_tx, requests) = mpsc::channel(REQUEST_QUEUE);
    let (control_tx, control) = mpsc::unbounded_channel();
    // Room for a GetApiKeyInfo, the call after it, its nonce retry, and slack.
    let answer_timeout = setup.call_timeout * 3 + Duration::from_secs(2);
    let now = Instant::now();
    metrics.set_key(&setup.key_fingerprint, setup.key_expires_at);
    let refresher = Refresher {
        name: Arc::clone(&name),
        setup,
        ambient,
        published: Arc::clone(&published),
        changed,
        metrics,
        requests,
        control,
        cancel,
        current: None,
        last_lifetime: None,
        state: State::Due { at: now },
        waiters: Vec::new(),
        budget: TokenBucket::every(ACCOUNT_FORCED_BURST, ACCOUNT_FORCED_EVERY, now),
        shares: std::collections::HashMap::new(),
        valid_reported: None,
        inspection: None,
        deferred: None,
        verdict_fresh: false,
        inspect_at: Some(now),
        proven: false,
        key: KeyReport::default(),
        nonce_refused_by_inspection: false,
        inspection_nonce_retried: false,
        foreign_seen: None,
    };
    let task = tokio::spawn(refresher.run());
    (
        AccountHandle {
            name,
            published,
            changes,
            requests: requests_tx,
            control: control_tx,
            answer_timeout,
        },
        task,
    )
}

enum Event {
    Stop,
    Fetched(Result<Result<WsToken, KrakenError>, tokio::task::JoinError>),
    Inspected(Result<Result<KeyCheck, KrakenError>, tokio::task::JoinError>),
    Control(Control),
    Request(Option<Request>),
    Timer,
}

struct Refresher {
    name: Arc<str>,
    setup: AccountSetup,
    ambient: Ambient,
    published: Arc<ArcSwap<Published>>,
    changed: watch::Sender<()>,
    metrics: AccountMetrics,
    requests: mpsc::Receiver<Request>,
    control: mpsc::UnboundedReceiver<Control>,
    cancel: CancellationToken,

    current: Option<Arc<CachedToken>>,
    /// The lifetime of the last token minted, for judging `min_ttl` requests.
    last_lifetime: Option<Duration>,
    state: State,
    waiters: Vec<Waiter>,
    /// On-demand refreshes of the account, whoever asks.
    budget: TokenBucket,
    /// Each consumer's own share of on-demand refreshes.
    shares: std::collections::HashMap<Arc<str>, TokenBucket>,
    /// The `token_valid` value last set, so it is only written on change.
    valid_reported: Option<bool>,
    /// A `GetApiKeyInfo` under way: token calls wait for it.
    inspection: Option<Inspection>,
    /// A token call asked while an inspection was under way, made once it
    /// has landed (by whom: an operator's reload keeps its probe).
    deferred: Option<Trigger>,
    /// An inspection landed since the last call was tried: a key refused
    /// on its verdict is not asked about again before that call.
    verdict_fresh: bool,
    /// When to ask Kraken about the key next (`None`: not scheduled).
    inspect_at: Option<Instant>,
    /// A call with the key has worked since it was installed.
    proven: bool,
    /// What Kraken last said of the key.
    key: KeyReport,
    /// The last `GetApiKeyInfo` was refused for its nonce: the token call
    /// after it is that refusal's re-signed retry.
    nonce_refused_by_inspection: bool,
    /// The inspection under way re-signs one Kraken refused for its nonce.
    inspection_nonce_retried: bool,
    /// The foreign nonce last counted, so one use is counted once.
    foreign_seen: Option<u64>,
}

impl Refresher {
    async fn run(mut self) {
        loop {
            self.expire_and_report(Instant::now());
            let wake = self.next_wake(Instant::now());
            let event = {
                let flight = match &mut self.state {
                    State::Calling { flight, .. } => Some(&mut flight.task),
                    _ => None,
                };
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => Event::Stop,
                    Some(control) = self.control.recv() => Event::Control(control),
                    result = async { flight.expect("guarded by is_some").await }, if flight.is_some() => {
                        Event::Fetched(result)
                    }
                    result = async {
                        (&mut self.inspection.as_mut().expect("guarded by is_some").task).await
                    }, if self.inspection.is_some() => Event::Inspected(result),
                    request = self.requests.recv() => Event::Request(request),
                    _ = tokio::time::sleep_until(wake) => Event::Timer,
                }
            };
            match event {
                Event::Stop | Event::Request(None) => break,
                Event::Fetched(result) => {
                    let result =
                        result.unwrap_or_else(|e| Err(KrakenError::Transport(format!("the fetch task failed: {e}"))));
                    self.on_fetched(result);
                }
                Event::Inspected(result) => {
                    let result = result
                        .unwrap_or_else(|e| Err(KrakenError::Transport(format!("the GetApiKeyInfo task failed: {e}"))));
                    // Its reservation (if any) ends once the answer is counted.
                    if let Err(error) = &result {
                        self.count_rejection(error, Instant::now());
                    }
                    self.inspection = None;
                    self.on_inspected(result);
                }
                Event::Control(control) => self.on_control(control),
                Event::Request(Some(request)) => self.on_request(request),
                Event::Timer => {
                    // The inspection first: a token call made now waits for
                    // its verdict.
                    if self.inspect_at.is_some_and(|at| Instant::now() >= at) {
                        self.start_inspection();
                    }
                    if self.call_due_at().is_some_and(|at| Instant::now() >= at) {
                        self.start_call(Trigger::Automatic);
                    }
                }
            }
        }
        if let State::Calling { flight, .. } = &self.state {
            flight.task.abort();
        }
        if let Some(inspection) = &self.inspection {
            inspection.task.abort();
        }
        let stopping = Unavailable {
            retry_after: Duration::from_secs(1),
            cause: Cause::NotAnswering,
        };
        for waiter in self.waiters.drain(..) {
            let _ = waiter.reply.send(Err(stopping.clone()));
        }
    }

    fn rule(&self) -> ServingRule {
        ServingRule {
            min_served_ttl: self.setup.policy.min_served_ttl,
        }
    }

    /// When the next call may start, unless one is under way.
    fn call_due_at(&self) -> Option<Instant> {
        match &self.state {
            State::Due { at } => Some(*at),
            State::Failed { failure, .. } => Some(failure.next.at(Instant::now())),
            State::Calling { .. } => None,
        }
    }

    /// The health readers see, derived from the state.
    fn health(&self) -> Health {
        let failure = match &self.state {
            State::Failed { failure, .. } => Some(failure),
            State::Calling { failing, .. } => failing.as_ref(),
            State::Due { .. } => None,
        };
        match failure {
            Some(Failure {
                next: Next::LockedOut { until },
                ..
            }) => Health::CircuitOpen { until: *until },
            Some(f) => Health::Failing {
                reason: f.reason,
                detail: f.shown(),
                consecutive: f.consecutive,
                next_attempt: f.next.at(Instant::now()),
                permanent: matches!(f.next, Next::Rejected { .. }),
                hint: match f.next {
                    Next::Rejected { hint, .. } if !hint.is_empty() => Some(hint),
                    _ => None,
                },
            },
            None if self.last_lifetime.is_some() => Health::Healthy,
            None => Health::Starting,
        }
    }

    /// The next moment something must happen without a message arriving.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        // While an inspection is under way, its answer wakes the task: a
        // call due meanwhile waits for it.
        if let Some(at) = self.call_due_at().filter(|_| self.inspection.is_none()) {
            wake = wake.min(at);
        }
        if let Some(at) = self.inspect_at.filter(|_| self.inspection.is_none()) {
            wake = wake.min(at);
        }
        if let Some(t) = &self.current {
            let servable_until = t.expires_at.checked_sub(self.rule().need(Duration::ZERO));
            for moment in [servable_until, Some(t.expires_at)].into_iter().flatten() {
                if moment > now {
                    wake = wake.min(moment);
                }
            }
        }
        wake
    }

    /// Drops a token past its use-by and keeps `token_valid` true to life.
    fn expire_and_report(&mut self, now: Instant) {
        if self.current.as_ref().is_some_and(|t| t.remaining(now).is_zero()) {
            self.current = None;
            self.metrics.token_dropped();
            self.publish();
        }
        let need = self.rule().need(Duration::ZERO);
        let valid = self.current.as_ref().is_some_and(|t| t.lasts(need, now));
        if self.valid_reported != Some(valid) {
            self.metrics.set_valid(valid);
            if self.valid_reported == Some(true) && !valid {
                warn!(account = %self.name, "no servable token: the held one has less than min_served_ttl left");
            }
            self.valid_reported = Some(valid);
        }
    }

    fn publish(&self) {
        self.published.store(Arc::new(Published {
            token: self.current.clone(),
            health: self.health(),
            rule: self.rule(),
            key: Arc::new(self.key.clone()),
        }));
        self.changed.send_replace(());
    }

    fn lifetime_hint(&self) -> Duration {
        self.last_lifetime.unwrap_or(MAX_TOKEN_LIFETIME)
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Reconfigure(setup, applied) => {
                let new_key = setup.key_fingerprint != self.setup.key_fingerprint;
                self.setup = *setup;
                if new_key {
                    // Nothing known of the new key until Kraken answers.
                    self.proven = false;
                    self.key = KeyReport::default();
                    self.nonce_refused_by_inspection = false;
                    self.inspection_nonce_retried = false;
                    self.foreign_seen = None;
                    self.metrics.set_permissions(None);
                }
                self.metrics.set_key(&self.setup.key_fingerprint, self.key_expiry());
                info!(account = %self.name, key = %self.setup.key_fingerprint, "account reconfigured");
                // Ask about the key (new, or judged by new rules) before the
                // next token call; an answer about the old setup is moot.
                if let Some(inspection) = self.inspection.take() {
                    inspection.task.abort();
                }
                self.verdict_fresh = false;
                if new_key {
                    self.inspect_new_key();
                } else {
                    self.start_inspection();
                }
                if self.inspection.is_none() {
                    // Nothing in flight for a waiting call to follow.
                    self.deferred = None;
                }
                self.publish();
                if let State::Failed { failure, .. } = &self.state
                    && !matches!(failure.next, Next::LockedOut { .. })
                {
                    // New credentials deserve a try now, not after a back-off
                    // meant for the old ones (the gate still has its say).
                    let failing = Some(failure.clone());
                    self.try_call(Streak::default(), failing, Trigger::Operator);
                }
                let _ = applied.send(());
            }
            Control::RetryNow(applied) => {
                if let State::Failed { failure, .. } = &self.state
                    && matches!(failure.next, Next::Rejected { .. })
                {
                    info!(account = %self.name, "retrying now, as asked by a reload");
                    let failing = Some(failure.clone());
                    self.try_call(Streak::default(), failing, Trigger::Operator);
                }
                let _ = applied.send(());
            }
        }
    }
}
