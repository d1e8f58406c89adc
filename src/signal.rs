//! Process signals: one future for "stop" (SIGTERM or SIGINT) and a stream of
//! SIGHUP ("reload").

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. The handlers are
/// installed before this returns, so a signal arriving during start-up is a
/// clean stop rather than the default (abrupt) one.
pub fn shutdown_token() -> CancellationToken {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on Unix");
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        cancel.cancel();
    });
    token
}

/// A stream of SIGHUP events ("reload the config"). Bursts coalesce: a
/// reload already pending absorbs the next signal.
pub fn reloads() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler cannot fail on Unix");
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "reloading the config");
            if tx.try_send(()).is_err() && tx.is_closed() {
                break;
            }
        }
    });
    rx
}
