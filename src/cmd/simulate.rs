//! `simulate`: the Kraken simulator on its own, for consumers' own tests.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::sim::{self, FaultSpec, SimConfig, SimKey, SimOtp, Tier};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on (REST and WebSocket on one port).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The API key to accept; a fresh pair is made and printed when left out.
    #[arg(long, env = "KTB_SIM_API_KEY", requires = "api_secret")]
    pub api_key: Option<String>,
    /// The API secret (standard base64) matching --api-key.
    #[arg(long, env = "KTB_SIM_API_SECRET", requires = "api_key", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Require this static 2FA password in every call.
    #[arg(long, conflicts_with = "totp_secret", hide_env_values = true)]
    pub otp: Option<String>,
    /// Require a TOTP code from this base32 seed in every call.
    #[arg(long)]
    pub totp_secret: Option<String>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_ttl: u64,
    /// Kraken account tier, which sets the REST call counter.
    #[arg(long, value_enum, default_value_t = Tier::Starter)]
    pub tier: Tier,
    /// The key's "WebSocket interface" permission; `false` answers
    /// `EGeneral:Permission denied` to GetWebSocketsToken.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_permission: bool,
    /// The same as `--ws-permission false` (kept for older scripts).
    #[arg(long, hide = true)]
    pub no_ws_permission: bool,
    /// The key's trading permission; `false` refuses WebSocket `add_order`
    /// and `cancel_order` with `EGeneral:Permission denied`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub trade_permission: bool,
    /// The key's "Custom Nonce Window", in nonce units (a nonce up to N
    /// below the highest seen is accepted once; 0: strictly increasing).
    #[arg(long, default_value_t = 0)]
    pub nonce_window: u64,
    /// The key's "Key Expiration" (RFC 3339); calls after it get
    /// `EAPI:Invalid key`.
    #[arg(long, value_name = "RFC3339")]
    pub key_expires: Option<String>,
    /// The key's "IP Address Restriction": addresses or CIDR ranges,
    /// comma-separated; calls from elsewhere get `EGeneral:Permission denied`.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub ip_allowlist: Vec<String>,
    /// The key's permissions in Kraken's names, comma-separated (e.g.
    /// `query-funds,modify-trades,create-ws-token,withdraw-funds`), as
    /// GetApiKeyInfo reports them; they decide --ws-permission and
    /// --trade-permission. Default: a trading key's set from those flags.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    pub permissions: Option<Vec<String>>,
    /// Failed calls (invalid key, signature, nonce, permission) from one
    /// address within the lockout window that lock the address out.
    #[arg(long, default_value_t = sim::state::DEFAULT_LOCKOUT_THRESHOLD)]
    pub lockout_threshold: u32,
    /// How long a lockout lasts, in seconds.
    #[arg(long, default_value_t = sim::state::DEFAULT_LOCKOUT_DURATION.as_secs())]
    pub lockout_secs: u64,
    /// Fault: answer this Kraken error string (e.g. "EService:Unavailable").
    #[arg(long)]
    pub fault_error: Option<String>,
    /// Fault: answer this HTTP status with an HTML body.
    #[arg(long)]
    pub fault_http_status: Option<u16>,
    /// Fault: wait this many milliseconds before answering.
    #[arg(long)]
    pub fault_delay_ms: Option<u64>,
    /// Fault: answer a body that is not JSON.
    #[arg(long)]
    pub fault_malformed: bool,
    /// Fault: answer a truncated JSON body.
    #[arg(long)]
    pub fault_truncated: bool,
    /// Fault: never answer.
    #[arg(long)]
    pub fault_hang: bool,
    /// Fault: with --fault-http-status, send this Retry-After (seconds).
    #[arg(long)]
    pub fault_retry_after: Option<u64>,
    /// Apply the fault to this many calls only (default: until cleared).
    #[arg(long)]
    pub fault_count: Option<u32>,
    /// The private method the fault applies to: GetWebSocketsToken (the
    /// default), GetApiKeyInfo, or `*` for every private call.
    #[arg(long, value_name = "METHOD")]
    pub fault_method: Option<String>,
}

impl SimulateArgs {
    fn fault(&self) -> Option<FaultSpec> {
        let spec = FaultSpec {
            error: self.fault_error.clone(),
            http_status: self.fault_http_status,
            delay_ms: self.fault_delay_ms,
            delay_jitter_ms: None,
            malformed: self.fault_malformed,
            truncated: self.fault_truncated,
            hang: self.fault_hang,
            retry_after_secs: self.fault_retry_after,
            token: None,
            expires: None,
            count: None,
            method: None,
        };
        (spec != FaultSpec::default()).then_some(FaultSpec {
            count: self.fault_count,
            method: self.fault_method.clone(),
            ..spec
        })
    }

    /// The simulator settings these flags describe.
    pub fn config(&self) -> SimConfig {
        let mut key = match (&self.api_key, &self.api_secret) {
            (Some(api_key), Some(api_secret)) => SimKey {
                api_key: api_key.clone(),
                api_secret: api_secret.clone(),
                ..SimKey::generate()
            },
            _ => SimKey::generate(),
        };
        key.ws_permission = self.ws_permission && !self.no_ws_permission;
        key.trade_permission = self.trade_permission;
        key.nonce_window = self.nonce_window;
        key.valid_until = self.key_expires.clone();
        key.ip_allowlist = self.ip_allowlist.clone();
        key.permissions = self.permissions.clone();
        key.otp = match (&self.otp, &self.totp_secret) {
            (Some(p), _) => Some(SimOtp::Password(p.clone())),
            (None, Some(s)) => Some(SimOtp::TotpSecret(s.clone())),
            (None, None) => None,
        };
        SimConfig {
            keys: vec![key],
            token_ttl: Duration::from_secs(self.token_ttl),
            tier: self.tier,
            lockout_threshold: self.lockout_threshold,
            lockout_duration: Duration::from_secs(self.lockout_secs),
            fault: self.fault(),
            ..SimConfig::default()
        }
    }
}

/// Runs the simulator until SIGINT or SIGTERM.
pub async fn run(args: SimulateArgs) -> Result<(), super::Error> {
    let config = args.config();
    let key = config.keys[0].clone();
    let listener = super::bind(args.listen, "--listen").await?;
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "WARNING: the simulator listens on {}, not on loopback: anyone who can reach it can read its API key and drive its control API (/_sim/). Use 127.0.0.1 unless you mean it.",
            args.listen
        );
    }
    let shutdown = crate::signal::shutdown_token();
    let handle = sim::start(config, listener, shutdown.clone())?;
    let base = handle.rest_url();
    println!("Kraken simulator listening on {}", handle.addr());
    println!("  REST:       {base}/0/private/GetWebSocketsToken");
    println!("  WebSocket:  {}", handle.ws_url());
    println!("  control:    {base}/_sim/state  (see README: faults, calls, tokens)");
    println!("  API key:    {}", key.api_key);
    if args.api_secret.is_some() {
        // Given by the user (a flag or KTB_SIM_API_SECRET): never echoed.
        println!("  API secret: as given (not shown)");
    } else {
        println!("  API secret: {}", key.api_secret);
    }
    println!(
        "  token lifetime {} s, tier {:?}{}",
        args.token_ttl,
        args.tier,
        if key.otp.is_some() { ", 2FA required" } else { "" }
    );
    println!("Press Ctrl-C to stop.");
    shutdown.cancelled().await;
    handle.shutdown().await.map_err(super::Error::SimulatorEnded)?;
    Ok(())
}
