//! `[kraken]` and `[refresh]`: talking to Kraken, and when to refresh.

use std::time::Duration;

use super::super::KrakenConfig;
use super::super::problems::{Findings, at};
use super::super::raw::{KrakenSection, RefreshSection};
use super::super::values::{duration, offset, url};
use super::super::{DEFAULT_KEY_INFO_INTERVAL, DEFAULT_KRAKEN_TIMEOUT, DEFAULT_REST_URL, DEFAULT_WS_URL};
use crate::token::RefreshPolicy;
use crate::token::gate::DEFAULT_MAX_REJECTED_CALLS;
use crate::token::schedule::MAX_REJECTED_RETRY;

/// The longest Kraken call timeout accepted: longer only delays failover.
const MAX_KRAKEN_TIMEOUT: Duration = Duration::from_secs(120);
/// Kraken's token lifetime, which refresh settings must fit inside.
const TOKEN_LIFETIME: Duration = crate::token::MAX_TOKEN_LIFETIME;
/// The longest back-off accepted between retries.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// The shortest `retry_rejected`: tests use a second; production wants minutes.
const MIN_RETRY_REJECTED: Duration = Duration::from_secs(1);
/// The most `max_rejected_calls` accepted: more only invites a lockout.
const MAX_REJECTED_CALLS_LIMIT: u32 = 1000;
/// The bounds of `key_info_interval`: more often only spends the key's call
/// counter; less often sees a key used elsewhere too late.
const MIN_KEY_INFO_INTERVAL: Duration = Duration::from_secs(60);
const MAX_KEY_INFO_INTERVAL: Duration = Duration::from_secs(24 * 3600);

pub(in crate::config) fn kraken(f: &mut Findings<'_>, s: &KrakenSection) -> KrakenConfig {
    let max_rejected_calls = match &s.max_rejected_calls {
        None => DEFAULT_MAX_REJECTED_CALLS,
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(n) if (1..=MAX_REJECTED_CALLS_LIMIT).contains(&n) => n,
            _ => {
                let msg = format!(
                    "must be a whole number from 1 to {MAX_REJECTED_CALLS_LIMIT} (rejected calls per 15 minutes, all accounts)"
                );
                f.problem(at(n), "kraken.max_rejected_calls", msg);
                DEFAULT_MAX_REJECTED_CALLS
            }
        },
    };
    let kraken = KrakenConfig {
        rest_url: url(f, &s.rest_url, "kraken.rest_url", DEFAULT_REST_URL, &["https", "http"]),
        ws_url: url(f, &s.ws_url, "kraken.ws_url", DEFAULT_WS_URL, &["wss", "ws"]),
        timeout: duration(f, &s.timeout, "kraken.timeout", DEFAULT_KRAKEN_TIMEOUT),
        max_rejected_calls,
        key_info_interval: duration(
            f,
            &s.key_info_interval,
            "kraken.key_info_interval",
            DEFAULT_KEY_INFO_INTERVAL,
        ),
    };
    if !(MIN_KEY_INFO_INTERVAL..=MAX_KEY_INFO_INTERVAL).contains(&kraken.key_info_interval) {
        let msg = format!(
            "must be between {} and {} (GetApiKeyInfo costs a point of the key's call counter)",
            secs(MIN_KEY_INFO_INTERVAL),
            secs(MAX_KEY_INFO_INTERVAL)
        );
        f.problem(offset(&s.key_info_interval), "kraken.key_info_interval", msg);
    }
    if kraken.timeout.is_zero() || kraken.timeout > MAX_KRAKEN_TIMEOUT {
        let msg = format!("must be between 1s and {}s", MAX_KRAKEN_TIMEOUT.as_secs());
        f.problem(offset(&s.timeout), "kraken.timeout", msg);
    }
    kraken
}

pub(in crate::config) fn refresh(f: &mut Findings<'_>, s: &RefreshSection) -> RefreshPolicy {
    let d = RefreshPolicy::DEFAULT;
    let r = RefreshPolicy {
        refresh_before_expiry: duration(
            f,
            &s.refresh_before_expiry,
            "refresh.refresh_before_expiry",
            d.refresh_before_expiry,
        ),
        min_served_ttl: duration(f, &s.min_served_ttl, "refresh.min_served_ttl", d.min_served_ttl),
        jitter: duration(f, &s.jitter, "refresh.jitter", d.jitter),
        retry_initial: duration(f, &s.retry_initial, "refresh.retry_initial", d.retry_initial),
        retry_max: duration(f, &s.retry_max, "refresh.retry_max", d.retry_max),
        retry_rejected: duration(f, &s.retry_rejected, "refresh.retry_rejected", d.retry_rejected),
    };
    check_refresh_timing(f, s, &r);
    check_retries(f, s, &r);
    r
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// When to refresh: before use-by, after a token stops being servable.
fn check_refresh_timing(f: &mut Findings<'_>, s: &RefreshSection, r: &RefreshPolicy) {
    if r.min_served_ttl.is_zero() {
        f.problem(offset(&s.min_served_ttl), "refresh.min_served_ttl", "must be positive");
    }
    let before_expiry_at = offset(&s.refresh_before_expiry).or(offset(&s.min_served_ttl));
    if r.refresh_before_expiry <= r.min_served_ttl {
        f.problem(
            before_expiry_at,
            "refresh.refresh_before_expiry",
            format!(
                "must exceed min_served_ttl ({}), or tokens stop being servable before a refresh starts",
                secs(r.min_served_ttl)
            ),
        );
    }
    if r.refresh_before_expiry + r.jitter >= TOKEN_LIFETIME {
        f.problem(
            before_expiry_at.or(offset(&s.jitter)),
            "refresh.refresh_before_expiry",
            format!(
                "with jitter it must stay below Kraken's {} token lifetime",
                secs(TOKEN_LIFETIME)
            ),
        );
    }
}

/// How to retry after a failure.
fn check_retries(f: &mut Findings<'_>, s: &RefreshSection, r: &RefreshPolicy) {
    if r.retry_initial.is_zero() {
        f.problem(offset(&s.retry_initial), "refresh.retry_initial", "must be positive");
    }
    if r.retry_initial > r.retry_max {
        let place = offset(&s.retry_initial).or(offset(&s.retry_max));
        f.problem(place, "refresh.retry_initial", "must not exceed retry_max");
    }
    if r.retry_max > MAX_RETRY {
        let msg = format!("must be at most {}", secs(MAX_RETRY));
        f.problem(offset(&s.retry_max), "refresh.retry_max", msg);
    }
    if r.retry_rejected < MIN_RETRY_REJECTED || r.retry_rejected > MAX_REJECTED_RETRY {
        let msg = format!(
            "must be between {} and {} (it doubles up to {} after each rejection)",
            secs(MIN_RETRY_REJECTED),
            secs(MAX_REJECTED_RETRY),
            secs(MAX_REJECTED_RETRY)
        );
        f.problem(offset(&s.retry_rejected), "refresh.retry_rejected", msg);
    }
}
