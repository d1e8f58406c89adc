//! Reloading: requests (SIGHUP, the poller, a test) are queued while one
//! read of the config and its secrets runs off the control loop; its result
//! is applied at once, with one typed [`ReloadOutcome`] from which the log
//! line, the metric and the audit line all come. They are written on the
//! control loop as the outcome is decided, so they follow the order of the
//! reloads and none is pending at shutdown; whoever asked is answered once
//! every refresher has its change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::Broker;
use super::accounts::ReloadSummary;
use crate::audit::{Auditor, Event, ReloadResult};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::telemetry::list;

/// What a reload ended in.
#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    /// In force: every refresher has taken its change.
    Applied(ReloadSummary),
    /// The new config is not valid: the running one stays in force.
    Refused(Arc<ConfigError>),
    /// The new config could not be read or put in force (a read that
    /// failed, a client that cannot be built): the running one stays.
    Failed(Arc<ReloadFailure>),
}

/// Why a valid config could not be read or put in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadFailure {
    #[error("the read of the config stopped: {0}")]
    Read(#[source] tokio::task::JoinError),
    #[error("the new config cannot be put in force: {0}")]
    Apply(#[source] super::Error),
}

impl ReloadOutcome {
    /// What changed, when the reload is in force.
    pub fn summary(&self) -> Option<&ReloadSummary> {
        match self {
            ReloadOutcome::Applied(summary) => Some(summary),
            _ => None,
        }
    }

    /// The problems, when the new config was refused.
    pub fn refusal(&self) -> Option<&ConfigError> {
        match self {
            ReloadOutcome::Refused(problems) => Some(problems),
            _ => None,
        }
    }

    /// The log line, the metric and the audit line of this outcome.
    fn report(&self, metrics: &Metrics, audit: Option<&Auditor>) {
        metrics.process().reload(self.summary().is_some());
        let event = match self {
            ReloadOutcome::Applied(s) => {
                info!(
                    added = list(&s.added),
                    changed = list(&s.changed),
                    removed = list(&s.removed),
                    "config reloaded"
                );
                Event::ConfigReloaded {
                    result: ReloadResult::Applied,
                    added: Some(s.added.clone()),
                    changed: Some(s.changed.clone()),
                    removed: Some(s.removed.clone()),
                }
            }
            ReloadOutcome::Refused(problems) => {
                error!(error = %problems, "config reload refused; the running config stays in force");
                Event::ConfigReloaded {
                    result: ReloadResult::Refused,
                    added: None,
                    changed: None,
                    removed: None,
                }
            }
            ReloadOutcome::Failed(why) => {
                error!(error = %why, "config reload failed; the running config stays in force");
                Event::ConfigReloaded {
                    result: ReloadResult::Failed,
                    added: None,
                    changed: None,
                    removed: None,
                }
            }
        };
        if let Some(audit) = audit {
            audit.record(event);
        }
    }
}

/// "Reload now" (SIGHUP, the poller, a test), with an optional place for
/// the outcome.
#[derive(Debug, Default)]
pub struct ReloadRequest {
    pub reply: Option<oneshot::Sender<ReloadOutcome>>,
}

/// Where reloads come from: the config file to re-read and a stream of
/// requests.
pub struct Reloads {
    pub path: PathBuf,
    pub requests: mpsc::Receiver<ReloadRequest>,
}

type Read = Result<Result<Config, ConfigError>, tokio::task::JoinError>;

/// The reload under way, and the requests waiting for the next one. One
/// read at a time: requests that come in meanwhile are served by the next
/// read, so none is answered with a config older than itself.
#[derive(Default)]
pub(super) struct ReloadQueue {
    reading: Option<JoinHandle<Result<Config, ConfigError>>>,
    /// Answered by the read under way.
    current: Vec<oneshot::Sender<ReloadOutcome>>,
    /// Came in during the read under way: answered by the next one.
    next: Vec<oneshot::Sender<ReloadOutcome>>,
    again: bool,
}

impl ReloadQueue {
    pub fn request(&mut self, request: ReloadRequest, path: &Path) {
        if self.reading.is_none() {
            self.current.extend(request.reply);
            self.start(path);
        } else {
            self.next.extend(request.reply);
            self.again = true;
        }
    }

    fn start(&mut self, path: &Path) {
        let path = path.to_owned();
        self.reading = Some(tokio::spawn(async move { Config::load_off_runtime(&path).await }));
    }

    /// The read under way, when one is.
    pub async fn read(&mut self) -> Read {
        match self.reading.as_mut() {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    }

    /// The read under way finished: the requests it answers, and whether to
    /// start the next one.
    pub fn finished(&mut self, path: &Path) -> Vec<oneshot::Sender<ReloadOutcome>> {
        self.reading = None;
        let answered = std::mem::take(&mut self.current);
        if std::mem::take(&mut self.again) {
            self.current = std::mem::take(&mut self.next);
            self.start(path);
        }
        answered
    }

    /// Stops a read under way (shutdown).
    pub fn abort(&mut self) {
        if let Some(reading) = self.reading.take() {
            reading.abort();
        }
    }
}

/// Applies a freshly read config and reports the outcome at once, on the
/// control loop; answers whoever asked once the change is in force (at once
/// when it was refused or failed).
pub(super) fn finish(broker: &mut Broker, read: Read, replies: Vec<oneshot::Sender<ReloadOutcome>>) {
    let (outcome, applied) = match read {
        Ok(Ok(config)) => {
            for warning in &config.warnings {
                warn!(warning = %warning, "config warning");
            }
            match broker.reload(config) {
                Ok((summary, applied)) => (ReloadOutcome::Applied(summary), applied),
                Err(error) => (ReloadOutcome::Failed(Arc::new(ReloadFailure::Apply(error))), Vec::new()),
            }
        }
        Ok(Err(problems)) => (ReloadOutcome::Refused(Arc::new(problems)), Vec::new()),
        Err(join) => (ReloadOutcome::Failed(Arc::new(ReloadFailure::Read(join))), Vec::new()),
    };
    outcome.report(&broker.options.metrics, broker.auditor.as_deref());
    if replies.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for change in applied {
            change.wait().await;
        }
        for reply in replies {
            let _ = reply.send(outcome.clone());
        }
    });
}
