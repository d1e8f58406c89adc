//! The commands of the `kraken-token-broker` binary, one module each, so that
//! `main.rs` only parses and dispatches.

pub mod simulate;
