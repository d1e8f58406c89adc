//! A Kraken simulator on 127.0.0.1:0.

use std::time::Duration;

use kraken_token_broker::sim::{self, SimConfig, SimHandle, SimKey};
use tokio_util::sync::CancellationToken;

/// Starts a simulator on an ephemeral loopback port.
pub async fn start_sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    sim::start(config, listener, CancellationToken::new()).expect("simulator starts")
}

/// A simulator with one generated key; returns the key too.
pub async fn sim_with_key(token_ttl: Duration) -> (SimHandle, SimKey) {
    let key = SimKey::generate();
    let sim = start_sim(SimConfig {
        keys: vec![key.clone()],
        token_ttl,
        ..SimConfig::default()
    })
    .await;
    (sim, key)
}
