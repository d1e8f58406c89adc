//! `fetch --url URL`: a consumer's fetch, for scripts and operators. The
//! credential comes from `KTB_CONSUMER_CREDENTIAL`, never a flag (flags show
//! in `ps`).

use std::time::Duration;

use clap::Args;

use super::Error;

use crate::secret::SecretString;

/// Where the credential is read from.
pub const CREDENTIAL_ENV: &str = "KTB_CONSUMER_CREDENTIAL";

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The broker's consumer API, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// The account to fetch (needed when the consumer has several).
    #[arg(long)]
    pub account: Option<String>,
    /// The token handed out has at least this many seconds left.
    #[arg(long)]
    pub min_ttl: Option<u64>,
    /// How long to wait for the broker, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// The full token URL for a base URL (or a URL already ending in /v1/token).
pub fn token_url(base: &str) -> Result<reqwest::Url, Error> {
    let base = base.trim_end_matches('/');
    let full = if base.ends_with("/v1/token") {
        base.to_owned()
    } else {
        format!("{base}/v1/token")
    };
    reqwest::Url::parse(&full).map_err(|e| Error::Usage(format!("`{base}` is not a URL: {e}")))
}

pub async fn run(args: FetchArgs) -> Result<(), Error> {
    let credential = std::env::var(CREDENTIAL_ENV)
        .map(SecretString::new)
        .map_err(|_| Error::Usage(format!("set {CREDENTIAL_ENV} to the consumer credential")))?;
    let mut url = token_url(&args.url)?;
    {
        let mut query = url.query_pairs_mut();
        if let Some(account) = &args.account {
            query.append_pair("account", account);
        }
        if let Some(min_ttl) = args.min_ttl {
            query.append_pair("min_ttl", &min_ttl.to_string());
        }
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .user_agent(crate::kraken::USER_AGENT)
        // The credential goes to the URL given or nowhere: never follow a
        // redirect (to another host, it would carry the credential along).
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::Fetch(format!("cannot set up an HTTP client: {e}")))?;
    let response = client
        .get(url.clone())
        .bearer_auth(credential.expose())
        .send()
        .await
        .map_err(|e| {
            let origin = url.origin().ascii_serialization();
            Error::Fetch(format!("cannot reach the broker at {origin}: {}", error_chain(&e)))
        })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .text()
        .await
        .map_err(|e| Error::Fetch(format!("the broker's answer was cut off: {e}")))?;
    if status.is_success() {
        println!("{body}");
        return Ok(());
    }
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let retry = retry_after.map(|s| format!(" (retry after {s} s)")).unwrap_or_default();
    Err(Error::Fetch(format!("HTTP {}: {detail}{retry}", status.as_u16())))
}

/// An error and its causes, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_url_accepts_a_base_or_the_full_path() {
        assert_eq!(
            token_url("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/v1/token"
        );
        assert_eq!(token_url("http://h:1/").unwrap().as_str(), "http://h:1/v1/token");
        assert_eq!(
            token_url("http://h:1/v1/token").unwrap().as_str(),
            "http://h:1/v1/token"
        );
        assert!(token_url("not a url").is_err());
    }
}
