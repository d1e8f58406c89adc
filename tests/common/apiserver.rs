//! A fake Kubernetes API server answering `TokenReview`s as Kubernetes
//! does (`POST /apis/authentication.k8s.io/v1/tokenreviews` → 201 with
//! `status.authenticated`, `status.audiences`, `status.user`) and serving
//! its ServiceAccount signing key (`GET /openid/v1/jwks`), over TLS,
//! checking the broker's own bearer token, counting reviews and key reads,
//! and able to go down, answer 500, or refuse the keys (403).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::pki::Ca;

/// What the fake API server knows and does.
#[derive(Default)]
pub struct ApiState {
    /// Token → (username, audiences) of tokens it authenticates.
    pub valid: Mutex<HashMap<String, (String, Vec<String>)>>,
    /// The bearer the broker must send (its own ServiceAccount token).
    pub broker_token: Mutex<String>,
    pub reviews: AtomicUsize,
    pub fail_500: AtomicBool,
    pub unauthorized: AtomicUsize,
    /// `/openid/v1/jwks` answers 403 (the broker lacks the discovery role).
    pub jwks_forbidden: AtomicBool,
    pub jwks_reads: AtomicUsize,
    /// The signing key's JWK.
    pub jwk: Mutex<Value>,
}

pub struct FakeApiServer {
    pub url: String,
    pub ca_pem: String,
    pub state: Arc<ApiState>,
    stop: CancellationToken,
    /// The cluster's ServiceAccount token signing key (EC P-256, kid `k1`).
    signing_key: jsonwebtoken::EncodingKey,
}

/// The key id the fake cluster signs with.
pub const KID: &str = "k1";

/// A fresh EC P-256 key: its signing half and its JWK.
pub fn signing_key(kid: &str) -> (jsonwebtoken::EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw(); // 0x04 || x || y
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                     "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
    (jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
}

/// A ServiceAccount token's claims.
fn claims(subject: &str, audiences: &[&str], exp_in_secs: i64) -> Value {
    let exp = kraken_token_broker::clock::unix_secs(std::time::SystemTime::now()) as i64 + exp_in_secs;
    let nonce: u64 = rand::random();
    json!({ "aud": audiences, "exp": exp, "sub": subject, "jti": nonce,
            "iss": "https://kubernetes.default.svc.cluster.local" })
}

/// A token with these claims signed by `key` under `kid`.
pub fn signed_by(
    key: &jsonwebtoken::EncodingKey,
    kid: &str,
    subject: &str,
    audiences: &[&str],
    exp_in_secs: i64,
) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims(subject, audiences, exp_in_secs), key).unwrap()
}

impl FakeApiServer {
    pub async fn start(broker_token: &str) -> FakeApiServer {
        let ca = Ca::new("cluster-ca");
        let leaf = ca.leaf(&["127.0.0.1"]);
        let (signing_key, jwk) = signing_key(KID);
        let state = Arc::new(ApiState {
            broker_token: Mutex::new(broker_token.to_owned()),
            jwk: Mutex::new(jwk),
            ..ApiState::default()
        });
        let app = Router::new()
            .route("/apis/authentication.k8s.io/v1/tokenreviews", post(review))
            .route("/openid/v1/jwks", get(jwks))
            .with_state(Arc::clone(&state));
        let tls = kraken_token_broker::tls::server_config(&leaf.cert, &leaf.key, None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            url: format!("https://{addr}"),
            ca_pem: ca.pem,
            state,
            stop,
            signing_key,
        }
    }

    /// A token this cluster issued (signed by its key), which its
    /// TokenReview also authenticates.
    pub fn issue(&self, subject: &str, audiences: &[&str], exp_in_secs: i64) -> String {
        let token = self.sign(subject, audiences, exp_in_secs);
        self.accept(&token, subject, audiences);
        token
    }

    /// A token signed by this cluster's key, which its TokenReview does not
    /// know (a deleted pod's).
    pub fn sign(&self, subject: &str, audiences: &[&str], exp_in_secs: i64) -> String {
        signed_by(&self.signing_key, KID, subject, audiences, exp_in_secs)
    }

    pub fn jwks_reads(&self) -> usize {
        self.state.jwks_reads.load(Ordering::SeqCst)
    }

    /// Makes the server authenticate `token` as `username` for `audiences`.
    pub fn accept(&self, token: &str, username: &str, audiences: &[&str]) {
        let audiences = audiences.iter().map(|a| (*a).to_owned()).collect();
        self.state
            .valid
            .lock()
            .unwrap()
            .insert(token.to_owned(), (username.to_owned(), audiences));
    }

    pub fn reviews(&self) -> usize {
        self.state.reviews.load(Ordering::SeqCst)
    }

    /// Stops answering (connections are refused from now on).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn jwks(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let expected = format!("Bearer {}", state.broker_token.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    state.jwks_reads.fetch_add(1, Ordering::SeqCst);
    if state.jwks_forbidden.load(Ordering::SeqCst) {
        return (StatusCode::FORBIDDEN, "forbidden: cannot get path /openid/v1/jwks").into_response();
    }
    let jwk = state.jwk.lock().unwrap().clone();
    axum::Json(json!({ "keys": [jwk] })).into_response()
}

async fn review(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: String) -> Response {
    let expected = format!("Bearer {}", state.broker_token.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    }
    state.reviews.fetch_add(1, Ordering::SeqCst);
    if state.fail_500.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "etcd is sad").into_response();
    }
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let token = request["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let known = state.valid.lock().unwrap().get(token).cloned();
    // As Kubernetes: authenticated only when the token's audiences meet the
    // requested ones; `status.audiences` is their intersection.
    let status = match known {
        Some((username, audiences)) => {
            let granted: Vec<String> = audiences.into_iter().filter(|a| wanted.contains(a)).collect();
            if granted.is_empty() {
                json!({ "authenticated": false, "error": "token audiences are invalid" })
            } else {
                json!({ "authenticated": true, "audiences": granted,
                        "user": { "username": username, "uid": "u-1", "groups": ["system:serviceaccounts"] } })
            }
        }
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
    };
    let reply = json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "spec": request["spec"], "status": status });
    (StatusCode::CREATED, axum::Json(reply)).into_response()
}

/// A forged token: JWT-shaped with these claims and the cluster's key id,
/// but a signature no key made.
pub fn forged(subject: &str, audiences: &[&str], exp_in_secs: i64) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(format!(r#"{{"alg":"ES256","kid":"{KID}"}}"#).as_bytes()),
        b64(claims(subject, audiences, exp_in_secs).to_string().as_bytes()),
        b64(&[7u8; 64])
    )
}

/// A forged token with these raw claims (any JSON text).
pub fn forged_with(claims_json: &str) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(format!(r#"{{"alg":"ES256","kid":"{KID}"}}"#).as_bytes()),
        b64(claims_json.as_bytes()),
        b64(&[7u8; 64])
    )
}
