//! The commands of the `kraken-token-broker` binary, one module each, so that
//! `main.rs` only parses and dispatches.

pub mod check_config;
pub mod credential;
pub mod demo;
pub mod fetch;
pub mod serve;
pub mod simulate;
