//! `key info --config FILE [--account NAME]`: what Kraken says of each
//! account's key (`GetApiKeyInfo`): permissions, allowlist, nonce window,
//! expiry, last use; judged as the broker would. Never the key, the secret
//! or the account's IBAN. `check-config --live` prints the same.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Args, Subcommand};

use crate::config::{AccountConfig, Config};
use crate::kraken::key_info::PERMISSIONS;
use crate::kraken::{KeyCheck, KeyLane, KrakenClient, KrakenError, KrakenSource, Verdict};
use crate::token::TokenSource;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Ask Kraken about each account's key (GetApiKeyInfo) and print its
    /// settings, never the key or secret; exit 1 on a key the config would
    /// refuse or that cannot be read.
    Info(KeyInfoArgs),
}

#[derive(Debug, Args)]
pub struct KeyInfoArgs {
    /// The broker's TOML config file.
    #[arg(long, env = "KTB_CONFIG")]
    pub config: PathBuf,
    /// Only this account.
    #[arg(long)]
    pub account: Option<String>,
}

pub async fn run(command: KeyCommand) -> Result<(), super::Error> {
    let KeyCommand::Info(args) = command;
    let config = Config::load_off_runtime(&args.config).await?;
    let accounts: Vec<&AccountConfig> = match &args.account {
        None => config.accounts.iter().collect(),
        Some(name) => {
            let found: Vec<&AccountConfig> = config.accounts.iter().filter(|a| &a.name == name).collect();
            if found.is_empty() {
                return Err(super::Error::Usage(format!(
                    "no account `{name}` in {}",
                    args.config.display()
                )));
            }
            found
        }
    };
    let (report, refused) = report(&config, &accounts).await?;
    print!("{report}");
    refused_error(refused)
}

/// The accounts Kraken's answers refuse (or that could not be read), as the
/// command's outcome.
pub(super) fn refused_error(refused: Vec<String>) -> Result<(), super::Error> {
    if refused.is_empty() {
        return Ok(());
    }
    Err(super::Error::KeyRefused(format!(
        "the key of {} would be refused or could not be read",
        refused.join(", ")
    )))
}

/// Asks Kraken about each account's key, one after another: the report,
/// and the accounts whose key the config refuses or that failed.
pub(super) async fn report(
    config: &Config,
    accounts: &[&AccountConfig],
) -> Result<(String, Vec<String>), super::Error> {
    let client = KrakenClient::new(&config.kraken.rest_url, config.kraken.timeout)
        .map_err(|e| super::Error::Unreachable(format!("cannot build the Kraken client: {e}")))?;
    // One lane: the calls go one at a time, each nonce above the last.
    let lane = Arc::new(KeyLane::default());
    let mut out = String::new();
    let mut refused = Vec::new();
    for account in accounts {
        let source = KrakenSource::new(
            client.clone(),
            Arc::new(account.credentials.clone()),
            Arc::clone(&lane),
            account.forbid_permissions.clone(),
        );
        let key = crate::secret::fingerprint(account.credentials.api_key.expose().as_bytes());
        let answer = match source.inspect() {
            Some(inspect) => inspect.await,
            None => continue,
        };
        let usable = matches!(&answer, Ok(check) if check.verdict == Verdict::Usable);
        if !usable {
            refused.push(account.name.clone());
        }
        describe(&mut out, &account.name, &key, &answer, account);
    }
    Ok((out, refused))
}

fn when(t: Option<SystemTime>, none: &str) -> String {
    t.map_or_else(|| none.to_owned(), |t| humantime::format_rfc3339_seconds(t).to_string())
}

fn describe(out: &mut String, name: &str, key: &str, answer: &Result<KeyCheck, KrakenError>, account: &AccountConfig) {
    let check = match answer {
        Ok(check) => check,
        Err(error) => {
            let _ = writeln!(out, "account {name}: key {key}: GetApiKeyInfo failed: {error}");
            return;
        }
    };
    let info = &check.info;
    let verdict = match &check.verdict {
        Verdict::Usable => "usable".to_owned(),
        Verdict::MissingWsPermission => {
            "REFUSED: lacks create-ws-token (\"WebSocket interface\"), which GetWebSocketsToken needs".to_owned()
        }
        Verdict::TooPowerful(held) => format!("REFUSED: holds {}, which forbid_permissions refuses", held.join(", ")),
    };
    let _ = writeln!(out, "account {name}: key {key} (\"{}\"): {verdict}", info.name);
    let labelled: Vec<String> = info
        .permissions
        .iter()
        .map(|p| match PERMISSIONS.iter().find(|(n, _)| n == p) {
            Some((_, label)) => format!("{p} ({label})"),
            None => p.clone(),
        })
        .collect();
    let _ = writeln!(out, "  permissions:   {}", labelled.join(", "));
    let forbidden = if account.forbid_permissions.is_empty() {
        "none (forbid_permissions = [])".to_owned()
    } else {
        account.forbid_permissions.join(", ")
    };
    let _ = writeln!(out, "  forbidden:     {forbidden}");
    let allowlist = if info.ip_allowlist.is_empty() {
        "any address".to_owned()
    } else {
        info.ip_allowlist.join(", ")
    };
    let _ = writeln!(out, "  ip allowlist:  {allowlist}");
    let _ = writeln!(out, "  nonce window:  {}", info.nonce_window);
    let _ = writeln!(out, "  valid until:   {}", when(info.valid_until, "never"));
    if let (Some(configured), kraken) = (account.key_expires_at, info.valid_until)
        && Some(configured) != kraken
    {
        let _ = writeln!(
            out,
            "  warning:       key_expires_at ({}) differs from Kraken's; Kraken's is used",
            when(Some(configured), "never")
        );
    }
    let _ = writeln!(out, "  last used:     {}", when(info.last_used, "never"));
    let _ = writeln!(
        out,
        "  created:       {} (modified {})",
        when(info.created, "unknown"),
        when(info.modified, "unknown")
    );
    if let Some(foreign) = &check.foreign {
        let _ = writeln!(
            out,
            "  warning:       the key's nonce ({}) is ahead of this call's ({}): another signer uses the key",
            foreign.reported, foreign.own
        );
    }
}
