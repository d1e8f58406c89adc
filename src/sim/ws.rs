//! The simulator's WebSocket v2 endpoint (`/v2`): enough of Kraken's private
//! API for a consumer to prove its token works and to test its trading flow
//! offline: `subscribe`/`unsubscribe` to `executions` and `balances`,
//! `add_order` and `cancel_order` with their acks and `executions` updates,
//! `ping`, heartbeats once subscribed, the `status` channel (its system
//! status follows `PUT /_sim/system`), and Kraken's error shapes.
//!
//! Shapes follow messages recorded from the live API (kraken-async-rs test
//! fixtures): an error is `{"error": "...", "method": ..., "req_id": ...,
//! "status": "error", "success": false, "time_in", "time_out"}` (plus
//! `symbol` where the request named one; the recorded errors carry no
//! `channel`, and that client's strict types refuse one); `connection_id` is
//! a full u64; balances carry `wallets`.
//!
//! Tokens, as Kraken documents them: a token is checked when a connection
//! makes its first private request, and then serves that connection "for
//! the duration of the websockets connection", past its use-by (Kraken: it
//! "does not expire once a successful Websockets connection and private
//! subscription has been made"). Assumed: a revoked token stops serving at
//! once even there (so engines can test invalidation), and a different
//! token on a bound connection is checked afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use rand::RngExt as _;
use serde_json::{Value, json};

use super::SimShared;
use super::state::{SimState, SystemStatus, Tier};

/// The largest frame the simulator reads; Kraken's requests are tiny.
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// The private channels a token opens.
const PRIVATE_CHANNELS: [&str; 2] = ["executions", "balances"];

/// Kraken's `maxratecount` per tier on the executions channel (the order
/// rate counter's ceiling: Starter 60, Intermediate 125, Pro 180).
fn max_rate_count(tier: Tier) -> u32 {
    match tier {
        Tier::Starter => 60,
        Tier::Intermediate => 125,
        Tier::Pro => 180,
    }
}

pub(super) async fn upgrade(State(sim): State<Arc<SimShared>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(socket, sim))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// An order placed on this connection.
#[derive(Debug, Clone)]
struct Order {
    symbol: String,
    side: String,
    order_type: String,
    qty: f64,
    limit_price: Option<f64>,
    cl_ord_id: Option<String>,
}

/// What a session keeps between frames.
#[derive(Default)]
pub struct Session {
    /// Private channels subscribed on this connection.
    pub subscribed: BTreeSet<&'static str>,
    sequence: u64,
    /// The token this connection authenticated with on its first private
    /// request: it serves the connection from then on.
    bound: Option<String>,
    orders: BTreeMap<String, Order>,
}

impl Session {
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }
}

fn error_reply(error: &str, method: Option<&str>, request: Option<&Value>, time_in: &str) -> Value {
    let mut reply = json!({
        "error": error,
        "status": "error",
        "success": false,
        "time_in": time_in,
        "time_out": now_rfc3339(),
    });
    if let Some(method) = method {
        reply["method"] = json!(method);
    }
    if let Some(req_id) = request.and_then(|r| r.get("req_id")) {
        reply["req_id"] = req_id.clone();
    }
    if let Some(symbol) = request.and_then(|r| r.pointer("/params/symbol")) {
        reply["symbol"] = symbol.clone();
    }
    reply
}

fn ack(method: &str, result: Value, request: &Value, time_in: &str) -> Value {
    let mut ack = json!({
        "method": method,
        "result": result,
        "success": true,
        "time_in": time_in,
        "time_out": now_rfc3339(),
    });
    if let Some(req_id) = request.get("req_id") {
        ack["req_id"] = req_id.clone();
    }
    ack
}

fn snapshot(channel: &str, sequence: u64) -> Value {
    let data = if channel == "balances" {
        json!([
            { "asset": "USD", "asset_class": "currency", "balance": 100000.0,
              "wallets": [{ "type": "spot", "id": "main", "balance": 100000.0 }] },
            { "asset": "BTC", "asset_class": "currency", "balance": 1.5,
              "wallets": [{ "type": "spot", "id": "main", "balance": 1.5 }] }
        ])
    } else {
        json!([])
    };
    json!({ "channel": channel, "type": "snapshot", "data": data, "sequence": sequence })
}

/// Checks the token of a private request: the connection's bound token goes
/// on past its use-by; any other is checked (and the first good one binds).
fn authenticate(state: &SimState, session: &mut Session, token: Option<&str>) -> Result<String, &'static str> {
    const INVALID: &str = "ESession:Invalid session";
    let token = token.ok_or(INVALID)?;
    if session.bound.as_deref() == Some(token) {
        return if state.token_is_live(token) {
            Ok(token.to_owned())
        } else {
            Err(INVALID)
        };
    }
    if !state.token_is_valid(token) {
        return Err(INVALID);
    }
    if session.bound.is_none() {
        session.bound = Some(token.to_owned());
    }
    Ok(token.to_owned())
}

/// Kraken's order id shape: `XXXXXX-XXXXX-XXXXXX`.
fn order_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let mut part = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect()
    };
    format!("{}-{}-{}", part(6), part(5), part(6))
}

fn execution(order_id: &str, order: &Order, exec_type: &str) -> Value {
    let mut e = json!({
        "order_id": order_id,
        "symbol": order.symbol,
        "side": order.side,
        "order_type": order.order_type,
        "order_qty": order.qty,
        "exec_type": exec_type,
        "order_status": exec_type,
        "cum_qty": 0.0,
        "cum_cost": 0.0,
        "timestamp": now_rfc3339(),
    });
    if let Some(price) = order.limit_price {
        e["limit_price"] = json!(price);
    }
    if let Some(id) = &order.cl_ord_id {
        e["cl_ord_id"] = json!(id);
    }
    e
}

/// The replies to one text frame, in order.
pub fn respond(text: &str, state: &SimState, session: &mut Session) -> Vec<Value> {
    let time_in = now_rfc3339();
    let Ok(request) = serde_json::from_str::<Value>(text) else {
        return vec![error_reply("EGeneral:Invalid arguments", None, None, &time_in)];
    };
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return vec![error_reply(
            "EGeneral:Invalid arguments",
            None,
            Some(&request),
            &time_in,
        )];
    };
    let method = method.to_owned();
    let token = request.pointer("/params/token").and_then(Value::as_str);
    match method.as_str() {
        "ping" => {
            let mut pong = json!({ "method": "pong", "time_in": time_in, "time_out": now_rfc3339() });
            if let Some(req_id) = request.get("req_id") {
                pong["req_id"] = req_id.clone();
            }
            vec![pong]
        }
        "subscribe" | "unsubscribe" => {
            let channel = request.pointer("/params/channel").and_then(Value::as_str);
            let Some(channel) = channel.and_then(|c| PRIVATE_CHANNELS.into_iter().find(|known| *known == c)) else {
                return vec![error_reply(
                    "EGeneral:Invalid arguments:channel",
                    Some(&method),
                    Some(&request),
                    &time_in,
                )];
            };
            if method == "unsubscribe" {
                if !session.subscribed.remove(channel) {
                    // As recorded: the error names the method `subscribe`.
                    return vec![error_reply(
                        "Subscription Not Found",
                        Some("subscribe"),
                        Some(&request),
                        &time_in,
                    )];
                }
                return vec![ack("unsubscribe", json!({ "channel": channel }), &request, &time_in)];
            }
            if let Err(error) = authenticate(state, session, token) {
                return vec![error_reply(error, Some(&method), Some(&request), &time_in)];
            }
            session.subscribed.insert(channel);
            let mut result = json!({ "channel": channel, "snapshot": true });
            if channel == "executions" {
                result["maxratecount"] = json!(max_rate_count(state.tier()));
            }
            let sequence = session.next_sequence();
            vec![
                ack("subscribe", result, &request, &time_in),
                snapshot(channel, sequence),
            ]
        }
        "add_order" => add_order(&request, token, state, session, &time_in),
        "cancel_order" => cancel_order(&request, token, state, session, &time_in),
        other => vec![error_reply(
            "EGeneral:Unknown method",
            Some(other),
            Some(&request),
            &time_in,
        )],
    }
}

/// Checks what every trading request needs: the exchange open for it, a
/// good token, and a key allowed to trade.
fn trading_allowed(
    method: &str,
    token: Option<&str>,
    state: &SimState,
    session: &mut Session,
) -> Result<(), &'static str> {
    match (state.system_status(), method) {
        (SystemStatus::Maintenance, _) => return Err("EService:Unavailable"),
        (SystemStatus::CancelOnly, "add_order") => return Err("EService:Market in cancel_only mode"),
        _ => {}
    }
    let token = authenticate(state, session, token)?;
    let may_trade = state.key_of_token(&token).is_some_and(|k| k.trade_permission);
    if !may_trade {
        return Err("EGeneral:Permission denied");
    }
    Ok(())
}

/// Appends an `executions` update when the connection subscribed to them.
fn push_execution(replies: &mut Vec<Value>, session: &mut Session, data: Value) {
    if session.subscribed.contains("executions") {
        let sequence = session.next_sequence();
        replies.push(json!({ "channel": "executions", "type": "update", "data": [data], "sequence": sequence }));
    }
}

fn add_order(
    request: &Value,
    token: Option<&str>,
    state: &SimState,
    session: &mut Session,
    time_in: &str,
) -> Vec<Value> {
    if let Err(error) = trading_allowed("add_order", token, state, session) {
        return vec![error_reply(error, Some("add_order"), Some(request), time_in)];
    }
    let p = |name: &str| request.pointer(&format!("/params/{name}"));
    let text = |name: &str| p(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(symbol), Some(side), Some(order_type), Some(qty)) = (
        text("symbol"),
        text("side").filter(|s| s == "buy" || s == "sell"),
        text("order_type"),
        p("order_qty").and_then(Value::as_f64).filter(|q| *q > 0.0),
    ) else {
        return vec![error_reply(
            "EGeneral:Invalid arguments",
            Some("add_order"),
            Some(request),
            time_in,
        )];
    };
    let limit_price = p("limit_price").and_then(Value::as_f64);
    if order_type == "limit" && limit_price.is_none() {
        return vec![error_reply(
            "EGeneral:Invalid arguments:limit_price",
            Some("add_order"),
            Some(request),
            time_in,
        )];
    }
    let order = Order {
        symbol,
        side,
        order_type,
        qty,
        limit_price,
        cl_ord_id: text("cl_ord_id"),
    };
    let id = order_id();
    let mut result = json!({ "order_id": id });
    if let Some(cl) = &order.cl_ord_id {
        result["cl_ord_id"] = json!(cl);
    }
    let mut replies = vec![ack("add_order", result, request, time_in)];
    push_execution(&mut replies, session, execution(&id, &order, "pending_new"));
    push_execution(&mut replies, session, execution(&id, &order, "new"));
    session.orders.insert(id, order);
    replies
}

fn cancel_order(
    request: &Value,
    token: Option<&str>,
    state: &SimState,
    session: &mut Session,
    time_in: &str,
) -> Vec<Value> {
    if let Err(error) = trading_allowed("cancel_order", token, state, session) {
        return vec![error_reply(error, Some("cancel_order"), Some(request), time_in)];
    }
    let ids: Vec<String> = request
        .pointer("/params/order_id")
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return vec![error_reply(
            "EGeneral:Invalid arguments:order_id",
            Some("cancel_order"),
            Some(request),
            time_in,
        )];
    }
    let mut replies = Vec::new();
    for id in ids {
        match session.orders.remove(&id) {
            Some(order) => {
                replies.push(ack("cancel_order", json!({ "order_id": id }), request, time_in));
                push_execution(&mut replies, session, execution(&id, &order, "canceled"));
            }
            None => replies.push(error_reply(
                "EOrder:Unknown order",
                Some("cancel_order"),
                Some(request),
                time_in,
            )),
        }
    }
    replies
}

async fn send(socket: &mut WebSocket, value: &Value) -> bool {
    socket.send(Message::Text(value.to_string().into())).await.is_ok()
}

fn status_message(system: SystemStatus, connection_id: Option<u64>) -> Value {
    let mut data = json!({ "api_version": "v2", "system": system.as_str(), "version": "2.0.10" });
    if let Some(id) = connection_id {
        data["connection_id"] = json!(id);
    }
    json!({ "channel": "status", "type": "update", "data": [data] })
}

async fn session(mut socket: WebSocket, sim: Arc<SimShared>) {
    // Kraken's connection ids are full unsigned 64-bit numbers.
    let connection_id: u64 = rand::random();
    if !send(
        &mut socket,
        &status_message(sim.state.system_status(), Some(connection_id)),
    )
    .await
    {
        return;
    }
    let mut statuses = sim.status_tx.subscribe();
    let mut drops = sim.drop_tx.subscribe();
    let mut session = Session::default();
    let mut heartbeat = tokio::time::interval(sim.state.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            // A network blip: the connection just ends, no close frame.
            Ok(()) = drops.recv() => return,
            Ok(status) = statuses.recv() => {
                if !send(&mut socket, &status_message(status, None)).await {
                    return;
                }
            }
            _ = heartbeat.tick(), if !session.subscribed.is_empty() => {
                if !send(&mut socket, &json!({ "channel": "heartbeat" })).await {
                    return;
                }
            }
            frame = socket.recv() => {
                let replies = match frame {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(Message::Text(text))) => respond(text.as_str(), &sim.state, &mut session),
                    // Kraken reads JSON from binary frames too (kraken-async-rs
                    // sends its requests that way, against the live API).
                    Some(Ok(Message::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => respond(text, &sim.state, &mut session),
                        Err(_) => vec![error_reply("EGeneral:Invalid arguments", None, None, &now_rfc3339())],
                    },
                    // Protocol pings are answered by the library.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Vec::new(),
                };
                for reply in &replies {
                    if !send(&mut socket, reply).await {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn a_token_binds_to_its_connection_and_serves_it_past_its_use_by() {
        let (state, token) = state_with_token();
        let mut session = Session::default();
        let sub = |channel: &str| {
            json!({"method":"subscribe","params":{"channel":channel,"token":token},"req_id":1}).to_string()
        };
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
}
