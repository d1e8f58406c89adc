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
    /// Log line format (logs go to stderr; `RUST_LOG` sets levels).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Kraken simulator alone (REST GetWebSocketsToken and WebSocket v2).
    Simulate(cmd::simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format.unwrap_or(LogFormat::Text);
    telemetry::init(format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Simulate(args) => cmd::simulate::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
