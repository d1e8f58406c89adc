//! `demo`: the Kraken simulator and a broker wired to it, on a fresh machine
//! with no key and no network. One account `demo`, one consumer
//! `demo-engine`; tokens live a minute so a refresh shows within one.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::{Error, bind};
use crate::broker::{self, Listeners, Options};
use crate::config::{AccountConfig, Config, ConsumerConfig, DEFAULT_RATE_LIMIT, Identity, KrakenConfig, ListenConfig};
use crate::identity::credential::new_credential;
use crate::kraken::{ApiCredentials, decode_secret};
use crate::secret::SecretString;
use crate::sim::{self, SimConfig, SimKey};
use crate::token::RefreshPolicy;
use crate::token::gate::DEFAULT_MAX_REJECTED_CALLS;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the consumer API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Where the Kraken simulator listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sim_listen: SocketAddr,
    /// Lifetime of the simulator's tokens, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(20..=900))]
    pub token_ttl: u64,
}

/// The demo's refresh policy for a token lifetime: refresh at half-life,
/// never serve the last sixth.
fn demo_policy(ttl: Duration) -> RefreshPolicy {
    RefreshPolicy {
        refresh_before_expiry: ttl / 2,
        min_served_ttl: ttl / 6,
        jitter: ttl / 12,
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(15),
        ..RefreshPolicy::default()
    }
}

pub async fn run(args: DemoArgs) -> Result<(), Error> {
    let shutdown = crate::signal::shutdown_token();

    let ttl = Duration::from_secs(args.token_ttl);
    let key = SimKey::generate();
    let sim_listener = bind(args.sim_listen, "--sim-listen").await?;
    if !args.sim_listen.ip().is_loopback() {
        eprintln!(
            "WARNING: the demo's simulator listens on {}, not on loopback: anyone who can reach it can drive its control API (/_sim/).",
            args.sim_listen
        );
    }
    let api = bind(args.api_listen, "--api-listen").await?;
    let admin = bind(args.admin_listen, "--admin-listen").await?;
    let sim = sim::start(
        SimConfig {
            keys: vec![key.clone()],
            token_ttl: ttl,
            ..SimConfig::default()
        },
        sim_listener,
        shutdown.clone(),
    )?;

    let (credential, credential_sha256) = new_credential();
    let config = Config {
        listen: ListenConfig {
            api: api.local_addr().map_err(Error::Listener)?,
            admin: admin.local_addr().map_err(Error::Listener)?,
            tls: None,
        },
        kraken: KrakenConfig {
            rest_url: sim.rest_url(),
            ws_url: sim.ws_url(),
            timeout: Duration::from_secs(5),
            max_rejected_calls: DEFAULT_MAX_REJECTED_CALLS,
            key_info_interval: crate::config::DEFAULT_KEY_INFO_INTERVAL,
        },
        refresh: demo_policy(ttl),
        accounts: vec![AccountConfig {
            name: "demo".into(),
            credentials: ApiCredentials {
                api_key: SecretString::new(key.api_key.clone()),
                api_secret: decode_secret(&key.api_secret).map_err(Error::SimulatorKey)?,
                otp: None,
            },
            sources: Vec::new(),
            key_expires_at: None,
            forbid_permissions: crate::kraken::key_info::DEFAULT_FORBIDDEN
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
        }],
        consumers: vec![ConsumerConfig {
            name: "demo-engine".into(),
            identity: Identity::Credential {
                sha256: credential_sha256,
            },
            accounts: vec!["demo".into()],
            rate_limit: DEFAULT_RATE_LIMIT,
            relay: Default::default(),
            relay_only: false,
        }],
        kubernetes: None,
        audit: None,
        warnings: Vec::new(),
    };
    print_banner(&config, credential.expose(), &sim.rest_url(), args.token_ttl);
    let listeners = Listeners { api, admin };
    let result = broker::run(config, listeners, None, shutdown.clone(), Options::default()).await;
    shutdown.cancel();
    let _ = sim.wait().await;
    Ok(result?)
}

/// How to run this binary from the user's shell: `kraken-token-broker` when
/// that is what the PATH finds, else its path (relative to the working
/// directory when it is under it, as `./target/release/...`).
struct Command {
    shown: String,
    on_path: bool,
}

fn this_command() -> Command {
    const NAME: &str = "kraken-token-broker";
    let exe = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .filter_map(|dir| std::fs::canonicalize(dir.join(NAME)).ok())
            .next()
            .is_some_and(|found| Some(found) == exe)
    });
    if on_path {
        return Command {
            shown: NAME.to_owned(),
            on_path,
        };
    }
    let shown = match (&exe, std::env::current_dir().and_then(std::fs::canonicalize)) {
        (Some(exe), Ok(cwd)) => exe
            .strip_prefix(&cwd)
            .map_or_else(|_| exe.display().to_string(), |rel| format!("./{}", rel.display())),
        (Some(exe), Err(_)) => exe.display().to_string(),
        (None, _) => NAME.to_owned(),
    };
    Command { shown, on_path }
}

fn print_banner(config: &Config, credential: &str, sim_url: &str, ttl: u64) {
    let command = this_command();
    let api = format!("http://{}", config.listen.api);
    let admin = format!("http://{}", config.listen.admin);
    println!(
        r#"
kraken-token-broker demo: a Kraken simulator and a broker wired to it.
No network and no real key are used.{where_}

  account:   demo              (the simulator's generated API key)
  consumer:  demo-engine
  credential (shown once):
    export KTB_CONSUMER_CREDENTIAL={credential}

Fetch a token (in another terminal, after the export above):
  curl -s -H "Authorization: Bearer $KTB_CONSUMER_CREDENTIAL" {api}/v1/token
  curl -s -H "Authorization: Bearer $KTB_CONSUMER_CREDENTIAL" "{api}/v1/token?min_ttl=30"
  {bin} fetch --url {api}

Follow every new token (a stream), or keep a file holding it:
  curl -sN -H "Authorization: Bearer $KTB_CONSUMER_CREDENTIAL" {api}/v1/token/watch
  {bin} agent --url {api} --out ./ktb/token.json

Report a token Kraken rejected (the broker mints a new one):
  curl -s -X POST -H "Authorization: Bearer $KTB_CONSUMER_CREDENTIAL" -H 'Content-Type: application/json' \
       -d '{{"token":"<token>"}}' "{api}/v1/token/invalidate?account=demo"
Or revoke every token at the simulator (an engine's WebSocket then gets `Invalid session`; report it as above):
  curl -s -X POST {sim_url}/_sim/tokens/revoke

Operate it:
  curl -s {admin}/readyz
  curl -s {admin}/metrics | grep '^kraken_token_broker'

The simulator (use the token on its WebSocket, or break it):
  WebSocket:  {ws}
  a fault:    curl -X PUT -H 'Content-Type: application/json' {sim_url}/_sim/fault -d '{{"error":"EService:Unavailable"}}'
  heal it:    curl -X DELETE {sim_url}/_sim/fault

Tokens live {ttl} s here (900 s at Kraken), so a refresh shows in the log about
every {half} s. Ctrl-C stops.{install}
"#,
        ws = config.kraken.ws_url,
        bin = command.shown,
        install = if command.on_path {
            ""
        } else {
            "\n`cargo install --path . --locked` puts `kraken-token-broker` on your PATH\n(in ~/.cargo/bin); the lines above use the binary where it was built."
        },
        half = ttl / 2,
        where_ = if on_loopback(config) {
            " Everything runs on loopback."
        } else {
            ""
        },
    );
    if !on_loopback(config) {
        eprintln!(
            "WARNING: the demo listens on {} and {}, not only on loopback: anyone who can reach these ports can fetch tokens with the credential above and read metrics.",
            config.listen.api, config.listen.admin
        );
    }
}

fn on_loopback(config: &Config) -> bool {
    config.listen.api.ip().is_loopback() && config.listen.admin.ip().is_loopback()
}
