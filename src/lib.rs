//! kraken-token-broker: holds a Kraken API key and hands short-lived
//! WebSocket tokens to internal consumers.
#![forbid(unsafe_code)]

pub mod cmd;
pub mod kraken;
pub mod secret;
pub mod signal;
pub mod sim;
pub mod telemetry;
