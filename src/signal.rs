//! Process signals: one future for "stop" (SIGTERM or SIGINT) and a stream of
//! SIGHUP ("reload").

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on Unix");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}
