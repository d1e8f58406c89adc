//! Knowing the key (`GetApiKeyInfo`) against the simulator: least privilege
//! (a key without the WebSocket permission, or holding a forbidden one, is
//! refused before any `GetWebSocketsToken` call), expiry from Kraken, and
//! another signer using the key.

mod common;

use std::time::Duration;

use kraken_token_broker::kraken::client::ws_token_body;
use kraken_token_broker::kraken::sign;
use kraken_token_broker::sim::{SimConfig, SimHandle, SimKey};
use serde_json::Value;

use common::{Broker, account, policy, start_sim, wait_for};

const WS_TOKEN: &str = "/0/private/GetWebSocketsToken";
const KEY_INFO: &str = "/0/private/GetApiKeyInfo";

fn key_with(permissions: &[&str]) -> SimKey {
    SimKey {
        permissions: Some(permissions.iter().map(|p| (*p).to_owned()).collect()),
        ..SimKey::generate()
    }
}

/// What a trading key holds, plus `extra`.
fn trading_key(extra: &[&str]) -> SimKey {
    let mut held = vec![
        "query-funds",
        "query-open-trades",
        "query-closed-trades",
        "modify-trades",
        "close-trades",
        "create-ws-token",
    ];
    held.extend(extra);
    key_with(&held)
}

async fn sim_for(key: &SimKey) -> SimHandle {
    start_sim(SimConfig {
        keys: vec![key.clone()],
        token_ttl: Duration::from_secs(900),
        ..SimConfig::default()
    })
    .await
}

/// The simulator's calls to `path`, and how many ended in `outcome`.
fn calls(sim: &SimHandle, path: &str, outcome: Option<&str>) -> usize {
    sim.state()
        .calls()
        .iter()
        .filter(|c| c.path == path && outcome.is_none_or(|o| c.outcome == o))
        .count()
}

async fn readyz_main(broker: &Broker) -> Value {
    let (_, body) = broker.admin_get("/readyz").await;
    let json: Value = serde_json::from_str(&body).unwrap();
    json["accounts"]["main"].clone()
}

async fn wait_state(broker: &Broker, state: &str) -> Value {
    wait_for(&format!("account main {state}"), Duration::from_secs(15), || async {
        let main = readyz_main(broker).await;
        (main["state"] == state).then_some(main)
    })
    .await
}

/// Signs `GetApiKeyInfo` with `nonce`, as another holder of the key would.
async fn call_as_another_signer(sim: &SimHandle, key: &SimKey, nonce: u64) -> Value {
    let body = ws_token_body(nonce, None);
    let secret = kraken_token_broker::kraken::decode_secret(&key.api_secret).unwrap();
    let signature = sign(&secret, KEY_INFO, &nonce.to_string(), body.expose().as_bytes());
    reqwest::Client::new()
        .post(format!("{}{KEY_INFO}", sim.rest_url()))
        .header("API-Key", &key.api_key)
        .header("API-Sign", signature)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.expose().to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The default policy, a rejected key retried every second.
fn retried_every_second() -> kraken_token_broker::token::RefreshPolicy {
    kraken_token_broker::token::RefreshPolicy {
        retry_rejected: Duration::from_secs(1),
        ..Default::default()
    }
}

fn now_nanos() -> u64 {
    kraken_token_broker::clock::WallClock::system().unix_nanos()
}

#[tokio::test]
async fn a_key_that_can_withdraw_is_refused_before_any_token_call_and_served_once_fixed() {
    let key = trading_key(&["withdraw-funds"]);
    let sim = sim_for(&key).await;
    let broker = Broker::on(&sim).key(&key).policy(retried_every_second()).start().await;

    let main = wait_state(&broker, "rejected").await;
    let reason = main["reason"].as_str().unwrap();
    assert!(
        reason.contains("key_too_powerful") && reason.contains("withdraw-funds"),
        "{reason}"
    );
    assert!(reason.contains("fix:"), "the cure is named: {reason}");
    assert_eq!(main["key"]["verdict"], "too_powerful");
    assert_eq!(main["key"]["forbidden_held"], serde_json::json!(["withdraw-funds"]));
    let (status, _, body) = broker.get_token("").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("key_too_powerful"), "{body}");
    assert_eq!(
        calls(&sim, WS_TOKEN, None),
        0,
        "no token call with a key that can withdraw"
    );
    assert!(calls(&sim, KEY_INFO, Some("ok")) >= 1);

    let text = broker.metrics.encode();
    for (permission, held) in [("withdraw-funds", 1), ("create-ws-token", 1), ("add-funds", 0)] {
        let series = format!("api_key_permission{{account=\"main\",permission=\"{permission}\"}}");
        assert_eq!(common::metric_value(&text, &series), f64::from(held), "{series}");
    }
    assert!(
        broker.metric("refresh_failures_total{account=\"main\",reason=\"key_too_powerful\"}") >= 1.0,
        "{text}"
    );
    assert!(
        broker.metric("last_refresh_failure_timestamp_seconds{account=\"main\",reason=\"key_too_powerful\"}") > 0.0
    );
    let (_, readyz) = broker.admin_get("/readyz").await;
    assert_eq!(
        serde_json::from_str::<Value>(&readyz).unwrap()["kraken"]["rejected_calls_last_15m"],
        0,
        "a refusal decided here spends none of Kraken's budget"
    );

    // The withdraw permission is removed at Kraken: the next retry asks
    // again and the key is used.
    sim.state().add_key(trading_key(&[]).with_key_of(&key)).unwrap();
    wait_state(&broker, "serving").await;
    let (status, _, body) = broker.get_token("").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&sim, WS_TOKEN, Some("ok")), 1);
    assert_eq!(readyz_main(&broker).await["key"]["verdict"], "usable");
    broker.stop().await.unwrap();
}

/// The same key (and secret) with other settings.
trait SameKey {
    fn with_key_of(self, other: &SimKey) -> SimKey;
}

impl SameKey for SimKey {
    fn with_key_of(self, other: &SimKey) -> SimKey {
        SimKey {
            api_key: other.api_key.clone(),
            api_secret: other.api_secret.clone(),
            ..self
        }
    }
}

#[tokio::test]
async fn a_key_without_the_websocket_permission_is_refused_with_zero_token_calls() {
    let key = SimKey {
        ws_permission: false,
        ..SimKey::generate()
    };
    let sim = sim_for(&key).await;
    let broker = Broker::on(&sim).key(&key).start().await;
    let main = wait_state(&broker, "rejected").await;
    let reason = main["reason"].as_str().unwrap();
    assert!(
        reason.contains("permission_denied") && reason.contains("create-ws-token"),
        "{reason}"
    );
    assert_eq!(main["key"]["verdict"], "missing_ws_permission");
    assert_eq!(calls(&sim, WS_TOKEN, None), 0);
    assert!(
        !main["key"]["permissions"]
            .as_array()
            .unwrap()
            .contains(&"create-ws-token".into())
    );
    assert_eq!(
        common::metric_value(
            &broker.metrics.encode(),
            "api_key_permission{account=\"main\",permission=\"create-ws-token\"}"
        ),
        0.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn forbid_permissions_empty_opts_out() {
    let key = trading_key(&["withdraw-funds", "add-funds"]);
    let sim = sim_for(&key).await;
    let mut main = account("main", &key);
    main.forbid_permissions = Vec::new();
    let broker = Broker::on(&sim).account(main).start().await;
    let (status, _, body) = broker.get_token("").await;
    assert_eq!(status, 200, "{body}");
    let main = wait_for("the key's verdict", Duration::from_secs(10), || async {
        let main = readyz_main(&broker).await;
        (main["key"]["verdict"] == "usable").then_some(main)
    })
    .await;
    assert!(
        main["key"]["permissions"]
            .as_array()
            .unwrap()
            .contains(&"withdraw-funds".into())
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn the_keys_expiry_comes_from_kraken_over_the_configured_one() {
    let in_ten_days = std::time::SystemTime::now() + Duration::from_secs(10 * 86_400);
    let secs = kraken_token_broker::clock::unix_secs(in_ten_days);
    let key = SimKey {
        valid_until: Some(humantime::format_rfc3339_seconds(in_ten_days).to_string()),
        ..SimKey::generate()
    };
    let sim = sim_for(&key).await;
    let mut main = account("main", &key);
    // What an operator typed by hand, a month off.
    main.key_expires_at = Some(in_ten_days + Duration::from_secs(30 * 86_400));
    let broker = Broker::on(&sim).account(main).start().await;
    let series = "api_key_expiry_timestamp_seconds{account=\"main\"}";
    wait_for("Kraken's validUntil exported", Duration::from_secs(10), || async {
        let text = broker.metrics.encode();
        (text.contains(series) && common::metric_value(&text, series) == secs as f64).then_some(())
    })
    .await;
    let main = readyz_main(&broker).await;
    assert_eq!(
        main["key"]["valid_until"],
        humantime::format_rfc3339_seconds(in_ten_days).to_string()
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_foreign_nonce_far_ahead_is_use_elsewhere_after_at_most_two_rejected_calls() {
    let key = SimKey::generate();
    let sim = sim_for(&key).await;
    // Another holder of the key signs with a nonce a day ahead of this
    // broker's nanosecond clock.
    let ahead = now_nanos() + 86_400 * 1_000_000_000;
    let answer = call_as_another_signer(&sim, &key, ahead).await;
    assert_eq!(answer["error"], serde_json::json!([]), "{answer}");
    let broker = Broker::on(&sim).key(&key).policy(retried_every_second()).start().await;
    let main = wait_state(&broker, "rejected").await;
    let reason = main["reason"].as_str().unwrap();
    assert!(
        reason.contains("invalid_nonce") && reason.contains("another signer"),
        "{reason}"
    );
    assert_eq!(broker.metric("api_key_foreign_use_total{account=\"main\"}"), 1.0);
    assert_eq!(main["key"]["foreign_uses"], 1);
    // Retried every second, but the budget holds every retry: two calls
    // (GetApiKeyInfo and the token call re-signed after it) and no more. Watched for 3 s,
    // three retry periods.
    let refused =
        || calls(&sim, KEY_INFO, Some("EAPI:Invalid nonce")) + calls(&sim, WS_TOKEN, Some("EAPI:Invalid nonce"));
    assert_eq!(refused(), 2);
    let watched = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < watched {
        assert_eq!(refused(), 2, "never past two rejected calls");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At start the token call waiting for GetApiKeyInfo is its re-signed
    // retry: one of each.
    assert_eq!(calls(&sim, WS_TOKEN, None), 1, "{:#?}", sim.state().calls());
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn another_signer_ahead_within_the_nonce_window_is_seen_within_one_interval() {
    // A nonce window lets the broker's calls through below the other
    // signer's nonce; GetApiKeyInfo then reports that nonce.
    let key = SimKey {
        nonce_window: 10_000 * 1_000_000_000,
        ..SimKey::generate()
    };
    let sim = sim_for(&key).await;
    let interval = Duration::from_secs(1);
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(1.5, 1.0, 0.2, (0.2, 1.0)))
        .key_info_interval(interval)
        .start()
        .await;
    let (status, _, first) = broker.get_token("").await;
    assert_eq!(status, 200);
    wait_for("the first GetApiKeyInfo", Duration::from_secs(10), || async {
        (readyz_main(&broker).await["key"]["verdict"] == "usable").then_some(())
    })
    .await;
    assert_eq!(broker.metric("api_key_foreign_use_total{account=\"main\"}"), 0.0);

    let answer = call_as_another_signer(&sim, &key, now_nanos() + 1_000 * 1_000_000_000).await;
    assert_eq!(answer["error"], serde_json::json!([]), "{answer}");
    let since = tokio::time::Instant::now();
    wait_for("foreign use counted", interval * 3, || async {
        (broker.metric("api_key_foreign_use_total{account=\"main\"}") == 1.0).then_some(())
    })
    .await;
    eprintln!("foreign use seen after {:?}", since.elapsed());
    // The same foreign nonce reported again is the same use: three more
    // intervals, still one.
    let main = wait_for("three more inspections", Duration::from_secs(10), || async {
        let main = readyz_main(&broker).await;
        let checked = main["key"]["checked_at"].as_str().map(str::to_owned);
        (calls(&sim, KEY_INFO, Some("ok")) >= 5).then_some((main, checked))
    })
    .await
    .0;
    assert_eq!(broker.metric("api_key_foreign_use_total{account=\"main\"}"), 1.0);
    assert_eq!(main["key"]["foreign_uses"], 1);
    // Tokens keep coming: the window takes the broker's nonces.
    let (status, _, token) = broker.get_token("").await;
    assert_eq!(status, 200);
    assert_eq!(main["state"], "serving");
    let _ = (first, token);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_rotation_of_five_keys_stops_at_the_budget() {
    // Five accounts whose keys Kraken does not know, starting at once: the
    // first calls of unproven keys count against the budget while under
    // way, so at most three reach Kraken.
    let known = SimKey::generate();
    let sim = sim_for(&known).await;
    let accounts = (0..5)
        .map(|n| account(&format!("acct{n}"), &SimKey::generate()))
        .collect();
    let broker = Broker::on(&sim).accounts(accounts).start().await;
    wait_for("every account tried or held", Duration::from_secs(15), || async {
        let (_, body) = broker.admin_get("/readyz").await;
        let json: Value = serde_json::from_str(&body).unwrap();
        let accounts = json["accounts"].as_object().unwrap();
        accounts.values().all(|a| a["state"] != "starting").then_some(())
    })
    .await;
    let rejected = calls(&sim, KEY_INFO, Some("EAPI:Invalid key")) + calls(&sim, WS_TOKEN, Some("EAPI:Invalid key"));
    assert_eq!(rejected, 3, "{:?}", sim.state().calls());
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_installed_after_a_rejected_one_is_asked_about_before_any_token_call() {
    // The runbooks' cure for a rejected key is a new one: a new key that can
    // withdraw must still be refused before any token call.
    let powerful = trading_key(&["withdraw-funds"]);
    let sim = sim_for(&powerful).await;
    let unknown = SimKey::generate();
    let broker = Broker::from_files(&sim, &unknown, "", "2s", "").await;
    let main = wait_state(&broker, "rejected").await;
    assert!(main["reason"].as_str().unwrap().contains("invalid_key"), "{main}");
    let dir = broker.dir.as_ref().unwrap().path();
    std::fs::write(dir.join("api-key"), format!("{}\n", powerful.api_key)).unwrap();
    std::fs::write(dir.join("api-secret"), format!("{}\n", powerful.api_secret)).unwrap();
    broker.reload().await;
    let main = wait_for("the new key judged", Duration::from_secs(15), || async {
        let main = readyz_main(&broker).await;
        (main["key"]["verdict"] == "too_powerful").then_some(main)
    })
    .await;
    assert_eq!(main["state"], "rejected", "{main}");
    assert_eq!(calls(&sim, WS_TOKEN, None), 0, "{:#?}", sim.state().calls());
    broker.stop().await.unwrap();
}
