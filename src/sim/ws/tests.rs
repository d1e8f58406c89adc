//! The simulator's WebSocket replies, frame by frame, without a socket.

use super::*;
use crate::sim::state::{PrivateCall, Reply, SimConfig, SimKey, SystemStatus};

fn state_with_token() -> (SimState, String) {
    state_with_token_of(SimKey::generate())
}

/// A simulator holding `key`, and a token minted with it.
fn state_with_token_of(key: SimKey) -> (SimState, String) {
    let state = SimState::new(SimConfig {
        keys: vec![key.clone()],
        ..SimConfig::default()
    })
    .unwrap();
    let body = "nonce=1";
    let secret = crate::kraken::decode_secret(&key.api_secret).unwrap();
    let sig = crate::kraken::sign(&secret, crate::kraken::WS_TOKEN_PATH, "1", body.as_bytes());
    let decision = state.private_call(&PrivateCall {
        peer: None,
        http_method: "POST",
        path: crate::kraken::WS_TOKEN_PATH,
        api_key: Some(&key.api_key),
        api_sign: Some(&sig),
        content_type: Some("application/x-www-form-urlencoded"),
        body: body.as_bytes(),
    });
    let Reply::Json(v) = decision.reply else { panic!("json") };
    (state, v["result"]["token"].as_str().unwrap().to_owned())
}

#[test]
fn subscribe_with_a_valid_token_acks_then_snapshots() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let req = json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":7});
    let replies = respond(&req.to_string(), &state, &mut session);
    assert_eq!(replies[0]["success"], true);
    assert_eq!(replies[0]["method"], "subscribe");
    assert_eq!(replies[0]["req_id"], 7);
    assert_eq!(replies[0]["result"]["channel"], "executions");
    assert_eq!(replies[1]["type"], "snapshot");
    assert!(session.subscribed.contains("executions"));
}

#[test]
fn unknown_or_revoked_tokens_get_invalid_session() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let bad = json!({"method":"subscribe","params":{"channel":"balances","token":"nope"},"req_id":42});
    let replies = respond(&bad.to_string(), &state, &mut session);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["error"], "ESession:Invalid session");
    assert_eq!(replies[0]["success"], false);
    assert_eq!(replies[0]["req_id"], 42);
    assert!(replies[0]["time_in"].is_string() && replies[0]["time_out"].is_string());
    assert_eq!(state.revoke_tokens(Some(&token)), 1);
    let revoked = json!({"method":"subscribe","params":{"channel":"balances","token":token}});
    assert_eq!(
        respond(&revoked.to_string(), &state, &mut session)[0]["error"],
        "ESession:Invalid session"
    );
    assert!(session.subscribed.is_empty());
}

#[test]
fn errors_carry_status_error_as_recorded_live() {
    let (state, _) = state_with_token();
    let mut session = Session::default();
    let bad = json!({"method":"subscribe","params":{"channel":"executions","token":"nope"},"req_id":42});
    let reply = &respond(&bad.to_string(), &state, &mut session)[0];
    for field in ["error", "method", "req_id", "status", "success", "time_in", "time_out"] {
        assert!(reply.get(field).is_some(), "{field} in {reply}");
    }
    assert_eq!(reply["status"], "error");
    assert!(
        reply.get("channel").is_none(),
        "recorded errors carry no channel: {reply}"
    );
    // Other errors carry no status, as recorded.
    let unknown = json!({"method":"unsubscribe","params":{"channel":"balances"},"req_id":3});
    let reply = &respond(&unknown.to_string(), &state, &mut session)[0];
    assert_eq!(reply["error"], "Subscription Not Found");
    assert!(reply.get("status").is_none(), "{reply}");
}

#[test]
fn a_trading_request_without_a_token_is_answered_as_recorded() {
    let (state, _) = state_with_token();
    let add = json!({"method":"add_order","params":{"order_type":"market","side":"buy","order_qty":1,
        "symbol":"BTC/USD"},"req_id":0});
    let reply = &respond(&add.to_string(), &state, &mut Session::default())[0];
    assert_eq!(reply["error"], "Token(s) not found");
    assert_eq!(reply["method"], "add_order");
    assert_eq!(reply["success"], false);
    assert!(reply.get("status").is_none(), "{reply}");
}

#[test]
fn a_token_past_its_use_by_lapses_once_no_private_subscription_is_kept() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let req =
        |method: &str| json!({"method":method,"params":{"channel":"executions","token":token},"req_id":1}).to_string();
    assert_eq!(respond(&req("subscribe"), &state, &mut session)[0]["success"], true);
    state.expire_token_now(&token);
    assert_eq!(respond(&req("unsubscribe"), &state, &mut session)[0]["success"], true);
    let refused = &respond(&req("subscribe"), &state, &mut session)[0];
    assert_eq!(
        refused["error"], "ESession:Invalid session",
        "no subscription kept it bound"
    );
}

#[test]
fn a_token_binds_to_its_connection_and_serves_it_past_its_use_by() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let sub =
        |channel: &str| json!({"method":"subscribe","params":{"channel":channel,"token":token},"req_id":1}).to_string();
    assert_eq!(respond(&sub("executions"), &state, &mut session)[0]["success"], true);
    state.expire_token_now(&token);
    assert!(!state.token_is_valid(&token), "past its use-by");
    // The connection it authenticated goes on with it ...
    assert_eq!(respond(&sub("balances"), &state, &mut session)[0]["success"], true);
    // ... a new connection cannot open with it.
    let mut fresh = Session::default();
    let refused = &respond(&sub("executions"), &state, &mut fresh)[0];
    assert_eq!(refused["error"], "ESession:Invalid session");
    // A revoked token stops serving even its own connection.
    state.revoke_tokens(Some(&token));
    let refused = &respond(&sub("balances"), &state, &mut session)[0];
    assert_eq!(refused["error"], "ESession:Invalid session");
}

#[test]
fn unsubscribe_acks_name_the_channel_and_an_unknown_one_is_not_found() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let sub = json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":1});
    respond(&sub.to_string(), &state, &mut session);
    let unsub = json!({"method":"unsubscribe","params":{"channel":"executions","token":token},"req_id":2});
    let ack = &respond(&unsub.to_string(), &state, &mut session)[0];
    assert_eq!(ack["method"], "unsubscribe");
    assert_eq!(ack["result"], json!({"channel": "executions"}));
    let again = &respond(&unsub.to_string(), &state, &mut session)[0];
    assert_eq!(again["error"], "Subscription Not Found");
    assert_eq!(again["method"], "subscribe", "as recorded");
}

#[test]
fn subscribe_acks_carry_maxratecount_by_tier_and_balances_carry_wallets() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let sub = json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":1});
    let replies = respond(&sub.to_string(), &state, &mut session);
    assert_eq!(replies[0]["result"]["maxratecount"], 60, "Starter");
    let sub = json!({"method":"subscribe","params":{"channel":"balances","token":token},"req_id":2});
    let replies = respond(&sub.to_string(), &state, &mut session);
    assert!(replies[0]["result"].get("maxratecount").is_none());
    let wallets = &replies[1]["data"][0]["wallets"][0];
    assert_eq!(wallets["type"], "spot");
    assert_eq!(wallets["id"], "main");
}

#[test]
fn orders_are_acked_with_execution_updates_and_cancelled() {
    let (state, token) = state_with_token();
    let mut session = Session::default();
    let sub = json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":1});
    respond(&sub.to_string(), &state, &mut session);
    let add = json!({"method":"add_order","params":{"order_type":"limit","side":"buy","order_qty":0.01,
        "symbol":"BTC/USD","limit_price":20000.5,"cl_ord_id":"c-1","token":token},"req_id":7});
    let replies = respond(&add.to_string(), &state, &mut session);
    assert_eq!(replies[0]["method"], "add_order");
    assert_eq!(replies[0]["success"], true);
    assert_eq!(replies[0]["req_id"], 7);
    assert_eq!(replies[0]["result"]["cl_ord_id"], "c-1");
    let id = replies[0]["result"]["order_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 19, "XXXXXX-XXXXX-XXXXXX: {id}");
    assert_eq!(replies[1]["channel"], "executions");
    assert_eq!(replies[1]["data"][0]["exec_type"], "pending_new");
    assert_eq!(replies[2]["data"][0]["order_status"], "new");
    let cancel = json!({"method":"cancel_order","params":{"order_id":[id],"token":token},"req_id":8});
    let replies = respond(&cancel.to_string(), &state, &mut session);
    assert_eq!(replies[0]["result"]["order_id"], id.as_str());
    assert_eq!(replies[1]["data"][0]["exec_type"], "canceled");
    assert_eq!(replies[1]["data"][0]["reason"], "User requested");
    assert_eq!(replies[1]["data"][0]["cancel_reason"], "User requested");
    let again = respond(&cancel.to_string(), &state, &mut session);
    assert_eq!(again[0]["error"], "EOrder:Unknown order");
    // The exchange in cancel_only mode refuses new orders.
    state.set_system_status(SystemStatus::CancelOnly);
    let refused = &respond(&add.to_string(), &state, &mut session)[0];
    assert_eq!(refused["error"], "EService:Market in cancel_only mode");
}

#[test]
fn a_key_without_trading_permission_cannot_place_orders() {
    let mut key = SimKey::generate();
    key.trade_permission = false;
    let (state, token) = state_with_token_of(key);
    let token = token.as_str();
    let add = json!({"method":"add_order","params":{"order_type":"market","side":"buy","order_qty":1,
        "symbol":"BTC/USD","token":token},"req_id":3});
    let reply = &respond(&add.to_string(), &state, &mut Session::default())[0];
    assert_eq!(reply["error"], "EGeneral:Permission denied");
    assert_eq!(reply["method"], "add_order");
}

#[test]
fn ping_pongs_and_garbage_gets_an_error_reply() {
    let (state, _) = state_with_token();
    let mut session = Session::default();
    let pong = respond(r#"{"method":"ping","req_id":101}"#, &state, &mut session);
    assert_eq!(pong[0]["method"], "pong");
    assert_eq!(pong[0]["req_id"], 101);
    for garbage in ["{not json", "[]", r#"{"method":"fly"}"#, r#"{"method":"subscribe"}"#] {
        let replies = respond(garbage, &state, &mut session);
        assert_eq!(replies.len(), 1, "{garbage}");
        assert_eq!(replies[0]["success"], false, "{garbage}");
        assert!(replies[0]["error"].is_string(), "{garbage}");
    }
}
