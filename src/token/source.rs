//! What a refresher calls and how it is set up: the [`TokenSource`] trait,
//! through which alone `token/` knows Kraken (the Kraken-backed source lives
//! in [`crate::kraken::source`]; a scripted one in [`super::scripted`]), and
//! [`AccountSetup`], everything a refresher needs that a reload may change.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::schedule::RefreshPolicy;
use crate::kraken::{KeyCheck, KrakenError, WsToken};

/// A future yielding one `GetWebSocketsToken` answer.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<WsToken, KrakenError>> + Send>>;

/// A future yielding one `GetApiKeyInfo` answer, judged.
pub type InspectFuture = Pin<Box<dyn Future<Output = Result<KeyCheck, KrakenError>> + Send>>;

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
    /// Asks about the key itself (`GetApiKeyInfo`), when the source can.
    /// While the answer refuses the key, [`fetch`](Self::fetch) refuses
    /// without a call.
    fn inspect(&self) -> Option<InspectFuture> {
        None
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
    /// How often to ask Kraken about the key (`GetApiKeyInfo`), besides at
    /// start and after a reload; `None`: never (sources that cannot).
    pub key_info_interval: Option<Duration>,
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
            key_info_interval: None,
        }
    }
}
