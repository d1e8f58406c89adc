//! `GET /v1/token/watch`: 200 watchers through an invalidation and a
//! refresh, a watcher that never reads, `unavailable` through an outage, a
//! reload that revokes the consumer, shutdown, the per-consumer bound.

mod common;

use std::time::Duration;

use common::sse::SseReader;
use common::{Broker, policy, sim_with_key, wait_for};
use kraken_token_broker::http::watch::MAX_WATCHERS_PER_CONSUMER;
use kraken_token_broker::sim::FaultSpec;

const EVENT: Duration = Duration::from_secs(10);

fn watch_url(broker: &Broker) -> String {
    format!("{}/v1/token/watch", broker.api)
}

async fn invalidate(broker: &Broker, token: &str) -> String {
    let r = broker
        .http
        .post(format!("{}/v1/token/invalidate", broker.api))
        .bearer_auth(&broker.credential)
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A broker whose config has `n` more consumers `engine-0`.. beside
/// `engine`, all granted `main`; their credentials.
async fn with_consumers(
    sim: &kraken_token_broker::sim::SimHandle,
    key: &kraken_token_broker::sim::SimKey,
    n: usize,
) -> (Broker, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::write(d, "api-key", &format!("{}\n", key.api_key));
    common::write(d, "api-secret", &format!("{}\n", key.api_secret));
    let (credential, hash) = kraken_token_broker::identity::credential::new_credential();
    let mut text = common::process::config_text(sim, d, &hex::encode(hash), "", "");
    let mut credentials = Vec::new();
    for i in 0..n {
        let (c, h) = kraken_token_broker::identity::credential::new_credential();
        text.push_str(&format!(
            "\n[[consumer]]\nname = \"engine-{i}\"\ncredential_sha256 = \"{}\"\naccounts = [\"main\"]\n",
            hex::encode(h)
        ));
        credentials.push(c.expose().to_owned());
    }
    let path = common::write(d, "broker.toml", &text);
    (Broker::from_config(path, dir, credential.expose()).await, credentials)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_get_every_new_token() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    // 200 engines as four consumers of 50 (a consumer holds 64 at most).
    let (broker, credentials) = with_consumers(&sim, &key, 4).await;
    let (_, _, first) = broker.get_token("").await;
    let first = first["token"].as_str().unwrap().to_owned();
    let mut watchers = Vec::new();
    for credential in &credentials {
        let http = reqwest::Client::new();
        for _ in 0..50 {
            watchers.push(SseReader::open(&http, &watch_url(&broker), credential).await);
        }
    }
    for w in &mut watchers {
        let event = w.next(EVENT).await.expect("the current token at once");
        assert_eq!(event.token().as_deref(), Some(first.as_str()));
    }
    assert_eq!(broker.metric("watch_streams{account=\"main\"}"), 200.0);

    // Two invalidations: every watcher gets each new token, and nothing
    // else (no `unavailable` while the replacement is being minted).
    let started = std::time::Instant::now();
    let second = invalidate(&broker, &first).await;
    let mut slowest = Duration::ZERO;
    for w in &mut watchers {
        let event = w.next(EVENT).await.unwrap();
        assert_eq!(event.token().as_deref(), Some(second.as_str()));
        slowest = slowest.max(started.elapsed());
    }
    let third = invalidate(&broker, &second).await;
    assert_ne!(third, second);
    for w in &mut watchers {
        assert_eq!(w.next(EVENT).await.unwrap().token().as_deref(), Some(third.as_str()));
    }
    println!("200 watchers had the invalidation's new token within {slowest:?} of the report");
    assert_eq!(
        sim.state().token_calls().len(),
        3,
        "one Kraken call per token, however many watch"
    );
    // Each token handed to a watcher counts as served: 3 per watcher.
    for i in 0..4 {
        let series = format!("tokens_served_total{{account=\"main\",consumer=\"engine-{i}\"}}");
        assert_eq!(broker.metric(&series), 150.0);
    }
    drop(watchers);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_holds_nothing_back_and_is_let_go() {
    // Tokens of 3 s, refreshed 1.5 s ahead: a new one about every 1.5 s.
    let (sim, key) = sim_with_key(Duration::from_secs(3)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(1.5, 0.5, 0.0, (0.2, 1.0)))
        .start()
        .await;
    let stalled = {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(broker.api.trim_start_matches("http://"))
            .await
            .unwrap();
        let head = format!(
            "GET /v1/token/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            broker.credential
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s // never read
    };
    let http = reqwest::Client::new();
    let mut reader = SseReader::open(&http, &watch_url(&broker), &broker.credential).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = reader.next(EVENT).await.unwrap();
        seen.push(event.token().expect("a token event"));
    }
    seen.dedup();
    assert_eq!(
        seen.len(),
        4,
        "four distinct tokens, in order, beside a stalled watcher"
    );
    wait_for("both streams counted", Duration::from_secs(5), || async {
        (broker.metric("watch_streams{account=\"main\"}") == 2.0).then_some(())
    })
    .await;
    drop(stalled);
    wait_for("the stalled stream to be let go", EVENT, || async {
        (broker.metric("watch_streams{account=\"main\"}") == 1.0).then_some(())
    })
    .await;
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_a_token_is_unavailable_then_a_token_again() {
    let (sim, key) = sim_with_key(Duration::from_secs(3)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(1.5, 0.5, 0.0, (0.2, 0.5)))
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut reader = SseReader::open(&http, &watch_url(&broker), &broker.credential).await;
    let first = reader.next(EVENT).await.unwrap();
    assert!(first.token().is_some());
    sim.state().set_fault(FaultSpec {
        error: Some("EService:Unavailable".into()),
        ..FaultSpec::default()
    });
    // Refreshes fail; the held token passes min_served_ttl: `unavailable`.
    let down = loop {
        let event = reader.next(EVENT).await.unwrap();
        if event.event == "unavailable" {
            break event;
        }
    };
    let problem: serde_json::Value = serde_json::from_str(&down.data).unwrap();
    assert_eq!(problem["status"], 503);
    assert!(problem["detail"].as_str().unwrap().contains("`main`"), "{problem}");
    sim.state().clear_fault();
    let back = reader.next(EVENT).await.unwrap();
    let token = back.token().expect("a token once Kraken answers again");
    assert!(sim.state().token_is_valid(&token));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_revokes_the_consumer_ends_its_streams_and_shutdown_ends_the_rest() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::from_files(&sim, &key, "", "2s", "").await;
    let http = reqwest::Client::new();
    let mut reader = SseReader::open(&http, &watch_url(&broker), &broker.credential).await;
    assert!(reader.next(EVENT).await.unwrap().token().is_some());

    // A reload that keeps the consumer keeps the stream.
    let path = broker.dir.as_ref().unwrap().path().join("broker.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n# a comment\n")).unwrap();
    broker.reload().await;
    assert!(
        !reader.ended(Duration::from_millis(500)).await,
        "a reload that keeps the consumer"
    );

    // The consumer's credential is replaced: its open streams end.
    let (_, other_hash) = kraken_token_broker::identity::credential::new_credential();
    let current = text
        .lines()
        .find_map(|l| l.strip_prefix("credential_sha256 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    std::fs::write(&path, text.replace(&current, &hex::encode(other_hash))).unwrap();
    broker.reload().await;
    assert!(reader.ended(EVENT).await, "the revoked consumer's stream ends");
    assert_eq!(broker.get_token("").await.0, 401);

    // Shutdown ends open streams at once rather than waiting out the drain.
    std::fs::write(&path, &text).unwrap();
    broker.reload().await;
    let mut reader = SseReader::open(&http, &watch_url(&broker), &broker.credential).await;
    assert!(reader.next(EVENT).await.unwrap().token().is_some());
    let started = std::time::Instant::now();
    broker.stop().await.unwrap();
    assert!(reader.ended(EVENT).await);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_has_a_bounded_number_of_streams() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let broker = Broker::on(&sim)
        .key(&key)
        .policy(policy(450.0, 60.0, 30.0, (1.0, 60.0)))
        .start()
        .await;
    let http = reqwest::Client::new();
    let mut open = Vec::new();
    for _ in 0..MAX_WATCHERS_PER_CONSUMER {
        open.push(SseReader::open(&http, &watch_url(&broker), &broker.credential).await);
    }
    let another = || http.get(watch_url(&broker)).bearer_auth(&broker.credential).send();
    let r = another().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("watch streams"), "{body}");
    // One closed makes room.
    drop(open.pop());
    wait_for("room for one more stream", EVENT, || async {
        (another().await.unwrap().status() == 200).then_some(())
    })
    .await;
    // Unauthenticated: 401, no stream.
    let r = http.get(watch_url(&broker)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    broker.stop().await.unwrap();
}
