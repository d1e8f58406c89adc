//! Where a refresher stands: one [`State`] value (so no combination of
//! flags can disagree with another), the [`Failure`] it waits out, and the
//! call under way.

use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::super::gate::Reservation;
use super::super::policy::{Next, Streak};
use super::handle::Answer;
use crate::kraken::{KeyCheck, KrakenError, Reason, WsToken};

/// A consumer waiting for a token good enough for it.
pub(super) struct Waiter {
    pub need: Duration,
    pub reply: oneshot::Sender<Answer>,
}

pub(super) struct InFlight {
    pub task: JoinHandle<Result<WsToken, KrakenError>>,
    pub started: Instant,
    pub started_wall: SystemTime,
    /// With an unproven key: held until the answer is counted.
    pub _reservation: Option<Reservation>,
}

/// A `GetApiKeyInfo` under way.
pub(super) struct Inspection {
    pub task: JoinHandle<Result<KeyCheck, KrakenError>>,
    /// With an unproven key: held until the answer is counted.
    pub _reservation: Option<Reservation>,
}

/// The rejected-call budget holds retries of a failure: what it counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BudgetHold {
    /// Rejected calls in the window.
    pub counted: u32,
    /// The budget (`kraken.max_rejected_calls`).
    pub max: u32,
}

/// A failed call (or one not made) and the step decided after it.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub reason: Reason,
    /// Kraken's code or the transport error, sanitised; or why no call
    /// was made.
    pub detail: String,
    /// Set while the rejected-call budget holds its retries.
    pub held: Option<BudgetHold>,
    /// Failed attempts in a row, this one included.
    pub consecutive: u32,
    pub next: Next,
    /// Set when the call worked but the token lives less than
    /// `min_served_ttl` (the lifetime granted).
    pub short_lifetime: Option<Duration>,
    /// The broker refused the key on what `GetApiKeyInfo` reported, without
    /// calling `GetWebSocketsToken`: no rejection by Kraken.
    pub refused_locally: bool,
}

impl Failure {
    /// The detail as readers see it, with the budget's hold when there is one.
    pub fn shown(&self) -> String {
        match self.held {
            None => self.detail.clone(),
            Some(BudgetHold { counted, max }) => format!(
                "{}; retries held: {counted} rejected calls to Kraken in the last 15 minutes, budget {max} (kraken.max_rejected_calls)",
                self.detail
            ),
        }
    }
}

/// Who wants the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The schedule, a back-off ending, or a consumer.
    Automatic,
    /// A reload: an operator says something is fixed.
    Operator,
}

/// Where the refresher stands: one value, so no combination of flags can
/// disagree with another.
pub(super) enum State {
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
