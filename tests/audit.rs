//! The audit trail through the real binary: one JSON line per decision in
//! its own file (0600), tokens named only by a keyed fingerprint that
//! `audit fingerprint` reproduces, and no token or credential in it.

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Served, sim_with_key, wait_for, write};

fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("an audit line is not JSON: {l}")))
        .collect()
}

fn fingerprint_of(config: &std::path::Path, token: &str) -> String {
    let mut child = Command::new(BIN)
        .args(["audit", "fingerprint", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_audited_by_fingerprint_and_no_token_is_in_the_trail() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let trail = tempfile::tempdir().unwrap();
    let audit_file = trail.path().join("audit.jsonl");
    write(trail.path(), "fingerprint-key", "a-long-random-audit-fingerprint-key\n");
    let section = format!(
        "\n[audit]\nto = \"{}\"\nfingerprint_key = {{ file = \"{}/fingerprint-key\" }}\n",
        audit_file.display(),
        trail.path().display()
    );
    let served = Served::start_with(&sim, &key, "", &section, &[]).await;
    let config = served.dir.path().join("broker.toml");

    let (status, body) = served.get("/v1/token", Some(&served.credential)).await;
    assert_eq!(status, 200);
    let token = serde_json::from_str::<serde_json::Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = served
        .http
        .post(format!("{}/v1/token/invalidate", served.api))
        .bearer_auth(&served.credential)
        .json(&serde_json::json!({ "token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let replacement = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(replacement, token);
    let (wrong, _) = kraken_token_broker::identity::credential::new_credential();
    assert_eq!(served.get("/v1/token", Some(wrong.expose())).await.0, 401);
    served.signal("HUP");

    let lines = wait_for("five audit lines", Duration::from_secs(10), || {
        let lines = audit_lines(&audit_file);
        async move { (lines.len() >= 5).then_some(lines) }
    })
    .await;
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    // The report is audited, and so is the replacement it was served.
    let expected = [
        "token.served",
        "token.invalidated",
        "token.served",
        "auth.failed",
        "config.reloaded",
    ];
    assert_eq!(events, expected, "{lines:?}");
    for line in &lines {
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
    }
    let served_line = &lines[0];
    assert_eq!(served_line["consumer"], "engine");
    assert_eq!(served_line["identity"], "credential");
    assert_eq!(served_line["account"], "main");
    assert!(served_line["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(
        served_line["token"],
        fingerprint_of(&config, &token),
        "the fingerprint command names the served token"
    );
    assert_eq!(lines[1]["reported"], served_line["token"]);
    assert_eq!(lines[1]["replaced"], true);
    assert_eq!(lines[2]["token"], fingerprint_of(&config, &replacement));
    assert_eq!(lines[3]["reason"], "invalid", "{}", lines[3]);
    assert!(lines[3].get("consumer").is_none(), "a failure names no consumer");

    let text = std::fs::read_to_string(&audit_file).unwrap();
    for secret in [
        &token,
        &replacement,
        &served.credential,
        &wrong.expose().to_owned(),
        &key.api_key,
        &key.api_secret,
    ] {
        assert!(
            !text.contains(secret.as_str()),
            "the audit trail holds no token, credential or key"
        );
    }
    let mode = std::fs::metadata(&audit_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the audit file is the broker's alone");
    // Logs say where the audit goes; they never hold the fingerprint key.
    assert!(!served.raw_logs().contains("a-long-random-audit-fingerprint-key"));
}

/// A broker auditing to `to`, the config's directory kept by the result.
async fn auditing_to(
    sim: &kraken_token_broker::sim::SimHandle,
    key: &kraken_token_broker::sim::SimKey,
    to: &std::path::Path,
    keys_dir: &std::path::Path,
) -> Served {
    write(keys_dir, "fingerprint-key", "a-long-random-audit-fingerprint-key\n");
    let section = format!(
        "\n[audit]\nto = \"{}\"\nfingerprint_key = {{ file = \"{}/fingerprint-key\" }}\n",
        to.display(),
        keys_dir.display()
    );
    Served::start_with(sim, key, "", &section, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_or_deleted_audit_file_is_followed() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let trail = tempfile::tempdir().unwrap();
    let audit_file = trail.path().join("audit.jsonl");
    let served = auditing_to(&sim, &key, &audit_file, trail.path()).await;
    assert_eq!(served.get("/v1/token", Some(&served.credential)).await.0, 200);
    wait_for("the first line", Duration::from_secs(10), || async {
        (audit_lines(&audit_file).len() == 1).then_some(())
    })
    .await;
    // logrotate's rename, then SIGHUP.
    let rotated = trail.path().join("audit.jsonl.1");
    std::fs::rename(&audit_file, &rotated).unwrap();
    served.signal("HUP");
    wait_for("the reload's line in a new file", Duration::from_secs(10), || async {
        audit_lines(&audit_file)
            .iter()
            .any(|l| l["event"] == "config.reloaded")
            .then_some(())
    })
    .await;
    assert_eq!(
        audit_lines(&rotated).len(),
        1,
        "the old file keeps only what came before"
    );
    // Deleted with no signal: the next lines go to a new file at the path.
    std::fs::remove_file(&audit_file).unwrap();
    wait_for("a token served line in a new file", Duration::from_secs(10), || async {
        assert_eq!(served.get("/v1/token", Some(&served.credential)).await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        audit_lines(&audit_file)
            .iter()
            .any(|l| l["event"] == "token.served")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_lines_counted_and_warned_never_silently() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let keys = tempfile::tempdir().unwrap();
    // Every write to /dev/full fails with ENOSPC, as a full disk does.
    let served = auditing_to(&sim, &key, std::path::Path::new("/dev/full"), keys.path()).await;
    for _ in 0..50 {
        assert_eq!(
            served.get("/v1/token", Some(&served.credential)).await.0,
            200,
            "serving never waits for the audit"
        );
    }
    let dropped = wait_for("50 lost lines counted", Duration::from_secs(10), || async {
        let metrics = served.admin_text("/metrics").await;
        let dropped = common::metric_value(&metrics, "audit_events_dropped_total");
        (dropped >= 50.0).then_some(dropped)
    })
    .await;
    assert_eq!(dropped, 50.0, "every lost line, and only those");
    let logs = served.raw_logs();
    assert!(logs.contains("cannot write audit lines"), "{logs}");
    assert!(logs.contains("No space left on device"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_in_a_loop_writes_one_audit_line_not_one_per_request() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let trail = tempfile::tempdir().unwrap();
    let audit_file = trail.path().join("audit.jsonl");
    let served = auditing_to(&sim, &key, &audit_file, trail.path()).await;
    for i in 0..1000 {
        let credential = if i % 2 == 0 { Some("ktb_wrong") } else { None };
        let status = served.get("/v1/token", credential).await.0;
        assert!([401, 429].contains(&status), "{status}");
    }
    // A consumer's tokens stay one line each.
    for _ in 0..3 {
        assert_eq!(served.get("/v1/token", Some(&served.credential)).await.0, 200);
    }
    let lines = wait_for("the served lines", Duration::from_secs(10), || async {
        let lines = audit_lines(&audit_file);
        (lines.iter().filter(|l| l["event"] == "token.served").count() == 3).then_some(lines)
    })
    .await;
    let failures: Vec<_> = lines.iter().filter(|l| l["event"] == "auth.failed").collect();
    println!(
        "1000 refused requests: {} auth.failed lines ({} bytes in all)",
        failures.len(),
        std::fs::metadata(&audit_file).unwrap().len()
    );
    assert!(
        failures.len() <= 3,
        "one line per address and reason, then a summary per interval: {failures:?}"
    );
    assert!(
        failures.iter().all(|l| l["peer"] == "127.0.0.1" && l["count"] == 1),
        "{failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_every_line_and_the_last_summary() {
    let (sim, key) = sim_with_key(Duration::from_secs(900)).await;
    let trail = tempfile::tempdir().unwrap();
    let audit_file = trail.path().join("audit.jsonl");
    let mut served = auditing_to(&sim, &key, &audit_file, trail.path()).await;
    for _ in 0..500 {
        assert!([401, 429].contains(&served.get("/v1/token", Some("ktb_wrong")).await.0));
    }
    for _ in 0..200 {
        assert_eq!(served.get("/v1/token", Some(&served.credential)).await.0, 200);
    }
    // At once, well inside the 30 s summary interval.
    served.signal("TERM");
    assert!(served.exit(Duration::from_secs(15)).await.success());
    let lines = audit_lines(&audit_file);
    let failed: u64 = lines
        .iter()
        .filter(|l| l["event"] == "auth.failed")
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert_eq!(failed, 500, "every refused request is in the trail, repeats summarised");
    assert_eq!(lines.iter().filter(|l| l["event"] == "token.served").count(), 200);
}
