//! The broker's hot paths: signing a Kraken call, authenticating a consumer,
//! and answering `GET /v1/token` from cache through the whole router (auth,
//! query, metrics, problem handling, JSON), with no socket.
//!
//! `cargo bench --bench hot_path`; figures in proto-docs/performance.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::http::{Request, header};
use criterion::{Criterion, criterion_group, criterion_main};
use kraken_token_broker::config::{DEFAULT_RATE_LIMIT, Identity, RateLimit};
use kraken_token_broker::http::auth::find_consumer;
use kraken_token_broker::http::throttle::AuthThrottle;
use kraken_token_broker::http::{AppState, Consumer, Grant, ServeTable, router};
use kraken_token_broker::kraken::{WS_TOKEN_PATH, decode_secret, sign};
use kraken_token_broker::metrics::Metrics;
use kraken_token_broker::token::refresher::{self, Ambient};
use kraken_token_broker::token::{AccountSetup, RefreshPolicy, ScriptedSource};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

const SECRET: &str = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

fn sha(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

fn credential(c: &str) -> Identity {
    Identity::Credential { sha256: sha(c) }
}

fn consumers(n: usize, metrics: &Metrics) -> Vec<Arc<Consumer>> {
    (0..n)
        .map(|i| {
            Arc::new(Consumer::new(
                &format!("engine-{i}"),
                credential(&format!("ktb_credential-{i}")),
                Vec::new(),
                DEFAULT_RATE_LIMIT,
                metrics,
            ))
        })
        .collect()
}

fn signing(c: &mut Criterion) {
    let secret = decode_secret(SECRET).unwrap();
    let body = "nonce=1795312345678901234";
    c.bench_function("sign GetWebSocketsToken", |b| {
        b.iter(|| {
            sign(
                black_box(&secret),
                WS_TOKEN_PATH,
                "1795312345678901234",
                body.as_bytes(),
            )
        })
    });
}

fn authentication(c: &mut Criterion) {
    let table = ServeTable {
        consumers: consumers(10, &Metrics::new()),
        ..ServeTable::empty("")
    };
    c.bench_function("authenticate: SHA-256 + constant-time compare, 10 consumers", |b| {
        b.iter(|| {
            let hash = sha(black_box("ktb_credential-7"));
            find_consumer(&table, &hash).expect("found")
        })
    });
}

fn cached_token(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(async {
        let metrics = Metrics::new();
        let policy = RefreshPolicy::default();
        // Answers at once with a token shaped like Kraken's.
        let source =
            ScriptedSource::new(Duration::from_secs(900)).prefix("1Dwc4lzSwNWOAwkMdqhssNNFhs1ed606d1WcF3XfEMw");
        let setup = AccountSetup::new(Arc::new(source), policy);
        let (handle, _) = refresher::spawn(
            "main",
            setup,
            metrics.account("main"),
            Ambient::default(),
            CancellationToken::new(),
        );
        handle.want(Duration::from_secs(60)).await.unwrap();
        let mut all = consumers(9, &metrics);
        let grant = Grant {
            account: "main".into(),
            handle: handle.clone(),
            served: metrics.consumers().served("main", "bench"),
        };
        // A rate limit that never binds: the bench measures the path, not the limit.
        let unlimited = RateLimit {
            per_second: 1e9,
            burst: 1e9,
        };
        all.push(Arc::new(Consumer::new(
            "bench",
            credential("ktb_bench"),
            vec![grant],
            unlimited,
            &metrics,
        )));
        let state = AppState {
            table: Arc::new(ArcSwap::from_pointee(ServeTable {
                consumers: all,
                accounts: BTreeMap::from([("main".to_owned(), handle)]),
                ..ServeTable::empty("wss://ws-auth.kraken.com/v2")
            })),
            metrics,
            throttle: Arc::new(AuthThrottle::new()),
            gate: Arc::default(),
            streams: Default::default(),
            clock: kraken_token_broker::clock::WallClock::system(),
        };
        router(state)
    });
    c.bench_function("GET /v1/token from cache, whole router", |b| {
        b.to_async(&rt).iter(|| {
            let app = app.clone();
            async move {
                let request = Request::get("/v1/token?min_ttl=30")
                    .header(header::AUTHORIZATION, "Bearer ktb_bench")
                    .body(Body::empty())
                    .unwrap();
                let response = app.oneshot(request).await.unwrap();
                assert_eq!(response.status(), 200);
                axum::body::to_bytes(response.into_body(), 4096).await.unwrap()
            }
        })
    });
    let _ = SystemTime::now();
}

criterion_group!(benches, signing, authentication, cached_token);
criterion_main!(benches);
