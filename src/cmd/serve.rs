//! `serve --config FILE`: the broker.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tokio::net::TcpListener;
use tracing::info;

use crate::broker::{self, Listeners, Reloads};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::token::refresher::random_jitter;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML config file.
    #[arg(long, env = "KTB_CONFIG")]
    pub config: PathBuf,
    /// Also reload when the config or its secret files change, checking this
    /// often (e.g. 30s; a rotated Kubernetes Secret then needs no restart).
    /// SIGHUP reloads either way.
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub reload_poll: Option<std::time::Duration>,
}

/// Binds `addr`, naming the config key in the error.
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Signals first, so a SIGTERM during start-up is a clean stop.
    let shutdown = crate::signal::shutdown_token();
    let reload_events = crate::signal::reloads();
    let config = Config::load(&args.config)?;
    let reload_events = match args.reload_poll.filter(|d| !d.is_zero()) {
        Some(interval) => {
            // Both SIGHUP and the poller feed one channel.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut hup = reload_events;
            let forward = tx.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if forward.send(()).await.is_err() {
                        break;
                    }
                }
            });
            crate::reload::poll_sources(args.config.clone(), interval, tx);
            rx
        }
        None => reload_events,
    };
    let listeners = Listeners {
        api: bind(config.listen.api, "listen.api").await?,
        admin: bind(config.listen.admin, "listen.admin").await?,
    };
    info!(config = %args.config.display(), summary = %config.summary(), "config loaded");
    let reloads = Reloads {
        path: args.config,
        events: reload_events,
    };
    broker::run(
        config,
        listeners,
        Some(reloads),
        shutdown,
        Metrics::new(),
        random_jitter,
        Default::default(),
    )
    .await
}
