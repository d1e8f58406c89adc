//! `audit fingerprint --config FILE`: prints the keyed fingerprint (HMAC-SHA256
//! under `[audit] fingerprint_key`) of a token read from stdin, as the audit
//! trail names it, so a security team can find which consumer received it.

use std::io::Read as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::Error;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the audit fingerprint of the token on stdin.
    Fingerprint(FingerprintArgs),
}

#[derive(Debug, Args)]
pub struct FingerprintArgs {
    /// The broker's config (its `[audit] fingerprint_key` is used).
    #[arg(long, env = "KTB_CONFIG")]
    pub config: PathBuf,
}

pub async fn run(command: AuditCommand) -> Result<(), Error> {
    let AuditCommand::Fingerprint(args) = command;
    let config = Config::load_off_runtime(&args.config).await?;
    let audit = config
        .audit
        .ok_or_else(|| Error::Usage(format!("{} has no [audit] section", args.config.display())))?;
    let mut token = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut token)
        .map_err(|e| Error::Usage(format!("cannot read the token from stdin: {e}")))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::Usage(
            "give the token on stdin (never as an argument: arguments show in ps)".into(),
        ));
    }
    println!("{}", crate::audit::fingerprint(audit.key.expose(), token));
    Ok(())
}
