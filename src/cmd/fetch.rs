//! `fetch --url URL`: a consumer's fetch, for scripts and operators. The
//! credential comes from `KTB_CONSUMER_CREDENTIAL`, never a flag (flags show
//! in `ps`); or a projected ServiceAccount token from `--token-file`, or a
//! client certificate.
//!
//! Exit status ([`super::exit`]): 0 a token printed; 2 usage; 3 the broker
//! refused this consumer (401, 403); 4 no token now (429, 503; the message
//! gives `Retry-After`); 5 the broker could not be reached; 1 anything else.

use std::time::Duration;

use clap::Args;

use super::Error;
use super::client::{Consumer, ConsumerArgs, detail_of, error_chain};

pub use super::client::CREDENTIAL_ENV;

#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// The token handed out has at least this many seconds left.
    #[arg(long)]
    pub min_ttl: Option<u64>,
    /// How long to wait for the broker, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

pub async fn run(args: FetchArgs) -> Result<(), Error> {
    let consumer = Consumer::new(&args.consumer, Some(Duration::from_secs(args.timeout)))?;
    let extra: Vec<(&str, String)> = args.min_ttl.map(|t| ("min_ttl", t.to_string())).into_iter().collect();
    let url = consumer.url("/v1/token", &extra);
    let response = consumer.get(url)?.send().await.map_err(|e| {
        Error::Unreachable(format!(
            "cannot reach the broker at {}: {}",
            consumer.origin(),
            error_chain(&e.without_url())
        ))
    })?;
    let status = response.status();
    let retry_after = super::client::retry_after(&response);
    let body = super::client::read_answer(response, super::client::ANSWER_BODY_TIMEOUT)
        .await
        .map_err(|why| Error::Fetch(format!("the broker's answer cannot be read: {why}")))?;
    if status.is_success() {
        println!("{body}");
        return Ok(());
    }
    let retry = retry_after
        .map(|s| format!(" (retry after {} s)", s.as_secs()))
        .unwrap_or_default();
    let message = format!("HTTP {}: {}{retry}", status.as_u16(), detail_of(status, &body));
    Err(match status.as_u16() {
        401 | 403 => Error::Refused(message),
        429 | 503 => Error::Unavailable(message),
        _ => Error::Fetch(message),
    })
}
