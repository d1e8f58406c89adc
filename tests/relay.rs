//! The relay (`GET /v1/relay`): engines trade through the broker and never
//! hold a token. Against the simulator, and against a second, independent
//! WebSocket server (`common::kraken_ws`) that records what reaches "Kraken".

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use common::broker::Broker;
use common::kraken_ws::FakeKraken;
use common::process::{Served, config_tables, write, write_key};
use common::sim::sim_with_key;
use common::{rss_kib, wait_for};
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::sim::{SimHandle, SimKey};

/// How long any single answer may take here.
const ANSWER: Duration = Duration::from_secs(5);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A consumer's end of a relay connection, keeping every frame it received.
struct Engine {
    socket: Socket,
    received: Vec<String>,
}

impl Engine {
    async fn connect(api: &str, credential: &str, query: &str) -> Engine {
        match Engine::try_connect(api, credential, query).await {
            Ok(engine) => engine,
            Err(status) => panic!("relay refused: {status}"),
        }
    }

    /// The connection, or the HTTP status that refused it.
    async fn try_connect(api: &str, credential: &str, query: &str) -> Result<Engine, u16> {
        let url = format!("{}/v1/relay{query}", api.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {credential}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Engine {
                socket,
                received: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(other) => panic!("relay connection failed: {other}"),
        }
    }

    async fn send(&mut self, request: Value) {
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
    }

    /// The next message; `None` when the connection closed or nothing came.
    async fn next(&mut self, deadline: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(deadline, self.socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    self.received.push(text.to_string());
                    return Some(serde_json::from_str(&text).unwrap());
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The answer carrying `req_id` (other messages are kept, not returned).
    async fn answer(&mut self, req_id: Value) -> Value {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self
                .next(left)
                .await
                .unwrap_or_else(|| panic!("no answer to req_id {req_id}; got {:?}", self.received));
            if message.get("req_id") == Some(&req_id) {
                return message;
            }
        }
    }

    /// Every answer carrying `req_id` that comes within `window`.
    async fn answers_within(&mut self, req_id: Value, window: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + window;
        let mut answers = Vec::new();
        while let Some(message) = self
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            if message.get("req_id") == Some(&req_id) {
                answers.push(message);
            }
        }
        answers
    }

    /// The close code and reason the broker sent, within `deadline`.
    async fn closed(&mut self, deadline: Duration) -> Option<(u16, String)> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Some((u16::from(frame.code), frame.reason.to_string()));
                }
                Ok(Some(Ok(Message::Close(None)))) => return Some((1005, String::new())),
                Ok(Some(Ok(Message::Text(text)))) => self.received.push(text.to_string()),
                Ok(Some(Ok(_))) => {}
                Ok(None) | Ok(Some(Err(_))) => return Some((1006, String::new())),
                Err(_) => return None,
            }
        }
    }
}

/// A broker from a config file: `main` on `sim`'s key, its WebSocket at
/// `ws_url`, and the consumer `engine` with `consumer` lines added.
async fn broker_with(sim: &SimHandle, key: &SimKey, ws_url: &str, consumer: &str, extra: &str) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), key);
    let (credential, hash) = new_credential();
    let text = format!(
        "{}{extra}\n[[consumer]]\nname = \"engine\"\ncredential_sha256 = \"{}\"\naccounts = [\"main\"]\nrate_limit = {{ per_second = 10000, burst = 100000 }}\n{consumer}\n",
        config_tables(sim, dir.path(), "", ""),
        hex::encode(hash)
    )
    .replace(&format!("ws_url = \"{}\"", sim.ws_url()), &format!("ws_url = \"{ws_url}\""));
    let path = write(dir.path(), "broker.toml", &text);
    Broker::from_config(path, dir, credential.expose()).await
}

/// Every token the simulator minted.
fn minted(sim: &SimHandle) -> Vec<String> {
    sim.state().tokens().into_iter().map(|t| t.token).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_subscribes_and_trades_through_the_relay_and_never_sees_a_token() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let trail = tempfile::tempdir().unwrap();
    let audit_file = trail.path().join("audit.jsonl");
    write(trail.path(), "fingerprint-key", "a-long-random-audit-fingerprint-key\n");
    let audit = format!(
        "\n[audit]\nto = \"{}\"\nfingerprint_key = {{ file = \"{}/fingerprint-key\" }}\n",
        audit_file.display(),
        trail.path().display()
    );
    let broker = broker_with(&sim, &key, &sim.ws_url(), "", &audit).await;
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    assert_eq!(broker.metric("relay_connections{account=\"main\"}"), 1.0);

    engine
        .send(json!({"method": "subscribe", "params": {"channel": "executions", "snap_orders": true}, "req_id": 1}))
        .await;
    let ack = engine.answer(json!(1)).await;
    assert_eq!(ack["success"], true, "{ack}");
    engine
        .send(json!({"method": "subscribe", "params": {"channel": "balances"}, "req_id": 2}))
        .await;
    assert_eq!(engine.answer(json!(2)).await["success"], true);
    // A token the engine sends itself is overwritten, never used.
    engine
        .send(
            json!({"method": "add_order", "req_id": 3, "params": {"order_type": "limit", "side": "buy",
            "order_qty": 0.01, "limit_price": 1000.0, "symbol": "BTC/USD", "cl_ord_id": "engine-1",
            "token": "not-a-token-of-this-account"}}),
        )
        .await;
    let placed = engine.answer(json!(3)).await;
    assert_eq!(placed["success"], true, "{placed}");
    let order_id = placed["result"]["order_id"].as_str().unwrap().to_owned();
    engine
        .send(json!({"method": "cancel_order", "req_id": 4, "params": {"order_id": [order_id]}}))
        .await;
    assert_eq!(engine.answer(json!(4)).await["success"], true);
    engine.send(json!({"method": "ping", "req_id": 5})).await;
    assert_eq!(engine.answer(json!(5)).await["method"], "pong");
    // The executions channel reports the order's life.
    wait_for("the order's executions", ANSWER, || {
        let seen = engine
            .received
            .iter()
            .any(|f| f.contains("\"executions\"") && f.contains(&order_id));
        async move { seen.then_some(()) }
    })
    .await;

    let tokens = minted(&sim);
    assert!(!tokens.is_empty());
    for frame in &engine.received {
        for token in &tokens {
            assert!(!frame.contains(token.as_str()), "a token reached the engine: {frame}");
        }
    }
    assert_eq!(
        broker.metric("tokens_served_total{account=\"main\",consumer=\"engine\"}"),
        0.0
    );
    assert!(broker.metric("relay_messages_total{direction=\"to_kraken\"}") >= 5.0);
    assert!(broker.metric("relay_messages_total{direction=\"to_consumer\"}") >= 6.0);

    drop(engine);
    wait_for("the relay gauge to fall", ANSWER, || {
        let open = broker.metric("relay_connections{account=\"main\"}");
        async move { (open == 0.0).then_some(()) }
    })
    .await;
    broker.stop().await.unwrap();

    // Each order request is audited with its answer, naming the engine;
    // no token anywhere in the trail.
    let trail_text = std::fs::read_to_string(&audit_file).unwrap();
    for token in &tokens {
        assert!(!trail_text.contains(token.as_str()));
    }
    let orders: Vec<Value> = trail_text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["event"] == "relay.order")
        .collect();
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert_eq!(orders[0]["method"], "add_order");
    assert_eq!(orders[0]["consumer"], "engine");
    assert_eq!(orders[0]["symbol"], "BTC/USD");
    assert_eq!(orders[0]["side"], "buy");
    assert_eq!(orders[0]["cl_ord_id"], "engine-1");
    assert_eq!(orders[0]["order_id"], order_id.as_str());
    assert_eq!(orders[0]["outcome"], "answered");
    assert_eq!(orders[0]["success"], true);
    assert_eq!(orders[1]["method"], "cancel_order");
    assert_eq!(orders[1]["req_id"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_consumer_is_refused_by_the_broker_and_the_request_never_reaches_kraken() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let kraken = FakeKraken::start().await;
    let read_only = r#"relay = { allow = ["subscribe:executions", "subscribe:balances", "unsubscribe"] }"#;
    let broker = broker_with(&sim, &key, &kraken.url, read_only, "").await;
    let mut engine = Engine::connect(&broker.api, &broker.credential, "?account=main").await;

    engine
        .send(json!({"method": "add_order", "req_id": 7, "params": {"symbol": "BTC/USD", "side": "buy"}}))
        .await;
    let refused = engine.answer(json!(7)).await;
    assert_eq!(refused["method"], "add_order");
    assert_eq!(refused["success"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .starts_with("EGeneral:Permission denied"),
        "{refused}"
    );
    // A subscription outside the list is refused the same way.
    engine
        .send(json!({"method": "subscribe", "req_id": 8, "params": {"channel": "level3", "symbol": ["BTC/USD"]}}))
        .await;
    assert_eq!(engine.answer(json!(8)).await["success"], false);
    // What is allowed goes through, with the broker's token in it.
    engine
        .send(json!({"method": "subscribe", "req_id": 9, "params": {"channel": "executions", "token": "mine"}}))
        .await;
    assert_eq!(engine.answer(json!(9)).await["success"], true);

    let frames = kraken.all_frames();
    assert!(
        frames.iter().all(|f| f["method"] != "add_order" && f["req_id"] != 8),
        "a refused request reached Kraken: {frames:?}"
    );
    let subscribe = frames.iter().find(|f| f["req_id"] == 9).unwrap();
    let token = subscribe["params"]["token"].as_str().unwrap();
    assert!(
        minted(&sim).iter().any(|t| t == token),
        "the broker's token, not the engine's"
    );
    assert_eq!(
        broker.metric("relay_refused_total{consumer=\"engine\",reason=\"not_allowed\"}"),
        2.0
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_consumer_gets_403_for_tokens_and_its_relays_are_bounded() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let kraken = FakeKraken::start().await;
    let broker = broker_with(
        &sim,
        &key,
        &kraken.url,
        "relay_only = true\nrelay = { max_connections = 2 }",
        "",
    )
    .await;
    let (status, _, body) = broker.get_token("").await;
    assert_eq!(status, 403);
    assert!(body["detail"].as_str().unwrap().contains("relay_only"), "{body}");
    let watch = broker
        .http
        .get(format!("{}/v1/token/watch", broker.api))
        .bearer_auth(&broker.credential)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 403);
    let invalidate = broker
        .http
        .post(format!("{}/v1/token/invalidate", broker.api))
        .bearer_auth(&broker.credential)
        .header("content-type", "application/json")
        .body(r#"{"token":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(invalidate.status(), 403, "invalidate answers with a token: refused too");
    assert_eq!(
        broker.metric("relay_refused_total{consumer=\"engine\",reason=\"relay_only\"}"),
        3.0
    );

    let mut first = Engine::connect(&broker.api, &broker.credential, "").await;
    let _second = Engine::connect(&broker.api, &broker.credential, "").await;
    assert_eq!(
        Engine::try_connect(&broker.api, &broker.credential, "").await.err(),
        Some(429)
    );
    assert_eq!(
        Engine::try_connect(&broker.api, "not-the-credential", "").await.err(),
        Some(401)
    );
    first.send(json!({"method": "ping", "req_id": 1})).await;
    assert_eq!(first.answer(json!(1)).await["method"], "pong");
    drop(first);
    wait_for("a freed relay slot", ANSWER, || async {
        Engine::try_connect(&broker.api, &broker.credential, "").await.ok()
    })
    .await;
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_method_in_use_ends_the_relay_within_a_second_and_kraken_sees_the_close() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let kraken = FakeKraken::start().await;
    let trading = r#"relay = { allow = ["subscribe:executions", "add_order", "cancel_order"] }"#;
    let broker = broker_with(&sim, &key, &kraken.url, trading, "").await;
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    engine
        .send(json!({"method": "add_order", "req_id": 1, "params": {"symbol": "BTC/USD"}}))
        .await;
    assert_eq!(engine.answer(json!(1)).await["success"], true);

    let path = broker.dir.as_ref().unwrap().path().join("broker.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // A reload that leaves what it uses keeps the relay.
    std::fs::write(&path, text.replace("\"cancel_order\"", "\"cancel_all\"")).unwrap();
    broker.reload().await;
    assert_eq!(engine.closed(Duration::from_millis(500)).await, None, "kept");

    std::fs::write(&path, text.replace("\"add_order\", ", "")).unwrap();
    let started = std::time::Instant::now();
    broker.reload().await;
    let (code, reason) = engine
        .closed(Duration::from_secs(1))
        .await
        .expect("closed within a second");
    assert_eq!(code, 1008);
    assert!(reason.contains("add_order"), "{reason}");
    wait_for("Kraken to see the close", Duration::from_secs(1), || {
        let closed = kraken.closed();
        async move { (closed == 1).then_some(()) }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(
        broker.metric("relay_refused_total{consumer=\"engine\",reason=\"revoked\"}"),
        1.0
    );

    // Removing the consumer's credential ends its relays too.
    std::fs::write(&path, &text).unwrap();
    broker.reload().await;
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    let (_, other) = new_credential();
    let current = text
        .lines()
        .find_map(|l| l.strip_prefix("credential_sha256 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    std::fs::write(&path, text.replace(&current, &hex::encode(other))).unwrap();
    broker.reload().await;
    let (code, _) = engine
        .closed(Duration::from_secs(1))
        .await
        .expect("closed within a second");
    assert_eq!(code, 1008);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_mid_session_is_replaced_and_the_request_answered_once() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = broker_with(&sim, &key, &sim.ws_url(), "", "").await;
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    engine
        .send(json!({"method": "subscribe", "req_id": 1, "params": {"channel": "executions"}}))
        .await;
    assert_eq!(engine.answer(json!(1)).await["success"], true);
    assert_eq!(minted(&sim).len(), 1);

    assert_eq!(sim.state().revoke_tokens(None), 1);
    engine
        .send(
            json!({"method": "add_order", "req_id": 42, "params": {"order_type": "limit", "side": "sell",
            "order_qty": 1.0, "limit_price": 100000.0, "symbol": "BTC/USD"}}),
        )
        .await;
    let answers = engine.answers_within(json!(42), Duration::from_secs(3)).await;
    assert_eq!(answers.len(), 1, "one answer: {answers:?}");
    assert_eq!(answers[0]["success"], true, "{}", answers[0]);
    assert_eq!(minted(&sim).len(), 2, "one new token");
    assert_eq!(broker.metric("relay_resent_total{account=\"main\"}"), 1.0);
    for frame in &engine.received {
        for token in minted(&sim) {
            assert!(!frame.contains(token.as_str()));
        }
    }
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_a_slow_reader_a_large_frame_krakens_close_and_shutdown() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let kraken = FakeKraken::start().await;
    let broker = broker_with(&sim, &key, &kraken.url, "", "").await;

    // A consumer that does not read is closed once its queue is full.
    let mut slow = Engine::connect(&broker.api, &broker.credential, "").await;
    slow.send(json!({"method": "ping", "req_id": "flood"})).await;
    wait_for("the slow reader to be closed", Duration::from_secs(20), || {
        let n = broker.metric("relay_refused_total{consumer=\"engine\",reason=\"slow_reader\"}");
        async move { (n == 1.0).then_some(()) }
    })
    .await;
    wait_for("Kraken to see the close", ANSWER, || {
        let closed = kraken.closed();
        async move { (closed >= 1).then_some(()) }
    })
    .await;

    // A frame over 64 KiB closes with 1009.
    let mut large = Engine::connect(&broker.api, &broker.credential, "").await;
    let padding = "x".repeat(70 * 1024);
    large.send(json!({"method": "ping", "req_id": padding})).await;
    assert_eq!(large.closed(ANSWER).await.map(|c| c.0), Some(1009));

    // Kraken's own close code reaches the consumer.
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    engine.send(json!({"method": "ping", "req_id": "close"})).await;
    assert_eq!(engine.closed(ANSWER).await, Some((1013, "try again later".to_owned())));

    // Malformed frames are answered by the broker.
    let mut engine = Engine::connect(&broker.api, &broker.credential, "").await;
    engine.socket.send(Message::Text("not json".into())).await.unwrap();
    let status = engine.next(ANSWER).await.unwrap();
    assert_eq!(status["channel"], "status", "Kraken's greeting comes first: {status}");
    let answer = engine.next(ANSWER).await.unwrap();
    assert_eq!(answer["error"], "EGeneral:Invalid arguments");
    assert_eq!(answer["success"], false);

    // Shutdown closes relays with 1001.
    let stopping = tokio::spawn(async move { broker.stop().await });
    assert_eq!(engine.closed(Duration::from_secs(10)).await.map(|c| c.0), Some(1001));
    stopping.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_relays_fit_in_the_charts_memory_limit() {
    const RELAYS: usize = 200;
    /// The chart's `resources.limits.memory`.
    const CHART_LIMIT_KIB: u64 = 128 * 1024;
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let (credential, hash) = new_credential();
    let fleet = format!(
        "\n[[consumer]]\nname = \"fleet\"\ncredential_sha256 = \"{}\"\naccounts = [\"main\"]\n\
         rate_limit = {{ per_second = 10000, burst = 100000 }}\nrelay = {{ max_connections = {RELAYS} }}\n",
        hex::encode(hash)
    );
    let served = Served::start_with(&sim, &key, "", &fleet, &[]).await;
    let pid: u32 = served.pid().parse().unwrap();
    // One relay first, so what the first connection sets up (TLS config,
    // buffers, the token) is in the baseline.
    let mut first = Engine::connect(&served.api, credential.expose(), "").await;
    first
        .send(json!({"method": "subscribe", "params": {"channel": "executions"}, "req_id": 0}))
        .await;
    assert_eq!(first.answer(json!(0)).await["success"], true);
    let before = rss_kib(pid);
    let mut engines = Vec::new();
    for i in 1..RELAYS {
        let mut engine = Engine::connect(&served.api, credential.expose(), "").await;
        engine
            .send(json!({"method": "subscribe", "params": {"channel": "executions"}, "req_id": i}))
            .await;
        engines.push(engine);
    }
    for (i, engine) in engines.iter_mut().enumerate() {
        assert_eq!(engine.answer(json!(i + 1)).await["success"], true);
    }
    let after = rss_kib(pid);
    let metrics = served.admin_text("/metrics").await;
    assert_eq!(
        common::metric_value(&metrics, "relay_connections{account=\"main\"}"),
        RELAYS as f64
    );
    let per_connection = after.saturating_sub(before) as f64 / (RELAYS - 1) as f64;
    println!(
        "RSS with 1 relay: {before} KiB; with {RELAYS}: {after} KiB; {per_connection:.1} KiB per relay connection"
    );
    assert!(after < CHART_LIMIT_KIB, "{after} KiB with {RELAYS} relays");
    // Each relay holds both ends of its connection and nothing more.
    assert_eq!(
        Engine::try_connect(&served.api, credential.expose(), "").await.err(),
        Some(429)
    );
}
