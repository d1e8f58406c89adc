//! `credential new NAME`: a fresh consumer credential, shown once, and the
//! `[[consumer]]` block holding only its SHA-256.

use clap::{Args, Subcommand};

use crate::config::valid_name;
use crate::identity::credential::new_credential;

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Print a new random consumer credential and its config block.
    New(NewArgs),
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The consumer's name, [a-z0-9_-]{1,64}.
    pub name: String,
    /// An account the consumer may fetch (repeat for several).
    #[arg(long = "account", value_name = "ACCOUNT")]
    pub accounts: Vec<String>,
}

pub fn run(command: CredentialCommand) -> Result<(), super::Error> {
    let CredentialCommand::New(args) = command;
    if !valid_name(&args.name) {
        return Err(super::Error::Usage(format!(
            "the consumer name `{}` must match [a-z0-9_-]{{1,64}}",
            args.name
        )));
    }
    if let Some(bad) = args.accounts.iter().find(|a| !valid_name(a)) {
        return Err(super::Error::Usage(format!(
            "the account name `{bad}` must match [a-z0-9_-]{{1,64}}"
        )));
    }
    let (credential, hash) = new_credential();
    let accounts = if args.accounts.is_empty() {
        "[\"main\"]  # the accounts this consumer may fetch".to_owned()
    } else {
        format!(
            "[{}]",
            args.accounts
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    println!(
        "Credential for consumer `{}` (shown once: put it in the engine's secret store):",
        args.name
    );
    println!();
    println!("  {}", credential.expose());
    println!();
    println!("The engine sends it as `Authorization: Bearer <credential>`. Add this to the broker's");
    println!("config; it holds only the credential's SHA-256:");
    println!();
    println!("[[consumer]]");
    println!("name = \"{}\"", args.name);
    println!("credential_sha256 = \"{}\"", hex::encode(hash));
    println!("accounts = {accounts}");
    println!();
    println!("Or, with the Helm chart, under `consumers` in your values:");
    println!();
    println!("  - name: {}", args.name);
    println!("    credentialSha256: \"{}\"", hex::encode(hash));
    println!("    accounts: {}", accounts.replace('"', ""));
    Ok(())
}
