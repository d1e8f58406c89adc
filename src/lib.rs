//! kraken-token-broker: holds a Kraken API key and hands short-lived
//! WebSocket tokens to internal consumers.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cmd;
pub mod config;
pub mod http;
pub mod kraken;
pub mod metrics;
pub mod reload;
pub mod secret;
pub mod signal;
pub mod sim;
pub mod telemetry;
pub mod token;
