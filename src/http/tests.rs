//! Handler tests through `router(state).oneshot(...)`: no socket, no Kraken;
//! tokens come from a refresher over an in-memory source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::*;
use crate::config::{DEFAULT_RATE_LIMIT, Identity};
use crate::metrics::Metrics;
use crate::token::refresher::{self, Ambient};
use crate::token::{AccountSetup, RefreshPolicy, ScriptedSource};

fn ambient() -> Ambient {
    Ambient {
        jitter: || 0.5,
        ..Ambient::default()
    }
}

const WS_URL: &str = "wss://ws-auth.kraken.com/v2";

fn sha(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

fn app() -> (Router, Metrics) {
    let metrics = Metrics::new();
    let policy = RefreshPolicy::default();
    let cancel = CancellationToken::new();
    let mut handles = BTreeMap::new();
    for (name, prefix) in [("main", "main"), ("other", "other"), ("hidden", "hidden")] {
        // Mints `tok-<account>-<n>` tokens of 900 s, instantly.
        let source = Arc::new(ScriptedSource::new(Duration::from_secs(900)).prefix(&format!("tok-{prefix}")));
        let setup = AccountSetup::new(source, policy);
        let (handle, _) = refresher::spawn(name, setup, metrics.account(name), ambient(), cancel.clone());
        handles.insert(name.to_owned(), handle);
    }
    let grant = |account: &str, consumer: &str| Grant {
        account: account.to_owned(),
        handle: handles[account].clone(),
        served: metrics.consumers().served(account, consumer),
    };
    let credential = |c: &str| Identity::Credential { sha256: sha(c) };
    let consumers = vec![
        Arc::new(Consumer::new(
            "one",
            credential("cred-one"),
            vec![grant("main", "one")],
            DEFAULT_RATE_LIMIT,
            &metrics,
        )),
        Arc::new(Consumer::new(
            "two",
            credential("cred-two"),
            vec![grant("main", "two"), grant("other", "two")],
            DEFAULT_RATE_LIMIT,
            &metrics,
        )),
    ];
    let state = AppState {
        table: Arc::new(ArcSwap::from_pointee(ServeTable {
            consumers,
            accounts: handles,
            ..ServeTable::empty(WS_URL)
        })),
        metrics: metrics.clone(),
        throttle: Arc::new(throttle::AuthThrottle::new()),
        gate: Arc::default(),
        streams: Default::default(),
        clock: crate::clock::WallClock::system(),
    };
    (router(state), metrics)
}

fn get(uri: &str, credential: Option<&str>) -> Request<Body> {
    let mut r = Request::get(uri);
    if let Some(c) = credential {
        r = r.header(header::AUTHORIZATION, format!("Bearer {c}"));
    }
    r.body(Body::empty()).unwrap()
}

fn invalidate(uri: &str, credential: &str, content_type: Option<&str>, body: &str) -> Request<Body> {
    let mut r = Request::post(uri).header(header::AUTHORIZATION, format!("Bearer {credential}"));
    if let Some(ct) = content_type {
        r = r.header(header::CONTENT_TYPE, ct);
    }
    r.body(Body::from(body.to_owned())).unwrap()
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

fn assert_problem(status: StatusCode, headers: &axum::http::HeaderMap, body: &Value, expected: u16) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], problem::PROBLEM_JSON);
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body["status"], expected);
    assert!(body["type"].as_str().unwrap().starts_with("tag:kraken-token-broker"));
    assert!(body["title"].is_string() && body["detail"].is_string());
}

#[tokio::test]
async fn a_granted_consumer_gets_the_token_with_the_contracts_fields() {
    let (app, metrics) = app();
    let (status, headers, body) = call(&app, get("/v1/token", Some("cred-one"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(body["token"], "tok-main-1");
    assert_eq!(body["account"], "main");
    assert_eq!(body["ws_url"], WS_URL);
    assert!(body["expires_in"].as_u64().unwrap() >= 899);
    for field in ["issued_at", "expires_at"] {
        let t = body[field].as_str().unwrap();
        assert!(t.ends_with('Z') && humantime::parse_rfc3339(t).is_ok(), "{field}: {t}");
    }
    assert!(
        metrics
            .encode()
            .contains("tokens_served_total{account=\"main\",consumer=\"one\"} 1")
    );
    // account named explicitly, and min_ttl within the lifetime
    let (status, _, body) = call(&app, get("/v1/token?account=main&min_ttl=600", Some("cred-one"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["token"], "tok-main-1", "still the cached one");
}

#[tokio::test]
async fn a_consumer_with_several_accounts_must_name_one() {
    let (app, _) = app();
    let (status, headers, body) = call(&app, get("/v1/token", Some("cred-two"))).await;
    assert_problem(status, &headers, &body, 400);
    assert!(body["detail"].as_str().unwrap().contains("?account="));
    let (status, _, body) = call(&app, get("/v1/token?account=other", Some("cred-two"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["account"], "other");
    assert_eq!(body["token"], "tok-other-1");
}

#[tokio::test]
async fn missing_and_wrong_credentials_are_401_with_www_authenticate() {
    let (app, metrics) = app();
    for request in [
        get("/v1/token", None),
        get("/v1/token", Some("cred-wrong")),
        Request::get("/v1/token")
            .header(header::AUTHORIZATION, "Basic Y3JlZC1vbmU=")
            .body(Body::empty())
            .unwrap(),
        Request::get("/v1/token")
            .header(header::AUTHORIZATION, "Bearer ")
            .body(Body::empty())
            .unwrap(),
    ] {
        let (status, headers, body) = call(&app, request).await;
        assert_problem(status, &headers, &body, 401);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert!(!body.to_string().contains("cred-"), "no credential echoed");
    }
    let text = metrics.encode();
    assert!(text.contains("auth_failures_total{reason=\"missing\"} 1"), "{text}");
    assert!(text.contains("auth_failures_total{reason=\"invalid\"} 3"), "{text}");
}

#[tokio::test]
async fn unknown_and_ungranted_accounts_get_the_same_403() {
    let (app, metrics) = app();
    let (s1, h1, b1) = call(&app, get("/v1/token?account=hidden", Some("cred-one"))).await;
    let (s2, h2, b2) = call(&app, get("/v1/token?account=no-such", Some("cred-one"))).await;
    assert_problem(s1, &h1, &b1, 403);
    assert_problem(s2, &h2, &b2, 403);
    assert_eq!(b1, b2, "the answer does not reveal whether the account exists");
    assert!(metrics.encode().contains("auth_failures_total{reason=\"forbidden\"} 2"));
}

#[tokio::test]
async fn malformed_queries_are_400() {
    let (app, _) = app();
    for uri in [
        "/v1/token?min_ttl=abc",
        "/v1/token?min_ttl=-5",
        "/v1/token?min_ttl=1e3",
        "/v1/token?min_ttl=99999999999999999999",
        "/v1/token?account=main&account=main",
        "/v1/token?colour=red",
        "/v1/token?min_ttl=901",
    ] {
        let (status, headers, body) = call(&app, get(uri, Some("cred-one"))).await;
        assert_problem(status, &headers, &body, 400);
    }
    let (_, _, body) = call(&app, get("/v1/token?min_ttl=901", Some("cred-one"))).await;
    assert!(body["detail"].as_str().unwrap().contains("from 0 to 900"), "{body}");
}

#[tokio::test]
async fn auth_is_checked_before_the_query() {
    let (app, _) = app();
    let (status, _, _) = call(&app, get("/v1/token?min_ttl=abc", None)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn wrong_methods_unknown_routes_and_large_requests_are_problems() {
    let (app, _) = app();
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let request = Request::builder()
            .method(method.clone())
            .uri("/v1/token")
            .header(header::AUTHORIZATION, "Bearer cred-one")
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = call(&app, request).await;
        assert_problem(status, &headers, &body, 405);
        assert!(headers[header::ALLOW].to_str().unwrap().contains("GET"), "{method}");
    }
    let (status, headers, body) = call(&app, get("/v1/token/invalidate", Some("cred-one"))).await;
    assert_problem(status, &headers, &body, 405);
    assert_eq!(headers[header::ALLOW], "POST");
    let (status, headers, body) = call(&app, get("/v2/whatever", Some("cred-one"))).await;
    assert_problem(status, &headers, &body, 404);

    let huge = "x".repeat(MAX_HEAD_BYTES + 1);
    let request = Request::get("/v1/token")
        .header(header::AUTHORIZATION, "Bearer cred-one")
        .header("x-padding", huge.as_str())
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = call(&app, request).await;
    assert_problem(status, &headers, &body, 431);

    let big_body = format!("{{\"token\":\"{}\"}}", "t".repeat(MAX_BODY_BYTES));
    let (status, headers, body) = call(
        &app,
        invalidate("/v1/token/invalidate", "cred-one", Some("application/json"), &big_body),
    )
    .await;
    assert_problem(status, &headers, &body, 413);
}

#[tokio::test]
async fn invalidate_checks_its_body_and_answers_a_new_token() {
    let (app, _) = app();
    let (_, _, first) = call(&app, get("/v1/token", Some("cred-one"))).await;
    let old = first["token"].as_str().unwrap().to_owned();

    let (status, headers, body) = call(&app, invalidate("/v1/token/invalidate", "cred-one", None, "{}")).await;
    assert_problem(status, &headers, &body, 415);
    for bad in [
        "",
        "{}",
        "[]",
        r#"{"token":""}"#,
        r#"{"token":1}"#,
        r#"{"token":"a","x":1}"#,
        "not json",
    ] {
        let (status, headers, body) = call(
            &app,
            invalidate("/v1/token/invalidate", "cred-one", Some("application/json"), bad),
        )
        .await;
        assert_problem(status, &headers, &body, 400);
    }
    let report = format!(r#"{{"token":"{old}"}}"#);
    let (status, headers, body) = call(
        &app,
        invalidate(
            "/v1/token/invalidate?account=main",
            "cred-one",
            Some("application/json; charset=utf-8"),
            &report,
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(body["token"], "tok-main-2");
    // The old token again: nothing changes, the current one is answered.
    let (_, _, again) = call(
        &app,
        invalidate("/v1/token/invalidate", "cred-one", Some("application/json"), &report),
    )
    .await;
    assert_eq!(again["token"], "tok-main-2");
    let (status, _, _) = call(
        &app,
        invalidate(
            "/v1/token/invalidate?account=hidden",
            "cred-one",
            Some("application/json"),
            &report,
        ),
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn a_flood_of_wrong_credentials_is_throttled_per_address_but_good_consumers_are_not() {
    let (app, _) = app();
    let from = |ip: [u8; 4], credential: &str| {
        let mut r = get("/v1/token", Some(credential));
        r.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((ip, 4000))));
        r
    };
    let mut throttled = 0;
    for _ in 0..100 {
        let (status, headers, body) = call(&app, from([10, 0, 0, 66], "guess")).await;
        if status == 429 {
            assert_problem(status, &headers, &body, 429);
            assert!(headers.contains_key(header::RETRY_AFTER));
            throttled += 1;
        } else {
            assert_eq!(status, 401);
        }
    }
    assert!(throttled >= 70, "most guesses are throttled: {throttled}");
    let (status, _, _) = call(&app, from([10, 0, 0, 7], "cred-one")).await;
    assert_eq!(status, 200, "another address is unaffected");
}

/// The (path, method) pairs proto-docs/openapi.yaml documents.
fn documented_operations() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto-docs/openapi.yaml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let paths = docs[0]["paths"].as_hash().expect("a paths object");
    let mut ops = Vec::new();
    for (path, item) in paths {
        for (method, _) in item.as_hash().unwrap() {
            let method = method.as_str().unwrap();
            if ["get", "put", "post", "delete", "patch", "head", "options", "trace"].contains(&method) {
                ops.push((path.as_str().unwrap().to_owned(), method.to_uppercase()));
            }
        }
    }
    ops.sort();
    ops
}

#[tokio::test]
async fn every_served_route_is_documented_and_every_documented_route_is_served() {
    let mut served: Vec<(String, String)> = API_ROUTES.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect();
    served.sort();
    assert_eq!(served, documented_operations(), "API_ROUTES and openapi.yaml agree");

    // And the router really serves exactly those: each documented operation
    // reaches a handler; every other method on those paths is 405.
    let (app, _) = app();
    let all = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    for (path, method) in documented_operations() {
        for other in all {
            let request = Request::builder()
                .method(other)
                .uri(&path)
                .header(header::AUTHORIZATION, "Bearer cred-one")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"token":"x"}"#))
                .unwrap();
            let status = app.clone().oneshot(request).await.unwrap().status();
            if other == method {
                assert!(status != 404 && status != 405, "{other} {path} is served: {status}");
            } else {
                assert_eq!(status, 405, "{other} {path} is not documented, so not allowed");
            }
        }
    }
    let (status, _, _) = call(&app, get("/v1/tokens", Some("cred-one"))).await;
    assert_eq!(status, 404, "an undocumented path is not served");
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Statuses the consumer API may answer: never a 5xx other than 503.
    const ALLOWED: &[u16] = &[200, 400, 401, 403, 404, 405, 413, 415, 429, 431, 503];

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Any bytes, percent-encoded into a query string.
    fn query() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200)
                .prop_map(|bytes| { bytes.iter().map(|b| format!("%{b:02X}")).collect::<String>() }),
            "[a-z_=&0-9%+.-]{0,120}",
            (any::<u64>(), "[a-z_-]{0,70}").prop_map(|(n, a)| format!("min_ttl={n}&account={a}")),
            (any::<i64>(), any::<f64>()).prop_map(|(i, f)| format!("min_ttl={i}&min_ttl={f}")),
        ]
    }

    /// Authorization values: right, wrong, odd schemes, raw bytes.
    fn authorization() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            Just(Some(b"Bearer cred-one".to_vec())),
            Just(Some(b"bearer    cred-two   ".to_vec())),
            "[ -~]{0,100}".prop_map(|s| Some(s.into_bytes())),
            proptest::collection::vec(32u8..=255, 0..100).prop_map(Some),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn no_request_gets_a_5xx_other_than_503_or_a_panic(
            method in prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE"), Just("HEAD"), Just("OPTIONS")],
            path in prop_oneof![Just("/v1/token".to_owned()), Just("/v1/token/invalidate".to_owned()), "/[ -~]{0,40}".prop_map(|p| p.replace(['?', '#', ' '], "_"))],
            query in query(),
            auth in authorization(),
            content_type in prop_oneof![Just(None), Just(Some("application/json")), Just(Some("text/plain")), Just(Some("application/json; charset=utf-8"))],
            body in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                "\\{\"token\":\"[ -~]{0,60}\"\\}".prop_map(String::into_bytes),
                Just(b"{\"token\":\"tok-main-1\"}".to_vec()),
            ],
        ) {
            let uri = format!("{path}?{query}");
            let Ok(mut builder) = Request::builder().method(method).uri(&uri).body(()).map(|r| r.into_parts().0) else {
                return Ok(()); // not a request a client could send
            };
            if let Some(value) = auth.and_then(|a| axum::http::HeaderValue::from_bytes(&a).ok()) {
                builder.headers.insert(header::AUTHORIZATION, value);
            }
            if let Some(ct) = content_type {
                builder.headers.insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static(ct));
            }
            let request = Request::from_parts(builder, Body::from(body));
            let response = runtime().block_on(async { app().0.oneshot(request).await }).unwrap();
            let status = response.status().as_u16();
            prop_assert!(ALLOWED.contains(&status), "{method} {uri}: {status}");
            if status != 200 && method != "HEAD" {
                let ct = response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
                prop_assert_eq!(ct.as_deref(), Some(problem::PROBLEM_JSON), "{} {}: every error is problem+json", method, uri);
            }
        }

        #[test]
        fn only_the_right_credential_authenticates(credential in "[ -~]{0,80}") {
            let table_hashes = [sha("cred-one"), sha("cred-two")];
            let hash: [u8; 32] = Sha256::digest(credential.trim().as_bytes()).into();
            let request = Request::get("/v1/token?account=main")
                .header(header::AUTHORIZATION, format!("Bearer {credential}"))
                .body(Body::empty())
                .unwrap();
            let status = runtime().block_on(async { app().0.oneshot(request).await }).unwrap().status().as_u16();
            if table_hashes.contains(&hash) {
                prop_assert_eq!(status, 200);
            } else {
                prop_assert_eq!(status, 401);
            }
        }
    }
}
