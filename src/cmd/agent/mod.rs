//! `agent --url URL --out FILE`: a sidecar for engines that read a file
//! (C++ engines, scripts). It follows the broker's watch stream and keeps
//! FILE holding the current token's JSON (the body of `GET /v1/token`),
//! replaced atomically: a temporary file in the same directory, written,
//! fsynced, given its mode and owner, then renamed over FILE (and the
//! directory fsynced), so a reader sees the old token or the new one, never a
//! partial or empty file.
//!
//! The directory is held open and every file in it is made relative to it:
//! the temporary file has an unpredictable name and is created exclusively,
//! never through a link (`O_EXCL | O_NOFOLLOW`). A directory other users may
//! write is refused unless it is sticky and the agent's own (a planted file
//! or link there could take the token); a missing directory is made, the
//! agent's own and private, so `--out /shared/ktb/token.json` works inside
//! a shared `emptyDir`.
//!
//! It reconnects with the project's back-off (honouring `Retry-After`, at
//! most [`MAX_RETRY_AFTER`]), treats a stream with no whole block for
//! [`IDLE_LIMIT`] as lost (the broker sends a keep-alive every 15 s; bytes
//! that never end a block do not count), drops a stream that is not the
//! broker's (a line or event over [`crate::sse::MAX_EVENT_BYTES`], bytes that
//! are not UTF-8, a token event without a token), exits 0 on SIGTERM or
//! SIGINT, and non-zero only when the broker refuses the consumer for good
//! (401, 403) or FILE cannot be written. `--once` writes the current token
//! and exits, for init containers.
//!
//! `--format json|token|env` chooses what FILE holds (the JSON carries
//! `expires_at`, never a countdown frozen at writing); `--exec CMD` and
//! `--signal SIG --signal-pid-file F` run after each write (`hooks`);
//! `--report-listen 127.0.0.1:PORT` lets an engine report a token Kraken
//! rejected (`report`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rand::RngExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Error;
use super::client::{ANSWER_BODY_TIMEOUT, Consumer, ConsumerArgs, detail_of, error_chain, read_answer, retry_after};
use crate::sse::{self, Item, TOKEN_EVENT, UNAVAILABLE_EVENT};
pub use format::Format;
pub use hooks::HookSignal;
use output::{Output, Written};

mod format;
mod hooks;
mod output;
mod report;

/// A stream with no whole block (an event or a keep-alive) for this long
/// is taken as lost (`--idle-limit`, hidden, sets another).
pub const IDLE_LIMIT: Duration = Duration::from_secs(45);
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest `Retry-After` obeyed: a broker (or anything answering in its
/// place) cannot park the agent for longer with a stale file.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

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
    /// How long the watch stream may go without a whole event or
    /// keep-alive before it is taken as lost.
    #[arg(long, hide = true, default_value = "45s", value_parser = crate::config::parse_duration)]
    pub idle_limit: Duration,
    /// What the file holds: the token's JSON (with `expires_at`), the
    /// token alone, or `KTB_TOKEN='...'` lines for a shell.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    /// A command run by `/bin/sh -c` after each write (`KTB_TOKEN_FILE`
    /// names the file), e.g. to tell the engine to reread it; killed after
    /// 30 s; its failure is logged and the agent goes on.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// A signal sent after each write to the process whose PID is in
    /// `--signal-pid-file` (the engine, in a pod sharing its process
    /// namespace, or beside the agent).
    #[arg(long, value_enum, requires = "signal_pid_file")]
    pub signal: Option<HookSignal>,
    /// The file holding the PID `--signal` is sent to (read at each write).
    #[arg(long, value_name = "FILE", requires = "signal")]
    pub signal_pid_file: Option<PathBuf>,
    /// A loopback address where the engine reports a token Kraken rejected
    /// (`POST /v1/report`): the agent reports it to the broker and writes
    /// the replacement before answering.
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    pub report_listen: Option<SocketAddr>,
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
    /// The file cannot be written: stop.
    Failed(String),
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
    let consumer = Arc::new(Consumer::new(&args.consumer, None)?);
    let out = Arc::new(Output::new(&args)?);
    if let Some(addr) = args.report_listen {
        let listener = report::bind(addr).await?;
        tokio::spawn(report::serve(
            listener,
            Arc::clone(&consumer),
            Arc::clone(&out),
            stop.clone(),
        ));
    }
    let mut attempt = 0u32;
    loop {
        let end = if args.once {
            once(&consumer, &out, &stop).await
        } else {
            follow(&consumer, &out, &stop, &mut attempt, args.idle_limit).await
        };
        let (wait, why) = match end {
            End::Stopped | End::Done => return Ok(()),
            End::Refused(why) => return Err(Error::Refused(why)),
            End::Failed(why) => return Err(Error::Fetch(why)),
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
        let delay = retry_wait(wait, attempt);
        warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "watch stream lost; reconnecting");
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long to wait before reconnecting: the broker's `Retry-After`, at
/// most [`MAX_RETRY_AFTER`], or else the back-off.
fn retry_wait(retry_after: Option<Duration>, attempt: u32) -> Duration {
    retry_after.map_or_else(|| backoff(attempt), |wait| wait.min(MAX_RETRY_AFTER))
}

/// The project's back-off, with jitter, so a fleet of agents does not
/// reconnect in step.
fn backoff(attempt: u32) -> Duration {
    crate::backoff::delay(
        attempt,
        BACKOFF_INITIAL,
        BACKOFF_MAX,
        rand::rng().random_range(0.0..=1.0),
    )
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
        Err(e) => return End::Failed(e.to_string()),
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
    let body = tokio::select! {
        _ = stop.cancelled() => return End::Stopped,
        body = read_answer(response, ANSWER_BODY_TIMEOUT) => body,
    };
    let body = match body {
        Ok(body) => body,
        Err(why) => return End::Retry(None, format!("the broker's answer cannot be read: {why}")),
    };
    if !status.is_success() {
        return classify(status, retry, &body);
    }
    match out.write(&body).await {
        Ok(Written::Yes | Written::Unchanged) => End::Done,
        Ok(Written::NoToken) => End::Retry(None, "the broker's answer holds no token".into()),
        Err(e) => End::Failed(e),
    }
}

/// Follows the watch stream until it ends.
async fn follow(consumer: &Consumer, out: &Output, stop: &CancellationToken, attempt: &mut u32, idle: Duration) -> End {
    let request = match consumer.get(consumer.url("/v1/token/watch", &[])) {
        Ok(r) => r,
        Err(e) => return End::Failed(e.to_string()),
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
        let body = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            body = read_answer(response, idle.min(ANSWER_BODY_TIMEOUT)) => body.unwrap_or_default(),
        };
        return classify(status, retry, &body);
    }
    info!(broker = %consumer.origin(), "following the watch stream");
    let mut parser = sse::Parser::default();
    let mut idle_until = tokio::time::Instant::now() + idle;
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            c = tokio::time::timeout_at(idle_until, response.chunk()) => c,
        };
        let bytes = match chunk {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return End::Ended,
            Ok(Err(e)) => return End::Retry(None, format!("the stream broke: {}", error_chain(&e.without_url()))),
            Err(_) => {
                return End::Retry(
                    None,
                    format!("no whole event from the broker for {} s", idle.as_secs_f64()),
                );
            }
        };
        let items = match parser.push(&bytes) {
            Ok(items) => items,
            Err(e) => return End::Retry(None, format!("not the broker's watch stream: {e}")),
        };
        for item in items {
            idle_until = tokio::time::Instant::now() + idle;
            let Item::Event { name, data } = item else { continue };
            match name.as_str() {
                TOKEN_EVENT => match out.write(&data).await {
                    Ok(Written::Yes | Written::Unchanged) => *attempt = 0,
                    Ok(Written::NoToken) => {
                        return End::Retry(None, "the broker sent a token event without a token".into());
                    }
                    Err(e) => return End::Failed(e),
                },
                UNAVAILABLE_EVENT => {
                    let detail = detail_of(reqwest::StatusCode::SERVICE_UNAVAILABLE, &data);
                    warn!(%detail, "the broker has no good token now; the file keeps the last one until it has");
                }
                _ => {}
            }
        }
    }
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
    fn retry_after_is_obeyed_up_to_its_cap() {
        assert_eq!(retry_wait(Some(Duration::from_secs(7)), 1), Duration::from_secs(7));
        assert_eq!(retry_wait(Some(Duration::from_secs(u64::MAX)), 1), MAX_RETRY_AFTER);
        assert!(retry_wait(None, 1) <= BACKOFF_INITIAL);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 1..40 {
            let d = backoff(attempt);
            let base = BACKOFF_INITIAL
                .saturating_mul(1 << attempt.saturating_sub(1).min(16))
                .min(BACKOFF_MAX);
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?}");
        }
    }
}
