//! What the relay costs: an `add_order` round trip through `GET /v1/relay`
//! against the same round trip straight to the simulator, in one run, on
//! the same cores (the simulator and the broker each on a one-thread
//! runtime, the engine on this thread), then how many messages a second
//! one relay connection carries with requests pipelined.
//!
//! `cargo bench --bench relay` (pin it with `taskset -c 0,1`);
//! `RELAY_BENCH_ROUNDS` sets the paced round trips per path (default
//! 20,000, at 1,000 a second each). Prints a JSON summary, and writes it
//! to `bench/results-relay.json` when `RELAY_BENCH_WRITE=1`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kraken_token_broker::broker::{self, Listeners, Options};
use kraken_token_broker::config::Config;
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::sim::{self, SimConfig, SimKey};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn one_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn order(req_id: u64, token: Option<&str>) -> Message {
    let mut params = json!({"order_type": "limit", "side": "buy", "order_qty": 0.0001,
        "limit_price": 1000.0, "symbol": "BTC/USD", "post_only": true});
    if let Some(token) = token {
        params["token"] = json!(token);
    }
    Message::Text(
        json!({"method": "add_order", "params": params, "req_id": req_id})
            .to_string()
            .into(),
    )
}

/// Reads until the answer to `req_id`.
async fn answer(socket: &mut Socket, req_id: u64) {
    while let Some(Ok(frame)) = socket.next().await {
        if let Message::Text(text) = frame {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            if v["req_id"] == req_id {
                assert_eq!(v["success"], true, "{v}");
                return;
            }
        }
    }
    panic!("the connection ended before the answer to {req_id}");
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn summary(mut nanos: Vec<u64>) -> Value {
    nanos.sort_unstable();
    json!({"p50_us": percentile(&nanos, 0.50), "p90_us": percentile(&nanos, 0.90),
        "p99_us": percentile(&nanos, 0.99), "p999_us": percentile(&nanos, 0.999), "n": nanos.len()})
}

/// Messages a second one connection carries, `window` requests in flight.
async fn throughput(socket: Socket, token: Option<String>, for_: Duration, window: u64) -> f64 {
    let (mut tx, mut rx) = socket.split();
    let started = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    while started.elapsed() < for_ {
        while sent - answered < window {
            sent += 1;
            tx.feed(order(1_000_000 + sent, token.as_deref())).await.expect("send");
        }
        tx.flush().await.expect("flush");
        match rx.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"add_order\"") => answered += 1,
            Some(Ok(_)) => {}
            _ => panic!("the connection ended"),
        }
    }
    answered as f64 / started.elapsed().as_secs_f64()
}

/// A bare WebSocket hop (no auth, no parsing, no token): the floor any
/// relay pays on this machine, to tell the hop's cost from the broker's work.
async fn bare_hop(upstream: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(client) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let Ok((kraken, _)) = tokio_tungstenite::connect_async_with_config(upstream, None, true).await else {
                    return;
                };
                let (mut client_tx, mut client_rx) = client.split();
                let (mut kraken_tx, mut kraken_rx) = kraken.split();
                loop {
                    tokio::select! {
                        Some(Ok(m)) = client_rx.next() => if kraken_tx.send(m).await.is_err() { return },
                        Some(Ok(m)) = kraken_rx.next() => if client_tx.send(m).await.is_err() { return },
                        else => return,
                    }
                }
            });
        }
    });
    addr
}

fn main() {
    let rounds: u64 = std::env::var("RELAY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let key = SimKey::generate();
    let sim_rt = one_thread();
    let sim = sim_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = SimConfig {
            keys: vec![key.clone()],
            ..SimConfig::default()
        };
        sim::start(config, listener, CancellationToken::new()).expect("the simulator starts")
    });
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("api-key"), &key.api_key).expect("write");
    std::fs::write(dir.path().join("api-secret"), &key.api_secret).expect("write");
    let (credential, hash) = new_credential();
    let text = format!(
        "[listen]\napi = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[kraken]\nrest_url = \"{}\"\nws_url = \"{}\"\n\n\
         [[account]]\nname = \"main\"\napi_key = {{ file = \"{d}/api-key\" }}\napi_secret = {{ file = \"{d}/api-secret\" }}\n\n\
         [[consumer]]\nname = \"bench\"\ncredential_sha256 = \"{}\"\naccounts = [\"main\"]\n\
         rate_limit = {{ per_second = 100000, burst = 100000 }}\n",
        sim.rest_url(),
        sim.ws_url(),
        hex::encode(hash),
        d = dir.path().display()
    );
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, text).expect("write");
    let config = Config::load(&path).expect("a valid config");
    let broker_rt = one_thread();
    let shutdown = CancellationToken::new();
    let api = broker_rt.block_on(async {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = api.local_addr().expect("addr");
        tokio::spawn(broker::run(
            config,
            Listeners { api, admin },
            None,
            shutdown.clone(),
            Options::default(),
        ));
        addr
    });
    let hop_rt = one_thread();
    let hop = hop_rt.block_on(bare_hop(sim.ws_url()));

    let engine = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let results = engine.block_on(async {
        let http = reqwest::Client::new();
        let token: Value = http
            .get(format!("http://{api}/v1/token"))
            .bearer_auth(credential.expose())
            .send()
            .await
            .expect("the broker answers")
            .json()
            .await
            .expect("JSON");
        let token = token["token"].as_str().expect("a token").to_owned();
        let (mut direct, _) = tokio_tungstenite::connect_async(sim.ws_url())
            .await
            .expect("the simulator");
        let relay_request = || {
            let mut request = format!("ws://{api}/v1/relay").into_client_request().expect("a URL");
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {}", credential.expose()).parse().expect("a header"),
            );
            request
        };
        let (mut relay, _) = tokio_tungstenite::connect_async(relay_request())
            .await
            .expect("the relay");
        let (mut bare, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{hop}/v2"), None, true)
            .await
            .expect("the bare hop");
        // Warm every path (the first private request binds the token).
        for i in 0..200 {
            direct.send(order(i, Some(&token))).await.expect("send");
            answer(&mut direct, i).await;
            bare.send(order(i, Some(&token))).await.expect("send");
            answer(&mut bare, i).await;
            relay.send(order(i, None)).await.expect("send");
            answer(&mut relay, i).await;
        }
        let (mut via_direct, mut via_relay, mut via_bare) = (Vec::new(), Vec::new(), Vec::new());
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..rounds {
            tick.tick().await;
            let id = 10_000 + i;
            // Rotate which goes first, so none always runs on a cold cache.
            for k in 0..3 {
                let started = Instant::now();
                match (i + k) % 3 {
                    0 => {
                        relay.send(order(id, None)).await.expect("send");
                        answer(&mut relay, id).await;
                        via_relay.push(started.elapsed().as_nanos() as u64);
                    }
                    1 => {
                        direct.send(order(id, Some(&token))).await.expect("send");
                        answer(&mut direct, id).await;
                        via_direct.push(started.elapsed().as_nanos() as u64);
                    }
                    _ => {
                        bare.send(order(id, Some(&token))).await.expect("send");
                        answer(&mut bare, id).await;
                        via_bare.push(started.elapsed().as_nanos() as u64);
                    }
                }
            }
        }
        let direct_summary = summary(via_direct);
        let relay_summary = summary(via_relay);
        let bare_summary = summary(via_bare);
        let diff = |a: &Value, b: &Value, p: &str| a[p].as_f64().unwrap_or(0.0) - b[p].as_f64().unwrap_or(0.0);
        let added = json!({"p50_us": diff(&relay_summary, &direct_summary, "p50_us"),
            "p99_us": diff(&relay_summary, &direct_summary, "p99_us"),
            "p999_us": diff(&relay_summary, &direct_summary, "p999_us")});
        let over_bare = json!({"p50_us": diff(&relay_summary, &bare_summary, "p50_us"),
            "p99_us": diff(&relay_summary, &bare_summary, "p99_us")});
        let window = 64;
        let direct_rate = throughput(direct, Some(token.clone()), Duration::from_secs(3), window).await;
        let relay_rate = throughput(relay, None, Duration::from_secs(3), window).await;
        json!({
            "round_trip": {"rate_per_path_per_s": 1000, "direct": direct_summary, "relay": relay_summary,
                "bare_hop": bare_summary, "added_by_relay": added, "relay_over_bare_hop": over_bare},
            "throughput_msgs_per_s": {"window": window, "direct": direct_rate.round(), "relay": relay_rate.round()},
        })
    });
    shutdown.cancel();
    let text = serde_json::to_string_pretty(&results).expect("JSON");
    println!("{text}");
    if std::env::var("RELAY_BENCH_WRITE").as_deref() == Ok("1") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/results-relay.json");
        std::fs::write(path, format!("{text}\n")).expect("write the results");
        eprintln!("written to {path}");
    }
}
