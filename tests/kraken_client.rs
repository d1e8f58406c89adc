//! The real Kraken client against the simulator on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{sim_with_key, start_sim};
use kraken_token_broker::clock::WallClock;
use kraken_token_broker::kraken::{
    ApiCredentials, Class, KeyLane, KrakenClient, KrakenError, Otp, Reason, decode_secret,
};
use kraken_token_broker::secret::SecretString;
use kraken_token_broker::sim::{FaultSpec, SimConfig, SimKey, SimOtp, Tier};
use serde_json::json;

fn creds(key: &SimKey) -> ApiCredentials {
    ApiCredentials {
        api_key: SecretString::new(key.api_key.clone()),
        api_secret: decode_secret(&key.api_secret).unwrap(),
        otp: None,
    }
}

fn client(sim: &kraken_token_broker::sim::SimHandle, timeout: Duration) -> KrakenClient {
    KrakenClient::new(&sim.rest_url(), timeout).unwrap()
}

#[tokio::test]
async fn gets_a_token_that_the_simulator_issued() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let token = client(&sim, Duration::from_secs(5))
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap();
    assert_eq!(token.lifetime, Duration::from_secs(900));
    assert!(sim.state().token_is_valid(token.token.expose()));
    let calls = sim.state().calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].http_method, "POST");
    assert_eq!(calls[0].path, "/0/private/GetWebSocketsToken");
    assert_eq!(calls[0].outcome, "ok");
}

#[tokio::test]
async fn every_kraken_error_class_is_classified() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let client = client(&sim, Duration::from_secs(5));
    let lane = KeyLane::new();
    let cases = [
        ("EAPI:Invalid key", Reason::InvalidKey, Class::Permanent),
        ("EAPI:Invalid signature", Reason::InvalidSignature, Class::Permanent),
        ("EAPI:Invalid nonce", Reason::InvalidNonce, Class::Transient),
        ("EGeneral:Permission denied", Reason::PermissionDenied, Class::Permanent),
        ("EGeneral:Temporary lockout", Reason::Lockout, Class::Transient),
        ("EAPI:Rate limit exceeded", Reason::RateLimited, Class::Transient),
        ("EService:Throttled: 1900000000", Reason::RateLimited, Class::Transient),
        ("EService:Unavailable", Reason::Unavailable, Class::Transient),
        ("EService:Busy", Reason::Unavailable, Class::Transient),
        ("EGeneral:Internal error", Reason::Unavailable, Class::Transient),
        ("EGeneral:Invalid arguments:nonce", Reason::Other, Class::Permanent),
        ("EAuth:Account temporary disabled", Reason::Other, Class::Permanent),
        ("ESomething:New", Reason::Other, Class::Transient),
    ];
    for (code, reason, class) in cases {
        sim.state().set_fault(FaultSpec {
            error: Some(code.into()),
            count: Some(1),
            ..FaultSpec::default()
        });
        let error = client.get_websockets_token(&creds(&key), &lane).await.unwrap_err();
        assert_eq!(error.reason(), reason, "{code}");
        assert_eq!(error.class(), class, "{code}");
        assert!(matches!(error, KrakenError::Api(_)), "{code}");
    }
    assert!(client.get_websockets_token(&creds(&key), &lane).await.is_ok());
}

#[tokio::test]
async fn real_rejections_from_the_simulator_are_classified() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let client = client(&sim, Duration::from_secs(5));
    let mut unknown = creds(&key);
    unknown.api_key = SecretString::new("not-a-key");
    let e = client
        .get_websockets_token(&unknown, &KeyLane::new())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidKey);

    let mut wrong = creds(&key);
    wrong.api_secret = decode_secret(&SimKey::generate().api_secret).unwrap();
    let e = client.get_websockets_token(&wrong, &KeyLane::new()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidSignature);

    let mut no_permission = SimKey::generate();
    no_permission.ws_permission = false;
    sim.state().add_key(no_permission.clone()).unwrap();
    let e = client
        .get_websockets_token(&creds(&no_permission), &KeyLane::new())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::PermissionDenied);
}

#[tokio::test]
async fn a_delay_longer_than_the_timeout_is_a_timeout() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    sim.state().set_fault(FaultSpec {
        delay_ms: Some(3_000),
        count: Some(1),
        ..FaultSpec::default()
    });
    let e = client(&sim, Duration::from_millis(300))
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::Timeout, "{e}");
}

#[tokio::test]
async fn a_hang_is_a_timeout() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    sim.state().set_fault(FaultSpec {
        hang: true,
        ..FaultSpec::default()
    });
    let e = client(&sim, Duration::from_millis(300))
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::Timeout, "{e}");
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_short_delay_within_the_timeout_succeeds() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    sim.state().set_fault(FaultSpec {
        delay_ms: Some(200),
        ..FaultSpec::default()
    });
    client(&sim, Duration::from_secs(5))
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_html_502_is_http_status() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    sim.state().set_fault(FaultSpec {
        http_status: Some(502),
        ..FaultSpec::default()
    });
    let e = client(&sim, Duration::from_secs(5))
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap_err();
    assert!(matches!(e, KrakenError::HttpStatus { status: 502, .. }), "{e:?}");
    assert_eq!(e.reason(), Reason::HttpStatus);
}

#[tokio::test]
async fn truncated_or_malformed_bodies_are_malformed_response() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let client = client(&sim, Duration::from_secs(5));
    for fault in [
        json!({"truncated": true}),
        json!({"malformed": true}),
        json!({"token": ""}),
        json!({"expires": "omit"}),
        json!({"expires": 0}),
        json!({"expires": -5}),
    ] {
        sim.state().set_fault(serde_json::from_value(fault.clone()).unwrap());
        let e = client
            .get_websockets_token(&creds(&key), &KeyLane::new())
            .await
            .unwrap_err();
        assert_eq!(e.reason(), Reason::MalformedResponse, "{fault}");
    }
}

#[tokio::test]
async fn a_closed_port_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = KrakenClient::new(&format!("http://{addr}"), Duration::from_secs(2)).unwrap();
    let key = SimKey::generate();
    let e = client
        .get_websockets_token(&creds(&key), &KeyLane::new())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::Transport, "{e}");
    assert!(!e.to_string().contains(&key.api_key), "no key in the error text");
}

#[tokio::test]
async fn static_otp_and_totp_are_accepted_and_a_wrong_otp_is_invalid_signature() {
    const SEED: &str = "JBSWY3DPEHPK3PXP";
    let mut with_password = SimKey::generate();
    with_password.otp = Some(SimOtp::Password("correct horse".into()));
    let mut with_totp = SimKey::generate();
    with_totp.otp = Some(SimOtp::TotpSecret(SEED.into()));
    let sim = start_sim(SimConfig {
        keys: vec![with_password.clone(), with_totp.clone()],
        ..SimConfig::default()
    })
    .await;
    let client = client(&sim, Duration::from_secs(5));

    let mut c = creds(&with_password);
    c.otp = Some(Otp::static_password(SecretString::new("correct horse")).unwrap());
    client.get_websockets_token(&c, &KeyLane::new()).await.unwrap();
    c.otp = Some(Otp::static_password(SecretString::new("wrong horse")).unwrap());
    let e = client.get_websockets_token(&c, &KeyLane::new()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidSignature);
    c.otp = None;
    let e = client.get_websockets_token(&c, &KeyLane::new()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidSignature);

    let mut t = creds(&with_totp);
    t.otp = Some(Otp::totp_from_base32(&SecretString::new(SEED)).unwrap());
    // The lane's clock is stepped 30 s between the calls: a TOTP code is
    // never sent twice (the simulator refuses a reused one), so without the
    // step the second call would wait for the next code.
    let clock = WallClock::system();
    let lane = KeyLane::with_clock(clock.clone());
    client.get_websockets_token(&t, &lane).await.unwrap();
    assert!(
        lane.totp_wait(t.otp.as_ref()) > Duration::ZERO,
        "the current code is spent: the next call waits for a new one"
    );
    clock.step(30_000_000_000);
    assert_eq!(lane.totp_wait(t.otp.as_ref()), Duration::ZERO);
    client.get_websockets_token(&t, &lane).await.unwrap();
    t.otp = Some(Otp::totp_from_base32(&SecretString::new("GEZDGNBVGY3TQOJQ")).unwrap());
    let e = client.get_websockets_token(&t, &KeyLane::new()).await.unwrap_err();
    assert_eq!(e.reason(), Reason::InvalidSignature);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_racing_one_key_never_send_a_rejected_nonce() {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        tier: Tier::Pro,
        ..SimConfig::default()
    })
    .await;
    let lane = Arc::new(KeyLane::new());
    let clients = [
        client(&sim, Duration::from_secs(5)),
        client(&sim, Duration::from_secs(5)),
    ];
    // 2 clients x 9 calls = 18, under the Pro tier's counter of 20.
    let mut tasks = Vec::new();
    for c in clients {
        for _ in 0..9 {
            let (c, lane, creds) = (c.clone(), Arc::clone(&lane), creds(&key));
            tasks.push(tokio::spawn(async move { c.get_websockets_token(&creds, &lane).await }));
        }
    }
    for task in tasks {
        task.await.unwrap().expect("no call rejected");
    }
    let calls = sim.state().calls();
    assert_eq!(calls.len(), 18);
    assert!(calls.iter().all(|c| c.outcome == "ok"), "{calls:?}");
    let nonces: Vec<u64> = calls
        .iter()
        .map(|c| c.nonce.as_ref().unwrap().parse().unwrap())
        .collect();
    assert!(
        nonces.windows(2).all(|w| w[0] < w[1]),
        "nonces arrive in order: {nonces:?}"
    );
}
