//! The token cache and its refreshers: one single-writer task per account
//! publishes that account's token; readers load it lock-free. Knows Kraken
//! only through [`refresher::TokenSource`] and knows no HTTP.

pub mod cache;
pub mod refresher;
pub mod schedule;

/// Kraken's documented token lifetime: the most any token held here can have.
pub use crate::kraken::MAX_TOKEN_LIFETIME;
pub use cache::{CachedToken, Health, Published, token_sha256};
pub use refresher::{AccountHandle, AccountSetup, Answer, Cause, KrakenSource, TokenSource, Unavailable};
pub use schedule::{RefreshPolicy, backoff_delay, next_refresh_at, retry_after_secs};
