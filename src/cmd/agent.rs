//! `agent --url URL --out FILE`: a sidecar for engines that read a file
//! (C++ engines, scripts). It follows the broker's watch stream and keeps
//! FILE holding the current token's JSON (the body of `GET /v1/token`),
//! replaced atomically: a temporary file in the same directory, written,
//! fsynced, given its mode and owner, then renamed over FILE (and the
//! directory fsynced), so a reader sees the old token or the new one, never a
//! partial or empty file.
//!
//! It reconnects with exponential back-off and full jitter (honouring
//! `Retry-After`), treats a stream silent for [`IDLE_LIMIT`] (the broker
//! sends a keep-alive every 15 s) as lost, exits 0 on SIGTERM or SIGINT, and
//! non-zero only when the broker refuses the consumer for good (401, 403)
//! or FILE cannot be written. `--once` writes the current token and exits,
//! for init containers.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rand::RngExt as _;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Error;
use super::client::{Consumer, ConsumerArgs, detail_of, error_chain, retry_after};

/// A stream with no byte for this long is taken as lost.
pub const IDLE_LIMIT: Duration = Duration::from_secs(45);
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// The file kept holding the current token's JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// The file's mode, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub mode: u32,
    /// The file's owner, as UID or UID:GID (the agent must be allowed to
    /// give files away: root, or CAP_CHOWN).
    #[arg(long, value_parser = parse_owner)]
    pub owner: Option<Owner>,
    /// Write the current token once and exit (an init container).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: Option<u32>,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("`{text}` is not an octal mode like 600 or 640"))?;
    if mode & !0o777 != 0 {
        return Err(format!("`{text}`: only permission bits (at most 777)"));
    }
    if mode & 0o007 != 0 {
        return Err(format!(
            "`{text}` lets anyone read or write the token: give none to others (e.g. 600 or 640)"
        ));
    }
    Ok(mode)
}

fn parse_owner(text: &str) -> Result<Owner, String> {
    let bad = || format!("`{text}` is not UID or UID:GID (numbers)");
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    Ok(Owner {
        uid: uid.parse().map_err(|_| bad())?,
        gid: gid.map(|g| g.parse().map_err(|_| bad())).transpose()?,
    })
}

/// Why one connection ended.
enum End {
    /// The broker refused this consumer: stop.
    Refused(String),
    /// Try again after this long (a `Retry-After`), or after back-off.
    Retry(Option<Duration>, String),
    /// SIGTERM: stop cleanly.
    Stopped,
    /// `--once`: the file is written.
    Done,
    /// The broker ended the stream cleanly (a reload, its shutdown, or a
    /// ServiceAccount token to prove again): reconnect soon.
    Ended,
}

pub async fn run(args: AgentArgs) -> Result<(), Error> {
    let stop = crate::signal::shutdown_token();
    let consumer = Consumer::new(&args.consumer, None)?;
    let out = Output::new(&args)?;
    let mut attempt = 0u32;
    loop {
        let end = if args.once {
            once(&consumer, &out, &stop).await
        } else {
            follow(&consumer, &out, &stop, &mut attempt).await
        };
        let (wait, why) = match end {
            End::Stopped | End::Done => return Ok(()),
            End::Refused(why) => return Err(Error::Fetch(why)),
            End::Retry(wait, why) => (wait, why),
            End::Ended => {
                info!("the broker ended the watch stream; reconnecting");
                let delay = Duration::from_millis(rand::rng().random_range(100..=500));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        attempt = attempt.saturating_add(1);
        let delay = wait.unwrap_or_else(|| backoff(attempt));
        warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "watch stream lost; reconnecting");
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential back-off with full jitter: a random delay up to the doubled
/// base, so a fleet of agents does not reconnect in step.
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_INITIAL.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    base.mul_f64(rand::rng().random_range(0.5..=1.0))
}

fn classify(status: reqwest::StatusCode, retry: Option<Duration>, body: &str) -> End {
    let detail = detail_of(status, body);
    match status.as_u16() {
        401 | 403 => End::Refused(format!(
            "the broker refused this consumer (HTTP {}): {detail}",
            status.as_u16()
        )),
        _ => End::Retry(retry, format!("HTTP {}: {detail}", status.as_u16())),
    }
}

/// The broker could not be reached: try again after back-off.
fn unreachable(consumer: &Consumer, e: reqwest::Error) -> End {
    let why = format!(
        "cannot reach the broker at {}: {}",
        consumer.origin(),
        error_chain(&e.without_url())
    );
    End::Retry(None, why)
}

/// `--once`: `GET /v1/token`, write it, done.
async fn once(consumer: &Consumer, out: &Output, stop: &CancellationToken) -> End {
    let request = match consumer.get(consumer.url("/v1/token", &[])) {
        Ok(r) => r.timeout(Duration::from_secs(30)),
        Err(e) => return End::Refused(e.to_string()),
    };
    let response = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = request.send() => r,
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return unreachable(consumer, e),
    };
    let (status, retry) = (response.status(), retry_after(&response));
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return classify(status, retry, &body);
    }
    match out.write(&body).await {
        Ok(()) => End::Done,
        Err(e) => End::Refused(e),
    }
}

/// Follows the watch stream until it ends.
async fn follow(consumer: &Consumer, out: &Output, stop: &CancellationToken, attempt: &mut u32) -> End {
    let request = match consumer.get(consumer.url("/v1/token/watch", &[])) {
        Ok(r) => r,
        Err(e) => return End::Refused(e.to_string()),
    };
    let response = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        r = tokio::time::timeout(Duration::from_secs(30), request.send()) => r,
    };
    let mut response = match response {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return unreachable(consumer, e),
        Err(_) => return End::Retry(None, "the broker did not answer within 30 s".into()),
    };
    let (status, retry) = (response.status(), retry_after(&response));
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return classify(status, retry, &body);
    }
    info!(broker = %consumer.origin(), "following the watch stream");
    let mut parser = EventParser::default();
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            c = tokio::time::timeout(IDLE_LIMIT, response.chunk()) => c,
        };
        let bytes = match chunk {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return End::Ended,
            Ok(Err(e)) => return End::Retry(None, format!("the stream broke: {}", error_chain(&e.without_url()))),
            Err(_) => return End::Retry(None, format!("nothing from the broker for {} s", IDLE_LIMIT.as_secs())),
        };
        for (event, data) in parser.push(&bytes) {
            match event.as_str() {
                "token" => {
                    if let Err(e) = out.write(&data).await {
                        return End::Refused(e);
                    }
                    *attempt = 0;
                }
                "unavailable" => {
                    let detail = detail_of(reqwest::StatusCode::SERVICE_UNAVAILABLE, &data);
                    warn!(%detail, "the broker has no good token now; the file keeps the last one until it has");
                }
                _ => {}
            }
        }
    }
}

/// Server-Sent Events, as the broker sends them: `event:` and `data:` lines,
/// a blank line ending each; comments (`:`) are keep-alives.
#[derive(Default)]
struct EventParser {
    buffer: Vec<u8>,
}

impl EventParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let (mut event, mut data) = (String::from("message"), Vec::new());
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                }
            }
            if !data.is_empty() {
                events.push((event, data.join("\n")));
            }
        }
        // A stream that never ends its event cannot grow the buffer forever.
        if self.buffer.len() > 64 * 1024 {
            self.buffer.clear();
        }
        events
    }
}

/// Where and how the token file is written.
struct Output {
    path: PathBuf,
    dir: PathBuf,
    mode: u32,
    owner: Option<Owner>,
    last: std::sync::Mutex<Option<[u8; 32]>>,
}

impl Output {
    fn new(args: &AgentArgs) -> Result<Self, Error> {
        let path = args.out.clone();
        let name = path
            .file_name()
            .ok_or_else(|| Error::Usage(format!("--out {} names no file", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "--out {}: {} is not a directory",
                path.display(),
                dir.display()
            )));
        }
        if path.is_dir() {
            return Err(Error::Usage(format!(
                "--out {} is a directory",
                Path::new(name).display()
            )));
        }
        Ok(Self {
            path,
            dir,
            mode: args.mode,
            owner: args.owner,
            last: std::sync::Mutex::new(None),
        })
    }

    /// Replaces the file with `json` (unless it already holds that token).
    async fn write(&self, json: &str) -> Result<(), String> {
        let token = serde_json::from_str::<serde_json::Value>(json).ok().and_then(|v| {
            v["token"].as_str().map(|t| {
                (
                    Sha256::digest(t.as_bytes()),
                    v["expires_at"].as_str().map(str::to_owned),
                )
            })
        });
        let Some((sha, expires_at)) = token else {
            warn!("the broker sent a token event without a token; ignored");
            return Ok(());
        };
        let sha: [u8; 32] = sha.into();
        if *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) == Some(sha) {
            return Ok(());
        }
        let (path, dir, mode, owner) = (self.path.clone(), self.dir.clone(), self.mode, self.owner);
        let text = format!("{json}\n");
        tokio::task::spawn_blocking(move || replace(&path, &dir, text.as_bytes(), mode, owner))
            .await
            .map_err(|e| format!("writing {} failed: {e}", self.path.display()))?
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sha);
        info!(
            file = %self.path.display(),
            token = %hex::encode(&sha[..4]),
            expires_at = expires_at.as_deref().unwrap_or(""),
            "token file replaced"
        );
        Ok(())
    }
}

/// Write a temporary file beside `path`, fsync, chmod/chown, rename over
/// `path`, fsync the directory.
fn replace(path: &Path, dir: &Path, bytes: &[u8], mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        // The umask may have narrowed the mode at creation; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(owner) = owner {
            rustix::fs::fchown(
                &file,
                Some(rustix::fs::Uid::from_raw(owner.uid)),
                owner.gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_owners_are_parsed_strictly() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("644").is_err(), "world-readable is refused");
        assert!(parse_mode("1600").is_err());
        assert!(parse_mode("rw").is_err());
        let o = parse_owner("1000:2000").unwrap();
        assert_eq!((o.uid, o.gid), (1000, Some(2000)));
        assert_eq!(parse_owner("65532").unwrap().gid, None);
        assert!(parse_owner("root").is_err());
    }

    #[test]
    fn events_are_parsed_across_chunks_and_comments_skipped() {
        let mut p = EventParser::default();
        assert!(p.push(b": keep-alive\n\nevent: tok").is_empty());
        let events = p.push(b"en\ndata: {\"token\":\"a\"}\n\n: x\n\nevent: unavailable\ndata: {}\n\n");
        assert_eq!(
            events,
            vec![
                ("token".to_owned(), "{\"token\":\"a\"}".to_owned()),
                ("unavailable".to_owned(), "{}".to_owned())
            ]
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            let base = BACKOFF_INITIAL.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?}");
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }

    #[test]
    fn the_file_is_replaced_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        replace(&path, dir.path(), b"{\"token\":\"one\"}\n", 0o640, None).unwrap();
        replace(&path, dir.path(), b"{\"token\":\"two\"}\n", 0o640, None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"token\":\"two\"}\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
