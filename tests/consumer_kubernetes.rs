//! Consumers proving who they are with a projected ServiceAccount token,
//! checked by a `TokenReview` against a fake API server over TLS: the
//! right ServiceAccount and audience are served, everything else is 401,
//! reviews are cached and coalesced, an API server outage is a 503 with
//! `Retry-After` (never a token), the broker's own token rotates, and a
//! flood of forged tokens makes a bounded number of reviews.

mod common;

use std::time::Duration;

use common::apiserver::{FakeApiServer, forged, forged_with};
use common::{Broker, config_tables, credential_consumer, sim_with_key, write, write_key};
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::identity::service_account::{REVIEW_BURST, REVIEWS_PER_SEC};
use kraken_token_broker::sim::SimHandle;

const AUDIENCE: &str = "kraken-token-broker";
const ENGINE: &str = "system:serviceaccount:trading:mm-engine";

struct Cluster {
    broker: Broker,
    api: FakeApiServer,
    sim: SimHandle,
    dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    cluster_with("30s").await
}

async fn cluster_with(cache_ttl: &str) -> Cluster {
    cluster_of(cache_ttl, true).await
}

/// A broker against a fake cluster; `keys`: whether the broker may read
/// the cluster's signing keys.
async fn cluster_of(cache_ttl: &str, keys: bool) -> Cluster {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let api = FakeApiServer::start("broker-sa-token-1").await;
    api.state
        .jwks_forbidden
        .store(!keys, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_key(d, &key);
    write(d, "ca.crt", &api.ca_pem);
    write(d, "token", "broker-sa-token-1\n");
    let (credential, hash) = new_credential();
    let text = format!(
        r#"{tables}
[kubernetes]
audience = "{AUDIENCE}"
api_url = "{api_url}"
ca = {{ file = "{d}/ca.crt" }}
token = {{ file = "{d}/token" }}
cache_ttl = "{cache_ttl}"

[[consumer]]
name = "mm-engine"
kubernetes = {{ namespace = "trading", service_account = "mm-engine" }}
accounts = ["main"]
rate_limit = {{ per_second = 10000, burst = 100000 }}
{engine}"#,
        tables = config_tables(&sim, d, "", ""),
        engine = credential_consumer("engine", &hex::encode(hash)),
        api_url = api.url,
        d = d.display(),
    );
    let path = write(d, "broker.toml", &text);
    let broker = Broker::from_config(path, tempfile::tempdir().unwrap(), credential.expose()).await;
    let c = Cluster { broker, api, sim, dir };
    c.signing_keys_are(if keys { "loaded" } else { "unreadable" }).await;
    c
}

impl Cluster {
    /// Waits until `/readyz` says the cluster's signing keys are in `state`.
    async fn signing_keys_are(&self, state: &str) {
        common::wait_for("the signing keys' state", Duration::from_secs(10), || async {
            let (_, body) = self.broker.admin_get("/readyz").await;
            let ready: serde_json::Value = serde_json::from_str(&body).ok()?;
            (ready["kubernetes"]["signing_keys"] == state).then_some(())
        })
        .await;
    }

    async fn fetch(&self, bearer: &str) -> (u16, Option<String>, serde_json::Value) {
        let r = self
            .broker
            .http
            .get(format!("{}/v1/token", self.broker.api))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (status, retry_after, r.json().await.unwrap_or_default())
    }
}

fn series(broker: &Broker, name: &str) -> f64 {
    let text = broker.metrics.encode();
    let wanted = format!("kraken_token_broker_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_service_account_is_served_and_reviews_are_cached_and_coalesced() {
    let c = cluster().await;
    let token = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&token, ENGINE, &[AUDIENCE]);
    let (status, _, body) = c.fetch(&token).await;
    assert_eq!(status, 200, "{body}");
    assert!(c.sim.state().token_is_valid(body["token"].as_str().unwrap()));
    assert_eq!(c.api.reviews(), 1);
    for _ in 0..10 {
        assert_eq!(c.fetch(&token).await.0, 200);
    }
    assert_eq!(c.api.reviews(), 1, "a reviewed token is trusted for cache_ttl");
    assert_eq!(
        c.broker
            .metric("tokens_served_total{account=\"main\",consumer=\"mm-engine\"}"),
        11.0
    );

    // A new pod's token, asked for by 50 requests at once: one review.
    let fresh = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&fresh, ENGINE, &[AUDIENCE]);
    let asks: Vec<_> = (0..50)
        .map(|_| {
            let (http, url, fresh) = (
                c.broker.http.clone(),
                format!("{}/v1/token", c.broker.api),
                fresh.clone(),
            );
            tokio::spawn(async move { http.get(url).bearer_auth(fresh).send().await.unwrap().status().as_u16() })
        })
        .collect();
    for ask in asks {
        assert_eq!(ask.await.unwrap(), 200);
    }
    assert_eq!(
        c.api.reviews(),
        2,
        "50 concurrent requests with one new token make one review"
    );
    assert_eq!(series(&c.broker, "token_reviews_total{result=\"authenticated\"}"), 2.0);
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_service_accounts_audiences_and_forgeries_are_refused() {
    let c = cluster().await;
    // Another ServiceAccount of the cluster, valid for the broker: no
    // consumer is mapped to it.
    let other = c.api.sign("system:serviceaccount:trading:reporting", &[AUDIENCE], 600);
    c.api
        .accept(&other, "system:serviceaccount:trading:reporting", &[AUDIENCE]);
    assert_eq!(c.fetch(&other).await.0, 401);
    // The engine's token for another audience (e.g. its default API token):
    // refused before any review, by its claims ...
    let for_api = c.api.sign(ENGINE, &["https://kubernetes.default.svc"], 600);
    c.api.accept(&for_api, ENGINE, &["https://kubernetes.default.svc"]);
    let reviews = c.api.reviews();
    assert_eq!(c.fetch(&for_api).await.0, 401);
    assert_eq!(c.api.reviews(), reviews, "a token for another audience makes no review");
    // ... and refused by the API server when its claims lie about it.
    let lying = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&lying, ENGINE, &["https://kubernetes.default.svc"]);
    assert_eq!(c.fetch(&lying).await.0, 401);
    // A forged token with the right claims: its signature is no key's of
    // the cluster, so it is refused without a review.
    let forged = forged(ENGINE, &[AUDIENCE], 600);
    let reviews = c.api.reviews();
    let (status, _, body) = c.fetch(&forged).await;
    assert_eq!(status, 401);
    assert!(body.get("token").is_none());
    assert_eq!(c.api.reviews(), reviews, "a forged token makes no review");
    // A deleted pod's token: signed by the cluster, refused by its review.
    let deleted = c.api.sign(ENGINE, &[AUDIENCE], 600);
    assert_eq!(c.fetch(&deleted).await.0, 401);
    assert_eq!(c.api.reviews(), reviews + 1);
    // An expired one: refused without a review.
    let expired = c.api.sign(ENGINE, &[AUDIENCE], -10);
    c.api.accept(&expired, ENGINE, &[AUDIENCE]);
    let reviews = c.api.reviews();
    assert_eq!(c.fetch(&expired).await.0, 401);
    assert_eq!(c.api.reviews(), reviews, "an expired token makes no review");
    assert!(series(&c.broker, "token_reviews_total{result=\"rejected\"}") >= 2.0);
    let logs_and_metrics = c.broker.metrics.encode();
    for t in [&other, &for_api, &lying, &forged] {
        assert!(!logs_and_metrics.contains(t.as_str()));
    }
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_is_a_503_with_retry_after_and_cached_reviews_keep_serving() {
    let c = cluster().await;
    let known = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&known, ENGINE, &[AUDIENCE]);
    assert_eq!(c.fetch(&known).await.0, 200);

    c.api.state.fail_500.store(true, std::sync::atomic::Ordering::SeqCst);
    let new = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&new, ENGINE, &[AUDIENCE]);
    let (status, retry_after, body) = c.fetch(&new).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "Retry-After on a 503");
    assert!(body.get("token").is_none());
    assert_eq!(c.fetch(&known).await.0, 200, "a cached review keeps serving");

    // Unreachable: the same.
    c.api.stop();
    let (status, retry_after, _) = c.fetch(&new).await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    assert_eq!(c.fetch(&known).await.0, 200);
    assert!(series(&c.broker, "token_reviews_total{result=\"error\"}") >= 2.0);
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_own_token_is_reread_when_the_kubelet_rotates_it() {
    let c = cluster().await;
    let first = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&first, ENGINE, &[AUDIENCE]);
    assert_eq!(c.fetch(&first).await.0, 200);
    // The kubelet writes a new token; the old one stops being accepted.
    write(c.dir.path(), "token", "broker-sa-token-2\n");
    *c.api.state.broker_token.lock().unwrap() = "broker-sa-token-2".into();
    let second = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&second, ENGINE, &[AUDIENCE]);
    assert_eq!(c.fetch(&second).await.0, 200, "re-read on a 401 and retried");
    assert_eq!(
        c.api.state.unauthorized.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one 401 with the old token"
    );
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tokens_makes_a_bounded_number_of_reviews() {
    let c = cluster().await;
    let known = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&known, ENGINE, &[AUDIENCE]);
    assert_eq!(c.fetch(&known).await.0, 200);
    let before = c.api.reviews();
    let started = std::time::Instant::now();
    let flood: Vec<_> = (0..400)
        .map(|_| {
            let (http, url) = (c.broker.http.clone(), format!("{}/v1/token", c.broker.api));
            tokio::spawn(async move {
                let forged = forged(ENGINE, &[AUDIENCE], 600);
                http.get(url)
                    .bearer_auth(forged)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    // While it runs, the engine with a reviewed token and a bearer consumer
    // are served.
    assert_eq!(c.fetch(&known).await.0, 200);
    assert_eq!(c.fetch(&c.broker.credential.clone()).await.0, 200);
    let mut statuses = std::collections::BTreeMap::new();
    for f in flood {
        *statuses.entry(f.await.unwrap()).or_insert(0) += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = c.api.reviews() - before;
    assert_eq!(
        reviews, 0,
        "forged tokens are refused by their signature, without a review"
    );
    let bound = (REVIEW_BURST + REVIEWS_PER_SEC * elapsed).ceil() as usize + 1;
    assert!(
        reviews <= bound,
        "{reviews} reviews for 400 forged tokens in {elapsed:.1}s (bound {bound}); statuses {statuses:?}"
    );
    assert!(
        statuses.keys().all(|s| [401, 429, 503].contains(s)),
        "forged tokens get 401, 429 or 503: {statuses:?}"
    );
    assert_eq!(c.fetch(&known).await.0, 200);

    // The flood's address (127.0.0.1) is throttled now; a new engine pod
    // there with a valid token is still served once a review can be had:
    // valid proof of identity is never refused for another client's failures.
    let new_pod = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&new_pod, ENGINE, &[AUDIENCE]);
    let statuses = std::sync::Mutex::new(Vec::new());
    common::wait_for("the new pod to be served", Duration::from_secs(10), || async {
        let status = c.fetch(&new_pod).await.0;
        statuses.lock().unwrap().push(status);
        (status == 200).then_some(())
    })
    .await;
    let seen = statuses.into_inner().unwrap();
    assert!(!seen.contains(&429), "never refused for the flood's failures: {seen:?}");

    // Forged tokens naming no consumer make no review at all.
    let before = c.api.reviews();
    for i in 0..50 {
        let stranger = c.api.sign(&format!("system:serviceaccount:x:s{i}"), &[AUDIENCE], 600);
        let status = c.fetch(&stranger).await.0;
        assert!([401, 429].contains(&status), "{status}");
    }
    assert_eq!(
        c.api.reviews(),
        before,
        "no review for a subject that names no consumer"
    );
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_opened_with_a_service_account_token_ends_when_its_review_does() {
    let c = cluster_with("1s").await;
    let token = c.api.sign(ENGINE, &[AUDIENCE], 600);
    c.api.accept(&token, ENGINE, &[AUDIENCE]);
    let url = format!("{}/v1/token/watch", c.broker.api);
    let mut stream = common::sse::SseReader::open(&c.broker.http, &url, &token).await;
    assert!(stream.next(Duration::from_secs(10)).await.unwrap().token().is_some());
    let opened = std::time::Instant::now();
    assert!(
        stream.ended(Duration::from_secs(10)).await,
        "the stream ends when the review expires"
    );
    assert!(opened.elapsed() < Duration::from_secs(5), "after cache_ttl, not later");
    // The pod is deleted meanwhile: its reconnect is refused.
    c.api.state.valid.lock().unwrap().clear();
    let r = c.broker.http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 401, "a deleted pod's token opens no stream");
    assert_eq!(c.api.reviews(), 2, "the reconnect was reviewed again");
    c.broker.stop().await.unwrap();
}

/// A client whose connections come from `source` (another loopback address).
fn client_from(source: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(source))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_with_absurd_expiries_panic_nothing_and_leave_no_connection_behind() {
    let c = cluster().await;
    let valid = c.api.issue(ENGINE, &[AUDIENCE], 600);
    assert_eq!(c.fetch(&valid).await.0, 200);
    let baseline = c.broker.metric("connections_open{listener=\"api\"}");
    let reviews = c.api.reviews();
    let absurd = [
        "1e20",
        "1.7e308",
        "1.8e308",
        "-1e20",
        "18446744073709551616",
        "-1",
        "\"soon\"",
        "null",
    ];
    let url = format!("{}/v1/token", c.broker.api);
    let mut statuses = std::collections::BTreeMap::new();
    // 100 at a time from each address (more would be evicted by the
    // per-address cap, a test of its own).
    for source in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let http = client_from(source);
        for batch in 0..10 {
            let asks: Vec<_> = (batch * 100..(batch + 1) * 100)
                .map(|i| {
                    let claims = format!(
                        r#"{{"aud":["{AUDIENCE}"],"sub":"{ENGINE}","exp":{}}}"#,
                        absurd[i % absurd.len()]
                    );
                    let (http, url) = (http.clone(), url.clone());
                    tokio::spawn(async move {
                        let r = http.get(url).bearer_auth(forged_with(&claims)).send().await;
                        r.map(|r| r.status().as_u16()).unwrap_or(0)
                    })
                })
                .collect();
            for ask in asks {
                *statuses.entry(ask.await.unwrap()).or_insert(0) += 1;
            }
        }
    }
    println!("2000 forged tokens with absurd exp: {statuses:?}");
    assert!(
        statuses.keys().all(|s| [401, 429].contains(s)),
        "every one answered 401 or 429, none dropped: {statuses:?}"
    );
    assert_eq!(c.api.reviews(), reviews, "no review for any of them");
    // Every consumer is served, and every slot is back.
    assert_eq!(c.fetch(&valid).await.0, 200);
    assert_eq!(c.fetch(&c.broker.credential.clone()).await.0, 200);
    let fresh = c.api.issue(ENGINE, &[AUDIENCE], 600);
    assert_eq!(c.fetch(&fresh).await.0, 200, "a new pod's token is reviewed and served");
    common::wait_for("the flood's connections to close", Duration::from_secs(20), || async {
        (c.broker.metric("connections_open{listener=\"api\"}") <= baseline).then_some(())
    })
    .await;
    c.broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_signing_keys_an_address_that_fails_gets_no_more_reviews() {
    let c = cluster_of("30s", false).await;
    let (_, body) = c.broker.admin_get("/readyz").await;
    assert!(body.contains("\"signing_keys\":\"unreadable\""), "{body}");
    assert!(body.contains("403"), "/readyz says why: {body}");
    let attacker = client_from([127, 0, 0, 2]);
    let url = format!("{}/v1/token", c.broker.api);
    let before = c.api.reviews();
    let mut statuses = Vec::new();
    for _ in 0..150 {
        let forged = forged(ENGINE, &[AUDIENCE], 600);
        let r = attacker.get(&url).bearer_auth(forged).send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    let reviews = c.api.reviews() - before;
    println!("150 forged tokens from one address without the keys: {reviews} reviews");
    assert!(
        reviews <= kraken_token_broker::http::throttle::FAILURE_BURST as usize + 2,
        "{reviews} reviews: the address's failures stop its reviews"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // A real engine elsewhere is still reviewed and served.
    let valid = c.api.issue(ENGINE, &[AUDIENCE], 600);
    assert_eq!(c.fetch(&valid).await.0, 200);
    c.broker.stop().await.unwrap();
}
