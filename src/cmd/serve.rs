//! `serve --config FILE`: the broker.

use std::path::PathBuf;

use clap::Args;
use tracing::{info, warn};

use super::{Error, bind};
use crate::broker::{self, Listeners, Options, ReloadRequest, Reloads};
use crate::config::Config;

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

pub async fn run(args: ServeArgs) -> Result<(), Error> {
    // Signals first, so a SIGTERM during start-up is a clean stop.
    let shutdown = crate::signal::shutdown_token();
    let mut hup = crate::signal::reloads();
    // The config is read off the runtime, with a deadline, while SIGTERM
    // still stops the process.
    let config = tokio::select! {
        loaded = Config::load_off_runtime(&args.config) => loaded?,
        _ = shutdown.cancelled() => {
            info!("stopped during start-up");
            return Ok(());
        }
    };
    for warning in &config.warnings {
        warn!(warning = %warning, "config warning");
    }
    if let Some(crate::config::AuditConfig {
        sink: crate::config::AuditSink::File(path),
        ..
    }) = &config.audit
    {
        let path_owned = path.clone();
        crate::files::read_off_runtime(crate::files::READ_TIMEOUT, move || crate::audit::open(&path_owned))
            .await
            .map_err(|e| Error::Usage(format!("cannot open the audit file {}: {e}", path.display())))?
            .map_err(|e| {
                Error::Usage(format!(
                    "cannot open the audit file {} for appending: {e}",
                    path.display()
                ))
            })?;
    }
    // The connection caps are sized to the open files the process may have.
    let open_files = crate::http::server::raise_open_files_limit();
    let limits = crate::http::server::ServerLimits::default().fitting(open_files);
    info!(
        open_files,
        max_connections = limits.max_connections,
        "connection limits"
    );
    // SIGHUP and the poller feed one channel; a pending request absorbs the
    // next one.
    let (requests, reload_requests) = tokio::sync::mpsc::channel(1);
    let forward = requests.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if forward.try_send(ReloadRequest::default()).is_err() && forward.is_closed() {
                break;
            }
        }
    });
    if let Some(interval) = args.reload_poll.filter(|d| !d.is_zero()) {
        crate::broker::poll::poll_sources(args.config.clone(), interval, requests).await;
    }
    let listeners = Listeners {
        api: bind(config.listen.api, "listen.api").await?,
        admin: bind(config.listen.admin, "listen.admin").await?,
    };
    info!(config = %args.config.display(), summary = %config.summary(), "config loaded");
    let reloads = Reloads {
        path: args.config,
        requests: reload_requests,
    };
    let options = Options {
        limits,
        ..Options::default()
    };
    broker::run(config, listeners, Some(reloads), shutdown, options).await?;
    Ok(())
}
