//! kraken-token-broker holds a Kraken API key and hands short-lived WebSocket
//! tokens to internal consumers, so that no trading engine ever holds the key.
//!
//! # How a token flows, and which way imports go
//!
//! ```text
//!                      broker/  (assembly, account table, reloads)
//!                    ╱    │    ╲
//!   Kraken ──► kraken/ ──► token/ ──► http/ ──► consumer
//!              sign, call,  refresh,   admit, prove (identity/),
//!              classify     cache      serve, problems
//! ```
//!
//! Imports follow the flow, one way:
//! - `token/` knows Kraken only through [`token::TokenSource`] and a few
//!   public types of [`kraken`] (the error and its `Reason`/`Action`, the
//!   token); the adapter, [`kraken::KrakenSource`], lives in
//!   `kraken/`.
//! - `http/` and `identity/` name nothing of `kraken/`: they read tokens
//!   through `token/`.
//! - Nothing in the product imports `sim/`: only the `demo` and `simulate`
//!   commands and the tests do.
//!
//! `tests/architecture.rs` fails the build's tests when a change breaks one
//! of these rules.
//!
//! # Layout
//!
//! ```text
//! kraken/            Kraken's REST API, as the broker uses it
//!   sign.rs          API-Sign (pure), checked against the shared vectors
//!   nonce.rs         strictly increasing nonces per key
//!   otp.rs           the key's 2FA (static password or TOTP)
//!   client.rs        the signed GetWebSocketsToken call (reqwest, rustls)
//!   wire.rs          Kraken's answer shapes
//!   error.rs         every failure classified: Reason, Class, Action
//!   source.rs        KrakenSource: token's TokenSource on a Kraken client
//! token/             one account's token, kept fresh
//!   refresher/       the single-writer task: state, calls, forced refreshes
//!                    and waiters (demand), its handle, its log lines
//!   schedule.rs      when to refresh (pure)
//!   policy.rs        what to do after a failure (pure)
//!   gate.rs          the broker-wide Kraken gate: lockout circuit, rejected-call budget
//!   published.rs     what readers load lock-free, and the serving rule
//!   source.rs        the TokenSource trait and an account's setup
//!   scripted.rs      a scripted TokenSource for tests and benches
//!   metrics.rs       the token and gate metric families
//! identity/          who a connection is
//!   credential.rs    bearer credentials (hashed, compared in constant time)
//!   client_cert.rs   client certificates and their DNS/URI SANs
//!   service_account/ Kubernetes ServiceAccount tokens: claims pre-check,
//!                    JWKS signatures, TokenReview
//! http/              the consumer and admin APIs
//!   server/          the accept loop: caps, the connection registry and its
//!                    slots, TLS handshake bounds, write stalls, hyper's
//!                    answers rewritten as problems
//!   api.rs           GET /v1/token, POST /v1/token/invalidate
//!   watch.rs         GET /v1/token/watch (Server-Sent Events)
//!   admin.rs         /healthz, /readyz, /metrics
//!   auth.rs          the credential extractor and consumer policy
//!   throttle.rs      failed-auth throttle per address group
//!   address.rs       address groups (IPv4, IPv6 /64)
//!   limits.rs        per-consumer rate limits
//!   problem.rs       application/problem+json errors
//!   metrics.rs       HTTP metric families, labels as enums
//! broker/            assembly: refreshers and the serving table from a Config
//!   accounts.rs      the account table, settings compared by value
//!   table.rs         what the HTTP side serves from
//!   reload.rs        reloads, one typed outcome for log, metric and audit
//!   poll.rs          noticing changed config and secret files
//! config/            the TOML configuration: raw serde types, one validator
//!                    per section, problems reported at once with their
//!                    lines, secrets read and wrapped, the summary
//! audit/             the audit trail: typed events, the writer thread,
//!                    repeated failures summarised
//! metrics/           the registry, its helper, process metrics
//! cmd/               serve, demo, simulate, fetch, agent, credential,
//!                    check-config, audit; client.rs: the HTTP client
//!                    `fetch` and the agent share
//! sim/               the Kraken simulator: REST, WebSocket v2, keys,
//!                    faults, the control API
//! bucket.rs          the one token bucket (rate limits, budgets, throttles)
//! backoff.rs         the one exponential back-off with jitter
//! sse.rs             the one Server-Sent Events parser, and event names
//! files.rs           reading config and secret files: regular, bounded, off the runtime
//! secret.rs          secret types with redacted Debug/Display
//! tls.rs             server TLS and mTLS configuration
//! clock.rs           the injected wall clock, Unix-time helpers
//! signal.rs          process signals
//! telemetry.rs       logging
//! ```
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
