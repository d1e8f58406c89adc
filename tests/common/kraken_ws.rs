//! A second WebSocket server playing Kraken's v2 endpoint, independent of
//! the simulator (tokio-tungstenite's server, no code shared with `sim/`):
//! it records every frame and every close it receives, answers `ping`,
//! `subscribe` and `add_order` in Kraken's shapes, and on cue floods its
//! client or closes with a code of its own.
//!
//! Cues (a `req_id` of a `ping`): `"flood"` sends 100,000 heartbeats;
//! `"close"` closes with 1013 and the reason "try again later".

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What the server saw.
#[derive(Default)]
pub struct Seen {
    /// Every text frame received, per connection (by index).
    pub frames: Vec<Vec<String>>,
    /// Connections whose client closed or went away, by index.
    pub closed: Vec<usize>,
}

#[derive(Clone)]
pub struct FakeKraken {
    pub url: String,
    pub seen: Arc<Mutex<Seen>>,
}

impl FakeKraken {
    pub async fn start() -> FakeKraken {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v2", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&shared);
                tokio::spawn(serve(stream, seen));
            }
        });
        FakeKraken { url, seen }
    }

    /// Every frame received on every connection.
    pub fn all_frames(&self) -> Vec<Value> {
        let seen = self.seen.lock().unwrap();
        seen.frames
            .iter()
            .flatten()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().frames.len()
    }

    pub fn closed(&self) -> usize {
        self.seen.lock().unwrap().closed.len()
    }
}

async fn serve(stream: tokio::net::TcpStream, seen: Arc<Mutex<Seen>>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.frames.push(Vec::new());
        seen.frames.len() - 1
    };
    let status = json!({"channel": "status", "type": "update",
        "data": [{"api_version": "v2", "connection_id": 1, "system": "online", "version": "2.0.10"}]});
    let _ = ws.send(Message::Text(status.to_string().into())).await;
    while let Some(Ok(message)) = ws.next().await {
        let text = match message {
            Message::Text(text) => text.to_string(),
            Message::Close(_) => break,
            _ => continue,
        };
        seen.lock().unwrap().frames[index].push(text.clone());
        let request: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let method = request["method"].as_str().unwrap_or("").to_owned();
        let req_id = request.get("req_id").cloned().unwrap_or(Value::Null);
        let reply = match method.as_str() {
            "ping" if req_id == json!("flood") => {
                for _ in 0..100_000 {
                    if ws
                        .feed(Message::Text(r#"{"channel":"heartbeat"}"#.into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let _ = ws.flush().await;
                continue;
            }
            "ping" if req_id == json!("close") => {
                let frame = CloseFrame {
                    code: CloseCode::Again,
                    reason: "try again later".into(),
                };
                let _ = ws.close(Some(frame)).await;
                // Drain until the client answers the close.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            "ping" => json!({"method": "pong", "req_id": req_id}),
            "subscribe" => json!({"method": "subscribe", "req_id": req_id, "success": true,
                "result": {"channel": request["params"]["channel"]}}),
            "add_order" => json!({"method": "add_order", "req_id": req_id, "success": true,
                "result": {"order_id": "OFAKE-00001-AAAAAA"}}),
            other => json!({"error": "EGeneral:Unknown method", "method": other, "req_id": req_id, "success": false}),
        };
        if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
            break;
        }
    }
    seen.lock().unwrap().closed.push(index);
}
