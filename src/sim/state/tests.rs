//! The simulator's decisions, one rule per test.

use serde_json::{Value, json};

use super::*;
use crate::clock::unix_secs;
use crate::kraken::{WS_TOKEN_PATH, decode_secret, sign};
use crate::secret::fingerprint;

mod key_info;

fn key() -> SimKey {
    SimKey::generate()
}

fn state(keys: Vec<SimKey>) -> SimState {
    SimState::new(SimConfig {
        keys,
        ..SimConfig::default()
    })
    .unwrap()
}

/// A correctly signed form call with `nonce` and maybe `otp`.
fn call(state: &SimState, key: &SimKey, nonce: u64, otp: Option<&str>) -> Decision {
    let mut body = format!("nonce={nonce}");
    if let Some(otp) = otp {
        body.push_str(&format!("&otp={otp}"));
    }
    signed_call(
        state,
        key,
        &nonce.to_string(),
        &body,
        "application/x-www-form-urlencoded",
    )
}

fn signed_call(state: &SimState, key: &SimKey, nonce: &str, body: &str, content_type: &str) -> Decision {
    signed_call_from(state, key, nonce, body, content_type, None)
}

fn call_from(state: &SimState, key: &SimKey, nonce: u64, peer: &str) -> Decision {
    let body = format!("nonce={nonce}");
    let peer = Some(peer.parse().unwrap());
    signed_call_from(
        state,
        key,
        &nonce.to_string(),
        &body,
        "application/x-www-form-urlencoded",
        peer,
    )
}

fn signed_call_from(
    state: &SimState,
    key: &SimKey,
    nonce: &str,
    body: &str,
    content_type: &str,
    peer: Option<std::net::IpAddr>,
) -> Decision {
    let secret = decode_secret(&key.api_secret).unwrap();
    let sig = sign(&secret, WS_TOKEN_PATH, nonce, body.as_bytes());
    state.private_call(&PrivateCall {
        peer,
        http_method: "POST",
        path: WS_TOKEN_PATH,
        api_key: Some(&key.api_key),
        api_sign: Some(&sig),
        content_type: Some(content_type),
        body: body.as_bytes(),
    })
}

fn error_of(decision: &Decision) -> Option<String> {
    match &decision.reply {
        Reply::Json(v) => v["error"].get(0).and_then(Value::as_str).map(str::to_owned),
        other => panic!("expected JSON, got {other:?}"),
    }
}

fn token_of(decision: &Decision) -> String {
    match &decision.reply {
        Reply::Json(v) => v["result"]["token"].as_str().expect("a token").to_owned(),
        other => panic!("expected JSON, got {other:?}"),
    }
}

#[test]
fn a_signed_call_gets_a_token_with_the_configured_lifetime() {
    let k = key();
    let s = state(vec![k.clone()]);
    s.set_token_ttl(Duration::from_secs(42));
    let d = call(&s, &k, 1, None);
    let Reply::Json(v) = &d.reply else { panic!() };
    assert_eq!(v["error"], json!([]));
    assert_eq!(v["result"]["expires"], 42);
    let token = token_of(&d);
    assert!(s.token_is_valid(&token));
    assert!(!s.token_is_valid("other"));
    let calls = s.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].outcome, "ok");
    assert_eq!(
        calls[0].token_fingerprint.as_deref(),
        Some(fingerprint(token.as_bytes()).as_str())
    );
}

#[test]
fn json_bodies_with_numeric_or_string_nonces_are_accepted() {
    let k = key();
    let s = state(vec![k.clone()]);
    let d = signed_call(&s, &k, "5", r#"{"nonce":5}"#, "application/json");
    assert_eq!(error_of(&d), None);
    let d = signed_call(&s, &k, "6", r#"{"nonce": "6"}"#, "application/json");
    assert_eq!(error_of(&d), None);
}

#[test]
fn nonces_must_strictly_increase_per_key() {
    let (a, b) = (key(), key());
    let s = state(vec![a.clone(), b.clone()]);
    assert_eq!(error_of(&call(&s, &a, 100, None)), None);
    assert_eq!(
        error_of(&call(&s, &a, 100, None)).as_deref(),
        Some("EAPI:Invalid nonce")
    );
    assert_eq!(error_of(&call(&s, &a, 99, None)).as_deref(), Some("EAPI:Invalid nonce"));
    assert_eq!(error_of(&call(&s, &b, 50, None)), None, "each key has its own sequence");
    assert_eq!(error_of(&call(&s, &a, 101, None)), None);
}

#[test]
fn wrong_method_path_key_or_signature_get_krakens_errors() {
    let k = key();
    let s = state(vec![k.clone()]);
    let base = PrivateCall {
        peer: None,
        http_method: "GET",
        path: WS_TOKEN_PATH,
        api_key: Some(&k.api_key),
        api_sign: Some("AAAA"),
        content_type: None,
        body: b"nonce=1",
    };
    assert_eq!(
        error_of(&s.private_call(&base)).as_deref(),
        Some("EGeneral:Invalid arguments")
    );
    let other = PrivateCall {
        http_method: "POST",
        path: "/0/private/AddOrder",
        ..base
    };
    assert_eq!(
        error_of(&s.private_call(&other)).as_deref(),
        Some("EGeneral:Unknown method")
    );
    let unknown = PrivateCall {
        http_method: "POST",
        api_key: Some("nobody"),
        ..other
    };
    let unknown = PrivateCall {
        path: WS_TOKEN_PATH,
        ..unknown
    };
    assert_eq!(error_of(&s.private_call(&unknown)).as_deref(), Some("EAPI:Invalid key"));
    let bad_sig = PrivateCall {
        api_key: Some(&k.api_key),
        ..unknown
    };
    assert_eq!(
        error_of(&s.private_call(&bad_sig)).as_deref(),
        Some("EAPI:Invalid signature")
    );
    let no_nonce = PrivateCall {
        body: b"x=1",
        ..bad_sig
    };
    assert_eq!(
        error_of(&s.private_call(&no_nonce)).as_deref(),
        Some("EAPI:Invalid nonce")
    );
}

#[test]
fn a_2fa_key_needs_the_right_otp_in_the_signed_body() {
    let mut k = key();
    k.otp = Some(SimOtp::Password("letmein".into()));
    let s = state(vec![k.clone()]);
    assert_eq!(
        error_of(&call(&s, &k, 1, None)).as_deref(),
        Some("EAPI:Invalid signature")
    );
    assert_eq!(
        error_of(&call(&s, &k, 2, Some("wrong"))).as_deref(),
        Some("EAPI:Invalid signature")
    );
    assert_eq!(error_of(&call(&s, &k, 3, Some("letmein"))), None);

    let mut t = key();
    t.otp = Some(SimOtp::TotpSecret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".into()));
    let s = state(vec![t.clone()]);
    let seed = Otp::totp_from_base32(&SecretString::new("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")).unwrap();
    let now = unix_secs(SystemTime::now());
    let code = seed.code_at(now);
    assert_eq!(error_of(&call(&s, &t, 1, Some(code.expose()))), None);
    let wrong = if code.expose() == "000000" { "111111" } else { "000000" };
    assert_eq!(
        error_of(&call(&s, &t, 2, Some(wrong))).as_deref(),
        Some("EAPI:Invalid signature")
    );
}

#[test]
fn a_key_without_websocket_permission_is_denied() {
    let mut k = key();
    k.ws_permission = false;
    let s = state(vec![k.clone()]);
    assert_eq!(
        error_of(&call(&s, &k, 1, None)).as_deref(),
        Some("EGeneral:Permission denied")
    );
}

#[test]
fn the_call_counter_limits_each_tier() {
    for (tier, max) in [(Tier::Starter, 15), (Tier::Intermediate, 20), (Tier::Pro, 20)] {
        let k = key();
        let s = SimState::new(SimConfig {
            keys: vec![k.clone()],
            tier,
            ..SimConfig::default()
        })
        .unwrap();
        for n in 1..=max {
            assert_eq!(error_of(&call(&s, &k, n, None)), None, "{tier:?} call {n}");
        }
        assert_eq!(
            error_of(&call(&s, &k, max + 1, None)).as_deref(),
            Some("EAPI:Rate limit exceeded"),
            "{tier:?}"
        );
        s.reset_limits();
        assert_eq!(error_of(&call(&s, &k, max + 2, None)), None, "{tier:?} after reset");
    }
}

#[test]
fn repeated_invalid_calls_lock_the_key_out() {
    let k = key();
    let s = SimState::new(SimConfig {
        keys: vec![k.clone()],
        lockout_threshold: 3,
        ..SimConfig::default()
    })
    .unwrap();
    assert_eq!(error_of(&call(&s, &k, 10, None)), None);
    for _ in 0..3 {
        assert_eq!(error_of(&call(&s, &k, 5, None)).as_deref(), Some("EAPI:Invalid nonce"));
    }
    assert_eq!(
        error_of(&call(&s, &k, 11, None)).as_deref(),
        Some("EGeneral:Temporary lockout")
    );
    s.reset_limits();
    assert_eq!(error_of(&call(&s, &k, 12, None)), None);
}

#[test]
fn a_counted_fault_applies_to_that_many_calls_then_clears() {
    let k = key();
    let s = state(vec![k.clone()]);
    s.set_fault(FaultSpec {
        error: Some("EService:Unavailable".into()),
        count: Some(2),
        ..FaultSpec::default()
    });
    assert_eq!(
        error_of(&call(&s, &k, 1, None)).as_deref(),
        Some("EService:Unavailable")
    );
    assert_eq!(s.fault().unwrap().count, Some(1));
    assert_eq!(
        error_of(&call(&s, &k, 2, None)).as_deref(),
        Some("EService:Unavailable")
    );
    assert_eq!(s.fault(), None);
    assert_eq!(error_of(&call(&s, &k, 3, None)), None);
}

#[test]
fn faults_shape_the_answer() {
    let k = key();
    let s = state(vec![k.clone()]);
    s.set_fault(FaultSpec {
        http_status: Some(502),
        delay_ms: Some(5),
        ..FaultSpec::default()
    });
    let d = call(&s, &k, 1, None);
    assert_eq!(d.delay, Duration::from_millis(5));
    assert!(matches!(&d.reply, Reply::Html(502, html, None) if html.contains("502 Bad Gateway")));

    s.set_fault(FaultSpec {
        hang: true,
        ..FaultSpec::default()
    });
    assert_eq!(call(&s, &k, 2, None).reply, Reply::Hang);

    s.set_fault(FaultSpec {
        truncated: true,
        ..FaultSpec::default()
    });
    let Reply::Raw(bytes) = call(&s, &k, 3, None).reply else {
        panic!("raw")
    };
    assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "cut short");

    s.set_fault(FaultSpec {
        malformed: true,
        ..FaultSpec::default()
    });
    assert!(matches!(call(&s, &k, 4, None).reply, Reply::Raw(_)));

    s.set_fault(FaultSpec {
        token: Some("same-token".into()),
        expires: Some(json!(-5)),
        ..FaultSpec::default()
    });
    let Reply::Json(v) = call(&s, &k, 5, None).reply else {
        panic!("json")
    };
    assert_eq!(v["result"]["token"], "same-token");
    assert_eq!(v["result"]["expires"], -5);

    s.set_fault(FaultSpec {
        expires: Some(json!("omit")),
        ..FaultSpec::default()
    });
    let Reply::Json(v) = call(&s, &k, 6, None).reply else {
        panic!("json")
    };
    assert!(v["result"].get("expires").is_none());
}

#[test]
fn revoked_and_expired_tokens_are_not_valid() {
    let k = key();
    let s = state(vec![k.clone()]);
    let a = token_of(&call(&s, &k, 1, None));
    let b = token_of(&call(&s, &k, 2, None));
    assert_eq!(s.revoke_tokens(Some(&a)), 1);
    assert!(!s.token_is_valid(&a));
    assert!(s.token_is_valid(&b));
    assert_eq!(s.revoke_tokens(None), 1);
    assert!(!s.token_is_valid(&b));
    s.set_token_ttl(Duration::from_millis(1));
    let c = token_of(&call(&s, &k, 3, None));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.token_is_valid(&c) {
        assert!(Instant::now() < deadline, "a 1 ms token expires");
        std::thread::yield_now();
    }
}

#[test]
fn bad_keys_are_refused() {
    let s = state(vec![]);
    let mut k = key();
    k.api_secret = "***".into();
    assert!(matches!(s.add_key(k), Err(KeyError::BadSecret)));
    let mut k = key();
    k.api_key = "has space".into();
    assert!(matches!(s.add_key(k), Err(KeyError::BadKey)));
    let mut k = key();
    k.otp = Some(SimOtp::TotpSecret("!!".into()));
    assert!(matches!(s.add_key(k), Err(KeyError::BadTotp)));
}

#[test]
fn lockouts_are_per_address_and_stop_every_key_called_from_it() {
    let (bad, good) = (key(), key());
    let locking = || {
        SimState::new(SimConfig {
            keys: vec![good.clone()],
            lockout_threshold: 3,
            ..SimConfig::default()
        })
        .unwrap()
    };
    let s = locking();
    // A key the simulator does not know, three times from 10.0.0.1.
    for n in 1..=3 {
        assert_eq!(
            error_of(&call_from(&s, &bad, n, "10.0.0.1")).as_deref(),
            Some("EAPI:Invalid key")
        );
    }
    assert_eq!(
        error_of(&call_from(&s, &good, 10, "10.0.0.1")).as_deref(),
        Some("EGeneral:Temporary lockout"),
        "the good key is locked out too, from that address"
    );
    assert_eq!(
        error_of(&call_from(&s, &good, 11, "10.0.0.2")),
        None,
        "another address is not"
    );
    // Successes do not wipe the count: failures within the window add up.
    let s = locking();
    for n in 1..=2 {
        call_from(&s, &bad, n, "10.0.0.1");
        assert_eq!(error_of(&call_from(&s, &good, 100 + n, "10.0.0.1")), None);
    }
    call_from(&s, &bad, 3, "10.0.0.1");
    assert_eq!(
        error_of(&call_from(&s, &good, 200, "10.0.0.1")).as_deref(),
        Some("EGeneral:Temporary lockout")
    );
}

#[test]
fn a_nonce_window_accepts_a_late_nonce_once_in_nonce_units() {
    let mut k = key();
    k.nonce_window = 10_000;
    let s = state(vec![k.clone()]);
    assert_eq!(error_of(&call(&s, &k, 1_000_000, None)), None);
    assert_eq!(
        error_of(&call(&s, &k, 995_000, None)),
        None,
        "5000 below: inside the window"
    );
    assert_eq!(
        error_of(&call(&s, &k, 995_000, None)).as_deref(),
        Some("EAPI:Invalid nonce"),
        "but only once"
    );
    assert_eq!(
        error_of(&call(&s, &k, 989_999, None)).as_deref(),
        Some("EAPI:Invalid nonce"),
        "10001 below: outside"
    );
    let strict = key();
    let s = state(vec![strict.clone()]);
    assert_eq!(error_of(&call(&s, &strict, 1_000_000, None)), None);
    assert_eq!(
        error_of(&call(&s, &strict, 999_999, None)).as_deref(),
        Some("EAPI:Invalid nonce")
    );
}

#[test]
fn an_expired_key_is_an_invalid_key_and_an_address_off_the_allowlist_is_denied() {
    let mut old = key();
    old.valid_until = Some("2020-01-01T00:00:00Z".into());
    let mut fenced = key();
    fenced.ip_allowlist = vec!["10.1.0.0/16".into(), "192.168.7.7".into()];
    let s = state(vec![old.clone(), fenced.clone()]);
    assert_eq!(error_of(&call(&s, &old, 1, None)).as_deref(), Some("EAPI:Invalid key"));
    assert_eq!(error_of(&call_from(&s, &fenced, 1, "10.1.2.3")), None);
    assert_eq!(error_of(&call_from(&s, &fenced, 2, "192.168.7.7")), None);
    assert_eq!(
        error_of(&call_from(&s, &fenced, 3, "10.2.0.1")).as_deref(),
        Some("EGeneral:Permission denied")
    );
    let mut bad = key();
    bad.ip_allowlist = vec!["not-an-ip".into()];
    assert!(matches!(s.add_key(bad), Err(KeyError::BadAllowlist(_))));
    let mut bad = key();
    bad.valid_until = Some("tomorrow".into());
    assert!(matches!(s.add_key(bad), Err(KeyError::BadValidUntil)));
}

#[test]
fn a_totp_code_is_accepted_once() {
    let mut t = key();
    t.otp = Some(SimOtp::TotpSecret("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ".into()));
    let s = state(vec![t.clone()]);
    let seed = Otp::totp_from_base32(&SecretString::new("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")).unwrap();
    let now = unix_secs(SystemTime::now());
    let code = seed.code_at(now);
    assert_eq!(error_of(&call(&s, &t, 1, Some(code.expose()))), None);
    assert_eq!(
        error_of(&call(&s, &t, 2, Some(code.expose()))).as_deref(),
        Some("EAPI:Invalid signature"),
        "the same code again is refused"
    );
    let next = seed.code_at(now + 30);
    assert_eq!(
        error_of(&call(&s, &t, 3, Some(next.expose()))),
        None,
        "the next one is taken"
    );
}

#[test]
fn maintenance_answers_service_unavailable() {
    let k = key();
    let s = state(vec![k.clone()]);
    s.set_system_status(SystemStatus::Maintenance);
    assert_eq!(
        error_of(&call(&s, &k, 1, None)).as_deref(),
        Some("EService:Unavailable")
    );
    s.set_system_status(SystemStatus::CancelOnly);
    assert_eq!(error_of(&call(&s, &k, 2, None)), None, "tokens are still issued");
}

#[test]
fn the_public_view_of_a_key_holds_no_secret() {
    let mut k = key();
    k.otp = Some(SimOtp::Password("pw-123".into()));
    let view = k.public_view().to_string();
    assert!(!view.contains(&k.api_secret) && !view.contains("pw-123"), "{view}");
    assert!(view.contains(&k.api_key));
}
