//! kraken-token-broker holds a Kraken API key and hands short-lived WebSocket
//! tokens to internal consumers, so that no trading engine ever holds the key.
//!
//! # How a token flows
//!
//! ```text
//! Kraken ──► kraken/ ──► token/ ──► http/ ──► consumer
//!            sign, call,   cache,     auth, serve,
//!            classify      refresh    problems
//! ```
//!
//! Imports follow the flow: `http/` reads tokens only through `token/` and
//! never calls `kraken/`; `token/` knows no HTTP; `kraken/` knows no cache.
//! Nothing in the product imports `sim/`: only the `demo` and `simulate`
//! commands and the tests do.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`kraken`] | signing (pure), per-key nonces, OTP, the `GetWebSocketsToken` call (reqwest), Kraken's answer shapes, classifying every failure into a reason, a class and an action |
//! | [`token`] | one refresher task per account (the single writer of its token), the refresh schedule and back-off (pure functions), the published state readers load lock-free |
//! | [`http`] | the consumer API (`router`), the admin API (`admin_router`), the bearer-credential extractor, the per-address throttle, problem+json errors, the server loop and its limits |
//! | [`broker`] | assembly: builds refreshers and the serving table from a [`config::Config`], reloads, supervises refreshers, shuts down in order |
//! | [`files`] | reading config and secret files: regular files only, bounded, off the runtime with a deadline |
//! | [`config`] | the TOML configuration, typed and validated at load, every problem reported at once, secrets read and wrapped at once |
//! | [`metrics`] | the Prometheus registry and the contract's metric names |
//! | [`secret`] | secret types whose `Debug`/`Display` print a redaction |
//! | [`reload`] | reloading when the config or its secret files change |
//! | [`sim`] | the Kraken simulator (REST, WebSocket v2, faults, control API) |
//! | [`cmd`] | the binary's commands: `serve`, `demo`, `simulate`, `fetch`, `credential new`, `check-config` |
//! | [`clock`] | the injected wall clock and the Unix-time helpers |
//! | [`signal`], [`telemetry`] | process signals, logging |
#![forbid(unsafe_code)]

pub mod audit;
pub mod backoff;
pub mod broker;
pub mod bucket;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod files;
pub mod http;
pub mod identity;
pub mod kraken;
pub mod metrics;
pub mod secret;
pub mod signal;
pub mod sim;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod token;
