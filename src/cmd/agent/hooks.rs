//! What the agent does after each write, so an engine that reads the file
//! once learns of a new token: `--exec CMD` (run by `/bin/sh -c`, as Vault
//! Agent runs a template's command) and `--signal SIG` to the process whose
//! PID is in `--signal-pid-file`. A hook that fails is logged and the agent
//! goes on: the file is written either way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::AgentArgs;
use crate::cmd::Error;

/// The longest a `--exec` command may run before it is killed.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The signals `--signal` may send: those a program uses to be told to
/// reread something, or to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HookSignal {
    Hup,
    Usr1,
    Usr2,
    Int,
    Term,
}

impl HookSignal {
    fn raw(self) -> rustix::process::Signal {
        use rustix::process::Signal;
        match self {
            HookSignal::Hup => Signal::HUP,
            HookSignal::Usr1 => Signal::USR1,
            HookSignal::Usr2 => Signal::USR2,
            HookSignal::Int => Signal::INT,
            HookSignal::Term => Signal::TERM,
        }
    }
}

pub(super) struct Hooks {
    exec: Option<String>,
    signal: Option<(HookSignal, PathBuf)>,
    /// One run at a time, in the order the writes were made.
    running: tokio::sync::Mutex<()>,
}

impl Hooks {
    pub(super) fn new(args: &AgentArgs) -> Result<Self, Error> {
        let signal = match (args.signal, &args.signal_pid_file) {
            (Some(sig), Some(file)) => Some((sig, file.clone())),
            (None, None) => None,
            _ => {
                return Err(Error::Usage(
                    "--signal and --signal-pid-file go together: which signal, to the process whose PID is in which file"
                        .into(),
                ));
            }
        };
        if let Some(cmd) = &args.exec
            && cmd.trim().is_empty()
        {
            return Err(Error::Usage("--exec names no command".into()));
        }
        Ok(Self {
            exec: args.exec.clone(),
            signal,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs the hooks after the file at `path` was replaced.
    pub(super) async fn run(&self, path: &Path) {
        let _one_at_a_time = self.running.lock().await;
        if let Some(cmd) = &self.exec {
            exec(cmd, path).await;
        }
        if let Some((sig, file)) = &self.signal {
            match signal(*sig, file) {
                Ok(pid) => info!(pid, signal = ?sig, "signalled the engine"),
                Err(why) => warn!(file = %file.display(), %why, "cannot signal the engine"),
            }
        }
    }
}

/// What a `--exec` command inherits of the agent's environment: nothing
/// else (the agent's own environment holds the consumer's credential).
const EXEC_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Runs `cmd` with `/bin/sh -c`, `KTB_TOKEN_FILE` naming the file (never
/// the token, nor the consumer's credential, in its arguments or
/// environment), in a process group of its own, at most [`EXEC_TIMEOUT`]:
/// then the whole group is killed, so nothing it started lingers.
async fn exec(cmd: &str, path: &Path) {
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(cmd)
        .env_clear()
        .envs(EXEC_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| (k, v))))
        .env("KTB_TOKEN_FILE", path)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot run the --exec command (it needs /bin/sh in the agent's image)");
            return;
        }
    };
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?));
    match tokio::time::timeout(EXEC_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => info!("the --exec command ran"),
        Ok(Ok(status)) => warn!(%status, "the --exec command failed"),
        Ok(Err(e)) => warn!(error = %e, "the --exec command could not be waited for"),
        Err(_) => {
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            warn!(
                timeout_s = EXEC_TIMEOUT.as_secs(),
                "the --exec command ran too long: it and everything it started were killed"
            );
        }
    }
}

/// Sends `sig` to the PID in `file`; the PID on success.
fn signal(sig: HookSignal, file: &Path) -> Result<i32, String> {
    let text = crate::files::read_regular(file, 64)
        .map_err(|e| format!("cannot read the PID file: {e}"))?
        .text;
    let raw: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{}` is not a PID", text.trim()))?;
    // 0 and 1 would signal a group or the pod's init; negative numbers a group
    // (and rustix's Pid refuses them by panicking: checked first).
    let pid = (raw > 1)
        .then(|| rustix::process::Pid::from_raw(raw))
        .flatten()
        .ok_or_else(|| format!("{raw} is not the PID of an engine"))?;
    rustix::process::kill_process(pid, sig.raw()).map_err(|e| format!("kill {raw}: {e}"))?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_that_names_no_engine_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, why) in [
            ("1\n", "not the PID"),
            ("0", "not the PID"),
            ("-5", "not the PID"),
            ("abc", "not a PID"),
        ] {
            let file = dir.path().join("pid");
            std::fs::write(&file, text).unwrap();
            let refused = signal(HookSignal::Hup, &file).unwrap_err();
            assert!(refused.contains(why), "{text}: {refused}");
        }
        let missing = signal(HookSignal::Hup, &dir.path().join("none")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
