//! The `kraken-token-broker` binary: parses the command line, starts logging,
//! runs one command of the library, and turns its outcome into an exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kraken_token_broker::cmd;
use kraken_token_broker::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "kraken-token-broker",
    version,
    about = "Holds a Kraken API key and hands WebSocket tokens to internal consumers"
)]
struct Cli {
    /// Log line format (logs go to stderr; `RUST_LOG` sets levels). Default:
    /// json for `serve`, text otherwise.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(cmd::serve::ServeArgs),
    /// Run a Kraken simulator and a broker wired to it (no key, no network).
    Demo(cmd::demo::DemoArgs),
    /// Run the Kraken simulator alone (REST GetWebSocketsToken and WebSocket v2).
    Simulate(cmd::simulate::SimulateArgs),
    /// Fetch a token as a consumer (credential from KTB_CONSUMER_CREDENTIAL).
    Fetch(cmd::fetch::FetchArgs),
    /// Keep a file holding the current token, following the broker (a sidecar).
    Agent(cmd::agent::AgentArgs),
    /// Manage consumer credentials.
    #[command(subcommand)]
    Credential(cmd::credential::CredentialCommand),
    /// Validate a config file and print a summary with no secret in it.
    CheckConfig(cmd::check_config::CheckConfigArgs),
    /// What Kraken says of the accounts' keys (GetApiKeyInfo).
    #[command(subcommand)]
    Key(cmd::key::KeyCommand),
    /// The audit trail's tools.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_format = match cli.command {
        Command::Serve(_) => LogFormat::Json,
        _ => LogFormat::Text,
    };
    telemetry::init(cli.log_format.unwrap_or(default_format), "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => cmd::serve::run(args).await,
            Command::Demo(args) => cmd::demo::run(args).await,
            Command::Simulate(args) => cmd::simulate::run(args).await,
            Command::Fetch(args) => cmd::fetch::run(args).await,
            Command::Agent(args) => cmd::agent::run(args).await,
            Command::Credential(command) => cmd::credential::run(command),
            Command::CheckConfig(args) => cmd::check_config::run(args).await,
            Command::Key(command) => cmd::key::run(command).await,
            Command::Audit(command) => cmd::audit::run(command).await,
        }
    });
    // Background tasks (a hung upstream call, an idle connection) must not
    // hold the exit: the outcome is decided.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let code = error.exit_code();
            // anyhow only here, at the edge: the error and its causes, one line.
            eprintln!("error: {:#}", anyhow::Error::from(error));
            ExitCode::from(code)
        }
    }
}
