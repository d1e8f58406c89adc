//! Kraken as it really is, against the simulator: lockouts by address across
//! keys, the broker's rejected-call budget keeping the address clear of
//! them, key settings (expiration, IP allowlist), short tokens, an edge's
//! Retry-After, and Kraken's maintenance state.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Broker, Served, account, policy, start_sim, wait_for};
use kraken_token_broker::sim::{FaultSpec, SimConfig, SimKey, SystemStatus};

fn lockouts(sim: &kraken_token_broker::sim::SimHandle) -> usize {
    sim.state()
        .calls()
        .iter()
        .filter(|c| c.outcome == "EGeneral:Temporary lockout")
        .count()
}

#[tokio::test]
async fn three_rejected_keys_beside_a_good_one_never_lock_the_address_or_cost_the_good_one_service() {
    // The simulator locks an address out after 5 failed calls in 15 minutes
    // (every key from it); the broker's budget is 3 rejected calls per 15
    // minutes, and rejected keys are retried every second if it allowed.
    let good = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![good.clone()],
        lockout_threshold: 5,
        ..SimConfig::default()
    })
    .await;
    let mut accounts = vec![account("good", &good)];
    for name in ["revoked-a", "revoked-b", "revoked-c"] {
        accounts.push(account(name, &SimKey::generate())); // unknown to Kraken
    }
    let fast_rejected = kraken_token_broker::token::RefreshPolicy {
        retry_rejected: Duration::from_secs(1),
        ..policy(450.0, 60.0, 30.0, (0.2, 1.0))
    };
    let broker = Broker::on(&sim).accounts(accounts).policy(fast_rejected).start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = common::fetch_until(
        broker.http.clone(),
        format!("{}/v1/token?account=good", broker.api),
        broker.credential.clone(),
        Arc::clone(&stop),
        Duration::from_millis(50),
    );
    // An observation window for an absence (no retry of a rejected key):
    // long enough for five retries at 1 s, were they not held.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = consumer.await.unwrap();
    let span = seen.last().map_or(0, |l| l.at_ms) - seen.first().map_or(0, |f| f.at_ms);
    assert!(span >= 5_000, "the consumer fetched through the window: {span} ms");
    assert!(
        seen.iter().all(|f| f.status == 200),
        "the good account never lost service: {:?}",
        seen.iter().map(|f| f.status).collect::<Vec<_>>()
    );
    let rejected = sim
        .state()
        .calls()
        .iter()
        .filter(|c| c.outcome == "EAPI:Invalid key")
        .count();
    assert_eq!(rejected, 3, "each rejected key's first call, then none");
    assert_eq!(lockouts(&sim), 0, "the simulator never locked the address");
    let (status, readyz) = broker.admin_get("/readyz").await;
    assert_eq!(status, 200, "one account serves: {readyz}");
    assert!(readyz.contains("\"rejected_calls_last_15m\":3"), "{readyz}");
    assert!(readyz.contains("retries held"), "{readyz}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_lockout_answered_to_one_account_pauses_every_account_which_keeps_serving() {
    let (a, b) = (SimKey::generate(), SimKey::generate());
    let sim = start_sim(SimConfig {
        keys: vec![a.clone(), b.clone()],
        token_ttl: Duration::from_secs(4),
        ..SimConfig::default()
    })
    .await;
    let broker = Broker::on(&sim)
        .accounts(vec![account("one", &a), account("two", &b)])
        .policy(policy(2.0, 1.0, 0.0, (0.2, 1.0)))
        .start()
        .await;
    for name in ["one", "two"] {
        wait_for("tokens", Duration::from_secs(5), || async {
            (broker.get_token(&format!("?account={name}")).await.0 == 200).then_some(())
        })
        .await;
    }
    sim.state().set_fault(FaultSpec {
        error: Some("EGeneral:Temporary lockout".into()),
        count: Some(1),
        ..FaultSpec::default()
    });
    // Both refresh within 2 s: the first to call hears the lockout (a call
    // of the other already in flight may land beside it); after that, for
    // longer than both accounts' refresh intervals, no account calls.
    wait_for("the lockout answer", Duration::from_secs(5), || async {
        (lockouts(&sim) == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_lockout = sim.state().calls().len();
    let until = Instant::now() + Duration::from_secs(3);
    let mut served_during = 0;
    while Instant::now() < until {
        if broker.get_token("?account=two").await.0 == 200 {
            served_during += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sim.state().calls().len(),
        after_lockout,
        "no account calls Kraken during the lockout"
    );
    assert!(served_during > 0, "live tokens are served meanwhile");
    let (status, readyz) = broker.admin_get("/readyz").await;
    assert_eq!(
        status, 200,
        "a lockout every replica shares keeps this one ready: {readyz}"
    );
    assert!(readyz.contains("lockout_until"), "{readyz}");
    let (_, metrics) = broker.admin_get("/metrics").await;
    assert!(common::metric_value(&metrics, "kraken_lockout_until_timestamp_seconds") > 0.0);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn fifteen_reloads_of_an_unknown_key_make_at_most_the_budget_of_calls() {
    // Reproduced before: 15 SIGHUPs 0.3 s apart made 10 `EAPI:Invalid key`
    // calls and a 15-minute lockout. Now each reload is an operator's retry,
    // and those stop at the budget (3 per 15 minutes).
    let sim = start_sim(SimConfig::default()).await; // knows no key
    let unknown = SimKey::generate();
    let mut served = Served::start(&sim, &unknown, "", &[]).await;
    served
        .wait_log("the rejection", Duration::from_secs(5), |l| l["level"] == "ERROR")
        .await;
    for _ in 0..15 {
        served.signal("HUP");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    served
        .wait_log("a held retry", Duration::from_secs(5), |l| {
            l["message"].as_str().is_some_and(|m| m.contains("budget"))
        })
        .await;
    let calls = sim.state().calls();
    let rejected = calls.iter().filter(|c| c.outcome == "EAPI:Invalid key").count();
    assert_eq!(rejected, 3, "{calls:?}");
    assert_eq!(lockouts(&sim), 0);
    served.signal("TERM");
    assert_eq!(served.exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test]
async fn an_address_off_the_keys_allowlist_is_denied_and_the_fix_names_the_allowlist() {
    let mut fenced = SimKey::generate();
    fenced.ip_allowlist = vec!["10.99.0.0/16".into()]; // never 127.0.0.1
    let sim = start_sim(SimConfig {
        keys: vec![fenced.clone()],
        ..SimConfig::default()
    })
    .await;
    let served = Served::start(&sim, &fenced, "", &[]).await;
    let line = served
        .wait_log("the rejection", Duration::from_secs(5), |l| l["level"] == "ERROR")
        .await;
    assert_eq!(line["reason"], "permission_denied", "{line}");
    assert!(
        line["fix"].as_str().unwrap().contains("IP Address Restriction"),
        "{line}"
    );
    assert!(
        line["key"].as_str().is_some_and(|k| k.len() == 8),
        "the key's fingerprint: {line}"
    );
}

#[tokio::test]
async fn a_key_past_its_expiration_at_kraken_is_refused_and_the_broker_says_so() {
    let mut expired = SimKey::generate();
    expired.valid_until = Some("2021-01-01T00:00:00Z".into());
    let sim = start_sim(SimConfig {
        keys: vec![expired.clone()],
        ..SimConfig::default()
    })
    .await;
    // The broker is not told of the expiry: it hears Kraken's answer.
    let served = Served::start(&sim, &expired, "", &[]).await;
    let line = served
        .wait_log("the rejection", Duration::from_secs(5), |l| l["level"] == "ERROR")
        .await;
    assert_eq!(line["reason"], "invalid_key", "{line}");
    assert!(line["fix"].as_str().unwrap().contains("expiration"), "{line}");

    // Told of it (key_expires_at), the broker makes no call at all.
    let sim = start_sim(SimConfig {
        keys: vec![expired.clone()],
        ..SimConfig::default()
    })
    .await;
    let served = Served::start_with(&sim, &expired, "", "key_expires_at = \"2021-01-01T00:00:00Z\"", &[]).await;
    served
        .wait_log("the expiry", Duration::from_secs(5), |l| {
            l["message"].as_str().is_some_and(|m| m.contains("expired"))
        })
        .await;
    assert!(sim.state().calls().is_empty(), "no call with an expired key");
    let metrics = served.admin_text("/metrics").await;
    assert!(
        metrics.contains("kraken_token_broker_api_key_expiry_timestamp_seconds{account=\"main\"} 1609459200"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tokens_that_live_less_than_min_served_ttl_get_503_and_a_back_off_not_a_loop() {
    for expires in [1, 59] {
        let key = SimKey::generate();
        let sim = start_sim(SimConfig {
            keys: vec![key.clone()],
            fault: Some(FaultSpec {
                expires: Some(serde_json::json!(expires)),
                ..FaultSpec::default()
            }),
            ..SimConfig::default()
        })
        .await;
        let broker = Broker::on(&sim)
            .key(&key)
            .policy(policy(450.0, 60.0, 0.0, (1.0, 60.0)))
            .start()
            .await;
        let (status, retry_after, body) = broker.get_token("").await;
        assert_eq!(status, 503, "expires {expires}: {body}");
        assert!(retry_after.is_some());
        assert!(
            body["detail"].as_str().unwrap().contains("min_served_ttl"),
            "expires {expires}: {body}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let calls = sim.state().token_calls().len();
        assert!(calls <= 3, "expires {expires}: {calls} calls in 3 s, not one a second");
        let (_, readyz) = broker.admin_get("/readyz").await;
        assert!(readyz.contains("no more than min_served_ttl"), "{readyz}");
        let (_, metrics) = broker.admin_get("/metrics").await;
        assert!(common::metric_value(&metrics, "unservable_tokens_total{account=\"main\"}") >= 1.0);
        broker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn an_edge_retry_after_is_honoured() {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        fault: Some(FaultSpec {
            http_status: Some(429),
            retry_after_secs: Some(30),
            ..FaultSpec::default()
        }),
        ..SimConfig::default()
    })
    .await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 0.0, (0.1, 0.5)))
        .start()
        .await;
    let (status, retry_after, _) = broker.get_token("").await;
    assert_eq!(status, 503);
    let secs: u64 = retry_after.unwrap().parse().unwrap();
    assert!((25..=30).contains(&secs), "Retry-After {secs}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.state().token_calls().len(),
        1,
        "no retry before the edge's Retry-After, whatever the back-off says"
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn kraken_in_maintenance_is_an_outage_the_broker_rides_out() {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        token_ttl: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(1.5, 1.0, 0.0, (0.2, 0.5)))
        .start()
        .await;
    assert_eq!(broker.get_token("").await.0, 200);
    sim.state().set_system_status(SystemStatus::Maintenance);
    wait_for("the token to run out", Duration::from_secs(5), || async {
        (broker.get_token("").await.0 == 503).then_some(())
    })
    .await;
    let failures = broker.metric("refresh_failures_total{account=\"main\",reason=\"unavailable\"}");
    assert!(failures >= 1.0);
    assert_eq!(
        broker.admin_get("/readyz").await.0,
        200,
        "an outage keeps the replica ready"
    );
    sim.state().set_system_status(SystemStatus::Online);
    wait_for("recovery", Duration::from_secs(3), || async {
        (broker.get_token("").await.0 == 200).then_some(())
    })
    .await;
    broker.stop().await.unwrap();
}
