//! The refresher's behaviour under paused time, against a scripted source.

use std::time::SystemTime;

use super::*;
use crate::kraken::{ApiFailure, Class, Reason, classify_api_error};
use crate::metrics::Metrics;
use crate::token::{RefreshPolicy, TokenSource};
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
        events: Default::default(),
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
    // Attempt 1: nonce, re-signed nonce -> rejected (another signer keeps
    // the nonce ahead): retried slowly. Attempt 2 (retry_rejected later):
    // nonce, re-signed -> a token. Four calls.
    let source = scripted(Duration::from_secs(900));
    source.fail(3, kraken("EAPI:Invalid nonce"));
    let slow = RefreshPolicy {
        retry_rejected: Duration::from_secs(30),
        ..policy()
    };
    let (handle, metrics, _cancel) = start(&source, slow);
    let refused = handle.want(MIN).await.unwrap_err();
    assert_eq!(refused.cause, Cause::RefreshFailing(Reason::InvalidNonce));
    assert_eq!(source.calls(), 2, "the first attempt and its retry");
    let Health::Failing { permanent, detail, .. } = &handle.published().health else {
        panic!("failing");
    };
    assert!(
        *permanent,
        "a nonce refused after its retry needs an operator: {detail}"
    );
    assert!(
        metrics
            .encode()
            .contains("api_key_foreign_use_total{account=\"acct\"} 1"),
        "counted as use elsewhere"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(source.calls(), 2, "nothing before retry_rejected");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(handle.want(MIN).await.is_ok());
    assert_eq!(source.calls(), 4, "the second attempt had its own retry");
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
    // A key not yet proven waits too: a rotation gone wrong on many
    // accounts stops at the budget ...
    let fresh = scripted(Duration::from_secs(900));
    let fresh_handle = start_with_gate("fresh", &fresh, fast, &gate, &metrics);
    assert!(fresh_handle.want(MIN).await.is_err());
    assert_eq!(fresh.calls(), 0, "an unproven key is held once the budget is spent");
    // The window slides: retries resume, and the fresh key is tried.
    tokio::time::sleep(Duration::from_secs(400)).await;
    assert!(bad.calls() > 3);
    assert!(fresh_handle.want(MIN).await.is_ok());
    assert_eq!(fresh.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_proven_key_is_never_held_by_the_budget() {
    let gate = Arc::new(KrakenGate::new(3));
    let metrics = Metrics::new();
    let good = scripted(Duration::from_secs(900));
    let good_handle = start_with_gate("good", &good, policy(), &gate, &metrics);
    assert!(good_handle.want(MIN).await.is_ok());
    for _ in 0..3 {
        gate.rejected(Instant::now());
    }
    // Asking for more time than the held token has left forces a call.
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(good_handle.want(Duration::from_secs(850)).await.is_ok());
    assert_eq!(good.calls(), 2, "a key that has worked keeps its service");
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

mod demand;
