//! The Kraken-backed [`TokenSource`] of one account: its client, its
//! credentials and the nonce lane of its API key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{ApiCredentials, KeyLane, KrakenClient};
use crate::token::source::{FetchFuture, TokenSource};

/// The Kraken-backed source of one account.
pub struct KrakenSource {
    pub client: KrakenClient,
    pub credentials: Arc<ApiCredentials>,
    /// Shared by every account using the same API key.
    pub lane: Arc<KeyLane>,
}

impl TokenSource for KrakenSource {
    fn fetch(&self) -> FetchFuture {
        let (client, credentials, lane) = (
            self.client.clone(),
            Arc::clone(&self.credentials),
            Arc::clone(&self.lane),
        );
        Box::pin(async move { client.get_websockets_token(&credentials, &lane).await })
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
