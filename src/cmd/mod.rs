//! The commands of the `kraken-token-broker` binary, one module each, so that
//! `main.rs` only parses and dispatches.

pub mod agent;
pub mod audit;
pub mod check_config;
pub mod client;
pub mod credential;
pub mod demo;
pub mod fetch;
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
    /// The broker refused a consumer's fetch, or could not be reached.
    #[error("{0}")]
    Fetch(String),
    #[error("a listener has no local address")]
    Listener(#[source] std::io::Error),
}

/// Binds `addr`, naming the config key or flag in the error.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, what, source })
}
