//! The broker's TOML configuration, typed at load.
//!
//! [`Config::load`] reads the file, walks it with spans so that every problem
//! is reported at once with its line and key (unknown keys included), reads
//! each secret from its file or environment variable and wraps it at once in
//! a redacting type. A `Config` in hand is valid: addresses parse, durations
//! are sane, secrets decode, and every consumer names existing accounts.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::kraken::{ApiCredentials, Otp, decode_secret};
use crate::secret::SecretString;
use crate::token::RefreshPolicy;

pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_REST_URL: &str = "https://api.kraken.com";
pub const DEFAULT_WS_URL: &str = "wss://ws-auth.kraken.com/v2";
pub const DEFAULT_KRAKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Half of Kraken's 900 s lifetime, as Kraken's own SDK refreshes.
pub const DEFAULT_REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(450);
pub const DEFAULT_MIN_SERVED_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_JITTER: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);

/// The longest Kraken call timeout accepted: longer only delays failover.
const MAX_KRAKEN_TIMEOUT: Duration = Duration::from_secs(120);
/// Kraken's token lifetime, which refresh settings must fit inside.
const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// The longest back-off accepted between retries.
const MAX_RETRY: Duration = Duration::from_secs(3600);

/// Where a secret is read from. The config file itself never holds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(var) => write!(f, "env {var}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub api: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KrakenConfig {
    pub rest_url: String,
    /// Handed to consumers beside each token.
    pub ws_url: String,
    pub timeout: Duration,
}

/// One Kraken account: its name and what signs its calls.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    pub name: String,
    pub credentials: ApiCredentials,
    /// Where each secret came from, for summaries (never the values).
    pub sources: Vec<(&'static str, SecretSource)>,
}

/// One consumer: who it is, the SHA-256 of its credential, what it may fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub name: String,
    pub credential_sha256: [u8; 32],
    pub accounts: Vec<String>,
}

/// A whole, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub kraken: KrakenConfig,
    pub refresh: RefreshPolicy,
    pub accounts: Vec<AccountConfig>,
    pub consumers: Vec<ConsumerConfig>,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `refresh.jitter` or `account[2].api_secret`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: {}: {}", self.key, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.key, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}: {problem}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads secrets; a parameter so tests need not touch the process environment.
pub trait SecretReader {
    fn env(&self, var: &str) -> Option<String>;
    fn file(&self, path: &Path) -> std::io::Result<String>;
}

/// Reads from the real environment and filesystem.
pub struct SystemSecrets;

impl SecretReader for SystemSecrets {
    fn env(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// Parses a duration such as `30s`, `5m`, `1h`, `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration like 30s, 5m or 1h ({e})"))
}

/// Whether `name` fits `[a-z0-9_-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Walks the spanned TOML tree, collecting problems.
struct Walker<'s> {
    source: &'s str,
    problems: Vec<Problem>,
}

impl<'s> Walker<'s> {
    fn line(&self, offset: usize) -> usize {
        self.source[..offset.min(self.source.len())].matches('\n').count() + 1
    }

    fn problem(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let line = at.map(|o| self.line(o));
        self.problems.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reports keys of `table` not in `allowed`.
    fn unknown_keys(&mut self, table: &DeTable<'_>, prefix: &str, allowed: &[&str]) {
        for (key, _) in table.iter() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                let path = join(prefix, key.get_ref());
                let hint = format!("unknown key (expected one of: {})", allowed.join(", "));
                self.problem(Some(key.span().start), path, hint);
            }
        }
    }

    fn get<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        table.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
    }

    fn string<'t>(&mut self, table: &'t DeTable<'_>, prefix: &str, key: &str) -> Option<(&'t str, usize)> {
        let value = Self::get(table, key)?;
        match value.get_ref() {
            DeValue::String(s) => Some((s.as_ref(), value.span().start)),
            other => {
                let msg = format!("expected a string, found {}", other.type_str());
                self.problem(Some(value.span().start), join(prefix, key), msg);
                None
            }
        }
    }

    fn table<'t, 'i>(&mut self, root: &'t DeTable<'i>, key: &str) -> Option<&'t DeTable<'i>> {
        let value = Self::get(root, key)?;
        match value.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                let msg = format!("expected a table, found {}", other.type_str());
                self.problem(Some(value.span().start), key, msg);
                None
            }
        }
    }

    fn duration(&mut self, table: Option<&DeTable<'_>>, prefix: &str, key: &str, default: Duration) -> Duration {
        let Some(table) = table else { return default };
        match self.string(table, prefix, key) {
            None => default,
            Some((text, at)) => parse_duration(text).unwrap_or_else(|e| {
                self.problem(Some(at), join(prefix, key), e);
                default
            }),
        }
    }

    fn socket_addr(&mut self, table: Option<&DeTable<'_>>, key: &str, default: &str) -> SocketAddr {
        let fallback = || default.parse().expect("default addresses parse");
        let Some(table) = table else { return fallback() };
        match self.string(table, "listen", key) {
            None => fallback(),
            Some((text, at)) => text.parse().unwrap_or_else(|_| {
                let msg = format!("`{text}` is not an address like 0.0.0.0:8080");
                self.problem(Some(at), join("listen", key), msg);
                fallback()
            }),
        }
    }

    fn url(&mut self, table: Option<&DeTable<'_>>, key: &str, default: &str, schemes: &[&str]) -> String {
        let Some(table) = table else { return default.to_owned() };
        let Some((text, at)) = self.string(table, "kraken", key) else {
            return default.to_owned();
        };
        match reqwest::Url::parse(text) {
            Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => {
                text.trim_end_matches('/').to_owned()
            }
            _ => {
                let msg = format!("`{text}` is not a {} URL", schemes.join(" or "));
                self.problem(Some(at), join("kraken", key), msg);
                default.to_owned()
            }
        }
    }

    /// A table's `name`: present, `[a-z0-9_-]{1,64}`, and not seen before
    /// among the `kind`s (`account`, `consumer`).
    fn unique_name(
        &mut self,
        table: &DeTable<'_>,
        prefix: &str,
        at: usize,
        kind: &str,
        seen: &mut HashSet<String>,
    ) -> Option<String> {
        let key = format!("{prefix}.name");
        let Some((name, name_at)) = self.string(table, prefix, "name") else {
            if Self::get(table, "name").is_none() {
                self.problem(Some(at), key, "missing");
            }
            return None;
        };
        if !valid_name(name) {
            self.problem(Some(name_at), key, format!("`{name}` must match [a-z0-9_-]{{1,64}}"));
            return None;
        }
        if !seen.insert(name.to_owned()) {
            self.problem(Some(name_at), key, format!("{kind} `{name}` is defined twice"));
            return None;
        }
        Some(name.to_owned())
    }

    /// Reads a `{ file = "..." }` or `{ env = "..." }` secret.
    fn secret<R: SecretReader>(
        &mut self,
        reader: &R,
        table: &DeTable<'_>,
        prefix: &str,
        key: &str,
    ) -> Option<(SecretString, SecretSource)> {
        let value = Self::get(table, key)?;
        let at = Some(value.span().start);
        let path = join(prefix, key);
        let DeValue::Table(source) = value.get_ref() else {
            self.problem(
                at,
                path,
                "secrets never live in the config file: use { file = \"/path\" } or { env = \"VAR\" }",
            );
            return None;
        };
        self.unknown_keys(source, &path, &["file", "env"]);
        let file = self.string(source, &path, "file");
        let env = self.string(source, &path, "env");
        let (raw, origin) = match (file, env) {
            (Some((file, _)), None) => {
                let file = match expand_env(file, reader) {
                    Ok(expanded) => PathBuf::from(expanded),
                    Err(var) => {
                        let msg = format!("environment variable {var} (in the file path) is not set");
                        self.problem(at, path, msg);
                        return None;
                    }
                };
                match reader.file(&file) {
                    Ok(text) => (text, SecretSource::File(file)),
                    Err(e) => {
                        let msg = format!("cannot read secret file {}: {e}", file.display());
                        self.problem(at, path, msg);
                        return None;
                    }
                }
            }
            (None, Some((var, _))) => match reader.env(var) {
                Some(text) => (text, SecretSource::Env(var.to_owned())),
                None => {
                    self.problem(at, path, format!("environment variable {var} is not set"));
                    return None;
                }
            },
            _ => {
                self.problem(at, path, "give exactly one of file = \"/path\" or env = \"VAR\"");
                return None;
            }
        };
        let value = raw.trim_end_matches(['\n', '\r']).to_owned();
        if value.trim().is_empty() {
            self.problem(at, path, format!("the secret from {origin} is empty"));
            return None;
        }
        Some((SecretString::new(value), origin))
    }
}

/// Replaces each `${NAME}` in `text` with the environment variable NAME, so
/// one config can name a per-replica file (`/keys/${KTB_REPLICA}/api-key`).
/// Errs with the name of the first variable that is unset.
pub fn expand_env<R: SecretReader>(text: &str, reader: &R) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&reader.env(name).ok_or_else(|| name.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Array-of-tables entries under `key` (`[[account]]`), with their spans.
fn entries<'t, 'i>(walker: &mut Walker<'_>, root: &'t DeTable<'i>, key: &str) -> Vec<(usize, &'t DeTable<'i>)> {
    let Some(value) = Walker::get(root, key) else {
        return Vec::new();
    };
    let DeValue::Array(items) = value.get_ref() else {
        walker.problem(Some(value.span().start), key, format!("expected [[{key}]] tables"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.get_ref() {
            DeValue::Table(t) => out.push((item.span().start, t)),
            _ => walker.problem(Some(item.span().start), format!("{key}[{}]", i + 1), "expected a table"),
        }
    }
    out
}

impl Config {
    /// Loads and validates `path`, reading secrets from the real environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, &SystemSecrets)
    }

    pub fn load_with<R: SecretReader>(path: &Path, reader: &R) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            path: path.to_owned(),
            problems: vec![Problem {
                line: None,
                key: String::new(),
                message,
            }],
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read the config file: {e}")))?;
        Self::parse(&text, reader).map_err(|problems| ConfigError {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses config text; every problem is returned at once.
    pub fn parse<R: SecretReader>(text: &str, reader: &R) -> Result<Config, Vec<Problem>> {
        let mut w = Walker {
            source: text,
            problems: Vec::new(),
        };
        let root = match DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                let at = e.span().map(|s| s.start);
                let message = format!("not valid TOML: {}", e.message().trim());
                w.problem(at, "", message);
                return Err(w.problems);
            }
        };
        let root = root.get_ref();
        w.unknown_keys(root, "", &["listen", "kraken", "refresh", "account", "consumer"]);

        let listen_t = w.table(root, "listen");
        if let Some(t) = listen_t {
            w.unknown_keys(t, "listen", &["api", "admin"]);
        }
        let listen = ListenConfig {
            api: w.socket_addr(listen_t, "api", DEFAULT_API_LISTEN),
            admin: w.socket_addr(listen_t, "admin", DEFAULT_ADMIN_LISTEN),
        };
        if listen.api == listen.admin && listen.api.port() != 0 {
            w.problem(None, "listen", "api and admin must listen on different addresses");
        }

        let kraken_t = w.table(root, "kraken");
        if let Some(t) = kraken_t {
            w.unknown_keys(t, "kraken", &["rest_url", "ws_url", "timeout"]);
        }
        let kraken = KrakenConfig {
            rest_url: w.url(kraken_t, "rest_url", DEFAULT_REST_URL, &["https", "http"]),
            ws_url: w.url(kraken_t, "ws_url", DEFAULT_WS_URL, &["wss", "ws"]),
            timeout: w.duration(kraken_t, "kraken", "timeout", DEFAULT_KRAKEN_TIMEOUT),
        };
        if kraken.timeout.is_zero() || kraken.timeout > MAX_KRAKEN_TIMEOUT {
            w.problem(
                None,
                "kraken.timeout",
                format!("must be between 1s and {}s", MAX_KRAKEN_TIMEOUT.as_secs()),
            );
        }

        let refresh_t = w.table(root, "refresh");
        if let Some(t) = refresh_t {
            w.unknown_keys(
                t,
                "refresh",
                &[
                    "refresh_before_expiry",
                    "min_served_ttl",
                    "jitter",
                    "retry_initial",
                    "retry_max",
                ],
            );
        }
        let refresh = RefreshPolicy {
            refresh_before_expiry: w.duration(
                refresh_t,
                "refresh",
                "refresh_before_expiry",
                DEFAULT_REFRESH_BEFORE_EXPIRY,
            ),
            min_served_ttl: w.duration(refresh_t, "refresh", "min_served_ttl", DEFAULT_MIN_SERVED_TTL),
            jitter: w.duration(refresh_t, "refresh", "jitter", DEFAULT_JITTER),
            retry_initial: w.duration(refresh_t, "refresh", "retry_initial", DEFAULT_RETRY_INITIAL),
            retry_max: w.duration(refresh_t, "refresh", "retry_max", DEFAULT_RETRY_MAX),
        };
        check_refresh(&mut w, &refresh);

        let accounts = load_accounts(&mut w, root, reader);
        let account_names: HashSet<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
        let consumers = load_consumers(&mut w, root, &account_names);

        if w.problems.is_empty() {
            Ok(Config {
                listen,
                kraken,
                refresh,
                accounts,
                consumers,
            })
        } else {
            w.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(w.problems)
        }
    }

    /// A summary for people and logs: no secret, only where secrets come from.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let r = &self.refresh;
        let _ = writeln!(s, "listen: api {} admin {}", self.listen.api, self.listen.admin);
        let _ = writeln!(
            s,
            "kraken: rest {} ws {} timeout {}",
            self.kraken.rest_url,
            self.kraken.ws_url,
            humantime::format_duration(self.kraken.timeout)
        );
        let _ = writeln!(
            s,
            "refresh: {} before expiry (jitter {}), min served ttl {}, retry {}..{}",
            humantime::format_duration(r.refresh_before_expiry),
            humantime::format_duration(r.jitter),
            humantime::format_duration(r.min_served_ttl),
            humantime::format_duration(r.retry_initial),
            humantime::format_duration(r.retry_max),
        );
        let _ = writeln!(s, "accounts: {}", self.accounts.len());
        for a in &self.accounts {
            let sources: Vec<String> = a.sources.iter().map(|(k, src)| format!("{k} from {src}")).collect();
            let _ = writeln!(s, "  {}: {}", a.name, sources.join(", "));
        }
        let _ = writeln!(s, "consumers: {}", self.consumers.len());
        for c in &self.consumers {
            let _ = writeln!(s, "  {}: accounts {}", c.name, c.accounts.join(", "));
        }
        s
    }
}

fn check_refresh(w: &mut Walker<'_>, r: &RefreshPolicy) {
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    if r.min_served_ttl.is_zero() {
        w.problem(None, "refresh.min_served_ttl", "must be positive");
    }
    if r.refresh_before_expiry <= r.min_served_ttl {
        w.problem(
            None,
            "refresh.refresh_before_expiry",
            format!(
                "must exceed min_served_ttl ({}), or tokens stop being servable before a refresh starts",
                secs(r.min_served_ttl)
            ),
        );
    }
    if r.refresh_before_expiry + r.jitter >= TOKEN_LIFETIME {
        w.problem(
            None,
            "refresh.refresh_before_expiry",
            format!(
                "with jitter it must stay below Kraken's {} token lifetime",
                secs(TOKEN_LIFETIME)
            ),
        );
    }
    if r.retry_initial.is_zero() {
        w.problem(None, "refresh.retry_initial", "must be positive");
    }
    if r.retry_initial > r.retry_max {
        w.problem(None, "refresh.retry_initial", "must not exceed retry_max");
    }
    if r.retry_max > MAX_RETRY {
        w.problem(
            None,
            "refresh.retry_max",
            format!("must be at most {}", secs(MAX_RETRY)),
        );
    }
}

fn load_accounts<R: SecretReader>(w: &mut Walker<'_>, root: &DeTable<'_>, reader: &R) -> Vec<AccountConfig> {
    let mut accounts = Vec::new();
    let mut seen = HashSet::new();
    let tables = entries(w, root, "account");
    if tables.is_empty() && Walker::get(root, "account").is_none() {
        w.problem(
            None,
            "account",
            "no [[account]]: the broker needs at least one Kraken account",
        );
    }
    for (i, (at, t)) in tables.into_iter().enumerate() {
        let prefix = format!("account[{}]", i + 1);
        w.unknown_keys(t, &prefix, &["name", "api_key", "api_secret", "otp", "totp_secret"]);
        let name = w.unique_name(t, &prefix, at, "account", &mut seen);
        let prefix = name.as_ref().map_or(prefix, |n| format!("account `{n}`"));
        let mut sources = Vec::new();
        let mut require = |w: &mut Walker<'_>, key: &'static str| {
            if Walker::get(t, key).is_none() {
                w.problem(Some(at), format!("{prefix}.{key}"), "missing");
                return None;
            }
            let (value, source) = w.secret(reader, t, &prefix, key)?;
            sources.push((key, source));
            Some(value)
        };
        let api_key = require(w, "api_key");
        let api_secret = require(w, "api_secret");
        if let Some(key) = &api_key
            && key.expose().chars().any(|c| c.is_whitespace() || c.is_control())
        {
            w.problem(Some(at), format!("{prefix}.api_key"), "the API key holds whitespace");
        }
        let api_secret = api_secret.and_then(|s| match decode_secret(s.expose()) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                w.problem(Some(at), format!("{prefix}.api_secret"), e.to_string());
                None
            }
        });
        let otp = match (Walker::get(t, "otp").is_some(), Walker::get(t, "totp_secret").is_some()) {
            (true, true) => {
                w.problem(Some(at), prefix.clone(), "give otp or totp_secret, not both");
                None
            }
            (true, false) => w.secret(reader, t, &prefix, "otp").and_then(|(v, src)| {
                sources.push(("otp", src));
                Otp::static_password(v)
                    .map_err(|e| w.problem(Some(at), format!("{prefix}.otp"), e.to_string()))
                    .ok()
            }),
            (false, true) => w.secret(reader, t, &prefix, "totp_secret").and_then(|(v, src)| {
                sources.push(("totp_secret", src));
                Otp::totp_from_base32(&v)
                    .map_err(|e| w.problem(Some(at), format!("{prefix}.totp_secret"), e.to_string()))
                    .ok()
            }),
            (false, false) => None,
        };
        if let (Some(name), Some(api_key), Some(api_secret)) = (name, api_key, api_secret) {
            accounts.push(AccountConfig {
                name,
                credentials: ApiCredentials {
                    api_key,
                    api_secret,
                    otp,
                },
                sources,
            });
        }
    }
    accounts
}

fn load_consumers(w: &mut Walker<'_>, root: &DeTable<'_>, accounts: &HashSet<&str>) -> Vec<ConsumerConfig> {
    let mut consumers = Vec::new();
    let mut names = HashSet::new();
    let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
    let tables = entries(w, root, "consumer");
    if tables.is_empty() && Walker::get(root, "consumer").is_none() {
        w.problem(None, "consumer", "no [[consumer]]: nobody could fetch a token");
    }
    for (i, (at, t)) in tables.into_iter().enumerate() {
        let prefix = format!("consumer[{}]", i + 1);
        w.unknown_keys(t, &prefix, &["name", "credential_sha256", "accounts"]);
        let name = w.unique_name(t, &prefix, at, "consumer", &mut names);
        let prefix = name.as_ref().map_or(prefix, |n| format!("consumer `{n}`"));
        let hash = match w.string(t, &prefix, "credential_sha256") {
            Some((text, at)) => match parse_sha256(text) {
                Some(hash) => {
                    if let Some(other) = hashes.insert(hash, prefix.clone()) {
                        w.problem(
                            Some(at),
                            format!("{prefix}.credential_sha256"),
                            format!("the same credential as {other}: give each consumer its own"),
                        );
                    }
                    Some(hash)
                }
                None => {
                    w.problem(
                        Some(at),
                        format!("{prefix}.credential_sha256"),
                        "must be 64 hex characters (`kraken-token-broker credential new NAME` prints one)",
                    );
                    None
                }
            },
            None => {
                if Walker::get(t, "credential_sha256").is_none() {
                    w.problem(Some(at), format!("{prefix}.credential_sha256"), "missing");
                }
                None
            }
        };
        let granted = match Walker::get(t, "accounts") {
            None => {
                w.problem(Some(at), format!("{prefix}.accounts"), "missing");
                None
            }
            Some(value) => match value.get_ref() {
                DeValue::Array(items) if !items.is_empty() => {
                    let mut list = Vec::new();
                    for item in items.iter() {
                        match item.get_ref().as_str() {
                            Some(a) if accounts.contains(a) => {
                                if !list.iter().any(|x: &String| x == a) {
                                    list.push(a.to_owned());
                                }
                            }
                            Some(a) => w.problem(
                                Some(item.span().start),
                                format!("{prefix}.accounts"),
                                format!("no [[account]] is named `{a}`"),
                            ),
                            None => w.problem(
                                Some(item.span().start),
                                format!("{prefix}.accounts"),
                                "expected account names (strings)",
                            ),
                        }
                    }
                    Some(list)
                }
                _ => {
                    w.problem(
                        Some(value.span().start),
                        format!("{prefix}.accounts"),
                        "expected a non-empty list of account names",
                    );
                    None
                }
            },
        };
        if let (Some(name), Some(credential_sha256), Some(accounts)) = (name, hash, granted) {
            consumers.push(ConsumerConfig {
                name,
                credential_sha256,
                accounts,
            });
        }
    }
    consumers
}

/// 64 hex characters (either case) into 32 bytes.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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

        fn file(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"))
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
        assert_eq!(hex::encode(c.consumers[0].credential_sha256), HASH);
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
}
