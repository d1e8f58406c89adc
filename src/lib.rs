//! kraken-token-broker: holds a Kraken API key and hands short-lived
//! WebSocket tokens to internal consumers.
#![forbid(unsafe_code)]

pub mod kraken;
pub mod secret;
