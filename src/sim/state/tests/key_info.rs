//! `GetApiKeyInfo`, key permissions, lockouts extended by calls and faults
//! per method: the simulator's round-3 rules, one per test.

use serde_json::{Value, json};

use super::*;
use crate::kraken::key_info::{KEY_INFO_PATH, parse_key_info_response};

/// A correctly signed `GetApiKeyInfo` with `nonce`.
fn key_info_call(state: &SimState, key: &SimKey, nonce: u64) -> Decision {
    let body = format!("nonce={nonce}");
    let secret = decode_secret(&key.api_secret).unwrap();
    let sig = sign(&secret, KEY_INFO_PATH, &nonce.to_string(), body.as_bytes());
    state.private_call(&PrivateCall {
        peer: None,
        http_method: "POST",
        path: KEY_INFO_PATH,
        api_key: Some(&key.api_key),
        api_sign: Some(&sig),
        content_type: Some("application/x-www-form-urlencoded"),
        body: body.as_bytes(),
    })
}

fn result_of(decision: &Decision) -> Value {
    match &decision.reply {
        Reply::Json(v) => {
            assert_eq!(v["error"], json!([]), "{v}");
            v["result"].clone()
        }
        other => panic!("expected JSON, got {other:?}"),
    }
}

#[test]
fn get_api_key_info_answers_the_documented_shape_from_the_keys_settings() {
    let mut k = key();
    k.nonce_window = 5;
    k.valid_until = Some("2031-01-01T00:00:00Z".into());
    // The calls here come from no address, which stands as 0.0.0.0.
    k.ip_allowlist = vec!["10.0.0.0/24".into(), "0.0.0.0".into()];
    k.permissions = Some(vec![
        "query-funds".into(),
        "create-ws-token".into(),
        "withdraw-funds".into(),
    ]);
    let s = state(vec![k.clone()]);
    let info = result_of(&key_info_call(&s, &k, 7));
    // Every documented field, in its documented form.
    for field in [
        "apiKeyName",
        "apiKey",
        "nonce",
        "iban",
        "validUntil",
        "queryFrom",
        "queryTo",
        "createdTime",
        "modifiedTime",
        "lastUsed",
    ] {
        assert!(info[field].is_string(), "{field} is a string: {info}");
    }
    assert!(info["nonceWindow"].is_u64(), "{info}");
    assert_eq!(
        info["permissions"],
        json!(["query-funds", "create-ws-token", "withdraw-funds"])
    );
    assert_eq!(info["ipAllowlist"], json!(["10.0.0.0/24", "0.0.0.0"]));
    assert_eq!(info["validUntil"], "1924992000");
    assert_eq!(info["queryFrom"], "0");
    assert_eq!(
        info["nonce"], "7",
        "the highest accepted, this call's included (assumed)"
    );
    let now = unix_secs(SystemTime::now());
    let last_used: u64 = info["lastUsed"].as_str().unwrap().parse().unwrap();
    assert!(now.abs_diff(last_used) <= 1, "this call is the last use");
    // The broker's parser reads it back.
    let parsed = parse_key_info_response(json!({"error": [], "result": info}).to_string().as_bytes()).unwrap();
    assert_eq!(parsed.nonce_window, 5);
    assert!(parsed.has("withdraw-funds"));
    // It is checked like any private call: nonce, signature, key.
    assert_eq!(
        error_of(&key_info_call(&s, &k, 7)).as_deref(),
        Some("EAPI:Invalid nonce")
    );
    assert_eq!(
        error_of(&key_info_call(&s, &key(), 8)).as_deref(),
        Some("EAPI:Invalid key")
    );
}

#[test]
fn another_signer_moves_the_nonce_and_last_use_the_key_reports() {
    let k = key();
    let s = state(vec![k.clone()]);
    assert_eq!(result_of(&key_info_call(&s, &k, 100))["nonce"], "100");
    // Someone else's token call with the same key.
    assert_eq!(error_of(&call(&s, &k, 5_000, None)), None);
    assert_eq!(result_of(&key_info_call(&s, &k, 5_001))["nonce"], "5001");
    // A nonce window lets a lower nonce through: the answer names the highest.
    let mut w = key();
    w.nonce_window = 10_000;
    let s = state(vec![w.clone()]);
    assert_eq!(error_of(&call(&s, &w, 9_000, None)), None);
    assert_eq!(result_of(&key_info_call(&s, &w, 100))["nonce"], "9000");
}

#[test]
fn permissions_are_kraken_names_and_decide_the_two_flags() {
    let mut k = key();
    k.permissions = Some(vec!["query-funds".into()]);
    let s = state(vec![k.clone()]);
    let stored = s.keys().into_iter().find(|x| x.api_key == k.api_key).unwrap();
    assert!(!stored.ws_permission && !stored.trade_permission);
    assert_eq!(
        error_of(&call(&s, &k, 1, None)).as_deref(),
        Some("EGeneral:Permission denied"),
        "no create-ws-token, no token"
    );
    assert!(
        result_of(&key_info_call(&s, &k, 2)).is_object(),
        "GetApiKeyInfo needs no permission"
    );
    // Without a list, a trading key's set follows from the flags.
    let mut plain = key();
    plain.ws_permission = false;
    assert_eq!(
        plain.permissions(),
        [
            "query-funds",
            "query-open-trades",
            "query-closed-trades",
            "modify-trades",
            "close-trades"
        ]
    );
    // A misspelt name is refused, not silently ignored.
    let mut typo = key();
    typo.permissions = Some(vec!["withdraw-fund".into()]);
    assert!(matches!(s.add_key(typo), Err(KeyError::BadPermission(p)) if p == "withdraw-fund"));
}

#[test]
fn every_call_during_a_lockout_extends_it() {
    let k = key();
    let s = SimState::new(SimConfig {
        keys: vec![k.clone()],
        lockout_threshold: 1,
        lockout_duration: std::time::Duration::from_millis(300),
        ..SimConfig::default()
    })
    .unwrap();
    // One call with a key Kraken does not know locks the address out.
    assert_eq!(
        error_of(&call(&s, &key(), 5, None)).as_deref(),
        Some("EAPI:Invalid key")
    );
    // Called every 100 ms, the 300 ms lockout never lifts ...
    for n in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            error_of(&call(&s, &k, 10 + n, None)).as_deref(),
            Some("EGeneral:Temporary lockout"),
            "call {n}"
        );
    }
    // ... left alone, it does.
    std::thread::sleep(std::time::Duration::from_millis(350));
    assert_eq!(error_of(&call(&s, &k, 100, None)), None);
}

#[test]
fn a_fault_applies_to_its_method_only() {
    let k = key();
    let s = state(vec![k.clone()]);
    s.set_fault(FaultSpec {
        error: Some("EService:Unavailable".into()),
        count: Some(1),
        ..FaultSpec::default()
    });
    assert!(
        result_of(&key_info_call(&s, &k, 1)).is_object(),
        "GetApiKeyInfo is not faulted by default"
    );
    assert_eq!(s.fault().unwrap().count, Some(1), "nor does it count the fault down");
    assert_eq!(
        error_of(&call(&s, &k, 2, None)).as_deref(),
        Some("EService:Unavailable")
    );
    s.set_fault(FaultSpec {
        error: Some("EService:Unavailable".into()),
        method: Some("*".into()),
        ..FaultSpec::default()
    });
    assert_eq!(
        error_of(&key_info_call(&s, &k, 3)).as_deref(),
        Some("EService:Unavailable")
    );
    assert_eq!(
        error_of(&call(&s, &k, 4, None)).as_deref(),
        Some("EService:Unavailable")
    );
}
