//! No ServiceAccount token (the engines' or the broker's own), TLS private
//! key, client key, audit key, credential or served token reaches the logs
//! (at debug), the metrics, error bodies or the audit trail, through the
//! real binary serving TLS with client certificates and TokenReview.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::apiserver::{FakeApiServer, forged};
use common::pki::{Ca, client};
use common::{Served, config_tables, credential_consumer, sim_with_key, write, write_key};
use kraken_token_broker::identity::credential::new_credential;

const AUDIENCE: &str = "kraken-token-broker";
const ENGINE: &str = "system:serviceaccount:trading:mm-engine";
const SAN: &str = "spiffe://cluster.local/ns/trading/sa/cert-engine";
const BROKER_SA_TOKEN: &str = "broker-own-sa-token-do-not-leak";
const AUDIT_KEY: &str = "audit-fingerprint-key-do-not-leak";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_account_token_key_or_credential_reaches_any_output() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let api = FakeApiServer::start(BROKER_SA_TOKEN).await;
    let (server_ca, client_ca) = (Ca::new("server-ca"), Ca::new("client-ca"));
    let server_leaf = server_ca.leaf(&["127.0.0.1"]);
    let engine_leaf = client_ca.leaf(&[SAN]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_key(d, &key);
    write(d, "tls.crt", &server_leaf.cert);
    write(d, "tls.key", &server_leaf.key);
    write(d, "client-ca.pem", &client_ca.pem);
    write(d, "ca.crt", &api.ca_pem);
    write(d, "token", BROKER_SA_TOKEN);
    write(d, "audit-key", AUDIT_KEY);
    let (credential, hash) = new_credential();
    let text = format!(
        r#"{tables}
[listen.tls]
cert = {{ file = "{d}/tls.crt" }}
key = {{ file = "{d}/tls.key" }}
client_ca = {{ file = "{d}/client-ca.pem" }}

[kubernetes]
audience = "{AUDIENCE}"
api_url = "{api_url}"
ca = {{ file = "{d}/ca.crt" }}
token = {{ file = "{d}/token" }}

[audit]
to = "{d}/audit.jsonl"
fingerprint_key = {{ file = "{d}/audit-key" }}

[[consumer]]
name = "sa-engine"
kubernetes = {{ namespace = "trading", service_account = "mm-engine" }}
accounts = ["main"]

[[consumer]]
name = "cert-engine"
client_cert = {{ uri = "{SAN}" }}
accounts = ["main"]
{engine}"#,
        tables = config_tables(&sim, d, "", ""),
        engine = credential_consumer("engine", &hex::encode(hash)),
        api_url = api.url,
        d = d.display(),
    );
    let config = write(d, "broker.toml", &text);
    let http = client(&[&server_ca.pem], None);
    let served = Served::spawn(
        &config,
        dir,
        credential.expose(),
        http.clone(),
        // An egress proxy for Kraken that goes nowhere: calls to the
        // Kubernetes API server must not use it (the SA consumer below is
        // served only if TokenReview and the signing keys bypass it).
        &[("RUST_LOG", "debug"), ("HTTPS_PROXY", "http://127.0.0.1:9")],
    )
    .await;
    let url = format!("{}/v1/token", served.api);
    let mut bodies: Vec<String> = Vec::new();
    let mut get = async |http: &reqwest::Client, bearer: Option<&str>, expected: u16| {
        let mut request = http.get(&url);
        if let Some(b) = bearer {
            request = request.bearer_auth(b);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), expected);
        let body = r.text().await.unwrap();
        if expected != 200 {
            bodies.push(body); // error bodies; a 200 carries the token by design
        }
    };

    let good = api.sign(ENGINE, &[AUDIENCE], 600);
    api.accept(&good, ENGINE, &[AUDIENCE]);
    get(&http, Some(&good), 200).await;
    let forged = forged(ENGINE, &[AUDIENCE], 600);
    get(&http, Some(&forged), 401).await;
    let other_audience = api.sign(ENGINE, &["https://kubernetes.default.svc"], 600);
    get(&http, Some(&other_audience), 401).await;
    let engine = client(&[&server_ca.pem], Some(&engine_leaf));
    get(&engine, None, 200).await;
    get(&http, Some(credential.expose()), 200).await;
    api.state.fail_500.store(true, Ordering::SeqCst);
    let during_outage = api.sign(ENGINE, &[AUDIENCE], 600);
    api.accept(&during_outage, ENGINE, &[AUDIENCE]);
    get(&http, Some(&during_outage), 503).await;

    let metrics = served.admin_text("/metrics").await;
    served.signal("TERM");
    let mut served = served;
    assert!(served.exit(Duration::from_secs(10)).await.success());
    let audit = std::fs::read_to_string(served.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"sa-engine\"") && audit.contains("\"cert-engine\""),
        "{audit}"
    );
    let logs = served.raw_logs();
    assert!(logs.contains("\"DEBUG\""), "debug logging was on");
    let haystack = format!("{logs}\n{metrics}\n{audit}\n{}", bodies.join("\n"));
    let pem_body = |pem: &str| {
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>()
            .chars()
            .take(48)
            .collect::<String>()
    };
    let mut needles = vec![
        ("engine SA token", good.clone()),
        ("forged SA token", forged),
        ("SA token for another audience", other_audience),
        ("SA token during the outage", during_outage),
        ("the broker's own SA token", BROKER_SA_TOKEN.to_owned()),
        ("audit key", AUDIT_KEY.to_owned()),
        ("server TLS key", pem_body(&server_leaf.key)),
        ("client key", pem_body(&engine_leaf.key)),
        ("consumer credential", credential.expose().to_owned()),
        ("API secret", key.api_secret.clone()),
        ("API key", key.api_key.clone()),
    ];
    // The JWT's signature part alone is secret enough to check for.
    needles.push(("SA token signature", good.rsplit('.').next().unwrap().to_owned() + "x"));
    for t in sim.state().tokens() {
        needles.push(("served token", t.token));
    }
    for (what, needle) in needles {
        assert!(!haystack.contains(&needle), "a {what} leaked");
    }
}
