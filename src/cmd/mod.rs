//! The commands of the `kraken-token-broker` binary, one module each, so that
//! `main.rs` only parses and dispatches.

pub mod agent;
pub mod audit;
pub mod check_config;
pub mod client;
pub mod credential;
pub mod demo;
pub mod fetch;
pub mod key;
pub mod serve;
pub mod simulate;

use std::net::SocketAddr;

/// Why a command failed: one line for the operator (the binary prints it,
/// with its causes, and exits non-zero).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] crate::broker::Error),
    #[error(transparent)]
    Simulator(#[from] crate::sim::StartError),
    #[error("the simulator stopped with an error")]
    SimulatorEnded(#[source] std::io::Error),
    #[error("the simulator's key cannot be used")]
    SimulatorKey(#[source] crate::kraken::sign::SecretDecodeError),
    /// The command line or environment is not usable as given.
    #[error("{0}")]
    Usage(String),
    /// The broker refused this consumer's identity or grant (401, 403).
    #[error("{0}")]
    Refused(String),
    /// The broker has no token for this consumer now (429, 503); the
    /// message says when to retry.
    #[error("{0}")]
    Unavailable(String),
    /// The broker could not be reached (refused, timed out, TLS failed).
    #[error("{0}")]
    Unreachable(String),
    /// Anything else a consumer command met (an unexpected answer, a file
    /// that cannot be written).
    #[error("{0}")]
    Fetch(String),
    #[error("a listener has no local address")]
    Listener(#[source] std::io::Error),
    /// Kraken's answer about a key (`GetApiKeyInfo`) refuses it, or none
    /// could be had.
    #[error("{0}")]
    KeyRefused(String),
}

/// Exit statuses of the commands, as README documents them.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any failure not named below.
    pub const FAILURE: u8 = 1;
    /// The command line or environment is not usable (clap's own, too).
    pub const USAGE: u8 = 2;
    /// The broker refused the consumer (401, 403): retrying will not help.
    pub const REFUSED: u8 = 3;
    /// The broker has no token now (429, 503): retry after what it said.
    pub const UNAVAILABLE: u8 = 4;
    /// The broker could not be reached.
    pub const UNREACHABLE: u8 = 5;
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Refused(_) => exit::REFUSED,
            Error::Unavailable(_) => exit::UNAVAILABLE,
            Error::Unreachable(_) => exit::UNREACHABLE,
            _ => exit::FAILURE,
        }
    }
}

/// Binds `addr`, naming the config key or flag in the error.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, what, source })
}
