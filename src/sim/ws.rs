//! The simulator's WebSocket v2 endpoint (`/v2`), enough of Kraken's private
//! API for a consumer to prove its token works: `subscribe`/`unsubscribe` to
//! `executions` and `balances`, `ping`, heartbeats once subscribed, and
//! Kraken's error shapes (a string `error`, `success: false`) for an unknown
//! or expired token and for frames it cannot read.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde_json::{Value, json};

use super::SimShared;
use super::state::SimState;

/// The largest frame the simulator reads; Kraken's requests are tiny.
const MAX_FRAME_BYTES: usize = 64 * 1024;

/// The private channels a token opens.
const PRIVATE_CHANNELS: [&str; 2] = ["executions", "balances"];

pub(super) async fn upgrade(State(sim): State<Arc<SimShared>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(socket, sim))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// What a session keeps between frames.
#[derive(Default)]
pub struct Session {
    /// Private channels subscribed on this connection.
    pub subscribed: BTreeSet<&'static str>,
    sequence: u64,
}

impl Session {
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }
}

fn error_reply(error: &str, method: Option<&str>, req_id: Option<&Value>, time_in: &str) -> Value {
    let mut reply = json!({
        "error": error,
        "success": false,
        "time_in": time_in,
        "time_out": now_rfc3339(),
    });
    if let Some(method) = method {
        reply["method"] = json!(method);
    }
    if let Some(req_id) = req_id {
        reply["req_id"] = req_id.clone();
    }
    reply
}

fn snapshot(channel: &str, sequence: u64) -> Value {
    let data = if channel == "balances" {
        json!([
            { "asset": "USD", "asset_class": "currency", "balance": 100000.0 },
            { "asset": "BTC", "asset_class": "currency", "balance": 1.5 }
        ])
    } else {
        json!([])
    };
    json!({ "channel": channel, "type": "snapshot", "data": data, "sequence": sequence })
}

/// The replies to one text frame, in order.
pub fn respond(text: &str, state: &SimState, session: &mut Session) -> Vec<Value> {
    let time_in = now_rfc3339();
    let Ok(request) = serde_json::from_str::<Value>(text) else {
        return vec![error_reply("EGeneral:Invalid arguments", None, None, &time_in)];
    };
    let req_id = request.get("req_id");
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return vec![error_reply("EGeneral:Invalid arguments", None, req_id, &time_in)];
    };
    match method {
        "ping" => {
            let mut pong = json!({ "method": "pong", "time_in": time_in, "time_out": now_rfc3339() });
            if let Some(req_id) = req_id {
                pong["req_id"] = req_id.clone();
            }
            vec![pong]
        }
        "subscribe" | "unsubscribe" => {
            let params = request.get("params");
            let channel = params.and_then(|p| p.get("channel")).and_then(Value::as_str);
            let Some(channel) = channel.and_then(|c| PRIVATE_CHANNELS.into_iter().find(|known| *known == c)) else {
                return vec![error_reply(
                    "EGeneral:Invalid arguments:channel",
                    Some(method),
                    req_id,
                    &time_in,
                )];
            };
            if method == "unsubscribe" {
                if !session.subscribed.remove(channel) {
                    return vec![error_reply("Subscription Not Found", Some(method), req_id, &time_in)];
                }
            } else {
                let token = params.and_then(|p| p.get("token")).and_then(Value::as_str);
                if !token.is_some_and(|t| state.token_is_valid(t)) {
                    return vec![error_reply("ESession:Invalid session", Some(method), req_id, &time_in)];
                }
                session.subscribed.insert(channel);
            }
            let mut result = json!({ "channel": channel, "snapshot": true });
            if channel == "executions" && method == "subscribe" {
                result["maxratecount"] = json!(180);
            }
            let mut ack = json!({
                "method": method,
                "result": result,
                "success": true,
                "time_in": time_in,
                "time_out": now_rfc3339(),
            });
            if let Some(req_id) = req_id {
                ack["req_id"] = req_id.clone();
            }
            let mut replies = vec![ack];
            if method == "subscribe" {
                let sequence = session.next_sequence();
                replies.push(snapshot(channel, sequence));
            }
            replies
        }
        other => vec![error_reply("EGeneral:Unknown method", Some(other), req_id, &time_in)],
    }
}

async fn send(socket: &mut WebSocket, value: &Value) -> bool {
    socket.send(Message::Text(value.to_string().into())).await.is_ok()
}

async fn session(mut socket: WebSocket, sim: Arc<SimShared>) {
    let status = json!({
        "channel": "status",
        "type": "update",
        "data": [{ "api_version": "v2", "connection_id": rand::random::<u32>(), "system": "online", "version": "2.0.10" }]
    });
    if !send(&mut socket, &status).await {
        return;
    }
    let mut session = Session::default();
    let mut heartbeat = tokio::time::interval(sim.state.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
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
                    Some(Ok(Message::Binary(_))) => {
                        vec![error_reply("EGeneral:Invalid arguments", None, None, &now_rfc3339())]
                    }
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
    use crate::sim::state::{PrivateCall, Reply, SimConfig, SimKey};

    fn state_with_token() -> (SimState, String) {
        let key = SimKey::generate();
        let state = SimState::new(SimConfig {
            keys: vec![key.clone()],
            ..SimConfig::default()
        })
        .unwrap();
        let body = "nonce=1";
        let secret = crate::kraken::decode_secret(&key.api_secret).unwrap();
        let sig = crate::kraken::sign(&secret, crate::kraken::WS_TOKEN_PATH, "1", body.as_bytes());
        let decision = state.private_call(&PrivateCall {
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
