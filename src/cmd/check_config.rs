//! `check-config --config FILE`: validates a config and prints a summary
//! with no secret in it.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The TOML config file.
    #[arg(long, env = "KTB_CONFIG")]
    pub config: PathBuf,
}

pub async fn run(args: CheckConfigArgs) -> Result<(), super::Error> {
    let config = Config::load_off_runtime(&args.config).await?;
    print!("{}", config.summary());
    for warning in &config.warnings {
        println!("warning: {}: {warning}", args.config.display());
    }
    println!("{}: OK", args.config.display());
    Ok(())
}
