//! The real `kraken-token-broker` binary as a subprocess against the
//! simulator: logs, signals, exit codes, and what never leaves the broker.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{FAST_REFRESH, Served, run_bin, sim_with_key, start_sim, wait_for, write};
use kraken_token_broker::sim::{FaultSpec, SimConfig, SimKey, SimOtp};

fn once(fault: FaultSpec) -> FaultSpec {
    FaultSpec {
        count: Some(1),
        ..fault
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_secret_otp_credential_or_token_reaches_logs_metrics_or_error_bodies() {
    const OTP: &str = "otp-Zq9-very-secret";
    let mut key = SimKey::generate();
    key.otp = Some(SimOtp::Password(OTP.into()));
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        token_ttl: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let served = Served::start_with(
        &sim,
        &key,
        FAST_REFRESH,
        r#"otp = { env = "KTB_TEST_OTP" }"#,
        &[("RUST_LOG", "debug"), ("KTB_TEST_OTP", OTP)],
    )
    .await;
    let cred = served.credential.clone();
    let mut bodies = Vec::new();

    // Tokens served, one reported rejected.
    let (status, body) = served.get("/v1/token", Some(&cred)).await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let r = served
        .http
        .post(format!("{}/v1/token/invalidate", served.api))
        .bearer_auth(&cred)
        .json(&serde_json::json!({ "token": token["token"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Every kind of error body.
    const WRONG: &str = "ktb_this-is-a-wrong-credential-0123456789";
    for (path, credential, expected) in [
        ("/v1/token", Some(WRONG), 401),
        ("/v1/token", None, 401),
        ("/v1/token?account=other", Some(cred.as_str()), 403),
        ("/v1/token?min_ttl=soon", Some(cred.as_str()), 400),
        ("/nowhere", Some(cred.as_str()), 404),
    ] {
        let (status, body) = served.get(path, credential).await;
        assert_eq!(status, expected, "{path}: {body}");
        bodies.push(body);
    }

    // Upstream faults, each consumed by a refresh.
    for fault in [
        FaultSpec {
            error: Some("EAPI:Invalid nonce".into()),
            ..FaultSpec::default()
        },
        FaultSpec {
            http_status: Some(502),
            ..FaultSpec::default()
        },
        FaultSpec {
            truncated: true,
            ..FaultSpec::default()
        },
        FaultSpec {
            malformed: true,
            ..FaultSpec::default()
        },
        FaultSpec {
            error: Some("EService:Unavailable".into()),
            ..FaultSpec::default()
        },
    ] {
        sim.state().set_fault(once(fault));
        let state = sim.state().clone();
        wait_for("the fault to be consumed", Duration::from_secs(10), || {
            let done = state.fault().is_none();
            async move { done.then_some(()) }
        })
        .await;
    }
    served
        .wait_log("a refresh after the faults", Duration::from_secs(10), |l| {
            l["message"] == "token refreshed"
        })
        .await;
    // Three refreshes logged (the scenario's), however slow the machine.
    wait_for("three refreshes", Duration::from_secs(20), || {
        let refreshed = served.raw_logs().matches("token refreshed").count() >= 3;
        async move { refreshed.then_some(()) }
    })
    .await;
    let metrics = served.admin_text("/metrics").await;
    let readyz = served.admin_text("/readyz").await;
    served.signal("TERM");
    let mut served = served;
    assert!(served.exit(Duration::from_secs(10)).await.success());

    let logs = served.raw_logs();
    assert!(logs.contains("\"token served\""), "debug logging was on");
    assert!(logs.matches("token refreshed").count() >= 3, "the scenario refreshed");
    for reason in ["invalid_nonce", "http_status", "malformed_response", "unavailable"] {
        assert!(logs.contains(reason), "the {reason} failure was logged");
    }
    let haystack = format!("{logs}\n{metrics}\n{readyz}\n{}", bodies.join("\n"));
    let mut needles = vec![
        ("API key", key.api_key.clone()),
        ("API secret", key.api_secret.clone()),
        ("OTP", OTP.to_owned()),
        ("consumer credential", cred.clone()),
        ("wrong credential", WRONG.to_owned()),
    ];
    let tokens = sim.state().tokens();
    assert!(tokens.len() >= 4);
    for t in tokens {
        needles.push(("token", t.token));
    }
    for (what, needle) in needles {
        assert!(!haystack.contains(&needle), "a {what} leaked");
    }
}

#[tokio::test]
async fn a_rejected_key_logs_an_error_naming_the_account_and_the_fix() {
    for (code, fix) in [
        ("EAPI:Invalid key", "install a valid key"),
        ("EGeneral:Permission denied", "WebSocket interface"),
    ] {
        let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
        sim.state().set_fault(FaultSpec {
            error: Some(code.into()),
            ..FaultSpec::default()
        });
        let served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
        let line = served
            .wait_log("an ERROR line", Duration::from_secs(5), |l| l["level"] == "ERROR")
            .await;
        assert_eq!(line["account"], "main", "{line}");
        assert!(line["fix"].as_str().unwrap().contains(fix), "{line}");
        assert!(line["message"].as_str().unwrap().contains("operator"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_rotated_key_keeps_serving_and_a_broken_config_is_refused() {
    let (old, new) = (SimKey::generate(), SimKey::generate());
    let sim = start_sim(SimConfig {
        keys: vec![old.clone(), new.clone()],
        token_ttl: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let mut served = Served::start(&sim, &old, FAST_REFRESH, &[]).await;

    // A consumer fetching throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = common::fetch_until(
        served.http.clone(),
        format!("{}/v1/token", served.api),
        served.credential.clone(),
        Arc::clone(&stop),
        Duration::from_millis(20),
    );

    write(served.dir.path(), "api-key", &format!("{}\n", new.api_key));
    write(served.dir.path(), "api-secret", &format!("{}\n", new.api_secret));
    served.signal("HUP");
    served
        .wait_log("the reload", Duration::from_secs(5), |l| {
            // Lists are JSON arrays in JSON logs.
            l["message"] == "config reloaded" && l["changed"].as_array().is_some_and(|c| c.contains(&"main".into()))
        })
        .await;
    let state = sim.state().clone();
    let new_key = new.api_key.clone();
    wait_for("a refresh with the new key", Duration::from_secs(10), || {
        let seen = state
            .token_calls()
            .iter()
            .any(|c| c.api_key.as_ref() == Some(&new_key) && c.outcome == "ok");
        async move { seen.then_some(()) }
    })
    .await;

    // A broken config is refused; the running one stays in force.
    let config = served.dir.path().join("broker.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("bogus = 1\n{text}")).unwrap();
    served.signal("HUP");
    let refused = served
        .wait_log("the refusal", Duration::from_secs(5), |l| {
            l["message"].as_str().is_some_and(|m| m.contains("reload refused"))
        })
        .await;
    assert_eq!(refused["level"], "ERROR");
    assert!(refused["error"].as_str().unwrap().contains("bogus"), "{refused}");
    let calls_before = sim.state().token_calls().len();
    wait_for("refreshes to go on", Duration::from_secs(10), || {
        let more = state.token_calls().len() > calls_before;
        async move { more.then_some(()) }
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    let statuses: Vec<u16> = consumer.await.unwrap().iter().map(|f| f.status).collect();
    assert!(statuses.len() > 50, "the consumer kept fetching: {}", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "no request failed: {statuses:?}");
    let calls = sim.state().token_calls();
    let first_new = calls
        .iter()
        .position(|c| c.api_key.as_ref() == Some(&new.api_key))
        .unwrap();
    assert!(
        calls[first_new..]
            .iter()
            .all(|c| c.api_key.as_ref() == Some(&new.api_key)),
        "after the rotation only the new key is used"
    );
    assert!(calls.iter().all(|c| c.outcome == "ok"), "no call failed: {calls:?}");
    served.signal("TERM");
    assert!(served.exit(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_completes_started_requests_and_exits_0() {
    let (sim, key) = sim_with_key(Duration::from_secs(30)).await;
    let refresh = r#"
refresh_before_expiry = "10s"
min_served_ttl = "2s"
jitter = "0s"
"#;
    let mut served = Served::start(&sim, &key, refresh, &[]).await;
    let cred = served.credential.clone();
    assert_eq!(served.get("/v1/token", Some(&cred)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    // The next refresh takes 1.5 s; requests needing 25 s left wait for it
    // (the held token has under 29 s; a fresh one about 28.5 s, the call's
    // latency being counted against it).
    sim.state().set_fault(FaultSpec {
        delay_ms: Some(1500),
        count: Some(1),
        ..FaultSpec::default()
    });
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, cred) = (
                served.http.clone(),
                format!("{}/v1/token?min_ttl=25", served.api),
                cred.clone(),
            );
            tokio::spawn(async move {
                let r = http.get(url).bearer_auth(cred).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<serde_json::Value>().await.unwrap())
            })
        })
        .collect();
    let burst: Vec<_> = (0..200)
        .map(|_| {
            let (http, url, cred) = (served.http.clone(), format!("{}/v1/token", served.api), cred.clone());
            tokio::spawn(async move {
                http.get(url)
                    .bearer_auth(cred)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // All 20 are in the broker's hands (waiting on the 1.5 s refresh) before SIGTERM.
    let metrics_url = format!("{}/metrics", served.admin);
    wait_for("20 requests in flight", Duration::from_secs(5), || {
        let (http, url) = (served.http.clone(), metrics_url.clone());
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            let n = common::metric_value(&text, "http_requests_in_flight{route=\"/v1/token\"}");
            (n >= 20.0).then_some(())
        }
    })
    .await;
    served.signal("TERM");
    for w in waiting {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 200, "a request in flight at SIGTERM completes: {body}");
        assert!(body["expires_in"].as_u64().unwrap() >= 25);
    }
    assert_eq!(sim.state().token_calls().len(), 2, "one refresh served all 20");
    for b in burst {
        // Either answered 200, or never started (refused once shutdown began).
        if let Ok(status) = b.await.unwrap() {
            assert_eq!(status, 200);
        }
    }
    let status = served.exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "clean shutdown exits 0");
    let logs = served.raw_logs();
    assert!(logs.contains("broker stopped"), "{logs}");
}

#[tokio::test]
async fn sigint_also_exits_0() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let mut served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
    served.signal("INT");
    assert_eq!(served.exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[test]
fn start_up_errors_exit_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "key", "KEY\n");
    write(d, "secret", "AAECAw==\n");
    let account = format!(
        "[[account]]\nname = \"main\"\napi_key = {{ file = \"{0}/key\" }}\napi_secret = {{ file = \"{0}/secret\" }}\n\
         [[consumer]]\nname = \"c\"\ncredential_sha256 = \"{1}\"\naccounts = [\"main\"]\n",
        d.display(),
        "0".repeat(64)
    );

    let bad = write(
        d,
        "bad.toml",
        &format!("[refresh]\njitter = \"soon\"\ncolour = 1\n{account}"),
    );
    let (status, _, stderr) = run_bin(&["serve", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("line 2: refresh.jitter"), "{stderr}");
    assert!(stderr.contains("line 3: refresh.colour: unknown key"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = write(
        d,
        "busy.toml",
        &format!("[listen]\napi = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:0\"\n{account}"),
    );
    let (status, _, stderr) = run_bin(&["serve", "--config", busy.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port} (listen.api)")),
        "{stderr}"
    );

    let missing = write(d, "missing.toml", &account.replace("/key", "/nope"));
    let (status, _, stderr) = run_bin(&["serve", "--config", missing.to_str().unwrap()], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot read secret file"), "{stderr}");

    let (status, _, stderr) = run_bin(&["serve", "--config", "/no/such/file.toml"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot read the config file"), "{stderr}");

    // KTB_CONFIG names the file instead of the flag.
    let (status, _, stderr) = run_bin(&["serve"], &[("KTB_CONFIG", bad.to_str().unwrap())]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("refresh.jitter"), "{stderr}");
}

#[test]
fn check_config_prints_a_summary_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = SimKey::generate();
    write(d, "key", &key.api_key);
    write(d, "secret", &key.api_secret);
    let config = write(
        d,
        "ok.toml",
        &format!(
            "[[account]]\nname = \"main\"\napi_key = {{ file = \"{0}/key\" }}\napi_secret = {{ env = \"SECRET_VAR\" }}\n\
             [[consumer]]\nname = \"mm-btc\"\ncredential_sha256 = \"{1}\"\naccounts = [\"main\"]\n",
            d.display(),
            "ab".repeat(32)
        ),
    );
    let path = config.to_str().unwrap();
    let (status, stdout, stderr) = run_bin(&["check-config", "--config", path], &[("SECRET_VAR", &key.api_secret)]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("main: api_key from file"), "{stdout}");
    assert!(stdout.contains("api_secret from env SECRET_VAR"), "{stdout}");
    assert!(stdout.contains("mm-btc: accounts main"), "{stdout}");
    assert!(stdout.contains(": OK"), "{stdout}");
    for secret in [&key.api_key, &key.api_secret] {
        assert!(!stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()));
    }
    let (status, _, stderr) = run_bin(&["check-config", "--config", path], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("environment variable SECRET_VAR is not set"),
        "{stderr}"
    );
}

#[test]
fn credential_new_prints_the_credential_once_and_only_its_hash_for_the_config() {
    let (status, stdout, _) = run_bin(&["credential", "new", "mm-btc", "--account", "main"], &[]);
    assert!(status.success());
    let credential = stdout
        .split_whitespace()
        .find(|w| w.starts_with("ktb_"))
        .expect("a credential")
        .to_owned();
    let hash = kraken_token_broker::secret::sha256_hex(credential.as_bytes());
    assert!(stdout.contains(&format!("credential_sha256 = \"{hash}\"")), "{stdout}");
    assert!(
        stdout.contains("name = \"mm-btc\"") && stdout.contains("accounts = [\"main\"]"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(&credential).count(), 1, "shown once");
    // The chart's values form too, with the chart's key names.
    assert!(
        stdout.contains(&format!("credentialSha256: \"{hash}\"")) && stdout.contains("accounts: [main]"),
        "{stdout}"
    );
    let values = stdout
        .split("under `consumers` in your values:")
        .nth(1)
        .expect("a values snippet");
    let parsed = yaml_rust2::YamlLoader::load_from_str(values).expect("the snippet is YAML");
    assert_eq!(parsed[0][0]["credentialSha256"].as_str(), Some(hash.as_str()));
    let (_, again, _) = run_bin(&["credential", "new", "mm-btc"], &[]);
    assert!(!again.contains(&credential), "a fresh one each time");
    let (status, _, stderr) = run_bin(&["credential", "new", "Not Valid"], &[]);
    assert_eq!(status.code(), Some(2), "a usage error");
    assert!(stderr.contains("must match"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_prints_a_token_or_a_clear_error() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
    let (api, cred) = (served.api.clone(), served.credential.clone());
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_bin(
            &["fetch", "--url", &api, "--min-ttl", "30"],
            &[("KTB_CONSUMER_CREDENTIAL", &cred)],
        )
    })
    .await
    .unwrap();
    assert!(status.success(), "{stderr}");
    let body: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(sim.state().token_is_valid(body["token"].as_str().unwrap()));
    assert_eq!(body["account"], "main");

    let api = served.api.clone();
    let (status, _, stderr) = tokio::task::spawn_blocking(move || {
        run_bin(&["fetch", "--url", &api], &[("KTB_CONSUMER_CREDENTIAL", "ktb_wrong")])
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(3), "refused: 3");
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(!stderr.contains("ktb_wrong"), "the credential is not echoed");

    let api = served.api.clone();
    let (status, _, stderr) = tokio::task::spawn_blocking(move || run_bin(&["fetch", "--url", &api], &[]))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2), "usage: 2");
    assert!(stderr.contains("set KTB_CONSUMER_CREDENTIAL"), "{stderr}");

    // No token good enough now (Kraken unavailable, min_ttl above what is
    // held): 4, with the Retry-After in the message.
    sim.state().set_fault(kraken_token_broker::sim::FaultSpec {
        error: Some("EService:Unavailable".into()),
        ..Default::default()
    });
    let (api, cred) = (served.api.clone(), served.credential.clone());
    let (status, _, stderr) = tokio::task::spawn_blocking(move || {
        run_bin(
            &["fetch", "--url", &api, "--min-ttl", "900"],
            &[("KTB_CONSUMER_CREDENTIAL", &cred)],
        )
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(4), "unavailable: 4: {stderr}");
    assert!(stderr.contains("retry after"), "{stderr}");

    // Nobody listening: 5.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (status, _, stderr) = tokio::task::spawn_blocking(move || {
        run_bin(&["fetch", "--url", &nowhere], &[("KTB_CONSUMER_CREDENTIAL", "ktb_x")])
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(5), "unreachable: 5: {stderr}");
    assert!(stderr.contains("cannot reach the broker"), "{stderr}");
}

/// A config naming `secret` as the API secret, with a good key beside it.
fn config_with_secret_at(d: &std::path::Path, secret: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let key = write(d, "key", "KEY\n");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    write(
        d,
        "special.toml",
        &format!(
            "[[account]]\nname = \"main\"\napi_key = {{ file = \"{0}/key\" }}\napi_secret = {{ file = \"{1}\" }}\n\
             [[consumer]]\nname = \"c\"\ncredential_sha256 = \"{2}\"\naccounts = [\"main\"]\n",
            d.display(),
            secret.display(),
            "0".repeat(64)
        ),
    )
}

#[test]
fn secret_files_that_are_not_regular_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let zero = d.join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for (special, kind) in [(&fifo, "FIFO"), (&zero, "character device")] {
        let config = config_with_secret_at(d, special);
        let path = config.to_str().unwrap();
        for command in ["check-config", "serve"] {
            // No writer ever opens the FIFO: a blocking read would hang here.
            let started = std::time::Instant::now();
            let (status, _, stderr) = run_bin(&[command, "--config", path], &[]);
            assert_eq!(status.code(), Some(1), "{command}: {stderr}");
            assert!(
                stderr.contains(&format!("it is a {kind}, not a regular file")),
                "{command}: {stderr}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{command} took {:?}",
                started.elapsed()
            );
        }
    }
    let big = write(d, "big", &"A".repeat(100_000));
    let (status, _, stderr) = run_bin(
        &[
            "check-config",
            "--config",
            config_with_secret_at(d, &big).to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("larger than 65536 bytes"), "{stderr}");
}

#[test]
fn a_secret_file_anyone_may_read_earns_a_warning() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = write(d, "secret", "AAECAw==\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = config_with_secret_at(d, &secret);
    let (status, stdout, stderr) = run_bin(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("warning:") && stdout.contains("readable by every user"),
        "{stdout}"
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, stdout, _) = run_bin(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(!stdout.contains("warning:"), "{stdout}");
}

#[tokio::test]
async fn a_fifo_swapped_in_for_a_secret_never_freezes_the_broker() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let mut served = Served::start(&sim, &key, FAST_REFRESH, &[]).await;
    let secret = served.dir.path().join("api-secret");
    std::fs::remove_file(&secret).unwrap();
    assert!(Command::new("mkfifo").arg(&secret).status().unwrap().success());
    served.signal("HUP");
    let refused = served
        .wait_log("the refusal", Duration::from_secs(10), |l| {
            l["message"].as_str().is_some_and(|m| m.contains("reload refused"))
        })
        .await;
    assert!(refused["error"].as_str().unwrap().contains("FIFO"), "{refused}");
    // Still serving, and a SIGTERM still stops it at once.
    let (status, _) = served.get("/v1/token", Some(&served.credential.clone())).await;
    assert_eq!(status, 200);
    served.signal("TERM");
    assert_eq!(served.exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[test]
fn the_simulator_never_prints_a_secret_it_was_given() {
    let key = kraken_token_broker::sim::SimKey::generate();
    let mut child = std::process::Command::new(common::BIN)
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env("KTB_SIM_API_KEY", &key.api_key)
        .env("KTB_SIM_API_SECRET", &key.api_secret)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("Press Ctrl-C") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
    }
    let _ = child.kill();
    // Whatever it logged to stderr, read to the end now that it is gone.
    let logged = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    assert!(printed.contains(&key.api_key), "the key is public: {printed}");
    assert!(
        !printed.contains(&key.api_secret) && !logged.contains(&key.api_secret),
        "the secret given is not echoed: {printed}{logged}"
    );
    assert!(printed.contains("API secret: as given"), "{printed}");
}
