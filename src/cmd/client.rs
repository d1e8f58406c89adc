//! What `fetch` and `agent` share as consumers of a broker: the URL, the
//! identity (a credential from `KTB_CONSUMER_CREDENTIAL`, a projected
//! ServiceAccount token re-read from a file, or a client certificate), and
//! the trust for an `https://` broker.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::Error;
use crate::secret::SecretString;

/// Where the credential is read from.
pub const CREDENTIAL_ENV: &str = "KTB_CONSUMER_CREDENTIAL";

#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// The broker's consumer API, e.g. http://127.0.0.1:8080 or https://broker:8080.
    #[arg(long)]
    pub url: String,
    /// The account (needed when the consumer has several).
    #[arg(long)]
    pub account: Option<String>,
    /// A projected ServiceAccount token to send as the bearer, re-read on
    /// every request (the kubelet rotates it). Without it, the credential in
    /// KTB_CONSUMER_CREDENTIAL is sent, if set.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) that issued the broker's certificate, for https://; only
    /// it is trusted. Without it, the system's roots.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to present, for mutual TLS ...
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

/// The identity sent with each request.
enum Bearer {
    None,
    Credential(SecretString),
    TokenFile(PathBuf),
}

/// A consumer of one broker.
pub struct Consumer {
    pub http: reqwest::Client,
    base: String,
    account: Option<String>,
    bearer: Bearer,
}

fn read(path: &std::path::Path, what: &str) -> Result<String, Error> {
    crate::files::read_regular(path, crate::files::MAX_SECRET_BYTES)
        .map(|r| r.text)
        .map_err(|e| Error::Usage(format!("cannot read the {what} {}: {e}", path.display())))
}

impl Consumer {
    /// `timeout` bounds each whole request (`None`: only connecting is
    /// bounded, for streams).
    pub fn new(args: &ConsumerArgs, timeout: Option<Duration>) -> Result<Self, Error> {
        let base = args.url.trim_end_matches('/');
        let base = base.strip_suffix("/v1/token").unwrap_or(base).to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|e| Error::Usage(format!("`{base}` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Usage(format!("`{base}` is not an http:// or https:// URL")));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(crate::kraken::USER_AGENT)
            // The identity goes to the URL given or nowhere: never follow a
            // redirect (to another host, it would carry the bearer along).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(ca) = &args.ca_file {
            let pem = read(ca, "CA file")?;
            let roots = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| Error::Usage(format!("{}: not a PEM certificate: {e}", ca.display())))?;
            builder = builder.tls_certs_only(roots);
        }
        if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
            let pem = format!("{}\n{}", read(cert, "certificate")?, read(key, "key")?);
            let identity = reqwest::Identity::from_pem(pem.as_bytes()).map_err(|e| {
                Error::Usage(format!(
                    "{} and {}: not a certificate and key: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Fetch(format!("cannot set up an HTTP client: {e}")))?;
        let bearer = match (&args.token_file, std::env::var(CREDENTIAL_ENV)) {
            (Some(path), _) => Bearer::TokenFile(path.clone()),
            (None, Ok(c)) if !c.trim().is_empty() => Bearer::Credential(SecretString::new(c.trim())),
            (None, _) if args.cert_file.is_some() => Bearer::None,
            (None, _) => {
                return Err(Error::Usage(format!(
                    "give an identity: set {CREDENTIAL_ENV}, or --token-file, or --cert-file and --key-file"
                )));
            }
        };
        if let Bearer::TokenFile(path) = &bearer {
            read(path, "token file")?; // fail at once, not at the first request
        }
        Ok(Self {
            http,
            base,
            account: args.account.clone(),
            bearer,
        })
    }

    /// `base` + `path`, with `account` (and more) in the query.
    pub fn url(&self, path: &str, extra: &[(&str, String)]) -> reqwest::Url {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base)).expect("checked in new");
        {
            let mut query = url.query_pairs_mut();
            if let Some(account) = &self.account {
                query.append_pair("account", account);
            }
            for (k, v) in extra {
                query.append_pair(k, v);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    /// A GET of `url` with the identity.
    pub fn get(&self, url: reqwest::Url) -> Result<reqwest::RequestBuilder, Error> {
        self.with_identity(self.http.get(url))
    }

    /// A POST to `url` with the identity.
    pub fn post(&self, url: reqwest::Url) -> Result<reqwest::RequestBuilder, Error> {
        self.with_identity(self.http.post(url))
    }

    fn with_identity(&self, request: reqwest::RequestBuilder) -> Result<reqwest::RequestBuilder, Error> {
        Ok(match &self.bearer {
            Bearer::None => request,
            Bearer::Credential(c) => request.bearer_auth(c.expose()),
            Bearer::TokenFile(path) => {
                let token = SecretString::new(read(path, "token file")?.trim());
                request.bearer_auth(token.expose())
            }
        })
    }

    /// Where the broker is, for messages (no path, query or credential).
    pub fn origin(&self) -> String {
        reqwest::Url::parse(&self.base).map_or_else(|_| self.base.clone(), |u| u.origin().ascii_serialization())
    }
}

/// The largest answer read from the broker: a token's JSON, or a problem,
/// is under 1 KiB; anything past this is not the broker's and is not read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How long an answer's body may take to arrive once its head has.
pub const ANSWER_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer's body as UTF-8 text: at most [`MAX_ANSWER_BYTES`], within
/// `deadline` ([`ANSWER_BODY_TIMEOUT`] unless the caller knows better);
/// `Err` says why not (cut off, too slow, too large, not text), never with
/// the body in it.
pub async fn read_answer(mut response: reqwest::Response, deadline: Duration) -> Result<String, String> {
    let mut body = Vec::new();
    let read = tokio::time::timeout(deadline, async {
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e.without_url()))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => String::from_utf8(body).map_err(|_| "the answer is not UTF-8 text".to_owned()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!("the answer did not arrive within {deadline:?}")),
    }
}

/// An error and its causes, one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A refusal's `detail`, or the status's reason.
pub fn detail_of(status: reqwest::StatusCode, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned())
}

/// `Retry-After` in seconds, if the answer has one.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> ConsumerArgs {
        ConsumerArgs {
            url: url.into(),
            account: None,
            token_file: Some("/dev/null".into()),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    #[test]
    fn urls_take_a_base_or_the_token_path() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let mut a = args("http://127.0.0.1:8080/");
        a.token_file = Some(token.clone());
        let c = Consumer::new(&a, None).unwrap();
        assert_eq!(c.url("/v1/token", &[]).as_str(), "http://127.0.0.1:8080/v1/token");
        let mut a = args("http://h:1/v1/token");
        a.token_file = Some(token);
        a.account = Some("main".into());
        let c = Consumer::new(&a, None).unwrap();
        assert_eq!(
            c.url("/v1/token/watch", &[]).as_str(),
            "http://h:1/v1/token/watch?account=main"
        );
        assert_eq!(
            c.url("/v1/token", &[("min_ttl", "60".into())]).as_str(),
            "http://h:1/v1/token?account=main&min_ttl=60"
        );
    }

    #[test]
    fn bad_urls_and_unreadable_token_files_are_refused_at_once() {
        assert!(Consumer::new(&args("ftp://x"), None).is_err());
        assert!(Consumer::new(&args("not a url"), None).is_err());
        let mut a = args("http://h:1");
        a.token_file = Some("/nonexistent/token".into());
        let e = Consumer::new(&a, None).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/token"), "{e}");
    }
}
