//! One refresher task per account: the only writer of that account's token.
//!
//! It mints a token at start, refreshes it on the schedule of
//! [`next_refresh_at`], and takes every on-demand request (a consumer needing
//! more time left, a token reported rejected) through the same task, so a
//! single upstream call serves any number of waiting consumers by
//! construction. On failure it keeps serving the last good token while the
//! serving rule allows, and carries out the step [`after_failure`] decides:
//! retry once with a fresh nonce, back off with jitter, wait out a throttle,
//! open a circuit on a lockout, or retry slowly and alert on a key that can
//! never work.
//!
//! Reloads reach it on their own channel ([`AccountHandle::reconfigure`]):
//! sent without waiting, taken in the order sent, each acknowledged once in
//! force, so two quick reloads can never land out of order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::gate::{Held, KrakenGate, Risk, is_rejection};
use super::policy::{Context, Decision, Next, Streak, after_failure, rejected_retry_delay};
use super::published::{CachedToken, Health, Published, ServingRule};
use super::schedule::{RefreshPolicy, next_refresh_at};
use crate::clock::{WallClock, unix_secs_f64};
use crate::kraken::{ApiCredentials, KeyLane, KrakenClient, KrakenError, MAX_TOKEN_LIFETIME, Reason, WsToken};
use crate::metrics::AccountMetrics;

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

/// A future yielding one `GetWebSocketsToken` answer.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<WsToken, KrakenError>> + Send>>;

/// Where tokens come from: Kraken in production, a script in tests
/// ([`super::ScriptedSource`]).
pub trait TokenSource: Send + Sync + 'static {
    fn fetch(&self) -> FetchFuture;
    /// With a TOTP seed as 2FA, how long until it yields a different code (a
    /// rejected code is retried once, with the next one); `None` otherwise.
    fn next_otp_code_in(&self) -> Option<Duration>;
    /// How long until a call can be made without sending a TOTP code twice
    /// (zero: now).
    fn ready_in(&self) -> Duration {
        Duration::ZERO
    }
}

/// The Kraken-backed source of one account.
pub struct KrakenSource {
    pub client: KrakenClient,
    pub credentials: Arc<ApiCredentials>,
    /// Shared by every account using the same API key.
    pub lane: Arc<KeyLane>,
}

impl TokenSource for KrakenSource {
    fn fetch(&self) -> FetchFuture {
        let (client, credentials, lane) = (
            self.client.clone(),
            Arc::clone(&self.credentials),
            Arc::clone(&self.lane),
        );
        Box::pin(async move { client.get_websockets_token(&credentials, &lane).await })
    }

    fn next_otp_code_in(&self) -> Option<Duration> {
        let otp = self.credentials.otp.as_ref()?;
        let now = self.lane.clock().now();
        let next = SystemTime::UNIX_EPOCH + Duration::from_secs(otp.next_code_at(crate::clock::unix_secs(now))?);
        Some(next.duration_since(now).unwrap_or(Duration::ZERO))
    }

    fn ready_in(&self) -> Duration {
        self.lane.totp_wait(self.credentials.otp.as_ref())
    }
}

/// Everything a refresher needs to run, replaceable on reload.
#[derive(Clone)]
pub struct AccountSetup {
    pub source: Arc<dyn TokenSource>,
    pub policy: RefreshPolicy,
    /// The upstream call's own timeout; a fetch is abandoned a little after it.
    pub call_timeout: Duration,
    /// The key's expiration at Kraken, if the operator told it: after it,
    /// the key is treated as rejected without a call.
    pub key_expires_at: Option<SystemTime>,
    /// The first 8 hex characters of the API key's SHA-256 (never the
    /// secret): logs and metrics say which key signs.
    pub key_fingerprint: String,
}

impl AccountSetup {
    /// A setup for tests and benchmarks: `source`, `policy`, a 10 s call
    /// timeout, no expiry, a placeholder fingerprint.
    pub fn new(source: Arc<dyn TokenSource>, policy: RefreshPolicy) -> Self {
        Self {
            source,
            policy,
            call_timeout: Duration::from_secs(10),
            key_expires_at: None,
            key_fingerprint: "00000000".into(),
        }
    }
}

/// A random fraction in `[0, 1)` for jitter; a parameter so tests are exact.
pub type Jitter = fn() -> f64;

/// The jitter used in production.
pub fn random_jitter() -> f64 {
    rand::random::<f64>()
}

/// What a refresher shares with the world besides its token source: the
/// randomness of jitter, the wall clock, and the process-wide gate in front
/// of Kraken. Parameters, so tests are exact.
#[derive(Debug, Clone)]
pub struct Ambient {
    pub jitter: Jitter,
    pub clock: WallClock,
    pub gate: Arc<KrakenGate>,
}

impl Default for Ambient {
    fn default() -> Self {
        Self {
            jitter: random_jitter,
            clock: WallClock::system(),
            gate: Arc::new(KrakenGate::default()),
        }
    }
}

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
enum Request {
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
enum Control {
    Reconfigure(Box<AccountSetup>, oneshot::Sender<()>),
    RetryNow(oneshot::Sender<()>),
}

/// Resolves once a refresher has taken a change (or is gone).
pub struct Applied(oneshot::Receiver<()>);

impl Applied {
    pub async fn wait(self) {
        let _ = self.0.await;
    }
}

/// Requests queued per account before senders wait: bounded, so a storm of
/// consumers costs a wait, never unbounded memory.
const REQUEST_QUEUE: usize = 1024;

/// The readers' side of one account.
#[derive(Clone)]
pub struct AccountHandle {
    name: Arc<str>,
    published: Arc<ArcSwap<Published>>,
    /// Ticks whenever a new state is published (watch streams follow it).
    changes: watch::Receiver<()>,
    requests: mpsc::Sender<Request>,
    control: mpsc::UnboundedSender<Control>,
    answer_timeout: Duration,
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
    // Room for one call, its nonce retry, and slack.
    let answer_timeout = setup.call_timeout * 2 + Duration::from_secs(2);
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
        budget: Budget::new(ACCOUNT_FORCED_BURST, ACCOUNT_FORCED_EVERY, now),
        shares: std::collections::HashMap::new(),
        valid_reported: None,
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

/// A token bucket for on-demand refreshes.
struct Budget {
    tokens: f64,
    capacity: f64,
    every: Duration,
    at: Instant,
}

impl Budget {
    fn new(burst: u32, every: Duration, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            capacity: f64::from(burst),
            every,
            at: now,
        }
    }

    /// Takes one; otherwise says how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() / self.every.as_secs_f64();
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - self.tokens))
        }
    }
}

struct Waiter {
    need: Duration,
    reply: oneshot::Sender<Answer>,
}

struct InFlight {
    task: JoinHandle<Result<WsToken, KrakenError>>,
    started: Instant,
    started_wall: SystemTime,
}

/// A failed call (or one not made) and the step decided after it.
#[derive(Debug, Clone)]
struct Failure {
    reason: Reason,
    /// Kraken's code or the transport error, sanitised; or why no call
    /// was made.
    detail: String,
    /// Failed attempts in a row, this one included.
    consecutive: u32,
    next: Next,
    /// Set when the call worked but the token lives less than
    /// `min_served_ttl` (the lifetime granted).
    short_lifetime: Option<Duration>,
}

/// Who wants the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The schedule, a back-off ending, or a consumer.
    Automatic,
    /// A reload: an operator says something is fixed.
    Operator,
}

/// Where the refresher stands: one value, so no combination of flags can
/// disagree with another.
enum State {
    /// No failure pending: the next refresh is due at `at` (at once at start).
    Due { at: Instant },
    /// A call is under way. `streak` holds the failures before it; `failing`
    /// the last failure, which the published health shows until this call
    /// lands.
    Calling {
        flight: InFlight,
        streak: Streak,
        failing: Option<Failure>,
    },
    /// The last call failed: no call before its step's time, and on-demand
    /// requests wait for it rather than call Kraken sooner.
    Failed { streak: Streak, failure: Failure },
}

enum Event {
    Stop,
    Fetched(Result<Result<WsToken, KrakenError>, tokio::task::JoinError>),
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
    budget: Budget,
    /// Each consumer's own share of on-demand refreshes.
    shares: std::collections::HashMap<Arc<str>, Budget>,
    /// The `token_valid` value last set, so it is only written on change.
    valid_reported: Option<bool>,
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
                Event::Control(control) => self.on_control(control),
                Event::Request(Some(request)) => self.on_request(request),
                Event::Timer => {
                    if self.call_due_at().is_some_and(|at| Instant::now() >= at) {
                        self.start_call(Trigger::Automatic);
                    }
                }
            }
        }
        if let State::Calling { flight, .. } = &self.state {
            flight.task.abort();
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
                detail: f.detail.clone(),
                consecutive: f.consecutive,
                next_attempt: f.next.at(Instant::now()),
                permanent: matches!(f.next, Next::Rejected { .. }),
            },
            None if self.last_lifetime.is_some() => Health::Healthy,
            None => Health::Starting,
        }
    }

    /// The next moment something must happen without a message arriving.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(3600);
        if let Some(at) = self.call_due_at() {
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
        }));
        self.changed.send_replace(());
    }

    /// Starts a call: a scheduled refresh, an attempt after a failure, or an
    /// on-demand refresh; unless the key has expired, its TOTP code would be
    /// sent twice, or the gate holds it.
    fn start_call(&mut self, trigger: Trigger) {
        let (streak, failing) = match &self.state {
            State::Failed { streak, failure } => (*streak, Some(failure.clone())),
            State::Due { .. } => (Streak::default(), None),
            State::Calling { .. } => return,
        };
        self.try_call(streak, failing, trigger);
    }

    /// Calls Kraken now if nothing forbids it; otherwise records why not and
    /// when to try again.
    fn try_call(&mut self, streak: Streak, failing: Option<Failure>, trigger: Trigger) {
        let now = Instant::now();
        if let Some(expired) = self.setup.key_expires_at.filter(|t| *t <= self.ambient.clock.now()) {
            return self.key_expired(streak, expired, now);
        }
        let wait = self.setup.source.ready_in();
        if !wait.is_zero() {
            // Not a failure: the next TOTP code is a moment away.
            self.state = match failing {
                Some(failure) => State::Failed {
                    streak,
                    failure: Failure {
                        next: Next::NextCode { at: now + wait },
                        ..failure
                    },
                },
                None => State::Due { at: now + wait },
            };
            return;
        }
        let rejected_before = failing
            .as_ref()
            .is_some_and(|f| is_rejection(f.reason) && f.short_lifetime.is_none());
        let risk = match (rejected_before, trigger) {
            (false, _) => Risk::Normal,
            (true, Trigger::Automatic) => Risk::Retry,
            (true, Trigger::Operator) => Risk::Probe,
        };
        if let Err(held) = self.ambient.gate.permit(risk, now) {
            return self.held(streak, failing, held, now);
        }
        self.call_with(streak, failing);
    }

    /// The key is past its configured expiration: a rejection, without a call.
    fn key_expired(&mut self, streak: Streak, expired: SystemTime, now: Instant) {
        let failures = streak.failures.saturating_add(1);
        let retry_in = rejected_retry_delay(failures, &self.setup.policy);
        let detail = format!(
            "the API key's expiration (key_expires_at = {}) has passed; no call is made with it",
            humantime::format_rfc3339_seconds(expired)
        );
        error!(
            account = %self.name, outcome = "failure", reason = %Reason::InvalidKey, key = %self.setup.key_fingerprint,
            error = %detail, fix = "install a new API key and set its key_expires_at", ?retry_in,
            "the account's API key has expired: an operator must act"
        );
        self.metrics
            .refresh_failed(Reason::InvalidKey, 0.0, unix_secs_f64(self.ambient.clock.now()));
        let failure = Failure {
            reason: Reason::InvalidKey,
            detail,
            consecutive: failures,
            next: Next::Rejected {
                at: now + retry_in,
                hint: "install a new API key and set its key_expires_at",
            },
            short_lifetime: None,
        };
        self.fail(Streak { failures, ..streak }, failure, now);
    }

    /// The gate holds the call: a lockout, or the rejected-call budget.
    fn held(&mut self, streak: Streak, failing: Option<Failure>, held: Held, now: Instant) {
        self.metrics.call_held(&held);
        let failure = match &held {
            Held::Lockout { until, account } => {
                let detail = if **account == *self.name {
                    "Kraken locked out this broker's address; no calls until the lockout passes".to_owned()
                } else {
                    format!(
                        "Kraken locked out this broker's address (answered to account `{account}`); no calls until the lockout passes"
                    )
                };
                Failure {
                    reason: Reason::Lockout,
                    detail,
                    consecutive: streak.failures,
                    next: Next::LockedOut { until: *until },
                    short_lifetime: None,
                }
            }
            Held::Budget { until, counted } => {
                let last = failing.expect("only a retry of a rejected key is held by the budget");
                let status = self.ambient.gate.status(now);
                let at = until.unwrap_or(now + rejected_retry_delay(streak.failures.max(1), &self.setup.policy));
                warn!(
                    account = %self.name, counted, max = status.max_rejected_calls, retry_in = ?at.saturating_duration_since(now),
                    "retry of a rejected key held: the process's budget of rejected calls to Kraken is spent (Kraken locks out by address)"
                );
                let hint = match last.next {
                    Next::Rejected { hint, .. } => hint,
                    _ => "",
                };
                let detail = format!(
                    "{}; retries held: {counted} rejected calls to Kraken in the last 15 minutes, budget {} (kraken.max_rejected_calls)",
                    last.detail.split("; retries held").next().unwrap_or(&last.detail),
                    status.max_rejected_calls
                );
                Failure {
                    detail,
                    next: Next::Rejected { at, hint },
                    ..last
                }
            }
        };
        self.fail(streak, failure, now);
    }

    /// Records a failure state, publishes it and answers whoever waits.
    fn fail(&mut self, streak: Streak, failure: Failure, now: Instant) {
        self.state = State::Failed { streak, failure };
        self.publish();
        let unavailable = self.failed_unavailable(now);
        self.answer_waiters(now, unavailable);
    }

    fn call_with(&mut self, streak: Streak, failing: Option<Failure>) {
        let source = Arc::clone(&self.setup.source);
        // A little after the client's own timeout: a safety net, not a limit.
        let limit = self.setup.call_timeout + Duration::from_secs(1);
        let task = tokio::spawn(async move {
            tokio::time::timeout(limit, source.fetch())
                .await
                .unwrap_or(Err(KrakenError::Timeout(limit)))
        });
        let flight = InFlight {
            task,
            started: Instant::now(),
            started_wall: self.ambient.clock.now(),
        };
        self.state = State::Calling {
            flight,
            streak,
            failing,
        };
    }

    fn lifetime_hint(&self) -> Duration {
        self.last_lifetime.unwrap_or(MAX_TOKEN_LIFETIME)
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Reconfigure(setup, applied) => {
                self.setup = *setup;
                self.metrics
                    .set_key(&self.setup.key_fingerprint, self.setup.key_expires_at);
                info!(account = %self.name, key = %self.setup.key_fingerprint, "account reconfigured");
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

    fn on_request(&mut self, request: Request) {
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
    fn forced_now(&self, now: Instant) -> bool {
        matches!(self.state, State::Due { at } if now < at)
    }

    /// Takes one forced refresh from `consumer`'s own share.
    fn take_share(&mut self, consumer: &Arc<str>, now: Instant) -> Result<(), Duration> {
        if self.shares.len() >= MAX_SHARES && !self.shares.contains_key(consumer) {
            self.shares.clear();
        }
        self.shares
            .entry(Arc::clone(consumer))
            .or_insert_with(|| Budget::new(FORCED_REFRESH_BURST, FORCED_REFRESH_EVERY, now))
            .take(now)
    }

    fn serve_or_wait(&mut self, min_ttl: Duration, consumer: &Arc<str>, reply: oneshot::Sender<Answer>) {
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
    fn serve_or_wait_taken(&mut self, min_ttl: Duration, reply: oneshot::Sender<Answer>) {
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
    fn demand(&mut self, now: Instant) {
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
    fn failed_unavailable(&self, now: Instant) -> Option<Unavailable> {
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
    fn answer_waiters(&mut self, now: Instant, otherwise: Option<Unavailable>) {
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

    fn on_fetched(&mut self, result: Result<WsToken, KrakenError>) {
        let State::Calling {
            flight,
            streak,
            failing,
        } = std::mem::replace(&mut self.state, State::Due { at: Instant::now() })
        else {
            unreachable!("a fetch lands only while calling");
        };
        let now = Instant::now();
        let took = now.saturating_duration_since(flight.started);
        match result {
            Ok(minted) => self.on_success(minted, &flight, took, streak),
            Err(error) => self.on_failure(&error, streak, failing, took, now),
        }
    }

    fn on_success(&mut self, minted: WsToken, flight: &InFlight, took: Duration, streak: Streak) {
        let now = Instant::now();
        if minted.lifetime_clamped {
            warn!(
                account = %self.name,
                max_secs = MAX_TOKEN_LIFETIME.as_secs(),
                "Kraken announced a token lifetime above its documented maximum; clamped"
            );
        }
        let unservable = minted.lifetime <= self.setup.policy.min_served_ttl;
        // The token's life counts from when the call started: Kraken made it
        // somewhere between then and the answer.
        let token = Arc::new(CachedToken::new(
            minted.token,
            minted.lifetime,
            flight.started,
            flight.started_wall,
        ));
        self.metrics.refresh_succeeded(
            took.as_secs_f64(),
            unix_secs_f64(flight.started_wall + minted.lifetime),
            unix_secs_f64(self.ambient.clock.now()),
        );
        let policy = self.setup.policy;
        let due = next_refresh_at(token.issued_at, token.expires_at, &policy, (self.ambient.jitter)());
        info!(
            account = %self.name,
            outcome = "success",
            token = %token.fingerprint,
            key = %self.setup.key_fingerprint,
            expires_in_secs = token.remaining(now).as_secs(),
            duration_ms = took.as_millis() as u64,
            next_refresh_in_secs = due.saturating_duration_since(now).as_secs(),
            "token refreshed"
        );
        self.last_lifetime = Some(token.lifetime);
        let lifetime = token.lifetime;
        self.current = Some(token);
        if unservable {
            return self.too_short(lifetime, streak, now);
        }
        self.state = State::Due { at: due };
        self.publish();
        self.expire_and_report(now);
        self.answer_waiters(now, None);
    }

    /// Kraken granted a token that lives no longer than `min_served_ttl`: it
    /// can never be served. Consumers get 503 with `Retry-After`, and the
    /// next call backs off like a failure instead of coming every second.
    fn too_short(&mut self, lifetime: Duration, streak: Streak, now: Instant) {
        self.metrics.unservable_token();
        let failures = streak.failures.saturating_add(1);
        let policy = self.setup.policy;
        let wait = crate::backoff::delay(
            failures,
            policy.retry_initial,
            policy.retry_max,
            (self.ambient.jitter)(),
        );
        let detail = format!(
            "Kraken granted a token of {} s, no more than min_served_ttl ({} s): it cannot be served",
            lifetime.as_secs_f64().round() as u64,
            policy.min_served_ttl.as_secs()
        );
        warn!(
            account = %self.name, lifetime_secs = lifetime.as_secs(), min_served_ttl_secs = policy.min_served_ttl.as_secs(),
            retry_in = ?wait, "Kraken granted a token shorter than min_served_ttl: none can be served; backing off"
        );
        let failure = Failure {
            reason: Reason::Other,
            detail,
            consecutive: failures,
            next: Next::Backoff { at: now + wait },
            short_lifetime: Some(lifetime),
        };
        self.fail(
            Streak {
                failures,
                ..Streak::default()
            },
            failure,
            now,
        );
        self.expire_and_report(now);
    }

    fn on_failure(
        &mut self,
        error: &KrakenError,
        streak: Streak,
        failing: Option<Failure>,
        took: Duration,
        now: Instant,
    ) {
        let reason = error.reason();
        self.metrics
            .refresh_failed(reason, took.as_secs_f64(), unix_secs_f64(self.ambient.clock.now()));
        if is_rejection(reason) {
            self.ambient.gate.rejected(now);
        }
        let context = Context {
            policy: &self.setup.policy,
            now,
            wall_now: self.ambient.clock.now(),
            next_code_in: self.setup.source.next_otp_code_in(),
            jitter: (self.ambient.jitter)(),
        };
        let Decision { next, streak } = after_failure(streak, error, &context);
        log_failure(&self.name, &self.setup.key_fingerprint, error, next, took, now);
        if let Next::LockedOut { until } = next {
            self.ambient.gate.locked_out(&self.name, until);
        }
        if next == Next::ResignNow {
            // Invisible to readers: the health stays as it was. The retry is
            // one of a rejected key: the gate has its say.
            let just_failed = Failure {
                reason,
                detail: error.to_string(),
                consecutive: streak.failures,
                next,
                short_lifetime: None,
            };
            if let Err(held) = self.ambient.gate.permit(Risk::Retry, now) {
                return self.held(streak, Some(just_failed), held, now);
            }
            self.call_with(streak, failing);
            return;
        }
        let failure = Failure {
            reason,
            detail: error.to_string(),
            consecutive: streak.failures,
            next,
            short_lifetime: None,
        };
        self.fail(streak, failure, now);
    }
}

/// One log line per failed call, at the level its step deserves.
fn log_failure(account: &str, key: &str, error: &KrakenError, next: Next, took: Duration, now: Instant) {
    let reason = error.reason();
    let duration_ms = took.as_millis() as u64;
    let retry_in = next.at(now).saturating_duration_since(now);
    match next {
        Next::ResignNow => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms,
            "Kraken rejected the nonce; retrying once with a fresh one"
        ),
        Next::NextCode { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken rejected the signature; retrying once with the next TOTP code"
        ),
        Next::Rejected { hint, .. } => error!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, fix = hint, ?retry_in,
            "Kraken rejects this account's key: an operator must act"
        ),
        Next::LockedOut { .. } => error!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken locked the key out; no calls until the lockout passes"
        ),
        Next::Throttled { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken asked to wait; refresh failed"
        ),
        Next::Backoff { .. } if reason == Reason::InvalidNonce => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "Kraken rejected the nonce again: is another process using this API key?"
        ),
        Next::Backoff { .. } => warn!(
            account, key, outcome = "failure", reason = %reason, %error, duration_ms, ?retry_in,
            "token refresh failed"
        ),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::{ApiFailure, Class, classify_api_error};
    use crate::metrics::Metrics;
    use crate::token::{ScriptedSource, token_sha256};

    /// The tests' source: each call takes 50 ms.
    fn scripted(lifetime: Duration) -> Arc<ScriptedSource> {
        Arc::new(ScriptedSource::new(lifetime).delay(Duration::from_millis(50)))
    }

    fn kraken(code: &str) -> KrakenError {
        let failure: ApiFailure = classify_api_error(code).unwrap();
        KrakenError::Api(failure)
    }

    fn policy() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    /// Jitter 0.5, a wall clock following paused tokio time, and a gate
    /// whose budget never holds a call (the gate has its own tests; the
    /// pacing tests here are about the refresher alone).
    fn ambient() -> Ambient {
        Ambient {
            jitter: || 0.5,
            clock: WallClock::following_tokio(SystemTime::now()),
            gate: Arc::new(KrakenGate::new(1_000_000)),
        }
    }

    fn start(source: &Arc<ScriptedSource>, policy: RefreshPolicy) -> (AccountHandle, Metrics, CancellationToken) {
        let metrics = Metrics::new();
        let cancel = CancellationToken::new();
        let setup = AccountSetup::new(Arc::clone(source) as Arc<dyn TokenSource>, policy);
        let (handle, _task) = spawn("acct", setup, metrics.account("acct"), ambient(), cancel.clone());
        (handle, metrics, cancel)
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn cold_start_with_500_waiters_makes_one_upstream_call() {
        let source = scripted(Duration::from_secs(900));
        let (handle, metrics, _cancel) = start(&source, policy());
        let asks: Vec<_> = (0..500)
            .map(|_| {
                let h = handle.clone();
                tokio::spawn(async move { h.want(MIN).await })
            })
            .collect();
        let mut tokens = std::collections::HashSet::new();
        for ask in asks {
            tokens.insert(ask.await.unwrap().expect("a token").sha256);
        }
        assert_eq!(tokens.len(), 1, "everyone got the same token");
        assert_eq!(source.calls(), 1);
        assert!(
            metrics
                .encode()
                .contains("refreshes_total{account=\"acct\",result=\"success\"} 1")
        );
        assert!(metrics.encode().contains("token_valid{account=\"acct\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_of_use_by_for_several_lifetimes() {
        let source = scripted(Duration::from_secs(900));
        let (handle, _m, _cancel) = start(&source, policy());
        handle.want(MIN).await.unwrap();
        let start = Instant::now();
        // Sample every 5 s for an hour: always a token with min_served_ttl left.
        while Instant::now() < start + Duration::from_secs(3600) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let published = handle.published();
            let token = published.token.as_ref().expect("always a token");
            assert!(
                token.remaining(Instant::now()) >= Duration::from_secs(420),
                "refreshed by 435 s"
            );
        }
        // Jitter 0.5 puts refreshes 435 s apart: t = 0, 435, ..., 3480.
        assert_eq!(source.calls(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_serves_the_live_token_then_fails_closed_and_recovers() {
        let source = scripted(Duration::from_secs(900));
        source.fail(1000, kraken("EService:Unavailable"));
        // The first answer is a token; then the outage.
        source.first(ScriptedSource::token("first", Duration::from_secs(900)));
        let (handle, metrics, _cancel) = start(&source, policy());
        let first = handle.want(MIN).await.unwrap();
        // Until 840 s in, the first token is served although refreshes fail.
        tokio::time::sleep(Duration::from_secs(839)).await;
        assert_eq!(handle.want(MIN).await.unwrap().sha256, first.sha256);
        assert!(matches!(
            handle.published().health,
            Health::Failing {
                reason: Reason::Unavailable,
                ..
            }
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::RefreshFailing(Reason::Unavailable));
        assert!(refused.retry_after <= Duration::from_secs(60));
        let text = metrics.encode();
        assert!(text.contains("token_valid{account=\"acct\"} 0"), "{text}");
        let failures = source.calls() - 1;
        // Back-off capped at 60 s (30..60 with jitter 0.5 -> 45 s): about 20 calls in 840 s.
        assert!((10..=40).contains(&failures), "{failures} failed calls");
        // Kraken heals: within retry_max a token is back.
        source.heal();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(handle.want(MIN).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_key_is_retried_slowly_never_hammered() {
        for code in ["EAPI:Invalid key", "EGeneral:Permission denied"] {
            let source = scripted(Duration::from_secs(900));
            source.fail(100, kraken(code));
            let (handle, metrics, _cancel) = start(&source, policy());
            let refused = handle.want(MIN).await.unwrap_err();
            assert!(matches!(refused.cause, Cause::RefreshFailing(_)), "{code}");
            assert!(matches!(
                handle.published().health,
                Health::Failing { permanent: true, .. }
            ));
            tokio::time::sleep(Duration::from_secs(3600)).await;
            // One call at start, then retry_rejected doubling from 5 minutes:
            // at 5, 15 and 35 minutes (the next would be at 75).
            let calls = source.calls();
            assert_eq!(calls, 4, "{code}: {calls} calls in an hour");
            let reason = classify_api_error(code).unwrap().reason;
            let series = format!("refresh_failures_total{{account=\"acct\",reason=\"{reason}\"}} {calls}");
            assert!(metrics.encode().contains(&series), "{code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_nonce_is_retried_once_at_once() {
        let source = scripted(Duration::from_secs(900));
        source.then(Err(kraken("EAPI:Invalid nonce")));
        let (handle, metrics, _cancel) = start(&source, policy());
        let begun = Instant::now();
        handle.want(MIN).await.unwrap();
        assert_eq!(source.calls(), 2);
        assert!(
            Instant::now() - begun < Duration::from_millis(200),
            "no back-off before the retry"
        );
        assert!(metrics.encode().contains("reason=\"invalid_nonce\"} 1"));

        // Twice in a row: the second is a real failure, backed off.
        let source = scripted(Duration::from_secs(900));
        source
            .then(Err(kraken("EAPI:Invalid nonce")))
            .then(Err(kraken("EAPI:Invalid nonce")));
        let (handle, _m, _cancel) = start(&source, policy());
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::RefreshFailing(Reason::InvalidNonce));
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_gets_its_own_immediate_nonce_retry() {
        // Attempt 1: nonce, re-signed nonce -> back-off. Attempt 2 (after the
        // back-off): nonce, re-signed -> a token. Four calls, one back-off.
        let source = scripted(Duration::from_secs(900));
        source.fail(3, kraken("EAPI:Invalid nonce"));
        let (handle, metrics, _cancel) = start(&source, policy());
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::RefreshFailing(Reason::InvalidNonce));
        assert_eq!(source.calls(), 2, "the first attempt and its retry");
        let begun = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(handle.want(MIN).await.is_ok());
        assert_eq!(source.calls(), 4, "the second attempt had its own retry");
        assert!(Instant::now() - begun < Duration::from_secs(3));
        assert!(metrics.encode().contains("reason=\"invalid_nonce\"} 3"));
    }

    fn start_with_gate(
        name: &str,
        source: &Arc<ScriptedSource>,
        policy: RefreshPolicy,
        gate: &Arc<KrakenGate>,
        metrics: &Metrics,
    ) -> AccountHandle {
        let ambient = Ambient {
            gate: Arc::clone(gate),
            ..ambient()
        };
        let setup = AccountSetup::new(Arc::clone(source) as Arc<dyn TokenSource>, policy);
        spawn(name, setup, metrics.account(name), ambient, CancellationToken::new()).0
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_answered_to_one_account_stops_every_account_but_each_serves_its_token() {
        let gate = Arc::new(KrakenGate::new(3));
        let metrics = Metrics::new();
        let good = scripted(Duration::from_secs(900));
        let good_handle = start_with_gate("good", &good, policy(), &gate, &metrics);
        let first = good_handle.want(MIN).await.unwrap();
        let bad = scripted(Duration::from_secs(900));
        bad.then(Err(kraken("EGeneral:Temporary lockout")));
        let bad_handle = start_with_gate("bad", &bad, policy(), &gate, &metrics);
        assert_eq!(bad_handle.want(MIN).await.unwrap_err().cause, Cause::CircuitOpen);
        // The good account's refresh falls due at 435 s, inside the lockout.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(good.calls(), 1, "no call while the address is locked out");
        let served = good_handle.want(MIN).await.unwrap();
        assert_eq!(served.sha256, first.sha256, "the live token is still served");
        assert!(matches!(good_handle.published().health, Health::CircuitOpen { .. }));
        assert!(
            metrics
                .encode()
                .contains("kraken_calls_held_total{account=\"good\",reason=\"lockout\"} 1")
        );
        // After the lockout both call again.
        tokio::time::sleep(Duration::from_secs(301)).await;
        assert!(good_handle.want(Duration::from_secs(850)).await.is_ok());
        assert_eq!(good.calls(), 2);
        assert!(bad_handle.want(MIN).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_keys_stop_retrying_at_the_budget_and_a_reload_gets_the_last_call() {
        let gate = Arc::new(KrakenGate::new(3));
        let metrics = Metrics::new();
        let fast = RefreshPolicy {
            retry_rejected: Duration::from_secs(1),
            ..policy()
        };
        let bad = scripted(Duration::from_secs(900));
        bad.fail(100, kraken("EAPI:Invalid key"));
        let handle = start_with_gate("bad", &bad, fast, &gate, &metrics);
        assert!(handle.want(MIN).await.is_err());
        // Retries at 1 s, then held: 2 of the 3 counted.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(bad.calls(), 2, "one call and one automatic retry");
        assert_eq!(gate.status(Instant::now()).rejected_in_window, 2);
        let Health::Failing { detail, .. } = &handle.published().health else {
            panic!("failing");
        };
        assert!(detail.contains("retries held"), "{detail}");
        // An operator's reload spends the last one at once ...
        handle.retry_now().wait().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(bad.calls(), 3);
        // ... and after that nothing calls until the window slides.
        handle.retry_now().wait().await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(bad.calls(), 3, "never past the budget");
        // A healthy account is never held by it.
        let good = scripted(Duration::from_secs(900));
        let good_handle = start_with_gate("good", &good, fast, &gate, &metrics);
        assert!(good_handle.want(MIN).await.is_ok());
        // The window slides: retries resume.
        tokio::time::sleep(Duration::from_secs(400)).await;
        assert!(bad.calls() > 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_past_its_configured_expiry_is_treated_as_rejected_without_a_call() {
        let source = scripted(Duration::from_secs(900));
        let metrics = Metrics::new();
        let mut setup = AccountSetup::new(Arc::clone(&source) as Arc<dyn TokenSource>, policy());
        setup.key_expires_at = Some(SystemTime::now() - Duration::from_secs(1));
        let (handle, _task) = spawn(
            "acct",
            setup,
            metrics.account("acct"),
            ambient(),
            CancellationToken::new(),
        );
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::RefreshFailing(Reason::InvalidKey));
        assert_eq!(source.calls(), 0, "an expired key is never sent");
        assert!(matches!(
            handle.published().health,
            Health::Failing { permanent: true, .. }
        ));
        let text = metrics.encode();
        assert!(
            text.contains("refresh_failures_total{account=\"acct\",reason=\"invalid_key\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("api_key_expiry_timestamp_seconds{account=\"acct\"}"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_shorter_than_min_served_ttl_give_503_and_back_off_never_a_loop() {
        // Kraken answers 3-second tokens; min_served_ttl is 60 s.
        let source = scripted(Duration::from_secs(3));
        let (handle, metrics, _cancel) = start(&source, policy());
        let refused = handle.want(Duration::ZERO).await.unwrap_err();
        assert!(
            matches!(refused.cause, Cause::TokensTooShort { .. }),
            "a 503, not a 400: the consumer asked for nothing: {refused:?}"
        );
        assert!(refused.retry_after > Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(120)).await;
        let calls = source.calls();
        // Back-off 0.75, 1.5, 3, 6, 12, 24, 45, 45 ... s: under 12 calls in 2 minutes, not 120.
        assert!((4..=12).contains(&calls), "{calls} calls in 2 minutes");
        let text = metrics.encode();
        assert!(
            text.contains(&format!("unservable_tokens_total{{account=\"acct\"}} {calls}")),
            "{text}"
        );
        let Health::Failing { detail, .. } = &handle.published().health else {
            panic!("failing");
        };
        assert!(detail.contains("no more than min_served_ttl"), "{detail}");
        // A consumer's own min_ttl beyond the lifetime is still its mistake.
        let too_much = handle.want(Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(too_much.cause, Cause::Unsatisfiable { .. }), "{too_much:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_opens_the_circuit_for_15_minutes() {
        let source = scripted(Duration::from_secs(900));
        source.then(Err(kraken("EGeneral:Temporary lockout")));
        let (handle, _m, _cancel) = start(&source, policy());
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::CircuitOpen);
        assert!(refused.retry_after >= Duration::from_secs(899));
        tokio::time::sleep(Duration::from_secs(899)).await;
        assert_eq!(handle.want(MIN).await.unwrap_err().cause, Cause::CircuitOpen);
        assert_eq!(source.calls(), 1, "no call while the circuit is open");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(handle.want(MIN).await.is_ok());
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_timestamp_is_waited_out() {
        let until = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 30;
        let source = scripted(Duration::from_secs(900));
        source.then(Err(kraken(&format!("EService:Throttled: {until}"))));
        let (handle, _m, _cancel) = start(&source, policy());
        let refused = handle.want(MIN).await.unwrap_err();
        assert_eq!(refused.cause, Cause::RefreshFailing(Reason::RateLimited));
        assert!(refused.retry_after >= Duration::from_secs(25), "{refused:?}");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_timestamp_in_the_past_still_backs_off() {
        let source = scripted(Duration::from_secs(900));
        source.fail(100, kraken("EService:Throttled: 1000000000"));
        let (_handle, _m, _cancel) = start(&source, policy());
        tokio::time::sleep(Duration::from_secs(120)).await;
        // Back-off doubling 1 s -> 60 s cap (jitter 0.5): about 7 calls in 2 minutes.
        let calls = source.calls();
        assert!((4..=10).contains(&calls), "{calls} calls in 2 minutes");
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_reports_of_the_current_token_cause_one_call_and_an_old_one_none() {
        let source = scripted(Duration::from_secs(900));
        let (handle, _m, _cancel) = start(&source, policy());
        let old = handle.want(MIN).await.unwrap();
        assert_eq!(source.calls(), 1);
        let old_sha = old.sha256;
        let reports: Vec<_> = (0..50)
            .map(|_| {
                let h = handle.clone();
                tokio::spawn(async move { h.invalidate(old_sha, "engine").await })
            })
            .collect();
        let mut fresh = std::collections::HashSet::new();
        for r in reports {
            fresh.insert(r.await.unwrap().expect("a new token").sha256);
        }
        assert_eq!(fresh.len(), 1);
        assert!(!fresh.contains(&old.sha256));
        assert_eq!(source.calls(), 2, "one upstream call for 50 reports");
        let again = handle.invalidate(old.sha256, "engine").await.unwrap();
        assert!(fresh.contains(&again.sha256));
        let unknown = handle.invalidate(token_sha256("never issued"), "engine").await.unwrap();
        assert_eq!(unknown.sha256, again.sha256);
        assert_eq!(source.calls(), 2, "reports of other tokens change nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn forced_refreshes_are_rate_limited_per_consumer_and_a_report_beyond_the_share_keeps_the_token() {
        let source = scripted(Duration::from_secs(900));
        let (handle, _m, _cancel) = start(&source, policy());
        let mut current = handle.want(MIN).await.unwrap();
        for _ in 0..FORCED_REFRESH_BURST {
            current = handle.invalidate(current.sha256, "noisy").await.unwrap();
        }
        assert_eq!(source.calls(), 1 + FORCED_REFRESH_BURST as usize);
        let refused = handle.invalidate(current.sha256, "noisy").await.unwrap_err();
        assert_eq!(refused.cause, Cause::ConsumerShareSpent);
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= FORCED_REFRESH_EVERY);
        assert_eq!(source.calls(), 1 + FORCED_REFRESH_BURST as usize);
        // The noisy consumer's refused report left the token for everyone.
        let kept = handle.published().token.clone().expect("still held");
        assert_eq!(kept.sha256, current.sha256);
        assert_eq!(handle.want_as("quiet", MIN).await.unwrap().sha256, current.sha256);
        // Another consumer's own share is untouched: its report is honoured.
        let fresh = handle.invalidate(current.sha256, "quiet").await.unwrap();
        assert_ne!(fresh.sha256, current.sha256);
        assert_eq!(source.calls(), 2 + FORCED_REFRESH_BURST as usize);
        // The noisy one gets another after its share refills.
        tokio::time::sleep(FORCED_REFRESH_EVERY + Duration::from_secs(1)).await;
        assert!(handle.invalidate(fresh.sha256, "noisy").await.is_ok());
        assert_eq!(source.calls(), 3 + FORCED_REFRESH_BURST as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn many_consumers_together_are_held_by_the_accounts_cap() {
        let source = scripted(Duration::from_secs(900));
        let (handle, _m, _cancel) = start(&source, policy());
        let mut current = handle.want(MIN).await.unwrap();
        let mut refused = None;
        for i in 0..(ACCOUNT_FORCED_BURST + 2) {
            match handle.invalidate(current.sha256, &format!("engine-{i}")).await {
                Ok(next) => current = next,
                Err(u) => {
                    refused = Some(u);
                    break;
                }
            }
        }
        let refused = refused.expect("the account's cap holds");
        assert_eq!(refused.cause, Cause::ForcedRefreshLimited);
        assert_eq!(source.calls(), 1 + ACCOUNT_FORCED_BURST as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn min_ttl_above_what_is_held_refreshes_and_beyond_a_lifetime_is_refused() {
        let source = scripted(Duration::from_secs(900));
        let (handle, _m, _cancel) = start(&source, policy());
        let first = handle.want(MIN).await.unwrap();
        tokio::time::sleep(Duration::from_secs(100)).await;
        let second = handle.want(Duration::from_secs(850)).await.unwrap();
        assert_ne!(first.sha256, second.sha256);
        assert!(second.remaining(Instant::now()) >= Duration::from_secs(850));
        let refused = handle.want(Duration::from_secs(901)).await.unwrap_err();
        assert_eq!(
            refused.cause,
            Cause::Unsatisfiable {
                lifetime: Duration::from_secs(900)
            }
        );
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_need_that_even_a_fresh_token_cannot_meet_is_unsatisfiable_not_a_timeout() {
        let source = scripted(Duration::from_secs(30));
        let short = RefreshPolicy {
            refresh_before_expiry: Duration::from_secs(10),
            min_served_ttl: Duration::from_secs(5),
            jitter: Duration::ZERO,
            ..policy()
        };
        let (handle, _m, _cancel) = start(&source, short);
        handle.want(Duration::from_secs(1)).await.unwrap();
        // The call takes 50 ms, counted against the token: 29.95 s is the most.
        let refused = handle.want(Duration::from_millis(29_990)).await.unwrap_err();
        let Cause::Unsatisfiable { lifetime } = refused.cause else {
            panic!("{refused:?}");
        };
        assert!(lifetime < Duration::from_millis(29_990) && lifetime >= Duration::from_millis(29_900));
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn reconfiguring_retries_at_once_after_a_permanent_failure() {
        let bad = scripted(Duration::from_secs(900));
        bad.fail(10, kraken("EAPI:Invalid key"));
        let (handle, _m, _cancel) = start(&bad, policy());
        assert!(handle.want(MIN).await.is_err());
        let good = scripted(Duration::from_secs(900));
        handle
            .reconfigure(AccountSetup::new(Arc::clone(&good) as Arc<dyn TokenSource>, policy()))
            .wait()
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(handle.want(MIN).await.is_ok());
        assert_eq!(good.calls(), 1);
        assert_eq!(bad.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_now_cuts_short_a_permanent_rejection_but_never_a_lockout() {
        let source = scripted(Duration::from_secs(900));
        source.then(Err(kraken("EGeneral:Permission denied")));
        let (handle, _m, _cancel) = start(&source, policy());
        assert!(handle.want(MIN).await.is_err());
        handle.retry_now().wait().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(handle.want(MIN).await.is_ok(), "retried at once, not in 5 minutes");
        assert_eq!(source.calls(), 2);

        let locked = scripted(Duration::from_secs(900));
        locked.then(Err(kraken("EGeneral:Temporary lockout")));
        let (handle, _m, _cancel) = start(&locked, policy());
        assert!(handle.want(MIN).await.is_err());
        handle.retry_now().wait().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(locked.calls(), 1, "the lockout circuit stays open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_totp_code_is_retried_once_with_the_next_code() {
        let source = Arc::new(
            ScriptedSource::new(Duration::from_secs(900))
                .delay(Duration::from_millis(10))
                .totp(Duration::from_secs(30)),
        );
        source.then(Err(kraken("EAPI:Invalid signature")));
        let (handle, _m, _cancel) = start(&source, policy());
        assert!(handle.want(MIN).await.is_err());
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(handle.want(MIN).await.is_ok());
        assert_eq!(source.calls(), 2);
        assert_eq!(
            classify_api_error("EAPI:Invalid signature").unwrap().class,
            Class::Permanent
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_past_its_use_by_is_never_served() {
        let source = scripted(Duration::from_secs(900));
        source.then(ScriptedSource::token("short", Duration::from_secs(120)));
        source.fail(100, KrakenError::Transport("refused".into()));
        let (handle, metrics, _cancel) = start(&source, policy());
        handle.want(MIN).await.unwrap();
        tokio::time::sleep(Duration::from_secs(121)).await;
        assert!(handle.published().token.is_none(), "dropped at use-by");
        assert!(handle.want(Duration::ZERO).await.is_err());
        assert!(
            metrics
                .encode()
                .contains("token_expiry_timestamp_seconds{account=\"acct\"} 0")
        );
    }
}
