//! `check-config --config FILE`: validates a config and prints a summary
//! with no secret in it. `--no-secrets` checks all but the secrets (for a
//! pipeline that has the rendered config but not the secret files);
//! `--live` also asks Kraken about each key, as `key info` does.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, ConfigError, NoSecrets};

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML config file.
    #[arg(long, env = "KTB_CONFIG")]
    pub config: PathBuf,
    /// Also ask Kraken about each account's key (GetApiKeyInfo: one call
    /// per key) and fail on a key the config would refuse.
    #[arg(long, conflicts_with = "no_secrets")]
    pub live: bool,
    /// Read no secret (API keys and secrets, OTP, TLS key, audit key, the
    /// pod's files): a placeholder stands in for each, so a pipeline that
    /// has the config but not the secrets checks everything else.
    #[arg(long)]
    pub no_secrets: bool,
}

pub async fn run(args: CheckConfigArgs) -> Result<(), super::Error> {
    let config = if args.no_secrets {
        let path = args.config.clone();
        crate::files::read_off_runtime(crate::files::READ_TIMEOUT, move || Config::load_with(&path, &NoSecrets))
            .await
            .unwrap_or_else(|timed_out| Err(ConfigError::whole(&args.config, timed_out.to_string())))?
    } else {
        Config::load_off_runtime(&args.config).await?
    };
    print!("{}", config.summary());
    for warning in &config.warnings {
        println!("warning: {}: {warning}", args.config.display());
    }
    if args.no_secrets {
        println!("secrets: not read (--no-secrets); their places are as listed");
    }
    if args.live {
        let accounts: Vec<_> = config.accounts.iter().collect();
        let (report, refused) = super::key::report(&config, &accounts).await?;
        print!("{report}");
        super::key::refused_error(refused)?;
    }
    println!("{}: OK", args.config.display());
    Ok(())
}
