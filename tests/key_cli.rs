//! `key info`, `check-config --live` and `check-config --no-secrets`, run as
//! an operator runs them: the binary, a config file, the simulator.

mod common;

use std::process::ExitStatus;

use kraken_token_broker::sim::{SimConfig, SimKey};

use common::{config_text, run_bin, start_sim, write, write_key};

async fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_bin(&args, &[])
    })
    .await
    .unwrap()
}

fn with_permissions(extra: &[&str]) -> SimKey {
    let mut held = vec!["query-funds", "query-open-trades", "modify-trades", "create-ws-token"];
    held.extend(extra);
    SimKey {
        permissions: Some(held.iter().map(|p| (*p).to_owned()).collect()),
        valid_until: Some("2031-01-01T00:00:00Z".into()),
        ip_allowlist: vec!["127.0.0.1".into()],
        ..SimKey::generate()
    }
}

/// Neither the key, nor the secret, nor the IBAN Kraken's answer carries.
fn assert_no_secret(key: &SimKey, text: &str) {
    assert!(!text.contains(&key.api_key), "the API key leaked:\n{text}");
    assert!(!text.contains(&key.api_secret), "the secret leaked:\n{text}");
    assert!(!text.contains("SIMU"), "the IBAN leaked:\n{text}");
}

#[tokio::test]
async fn key_info_prints_what_kraken_says_and_fails_on_a_key_the_config_refuses() {
    let good = with_permissions(&[]);
    let sim = start_sim(SimConfig {
        keys: vec![good.clone()],
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), &good);
    let config = write(
        dir.path(),
        "broker.toml",
        &config_text(&sim, dir.path(), &"0".repeat(64), "", ""),
    );
    let config = config.display().to_string();

    let (status, out, err) = run(&["key", "info", "--config", &config]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("account main: key ") && out.contains(": usable"), "{out}");
    assert!(
        out.contains("create-ws-token (WebSocket interface)"),
        "labels from the key form: {out}"
    );
    assert!(out.contains("valid until:   2031-01-01T00:00:00Z"), "{out}");
    assert!(out.contains("ip allowlist:  127.0.0.1"), "{out}");
    assert!(out.contains("nonce window:  0"), "{out}");
    assert!(out.contains("last used:     20"), "this call is the last use: {out}");
    assert_no_secret(&good, &format!("{out}{err}"));

    // The same key is given withdraw at Kraken: both commands fail.
    let too_powerful = SimKey {
        api_key: good.api_key.clone(),
        api_secret: good.api_secret.clone(),
        ..with_permissions(&["withdraw-funds"])
    };
    sim.state().add_key(too_powerful).unwrap();
    let (status, out, err) = run(&["key", "info", "--config", &config, "--account", "main"]).await;
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.contains("REFUSED: holds withdraw-funds"), "{out}");
    assert!(err.contains("the key of main would be refused"), "{err}");
    assert_no_secret(&good, &format!("{out}{err}"));

    let (status, out, err) = run(&["check-config", "--config", &config, "--live"]).await;
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains("REFUSED: holds withdraw-funds") && !out.contains(": OK"),
        "{out}"
    );
    // Plain check-config stays offline: the key's permissions are not its business.
    let calls = sim.state().calls().len();
    let (status, out, err) = run(&["check-config", "--config", &config]).await;
    assert!(status.success(), "{out}{err}");
    assert_eq!(sim.state().calls().len(), calls, "no call to Kraken");

    let (status, _, err) = run(&["key", "info", "--config", &config, "--account", "nope"]).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no account `nope`"), "{err}");
}

#[tokio::test]
async fn check_config_no_secrets_checks_everything_but_the_secrets() {
    let sim = start_sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The rendered config, without its secret files (a GitOps pipeline).
    let text = config_text(&sim, dir.path(), &"0".repeat(64), "", "forbid_permissions = []");
    let config = write(dir.path(), "broker.toml", &text).display().to_string();
    let (status, out, err) = run(&["check-config", "--config", &config]).await;
    assert!(
        !status.success(),
        "without --no-secrets the missing files are problems: {out}"
    );
    assert!(err.contains("cannot read secret file"), "{err}");

    let (status, out, err) = run(&["check-config", "--config", &config, "--no-secrets"]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("secrets: not read (--no-secrets)"), "{out}");
    assert!(
        out.contains("api-key"),
        "where the secrets come from is still shown: {out}"
    );
    assert!(
        out.contains("forbid_permissions") && out.contains("is empty"),
        "the opt-out is warned of: {out}"
    );
    assert!(sim.state().calls().is_empty());

    // Everything else is still checked.
    let broken = text.replace("timeout = \"2s\"", "timeout = \"forever\"");
    let config = write(dir.path(), "broken.toml", &broken).display().to_string();
    let (status, out, err) = run(&["check-config", "--config", &config, "--no-secrets"]).await;
    assert!(!status.success(), "{out}");
    assert!(err.contains("kraken.timeout"), "{err}");
    let (status, _, err) = run(&["check-config", "--config", "x.toml", "--no-secrets", "--live"]).await;
    assert_eq!(status.code(), Some(2), "--live needs the secrets: {err}");
}
