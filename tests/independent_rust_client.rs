//! kraken-async-rs, an independent Kraken client with strict WebSocket v2
//! types (`deny_unknown_fields` on acks and errors), against the simulator:
//! its REST client signs with its own code and mints a token; its WebSocket
//! client subscribes with it and parses every message the simulator sends,
//! through a trading round trip (add_order, its executions updates,
//! cancel_order). A message its types refuse fails the test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::start_sim;
use futures_util::StreamExt as _;
use kraken_async_rs::clients::core_kraken_client::CoreKrakenClient;
use kraken_async_rs::clients::kraken_client::KrakenClient as _;
use kraken_async_rs::crypto::nonce_provider::{IncreasingNonceProvider, NonceProvider};
use kraken_async_rs::secrets::secrets_provider::{SecretsProvider, StaticSecretsProvider};
use kraken_async_rs::wss::{
    BalancesSubscription, ChannelMessage, ExecutionSubscription, KrakenMessageStream, KrakenWSSClient, Message,
    MethodMessage, WssMessage,
};
use kraken_token_broker::sim::{SimConfig, SimKey, Tier};
use serde_json::json;
use tokio::sync::Mutex;

/// The next message, parsed by the client's own types (or the test fails).
async fn next(stream: &mut KrakenMessageStream<WssMessage>) -> WssMessage {
    let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a message within 5 s")
        .expect("the stream is open");
    message.unwrap_or_else(|e| panic!("kraken-async-rs could not parse a simulator message: {e:?}"))
}

/// Messages until one `pick` accepts, skipping heartbeats; every one parsed.
async fn until<T>(
    stream: &mut KrakenMessageStream<WssMessage>,
    what: &str,
    mut pick: impl FnMut(&WssMessage) -> Option<T>,
) -> T {
    for _ in 0..20 {
        let message = next(stream).await;
        if let Some(found) = pick(&message) {
            return found;
        }
    }
    panic!("no {what} in 20 messages");
}

#[tokio::test]
async fn kraken_async_rs_mints_subscribes_and_trades_parsing_every_message_strictly() {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        tier: Tier::Pro,
        ..SimConfig::default()
    })
    .await;

    // Its REST client, its signing, its nonces.
    let api_key: &'static str = Box::leak(key.api_key.clone().into_boxed_str());
    let api_secret: &'static str = Box::leak(key.api_secret.clone().into_boxed_str());
    let secrets: Box<Arc<Mutex<dyn SecretsProvider>>> =
        Box::new(Arc::new(Mutex::new(StaticSecretsProvider::new(api_key, api_secret))));
    let nonces: Box<Arc<Mutex<dyn NonceProvider>>> = Box::new(Arc::new(Mutex::new(IncreasingNonceProvider::new())));
    let mut rest = CoreKrakenClient::new_with_url(secrets, nonces, sim.rest_url());
    let answer = rest
        .get_websockets_token()
        .await
        .expect("a signed call the simulator accepts");
    assert!(answer.error.is_empty(), "{:?}", answer.error);
    let token = answer.result.expect("a token").token;
    for _ in 0..2 {
        // More calls: its nonces keep increasing for the simulator too.
        let again = rest.get_websockets_token().await.unwrap();
        assert!(again.error.is_empty(), "{:?}", again.error);
    }

    // Its WebSocket client.
    let mut ws = KrakenWSSClient::new_with_urls(sim.ws_url(), sim.ws_url());
    let mut stream = ws.connect_auth::<WssMessage>().await.expect("connects");
    let status = until(&mut stream, "status", |m| match m {
        WssMessage::Channel(ChannelMessage::Status(s)) => Some(s.data.connection_id.clone()),
        _ => None,
    })
    .await;
    let id = status.expect("a connection id").to_string();
    assert!(id.parse::<u64>().is_ok(), "a u64 connection id: {id}");

    stream
        .send(&Message::new_subscription(ExecutionSubscription::new(token.clone()), 1))
        .await
        .unwrap();
    let max_rate = until(&mut stream, "the executions ack", |m| match m {
        WssMessage::Method(MethodMessage::Subscription(ack)) => Some((ack.success, ack.req_id)),
        _ => None,
    })
    .await;
    assert_eq!(max_rate, (true, 1));
    until(&mut stream, "the executions snapshot", |m| {
        matches!(m, WssMessage::Channel(ChannelMessage::Execution(_))).then_some(())
    })
    .await;

    stream
        .send(&Message::new_subscription(BalancesSubscription::new(token.clone()), 2))
        .await
        .unwrap();
    let balances = until(&mut stream, "the balances snapshot", |m| match m {
        WssMessage::Channel(ChannelMessage::Balance(b)) => Some(format!("{:?}", b.data)),
        _ => None,
    })
    .await;
    assert!(
        balances.contains("wallets") || balances.contains("Wallet"),
        "{balances}"
    );

    // A trading round trip with the brokered-style token.
    let token_text = serde_json::to_value(&token).unwrap();
    let add = Message {
        method: "add_order".to_owned(),
        params: json!({"order_type": "limit", "side": "buy", "order_qty": 0.01, "symbol": "BTC/USD",
                       "limit_price": 20000.5, "token": token_text}),
        req_id: 3,
    };
    stream.send(&add).await.unwrap();
    let order_id = until(&mut stream, "the add_order ack", |m| match m {
        WssMessage::Method(MethodMessage::AddOrder(ack)) => ack.result.as_ref().map(|r| r.order_id.clone()),
        _ => None,
    })
    .await;
    let statuses = until(&mut stream, "a new order", |m| match m {
        WssMessage::Channel(ChannelMessage::Execution(e)) => e
            .data
            .iter()
            .any(|x| x.order_id == order_id && format!("{:?}", x.order_status) == "New")
            .then_some(()),
        _ => None,
    })
    .await;
    let () = statuses;
    let cancel = Message {
        method: "cancel_order".to_owned(),
        params: json!({"order_id": [order_id], "token": token_text}),
        req_id: 4,
    };
    stream.send(&cancel).await.unwrap();
    until(&mut stream, "the cancel_order ack", |m| {
        matches!(m, WssMessage::Method(MethodMessage::CancelOrder(ack)) if ack.success).then_some(())
    })
    .await;
    until(&mut stream, "the canceled update", |m| match m {
        WssMessage::Channel(ChannelMessage::Execution(e)) => e
            .data
            .iter()
            .any(|x| format!("{:?}", x.order_status) == "Canceled")
            .then_some(()),
        _ => None,
    })
    .await;

    // A heartbeat parses too.
    until(&mut stream, "a heartbeat", |m| {
        matches!(m, WssMessage::Channel(ChannelMessage::Heartbeat)).then_some(())
    })
    .await;

    // And the error engines care most about, as recorded live.
    let stale = Message::new_subscription(
        ExecutionSubscription::new(serde_json::from_value(json!("not-a-token")).unwrap()),
        5,
    );
    let mut fresh = ws.connect_auth::<WssMessage>().await.unwrap();
    fresh.send(&stale).await.unwrap();
    let error = until(&mut fresh, "an error", |m| match m {
        WssMessage::Error(e) => Some((e.error.clone(), e.status.clone(), e.req_id)),
        _ => None,
    })
    .await;
    assert_eq!(
        error,
        (Some("ESession:Invalid session".to_owned()), Some("error".to_owned()), 5)
    );
}
