//! How a trading engine uses the broker: fetch a token, open Kraken's private
//! WebSocket with it, and if Kraken rejects it, report it and try once more
//! with the fresh token the broker answers.
//!
//! Against the demo (`cargo run --release -- demo`, then in another shell):
//!
//! ```text
//! export KTB_CONSUMER_CREDENTIAL=ktb_...   # printed by the demo
//! cargo run --example engine -- http://127.0.0.1:8080 30
//! ```
//!
//! The second argument is `min_ttl`: seconds the token must still have to
//! open a connection (the demo's tokens live 60 s; Kraken's 900 s).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The broker's answer to `GET /v1/token`.
#[derive(Deserialize)]
struct Token {
    token: String,
    account: String,
    expires_in: u64,
    ws_url: String,
}

struct Broker {
    http: reqwest::Client,
    base: String,
    credential: String,
}

impl Broker {
    /// A token with at least `min_ttl` seconds left to open a connection.
    async fn token(&self, min_ttl: u64) -> anyhow::Result<Token> {
        let response = self
            .http
            .get(format!("{}/v1/token?min_ttl={min_ttl}", self.base))
            .bearer_auth(&self.credential)
            .send()
            .await?;
        if !response.status().is_success() {
            // problem+json: `detail` says why; on 503, Retry-After says when.
            let status = response.status();
            let problem: Value = response.json().await.unwrap_or_default();
            anyhow::bail!("broker answered {status}: {}", problem["detail"]);
        }
        Ok(response.json().await?)
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
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }
}

/// Subscribes to `executions`; `Ok(true)` when acknowledged, `Ok(false)`
/// when Kraken rejects the token.
async fn subscribe(token: &Token) -> anyhow::Result<bool> {
    let (mut socket, _) = tokio_tungstenite::connect_async(token.ws_url.as_str()).await?;
    let request = json!({
        "method": "subscribe",
        "params": { "channel": "executions", "token": token.token },
        "req_id": 1
    });
    socket.send(Message::Text(request.to_string().into())).await?;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), socket.next()).await? {
        let Message::Text(text) = frame? else { continue };
        let message: Value = serde_json::from_str(text.as_str())?;
        if message["method"] == "subscribe" {
            if message["success"] == true {
                println!("subscribed to executions: {}", message["result"]);
                return Ok(true);
            }
            println!("Kraken rejected the subscription: {}", message["error"]);
            return Ok(false);
        }
    }
    anyhow::bail!("the socket closed before an answer")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let min_ttl: u64 = std::env::args().nth(2).map_or(Ok(30), |s| s.parse())?;
    let credential = std::env::var("KTB_CONSUMER_CREDENTIAL")
        .map_err(|_| anyhow::anyhow!("set KTB_CONSUMER_CREDENTIAL to the consumer credential"))?;
    let broker = Broker {
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
        base,
        credential,
    };
    // On start and on every reconnect: a token with time to spare, used at once.
    let token = broker.token(min_ttl).await?;
    println!("token for account {} ({} s left)", token.account, token.expires_in);
    if !subscribe(&token).await? {
        // ESession:Invalid session: report it; the broker mints one new token
        // however many engines report the same one.
        let fresh = broker.report_rejected(&token).await?;
        anyhow::ensure!(subscribe(&fresh).await?, "a fresh token was rejected too");
    }
    Ok(())
}
