//! The two Kraken calls the broker makes: `POST /0/private/GetWebSocketsToken`
//! and, to know its own key, `POST /0/private/GetApiKeyInfo`.
//!
//! Per API key, sign-and-send is serialised through a [`KeyLane`]: the nonce
//! is taken, the body built once, signed and sent, and the answer read, all
//! while holding the lane, so Kraken always sees that key's nonces in order.
//! Redirects are never followed: a signed request goes to the configured
//! endpoint or nowhere.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

use super::error::KrakenError;
use super::key_info::{KEY_INFO_PATH, KeyInfo, parse_key_info_response};
use super::nonce::NonceSource;
use super::otp::Otp;
use super::sign::{WS_TOKEN_PATH, sign};
use super::wire::{WsToken, parse_ws_token_response};
use crate::clock::WallClock;
use crate::secret::{REDACTED, SecretBytes, SecretString};

/// The User-Agent Kraken requires, naming the project and version.
pub const USER_AGENT: &str = concat!("kraken-token-broker/", env!("CARGO_PKG_VERSION"));

/// The most of an answer the client reads; a token answer is under 200 bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A little past the start of the next TOTP step, so the code made then is
/// the new one even with a few milliseconds of clock jitter.
const TOTP_STEP_MARGIN: Duration = Duration::from_millis(100);

/// The longest the TCP/TLS connect may take, within the total timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What signs a call for one Kraken account.
#[derive(Clone)]
pub struct ApiCredentials {
    pub api_key: SecretString,
    pub api_secret: SecretBytes,
    pub otp: Option<Otp>,
}

impl fmt::Debug for ApiCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiCredentials")
            .field("api_key", &REDACTED)
            .field("api_secret", &REDACTED)
            .field("otp", &self.otp.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// The nonce sequence of one API key, the turn-taking of its calls, and
/// the last TOTP step it sent a code for.
#[derive(Debug, Default)]
pub struct KeyLane {
    nonces: NonceSource,
    turn: tokio::sync::Mutex<()>,
    /// The TOTP time step (unix seconds / 30) of the last code sent; a code
    /// is never sent twice (RFC 6238 §5.2 lets a verifier refuse a reused
    /// one), so a call in the same step waits for the next code.
    last_totp_step: AtomicU64,
}

impl KeyLane {
    pub fn new() -> Self {
        Self::default()
    }

    /// How long until this key may send a TOTP code it has not sent yet
    /// (zero without TOTP, or when the current code is unused).
    pub fn totp_wait(&self, otp: Option<&Otp>) -> Duration {
        let Some(otp) = otp.filter(|o| o.is_time_based()) else {
            return Duration::ZERO;
        };
        let now = self.clock().now();
        let step = otp.step_at(crate::clock::unix_secs(now));
        if step > self.last_totp_step.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        let next = std::time::UNIX_EPOCH + Duration::from_secs(otp.step_start(step + 1));
        next.duration_since(now).unwrap_or(Duration::ZERO) + TOTP_STEP_MARGIN
    }

    /// The wall clock this key's nonces and TOTP codes follow.
    pub fn clock(&self) -> &WallClock {
        self.nonces.clock()
    }

    /// A lane whose nonces and TOTP codes follow `clock` (tests step it).
    pub fn with_clock(clock: WallClock) -> Self {
        Self {
            nonces: NonceSource::with_clock(clock),
            turn: tokio::sync::Mutex::new(()),
            last_totp_step: AtomicU64::new(0),
        }
    }
}

/// The form body `nonce=…[&otp=…]` of both calls, built once: these exact
/// bytes are signed and sent.
pub fn ws_token_body(nonce: u64, otp: Option<&SecretString>) -> SecretString {
    let nonce = nonce.to_string();
    let mut fields = vec![("nonce", nonce.as_str())];
    if let Some(otp) = otp {
        fields.push(("otp", otp.expose()));
    }
    SecretString::new(serde_urlencoded::to_string(&fields).expect("string pairs always encode"))
}

/// A reqwest client bound to one Kraken REST root and its two endpoints.
#[derive(Clone, Debug)]
pub struct KrakenClient {
    http: reqwest::Client,
    endpoint: String,
    key_info_endpoint: String,
    timeout: Duration,
}

/// A `GetApiKeyInfo` answer and the nonces around the call that asked.
#[derive(Debug, Clone)]
pub struct KeyInfoAnswer {
    pub info: KeyInfo,
    /// The nonce of the call that asked.
    pub nonce: u64,
    /// The nonce this process sent on the key before it (0: none).
    pub previous: u64,
}

impl KrakenClient {
    /// `rest_url` is the API root (`https://api.kraken.com`); `timeout` bounds
    /// each call from connect to the last byte of the answer.
    pub fn new(rest_url: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let root = rest_url.trim_end_matches('/');
        Ok(Self {
            http,
            endpoint: format!("{root}{WS_TOKEN_PATH}"),
            key_info_endpoint: format!("{root}{KEY_INFO_PATH}"),
            timeout,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Mints a WebSocket token for the account these credentials sign for.
    pub async fn get_websockets_token(&self, creds: &ApiCredentials, lane: &KeyLane) -> Result<WsToken, KrakenError> {
        let _turn = lane.turn.lock().await;
        let (body, _, _) = self.signed(&self.endpoint, WS_TOKEN_PATH, creds, lane).await?;
        parse_ws_token_response(&body)
    }

    /// Asks Kraken about the key itself, in the key's lane like any call.
    pub async fn get_api_key_info(&self, creds: &ApiCredentials, lane: &KeyLane) -> Result<KeyInfoAnswer, KrakenError> {
        let _turn = lane.turn.lock().await;
        let (body, nonce, previous) = self.signed(&self.key_info_endpoint, KEY_INFO_PATH, creds, lane).await?;
        Ok(KeyInfoAnswer {
            info: parse_key_info_response(&body)?,
            nonce,
            previous,
        })
    }

    /// Signs and sends one private call within the lane's turn (held by
    /// the caller): the body of an HTTP 200 answer, the nonce sent and the
    /// one sent before it on this key.
    async fn signed(
        &self,
        url: &str,
        path: &str,
        creds: &ApiCredentials,
        lane: &KeyLane,
    ) -> Result<(Vec<u8>, u64, u64), KrakenError> {
        // Within the turn, so two accounts sharing the key cannot both send
        // the same TOTP code: the second waits for the next one.
        let wait = lane.totp_wait(creds.otp.as_ref());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let previous = lane.nonces.last();
        let nonce = lane.nonces.next();
        let now = lane.clock().unix_secs();
        let otp = creds.otp.as_ref().map(|otp| otp.code_at(now));
        if let Some(otp) = creds.otp.as_ref().filter(|o| o.is_time_based()) {
            lane.last_totp_step.fetch_max(otp.step_at(now), Ordering::SeqCst);
        }
        let body = ws_token_body(nonce, otp.as_ref());
        let signature = sign(&creds.api_secret, path, &nonce.to_string(), body.expose().as_bytes());

        let mut request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.expose().to_owned());
        // Header values marked sensitive are never printed by http's Debug.
        let mut key = HeaderValue::from_str(creds.api_key.expose())
            .map_err(|_| KrakenError::Transport("the API key is not a valid header value".into()))?;
        key.set_sensitive(true);
        let mut sign_value = HeaderValue::from_str(&signature).expect("base64 is a valid header value");
        sign_value.set_sensitive(true);
        request = request.header("API-Key", key).header("API-Sign", sign_value);

        let response = request.send().await.map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers().get(RETRY_AFTER));
        let body = read_bounded(response).await.map_err(|e| match e {
            BodyError::TooLarge => KrakenError::MalformedResponse("the answer is larger than expected".into()),
            BodyError::Read(e) => self.transport_error(&e),
        })?;
        if status != reqwest::StatusCode::OK {
            return Err(KrakenError::HttpStatus {
                status: status.as_u16(),
                retry_after,
            });
        }
        Ok((body, nonce, previous))
    }

    fn transport_error(&self, error: &reqwest::Error) -> KrakenError {
        if error.is_timeout() {
            return KrakenError::Timeout(self.timeout);
        }
        if error.is_body() || error.is_decode() {
            return KrakenError::MalformedResponse("the answer ended early".into());
        }
        // The full chain, e.g. "error sending request: connection refused".
        // No secret can be in it: reqwest names the URL, never headers or body.
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        KrakenError::Transport(text)
    }
}

enum BodyError {
    TooLarge,
    Read(reqwest::Error),
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` in seconds (the HTTP-date form is rare at edges; ignored).
fn parse_retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_nonce_then_percent_encoded_otp() {
        assert_eq!(ws_token_body(1760000000000, None).expose(), "nonce=1760000000000");
        assert_eq!(
            ws_token_body(7, Some(&SecretString::new("p&ss=w rd"))).expose(),
            "nonce=7&otp=p%26ss%3Dw+rd"
        );
    }

    #[test]
    fn credentials_debug_shows_no_secret() {
        let creds = ApiCredentials {
            api_key: SecretString::new("KEY-abcdef"),
            api_secret: SecretBytes::new(b"raw-secret".to_vec()),
            otp: Some(Otp::static_password(SecretString::new("otp-pass")).unwrap()),
        };
        let debug = format!("{creds:?}");
        for needle in ["KEY-abcdef", "raw-secret", "otp-pass"] {
            assert!(!debug.contains(needle), "{debug}");
        }
    }

    #[test]
    fn endpoints_are_the_root_plus_the_two_paths() {
        let client = KrakenClient::new("http://127.0.0.1:1/", Duration::from_secs(1)).unwrap();
        assert_eq!(client.endpoint(), "http://127.0.0.1:1/0/private/GetWebSocketsToken");
        assert_eq!(client.key_info_endpoint, "http://127.0.0.1:1/0/private/GetApiKeyInfo");
    }

    #[test]
    fn retry_after_seconds_are_parsed_and_capped() {
        let v = HeaderValue::from_static("30");
        assert_eq!(parse_retry_after(Some(&v)), Some(Duration::from_secs(30)));
        let v = HeaderValue::from_static("999999");
        assert_eq!(parse_retry_after(Some(&v)), Some(Duration::from_secs(3600)));
        let v = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(Some(&v)), None);
    }
}
