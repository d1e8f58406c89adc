//! The token cache and its refreshers: one single-writer task per account
//! publishes that account's token; readers load it lock-free. Knows Kraken
//! only through [`source::TokenSource`] (and the answer and error types it
//! yields) and knows no HTTP.
//!
//! | module | owns |
//! |---|---|
//! | [`published`] | what readers see: the token, the health, the serving rule |
//! | [`refresher`] | the task that calls, caches and answers on-demand requests |
//! | [`source`] | where tokens come from (the trait) and an account's setup |
//! | [`schedule`] | when to refresh and how long to back off (pure) |
//! | [`policy`] | what to do after a failed call (pure) |
//! | [`gate`] | the process-wide rejected-call budget and address-wide lockout |
//! | [`key`] | what Kraken says of the key (`GetApiKeyInfo`), for readers and the audit |
//! | [`scripted`] | a scripted token source for tests and benchmarks |
//! | [`metrics`] | the token and gate metric families |

pub mod gate;
pub mod key;
pub mod metrics;
pub mod policy;
pub mod published;
pub mod refresher;
pub mod schedule;
pub mod scripted;
pub mod source;

/// Kraken's documented token lifetime: the most any token held here can have.
pub use crate::kraken::MAX_TOKEN_LIFETIME;
pub use gate::{KrakenGate, Risk};
pub use key::{KeyEvent, KeyEvents, KeyReport};
pub use published::{CachedToken, Health, Published, ServingRule, token_sha256};
pub use refresher::{AccountHandle, Ambient, Answer, Applied, Cause, Unavailable};
pub use schedule::{RefreshPolicy, next_refresh_at, retry_after_secs};
pub use scripted::ScriptedSource;
pub use source::{AccountSetup, FetchFuture, InspectFuture, TokenSource};
