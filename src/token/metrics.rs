//! The metrics of the refreshers ([`TokenMetrics`], one [`AccountMetrics`]
//! per account) and of the gate in front of Kraken ([`GateMetrics`]).

use prometheus::{Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::gate::Held;
use crate::kraken::{PERMISSIONS, Reason};
use crate::metrics::{Outcome, Register};

/// Refresh durations: a Kraken call takes 50 ms to a few seconds.
const REFRESH_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Why a call to Kraken was not made, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    Lockout,
    Budget,
}

impl HeldReason {
    pub const ALL: [HeldReason; 2] = [HeldReason::Lockout, HeldReason::Budget];

    pub fn as_str(self) -> &'static str {
        match self {
            HeldReason::Lockout => "lockout",
            HeldReason::Budget => "rejected_budget",
        }
    }

    fn of(held: &Held) -> Self {
        match held {
            Held::Lockout { .. } => HeldReason::Lockout,
            Held::Budget { .. } => HeldReason::Budget,
        }
    }
}

/// The refreshers' families.
pub struct TokenMetrics {
    refreshes: IntCounterVec,
    refresh_failures: IntCounterVec,
    refresh_duration: HistogramVec,
    token_expiry: GaugeVec,
    last_success: GaugeVec,
    last_failure: GaugeVec,
    token_valid: IntGaugeVec,
    key_expiry: GaugeVec,
    key_info: IntGaugeVec,
    key_permission: IntGaugeVec,
    foreign_use: IntCounterVec,
    unservable: IntCounterVec,
}

impl TokenMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        Self {
            refreshes: r.counters(
                "refreshes_total",
                "GetWebSocketsToken calls made, by outcome.",
                &["account", "result"],
            ),
            refresh_failures: r.counters(
                "refresh_failures_total",
                "Failed GetWebSocketsToken calls, by reason.",
                &["account", "reason"],
            ),
            refresh_duration: r.histograms(
                "refresh_duration_seconds",
                "Time a GetWebSocketsToken call took, success or failure.",
                REFRESH_BUCKETS,
                &["account"],
            ),
            token_expiry: r.gauges(
                "token_expiry_timestamp_seconds",
                "Unix time when the held token's use-by passes (0 when none is held).",
                &["account"],
            ),
            last_success: r.gauges(
                "last_refresh_success_timestamp_seconds",
                "Unix time of the last successful refresh (0 before the first).",
                &["account"],
            ),
            last_failure: r.gauges(
                "last_refresh_failure_timestamp_seconds",
                "Unix time of the last failed refresh, by reason (0 before the first).",
                &["account", "reason"],
            ),
            token_valid: r.int_gauges(
                "token_valid",
                "1 when a token with at least min_served_ttl left is held, else 0.",
                &["account"],
            ),
            key_expiry: r.gauges(
                "api_key_expiry_timestamp_seconds",
                "Unix time of the API key's expiration at Kraken, as GetApiKeyInfo reports it (key_expires_at while that cannot be read); only keys that expire.",
                &["account"],
            ),
            key_info: r.int_gauges(
                "api_key_info",
                "Always 1; key_fingerprint names the API key signing for the account (first 8 hex of its SHA-256).",
                &["account", "key_fingerprint"],
            ),
            key_permission: r.int_gauges(
                "api_key_permission",
                "1 for each of Kraken's permissions the account's API key holds, 0 for each it lacks, as GetApiKeyInfo reports.",
                &["account", "permission"],
            ),
            foreign_use: r.counters(
                "api_key_foreign_use_total",
                "Times the account's API key was seen used by another signer (its nonce moved where the broker's calls do not explain it, or stayed ahead of the broker's).",
                &["account"],
            ),
            unservable: r.counters(
                "unservable_tokens_total",
                "Tokens Kraken granted that live no longer than min_served_ttl, so can never be served.",
                &["account"],
            ),
        }
    }

    /// Handles for one account, every series pre-set to 0.
    pub fn account(&self, account: &str, gate: &GateMetrics) -> AccountMetrics {
        let failures = Reason::ALL.map(|r| {
            (
                self.refresh_failures.with_label_values(&[account, r.as_str()]),
                self.last_failure.with_label_values(&[account, r.as_str()]),
            )
        });
        let held = |reason: HeldReason| gate.calls_held.with_label_values(&[account, reason.as_str()]);
        AccountMetrics {
            account: account.to_owned(),
            success: self.refreshes.with_label_values(&[account, Outcome::Success.as_str()]),
            failure: self.refreshes.with_label_values(&[account, Outcome::Failure.as_str()]),
            failures,
            duration: self.refresh_duration.with_label_values(&[account]),
            expiry: self.token_expiry.with_label_values(&[account]),
            last_success: self.last_success.with_label_values(&[account]),
            valid: self.token_valid.with_label_values(&[account]),
            unservable: self.unservable.with_label_values(&[account]),
            key_expiry: self.key_expiry.clone(),
            key_info: self.key_info.clone(),
            key_permission: self.key_permission.clone(),
            foreign_use: self.foreign_use.with_label_values(&[account]),
            held_lockout: held(HeldReason::Lockout),
            held_budget: held(HeldReason::Budget),
        }
    }

    pub fn remove_account(&self, account: &str) {
        for result in Outcome::ALL {
            let _ = self.refreshes.remove_label_values(&[account, result.as_str()]);
        }
        for r in Reason::ALL {
            let _ = self.refresh_failures.remove_label_values(&[account, r.as_str()]);
            let _ = self.last_failure.remove_label_values(&[account, r.as_str()]);
        }
        let _ = self.refresh_duration.remove_label_values(&[account]);
        let _ = self.token_expiry.remove_label_values(&[account]);
        let _ = self.last_success.remove_label_values(&[account]);
        let _ = self.token_valid.remove_label_values(&[account]);
        let _ = self.key_expiry.remove_label_values(&[account]);
        let _ = self.foreign_use.remove_label_values(&[account]);
        for (permission, _) in PERMISSIONS {
            let _ = self.key_permission.remove_label_values(&[account, permission]);
        }
        let _ = self.unservable.remove_label_values(&[account]);
        remove_key_info(&self.key_info, account);
    }
}

/// Drops every `api_key_info` series of `account` (whatever fingerprint).
fn remove_key_info(key_info: &IntGaugeVec, account: &str) {
    use prometheus::core::Collector as _;
    for family in key_info.collect() {
        for metric in family.get_metric() {
            let labels = metric.get_label();
            let of_account = labels.iter().any(|l| l.name() == "account" && l.value() == account);
            if let Some(fp) = labels.iter().find(|l| l.name() == "key_fingerprint")
                && of_account
            {
                let _ = key_info.remove_label_values(&[account, fp.value()]);
            }
        }
    }
}

/// One account's metric handles.
#[derive(Clone)]
pub struct AccountMetrics {
    account: String,
    success: IntCounter,
    failure: IntCounter,
    /// Per reason, in the order of [`Reason::ALL`] (indexed by
    /// [`Reason::index`]): the failure counter and the last-failure
    /// timestamp.
    failures: [(IntCounter, Gauge); Reason::ALL.len()],
    duration: Histogram,
    expiry: Gauge,
    last_success: Gauge,
    valid: IntGauge,
    unservable: IntCounter,
    key_expiry: GaugeVec,
    key_info: IntGaugeVec,
    key_permission: IntGaugeVec,
    foreign_use: IntCounter,
    /// `kraken_calls_held_total{reason="lockout"}` ...
    held_lockout: IntCounter,
    /// ... and `{reason="rejected_budget"}`.
    held_budget: IntCounter,
}

impl AccountMetrics {
    pub fn refresh_succeeded(&self, seconds: f64, expires_at_unix: f64, now_unix: f64) {
        self.success.inc();
        self.duration.observe(seconds);
        self.expiry.set(expires_at_unix);
        self.last_success.set(now_unix);
    }

    pub fn refresh_failed(&self, reason: Reason, seconds: f64, now_unix: f64) {
        self.failure.inc();
        self.duration.observe(seconds);
        let (counter, last) = &self.failures[reason.index()];
        counter.inc();
        last.set(now_unix);
    }

    /// No token is held any more (dropped after use-by or invalidation).
    pub fn token_dropped(&self) {
        self.expiry.set(0.0);
        self.valid.set(0);
    }

    pub fn set_valid(&self, valid: bool) {
        self.valid.set(i64::from(valid));
    }

    /// Names the key now signing (and its expiration, as known).
    pub fn set_key(&self, fingerprint: &str, expires_at: Option<std::time::SystemTime>) {
        remove_key_info(&self.key_info, &self.account);
        self.key_info.with_label_values(&[&self.account, fingerprint]).set(1);
        self.set_key_expiry(expires_at);
    }

    /// The key's permissions, as Kraken reports them: each one this broker
    /// knows by name, 1 or 0 (a closed label set); `None` drops them (the
    /// key changed and is not read yet).
    pub fn set_permissions(&self, held: Option<&[String]>) {
        for (permission, _) in PERMISSIONS {
            match held {
                Some(held) => self
                    .key_permission
                    .with_label_values(&[self.account.as_str(), permission])
                    .set(i64::from(held.iter().any(|h| h == permission))),
                None => {
                    let _ = self
                        .key_permission
                        .remove_label_values(&[self.account.as_str(), permission]);
                }
            }
        }
    }

    /// Another signer was seen using the key.
    pub fn foreign_use(&self) {
        self.foreign_use.inc();
    }

    /// The key's expiration (none: the series is dropped).
    pub fn set_key_expiry(&self, expires_at: Option<std::time::SystemTime>) {
        match expires_at {
            Some(t) => self
                .key_expiry
                .with_label_values(&[&self.account])
                .set(crate::clock::unix_secs_f64(t)),
            None => {
                let _ = self.key_expiry.remove_label_values(&[&self.account]);
            }
        }
    }

    pub fn unservable_token(&self) {
        self.unservable.inc();
    }

    /// A call not made: the gate held it.
    pub fn call_held(&self, held: &Held) {
        match HeldReason::of(held) {
            HeldReason::Lockout => self.held_lockout.inc(),
            HeldReason::Budget => self.held_budget.inc(),
        }
    }
}

/// The gate's families: read at scrape time (its window slides without
/// events), and the calls it held per account.
pub struct GateMetrics {
    calls_held: IntCounterVec,
    lockout_until: Gauge,
    rejected_calls: IntGauge,
    rejected_calls_max: IntGauge,
}

impl GateMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        Self {
            calls_held: r.counters(
                "kraken_calls_held_total",
                "Calls to Kraken not made: during a lockout, or past the rejected-call budget.",
                &["account", "reason"],
            ),
            lockout_until: r.gauge(
                "kraken_lockout_until_timestamp_seconds",
                "Unix time until which no account calls Kraken after a lockout answer (0 when none).",
            ),
            rejected_calls: r.int_gauge(
                "kraken_rejected_calls",
                "Calls rejected by Kraken (invalid key, signature, nonce, permission) in the last 15 minutes, all accounts.",
            ),
            rejected_calls_max: r.int_gauge(
                "kraken_rejected_calls_max",
                "The budget of rejected calls per 15 minutes (kraken.max_rejected_calls).",
            ),
        }
    }

    /// The gate's state, set just before a scrape.
    pub fn set(&self, lockout_until_unix: f64, rejected: u32, max: u32) {
        self.lockout_until.set(lockout_until_unix);
        self.rejected_calls.set(i64::from(rejected));
        self.rejected_calls_max.set(i64::from(max));
    }

    pub fn remove_account(&self, account: &str) {
        for reason in HeldReason::ALL {
            let _ = self.calls_held.remove_label_values(&[account, reason.as_str()]);
        }
    }
}
