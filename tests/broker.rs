//! The broker in this process against the simulator on 127.0.0.1: cold
//! start, refresh ahead, outages, rejected keys, invalidation.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Broker, now_ms, policy, sim_with_key, start_sim, wait_for};
use kraken_token_broker::sim::{FaultSpec, SimConfig, SimKey};

fn fault(error: &str) -> FaultSpec {
    FaultSpec {
        error: Some(error.into()),
        ..FaultSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_with_500_concurrent_consumers_makes_one_upstream_call() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    // A slow first answer, so every consumer arrives while it is in flight.
    sim.state().set_fault(FaultSpec {
        delay_ms: Some(1500),
        count: Some(1),
        ..FaultSpec::default()
    });
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    let asks: Vec<_> = (0..500)
        .map(|_| {
            let (http, url, credential) = (
                broker.http.clone(),
                format!("{}/v1/token", broker.api),
                broker.credential.clone(),
            );
            tokio::spawn(async move {
                let r = http.get(url).bearer_auth(credential).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.json::<serde_json::Value>().await.unwrap()["token"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
        })
        .collect();
    let mut tokens = HashSet::new();
    for ask in asks {
        tokens.insert(ask.await.unwrap());
    }
    assert_eq!(tokens.len(), 1, "all 500 got the same token");
    let token = tokens.into_iter().next().unwrap();
    assert!(sim.state().token_is_valid(&token), "a token the simulator issued");
    assert_eq!(sim.state().token_calls().len(), 1, "one upstream call");
    assert_eq!(
        broker.metric("tokens_served_total{account=\"main\",consumer=\"engine\"}"),
        500.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_use_by_over_several_lifetimes() {
    // 3 s tokens; refresh 1.5-1.7 s before use-by; never serve under 1 s left.
    let (sim, key) = sim_with_key(Duration::from_secs(3)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(1.5, 1.0, 0.2, (0.2, 1.0)))
        .start()
        .await;
    let mut served = Vec::new();
    let until = now_ms() + 9_000;
    while now_ms() < until {
        let (status, _, body) = broker.get_token("").await;
        assert_eq!(status, 200, "never a gap: {body}");
        served.push((body["token"].as_str().unwrap().to_owned(), now_ms()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let issued = sim.state().tokens();
    let distinct: HashSet<&str> = served.iter().map(|(t, _)| t.as_str()).collect();
    assert!(
        distinct.len() >= 4,
        "several lifetimes, several tokens: {}",
        distinct.len()
    );
    for (token, received_ms) in &served {
        let t = issued
            .iter()
            .find(|i| &i.token == token)
            .expect("issued by the simulator");
        let left = t.expires_at_unix_ms.saturating_sub(*received_ms);
        assert!(
            left >= 950,
            "a token was served with {left} ms left, under min_served_ttl"
        );
    }
    // One refresh every ~1.3-1.5 s over 9 s, plus the first.
    let calls = sim.state().token_calls().len();
    assert!((5..=9).contains(&calls), "{calls} upstream calls");
    assert_eq!(
        broker.metric("refreshes_total{account=\"main\",result=\"failure\"}"),
        0.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn an_outage_longer_than_a_token_serves_it_then_fails_closed_then_recovers() {
    let (sim, key) = sim_with_key(Duration::from_secs(4)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(2.0, 1.5, 0.0, (0.2, 1.0)))
        .start()
        .await;
    let (status, _, first) = broker.get_token("").await;
    assert_eq!(status, 200);
    let first = first["token"].as_str().unwrap().to_owned();
    sim.state().set_fault(fault("EService:Unavailable"));

    // The live token is served through the outage while it has 1.5 s left ...
    let (status, _, body) = broker.get_token("").await;
    assert_eq!((status, body["token"].as_str()), (200, Some(first.as_str())));
    // ... then 503 with Retry-After.
    let (retry_after, problem) = wait_for("503 once the token runs low", Duration::from_secs(6), || async {
        let (status, retry_after, body) = broker.get_token("").await;
        (status == 503).then_some((retry_after, body))
    })
    .await;
    let retry_after: u64 = retry_after.expect("Retry-After on 503").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(problem["status"], 503);
    assert!(problem["detail"].as_str().unwrap().contains("unavailable"), "{problem}");

    // An outage every replica shares keeps the replica ready (consumers get
    // 503 with Retry-After rather than refused connections); the body says
    // the account cannot be served, and why.
    let (status, readyz) = broker.admin_get("/readyz").await;
    assert_eq!(status, 200, "{readyz}");
    assert!(
        readyz.contains("\"ready\":false") && readyz.contains("unavailable"),
        "{readyz}"
    );
    assert_eq!(broker.metric("token_valid{account=\"main\"}"), 0.0);
    let failures = broker.metric("refresh_failures_total{account=\"main\",reason=\"unavailable\"}");
    assert!(failures >= 1.0);
    wait_for("failures to keep rising", Duration::from_secs(5), || async {
        (broker.metric("refresh_failures_total{account=\"main\",reason=\"unavailable\"}") > failures).then_some(())
    })
    .await;

    // Kraken heals: a token within retry_max (1 s) plus the call.
    sim.state().clear_fault();
    let healed = now_ms();
    wait_for("recovery", Duration::from_secs(3), || async {
        (broker.get_token("").await.0 == 200).then_some(())
    })
    .await;
    assert!(now_ms() - healed <= 2_000, "recovered in {} ms", now_ms() - healed);
    assert_eq!(broker.admin_get("/readyz").await.0, 200);
    assert_eq!(broker.metric("token_valid{account=\"main\"}"), 1.0);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_rejected_key_is_not_hammered_and_says_why() {
    // A key the simulator does not know, and one without the WebSocket permission.
    let mut no_permission = SimKey::generate();
    no_permission.ws_permission = false;
    let known = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![no_permission.clone(), known],
        ..SimConfig::default()
    })
    .await;
    let unknown = SimKey::generate();
    let broker = Broker::on(&sim)
        .accounts(vec![
            common::account("revoked", &unknown),
            common::account("denied", &no_permission),
        ])
        .policy(policy(450.0, 60.0, 30.0, (0.1, 0.5)))
        .start()
        .await;
    let (status, readyz) = wait_for("both accounts to fail", Duration::from_secs(5), || async {
        let (status, body) = broker.admin_get("/readyz").await;
        (body.matches("needs an operator").count() == 2).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        readyz.contains("invalid_key") && readyz.contains("permission_denied"),
        "{readyz}"
    );
    // Even with a 0.1 s retry policy, a permanent rejection is retried slowly.
    // One call each, of either kind: the unknown key's GetApiKeyInfo is
    // rejected (and stands for its token call); the key without the
    // WebSocket permission is read, then refused with no token call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = sim.state().calls();
    for key in [&unknown.api_key, &no_permission.api_key] {
        let n = calls.iter().filter(|c| c.api_key.as_ref() == Some(key)).count();
        assert_eq!(n, 1, "one call, then the next only after minutes");
    }
    assert!(sim.state().token_calls().is_empty(), "no token call with either key");
    assert_eq!(
        broker.metric("refresh_failures_total{account=\"revoked\",reason=\"invalid_key\"}"),
        1.0
    );
    assert_eq!(
        broker.metric("refresh_failures_total{account=\"denied\",reason=\"permission_denied\"}"),
        1.0
    );
    let (status, _, body) = broker.get_token("?account=denied").await;
    assert_eq!(status, 503);
    assert!(body["detail"].as_str().unwrap().contains("permission_denied"), "{body}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn fifty_reports_of_the_current_token_cause_one_call_and_an_old_token_none() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    let (_, _, first) = broker.get_token("").await;
    let old = first["token"].as_str().unwrap().to_owned();
    assert_eq!(sim.state().token_calls().len(), 1);
    let url = format!("{}/v1/token/invalidate?account=main", broker.api);
    let report = |token: String| {
        let (http, url, credential) = (broker.http.clone(), url.clone(), broker.credential.clone());
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(credential)
                .json(&serde_json::json!({ "token": token }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["token"]
                .as_str()
                .unwrap()
                .to_owned()
        })
    };
    let reports: Vec<_> = (0..50).map(|_| report(old.clone())).collect();
    let mut fresh = HashSet::new();
    for r in reports {
        fresh.insert(r.await.unwrap());
    }
    assert_eq!(fresh.len(), 1, "all 50 got the same new token");
    assert!(!fresh.contains(&old));
    assert_eq!(sim.state().token_calls().len(), 2, "one upstream call for 50 reports");
    let again = report(old.clone()).await.unwrap();
    assert!(fresh.contains(&again), "an old token's report answers the current one");
    assert_eq!(sim.state().token_calls().len(), 2, "and makes no call");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn min_ttl_above_the_held_token_refreshes_first() {
    let (sim, key) = sim_with_key(Duration::from_secs(20)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(10.0, 2.0, 0.0, (0.2, 1.0)))
        .start()
        .await;
    let (_, _, first) = broker.get_token("").await;
    // The held token must age past a whole second, so that less than 19 s
    // of its 20 s remain: the wait is the behaviour under test, not a race.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, second) = broker.get_token("?min_ttl=19").await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(first["token"], second["token"]);
    assert!(second["expires_in"].as_u64().unwrap() >= 19);
    let (status, _, body) = broker.get_token("?min_ttl=21").await;
    assert_eq!(status, 400, "more than a whole lifetime: {body}");
    assert_eq!(sim.state().token_calls().len(), 2);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_heads_and_wrong_methods_over_a_real_socket() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    let big = "a".repeat(12 * 1024);
    let r = broker
        .http
        .get(format!("{}/v1/token", broker.api))
        .bearer_auth(&broker.credential)
        .header("x-big", big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = broker
        .http
        .delete(format!("{}/v1/token", broker.api))
        .bearer_auth(&broker.credential)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let (status, body) = broker.admin_get("/v1/token").await;
    assert_eq!(status, 404, "the admin listener never serves tokens: {body}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn reload_adds_changes_and_removes_accounts() {
    use kraken_token_broker::broker::{Broker as Core, Options, ReloadSummary};
    use kraken_token_broker::metrics::Metrics;

    let (a, b, c) = (SimKey::generate(), SimKey::generate(), SimKey::generate());
    let sim = start_sim(SimConfig {
        keys: vec![a.clone(), b.clone(), c.clone()],
        ..SimConfig::default()
    })
    .await;
    let config = |accounts| common::test_config(&sim, accounts, policy(450.0, 60.0, 30.0, (1.0, 60.0)), [7; 32]);
    let metrics = Metrics::new();
    let options = Options {
        metrics: metrics.clone(),
        jitter: || 0.5,
        ..Options::default()
    };
    let mut core = Core::start(config(vec![common::account("one", &a)]), options).unwrap();
    let state = core.state();
    let one = state.table.load().accounts["one"].clone();
    one.want(Duration::from_secs(60)).await.unwrap();

    let (summary, applied) = core
        .reload(config(vec![common::account("one", &b), common::account("two", &c)]))
        .unwrap();
    for change in applied {
        change.wait().await;
    }
    assert_eq!(
        summary,
        ReloadSummary {
            added: vec!["two".into()],
            changed: vec!["one".into()],
            removed: vec![],
        }
    );
    let table = state.table.load();
    assert_eq!(table.consumers[0].grants.len(), 2);
    table.accounts["two"].want(Duration::from_secs(60)).await.unwrap();
    // "one" now signs with key b at its next refresh; force one.
    let current = table.accounts["one"].published().token.clone().unwrap();
    table.accounts["one"].invalidate(current.sha256, "test").await.unwrap();
    let calls = sim.state().token_calls();
    assert_eq!(calls.last().unwrap().api_key.as_deref(), Some(b.api_key.as_str()));

    let (same, _) = core
        .reload(config(vec![common::account("one", &b), common::account("two", &c)]))
        .unwrap();
    assert_eq!(same, ReloadSummary::default(), "an unchanged config changes nothing");
    let (removed, _) = core.reload(config(vec![common::account("one", &b)])).unwrap();
    assert_eq!(removed.removed, vec!["two".to_owned()]);
    assert!(!state.table.load().accounts.contains_key("two"));
    let text = metrics.encode();
    assert!(
        !text.contains("account=\"two\""),
        "a removed account's series are dropped"
    );
    assert!(text.contains("account=\"one\""));
    core.stop().await;
}

#[tokio::test]
async fn reloads_made_back_to_back_apply_in_order_and_the_last_one_wins() {
    use kraken_token_broker::broker::{Broker as Core, Options};

    // 18 rotations with no wait between them, as an operator's script might
    // do: the refresher must end on the last key, whatever the scheduling.
    let keys: Vec<SimKey> = (0..18).map(|_| SimKey::generate()).collect();
    let sim = start_sim(SimConfig {
        keys: keys.clone(),
        ..SimConfig::default()
    })
    .await;
    let config = |key: &SimKey| {
        common::test_config(
            &sim,
            vec![common::account("main", key)],
            policy(450.0, 60.0, 30.0, (1.0, 60.0)),
            [7; 32],
        )
    };
    let mut core = Core::start(config(&keys[0]), Options::default()).unwrap();
    let main = core.state().table.load().accounts["main"].clone();
    main.want(Duration::ZERO).await.unwrap();
    let mut last = None;
    for key in &keys[1..] {
        let (summary, mut applied) = core.reload(config(key)).unwrap();
        assert_eq!(summary.changed, vec!["main".to_owned()]);
        last = applied.pop();
    }
    last.expect("a change for main").wait().await;
    let current = main.published().token.clone().unwrap();
    main.invalidate(current.sha256, "test").await.unwrap();
    let calls = sim.state().token_calls();
    let final_key = keys.last().unwrap().api_key.as_str();
    assert_eq!(calls.last().unwrap().api_key.as_deref(), Some(final_key));
    core.stop().await;
}
