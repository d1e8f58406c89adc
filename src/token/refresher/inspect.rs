//! Asking Kraken about the key (`GetApiKeyInfo`, through
//! [`TokenSource::inspect`](super::super::source::TokenSource::inspect)): at
//! start, after a reload, every `key_info_interval`, and before retrying a
//! key refused for what an answer said. What comes of it: the permissions
//! and expiry exported, another signer reported, and a refusal (or its end)
//! carried out at once.
//!
//! An inspection never stops a live token from being served and never
//! blocks a token call: when it fails, the token call goes ahead. It goes
//! through the gate like any call (a lockout holds it; so does the
//! rejected-call budget while the key is unproven), and is not made while
//! Kraken rejects the key: that would only add a rejected call.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::super::gate::{Risk, is_rejection};
use super::super::key::KeyEvent;
use super::super::policy::{Next, Streak, rejected_retry_delay};
use super::Refresher;
use super::state::{Failure, Inspection, State, Trigger};
use crate::clock::unix_secs_f64;
use crate::kraken::{Action, KeyCheck, KrakenError, NONCE_AHEAD_HINT, Reason, Verdict};

/// Expirations further apart than this are a mismatch worth a WARN.
const EXPIRY_TOLERANCE: Duration = Duration::from_secs(60);

impl Refresher {
    /// The key's expiration as best known: Kraken's `validUntil` once an
    /// answer was read (none there: the key does not expire), else the
    /// configured `key_expires_at`.
    pub(super) fn key_expiry(&self) -> Option<SystemTime> {
        match &self.key.info {
            Some((info, _)) => info.valid_until,
            None => self.setup.key_expires_at,
        }
    }

    /// Whether the current failure is Kraken rejecting the key (not a
    /// refusal the broker decided on what Kraken reported).
    fn kraken_rejects_key(&self) -> bool {
        match &self.state {
            State::Failed { failure, .. } => {
                is_rejection(failure.reason) && !failure.refused_locally && failure.short_lifetime.is_none()
            }
            _ => false,
        }
    }

    /// Starts an inspection now, unless one is under way, the source cannot,
    /// Kraken rejects the key, or the gate holds it; the next one is
    /// scheduled meanwhile.
    pub(super) fn start_inspection(&mut self) {
        let risk = if self.proven { Risk::Normal } else { Risk::First };
        self.inspect_with(risk, false);
    }

    /// An inspection of a key just installed: Kraken's rejection of the
    /// key it replaced says nothing of it.
    pub(super) fn inspect_new_key(&mut self) {
        self.inspect_with(Risk::First, true);
    }

    fn inspect_with(&mut self, risk: Risk, new_key: bool) {
        let now = Instant::now();
        self.inspect_at = None;
        let Some(interval) = self.setup.key_info_interval else {
            return;
        };
        if self.inspection.is_some() {
            return;
        }
        if self.kraken_rejects_key() && !new_key {
            // Asked again once a token call with the key works.
            return;
        }
        if self.key_expiry().is_some_and(|t| t <= self.ambient.clock.now()) {
            // Past its expiration: no call is made with the key at all.
            self.inspect_at = Some(now + interval);
            return;
        }
        let reservation = match self.ambient.gate.permit_call(risk, now) {
            Ok(reservation) => reservation,
            Err(held) => {
                self.inspect_at = Some(held.until().unwrap_or(now + interval).max(now + Duration::from_secs(1)));
                return;
            }
        };
        let Some(inspect) = self.setup.source.inspect() else {
            return;
        };
        let limit = self.setup.call_timeout + Duration::from_secs(1);
        let task = tokio::spawn(async move {
            tokio::time::timeout(limit, inspect)
                .await
                .unwrap_or(Err(KrakenError::Timeout(limit)))
        });
        self.inspection = Some(Inspection {
            task,
            _reservation: reservation,
        });
    }

    pub(super) fn on_inspected(&mut self, result: Result<KeyCheck, KrakenError>) {
        let now = Instant::now();
        if let Some(interval) = self.setup.key_info_interval {
            self.inspect_at = Some(now + interval);
        }
        self.verdict_fresh = true;
        if !matches!(&result, Err(e) if e.reason() == Reason::InvalidNonce) {
            // A re-signed retry that did not meet the nonce refusal again
            // ends that episode.
            self.inspection_nonce_retried = false;
        }
        match result {
            Ok(check) => self.on_key_info(check),
            Err(error) => self.on_key_info_failed(&error, now),
        }
        // The call asked meanwhile goes now, unless another inspection is
        // under way (a re-signed one) or the answer settled it.
        if self.inspection.is_none()
            && !matches!(self.state, State::Calling { .. })
            && let Some(trigger) = self.deferred.take()
        {
            self.start_call(trigger);
        }
        self.publish();
    }

    fn on_key_info(&mut self, check: KeyCheck) {
        let KeyCheck { info, verdict, foreign } = check;
        // The key signs: the budget need not hold its calls.
        self.proven = true;
        self.nonce_refused_by_inspection = false;
        self.metrics.set_permissions(Some(&info.permissions));
        if let Some(configured) = self.setup.key_expires_at {
            let apart = info
                .valid_until
                .map(|kraken| kraken.duration_since(configured).unwrap_or_else(|e| e.duration()));
            if apart.is_none_or(|apart| apart > EXPIRY_TOLERANCE) {
                let kraken = info.valid_until.map_or_else(
                    || "never".to_owned(),
                    |t| humantime::format_rfc3339_seconds(t).to_string(),
                );
                warn!(
                    account = %self.name, key = %self.setup.key_fingerprint, %kraken,
                    configured = %humantime::format_rfc3339_seconds(configured),
                    "the key's expiration at Kraken (validUntil) differs from key_expires_at: Kraken's is used"
                );
            }
        }
        if let Some(foreign) = foreign.as_ref().filter(|f| self.foreign_seen != Some(f.reported)) {
            // Counted once per foreign nonce: the same one reported again is
            // the same use.
            self.foreign_seen = Some(foreign.reported);
            let evidence = format!(
                "GetApiKeyInfo reports the key's nonce at {}, which this broker's calls do not explain (its own was {})",
                foreign.reported, foreign.own
            );
            self.foreign_use(evidence);
        }
        if self.key.verdict.as_ref() != Some(&verdict) {
            match &verdict {
                Verdict::Usable => info!(
                    account = %self.name, key = %self.setup.key_fingerprint, permissions = %info.permissions.join(","),
                    "Kraken reports the key's permissions: usable"
                ),
                refused => warn!(
                    account = %self.name, key = %self.setup.key_fingerprint, permissions = %info.permissions.join(","),
                    verdict = ?refused, "Kraken reports the key's permissions: the key is refused"
                ),
            }
        }
        // Carried out now rather than at the next refresh: a refusal shows
        // (and alerts) at once, and a fixed key is used at once.
        let refuses = verdict != Verdict::Usable;
        let refused_before = matches!(&self.state, State::Failed { failure, .. } if failure.refused_locally);
        if (refuses && matches!(self.state, State::Due { .. })) || (!refuses && refused_before) {
            self.defer(Trigger::Automatic);
        }
        self.key.info = Some((info, self.ambient.clock.now()));
        self.key.verdict = Some(verdict);
        self.key.error = None;
        self.metrics.set_key_expiry(self.key_expiry());
    }

    fn on_key_info_failed(&mut self, error: &KrakenError, now: Instant) {
        let reason = error.reason();
        warn!(
            account = %self.name, key = %self.setup.key_fingerprint, reason = %reason, %error,
            "GetApiKeyInfo failed: the key's permissions and expiry are not known afresh (tokens are not affected)"
        );
        self.key.error = Some(error.to_string());
        if !error.reached_kraken() {
            return;
        }
        if reason == Reason::InvalidNonce {
            return self.inspection_nonce_refused(now);
        }
        if let Action::OpenCircuit(open_for) = error.action() {
            // The call asked meanwhile is held by the lockout.
            self.ambient.gate.locked_out(&self.name, now + open_for);
            return;
        }
        if !is_rejection(reason) {
            // Transient: the token call goes ahead.
            return;
        }
        // Kraken refuses the key itself (invalid key or signature, an
        // address outside its allowlist): what a token call would be
        // answered. Taken as that call's answer (counted already) instead
        // of making it.
        let (streak, failing) = match &self.state {
            // The call under way answers for itself.
            State::Calling { .. } => return,
            State::Failed { streak, failure } => (*streak, Some(failure.clone())),
            State::Due { .. } => (Streak::default(), None),
        };
        self.deferred = None;
        self.on_failure(error, streak, failing, Duration::ZERO, now);
    }

    /// Kraken refused an inspection's nonce: re-signed once, like a token
    /// call; refused again, another signer keeps the key's nonce ahead of
    /// this broker's (no call can learn it: every private call needs a nonce
    /// above it), so the key is treated as rejected until an operator acts.
    /// A token call under way (or waiting for this answer) is the re-signed
    /// retry itself.
    fn inspection_nonce_refused(&mut self, now: Instant) {
        if matches!(self.state, State::Calling { .. }) || self.deferred.is_some() {
            // The token call under way, or waiting for this answer, is the
            // re-signed retry: a token if it works.
            self.nonce_refused_by_inspection = true;
            return;
        }
        if !std::mem::replace(&mut self.inspection_nonce_retried, true) {
            info!(account = %self.name, "Kraken refused GetApiKeyInfo's nonce; asking again once with a fresh one");
            // Up to the whole budget, like an operator's probe: the answer
            // tells a one-off collision from another signer ahead, and the
            // budget is never exceeded.
            self.inspect_with(Risk::Probe, false);
            if self.inspection.is_none() {
                // Held: the next token call is the re-signed retry.
                self.inspection_nonce_retried = false;
                self.nonce_refused_by_inspection = true;
            }
            return;
        }
        self.inspection_nonce_retried = false;
        self.deferred = None;
        self.foreign_use(
            "Kraken refused GetApiKeyInfo's nonce again after a re-signed retry: another signer has moved the key's nonce ahead of this broker's clock".into(),
        );
        let streak = match &self.state {
            State::Failed { streak, .. } => *streak,
            _ => Streak::default(),
        };
        let failures = streak.failures.saturating_add(1);
        let retry_in = rejected_retry_delay(failures, &self.setup.policy);
        error!(
            account = %self.name, outcome = "failure", reason = %Reason::InvalidNonce, key = %self.setup.key_fingerprint,
            fix = NONCE_AHEAD_HINT, ?retry_in, "Kraken rejects this account's key: an operator must act"
        );
        self.metrics
            .refresh_failed(Reason::InvalidNonce, 0.0, unix_secs_f64(self.ambient.clock.now()));
        let failure = Failure {
            reason: Reason::InvalidNonce,
            detail: "Kraken refused the nonce of GetApiKeyInfo twice, re-signed: EAPI:Invalid nonce".into(),
            held: None,
            consecutive: failures,
            next: Next::Rejected {
                at: now + retry_in,
                hint: NONCE_AHEAD_HINT,
            },
            short_lifetime: None,
            refused_locally: false,
        };
        self.fail(Streak { failures, ..streak }, failure, now);
    }

    /// Another signer uses the key: counted, logged, audited.
    pub(super) fn foreign_use(&mut self, evidence: String) {
        self.key.foreign_uses = self.key.foreign_uses.saturating_add(1);
        self.metrics.foreign_use();
        warn!(
            account = %self.name, key = %self.setup.key_fingerprint, %evidence,
            "the API key is used by another signer: rotate it and find the other user"
        );
        self.ambient.events.send(KeyEvent::ForeignUse {
            account: self.name.to_string(),
            key: self.setup.key_fingerprint.clone(),
            evidence,
        });
    }
}
