//! The broker's TOML configuration, typed at load.
//!
//! Loading goes in two steps. First the file is read into serde types, one
//! per section (`deny_unknown_fields`, every value [`Spanned`](toml::Spanned)
//! so it keeps its place in the file); a section that does not fit its type is
//! reported key by key, and the rest of it is still read. Then one validation
//! pass turns those into a [`Config`], reading each secret from its file or
//! environment variable and wrapping it at once in a redacting type. Every
//! problem is reported at once, each with its line; a `Config` in hand is
//! valid: addresses parse, durations are sane, secrets decode, and every
//! consumer names existing accounts.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the typed [`Config`] and loading it |
//! | `raw` | the file as written: one serde type per section |
//! | `problems` | problems with their lines, and reading a section key by key |
//! | `secrets` | reading a secret from its file or variable |
//! | `values` | durations, addresses, URLs, names: one check each |
//! | `validate/` | one validator per section: listen, kraken and refresh, kubernetes, audit, accounts, consumers |
//! | `summary` | the summary for people and logs, with no secret in it |

mod problems;
mod raw;
mod secrets;
mod summary;
#[cfg(test)]
mod tests;
mod validate;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use toml::de::DeTable;

use crate::files::{MAX_CONFIG_BYTES, read_regular};
use crate::kraken::ApiCredentials;
use crate::token::RefreshPolicy;

pub use crate::identity::{Identity, San};
pub use problems::{ConfigError, Problem};
pub use secrets::{NoSecrets, SecretReader, SystemSecrets, expand_env};
pub use validate::kubernetes::DEFAULT_REVIEW_CACHE_TTL;
pub use values::{parse_duration, parse_sha256, valid_name};

pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
pub const DEFAULT_REST_URL: &str = "https://api.kraken.com";
pub const DEFAULT_WS_URL: &str = "wss://ws-auth.kraken.com/v2";
pub const DEFAULT_KRAKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of `[kraken] key_info_interval`. Each `GetApiKeyInfo` costs
/// one point of the key's call counter, which decays by at least 0.33 a
/// second (Starter tier): one call in ten minutes is 1/200 of what decays
/// meanwhile, and a key used elsewhere, or given a forbidden permission, is
/// seen within ten minutes.
pub const DEFAULT_KEY_INFO_INTERVAL: Duration = Duration::from_secs(600);
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
    /// How often each key is asked about itself (`GetApiKeyInfo`), besides
    /// at start and after a reload.
    pub key_info_interval: Duration,
}

/// One Kraken account: its name and what signs its calls.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    pub name: String,
    pub credentials: ApiCredentials,
    /// Where each secret came from, for summaries (never the values).
    pub sources: Vec<(&'static str, SecretSource)>,
    /// The key's "Key Expiration" at Kraken, as the operator set it there:
    /// used only while Kraken's own answer (`GetApiKeyInfo`) cannot be read.
    pub key_expires_at: Option<SystemTime>,
    /// Kraken's names of the permissions this account's key must not hold.
    pub forbid_permissions: Vec<String>,
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
    /// What it may do through the relay (`GET /v1/relay`).
    pub relay: RelayPolicy,
    /// `relay_only = true`: `/v1/token` and `/v1/token/watch` refuse it.
    pub relay_only: bool,
}

/// A consumer's relay settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPolicy {
    /// `relay.allow`: the methods (`add_order`) and method:channel pairs
    /// (`subscribe:executions`) it may send; `None`: every method.
    pub allow: Option<Vec<RelayGrant>>,
    /// `relay.max_connections`: relay connections open at once.
    pub max_connections: usize,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        Self {
            allow: None,
            max_connections: DEFAULT_RELAY_CONNECTIONS,
        }
    }
}

/// Relay connections a consumer may hold open when `relay.max_connections`
/// is not set.
pub const DEFAULT_RELAY_CONNECTIONS: usize = 64;

/// One entry of `relay.allow`: a method, and for `subscribe` and
/// `unsubscribe`, optionally one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayGrant {
    pub method: String,
    pub channel: Option<String>,
}

impl RelayPolicy {
    /// Whether `method` (with `channel`, for `subscribe`/`unsubscribe`) is
    /// allowed. `ping` always is: it carries nothing and keeps a
    /// connection alive.
    pub fn allows(&self, method: &str, channel: Option<&str>) -> bool {
        let Some(allow) = &self.allow else {
            return true;
        };
        method == "ping"
            || allow
                .iter()
                .any(|g| g.method == method && (g.channel.is_none() || g.channel.as_deref() == channel))
    }
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
        let mut f = problems::Findings::new(text);
        let root = match DeTable::parse(text) {
            Ok(root) => root,
            Err(e) => {
                let message = format!("not valid TOML: {}", e.message().trim());
                f.problem(e.span().map(|s| s.start), "", message);
                return Err(f.problems);
            }
        };
        let sections = raw::read_sections(&mut f, root.get_ref());
        let listen = validate::listen::listen(&mut f, &sections.listen, reader);
        let kraken = validate::kraken::kraken(&mut f, &sections.kraken);
        let refresh = validate::kraken::refresh(&mut f, &sections.refresh);
        let (accounts, named) =
            validate::accounts::accounts(&mut f, &sections.accounts, sections.has_accounts_key, reader);
        let kubernetes = validate::kubernetes::kubernetes(&mut f, sections.kubernetes.as_ref(), reader);
        let audit = validate::audit::audit(&mut f, sections.audit.as_ref(), reader);
        let ctx = validate::consumers::IdentityContext {
            kubernetes: sections.kubernetes.is_some(),
            mtls: sections
                .listen
                .tls
                .as_ref()
                .is_some_and(|t| t.get_ref().client_ca.is_some()),
        };
        let consumers =
            validate::consumers::consumers(&mut f, &sections.consumers, sections.has_consumers_key, &named, &ctx);
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
}
