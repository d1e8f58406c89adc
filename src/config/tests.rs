//! The config's rules, one test each, against fake secrets.

use std::collections::HashMap;

use super::*;
use crate::files::{FileError, FileText};

/// Secrets from maps instead of the real environment and filesystem.
#[derive(Default)]
struct FakeSecrets {
    env: HashMap<String, String>,
    files: HashMap<PathBuf, String>,
}

impl SecretReader for FakeSecrets {
    fn env(&self, var: &str) -> Option<String> {
        self.env.get(var).cloned()
    }

    fn file(&self, path: &Path) -> Result<FileText, FileError> {
        let text = self.files.get(path).cloned().ok_or_else(|| {
            FileError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory",
            ))
        })?;
        Ok(FileText {
            text,
            world_readable: false,
        })
    }
}

const SECRET_B64: &str = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";
const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn secrets() -> FakeSecrets {
    let mut s = FakeSecrets::default();
    s.files.insert("/k/key".into(), "KEY-123\n".into());
    s.files.insert("/k/secret".into(), format!("{SECRET_B64}\n"));
    s.env.insert("OTP".into(), "pass-word".into());
    s
}

const MINIMAL: &str = r#"
[[account]]
name = "main"
api_key = { file = "/k/key" }
api_secret = { file = "/k/secret" }

[[consumer]]
name = "mm-btc"
credential_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
accounts = ["main"]
"#;

fn problems(text: &str) -> Vec<Problem> {
    Config::parse(text, &secrets()).expect_err("invalid")
}

#[test]
fn a_minimal_config_takes_every_default() {
    let c = Config::parse(MINIMAL, &secrets()).unwrap();
    assert_eq!(c.listen.api, DEFAULT_API_LISTEN.parse().unwrap());
    assert_eq!(c.listen.admin, DEFAULT_ADMIN_LISTEN.parse().unwrap());
    assert_eq!(c.kraken.rest_url, DEFAULT_REST_URL);
    assert_eq!(c.kraken.ws_url, DEFAULT_WS_URL);
    assert_eq!(c.kraken.timeout, DEFAULT_KRAKEN_TIMEOUT);
    assert_eq!(c.refresh.refresh_before_expiry, Duration::from_secs(450));
    assert_eq!(c.refresh.min_served_ttl, Duration::from_secs(60));
    assert_eq!(c.refresh.jitter, Duration::from_secs(30));
    assert_eq!(c.refresh.retry_initial, Duration::from_secs(1));
    assert_eq!(c.refresh.retry_max, Duration::from_secs(60));
    let a = &c.accounts[0];
    assert_eq!(a.name, "main");
    assert_eq!(a.credentials.api_key.expose(), "KEY-123", "trailing newline trimmed");
    assert_eq!(a.credentials.api_secret.expose().len(), 64);
    assert!(a.credentials.otp.is_none());
    assert_eq!(c.consumers[0].accounts, vec!["main"]);
    let Identity::Credential { sha256 } = &c.consumers[0].identity else {
        panic!("a credential consumer");
    };
    assert_eq!(hex::encode(sha256), HASH);
}

#[test]
fn every_setting_can_be_given() {
    let text = format!(
        r#"
[listen]
api = "127.0.0.1:18080"
admin = "127.0.0.1:19090"
[kraken]
rest_url = "http://127.0.0.1:8090/"
ws_url = "ws://127.0.0.1:8090/v2"
timeout = "2s"
[refresh]
refresh_before_expiry = "5m"
min_served_ttl = "90s"
jitter = "10s"
retry_initial = "500ms"
retry_max = "2m"
{MINIMAL}
[[account]]
name = "second_acct-2"
api_key = {{ env = "OTP" }}
api_secret = {{ file = "/k/secret" }}
otp = {{ env = "OTP" }}
"#
    );
    let c = Config::parse(&text, &secrets()).unwrap();
    assert_eq!(c.listen.api.port(), 18080);
    assert_eq!(c.kraken.rest_url, "http://127.0.0.1:8090", "trailing slash dropped");
    assert_eq!(c.kraken.timeout, Duration::from_secs(2));
    assert_eq!(c.refresh.refresh_before_expiry, Duration::from_secs(300));
    assert_eq!(c.refresh.retry_initial, Duration::from_millis(500));
    assert!(c.accounts[1].credentials.otp.is_some());
    assert_eq!(c.accounts[1].sources[2], ("otp", SecretSource::Env("OTP".into())));
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let text = r#"
bogus = 1
[refresh]
jitter = "soon"
retry_max = "1s"
retry_initial = "5s"
[[account]]
name = "Main!"
api_key = "inline-secret"
api_secret = { file = "/missing" }
colour = "red"
[[consumer]]
name = "mm"
credential_sha256 = "abc"
accounts = ["nope"]
"#;
    let found = problems(text);
    let text_of = |p: &Problem| p.to_string();
    let all: Vec<String> = found.iter().map(text_of).collect();
    let has = |needle: &str, line: usize| {
        assert!(
            found
                .iter()
                .any(|p| p.line == Some(line) && p.to_string().contains(needle)),
            "no `{needle}` at line {line} in {all:#?}"
        )
    };
    has("bogus: unknown key", 2);
    has("refresh.jitter: `soon` is not a duration", 4);
    has("must match [a-z0-9_-]{1,64}", 8);
    has("secrets never live in the config file", 9);
    has("cannot read secret file /missing", 10);
    has("colour: unknown key", 11);
    has("must be 64 hex characters", 14);
    has("no [[account]] is named `nope`", 15);
    assert!(
        all.iter()
            .any(|p| p.contains("retry_initial: must not exceed retry_max")),
        "{all:#?}"
    );
    assert!(
        !all.iter().any(|p| p.contains("inline-secret")),
        "a secret is never echoed"
    );
}

#[test]
fn bad_secrets_are_reported_without_their_values() {
    let mut s = secrets();
    s.files.insert("/k/bad".into(), "not base64 !!! sekrit".into());
    s.files.insert("/k/empty".into(), "\n".into());
    let text = MINIMAL
        .replace(
            r#"api_secret = { file = "/k/secret" }"#,
            r#"api_secret = { file = "/k/bad" }"#,
        )
        .replace(r#"api_key = { file = "/k/key" }"#, r#"api_key = { env = "UNSET_VAR" }"#);
    let found = Config::parse(&text, &s).unwrap_err();
    let all: String = found.iter().map(|p| format!("{p}\n")).collect();
    assert!(all.contains("not valid standard base64"), "{all}");
    assert!(all.contains("environment variable UNSET_VAR is not set"), "{all}");
    assert!(!all.contains("sekrit"), "{all}");
    let empty = MINIMAL.replace("/k/key", "/k/empty");
    let found = Config::parse(&empty, &s).unwrap_err();
    assert!(found[0].to_string().contains("is empty"), "{found:?}");
}

#[test]
fn insane_refresh_settings_are_refused() {
    let with = |refresh: &str| problems(&format!("[refresh]\n{refresh}\n{MINIMAL}"));
    let p = with(r#"refresh_before_expiry = "30s""#);
    assert!(p[0].to_string().contains("must exceed min_served_ttl"), "{p:?}");
    let p = with(r#"refresh_before_expiry = "14m55s""#);
    assert!(p[0].to_string().contains("below Kraken's 15m token lifetime"), "{p:?}");
    let p = with(r#"min_served_ttl = "0s""#);
    assert!(p.iter().any(|p| p.to_string().contains("must be positive")), "{p:?}");
    let p = problems(&format!("[kraken]\ntimeout = \"0s\"\n{MINIMAL}"));
    assert!(p[0].to_string().contains("kraken.timeout"), "{p:?}");
    let p = problems(&format!("[kraken]\nrest_url = \"ftp://x\"\n{MINIMAL}"));
    assert!(p[0].to_string().contains("is not a https or http URL"), "{p:?}");
    let p = problems(&format!("[listen]\napi = \"nowhere\"\n{MINIMAL}"));
    assert!(p[0].to_string().contains("listen.api"), "{p:?}");
}

#[test]
fn accounts_and_consumers_are_required_unique_and_consistent() {
    let p = problems("");
    assert!(p.iter().any(|p| p.to_string().contains("no [[account]]")));
    assert!(p.iter().any(|p| p.to_string().contains("no [[consumer]]")));
    let twice = format!("{MINIMAL}{MINIMAL}");
    let p = problems(&twice);
    assert!(
        p.iter()
            .any(|p| p.to_string().contains("account `main` is defined twice")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|p| p.to_string().contains("consumer `mm-btc` is defined twice")),
        "{p:?}"
    );
    let both = MINIMAL.replace(
        "api_secret = { file = \"/k/secret\" }",
        "api_secret = { file = \"/k/secret\" }\notp = { env = \"OTP\" }\ntotp_secret = { env = \"OTP\" }",
    );
    assert!(problems(&both).iter().any(|p| p.to_string().contains("not both")));
    let no_accounts = MINIMAL.replace(r#"accounts = ["main"]"#, "accounts = []");
    assert!(problems(&no_accounts)[0].to_string().contains("non-empty list"));
}

#[test]
fn secret_file_paths_expand_environment_variables() {
    let mut s = secrets();
    s.env.insert("KTB_REPLICA".into(), "k".into());
    let text = MINIMAL.replace("/k/key", "/${KTB_REPLICA}/key");
    let c = Config::parse(&text, &s).unwrap();
    assert_eq!(c.accounts[0].sources[0].1, SecretSource::File("/k/key".into()));
    assert_eq!(c.accounts[0].credentials.api_key.expose(), "KEY-123");
    let unset = MINIMAL.replace("/k/key", "/${NOT_SET}/key");
    let p = Config::parse(&unset, &secrets()).unwrap_err();
    assert!(
        p[0].to_string().contains("NOT_SET (in the file path) is not set"),
        "{p:?}"
    );
    assert_eq!(expand_env("a/${X}/b/${X}", &s).unwrap_err(), "X");
    assert_eq!(
        expand_env("no vars, $HOME, ${unclosed", &s).unwrap(),
        "no vars, $HOME, ${unclosed"
    );
}

#[test]
fn invalid_toml_is_one_clear_problem() {
    let p = problems("[listen\napi = 1");
    assert_eq!(p.len(), 1);
    assert!(p[0].to_string().contains("not valid TOML"), "{p:?}");
    assert_eq!(p[0].line, Some(1));
}

#[test]
fn debug_and_summary_show_no_secret() {
    let c = Config::parse(MINIMAL, &secrets()).unwrap();
    let debug = format!("{c:?}");
    let summary = c.summary();
    for secret in ["KEY-123", SECRET_B64, "kQH5HW"] {
        assert!(!debug.contains(secret), "{debug}");
        assert!(!summary.contains(secret), "{summary}");
    }
    assert!(summary.contains("api_secret from file /k/secret"), "{summary}");
    assert!(summary.contains("mm-btc: accounts main"), "{summary}");
}

/// `MINIMAL` with mTLS from fake files, and `consumer` appended.
fn with_mtls(consumer: &str) -> (String, FakeSecrets) {
    let cert = rcgen::generate_simple_self_signed(vec!["broker".to_owned()]).unwrap();
    let mut s = secrets();
    s.files.insert("/t/tls.crt".into(), cert.cert.pem());
    s.files.insert("/t/tls.key".into(), cert.signing_key.serialize_pem());
    s.files.insert("/t/ca.crt".into(), cert.cert.pem());
    let text = format!(
        "[listen.tls]\ncert = {{ file = \"/t/tls.crt\" }}\nkey = {{ file = \"/t/tls.key\" }}\nclient_ca = {{ file = \"/t/ca.crt\" }}\n{MINIMAL}\n[[consumer]]\nname = \"mm\"\naccounts = [\"main\"]\n{consumer}\n"
    );
    (text, s)
}

#[test]
fn client_certificate_identities_name_their_san_type() {
    let identity = |consumer: &str| {
        let (text, s) = with_mtls(consumer);
        Config::parse(&text, &s).map(|c| (c.consumers[1].identity.clone(), c.warnings))
    };
    let (id, warnings) = identity(r#"client_cert = { dns = "mm.trading.svc" }"#).unwrap();
    assert_eq!(
        id,
        Identity::ClientCert {
            san: San::Dns("mm.trading.svc".into())
        }
    );
    assert!(warnings.is_empty());
    let (id, _) = identity(r#"client_cert = { uri = "spiffe://td/ns/t/sa/mm" }"#).unwrap();
    assert_eq!(
        id,
        Identity::ClientCert {
            san: San::Uri("spiffe://td/ns/t/sa/mm".into())
        }
    );
    // The old form still works, typed by its form, with a warning that
    // names the new one.
    let (id, warnings) = identity(r#"client_cert = { san = "spiffe://td/ns/t/sa/mm" }"#).unwrap();
    assert_eq!(
        id,
        Identity::ClientCert {
            san: San::Uri("spiffe://td/ns/t/sa/mm".into())
        }
    );
    assert!(
        warnings[0]
            .to_string()
            .contains(r#"write client_cert = { uri = "spiffe://td/ns/t/sa/mm" }"#),
        "{warnings:?}"
    );
    let (id, _) = identity(r#"client_cert = { san = "mm.trading.svc" }"#).unwrap();
    assert_eq!(
        id,
        Identity::ClientCert {
            san: San::Dns("mm.trading.svc".into())
        }
    );
    let (id, _) = identity(r#"client_cert = { dns = "MM.Trading.svc" }"#).unwrap();
    assert_eq!(
        id,
        Identity::ClientCert {
            san: San::Dns("mm.trading.svc".into())
        },
        "one form of a DNS name"
    );
    for bad in [
        r#"client_cert = { dns = "a", uri = "spiffe://b" }"#,
        r#"client_cert = { dns = "spiffe://td/x" }"#,
        r#"client_cert = { uri = "mm.trading.svc" }"#,
        r#"client_cert = { }"#,
    ] {
        let problems = identity(bad).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key.ends_with("client_cert")),
            "{bad}: {problems:?}"
        );
    }
}

#[test]
fn two_consumers_cannot_name_one_dns_name_in_two_cases() {
    let (text, s) = with_mtls(
        "client_cert = { dns = \"mm.trading.svc\" }\n\n[[consumer]]\nname = \"mm2\"\naccounts = [\"main\"]\nclient_cert = { dns = \"MM.TRADING.SVC\" }",
    );
    let problems = Config::parse(&text, &s).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.to_string().contains("the same client certificate SAN")),
        "{problems:?}"
    );
}

#[test]
fn only_secret_files_anyone_may_read_earn_a_warning() {
    #[derive(Default)]
    struct Readable(FakeSecrets);
    impl SecretReader for Readable {
        fn env(&self, var: &str) -> Option<String> {
            self.0.env(var)
        }
        fn file(&self, path: &Path) -> Result<FileText, FileError> {
            self.0.file(path).map(|t| FileText {
                world_readable: true,
                ..t
            })
        }
    }
    let (text, s) = with_mtls(r#"client_cert = { dns = "mm.trading.svc" }"#);
    let config = Config::parse(&text, &Readable(s)).unwrap();
    let warned: Vec<&str> = config.warnings.iter().map(|w| w.key.as_str()).collect();
    assert!(warned.contains(&"listen.tls.key"), "{warned:?}");
    assert!(warned.contains(&"account `main`.api_secret"), "{warned:?}");
    assert!(
        !warned.contains(&"listen.tls.cert"),
        "a certificate is public: {warned:?}"
    );
    assert!(!warned.contains(&"listen.tls.client_ca"), "a CA is public: {warned:?}");
}

#[test]
fn the_audit_key_may_be_random_bytes_or_text() {
    struct Bytes(FakeSecrets, Vec<u8>);
    impl SecretReader for Bytes {
        fn env(&self, var: &str) -> Option<String> {
            self.0.env(var)
        }
        fn file(&self, path: &Path) -> Result<FileText, FileError> {
            self.0.file(path)
        }
        fn file_bytes(&self, path: &Path) -> Result<crate::files::FileBytes, FileError> {
            if path == Path::new("/k/audit") {
                return Ok(crate::files::FileBytes {
                    bytes: self.1.clone(),
                    world_readable: false,
                });
            }
            self.0.file_bytes(path)
        }
    }
    let text = format!("[audit]\nfingerprint_key = {{ file = \"/k/audit\" }}\n{MINIMAL}");
    let random: Vec<u8> = (0..32u8).map(|b| b.wrapping_mul(97).wrapping_add(0xf0)).collect();
    assert!(std::str::from_utf8(&random).is_err(), "not text");
    let config = Config::parse(&text, &Bytes(secrets(), random.clone())).unwrap();
    assert_eq!(config.audit.unwrap().key.expose(), &random[..]);
    let hex_key = b"00112233445566778899aabbccddeeff\n".to_vec();
    let config = Config::parse(&text, &Bytes(secrets(), hex_key)).unwrap();
    assert_eq!(
        config.audit.unwrap().key.expose(),
        b"00112233445566778899aabbccddeeff",
        "text loses its newline, so its fingerprints stay as they were"
    );
    let short = Config::parse(&text, &Bytes(secrets(), vec![0xff; 8])).unwrap_err();
    assert!(short[0].to_string().contains("at least 16 bytes"), "{short:?}");
}

#[test]
fn config_errors_name_the_file() {
    let e = ConfigError {
        path: "/etc/ktb.toml".into(),
        problems: vec![Problem {
            line: Some(3),
            key: "refresh.jitter".into(),
            message: "bad".into(),
        }],
    };
    assert_eq!(
        e.to_string(),
        "/etc/ktb.toml: 1 problem\n  /etc/ktb.toml: line 3: refresh.jitter: bad"
    );
}
