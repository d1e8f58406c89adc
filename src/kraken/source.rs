//! The Kraken-backed [`TokenSource`] of one account: its client, its
//! credentials, the nonce lane of its API key, and what the account allows a
//! key to hold.
//!
//! A `GetApiKeyInfo` ([`TokenSource::inspect`]) is judged against what the
//! account allows; while the last verdict refuses the key, a token call is
//! refused without calling Kraken. (The refresher makes its token calls
//! after the inspection under way, so the verdict is fresh when it counts.)

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::error::{KeyRefusal, KrakenError};
use super::key_info::{KeyCheck, Verdict, foreign_use, judge};
use super::{ApiCredentials, KeyLane, KrakenClient};
use crate::token::source::{FetchFuture, InspectFuture, TokenSource};

/// The Kraken-backed source of one account.
pub struct KrakenSource {
    pub client: KrakenClient,
    pub credentials: Arc<ApiCredentials>,
    /// Shared by every account using the same API key.
    pub lane: Arc<KeyLane>,
    /// Kraken's names of the permissions a key must not hold.
    pub forbidden: Vec<String>,
    judged: Arc<Judged>,
}

/// The last verdict on the key.
#[derive(Debug, Default)]
struct Judged {
    verdict: Mutex<Option<Verdict>>,
}

impl Judged {
    fn refusal(&self) -> Option<KeyRefusal> {
        match &*self.verdict.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(Verdict::MissingWsPermission) => Some(KeyRefusal::MissingWsPermission),
            Some(Verdict::TooPowerful(held)) => Some(KeyRefusal::TooPowerful(held.clone())),
            Some(Verdict::Usable) | None => None,
        }
    }
}

impl KrakenSource {
    pub fn new(
        client: KrakenClient,
        credentials: Arc<ApiCredentials>,
        lane: Arc<KeyLane>,
        forbidden: Vec<String>,
    ) -> Self {
        Self {
            client,
            credentials,
            lane,
            forbidden,
            judged: Arc::default(),
        }
    }
}

impl TokenSource for KrakenSource {
    fn fetch(&self) -> FetchFuture {
        let (client, credentials, lane, judged) = (
            self.client.clone(),
            Arc::clone(&self.credentials),
            Arc::clone(&self.lane),
            Arc::clone(&self.judged),
        );
        Box::pin(async move {
            if let Some(refusal) = judged.refusal() {
                return Err(KrakenError::KeyRefused(refusal));
            }
            client.get_websockets_token(&credentials, &lane).await
        })
    }

    fn inspect(&self) -> Option<InspectFuture> {
        let (client, credentials, lane, forbidden, judged) = (
            self.client.clone(),
            Arc::clone(&self.credentials),
            Arc::clone(&self.lane),
            self.forbidden.clone(),
            Arc::clone(&self.judged),
        );
        Some(Box::pin(async move {
            let answer = client.get_api_key_info(&credentials, &lane).await?;
            let verdict = judge(&answer.info, &forbidden);
            *judged.verdict.lock().unwrap_or_else(PoisonError::into_inner) = Some(verdict.clone());
            Ok(KeyCheck {
                foreign: foreign_use(answer.info.nonce, answer.nonce, answer.previous),
                info: answer.info,
                verdict,
            })
        }))
    }

    fn next_otp_code_in(&self) -> Option<Duration> {
        let otp = self.credentials.otp.as_ref()?;
        let now = self.lane.clock().now();
        let next = SystemTime::UNIX_EPOCH + Duration::from_secs(otp.next_code_at(crate::clock::unix_secs(now))?);
        Some(next.duration_since(now).unwrap_or(Duration::ZERO))
    }

    fn ready_in(&self) -> Duration {
        self.lane.totp_wait(self.credentials.otp.as_ref())
    }
}
