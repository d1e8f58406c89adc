//! The simulator's WebSocket v2 endpoint (`/v2`): enough of Kraken's private
//! API for a consumer to prove its token works and to test its trading flow
//! offline: `subscribe`/`unsubscribe` to `executions` and `balances`,
//! `add_order` and `cancel_order` with their acks and `executions` updates,
//! `ping`, heartbeats once subscribed, the `status` channel (its system
//! status follows `PUT /_sim/system`), and Kraken's error shapes.
//!
//! Shapes follow messages recorded from the live API (kraken-async-rs test
//! fixtures): an error is `{"error": "...", "method": ..., "req_id": ...,
//! "success": false, "time_in", "time_out"}`, with `"status": "error"` on
//! `ESession:Invalid session` only (plus `symbol` where the request named
//! one; the recorded errors carry no `channel`, and that client's strict
//! types refuse one); a trading request without a token answers
//! `Token(s) not found`; a cancelled execution carries `reason` and
//! `cancel_reason`; `connection_id` is a full u64; balances carry `wallets`;
//! heartbeats come only when no other message was sent for a second.
//!
//! Tokens, as Kraken documents them: a token is checked when a connection
//! makes its first private request, and then serves that connection "for
//! the duration of the websockets connection", past its use-by (Kraken: it
//! "does not expire once a successful Websockets connection and private
//! subscription has been made"), that is while a private subscription is
//! maintained: with none left, a token past its use-by no longer serves the
//! connection. Assumed: a revoked token stops serving at
//! once even there (so engines can test invalidation), and a different
//! token on a bound connection is checked afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde_json::{Value, json};

use super::SimShared;
use super::state::{SimState, SystemStatus, Tier};
use orders::{Order, trade};
use replies::{ack, error_reply, now_rfc3339, snapshot};

mod orders;
mod replies;
#[cfg(test)]
mod tests;

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

/// Checks the token of a private request: the connection's bound token goes
/// on past its use-by; any other is checked (and the first good one binds).
fn authenticate(state: &SimState, session: &mut Session, token: Option<&str>) -> Result<String, &'static str> {
    const INVALID: &str = "ESession:Invalid session";
    let token = token.ok_or(INVALID)?;
    if session.bound.as_deref() == Some(token) {
        // Bound while a private subscription is maintained (Kraken: the
        // token "does not expire once a successful Websockets connection and
        // private subscription has been made"): with none left, a token past
        // its use-by serves the connection no more.
        let lapsed = session.subscribed.is_empty() && !state.token_is_valid(token);
        if lapsed {
            session.bound = None;
        }
        return if state.token_is_live(token) && !lapsed {
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
        "add_order" | "cancel_order" => trade(&method, &request, token, state, session, &time_in),
        other => vec![error_reply(
            "EGeneral:Unknown method",
            Some(other),
            Some(&request),
            &time_in,
        )],
    }
}

async fn send(socket: &mut WebSocket, value: &Value) -> bool {
    socket.send(Message::Text(value.to_string().into())).await.is_ok()
}

fn status_message(system: SystemStatus, connection_id: Option<u64>) -> Value {
    // Kraken's status channel: `upcoming_maintenance` and `emergency` are
    // arrays that always come together, empty when there is nothing to
    // report (none is, here).
    let mut data = json!({ "api_version": "v2", "system": system.as_str(), "version": "2.0.10",
        "upcoming_maintenance": [], "emergency": [] });
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
                heartbeat.reset();
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
                if !replies.is_empty() {
                    // Heartbeats come only when no other message does.
                    heartbeat.reset();
                }
            }
        }
    }
}
