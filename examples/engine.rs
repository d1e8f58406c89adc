//! How a trading engine uses the broker, as a loop that runs until stopped:
//!
//! - a task follows the broker's watch stream (`GET /v1/token/watch`), so a
//!   fresh token is at hand before every reconnect (no fetch on the
//!   reconnect path); it reconnects with back-off, honouring `Retry-After`;
//! - the engine opens Kraken's private WebSocket with the latest token,
//!   subscribes to `executions` and reads;
//! - when Kraken answers `ESession:Invalid session`, it reports the token
//!   (`POST /v1/token/invalidate`) and subscribes again with the token the
//!   broker answers, on the same connection;
//! - when the connection drops (a network blip, Kraken's maintenance), it
//!   reconnects with back-off and jitter, with the latest token.
//!
//! With `--relay`, the same engine trades through the broker's relay
//! (`GET /v1/relay`) instead, and never holds a token: it connects to the
//! broker, speaks Kraken's WebSocket v2 without tokens (the broker adds
//! them), subscribes to `executions`, places and cancels one order, and
//! reconnects with back-off when the relay closes (1001: the broker is
//! stopping; 1008: a reload revoked it, see the reason; other codes are
//! Kraken's own). No invalidation step: the broker replaces a token Kraken
//! refuses and resends the request itself.
//!
//! Against the demo (`cargo run --release -- demo`, then in another shell):
//!
//! ```text
//! export KTB_CONSUMER_CREDENTIAL=ktb_...   # printed by the demo
//! cargo run --example engine -- http://127.0.0.1:8080 demo
//! cargo run --example engine -- http://127.0.0.1:8080 demo --relay
//! # then, to see the recovery paths, against the demo's simulator:
//! curl -X POST -H 'Content-Type: application/json' http://127.0.0.1:<sim>/_sim/tokens/revoke
//! curl -X POST -H 'Content-Type: application/json' http://127.0.0.1:<sim>/_sim/ws/drop
//! ```

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// The broker's token JSON (the body of `GET /v1/token`, the data of a
/// watch stream's `token` event).
#[derive(Deserialize, Clone)]
struct Token {
    token: String,
    account: String,
    expires_in: u64,
    ws_url: String,
}

#[derive(Clone)]
struct Broker {
    http: reqwest::Client,
    base: String,
    account: String,
    credential: String,
}

/// Exponential back-off with full jitter, capped at 30 s.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1 << attempt.min(6))
        .min(Duration::from_secs(30));
    base.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let secs = response.headers().get("retry-after")?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_secs(secs))
}

impl Broker {
    /// Follows the watch stream for ever, publishing each token.
    async fn follow(self, latest: watch::Sender<Option<Token>>) {
        let mut attempt = 0;
        loop {
            let url = format!("{}/v1/token/watch?account={}", self.base, self.account);
            let wait = match self.http.get(url).bearer_auth(&self.credential).send().await {
                Ok(mut response) if response.status().is_success() => {
                    let mut buffer = String::new();
                    // The broker sends a keep-alive every 15 s: 45 s of silence is a lost stream.
                    while let Ok(Ok(Some(chunk))) =
                        tokio::time::timeout(Duration::from_secs(45), response.chunk()).await
                    {
                        buffer.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buffer.find("\n\n") {
                            let event: String = buffer.drain(..end + 2).collect();
                            if event.lines().any(|l| l == "event: token")
                                && let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                                && let Ok(token) = serde_json::from_str::<Token>(data)
                            {
                                println!("watch: new token ({} s left)", token.expires_in);
                                latest.send_replace(Some(token));
                                attempt = 0;
                            } else if event.lines().any(|l| l == "event: unavailable") {
                                println!("watch: the broker has no good token now");
                            }
                        }
                    }
                    None
                }
                Ok(response) if matches!(response.status().as_u16(), 401 | 403) => {
                    eprintln!(
                        "the broker refuses this consumer ({}): fix the credential",
                        response.status()
                    );
                    std::process::exit(1);
                }
                Ok(response) => retry_after(&response),
                Err(e) => {
                    eprintln!("watch: cannot reach the broker: {}", e.without_url());
                    None
                }
            };
            attempt += 1;
            tokio::time::sleep(wait.unwrap_or_else(|| backoff(attempt))).await;
        }
    }

    /// Reports a token Kraken rejected; answers the token to use instead.
    async fn report_rejected(&self, rejected: &Token) -> anyhow::Result<Token> {
        let response = self
            .http
            .post(format!(
                "{}/v1/token/invalidate?account={}",
                self.base, rejected.account
            ))
            .bearer_auth(&self.credential)
            .json(&json!({ "token": rejected.token }))
            .send()
            .await?;
        if !response.status().is_success() {
            let (status, wait) = (response.status(), retry_after(&response));
            let problem: Value = response.json().await.unwrap_or_default();
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await; // 429/503: as the broker says
            }
            anyhow::bail!("the broker answered {status}: {}", problem["detail"]);
        }
        Ok(response.json().await?)
    }
}

fn subscribe_message(token: &Token, req_id: u64) -> Message {
    let request = json!({
        "method": "subscribe",
        "params": { "channel": "executions", "token": token.token, "snap_orders": true },
        "req_id": req_id,
    });
    Message::Text(request.to_string().into())
}

/// One connection: subscribe, read until it drops. A rejected token is
/// reported and replaced on the same connection.
async fn connection(broker: &Broker, mut token: Token) -> anyhow::Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(token.ws_url.as_str()).await?;
    let mut req_id = 1;
    socket.send(subscribe_message(&token, req_id)).await?;
    let mut reports = 0;
    while let Some(frame) = socket.next().await {
        let Message::Text(text) = frame? else { continue };
        let message: Value = serde_json::from_str(text.as_str())?;
        match (message["method"].as_str(), message["channel"].as_str()) {
            (Some("subscribe"), _) if message["success"] == true => {
                println!("subscribed to executions");
                reports = 0;
            }
            (Some("subscribe"), _) if message["error"].as_str() == Some("ESession:Invalid session") => {
                reports += 1;
                anyhow::ensure!(reports <= 3, "Kraken keeps rejecting fresh tokens");
                println!("Kraken rejected the token: reporting it");
                token = broker.report_rejected(&token).await?;
                req_id += 1;
                socket.send(subscribe_message(&token, req_id)).await?;
            }
            (Some("subscribe"), _) => anyhow::bail!("subscription refused: {}", message["error"]),
            (_, Some("executions")) => println!("executions {}", message["type"]),
            _ => {}
        }
    }
    Ok(())
}

/// One relay connection: subscribe, place and cancel an order, read until
/// the relay closes. Returns whether to reconnect (not after a refusal
/// that a retry cannot cure: 401, 403).
async fn relay_connection(broker: &Broker) -> anyhow::Result<bool> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/v1/relay?account={}",
        broker.base.replacen("http", "ws", 1),
        broker.account
    );
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", broker.credential).parse()?);
    let mut socket = match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => socket,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            println!("the relay answered {status}: {body}");
            return Ok(!matches!(status, 401 | 403));
        }
        Err(e) => return Err(e.into()),
    };
    // No token in any of these: the broker sets params.token.
    let requests = [
        json!({"method": "subscribe", "params": {"channel": "executions", "snap_orders": true}, "req_id": 1}),
        json!({"method": "add_order", "req_id": 2, "params": {"order_type": "limit", "side": "buy",
            "order_qty": 0.0001, "limit_price": 1.0, "symbol": "BTC/USD", "post_only": true}}),
    ];
    for request in requests {
        socket.send(Message::Text(request.to_string().into())).await?;
    }
    while let Some(frame) = socket.next().await {
        let text = match frame? {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                println!("the relay closed: {code} {reason}");
                return Ok(true);
            }
            _ => continue,
        };
        let message: Value = serde_json::from_str(text.as_str())?;
        match (message["method"].as_str(), message["channel"].as_str()) {
            (Some("add_order"), _) if message["success"] == true => {
                let order_id = message["result"]["order_id"].clone();
                println!("order placed: {order_id}; cancelling it");
                let cancel = json!({"method": "cancel_order", "req_id": 3, "params": {"order_id": [order_id]}});
                socket.send(Message::Text(cancel.to_string().into())).await?;
            }
            (Some(method), _) if message["success"] == false => {
                println!("{method} refused: {}", message["error"]);
            }
            (Some(method), _) if message["success"] == true => println!("{method}: ok"),
            (_, Some("executions")) => println!("executions {}", message["type"]),
            _ => {}
        }
    }
    Ok(true)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let account = std::env::args().nth(2).unwrap_or_else(|| "main".into());
    let relay = std::env::args().any(|a| a == "--relay");
    let credential = std::env::var("KTB_CONSUMER_CREDENTIAL")
        .map_err(|_| anyhow::anyhow!("set KTB_CONSUMER_CREDENTIAL to the consumer credential"))?;
    let broker = Broker {
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        base: base.trim_end_matches('/').to_owned(),
        account,
        credential,
    };
    if relay {
        let mut attempt = 0;
        loop {
            match relay_connection(&broker).await {
                Ok(true) => {}
                Ok(false) => anyhow::bail!("the relay refused this engine: see above"),
                Err(e) => println!("the relay connection failed ({e}); reconnecting"),
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt.min(4))).await;
        }
    }
    let (latest_tx, mut latest) = watch::channel(None);
    tokio::spawn(broker.clone().follow(latest_tx));
    let mut attempt = 0;
    loop {
        // The latest token from the stream: no fetch on the reconnect path.
        let token = latest.wait_for(Option::is_some).await?.clone().expect("is some");
        match connection(&broker, token).await {
            Ok(()) => println!("the connection closed; reconnecting"),
            Err(e) => println!("the connection failed ({e}); reconnecting"),
        }
        attempt += 1;
        tokio::time::sleep(backoff(attempt.min(4))).await;
    }
}
