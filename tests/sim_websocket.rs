//! A Rust WebSocket client (tokio-tungstenite) against the simulator's `/v2`.

mod common;

use std::time::Duration;

use common::{sim_with_key, wait_for};
use futures_util::{SinkExt, StreamExt};
use kraken_token_broker::kraken::{ApiCredentials, KeyLane, KrakenClient, decode_secret};
use kraken_token_broker::secret::SecretString;
use kraken_token_broker::sim::{SimHandle, SimKey};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn mint(sim: &SimHandle, key: &SimKey) -> String {
    let creds = ApiCredentials {
        api_key: SecretString::new(key.api_key.clone()),
        api_secret: decode_secret(&key.api_secret).unwrap(),
        otp: None,
    };
    let client = KrakenClient::new(&sim.rest_url(), Duration::from_secs(5)).unwrap();
    let token = client.get_websockets_token(&creds, &KeyLane::new()).await.unwrap();
    token.token.expose().to_owned()
}

async fn connect(sim: &SimHandle) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(sim.ws_url()).await.unwrap();
    let status = next_json(&mut socket).await;
    assert_eq!(status["channel"], "status");
    assert_eq!(status["data"][0]["system"], "online");
    // The advisory arrays, together, empty when nothing is announced.
    assert_eq!(status["data"][0]["upcoming_maintenance"], json!([]));
    assert_eq!(status["data"][0]["emergency"], json!([]));
    socket
}

/// The next JSON text frame, within 5 s.
async fn next_json(socket: &mut Socket) -> Value {
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("a frame within 5 s")
        .expect("the socket stays open")
        .expect("a good frame");
    match frame {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn send(socket: &mut Socket, value: Value) {
    socket.send(Message::Text(value.to_string().into())).await.unwrap();
}

#[tokio::test]
async fn a_fresh_token_subscribes_and_heartbeats_follow() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let token = mint(&sim, &key).await;
    let mut socket = connect(&sim).await;
    send(
        &mut socket,
        json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":1}),
    )
    .await;
    let ack = next_json(&mut socket).await;
    assert_eq!(ack["method"], "subscribe");
    assert_eq!(ack["success"], true);
    assert_eq!(ack["req_id"], 1);
    assert_eq!(ack["result"]["channel"], "executions");
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["channel"], "executions");
    assert_eq!(snapshot["type"], "snapshot");
    let heartbeat = next_json(&mut socket).await;
    assert_eq!(heartbeat, json!({"channel": "heartbeat"}));

    send(
        &mut socket,
        json!({"method":"subscribe","params":{"channel":"balances","token":token}}),
    )
    .await;
    assert_eq!(next_json(&mut socket).await["success"], true);
}

#[tokio::test]
async fn an_expired_token_gets_invalid_session() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    sim.state().set_token_ttl(Duration::from_millis(100));
    let token = mint(&sim, &key).await;
    let state = sim.state().clone();
    wait_for("the token to expire", Duration::from_secs(5), || {
        let expired = !state.token_is_valid(&token);
        async move { expired.then_some(()) }
    })
    .await;
    let mut socket = connect(&sim).await;
    send(
        &mut socket,
        json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":42}),
    )
    .await;
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["error"], "ESession:Invalid session");
    assert_eq!(reply["success"], false);
    assert_eq!(reply["method"], "subscribe");
    assert_eq!(reply["req_id"], 42);
    assert!(reply["time_in"].is_string() && reply["time_out"].is_string());
}

#[tokio::test]
async fn an_unknown_token_gets_invalid_session() {
    let (sim, _key) = sim_with_key(Duration::from_secs(900)).await;
    let mut socket = connect(&sim).await;
    send(
        &mut socket,
        json!({"method":"subscribe","params":{"channel":"balances","token":"made-up"}}),
    )
    .await;
    assert_eq!(next_json(&mut socket).await["error"], "ESession:Invalid session");
}

#[tokio::test]
async fn a_garbage_frame_gets_an_error_reply_and_the_socket_stays_usable() {
    let (sim, _key) = sim_with_key(Duration::from_secs(900)).await;
    let mut socket = connect(&sim).await;
    socket.send(Message::Text("{{{ not json".into())).await.unwrap();
    let reply = next_json(&mut socket).await;
    assert_eq!(reply["success"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("EGeneral:Invalid arguments")
    );
    socket.send(Message::Binary(vec![0xff, 0x00].into())).await.unwrap();
    assert_eq!(next_json(&mut socket).await["success"], false);
    send(&mut socket, json!({"method":"ping","req_id":101})).await;
    let pong = next_json(&mut socket).await;
    assert_eq!(pong["method"], "pong");
    assert_eq!(pong["req_id"], 101);
}

#[tokio::test]
async fn heartbeats_come_only_when_no_other_message_does() {
    // Kraken sends a heartbeat when nothing else was sent for a while (a
    // second by default; 3 s here, for a wide margin on a loaded machine):
    // pings answered every 200 ms for 4 s keep them away; once the pings
    // stop, one follows.
    let key = SimKey::generate();
    let sim = common::start_sim(kraken_token_broker::sim::SimConfig {
        keys: vec![key.clone()],
        heartbeat_interval: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let token = mint(&sim, &key).await;
    let mut socket = connect(&sim).await;
    send(
        &mut socket,
        json!({"method":"subscribe","params":{"channel":"executions","token":token},"req_id":1}),
    )
    .await;
    assert_eq!(next_json(&mut socket).await["success"], true);
    assert_eq!(next_json(&mut socket).await["type"], "snapshot");
    for n in 0..20 {
        send(&mut socket, json!({"method":"ping","req_id":n})).await;
        let reply = next_json(&mut socket).await;
        assert_eq!(reply["method"], "pong", "ping {n}: no heartbeat between: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(next_json(&mut socket).await, json!({"channel": "heartbeat"}));
}
