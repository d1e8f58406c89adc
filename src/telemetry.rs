//! Logging: `tracing` to stderr, JSON by default for log pipelines, text for
//! people (`--log-format text`); `RUST_LOG` picks levels (default `info`).
//!
//! Nothing secret reaches here by construction: secrets are types whose
//! `Debug`/`Display` print a redaction, and tokens are logged only by
//! fingerprint.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber. `default_directive` applies when
/// `RUST_LOG` is unset, e.g. `info`.
pub fn init(format: LogFormat, default_directive: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directive));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A list of names as a log field: a JSON array in JSON logs (through
/// `valuable`, enabled by `.cargo/config.toml`), a comma-joined string
/// where that is not compiled in.
#[cfg(tracing_unstable)]
#[allow(clippy::ptr_arg)] // `valuable` takes a sized value
pub fn list(items: &Vec<String>) -> impl tracing::Value + '_ {
    tracing::field::valuable(items)
}

/// A list of names as a log field (see the `tracing_unstable` version).
#[cfg(not(tracing_unstable))]
#[allow(clippy::ptr_arg)]
pub fn list(items: &Vec<String>) -> impl tracing::Value + '_ {
    tracing::field::display(items.join(","))
}
