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

pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    print!("{}", config.summary());
    println!("{}: OK", args.config.display());
    Ok(())
}
