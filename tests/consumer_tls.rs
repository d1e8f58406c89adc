//! The consumer API over TLS: certificates from files, rotation under load
//! without a failed request, a broken rotation refused, cleartext and
//! stalled handshakes, and client certificates (mutual TLS) as a consumer
//! identity beside bearer credentials.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::pki::{Ca, Leaf, LeafSpec, client};
use common::{Broker, config_tables, credential_consumer, sim_with_key, wait_for, write, write_key};
use kraken_token_broker::identity::credential::new_credential;
use kraken_token_broker::sim::{SimHandle, SimKey};

/// A config with `[listen.tls]` from files in `dir`, one bearer consumer
/// `engine`, and `more` (extra consumers or sections).
fn tls_config(
    sim: &SimHandle,
    key: &SimKey,
    dir: &Path,
    credential_sha256: &str,
    client_ca: bool,
    more: &str,
) -> String {
    write_key(dir, key);
    let d = dir.display();
    let client_ca = if client_ca {
        format!("client_ca = {{ file = \"{d}/client-ca.pem\" }}")
    } else {
        String::new()
    };
    format!(
        "{}\n[listen.tls]\ncert = {{ file = \"{d}/tls.crt\" }}\nkey = {{ file = \"{d}/tls.key\" }}\n{client_ca}\n{}{more}",
        config_tables(sim, dir, "", ""),
        credential_consumer("engine", credential_sha256),
    )
}

fn install(dir: &Path, leaf: &Leaf) {
    // As a Secret volume update does: the new file appears whole.
    for (name, text) in [("tls.crt", &leaf.cert), ("tls.key", &leaf.key)] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

async fn status_of(http: &reqwest::Client, url: &str, credential: Option<&str>) -> Result<u16, String> {
    let mut request = http.get(url);
    if let Some(c) = credential {
        request = request.bearer_auth(c);
    }
    match request.send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Clients requesting `url` in loops until stopped, each answer kept.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    loops: Vec<tokio::task::JoinHandle<Vec<Result<u16, String>>>>,
}

impl Load {
    fn start(clients: Vec<reqwest::Client>, url: &str, bearer: Option<&str>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let loops = clients
            .into_iter()
            .map(|http| {
                let (url, bearer) = (url.to_owned(), bearer.map(str::to_owned));
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        answers.push(status_of(&http, &url, bearer.as_deref()).await);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    answers
                })
            })
            .collect();
        Load { stop, done, loops }
    }

    /// Waits for `n` more answers than so far.
    async fn more(&self, n: usize, what: &str) {
        let target = self.done.load(Ordering::SeqCst) + n;
        wait_for(what, Duration::from_secs(10), || {
            let reached = self.done.load(Ordering::SeqCst) >= target;
            async move { reached.then_some(()) }
        })
        .await;
    }

    /// Stops the loops; every answer they had.
    async fn stop(self) -> Vec<Result<u16, String>> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for l in self.loops {
            all.extend(l.await.unwrap());
        }
        all
    }
}

/// Starts a TLS broker: (broker, its credential, the server CA).
async fn tls_broker(client_ca: Option<&Ca>, more: &str) -> (Broker, SimHandle, Ca, tempfile::TempDir) {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker-ca-1");
    install(dir.path(), &ca.leaf(&["127.0.0.1", "localhost"]));
    if let Some(client_ca) = client_ca {
        write(dir.path(), "client-ca.pem", &client_ca.pem);
    }
    let (credential, hash) = new_credential();
    let text = tls_config(&sim, &key, dir.path(), &hex::encode(hash), client_ca.is_some(), more);
    let path = write(dir.path(), "broker.toml", &text);
    // The broker owns a copy of the directory's path; the test keeps the
    // directory itself to rotate files in it.
    let owned = tempfile::tempdir().unwrap();
    let mut broker = Broker::from_config(path, owned, credential.expose()).await;
    broker.http = client(&[&ca.pem], None);
    (broker, sim, ca, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_served_over_tls_and_cleartext_gets_no_http_answer() {
    let (broker, sim, _ca, _dir) = tls_broker(None, "").await;
    assert!(broker.api.starts_with("https://"));
    let (status, _, body) = broker.get_token("").await;
    assert_eq!(status, 200, "{body}");
    assert!(sim.state().token_is_valid(body["token"].as_str().unwrap()));

    // A client that does not trust the broker's CA does not get through.
    let stranger = client(&[&Ca::new("someone-else").pem], None);
    let refused = status_of(&stranger, &format!("{}/v1/token", broker.api), Some(&broker.credential)).await;
    assert!(
        refused.is_err(),
        "an untrusted server certificate fails the handshake: {refused:?}"
    );

    // Cleartext HTTP to the TLS port: no HTTP answer, and the credential in
    // it goes nowhere (the handshake fails on the first bytes).
    let addr = broker.api.trim_start_matches("https://").to_owned();
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // (The broker may close before the whole request is written.)
    let _ = write!(
        plain,
        "GET /v1/token HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        broker.credential
    );
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "no HTTP answer on the TLS port: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // A client that connects and never says hello is cut off.
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let read = stalled.read(&mut [0u8; 16]);
    assert!(
        matches!(read, Ok(0)) || read.is_err() && started.elapsed() < Duration::from_secs(29),
        "a stalled handshake is closed by the broker: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(29),
        "closed by the broker, not by the read timeout"
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_taken_without_a_failed_request_and_a_broken_one_is_refused() {
    let (broker, _sim, ca1, dir) = tls_broker(None, "").await;
    let ca2 = Ca::new("broker-ca-2");
    // Engines trusting both CAs during the rotation, on new connections
    // every time (each request makes a handshake).
    let both = reqwest::Client::builder()
        .tls_certs_only([&ca1.pem, &ca2.pem].map(|p| reqwest::Certificate::from_pem(p.as_bytes()).unwrap()))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = format!("{}/v1/token", broker.api);
    let load = Load::start(vec![both; 4], &url, Some(&broker.credential));
    load.more(20, "the first answers").await;

    install(dir.path(), &ca2.leaf(&["127.0.0.1"]));
    broker.reload().await;
    load.more(20, "answers after the rotation").await;
    let only_new = client(&[&ca2.pem], None);
    assert_eq!(
        status_of(&only_new, &url, Some(&broker.credential)).await,
        Ok(200),
        "a new connection meets the new certificate"
    );
    let only_old = client(&[&ca1.pem], None);
    assert!(status_of(&only_old, &url, Some(&broker.credential)).await.is_err());

    // A broken certificate: the reload is refused, the one in force stays.
    std::fs::write(dir.path().join("tls.crt"), "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let outcome = broker.reload_outcome().await;
    let refused = outcome.refusal().expect("a broken certificate is refused");
    assert!(refused.to_string().contains("listen.tls"), "{refused}");
    // A key that does not fit the certificate: refused as well.
    let other = ca2.leaf(&["127.0.0.1"]);
    std::fs::write(dir.path().join("tls.crt"), &other.cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), ca2.leaf(&["127.0.0.1"]).key).unwrap();
    let outcome = broker.reload_outcome().await;
    let refused = outcome.refusal().expect("a key that does not fit is refused");
    assert!(refused.to_string().contains("listen.tls"), "{refused}");
    assert_eq!(status_of(&only_new, &url, Some(&broker.credential)).await, Ok(200));
    load.more(20, "answers after the refusals").await;

    let answers = load.stop().await;
    let total = answers.len();
    let failed: Vec<_> = answers.iter().filter(|a| **a != Ok(200)).collect();
    assert!(failed.is_empty(), "no request failed during the rotation: {failed:?}");
    assert!(total > 60, "the loops ran through the rotation ({total} requests)");
    let metrics = broker.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    broker.stop().await.unwrap();
}

const ENGINE_SAN: &str = "spiffe://cluster.local/ns/trading/sa/mm-engine";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_an_identity_and_a_foreign_one_is_refused() {
    let clients = Ca::new("client-ca");
    let more = format!(
        r#"
[[consumer]]
name = "mm-engine"
client_cert = {{ uri = "{ENGINE_SAN}" }}
accounts = ["main"]
"#
    );
    let (broker, sim, ca, _dir) = tls_broker(Some(&clients), &more).await;
    let url = format!("{}/v1/token", broker.api);

    // The engine's certificate alone is its identity: no bearer.
    let engine = client(&[&ca.pem], Some(&clients.leaf(&[ENGINE_SAN])));
    let r = engine.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(sim.state().token_is_valid(body["token"].as_str().unwrap()));
    assert_eq!(
        broker.metric("tokens_served_total{account=\"main\",consumer=\"mm-engine\"}"),
        1.0
    );

    // A certificate of the right CA naming no consumer: 401, not a token.
    let unknown = client(
        &[&ca.pem],
        Some(&clients.leaf(&["spiffe://cluster.local/ns/x/sa/other"])),
    );
    assert_eq!(status_of(&unknown, &url, None).await, Ok(401));

    // A certificate of another CA with the engine's SAN: the handshake fails.
    let forged = client(&[&ca.pem], Some(&Ca::new("client-ca").leaf(&[ENGINE_SAN])));
    let result = status_of(&forged, &url, None).await;
    assert!(result.is_err(), "a certificate of an unknown CA is refused: {result:?}");

    // Bearer consumers need no certificate on the same listener.
    assert_eq!(status_of(&broker.http, &url, Some(&broker.credential)).await, Ok(200));
    // No certificate and no bearer: 401.
    assert_eq!(status_of(&broker.http, &url, None).await, Ok(401));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_is_taken_under_load_without_a_failed_request() {
    let old_ca = Ca::new("engines-ca-1");
    let more = format!(
        r#"
[[consumer]]
name = "mm-engine"
client_cert = {{ uri = "{ENGINE_SAN}" }}
accounts = ["main"]
rate_limit = {{ per_second = 10000, burst = 100000 }}
"#
    );
    let (broker, _sim, server_ca, dir) = tls_broker(Some(&old_ca), &more).await;
    let url = format!("{}/v1/token", broker.api);
    let new_ca = Ca::new("engines-ca-2");
    let (old_leaf, new_leaf) = (old_ca.leaf(&[ENGINE_SAN]), new_ca.leaf(&[ENGINE_SAN]));
    // Engines with certificates of the old CA, a new connection per request.
    let engine = |leaf: &Leaf| {
        let pem = format!("{}{}", leaf.cert, leaf.key);
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(server_ca.pem.as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    };
    let load = Load::start((0..3).map(|_| engine(&old_leaf)).collect(), &url, None);
    load.more(20, "the first answers").await;
    assert!(
        status_of(&engine(&new_leaf), &url, None).await.is_err(),
        "the new CA is not trusted yet"
    );

    // Step 1 of a CA rotation: trust both.
    write(dir.path(), "client-ca.pem", &format!("{}{}", old_ca.pem, new_ca.pem));
    broker.reload().await;
    assert_eq!(
        status_of(&engine(&new_leaf), &url, None).await,
        Ok(200),
        "the new CA is trusted"
    );
    load.more(20, "answers with both CAs").await;
    let answers = load.stop().await;
    let failed: Vec<_> = answers.iter().filter(|a| **a != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "no engine of the old CA failed while both were trusted: {failed:?}"
    );

    // Step 2: the old CA goes; its certificates fail the handshake.
    write(dir.path(), "client-ca.pem", &new_ca.pem);
    broker.reload().await;
    assert_eq!(status_of(&engine(&new_leaf), &url, None).await, Ok(200));
    assert!(
        status_of(&engine(&old_leaf), &url, None).await.is_err(),
        "the old CA is no longer trusted"
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_proves_only_the_san_type_its_consumer_names() {
    let clients = Ca::new("client-ca");
    let more = r#"
[[consumer]]
name = "mm-btc"
client_cert = { uri = "spiffe://cluster.local/ns/trading/sa/mm-btc" }
accounts = ["main"]

[[consumer]]
name = "mm-eth"
client_cert = { dns = "mm-eth.trading.svc" }
accounts = ["main"]
"#;
    let (broker, _sim, ca, _dir) = tls_broker(Some(&clients), more).await;
    let url = format!("{}/v1/token", broker.api);
    let with = |spec: LeafSpec<'_>| client(&[&ca.pem], Some(&clients.issue(spec)));
    // The URI consumer's name in a DNS SAN, and the DNS consumer's in a URI SAN.
    let dns_spiffe = with(LeafSpec {
        dns: &["spiffe://cluster.local/ns/trading/sa/mm-btc"],
        ..LeafSpec::default()
    });
    let uri_dns = with(LeafSpec {
        uris: &["mm-eth.trading.svc"],
        ..LeafSpec::default()
    });
    assert_eq!(
        status_of(&dns_spiffe, &url, None).await,
        Ok(401),
        "a DNS SAN never proves a URI identity"
    );
    assert_eq!(
        status_of(&uri_dns, &url, None).await,
        Ok(401),
        "a URI SAN never proves a DNS identity"
    );
    // Each in its own type proves its consumer.
    let btc = with(LeafSpec {
        uris: &["spiffe://cluster.local/ns/trading/sa/mm-btc"],
        ..LeafSpec::default()
    });
    let eth = with(LeafSpec {
        dns: &["MM-ETH.trading.svc"],
        ..LeafSpec::default()
    });
    assert_eq!(status_of(&btc, &url, None).await, Ok(200));
    assert_eq!(
        status_of(&eth, &url, None).await,
        Ok(200),
        "DNS names match without regard to case"
    );
    for consumer in ["mm-btc", "mm-eth"] {
        let served = format!("tokens_served_total{{account=\"main\",consumer=\"{consumer}\"}}");
        assert_eq!(broker.metric(&served), 1.0, "{consumer}");
    }
    broker.stop().await.unwrap();
}

/// A rustls client presenting `leaf`, trusting `ca`, resuming sessions as
/// rustls does by default.
fn resuming_client(ca: &Ca, leaf: &Leaf) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(kraken_token_broker::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// `GET /v1/token` over a new connection made with `config`; the status.
async fn get_over(config: &Arc<rustls::ClientConfig>, addr: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(b"GET /v1/token HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_ends_its_connections_and_streams_and_never_resumes() {
    let clients = Ca::new("client-ca");
    let more = format!(
        "\n[[consumer]]\nname = \"mm-engine\"\nclient_cert = {{ uri = \"{ENGINE_SAN}\" }}\naccounts = [\"main\"]\n"
    );
    let (broker, _sim, ca, _dir) = tls_broker(Some(&clients), &more).await;
    let url = format!("{}/v1/token", broker.api);
    let addr = broker.api.trim_start_matches("https://").to_owned();
    let not_after = std::time::SystemTime::now() + Duration::from_secs(6);
    let leaf = clients.issue(LeafSpec {
        uris: &[ENGINE_SAN],
        not_after: Some(not_after),
        ..LeafSpec::default()
    });
    // Before expiry: a kept-alive client, a watch stream, and a rustls
    // client that would resume its session if the broker let it.
    let engine = client(&[&ca.pem], Some(&leaf));
    assert_eq!(status_of(&engine, &url, None).await, Ok(200));
    let mut stream = common::sse::SseReader::open(&engine, &format!("{}/v1/token/watch", broker.api), "").await;
    assert!(stream.next(Duration::from_secs(10)).await.unwrap().token().is_some());
    let resuming = resuming_client(&ca, &leaf);
    assert_eq!(get_over(&resuming, &addr).await, Ok(200));
    assert_eq!(
        get_over(&resuming, &addr).await,
        Ok(200),
        "a second connection before expiry"
    );

    // At expiry the stream ends, the kept-alive connection with it.
    assert!(
        stream.ended(Duration::from_secs(15)).await,
        "the stream ends at notAfter"
    );
    assert!(
        std::time::SystemTime::now() >= not_after - Duration::from_secs(1),
        "not before the certificate's notAfter"
    );
    wait_for("the kept-alive connection to end", Duration::from_secs(10), || async {
        (broker.metric("connections_refused_total{listener=\"api\",reason=\"certificate_expired\"}") >= 1.0)
            .then_some(())
    })
    .await;
    // After it: nothing the certificate shows is accepted, resumed or not.
    wait_for("the certificate to expire", Duration::from_secs(10), || async {
        (std::time::SystemTime::now() > not_after + Duration::from_secs(1)).then_some(())
    })
    .await;
    let answer = status_of(&engine, &url, None).await;
    assert!(answer.is_err(), "an expired certificate gets no answer: {answer:?}");
    let answer = get_over(&resuming, &addr).await;
    assert!(
        answer.is_err(),
        "no session resumes past the certificate's expiry: {answer:?}"
    );
    // A fresh certificate is served again.
    let renewed = client(&[&ca.pem], Some(&clients.leaf(&[ENGINE_SAN])));
    assert_eq!(status_of(&renewed, &url, None).await, Ok(200));
    broker.stop().await.unwrap();
}

/// The first 65,000 bytes of a 65,535-byte ClientHello, in TLS records:
/// what a stranger sends to make the server buffer it, then stalls.
fn partial_client_hello() -> Vec<u8> {
    let mut message = vec![0x01, 0x00, 0xff, 0xff]; // ClientHello, 65535 bytes
    message.resize(65_000, 0x42);
    let mut out = Vec::new();
    for record in message.chunks(16_384) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(record.len() as u16).to_be_bytes());
        out.extend_from_slice(record);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_hellos_cost_bounded_memory_and_the_engine_is_served() {
    use tokio::io::AsyncWriteExt as _;
    let (broker, _sim, _ca, _dir) = tls_broker(None, "").await;
    assert_eq!(broker.get_token("").await.0, 200);
    let addr = broker.api.trim_start_matches("https://").to_owned();
    let me = std::process::id();
    let before = common::rss_kib(me);
    let hello = partial_client_hello();
    let mut held = Vec::new();
    let mut peak = before;
    for i in 0..600 {
        let source = std::net::IpAddr::from([127, 0, 0, 11 + (i % 3) as u8]);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
        if let Ok(mut stream) = socket.connect(addr.parse().unwrap()).await {
            let _ = tokio::time::timeout(Duration::from_millis(50), stream.write_all(&hello)).await;
            held.push(stream);
        }
        if i % 50 == 49 {
            peak = peak.max(common::rss_kib(me));
        }
    }
    // While the strangers stall, the engine's new connections get through.
    let engine = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(_ca.pem.as_bytes()).unwrap()])
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            status_of(&engine, &format!("{}/v1/token", broker.api), Some(&broker.credential)).await,
            Ok(200)
        );
    }
    peak = peak.max(common::rss_kib(me));
    let growth = peak.saturating_sub(before);
    println!("600 stalled ClientHellos from 3 addresses: test process RSS {before} KiB -> {peak} KiB (+{growth} KiB)");
    // Unbounded, the same crowd took +37 MiB here; bounded, about 6 MiB.
    assert!(growth < 20 * 1024, "+{growth} KiB: handshakes under way are bounded");
    drop(held);
    broker.stop().await.unwrap();
}
