//! The refresher's calls to Kraken: starting one (unless the key has
//! expired, a TOTP code would repeat, or the gate holds it), and what comes
//! of it: a token published, or a failure and the step after it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::super::gate::{Held, Reservation, Risk, is_rejection};
use super::super::policy::{Context, Decision, Next, Streak, after_failure, rejected_retry_delay};
use super::super::published::CachedToken;
use super::super::schedule::next_refresh_at;
use super::Refresher;
use super::log::log_failure;
use super::state::{BudgetHold, Failure, InFlight, State, Trigger};
use crate::clock::unix_secs_f64;
use crate::kraken::{KrakenError, MAX_TOKEN_LIFETIME, Reason, WsToken};

impl Refresher {
    /// Starts a call: a scheduled refresh, an attempt after a failure, or an
    /// on-demand refresh; unless the key has expired, its TOTP code would be
    /// sent twice, or the gate holds it.
    pub(super) fn start_call(&mut self, trigger: Trigger) {
        let (streak, failing) = match &self.state {
            State::Failed { streak, failure } => (*streak, Some(failure.clone())),
            State::Due { .. } => (Streak::default(), None),
            State::Calling { .. } => return,
        };
        self.try_call(streak, failing, trigger);
    }

    /// Calls Kraken now if nothing forbids it; otherwise records why not and
    /// when to try again.
    pub(super) fn try_call(&mut self, streak: Streak, failing: Option<Failure>, trigger: Trigger) {
        let now = Instant::now();
        if let Some(expired) = self.key_expiry().filter(|t| *t <= self.ambient.clock.now()) {
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
        // A call goes after the inspection under way: that one holds the
        // key's lane meanwhile anyway, and its answer may refuse the key.
        if self.inspection.is_some() {
            return self.defer(trigger);
        }
        let fresh = std::mem::take(&mut self.verdict_fresh);
        let refused_locally = failing.as_ref().is_some_and(|f| f.refused_locally);
        if refused_locally && !fresh {
            // Refused for what Kraken said of the key: ask again first.
            self.start_inspection();
            if self.inspection.is_some() {
                return self.defer(trigger);
            }
        }
        let rejected_before = failing
            .as_ref()
            .is_some_and(|f| is_rejection(f.reason) && !f.refused_locally && f.short_lifetime.is_none());
        let risk = match (rejected_before, trigger) {
            (false, _) if self.proven => Risk::Normal,
            (false, _) => Risk::First,
            (true, Trigger::Automatic) => Risk::Retry,
            (true, Trigger::Operator) => Risk::Probe,
        };
        match self.ambient.gate.permit_call(risk, now) {
            Ok(reservation) => self.call_with(streak, failing, reservation),
            Err(held) => self.held(streak, failing, held, now),
        }
    }

    /// Makes the call once the inspection under way has landed.
    pub(super) fn defer(&mut self, trigger: Trigger) {
        self.deferred = Some(match (self.deferred, trigger) {
            (Some(Trigger::Operator), _) | (_, Trigger::Operator) => Trigger::Operator,
            _ => Trigger::Automatic,
        });
    }

    /// The key is past its configured expiration: a rejection, without a call.
    pub(super) fn key_expired(&mut self, streak: Streak, expired: SystemTime, now: Instant) {
        let failures = streak.failures.saturating_add(1);
        let retry_in = rejected_retry_delay(failures, &self.setup.policy);
        let from_kraken = self
            .key
            .info
            .as_ref()
            .is_some_and(|(info, _)| info.valid_until.is_some());
        let (detail, hint) = if from_kraken {
            (
                format!(
                    "the API key's expiration (validUntil {}, as GetApiKeyInfo reports) has passed; no call is made with it",
                    humantime::format_rfc3339_seconds(expired)
                ),
                "install a new API key",
            )
        } else {
            (
                format!(
                    "the API key's expiration (key_expires_at = {}) has passed; no call is made with it",
                    humantime::format_rfc3339_seconds(expired)
                ),
                "install a new API key and set its key_expires_at",
            )
        };
        error!(
            account = %self.name, outcome = "failure", reason = %Reason::InvalidKey, key = %self.setup.key_fingerprint,
            error = %detail, fix = hint, ?retry_in,
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
                hint,
            },
            short_lifetime: None,
            held: None,
            refused_locally: false,
        };
        self.fail(Streak { failures, ..streak }, failure, now);
    }

    /// The gate holds the call: a lockout, or the rejected-call budget.
    pub(super) fn held(&mut self, streak: Streak, failing: Option<Failure>, held: Held, now: Instant) {
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
                    held: None,
                    refused_locally: false,
                }
            }
            Held::Budget { until, counted } => {
                let status = self.ambient.gate.status(now);
                let at = until.unwrap_or(now + rejected_retry_delay(streak.failures.max(1), &self.setup.policy));
                let hold = BudgetHold {
                    counted: *counted,
                    max: status.max_rejected_calls,
                };
                let retry_in = at.saturating_duration_since(now);
                match failing {
                    Some(last) => {
                        warn!(
                            account = %self.name, counted, max = status.max_rejected_calls, ?retry_in,
                            "retry of a rejected key held: the process's budget of rejected calls to Kraken is spent (Kraken locks out by address)"
                        );
                        let next = match last.next {
                            Next::Rejected { hint, .. } => Next::Rejected { at, hint },
                            _ => Next::Backoff { at },
                        };
                        Failure {
                            held: Some(hold),
                            next,
                            ..last
                        }
                    }
                    None => {
                        warn!(
                            account = %self.name, counted, max = status.max_rejected_calls, ?retry_in,
                            "first call with a key not yet proven held: the process's budget of rejected calls to Kraken is spent (Kraken locks out by address)"
                        );
                        Failure {
                            reason: Reason::Other,
                            detail: "no call with this key yet: other keys' rejections spent the process's budget"
                                .into(),
                            held: Some(hold),
                            consecutive: streak.failures,
                            next: Next::Backoff { at },
                            short_lifetime: None,
                            refused_locally: false,
                        }
                    }
                }
            }
        };
        self.fail(streak, failure, now);
    }

    /// Records a failure state, publishes it and answers whoever waits.
    pub(super) fn fail(&mut self, streak: Streak, failure: Failure, now: Instant) {
        self.state = State::Failed { streak, failure };
        self.publish();
        let unavailable = self.failed_unavailable(now);
        self.answer_waiters(now, unavailable);
    }

    pub(super) fn call_with(&mut self, streak: Streak, failing: Option<Failure>, reservation: Option<Reservation>) {
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
            _reservation: reservation,
        };
        self.state = State::Calling {
            flight,
            streak,
            failing,
        };
    }

    pub(super) fn on_fetched(&mut self, result: Result<WsToken, KrakenError>) {
        let State::Calling {
            mut flight,
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
            Err(error) => {
                self.count_rejection(&error, now);
                // Counted: the reservation ends before a re-signed retry
                // asks the gate, or it would count this call twice.
                drop(flight._reservation.take());
                self.on_failure(&error, streak, failing, took, now);
            }
        }
    }

    pub(super) fn on_success(&mut self, minted: WsToken, flight: &InFlight, took: Duration, streak: Streak) {
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
        self.proven = true;
        self.nonce_refused_by_inspection = false;
        self.inspection_nonce_retried = false;
        if self.inspect_at.is_none() && self.inspection.is_none() {
            // Not asked while Kraken rejected the key: ask now it works.
            self.inspect_at = Some(now);
        }
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
    pub(super) fn too_short(&mut self, lifetime: Duration, streak: Streak, now: Instant) {
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
            held: None,
            refused_locally: false,
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

    /// Counts a call's rejection in the gate (before the call's
    /// reservation, if any, ends).
    pub(super) fn count_rejection(&self, error: &KrakenError, now: Instant) {
        if is_rejection(error.reason()) && error.reached_kraken() {
            self.ambient.gate.rejected(now);
        }
    }

    /// What follows a failed call (its rejection already counted).
    pub(super) fn on_failure(
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
        let mut streak = streak;
        if reason == Reason::InvalidNonce && std::mem::take(&mut self.nonce_refused_by_inspection) {
            // The GetApiKeyInfo just before was refused for its nonce too:
            // this call was its re-signed retry.
            streak.nonce_retried = true;
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
        if reason == Reason::InvalidNonce && matches!(next, Next::Rejected { .. }) {
            self.foreign_use(
                "Kraken refused the nonce again after a re-signed retry: another signer has moved the key's nonce ahead of this broker's clock".into(),
            );
        }
        if let Next::LockedOut { until } = next {
            self.ambient.gate.locked_out(&self.name, until);
        }
        let failure = Failure {
            reason,
            detail: error.to_string(),
            consecutive: streak.failures,
            next,
            short_lifetime: None,
            held: None,
            refused_locally: !error.reached_kraken(),
        };
        if next == Next::ResignNow {
            // Invisible to readers: the health stays as it was. The retry is
            // one of a rejected key: the gate has its say.
            if let Err(held) = self.ambient.gate.permit(Risk::Retry, now) {
                return self.held(streak, Some(failure), held, now);
            }
            self.call_with(streak, failing, None);
            return;
        }
        self.fail(streak, failure, now);
    }
}
