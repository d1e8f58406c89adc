//! One gate in front of Kraken for the whole process: the budget of
//! rejected calls and the address-wide lockout.
//!
//! Kraken locks out by IP address or by account, not by key; its sources
//! differ on which: its support article says lockouts are IP based, after
//! too many failed calls, for about 15 minutes; its error guide says too many
//! sequential `EAPI:Invalid key` errors lock the account, "typically a few
//! minutes", each attempt resetting the timer. Either way one bad key can
//! stop every account the broker serves. Two rules follow:
//!
//! - **The budget.** Calls that end in invalid key, invalid signature,
//!   invalid nonce or permission denied are counted over a sliding
//!   [`WINDOW`] (15 minutes, Kraken's lockout length) across all accounts.
//!   A call that *retries* a rejected key (a [`Risk::Retry`]) goes only while
//!   fewer than `max_rejected_calls - 1` are counted; the last one is kept for
//!   an operator's [`Risk::Probe`] (a reload after a fix; also the one
//!   re-signed retry of a `GetApiKeyInfo` refused for its nonce, which tells
//!   a collision from another signer ahead), so a fix is tried
//!   at once without waiting out the window, and a failed probe still cannot
//!   push the address past the budget. A key not yet proven (no call with it
//!   has worked since it was installed: a [`Risk::First`]) goes while the
//!   budget is not spent, so a bad rotation of many keys at once stops at the
//!   budget instead of each key spending one rejection. An account whose key
//!   has worked ([`Risk::Normal`]) is never held by the budget: a healthy
//!   account keeps its service whatever the others do.
//! - **The lockout.** A `EGeneral:Temporary lockout` answer to any account
//!   stops every account from calling until it has passed; each keeps
//!   serving its live token meanwhile.
//!
//! The exact threshold and window of Kraken's lockout are not documented:
//! the default budget (3 per 15 minutes) is an assumption on the careful
//! side of every report we know of.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::kraken::{LOCKOUT_CIRCUIT, Reason};

/// The window over which rejected calls are counted: Kraken's lockout length.
pub const WINDOW: Duration = LOCKOUT_CIRCUIT;
/// The default of `[kraken] max_rejected_calls`.
pub const DEFAULT_MAX_REJECTED_CALLS: u32 = 3;

/// What a call risks, by why it is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Risk {
    /// The account's key has worked and has not been rejected since: only a
    /// lockout holds it.
    Normal,
    /// A key not yet proven: held once the budget is spent.
    First,
    /// An automatic retry of a key Kraken rejected.
    Retry,
    /// A retry an operator asked for (a reload after a fix).
    Probe,
}

/// Why a call must wait, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Kraken locked the address out (answered to `account`).
    Lockout { until: Instant, account: String },
    /// The rejected-call budget is spent: `counted` calls in the window.
    Budget { until: Option<Instant>, counted: u32 },
}

impl Held {
    /// When the call may be tried again (`None`: not until an operator acts).
    pub fn until(&self) -> Option<Instant> {
        match self {
            Held::Lockout { until, .. } => Some(*until),
            Held::Budget { until, .. } => *until,
        }
    }
}

/// Whether a failure counts against the budget.
pub fn is_rejection(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::InvalidKey | Reason::InvalidSignature | Reason::InvalidNonce | Reason::PermissionDenied
    )
}

/// What readiness and metrics show of the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateStatus {
    pub lockout: Option<(Instant, String)>,
    pub rejected_in_window: u32,
    pub max_rejected_calls: u32,
}

#[derive(Debug)]
struct State {
    max: u32,
    /// When each counted rejection happened, oldest first, within [`WINDOW`].
    rejected: VecDeque<Instant>,
    lockout: Option<(Instant, String)>,
    /// Calls with unproven keys under way ([`Reservation`]s): each may yet
    /// be a rejection, so they count against the budget until answered.
    reserved: u32,
}

impl State {
    fn prune(&mut self, now: Instant) {
        while self.rejected.front().is_some_and(|at| *at + WINDOW <= now) {
            self.rejected.pop_front();
        }
        if self.lockout.as_ref().is_some_and(|(until, _)| *until <= now) {
            self.lockout = None;
        }
    }
}

/// A call with an unproven key under way: counted against the budget until
/// dropped (by whoever counts its answer; on any exit).
#[derive(Debug)]
pub struct Reservation(Arc<KrakenGate>);

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.reserved = s.reserved.saturating_sub(1);
    }
}

/// The gate. Critical sections are a few deque operations: a std `Mutex`.
#[derive(Debug)]
pub struct KrakenGate {
    state: Mutex<State>,
}

impl Default for KrakenGate {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_REJECTED_CALLS)
    }
}

impl KrakenGate {
    pub fn new(max_rejected_calls: u32) -> Self {
        Self {
            state: Mutex::new(State {
                max: max_rejected_calls.max(1),
                rejected: VecDeque::new(),
                lockout: None,
                reserved: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A reload may change the budget; what was counted stays counted.
    pub fn set_max_rejected_calls(&self, max: u32) {
        self.lock().max = max.max(1);
    }

    /// Whether a call with `risk` may go at `now`.
    pub fn permit(&self, risk: Risk, now: Instant) -> Result<(), Held> {
        let mut s = self.lock();
        Self::check(&mut s, risk, now)
    }

    /// Whether a call with `risk` may go at `now`; a call with an unproven
    /// key ([`Risk::First`]) also gets a [`Reservation`]: until it is
    /// dropped (once the answer is counted), the call counts against the
    /// budget, so many unproven keys starting at once cannot all go.
    pub fn permit_call(self: &Arc<Self>, risk: Risk, now: Instant) -> Result<Option<Reservation>, Held> {
        let mut s = self.lock();
        Self::check(&mut s, risk, now)?;
        if risk != Risk::First {
            return Ok(None);
        }
        s.reserved = s.reserved.saturating_add(1);
        Ok(Some(Reservation(Arc::clone(self))))
    }

    fn check(s: &mut State, risk: Risk, now: Instant) -> Result<(), Held> {
        s.prune(now);
        if let Some((until, account)) = &s.lockout {
            return Err(Held::Lockout {
                until: *until,
                account: account.clone(),
            });
        }
        // Calls of this risk go while fewer than `limit` are counted (with
        // the unproven calls under way).
        let limit = match risk {
            Risk::Normal => return Ok(()),
            Risk::First => s.max,
            Risk::Retry => s.max - 1,
            Risk::Probe => s.max,
        };
        let rejected = s.rejected.len() as u32;
        let counted = rejected.saturating_add(s.reserved);
        if counted < limit {
            return Ok(());
        }
        // Enough of the oldest must leave the window to get below `limit`
        // (unknown while unproven calls are under way: their answers decide).
        let until = match limit.checked_sub(s.reserved) {
            None | Some(0) => None,
            Some(room) if rejected >= room => s.rejected.get((rejected - room) as usize).map(|at| *at + WINDOW),
            Some(_) => None,
        };
        Err(Held::Budget { until, counted })
    }

    /// Counts a call that ended in a rejection.
    pub fn rejected(&self, now: Instant) {
        let mut s = self.lock();
        s.prune(now);
        s.rejected.push_back(now);
    }

    /// Kraken answered `EGeneral:Temporary lockout` to `account`: nobody
    /// calls before `until`.
    pub fn locked_out(&self, account: &str, until: Instant) {
        let mut s = self.lock();
        let later = s.lockout.as_ref().is_none_or(|(current, _)| *current < until);
        if later {
            s.lockout = Some((until, account.to_owned()));
        }
    }

    pub fn status(&self, now: Instant) -> GateStatus {
        let mut s = self.lock();
        s.prune(now);
        GateStatus {
            lockout: s.lockout.clone(),
            rejected_in_window: s.rejected.len() as u32,
            max_rejected_calls: s.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn healthy_accounts_are_never_held_by_the_budget() {
        let gate = KrakenGate::new(3);
        let now = Instant::now();
        for _ in 0..10 {
            gate.rejected(now);
        }
        assert_eq!(gate.permit(Risk::Normal, now), Ok(()));
        assert!(gate.permit(Risk::Retry, now).is_err());
        assert!(gate.permit(Risk::Probe, now).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn unproven_keys_go_until_the_budget_is_spent_then_wait() {
        // A rotation that breaks four keys at once: three first calls go,
        // the fourth waits, where Kraken's unknown threshold might lock the
        // address out.
        let gate = KrakenGate::new(3);
        let t0 = Instant::now();
        for n in 0..3 {
            assert_eq!(gate.permit(Risk::First, t0), Ok(()), "first call {n}");
            gate.rejected(t0);
        }
        assert_eq!(
            gate.permit(Risk::First, t0),
            Err(Held::Budget {
                until: Some(t0 + WINDOW),
                counted: 3
            })
        );
        assert_eq!(gate.permit(Risk::Normal, t0), Ok(()), "a proven key still goes");
        assert_eq!(gate.permit(Risk::First, t0 + WINDOW), Ok(()), "the window passes");
    }

    #[tokio::test(start_paused = true)]
    async fn unproven_calls_under_way_count_until_answered() {
        // Five accounts with new keys start at once: three go, two wait for
        // the answers of those three.
        let gate = Arc::new(KrakenGate::new(3));
        let t0 = Instant::now();
        let going: Vec<Reservation> = (0..3)
            .map(|n| {
                gate.permit_call(Risk::First, t0)
                    .unwrap_or_else(|held| panic!("call {n}: {held:?}"))
                    .expect("a first call is reserved")
            })
            .collect();
        assert_eq!(
            gate.permit_call(Risk::First, t0).unwrap_err(),
            Held::Budget {
                until: None,
                counted: 3
            }
        );
        assert!(
            gate.permit_call(Risk::Normal, t0).unwrap().is_none(),
            "a proven key goes"
        );
        // Two answers were tokens, one a rejection (counted before its
        // reservation ends): room for two more.
        gate.rejected(t0);
        drop(going);
        assert!(gate.permit_call(Risk::First, t0).is_ok());
        assert_eq!(gate.status(t0).rejected_in_window, 1);
        // A reservation ends with its task however it ends.
        let gate2 = Arc::clone(&gate);
        let task = tokio::spawn(async move {
            let _held = gate2.permit_call(Risk::First, Instant::now()).unwrap();
            panic!("a call that panics");
        });
        assert!(task.await.is_err());
        for _ in 0..2 {
            std::mem::forget(gate.permit_call(Risk::First, t0).unwrap());
        }
        assert!(gate.permit_call(Risk::First, t0).is_err(), "1 counted + 2 under way");
    }

    #[tokio::test(start_paused = true)]
    async fn automatic_retries_keep_the_last_call_for_an_operators_probe() {
        let gate = KrakenGate::new(3);
        let t0 = Instant::now();
        gate.rejected(t0);
        assert_eq!(gate.permit(Risk::Retry, t0), Ok(()), "1 of 3 counted");
        gate.rejected(t0 + Duration::from_secs(10));
        let held = gate.permit(Risk::Retry, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(
            held,
            Held::Budget {
                until: Some(t0 + WINDOW),
                counted: 2
            },
            "retries wait until the oldest leaves the window"
        );
        assert_eq!(gate.permit(Risk::Probe, t0 + Duration::from_secs(10)), Ok(()));
        gate.rejected(t0 + Duration::from_secs(20));
        let held = gate.permit(Risk::Probe, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(held.until(), Some(t0 + WINDOW), "a failed probe waits too");
        // The window slides.
        assert_eq!(gate.permit(Risk::Probe, t0 + WINDOW), Ok(()));
        assert!(gate.permit(Risk::Retry, t0 + WINDOW).is_err(), "two still counted");
        assert_eq!(gate.permit(Risk::Retry, t0 + WINDOW + Duration::from_secs(10)), Ok(()));
        assert_eq!(gate.status(t0 + WINDOW + Duration::from_secs(30)).rejected_in_window, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_budget_of_one_only_an_operator_retries() {
        let gate = KrakenGate::new(1);
        let t0 = Instant::now();
        gate.rejected(t0);
        assert_eq!(
            gate.permit(Risk::Retry, t0),
            Err(Held::Budget {
                until: None,
                counted: 1
            })
        );
        assert!(gate.permit(Risk::Probe, t0).is_err());
        assert_eq!(gate.permit(Risk::Probe, t0 + WINDOW), Ok(()));
        assert!(gate.permit(Risk::Retry, t0 + WINDOW).is_err(), "never automatic");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_holds_every_call_until_it_passes() {
        let gate = KrakenGate::new(3);
        let t0 = Instant::now();
        gate.locked_out("bad", t0 + WINDOW);
        for risk in [Risk::Normal, Risk::Retry, Risk::Probe] {
            let held = gate.permit(risk, t0 + Duration::from_secs(1)).unwrap_err();
            assert_eq!(
                held,
                Held::Lockout {
                    until: t0 + WINDOW,
                    account: "bad".into()
                }
            );
        }
        gate.locked_out("other", t0 + Duration::from_secs(5));
        assert_eq!(
            gate.status(t0).lockout,
            Some((t0 + WINDOW, "bad".into())),
            "the later end wins"
        );
        assert_eq!(gate.permit(Risk::Normal, t0 + WINDOW), Ok(()));
        assert_eq!(gate.status(t0 + WINDOW).lockout, None);
    }

    #[test]
    fn the_budget_counts_exactly_the_four_rejections() {
        let counted: Vec<Reason> = Reason::ALL.into_iter().filter(|r| is_rejection(*r)).collect();
        assert_eq!(
            counted,
            [
                Reason::InvalidKey,
                Reason::InvalidSignature,
                Reason::InvalidNonce,
                Reason::PermissionDenied
            ]
        );
    }
}
