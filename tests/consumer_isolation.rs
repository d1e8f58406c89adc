//! No consumer can starve another: one in a loop of fetch-and-report beside
//! a quiet one, one over its request-rate limit, one failing to
//! authenticate from the same address as a good one.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Broker, config_tables, sim_with_key, write, write_key};
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::sim::SimHandle;
use kraken_token_broker::token::refresher::{ACCOUNT_FORCED_BURST, FORCED_REFRESH_BURST, FORCED_REFRESH_EVERY};

struct Two {
    broker: Broker,
    sim: SimHandle,
    loud: String,
    quiet: String,
}

/// Consumers `loud` (with `loud_limit`) and `quiet`, both on account `main`.
async fn two_consumers(loud_limit: &str) -> Two {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_key(d, &key);
    let (loud, loud_hash) = new_credential();
    let (quiet, quiet_hash) = new_credential();
    let text = format!(
        r#"{tables}
[[consumer]]
name = "loud"
credential_sha256 = "{loud_hash}"
accounts = ["main"]
{loud_limit}

[[consumer]]
name = "quiet"
credential_sha256 = "{quiet_hash}"
accounts = ["main"]
"#,
        tables = config_tables(&sim, d, "", ""),
        loud_hash = hex::encode(loud_hash),
        quiet_hash = hex::encode(quiet_hash),
    );
    let path = write(d, "broker.toml", &text);
    let broker = Broker::from_config(path, dir, quiet.expose()).await;
    Two {
        broker,
        sim,
        loud: loud.expose().to_owned(),
        quiet: quiet.expose().to_owned(),
    }
}

async fn get(http: &reqwest::Client, url: &str, credential: &str) -> (u16, bool, serde_json::Value) {
    let r = http.get(url).bearer_auth(credential).send().await.unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    (status, retry_after, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reporting_every_token_in_a_loop_never_starves_a_quiet_one() {
    let t = two_consumers("").await;
    let url = format!("{}/v1/token", t.broker.api);
    assert_eq!(get(&t.broker.http, &url, &t.quiet).await.0, 200);
    let stop = Arc::new(AtomicBool::new(false));
    // The loud consumer: fetch, report the token as rejected, every 50 ms.
    let loud = {
        let (http, url, credential, stop) = (t.broker.http.clone(), url.clone(), t.loud.clone(), stop.clone());
        let invalidate = format!("{}/v1/token/invalidate", t.broker.api);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let (status, _, body) = get(&http, &url, &credential).await;
                statuses.push(status);
                if let Some(token) = body["token"].as_str() {
                    let r = http
                        .post(&invalidate)
                        .bearer_auth(&credential)
                        .json(&serde_json::json!({ "token": token }))
                        .send()
                        .await
                        .unwrap();
                    statuses.push(r.status().as_u16());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            statuses
        })
    };
    let started = std::time::Instant::now();
    let mut quiet = Vec::new();
    while started.elapsed() < Duration::from_secs(6) {
        let (status, _, body) = get(&t.broker.http, &url, &t.quiet).await;
        assert_eq!(status, 200, "the quiet consumer is always served: {body}");
        assert!(t.sim.state().token_is_valid(body["token"].as_str().unwrap()));
        let (ready, readyz) = t.broker.admin_get("/readyz").await;
        assert_eq!(
            ready, 200,
            "one consumer's loop never makes the broker unready: {readyz}"
        );
        quiet.push(status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let loud = loud.await.unwrap();
    let elapsed = started.elapsed();
    let refused = loud.iter().filter(|s| **s == 429).count();
    let calls = t.sim.state().token_calls().len();
    // The cold start, then the loud consumer's share: a burst and one per
    // FORCED_REFRESH_EVERY (well under the account's own cap).
    let share =
        FORCED_REFRESH_BURST as usize + (elapsed.as_secs_f64() / FORCED_REFRESH_EVERY.as_secs_f64()).ceil() as usize;
    println!(
        "loud: {} requests, {refused} refused with 429; quiet: {} requests all 200; {calls} upstream calls in {elapsed:?}",
        loud.len(),
        quiet.len()
    );
    assert!(
        calls <= 1 + share,
        "{calls} upstream calls; the loud consumer's share is {share}"
    );
    assert!(
        share < ACCOUNT_FORCED_BURST as usize,
        "the account cap is not what held it"
    );
    assert!(refused > 10, "the loud consumer is told to slow down: {loud:?}");
    assert!(loud.iter().all(|s| [200, 429].contains(s)), "{loud:?}");
    t.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_over_its_rate_limit_gets_429_and_another_is_not_slowed() {
    let t = two_consumers("rate_limit = { per_second = 5, burst = 5 }").await;
    let url = format!("{}/v1/token", t.broker.api);
    let mut loud = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..40 {
        let (status, retry_after, body) = get(&t.broker.http, &url, &t.loud).await;
        if status == 429 {
            assert!(retry_after, "429 has Retry-After");
            assert!(body["detail"].as_str().unwrap().contains("rate limit"), "{body}");
            assert!(body.get("token").is_none());
        }
        loud.push(status);
        // The quiet consumer, in between: never limited by the other's.
        assert_eq!(get(&t.broker.http, &url, &t.quiet).await.0, 200);
    }
    let limited = loud.iter().filter(|s| **s == 429).count();
    // At most the burst and what refilled meanwhile was served.
    let allowed = 5 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        limited + allowed >= 40,
        "{limited} of 40 over a 5/s limit refused: {loud:?}"
    );
    assert!(limited > 0, "{loud:?}");
    assert!(limited <= 40 - 5, "the burst is served: {loud:?}");
    assert_eq!(t.broker.metric("rate_limited_total{consumer=\"loud\"}"), limited as f64);
    let metrics = t.broker.metrics.encode();
    assert!(
        !metrics.contains("rate_limited_total{consumer=\"quiet\"} 1"),
        "{metrics}"
    );
    t.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_from_an_address_never_refuse_a_good_consumer_there() {
    let t = two_consumers("").await;
    let url = format!("{}/v1/token", t.broker.api);
    let (wrong, _) = new_credential();
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(get(&t.broker.http, &url, wrong.expose()).await.0);
        assert_eq!(
            get(&t.broker.http, &url, &t.quiet).await.0,
            200,
            "the good consumer on 127.0.0.1 is served"
        );
    }
    assert!(answers.iter().all(|s| [401, 429].contains(s)), "{answers:?}");
    assert!(answers.contains(&429), "the guessing address is throttled: {answers:?}");
    t.broker.stop().await.unwrap();
}
