//! A [`TokenSource`] that follows a script, for tests and benchmarks: it
//! answers from a queue of results, then mints `<prefix>-<n>` tokens of a
//! fixed lifetime forever, and counts its calls. Public because integration
//! tests and benchmarks need it too; the product never builds one.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::source::{FetchFuture, TokenSource};
use crate::kraken::{KrakenError, WsToken};
use crate::secret::SecretString;

/// Scripted answers, then fresh tokens.
#[derive(Debug)]
pub struct ScriptedSource {
    script: Mutex<VecDeque<Result<WsToken, KrakenError>>>,
    prefix: String,
    lifetime: Duration,
    /// How long each call takes (paused tokio time makes it exact).
    delay: Duration,
    /// With `Some`, the source acts as if signed with a TOTP seed whose next
    /// code appears this long from now.
    next_code_in: Option<Duration>,
    calls: AtomicUsize,
}

impl ScriptedSource {
    /// Tokens `tok-1`, `tok-2`, ... of `lifetime`, answered at once.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            script: Mutex::new(VecDeque::new()),
            prefix: "tok".into(),
            lifetime,
            delay: Duration::ZERO,
            next_code_in: None,
            calls: AtomicUsize::new(0),
        }
    }

    /// Tokens are named `<prefix>-<n>`.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    /// Each call takes `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Acts as a TOTP-signed source whose next code is `wait` away.
    pub fn totp(mut self, wait: Duration) -> Self {
        self.next_code_in = Some(wait);
        self
    }

    /// Queues one answer.
    pub fn then(&self, answer: Result<WsToken, KrakenError>) -> &Self {
        self.lock().push_back(answer);
        self
    }

    /// Queues `n` copies of a failure.
    pub fn fail(&self, n: usize, error: KrakenError) -> &Self {
        let mut script = self.lock();
        script.extend(std::iter::repeat_n(error, n).map(Err));
        drop(script);
        self
    }

    /// Puts one answer at the front of the queue.
    pub fn first(&self, answer: Result<WsToken, KrakenError>) -> &Self {
        self.lock().push_front(answer);
        self
    }

    /// Drops every queued answer: from now on, fresh tokens.
    pub fn heal(&self) {
        self.lock().clear();
    }

    /// Calls made so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A token answer of `lifetime`, as Kraken would give it.
    pub fn token(text: &str, lifetime: Duration) -> Result<WsToken, KrakenError> {
        Ok(WsToken {
            token: SecretString::new(text),
            lifetime,
            lifetime_clamped: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Result<WsToken, KrakenError>>> {
        // A panicking test thread may poison it; the script is still usable.
        self.script.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl TokenSource for ScriptedSource {
    fn fetch(&self) -> FetchFuture {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = self
            .lock()
            .pop_front()
            .unwrap_or_else(|| Self::token(&format!("{}-{n}", self.prefix), self.lifetime));
        let delay = self.delay;
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            answer
        })
    }

    fn next_otp_code_in(&self) -> Option<Duration> {
        self.next_code_in
    }
}
