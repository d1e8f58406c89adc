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
    /// Answer `EGeneral:Permission denied`, as for a key without the
    /// "WebSocket interface" permission.
    #[arg(long)]
    pub no_ws_permission: bool,
    /// Invalid key/signature/nonce calls in a row before a temporary lockout.
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
    /// Apply the fault to this many calls only (default: until cleared).
    #[arg(long)]
    pub fault_count: Option<u32>,
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
            token: None,
            expires: None,
            count: None,
        };
        (spec != FaultSpec::default()).then_some(FaultSpec {
            count: self.fault_count,
            ..spec
        })
    }

    /// The simulator settings these flags describe.
    pub fn config(&self) -> SimConfig {
        let mut key = match (&self.api_key, &self.api_secret) {
            (Some(api_key), Some(api_secret)) => SimKey {
                api_key: api_key.clone(),
                api_secret: api_secret.clone(),
                otp: None,
                ws_permission: true,
            },
            _ => SimKey::generate(),
        };
        key.ws_permission = !self.no_ws_permission;
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
    let shutdown = crate::signal::shutdown_token();
    let handle = sim::start(config, listener, shutdown.clone())?;
    let base = handle.rest_url();
    println!("Kraken simulator listening on {}", handle.addr());
    println!("  REST:       {base}/0/private/GetWebSocketsToken");
    println!("  WebSocket:  {}", handle.ws_url());
    println!("  control:    {base}/_sim/state  (see README: faults, calls, tokens)");
    println!("  API key:    {}", key.api_key);
    println!("  API secret: {}", key.api_secret);
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
