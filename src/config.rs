//! The broker's TOML configuration, typed at load.
//!
//! Loading goes in two steps. First the file is read into serde types, one
//! per section (`deny_unknown_fields`, every value [`Spanned`] so it keeps
//! its place in the file); a section that does not fit its type is reported
//! key by key, and the rest of it is still read. Then one validation pass
//! turns those into a [`Config`], reading each secret from its file or
//! environment variable and wrapping it at once in a redacting type. Every
//! problem is reported at once, each with its line; a `Config` in hand is
//! valid: addresses parse, durations are sane, secrets decode, and every
//! consumer names existing accounts.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::files::{
    FileBytes, FileError, FileText, MAX_CONFIG_BYTES, MAX_SECRET_BYTES, read_regular, read_regular_bytes,
};
use crate::kraken::{ApiCredentials, Otp, decode_secret};
use crate::secret::SecretString;
use crate::token::RefreshPolicy;
use crate::token::gate::DEFAULT_MAX_REJECTED_CALLS;
use crate::token::schedule::MAX_REJECTED_RETRY;

pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_REST_URL: &str = "https://api.kraken.com";
pub const DEFAULT_WS_URL: &str = "wss://ws-auth.kraken.com/v2";
pub const DEFAULT_KRAKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest Kraken call timeout accepted: longer only delays failover.
const MAX_KRAKEN_TIMEOUT: Duration = Duration::from_secs(120);
/// Kraken's token lifetime, which refresh settings must fit inside.
const TOKEN_LIFETIME: Duration = crate::token::MAX_TOKEN_LIFETIME;
/// The longest back-off accepted between retries.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// The shortest `retry_rejected`: tests use a second; production wants minutes.
const MIN_RETRY_REJECTED: Duration = Duration::from_secs(1);
/// The most `max_rejected_calls` accepted: more only invites a lockout.
const MAX_REJECTED_CALLS_LIMIT: u32 = 1000;

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

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    /// With `[listen.tls]`: the consumer API answers only TLS.
    pub tls: Option<TlsConfig>,
}

impl PartialEq for ListenConfig {
    /// The addresses, and whether TLS is on: what needs a restart to change.
    fn eq(&self, other: &Self) -> bool {
        self.api == other.api && self.admin == other.admin && self.tls.is_some() == other.tls.is_some()
    }
}

/// The consumer API's TLS: a server configuration built (and so checked) at
/// load, from the certificate chain, its key and, for mTLS, a client CA.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub server: std::sync::Arc<rustls::ServerConfig>,
    /// Client certificates are verified against `client_ca` (mTLS).
    pub mtls: bool,
    /// Where the material came from, for summaries.
    pub sources: Vec<(&'static str, SecretSource)>,
    /// SHA-256 of every file's bytes: a reload tells whether it changed.
    pub digest: [u8; 32],
}

/// Consumers authenticating with projected ServiceAccount tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// Checked in every review: `status.audiences` must hold it.
    pub audience: String,
    /// The API server's root, e.g. `https://kubernetes.default.svc`.
    pub api_url: String,
    /// The cluster CA (PEM) the API server's certificate is checked against.
    pub ca_pem: Vec<u8>,
    /// The broker's own projected token, re-read as the kubelet rotates it.
    pub token_file: PathBuf,
    /// How long a successful review is trusted (never past the token's exp).
    pub cache_ttl: Duration,
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

/// The audit trail: one JSON line per decision, tokens named by a keyed
/// fingerprint (HMAC-SHA256 under `key`).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub sink: AuditSink,
    pub key: crate::secret::SecretBytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KrakenConfig {
    pub rest_url: String,
    /// Handed to consumers beside each token.
    pub ws_url: String,
    pub timeout: Duration,
    /// Rejected calls (invalid key, signature, nonce, permission) allowed per
    /// 15-minute window across every account of this process.
    pub max_rejected_calls: u32,
}

/// One Kraken account: its name and what signs its calls.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    pub name: String,
    pub credentials: ApiCredentials,
    /// Where each secret came from, for summaries (never the values).
    pub sources: Vec<(&'static str, SecretSource)>,
    /// The key's "Key Expiration" at Kraken, as the operator set it there
    /// (Kraken has no endpoint that tells it).
    pub key_expires_at: Option<SystemTime>,
}

/// How a consumer proves who it is: exactly one per consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A bearer credential; only its SHA-256 is stored.
    Credential { sha256: [u8; 32] },
    /// A projected ServiceAccount token, checked with a TokenReview.
    ServiceAccount { namespace: String, service_account: String },
    /// A client certificate verified against `listen.tls.client_ca`, with
    /// this SAN.
    ClientCert { san: San },
}

/// A client certificate's subject alternative name, of its type: a DNS SAN
/// never proves a URI identity, nor a URI SAN a DNS one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Dns(String),
    /// A URI such as a SPIFFE ID.
    Uri(String),
}

impl San {
    /// Whether a verified certificate holds this SAN, in a SAN of its type
    /// (DNS names compared without regard to ASCII case, as DNS does).
    pub fn matches(&self, cert: &crate::tls::ClientCertificate) -> bool {
        match self {
            San::Dns(name) => cert.dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
            San::Uri(uri) => cert.uris.iter().any(|u| u == uri),
        }
    }

    /// A legacy `san = "..."`, typed by its form: a URI has a scheme (`x:`),
    /// which no DNS name can hold, so the reading is never ambiguous.
    fn from_legacy(text: String) -> Self {
        if text.contains(':') {
            San::Uri(text)
        } else {
            San::Dns(text)
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => write!(f, "DNS SAN {name}"),
            San::Uri(uri) => write!(f, "URI SAN {uri}"),
        }
    }
}

impl Identity {
    /// The kind, as logs and audit lines name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Credential { .. } => "credential",
            Identity::ServiceAccount { .. } => "service_account",
            Identity::ClientCert { .. } => "client_cert",
        }
    }
}

/// A consumer's request-rate limit: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// Engines fetch on start and on reconnect, so a consumer (which may be a
/// fleet of pods sharing one ServiceAccount) stays far below this; a loop at
/// full speed is held to it, and cannot crowd out the others.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    per_second: 50.0,
    burst: 200.0,
};

/// One consumer: who it is, how it proves it, what it may fetch, how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    pub name: String,
    pub identity: Identity,
    pub accounts: Vec<String>,
    pub rate_limit: RateLimit,
}

/// A whole, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub kraken: KrakenConfig,
    pub refresh: RefreshPolicy,
    pub accounts: Vec<AccountConfig>,
    pub consumers: Vec<ConsumerConfig>,
    pub kubernetes: Option<KubernetesConfig>,
    pub audit: Option<AuditConfig>,
    /// What is allowed but unwise (a secret file anyone may read).
    pub warnings: Vec<Problem>,
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
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// Reads secrets; a parameter so tests need not touch the process environment.
pub trait SecretReader {
    fn env(&self, var: &str) -> Option<String>;
    fn file(&self, path: &Path) -> Result<FileText, FileError>;
    /// A file's bytes, for secrets that need not be text.
    fn file_bytes(&self, path: &Path) -> Result<FileBytes, FileError> {
        self.file(path).map(|t| FileBytes {
            bytes: t.text.into_bytes(),
            world_readable: t.world_readable,
        })
    }
}

/// Reads from the real environment and filesystem: regular files only, of a
/// bounded size ([`read_regular`]).
pub struct SystemSecrets;

impl SecretReader for SystemSecrets {
    fn env(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn file(&self, path: &Path) -> Result<FileText, FileError> {
        read_regular(path, MAX_SECRET_BYTES)
    }

    fn file_bytes(&self, path: &Path) -> Result<FileBytes, FileError> {
        read_regular_bytes(path, MAX_SECRET_BYTES)
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

/// 64 hex characters (either case) into 32 bytes.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

// ---- the file as written: one serde type per section ------------------------

type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    api: Option<Text>,
    admin: Option<Text>,
    tls: Option<Spanned<TlsSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: Option<Spanned<SecretRef>>,
    key: Option<Spanned<SecretRef>>,
    client_ca: Option<Spanned<SecretRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesSection {
    audience: Option<Text>,
    api_url: Option<Text>,
    ca: Option<Spanned<SecretRef>>,
    token: Option<Spanned<SecretRef>>,
    cache_ttl: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSection {
    to: Option<Text>,
    fingerprint_key: Option<Spanned<SecretRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceAccountSection {
    namespace: Option<Text>,
    service_account: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientCertSection {
    dns: Option<Text>,
    uri: Option<Text>,
    /// The form before SAN types were told apart; read by its form, with a
    /// warning.
    san: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitSection {
    per_second: Option<Spanned<f64>>,
    burst: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KrakenSection {
    rest_url: Option<Text>,
    ws_url: Option<Text>,
    timeout: Option<Text>,
    max_rejected_calls: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshSection {
    refresh_before_expiry: Option<Text>,
    min_served_ttl: Option<Text>,
    jitter: Option<Text>,
    retry_initial: Option<Text>,
    retry_max: Option<Text>,
    retry_rejected: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountSection {
    name: Option<Text>,
    api_key: Option<Spanned<SecretRef>>,
    api_secret: Option<Spanned<SecretRef>>,
    otp: Option<Spanned<SecretRef>>,
    totp_secret: Option<Spanned<SecretRef>>,
    key_expires_at: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerSection {
    name: Option<Text>,
    credential_sha256: Option<Text>,
    kubernetes: Option<Spanned<ServiceAccountSection>>,
    client_cert: Option<Spanned<ClientCertSection>>,
    accounts: Option<Spanned<Vec<Text>>>,
    rate_limit: Option<Spanned<RateLimitSection>>,
}

/// Where a secret is, as written: `{ file = "..." }` or `{ env = "..." }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretPlace {
    file: Option<Text>,
    env: Option<Text>,
}

/// A secret field as written: a place, or (refused, and never echoed) a
/// value written into the config file itself.
#[derive(Debug)]
enum SecretRef {
    Inline,
    Place(SecretPlace),
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Refs;
        impl<'de> Visitor<'de> for Refs {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("{ file = \"/path\" } or { env = \"VAR\" }")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SecretRef, A::Error> {
                SecretPlace::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(SecretRef::Place)
            }
            // Anything else is a value written inline: accepted here so that
            // no error message can ever quote it; validation refuses it.
            fn visit_str<E>(self, _: &str) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_i64<E>(self, _: i64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_u64<E>(self, _: u64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_f64<E>(self, _: f64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_bool<E>(self, _: bool) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretRef, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SecretRef::Inline)
            }
        }
        deserializer.deserialize_any(Refs)
    }
}

/// The whole file as written, section by section. Entries keep the offset
/// of their table and the name they go by in messages.
#[derive(Default)]
struct Sections {
    listen: ListenSection,
    kraken: KrakenSection,
    refresh: RefreshSection,
    kubernetes: Option<(usize, KubernetesSection)>,
    audit: Option<(usize, AuditSection)>,
    accounts: Vec<Entry<AccountSection>>,
    consumers: Vec<Entry<ConsumerSection>>,
    has_accounts_key: bool,
    has_consumers_key: bool,
}

struct Entry<T> {
    at: usize,
    /// `account[2]` (by position) until the name is known to be good.
    position: String,
    section: T,
}

// ---- problems and their places -----------------------------------------------

/// Collects problems (and warnings) with lines computed from offsets.
struct Findings<'s> {
    source: &'s str,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    /// Keys already reported as malformed: not also reported as missing.
    malformed: HashSet<String>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn at<T>(value: &Spanned<T>) -> Option<usize> {
    Some(value.span().start)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" in the broker's words.
fn reword(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let expected = rest
        .split_once(", expected ")
        .map(|(_, list)| list.trim_start_matches("one of ").replace('`', ""));
    match expected {
        Some(list) => format!("unknown key (expected one of: {list})"),
        None => "unknown key".to_owned(),
    }
}

impl<'s> Findings<'s> {
    fn new(source: &'s str) -> Self {
        Self {
            source,
            problems: Vec::new(),
            warnings: Vec::new(),
            malformed: HashSet::new(),
        }
    }

    fn line(&self, offset: usize) -> usize {
        self.source[..offset.min(self.source.len())].matches('\n').count() + 1
    }

    fn place(&self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            line: offset.map(|o| self.line(o)),
            key: key.into(),
            message: message.into(),
        }
    }

    fn problem(&mut self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let p = self.place(offset, key, message);
        self.problems.push(p);
    }

    fn warning(&mut self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let p = self.place(offset, key, message);
        self.warnings.push(p);
    }

    /// Reports `key` as missing, unless it was there and malformed.
    fn missing(&mut self, offset: usize, key: String) {
        if !self.malformed.contains(&key) {
            self.problem(Some(offset), key, "missing");
        }
    }

    /// Reads one table into its section type. A key that does not fit (an
    /// unknown key, a wrong type) is reported and left out, and the rest of
    /// the table is read again, so every such key is reported at once.
    fn section<T: DeserializeOwned + Default>(&mut self, value: &Spanned<DeValue<'_>>, prefix: &str) -> T {
        let DeValue::Table(table) = value.get_ref() else {
            let msg = format!("expected a table, found {}", value.get_ref().type_str());
            self.problem(at(value), prefix, msg);
            return T::default();
        };
        let mut table = table.clone();
        // Each round removes one key: it ends.
        for _ in 0..=table.len() {
            let attempt = Spanned::new(value.span(), DeValue::Table(table.clone()));
            let error = match T::deserialize(ValueDeserializer::from(attempt)) {
                Ok(section) => return section,
                Err(error) => error,
            };
            let span = error.span().unwrap_or(value.span());
            let inside = |s: std::ops::Range<usize>| s.start <= span.start && span.start < s.end.max(s.start + 1);
            let culprit = table
                .iter()
                .find(|(k, v)| inside(k.span()) || inside(v.span()))
                .map(|(k, v)| (k.clone(), inside(v.span()) && !inside(k.span())));
            let message = reword(error.message());
            let Some((key, within_value)) = culprit else {
                self.problem(Some(span.start), prefix, message);
                return T::default();
            };
            let path = join(prefix, key.get_ref());
            // A key nested in the culprit's value (`api_key = { bogus = 1 }`):
            // name it in the path.
            let shown = match error.message().strip_prefix("unknown field `") {
                Some(rest) if within_value => join(&path, rest.split('`').next().unwrap_or("")),
                _ => path.clone(),
            };
            self.problem(Some(span.start), shown, message);
            self.malformed.insert(path);
            table.remove(&key);
        }
        T::default()
    }
}

/// Splits the root table into its sections.
fn read_sections(f: &mut Findings<'_>, root: &DeTable<'_>) -> Sections {
    let mut sections = Sections::default();
    for (key, value) in root.iter() {
        match key.get_ref().as_ref() {
            "listen" => sections.listen = f.section(value, "listen"),
            "kraken" => sections.kraken = f.section(value, "kraken"),
            "refresh" => sections.refresh = f.section(value, "refresh"),
            "kubernetes" => sections.kubernetes = Some((value.span().start, f.section(value, "kubernetes"))),
            "audit" => sections.audit = Some((value.span().start, f.section(value, "audit"))),
            "account" => {
                sections.has_accounts_key = true;
                sections.accounts = entries(f, value, "account");
            }
            "consumer" => {
                sections.has_consumers_key = true;
                sections.consumers = entries(f, value, "consumer");
            }
            other => f.problem(
                Some(key.span().start),
                other,
                "unknown key (expected one of: listen, kraken, refresh, kubernetes, audit, account, consumer)",
            ),
        }
    }
    sections
}

/// The `[[kind]]` tables, each read into its section type.
fn entries<T: DeserializeOwned + Default>(
    f: &mut Findings<'_>,
    value: &Spanned<DeValue<'_>>,
    kind: &str,
) -> Vec<Entry<T>> {
    let DeValue::Array(items) = value.get_ref() else {
        f.problem(at(value), kind, format!("expected [[{kind}]] tables"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let position = format!("{kind}[{}]", i + 1);
        // Messages name a table by its name once it is a good one.
        let named = match item.get_ref() {
            DeValue::Table(t) => t
                .get("name")
                .and_then(|n| n.get_ref().as_str())
                .filter(|n| valid_name(n))
                .map(|n| format!("{kind} `{n}`")),
            _ => None,
        };
        let section = f.section(item, named.as_deref().unwrap_or(&position));
        out.push(Entry {
            at: item.span().start,
            position,
            section,
        });
    }
    out
}

// ---- the validation pass ------------------------------------------------------

fn duration(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: Duration) -> Duration {
    let Some(text) = value else { return default };
    parse_duration(text.get_ref()).unwrap_or_else(|e| {
        f.problem(at(text), key, e);
        default
    })
}

fn socket_addr(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: &str) -> SocketAddr {
    let fallback = || default.parse().expect("default addresses parse");
    let Some(text) = value else { return fallback() };
    text.get_ref().parse().unwrap_or_else(|_| {
        let msg = format!("`{}` is not an address like 0.0.0.0:8080", text.get_ref());
        f.problem(at(text), key, msg);
        fallback()
    })
}

fn url(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: &str, schemes: &[&str]) -> String {
    let Some(text) = value else { return default.to_owned() };
    match reqwest::Url::parse(text.get_ref()) {
        Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => {
            text.get_ref().trim_end_matches('/').to_owned()
        }
        _ => {
            let msg = format!("`{}` is not a {} URL", text.get_ref(), schemes.join(" or "));
            f.problem(at(text), key, msg);
            default.to_owned()
        }
    }
}

fn offset(value: &Option<Text>) -> Option<usize> {
    value.as_ref().and_then(at)
}

fn validate_listen<R: SecretReader>(f: &mut Findings<'_>, s: &ListenSection, reader: &R) -> ListenConfig {
    let listen = ListenConfig {
        api: socket_addr(f, &s.api, "listen.api", DEFAULT_API_LISTEN),
        admin: socket_addr(f, &s.admin, "listen.admin", DEFAULT_ADMIN_LISTEN),
        tls: s.tls.as_ref().and_then(|tls| validate_tls(f, tls, reader)),
    };
    if listen.api == listen.admin && listen.api.port() != 0 {
        let place = offset(&s.admin).or(offset(&s.api));
        f.problem(place, "listen", "api and admin must listen on different addresses");
    }
    listen
}

/// `[listen.tls]`: the files are read and the server configuration built
/// now, so a broken certificate or a key that does not fit is a problem
/// with its line, and a reload with one is refused.
fn validate_tls<R: SecretReader>(f: &mut Findings<'_>, tls: &Spanned<TlsSection>, reader: &R) -> Option<TlsConfig> {
    use sha2::{Digest, Sha256};
    let t = tls.get_ref();
    let mut sources = Vec::new();
    let mut digest = Sha256::new();
    let mut read = |f: &mut Findings<'_>, key: &'static str, value: &Option<Spanned<SecretRef>>, required: bool| {
        let path = format!("listen.tls.{key}");
        let Some(value) = value else {
            if required {
                f.missing(tls.span().start, path);
            }
            return None;
        };
        let material = if key == "key" {
            Material::Secret
        } else {
            Material::Public
        };
        let (text, source) = secret(f, reader, value, &path, material)?;
        digest.update((text.expose().len() as u64).to_le_bytes());
        digest.update(text.expose().as_bytes());
        sources.push((key, source));
        Some((text, at(value)))
    };
    let cert = read(f, "cert", &t.cert, true);
    let key = read(f, "key", &t.key, true);
    let client_ca = read(f, "client_ca", &t.client_ca, false);
    let ((cert, cert_at), (key, _)) = (cert?, key?);
    let ca_text = client_ca.as_ref().map(|(ca, _)| ca.expose());
    match crate::tls::server_config(cert.expose(), key.expose(), ca_text) {
        Ok(server) => Some(TlsConfig {
            server: std::sync::Arc::new(server),
            mtls: client_ca.is_some(),
            sources,
            digest: digest.finalize().into(),
        }),
        Err(e) => {
            f.problem(cert_at, "listen.tls", e);
            None
        }
    }
}

/// The default places of a pod's own ServiceAccount token and cluster CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long a successful TokenReview is reused by default.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(30);
/// The longest accepted: a revoked ServiceAccount must stop working soon.
const MAX_REVIEW_CACHE_TTL: Duration = Duration::from_secs(600);

fn validate_kubernetes<R: SecretReader>(
    f: &mut Findings<'_>,
    section: Option<&(usize, KubernetesSection)>,
    reader: &R,
) -> Option<KubernetesConfig> {
    let (table_at, k) = section?;
    let audience = match &k.audience {
        Some(a) if !a.get_ref().trim().is_empty() => a.get_ref().trim().to_owned(),
        Some(a) => {
            f.problem(at(a), "kubernetes.audience", "must not be empty");
            return None;
        }
        None => {
            f.missing(*table_at, "kubernetes.audience".into());
            return None;
        }
    };
    let api_url = match &k.api_url {
        Some(text) => url_of(f, text, "kubernetes.api_url", &["https"]),
        None => match (
            reader.env("KUBERNETES_SERVICE_HOST"),
            reader.env("KUBERNETES_SERVICE_PORT"),
        ) {
            (Some(host), port) => {
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                Some(format!("https://{host}:{}", port.unwrap_or_else(|| "443".into())))
            }
            (None, _) => {
                f.problem(
                    Some(*table_at),
                    "kubernetes.api_url",
                    "not set, and KUBERNETES_SERVICE_HOST is not set either (outside a pod, give the API server's URL)",
                );
                None
            }
        },
    };
    let file_of = |value: &Option<Spanned<SecretRef>>, name: &str| -> Result<Option<PathBuf>, ()> {
        match value.as_ref().map(|v| v.get_ref()) {
            None => Ok(Some(Path::new(SERVICE_ACCOUNT_DIR).join(name))),
            Some(SecretRef::Place(SecretPlace {
                file: Some(path),
                env: None,
            })) => Ok(expand_env(path.get_ref(), reader).ok().map(PathBuf::from)),
            _ => Err(()),
        }
    };
    let read_file = |f: &mut Findings<'_>, key: &str, value: &Option<Spanned<SecretRef>>, name: &str| {
        let place = value.as_ref().and_then(at).or(Some(*table_at));
        match file_of(value, name) {
            Ok(Some(path)) => match reader.file(&path) {
                Ok(read) => Some((path, read.text)),
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", path.display());
                    f.problem(place, format!("kubernetes.{key}"), msg);
                    None
                }
            },
            _ => {
                let msg = "give { file = \"/path\" }: the file is re-read as the kubelet rotates it";
                f.problem(place, format!("kubernetes.{key}"), msg);
                None
            }
        }
    };
    let ca = read_file(f, "ca", &k.ca, "ca.crt");
    if let Some((path, pem)) = &ca
        && let Err(e) = crate::tls::certificates(pem, "ca")
    {
        f.problem(
            k.ca.as_ref().and_then(at).or(Some(*table_at)),
            "kubernetes.ca",
            format!("{}: {e}", path.display()),
        );
    }
    let token = read_file(f, "token", &k.token, "token");
    let cache_ttl = duration(f, &k.cache_ttl, "kubernetes.cache_ttl", DEFAULT_REVIEW_CACHE_TTL);
    if cache_ttl > MAX_REVIEW_CACHE_TTL {
        let msg = format!("must be at most {}s", MAX_REVIEW_CACHE_TTL.as_secs());
        f.problem(offset(&k.cache_ttl), "kubernetes.cache_ttl", msg);
    }
    Some(KubernetesConfig {
        audience,
        api_url: api_url?,
        ca_pem: ca?.1.into_bytes(),
        token_file: token?.0,
        cache_ttl,
    })
}

fn validate_audit<R: SecretReader>(
    f: &mut Findings<'_>,
    section: Option<&(usize, AuditSection)>,
    reader: &R,
) -> Option<AuditConfig> {
    let (table_at, a) = section?;
    let sink = match &a.to {
        None => AuditSink::Stdout,
        Some(to) if to.get_ref() == "stdout" => AuditSink::Stdout,
        Some(to) if to.get_ref().starts_with('/') => AuditSink::File(PathBuf::from(to.get_ref())),
        Some(to) => {
            f.problem(at(to), "audit.to", "\"stdout\", or an absolute file path to append to");
            AuditSink::Stdout
        }
    };
    let Some(key) = &a.fingerprint_key else {
        f.missing(*table_at, "audit.fingerprint_key".into());
        return None;
    };
    let (bytes, _) = secret_bytes(f, reader, key, "audit.fingerprint_key", Material::Secret)?;
    // Random bytes as they are; text (`openssl rand -hex 32`) without its
    // trailing newline, so a key's fingerprints stay the same either way.
    let key_bytes = match std::str::from_utf8(&bytes) {
        Ok(text) => text.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
        Err(_) => bytes,
    };
    if key_bytes.len() < MIN_AUDIT_KEY_BYTES {
        let msg = format!(
            "must be at least {MIN_AUDIT_KEY_BYTES} bytes (random bytes, or text such as `openssl rand -hex 32`)"
        );
        f.problem(at(key), "audit.fingerprint_key", msg);
        return None;
    }
    Some(AuditConfig {
        sink,
        key: crate::secret::SecretBytes::new(key_bytes),
    })
}

/// The shortest HMAC key the audit fingerprints accept.
const MIN_AUDIT_KEY_BYTES: usize = 16;

/// A URL of one of `schemes`, without a trailing slash.
fn url_of(f: &mut Findings<'_>, text: &Text, key: &str, schemes: &[&str]) -> Option<String> {
    match reqwest::Url::parse(text.get_ref()) {
        Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => {
            Some(text.get_ref().trim_end_matches('/').to_owned())
        }
        _ => {
            let msg = format!("`{}` is not a {} URL", text.get_ref(), schemes.join(" or "));
            f.problem(at(text), key, msg);
            None
        }
    }
}

fn validate_kraken(f: &mut Findings<'_>, s: &KrakenSection) -> KrakenConfig {
    let max_rejected_calls = match &s.max_rejected_calls {
        None => DEFAULT_MAX_REJECTED_CALLS,
        Some(n) => match u32::try_from(*n.get_ref()) {
            Ok(n) if (1..=MAX_REJECTED_CALLS_LIMIT).contains(&n) => n,
            _ => {
                let msg = format!(
                    "must be a whole number from 1 to {MAX_REJECTED_CALLS_LIMIT} (rejected calls per 15 minutes, all accounts)"
                );
                f.problem(at(n), "kraken.max_rejected_calls", msg);
                DEFAULT_MAX_REJECTED_CALLS
            }
        },
    };
    let kraken = KrakenConfig {
        rest_url: url(f, &s.rest_url, "kraken.rest_url", DEFAULT_REST_URL, &["https", "http"]),
        ws_url: url(f, &s.ws_url, "kraken.ws_url", DEFAULT_WS_URL, &["wss", "ws"]),
        timeout: duration(f, &s.timeout, "kraken.timeout", DEFAULT_KRAKEN_TIMEOUT),
        max_rejected_calls,
    };
    if kraken.timeout.is_zero() || kraken.timeout > MAX_KRAKEN_TIMEOUT {
        let msg = format!("must be between 1s and {}s", MAX_KRAKEN_TIMEOUT.as_secs());
        f.problem(offset(&s.timeout), "kraken.timeout", msg);
    }
    kraken
}

fn validate_refresh(f: &mut Findings<'_>, s: &RefreshSection) -> RefreshPolicy {
    let d = RefreshPolicy::DEFAULT;
    let r = RefreshPolicy {
        refresh_before_expiry: duration(
            f,
            &s.refresh_before_expiry,
            "refresh.refresh_before_expiry",
            d.refresh_before_expiry,
        ),
        min_served_ttl: duration(f, &s.min_served_ttl, "refresh.min_served_ttl", d.min_served_ttl),
        jitter: duration(f, &s.jitter, "refresh.jitter", d.jitter),
        retry_initial: duration(f, &s.retry_initial, "refresh.retry_initial", d.retry_initial),
        retry_max: duration(f, &s.retry_max, "refresh.retry_max", d.retry_max),
        retry_rejected: duration(f, &s.retry_rejected, "refresh.retry_rejected", d.retry_rejected),
    };
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    if r.min_served_ttl.is_zero() {
        f.problem(offset(&s.min_served_ttl), "refresh.min_served_ttl", "must be positive");
    }
    let before_expiry_at = offset(&s.refresh_before_expiry).or(offset(&s.min_served_ttl));
    if r.refresh_before_expiry <= r.min_served_ttl {
        f.problem(
            before_expiry_at,
            "refresh.refresh_before_expiry",
            format!(
                "must exceed min_served_ttl ({}), or tokens stop being servable before a refresh starts",
                secs(r.min_served_ttl)
            ),
        );
    }
    if r.refresh_before_expiry + r.jitter >= TOKEN_LIFETIME {
        f.problem(
            before_expiry_at.or(offset(&s.jitter)),
            "refresh.refresh_before_expiry",
            format!(
                "with jitter it must stay below Kraken's {} token lifetime",
                secs(TOKEN_LIFETIME)
            ),
        );
    }
    if r.retry_initial.is_zero() {
        f.problem(offset(&s.retry_initial), "refresh.retry_initial", "must be positive");
    }
    if r.retry_initial > r.retry_max {
        let place = offset(&s.retry_initial).or(offset(&s.retry_max));
        f.problem(place, "refresh.retry_initial", "must not exceed retry_max");
    }
    if r.retry_max > MAX_RETRY {
        let msg = format!("must be at most {}", secs(MAX_RETRY));
        f.problem(offset(&s.retry_max), "refresh.retry_max", msg);
    }
    if r.retry_rejected < MIN_RETRY_REJECTED || r.retry_rejected > MAX_REJECTED_RETRY {
        let msg = format!(
            "must be between {} and {} (it doubles up to {} after each rejection)",
            secs(MIN_RETRY_REJECTED),
            secs(MAX_REJECTED_RETRY),
            secs(MAX_REJECTED_RETRY)
        );
        f.problem(offset(&s.retry_rejected), "refresh.retry_rejected", msg);
    }
    r
}

/// A `[[kind]]` table's `name`: present, `[a-z0-9_-]{1,64}`, and not seen
/// before among the `kind`s. Returns the prefix messages use, and the name.
fn unique_name(
    f: &mut Findings<'_>,
    name: &Option<Text>,
    position: &str,
    table_at: usize,
    kind: &str,
    seen: &mut HashSet<String>,
) -> (String, Option<String>) {
    let key = format!("{position}.name");
    let Some(name) = name else {
        f.missing(table_at, key);
        return (position.to_owned(), None);
    };
    let text = name.get_ref();
    if !valid_name(text) {
        f.problem(at(name), key, format!("`{text}` must match [a-z0-9_-]{{1,64}}"));
        return (position.to_owned(), None);
    }
    let prefix = format!("{kind} `{text}`");
    if !seen.insert(text.clone()) {
        f.problem(
            at(name),
            format!("{prefix}.name"),
            format!("{kind} `{text}` is defined twice"),
        );
        return (prefix, None);
    }
    (prefix, Some(text.clone()))
}

/// Whether a file read through `{ file = ... }` holds a secret (a key, a
/// secret, a seed: anyone able to read it is worth a warning) or public
/// material (a certificate, a CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Material {
    Secret,
    Public,
}

/// Reads a secret's bytes from its place; the warning for a secret file
/// anyone may read.
fn secret_bytes<R: SecretReader>(
    f: &mut Findings<'_>,
    reader: &R,
    value: &Spanned<SecretRef>,
    path: &str,
    material: Material,
) -> Option<(Vec<u8>, SecretSource)> {
    let place = at(value);
    let SecretRef::Place(source) = value.get_ref() else {
        f.problem(
            place,
            path,
            "secrets never live in the config file: use { file = \"/path\" } or { env = \"VAR\" }",
        );
        return None;
    };
    match (&source.file, &source.env) {
        (Some(file), None) => {
            let file = match expand_env(file.get_ref(), reader) {
                Ok(expanded) => PathBuf::from(expanded),
                Err(var) => {
                    f.problem(
                        place,
                        path,
                        format!("environment variable {var} (in the file path) is not set"),
                    );
                    return None;
                }
            };
            match reader.file_bytes(&file) {
                Ok(read) => {
                    if read.world_readable && material == Material::Secret {
                        f.warning(
                            place,
                            path,
                            format!(
                                "secret file {} is readable by every user on the machine: make it 0600 or 0640 (in Kubernetes, the Secret volume's defaultMode)",
                                file.display()
                            ),
                        );
                    }
                    Some((read.bytes, SecretSource::File(file)))
                }
                Err(e) => {
                    f.problem(place, path, format!("cannot read secret file {}: {e}", file.display()));
                    None
                }
            }
        }
        (None, Some(var)) => match reader.env(var.get_ref()) {
            Some(text) => Some((text.into_bytes(), SecretSource::Env(var.get_ref().clone()))),
            None => {
                f.problem(
                    place,
                    path,
                    format!("environment variable {} is not set", var.get_ref()),
                );
                None
            }
        },
        _ => {
            f.problem(place, path, "give exactly one of file = \"/path\" or env = \"VAR\"");
            None
        }
    }
}

/// Reads a text secret from its place (trailing newline trimmed), wrapping
/// it at once.
fn secret<R: SecretReader>(
    f: &mut Findings<'_>,
    reader: &R,
    value: &Spanned<SecretRef>,
    path: &str,
    material: Material,
) -> Option<(SecretString, SecretSource)> {
    let place = at(value);
    let (bytes, origin) = secret_bytes(f, reader, value, path, material)?;
    let Ok(raw) = String::from_utf8(bytes) else {
        f.problem(place, path, format!("the secret from {origin} is not valid UTF-8 text"));
        return None;
    };
    let value = raw.trim_end_matches(['\n', '\r']).to_owned();
    if value.trim().is_empty() {
        f.problem(place, path, format!("the secret from {origin} is empty"));
        return None;
    }
    Some((SecretString::new(value), origin))
}

/// Validates the accounts; also returns every well-named account, valid or
/// not, so a consumer naming a broken account is not blamed for it too.
fn validate_accounts<R: SecretReader>(
    f: &mut Findings<'_>,
    entries: &[Entry<AccountSection>],
    present: bool,
    reader: &R,
) -> (Vec<AccountConfig>, HashSet<String>) {
    let mut accounts = Vec::new();
    let mut seen = HashSet::new();
    if entries.is_empty() && !present {
        f.problem(
            None,
            "account",
            "no [[account]]: the broker needs at least one Kraken account",
        );
    }
    for entry in entries {
        let a = &entry.section;
        let (prefix, name) = unique_name(f, &a.name, &entry.position, entry.at, "account", &mut seen);
        let mut sources = Vec::new();
        let mut require = |f: &mut Findings<'_>, key: &'static str, value: &Option<Spanned<SecretRef>>| {
            let path = format!("{prefix}.{key}");
            let Some(value) = value else {
                f.missing(entry.at, path);
                return None;
            };
            let (secret, source) = secret(f, reader, value, &path, Material::Secret)?;
            sources.push((key, source));
            Some((secret, at(value)))
        };
        let api_key = require(f, "api_key", &a.api_key);
        let api_secret = require(f, "api_secret", &a.api_secret);
        if let Some((key, place)) = &api_key
            && key.expose().chars().any(|c| c.is_whitespace() || c.is_control())
        {
            f.problem(*place, format!("{prefix}.api_key"), "the API key holds whitespace");
        }
        let api_secret = api_secret.and_then(|(s, place)| match decode_secret(s.expose()) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                f.problem(place, format!("{prefix}.api_secret"), e.to_string());
                None
            }
        });
        let otp = match (&a.otp, &a.totp_secret) {
            (Some(otp), Some(_)) => {
                f.problem(at(otp), prefix.clone(), "give otp or totp_secret, not both");
                None
            }
            (Some(value), None) => {
                let path = format!("{prefix}.otp");
                secret(f, reader, value, &path, Material::Secret).and_then(|(v, src)| {
                    sources.push(("otp", src));
                    Otp::static_password(v)
                        .map_err(|e| f.problem(at(value), path, e.to_string()))
                        .ok()
                })
            }
            (None, Some(value)) => {
                let path = format!("{prefix}.totp_secret");
                secret(f, reader, value, &path, Material::Secret).and_then(|(v, src)| {
                    sources.push(("totp_secret", src));
                    Otp::totp_from_base32(&v)
                        .map_err(|e| f.problem(at(value), path, e.to_string()))
                        .ok()
                })
            }
            (None, None) => None,
        };
        let key_expires_at = a.key_expires_at.as_ref().and_then(|text| {
            humantime::parse_rfc3339(text.get_ref().trim())
                .map_err(|_| {
                    let msg = format!(
                        "`{}` is not an RFC 3339 UTC time like 2027-03-01T00:00:00Z",
                        text.get_ref()
                    );
                    f.problem(at(text), format!("{prefix}.key_expires_at"), msg);
                })
                .ok()
        });
        if let (Some(name), Some((api_key, _)), Some(api_secret)) = (name, api_key, api_secret) {
            accounts.push(AccountConfig {
                name,
                credentials: ApiCredentials {
                    api_key,
                    api_secret,
                    otp,
                },
                sources,
                key_expires_at,
            });
        }
    }
    (accounts, seen)
}

fn validate_consumers(
    f: &mut Findings<'_>,
    entries: &[Entry<ConsumerSection>],
    present: bool,
    accounts: &HashSet<String>,
    ctx: &IdentityContext,
) -> Vec<ConsumerConfig> {
    let mut consumers = Vec::new();
    let mut names = HashSet::new();
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    if entries.is_empty() && !present {
        f.problem(None, "consumer", "no [[consumer]]: nobody could fetch a token");
    }
    for entry in entries {
        let c = &entry.section;
        let (prefix, name) = unique_name(f, &c.name, &entry.position, entry.at, "consumer", &mut names);
        let identity = consumer_identity(f, c, &prefix, entry.at, &mut hashes, ctx);
        let accounts_key = format!("{prefix}.accounts");
        let granted = match &c.accounts {
            None => {
                f.missing(entry.at, accounts_key);
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                f.problem(at(list), accounts_key, "expected a non-empty list of account names");
                None
            }
            Some(list) => {
                let mut granted: Vec<String> = Vec::new();
                for item in list.get_ref() {
                    let a = item.get_ref();
                    if !accounts.contains(a) {
                        f.problem(at(item), accounts_key.clone(), format!("no [[account]] is named `{a}`"));
                    } else if !granted.contains(a) {
                        granted.push(a.clone());
                    }
                }
                Some(granted)
            }
        };
        let rate_limit = consumer_rate_limit(f, c, &prefix);
        if let (Some(name), Some(identity), Some(accounts)) = (name, identity, granted) {
            consumers.push(ConsumerConfig {
                name,
                identity,
                accounts,
                rate_limit,
            });
        }
    }
    consumers
}

/// What the consumers' identities depend on elsewhere in the config.
struct IdentityContext {
    kubernetes: bool,
    mtls: bool,
}

/// The one identity a consumer has: a credential hash, a ServiceAccount, or
/// a client certificate's SAN. Each must be unique across consumers.
fn consumer_identity(
    f: &mut Findings<'_>,
    c: &ConsumerSection,
    prefix: &str,
    table_at: usize,
    seen: &mut BTreeMap<String, String>,
    ctx: &IdentityContext,
) -> Option<Identity> {
    let given = [
        c.credential_sha256.is_some(),
        c.kubernetes.is_some(),
        c.client_cert.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        1 => {}
        0 => {
            let key = format!("{prefix}.credential_sha256");
            if !f.malformed.contains(&key)
                && !f.malformed.contains(&format!("{prefix}.kubernetes"))
                && !f.malformed.contains(&format!("{prefix}.client_cert"))
            {
                f.problem(
                    Some(table_at),
                    prefix,
                    "give one identity: credential_sha256, kubernetes = { namespace, service_account } or client_cert = { dns = \"...\" } (or { uri = \"...\" })",
                );
            }
            return None;
        }
        _ => {
            f.problem(Some(table_at), prefix, "give exactly one identity, not several");
            return None;
        }
    }
    let mut unique = |f: &mut Findings<'_>, id: String, place: Option<usize>, key: String, what: &str| {
        if let Some(other) = seen.insert(id, prefix.to_owned()) {
            f.problem(
                place,
                key,
                format!("the same {what} as {other}: give each consumer its own"),
            );
            false
        } else {
            true
        }
    };
    if let Some(text) = &c.credential_sha256 {
        let key = format!("{prefix}.credential_sha256");
        let Some(sha256) = parse_sha256(text.get_ref()) else {
            f.problem(
                at(text),
                key,
                "must be 64 hex characters (`kraken-token-broker credential new NAME` prints one)",
            );
            return None;
        };
        let id = format!("credential:{}", hex::encode(sha256));
        return unique(f, id, at(text), key, "credential").then_some(Identity::Credential { sha256 });
    }
    if let Some(sa) = &c.kubernetes {
        let key = format!("{prefix}.kubernetes");
        if !ctx.kubernetes {
            f.problem(at(sa), key, "needs a [kubernetes] section (the TokenReview settings)");
            return None;
        }
        let part = |v: &Option<Text>| {
            v.as_ref()
                .map(|t| t.get_ref().trim().to_owned())
                .filter(|t| valid_k8s_name(t))
        };
        let (Some(namespace), Some(service_account)) =
            (part(&sa.get_ref().namespace), part(&sa.get_ref().service_account))
        else {
            f.problem(
                at(sa),
                key,
                "needs namespace and service_account, each a Kubernetes name ([a-z0-9.-], at most 253)",
            );
            return None;
        };
        let id = format!("sa:{namespace}:{service_account}");
        return unique(f, id, at(sa), key, "ServiceAccount").then_some(Identity::ServiceAccount {
            namespace,
            service_account,
        });
    }
    let cert = c.client_cert.as_ref()?;
    let key = format!("{prefix}.client_cert");
    if !ctx.mtls {
        f.problem(
            at(cert),
            key,
            "needs listen.tls.client_ca: client certificates are verified against it",
        );
        return None;
    }
    let san = client_cert_san(f, cert, &key)?;
    let id = format!("san:{san}");
    unique(f, id, at(cert), key, "client certificate SAN").then_some(Identity::ClientCert { san })
}

/// `client_cert = { dns = "..." }` or `{ uri = "..." }`; the legacy
/// `{ san = "..." }` is read by its form, with a warning naming the new one.
fn client_cert_san(f: &mut Findings<'_>, cert: &Spanned<ClientCertSection>, key: &str) -> Option<San> {
    let text = |v: &Option<Text>| {
        v.as_ref()
            .map(|t| t.get_ref().trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let c = cert.get_ref();
    let (dns, uri, legacy) = (text(&c.dns), text(&c.uri), text(&c.san));
    match (dns, uri, legacy) {
        (Some(dns), None, None) if !dns.contains(':') => Some(San::Dns(dns)),
        (Some(_), None, None) => {
            f.problem(
                at(cert),
                key,
                "dns must be a DNS name (no scheme): a URI SAN such as a SPIFFE ID is { uri = \"...\" }",
            );
            None
        }
        (None, Some(uri), None) if uri.contains(':') => Some(San::Uri(uri)),
        (None, Some(_), None) => {
            f.problem(
                at(cert),
                key,
                "uri must be a URI with a scheme, e.g. spiffe://trust-domain/path",
            );
            None
        }
        (None, None, Some(legacy)) => {
            let san = San::from_legacy(legacy);
            let new = match &san {
                San::Dns(name) => format!("{{ dns = \"{name}\" }}"),
                San::Uri(uri) => format!("{{ uri = \"{uri}\" }}"),
            };
            f.warning(
                at(cert),
                key,
                format!("`san` does not say which SAN type to match: read as the {san}; write client_cert = {new}"),
            );
            Some(san)
        }
        _ => {
            f.problem(
                at(cert),
                key,
                "give exactly one of dns = \"a.dns.name\" or uri = \"spiffe://...\" (the SAN type the certificate holds it in)",
            );
            None
        }
    }
}

/// A Kubernetes namespace or ServiceAccount name.
fn valid_k8s_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn consumer_rate_limit(f: &mut Findings<'_>, c: &ConsumerSection, prefix: &str) -> RateLimit {
    let Some(limit) = &c.rate_limit else {
        return DEFAULT_RATE_LIMIT;
    };
    let l = limit.get_ref();
    let per_second = l
        .per_second
        .as_ref()
        .map_or(DEFAULT_RATE_LIMIT.per_second, |v| *v.get_ref());
    let burst = l.burst.as_ref().map_or(per_second.max(1.0) * 3.0, |v| *v.get_ref());
    // The upper bounds only catch typos; a load generator playing many
    // engines as one consumer (bench/) needs the top of the range.
    let sane = per_second > 0.0 && per_second <= 1e6 && (1.0..=1e6).contains(&burst);
    if !sane {
        f.problem(
            at(limit),
            format!("{prefix}.rate_limit"),
            "per_second must be above 0 and burst at least 1 (each at most 1000000)",
        );
        return DEFAULT_RATE_LIMIT;
    }
    RateLimit { per_second, burst }
}

impl Config {
    /// Loads and validates `path`, reading secrets from the real environment
    /// and filesystem. Blocking: see [`Config::load_off_runtime`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, &SystemSecrets)
    }

    /// [`Config::load`] on tokio's blocking pool within
    /// [`crate::files::READ_TIMEOUT`], so a stalled file never blocks the
    /// runtime, a signal handler or a control loop.
    pub async fn load_off_runtime(path: &Path) -> Result<Config, ConfigError> {
        let owned = path.to_owned();
        crate::files::read_off_runtime(crate::files::READ_TIMEOUT, move || Self::load(&owned))
            .await
            .unwrap_or_else(|timed_out| Err(ConfigError::whole(path, timed_out.to_string())))
    }

    pub fn load_with<R: SecretReader>(path: &Path, reader: &R) -> Result<Config, ConfigError> {
        let text = read_regular(path, MAX_CONFIG_BYTES)
            .map_err(|e| ConfigError::whole(path, format!("cannot read the config file: {e}")))?
            .text;
        Self::parse(&text, reader).map_err(|problems| ConfigError {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses config text; every problem is returned at once, in file order.
    pub fn parse<R: SecretReader>(text: &str, reader: &R) -> Result<Config, Vec<Problem>> {
        let mut f = Findings::new(text);
        let root = match DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                let message = format!("not valid TOML: {}", e.message().trim());
                f.problem(e.span().map(|s| s.start), "", message);
                return Err(f.problems);
            }
        };
        let sections = read_sections(&mut f, root.get_ref());
        let listen = validate_listen(&mut f, &sections.listen, reader);
        let kraken = validate_kraken(&mut f, &sections.kraken);
        let refresh = validate_refresh(&mut f, &sections.refresh);
        let (accounts, named) = validate_accounts(&mut f, &sections.accounts, sections.has_accounts_key, reader);
        let kubernetes = validate_kubernetes(&mut f, sections.kubernetes.as_ref(), reader);
        let audit = validate_audit(&mut f, sections.audit.as_ref(), reader);
        let ctx = IdentityContext {
            kubernetes: sections.kubernetes.is_some(),
            mtls: sections
                .listen
                .tls
                .as_ref()
                .is_some_and(|t| t.get_ref().client_ca.is_some()),
        };
        let consumers = validate_consumers(&mut f, &sections.consumers, sections.has_consumers_key, &named, &ctx);
        if f.problems.is_empty() {
            Ok(Config {
                listen,
                kraken,
                refresh,
                accounts,
                consumers,
                kubernetes,
                audit,
                warnings: f.warnings,
            })
        } else {
            f.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            Err(f.problems)
        }
    }

    /// A summary for people and logs: no secret, only where secrets come from.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let r = &self.refresh;
        let tls = match &self.listen.tls {
            None => "plain HTTP".to_owned(),
            Some(t) => {
                let from: Vec<String> = t.sources.iter().map(|(k, src)| format!("{k} from {src}")).collect();
                format!(
                    "TLS{} ({})",
                    if t.mtls { " with client certificates" } else { "" },
                    from.join(", ")
                )
            }
        };
        let _ = writeln!(s, "listen: api {} ({tls}) admin {}", self.listen.api, self.listen.admin);
        if let Some(k) = &self.kubernetes {
            let _ = writeln!(
                s,
                "kubernetes: TokenReview at {} for audience {}, token file {}, cache {}",
                k.api_url,
                k.audience,
                k.token_file.display(),
                humantime::format_duration(k.cache_ttl)
            );
        }
        if let Some(a) = &self.audit {
            let to = match &a.sink {
                AuditSink::Stdout => "stdout".to_owned(),
                AuditSink::File(p) => p.display().to_string(),
            };
            let _ = writeln!(s, "audit: to {to}");
        }
        let _ = writeln!(
            s,
            "kraken: rest {} ws {} timeout {}",
            self.kraken.rest_url,
            self.kraken.ws_url,
            humantime::format_duration(self.kraken.timeout)
        );
        let _ = writeln!(
            s,
            "refresh: {} before expiry (jitter {}), min served ttl {}, retry {}..{}, rejected key retried after {} (doubling to {})",
            humantime::format_duration(r.refresh_before_expiry),
            humantime::format_duration(r.jitter),
            humantime::format_duration(r.min_served_ttl),
            humantime::format_duration(r.retry_initial),
            humantime::format_duration(r.retry_max),
            humantime::format_duration(r.retry_rejected),
            humantime::format_duration(MAX_REJECTED_RETRY),
        );
        let _ = writeln!(
            s,
            "kraken budget: {} rejected calls per 15 minutes, all accounts",
            self.kraken.max_rejected_calls
        );
        let _ = writeln!(s, "accounts: {}", self.accounts.len());
        for a in &self.accounts {
            let sources: Vec<String> = a.sources.iter().map(|(k, src)| format!("{k} from {src}")).collect();
            let expiry = a
                .key_expires_at
                .map(|t| format!(", key expires {}", humantime::format_rfc3339_seconds(t)))
                .unwrap_or_default();
            let _ = writeln!(s, "  {}: {}{expiry}", a.name, sources.join(", "));
        }
        let _ = writeln!(s, "consumers: {}", self.consumers.len());
        for c in &self.consumers {
            let who = match &c.identity {
                Identity::Credential { .. } => "credential".to_owned(),
                Identity::ServiceAccount {
                    namespace,
                    service_account,
                } => format!("ServiceAccount {namespace}/{service_account}"),
                Identity::ClientCert { san } => format!("client certificate with {san}"),
            };
            let _ = writeln!(
                s,
                "  {}: accounts {} ({who}, {}/s, burst {})",
                c.name,
                c.accounts.join(", "),
                c.rate_limit.per_second,
                c.rate_limit.burst
            );
        }
        s
    }
}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, too slow).
    pub fn whole(path: &Path, message: String) -> Self {
        Self {
            path: path.to_owned(),
            problems: vec![Problem {
                line: None,
                key: String::new(),
                message,
            }],
        }
    }
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
}
