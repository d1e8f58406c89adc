//! The broker's Prometheus metrics, named as the contract fixes them.
//!
//! One non-global [`Registry`] per broker (so each test gets its own), base
//! units, timestamps rather than ages, labels only from closed sets, and every
//! known label combination set to 0 up front so a first failure shows as a
//! rise. Handles for one account or one route are resolved once and kept, so
//! the hot path does no label lookups.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::kraken::Reason;

const NS: &str = "kraken_token_broker";

/// Refresh durations: a Kraken call takes 50 ms to a few seconds.
const REFRESH_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// HTTP durations: a cached token is served in microseconds; a request that
/// waits for a refresh takes as long as the Kraken call.
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0,
];

/// The routes the consumer and admin APIs serve, as labelled.
pub const ROUTES: &[&str] = &[
    "/v1/token",
    "/v1/token/invalidate",
    "/v1/token/watch",
    "/healthz",
    "/readyz",
    "/metrics",
    "unmatched",
];
/// Statuses each route can answer, pre-set to 0.
const ROUTE_STATUSES: &[(&str, &[u16])] = &[
    ("/v1/token", &[200, 400, 401, 403, 405, 413, 429, 431, 503]),
    (
        "/v1/token/invalidate",
        &[200, 400, 401, 403, 405, 413, 415, 429, 431, 503],
    ),
    ("/v1/token/watch", &[200, 400, 401, 403, 405, 429, 431, 503]),
    ("/healthz", &[200]),
    ("/readyz", &[200, 503]),
    ("/metrics", &[200]),
    ("unmatched", &[400, 404, 414, 431]),
];

/// Why a connection was refused or closed early, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The listener is at its cap and every connection has proven an identity.
    ListenerFull,
    /// The client's address is at its cap and each of its connections has
    /// proven an identity.
    PerAddress,
    /// Closed for a newcomer.
    Evicted,
    /// The TLS handshake failed or stalled.
    TlsHandshake,
    /// The client certificate had expired (a resumed session), or expired
    /// while the connection was open.
    CertificateExpired,
}

impl ConnectionRefusal {
    pub const ALL: [ConnectionRefusal; 5] = [
        ConnectionRefusal::ListenerFull,
        ConnectionRefusal::PerAddress,
        ConnectionRefusal::Evicted,
        ConnectionRefusal::TlsHandshake,
        ConnectionRefusal::CertificateExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionRefusal::ListenerFull => "listener_full",
            ConnectionRefusal::PerAddress => "per_address",
            ConnectionRefusal::Evicted => "evicted",
            ConnectionRefusal::TlsHandshake => "tls_handshake",
            ConnectionRefusal::CertificateExpired => "certificate_expired",
        }
    }
}

/// Why a consumer was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Forbidden,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 3] = [AuthFailure::Missing, AuthFailure::Invalid, AuthFailure::Forbidden];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid => "invalid",
            AuthFailure::Forbidden => "forbidden",
        }
    }
}

/// All of the broker's metrics. Cloning is one reference-count increment.
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<Inner>);

/// The series of one route, resolved once: recording a request does no
/// label hashing and no allocation.
struct RouteMetrics {
    route: &'static str,
    in_flight: IntGauge,
    duration: Histogram,
    by_status: Vec<(u16, IntCounter)>,
}

struct Inner {
    registry: Registry,
    routes: Vec<RouteMetrics>,
    refreshes: IntCounterVec,
    refresh_failures: IntCounterVec,
    refresh_duration: HistogramVec,
    token_expiry: GaugeVec,
    last_success: GaugeVec,
    last_failure: GaugeVec,
    token_valid: IntGaugeVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    http_in_flight: IntGaugeVec,
    tokens_served: IntCounterVec,
    auth_failures: IntCounterVec,
    key_expiry: GaugeVec,
    key_info: IntGaugeVec,
    unservable: IntCounterVec,
    calls_held: IntCounterVec,
    lockout_until: Gauge,
    rejected_calls: IntGauge,
    rejected_calls_max: IntGauge,
    reloads: IntCounterVec,
    last_reload_ok: IntGauge,
    token_reviews: IntCounterVec,
    rate_limited: IntCounterVec,
    audit_dropped: IntCounter,
    connections_refused: IntCounterVec,
    connections_open: IntGaugeVec,
    watch_streams: IntGaugeVec,
}

/// Why a call to Kraken was not made, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    Lockout,
    Budget,
}

impl HeldReason {
    pub const ALL: [HeldReason; 2] = [HeldReason::Lockout, HeldReason::Budget];

    pub fn as_str(self) -> &'static str {
        match self {
            HeldReason::Lockout => "lockout",
            HeldReason::Budget => "rejected_budget",
        }
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique and valid");
    collector
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry holding every metric of the contract.
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NS);
        let hopts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help).namespace(NS).buckets(buckets.to_vec())
        };
        let refreshes = register(
            &registry,
            IntCounterVec::new(
                opts("refreshes_total", "GetWebSocketsToken calls made, by outcome."),
                &["account", "result"],
            )
            .expect("valid"),
        );
        let refresh_failures = register(
            &registry,
            IntCounterVec::new(
                opts("refresh_failures_total", "Failed GetWebSocketsToken calls, by reason."),
                &["account", "reason"],
            )
            .expect("valid"),
        );
        let refresh_duration = register(
            &registry,
            HistogramVec::new(
                hopts(
                    "refresh_duration_seconds",
                    "Time a GetWebSocketsToken call took, success or failure.",
                    REFRESH_BUCKETS,
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let token_expiry = register(
            &registry,
            GaugeVec::new(
                opts(
                    "token_expiry_timestamp_seconds",
                    "Unix time when the held token's use-by passes (0 when none is held).",
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let last_success = register(
            &registry,
            GaugeVec::new(
                opts(
                    "last_refresh_success_timestamp_seconds",
                    "Unix time of the last successful refresh (0 before the first).",
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let last_failure = register(
            &registry,
            GaugeVec::new(
                opts(
                    "last_refresh_failure_timestamp_seconds",
                    "Unix time of the last failed refresh, by reason (0 before the first).",
                ),
                &["account", "reason"],
            )
            .expect("valid"),
        );
        let token_valid = register(
            &registry,
            IntGaugeVec::new(
                opts(
                    "token_valid",
                    "1 when a token with at least min_served_ttl left is held, else 0.",
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let http_requests = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "http_requests_total",
                    "HTTP requests answered, by matched route and status.",
                ),
                &["route", "status"],
            )
            .expect("valid"),
        );
        let http_duration = register(
            &registry,
            HistogramVec::new(
                hopts(
                    "http_request_duration_seconds",
                    "Time to answer an HTTP request, by matched route.",
                    HTTP_BUCKETS,
                ),
                &["route"],
            )
            .expect("valid"),
        );
        let http_in_flight = register(
            &registry,
            IntGaugeVec::new(
                opts("http_requests_in_flight", "HTTP requests being answered now, by route."),
                &["route"],
            )
            .expect("valid"),
        );
        let tokens_served = register(
            &registry,
            IntCounterVec::new(
                opts("tokens_served_total", "Tokens handed to consumers."),
                &["account", "consumer"],
            )
            .expect("valid"),
        );
        let auth_failures = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "auth_failures_total",
                    "Consumer requests refused: missing or invalid credential, or an account not granted.",
                ),
                &["reason"],
            )
            .expect("valid"),
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                opts("build_info", "Always 1; the version label names the build."),
                &["version"],
            )
            .expect("valid"),
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let key_expiry = register(
            &registry,
            GaugeVec::new(
                opts(
                    "api_key_expiry_timestamp_seconds",
                    "Unix time of the API key's expiration at Kraken, as configured (key_expires_at); only accounts that set it.",
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let key_info = register(
            &registry,
            IntGaugeVec::new(
                opts(
                    "api_key_info",
                    "Always 1; key_fingerprint names the API key signing for the account (first 8 hex of its SHA-256).",
                ),
                &["account", "key_fingerprint"],
            )
            .expect("valid"),
        );
        let unservable = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "unservable_tokens_total",
                    "Tokens Kraken granted that live no longer than min_served_ttl, so can never be served.",
                ),
                &["account"],
            )
            .expect("valid"),
        );
        let calls_held = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "kraken_calls_held_total",
                    "Calls to Kraken not made: during a lockout, or past the rejected-call budget.",
                ),
                &["account", "reason"],
            )
            .expect("valid"),
        );
        let lockout_until = register(
            &registry,
            Gauge::with_opts(opts(
                "kraken_lockout_until_timestamp_seconds",
                "Unix time until which no account calls Kraken after a lockout answer (0 when none).",
            ))
            .expect("valid"),
        );
        let rejected_calls = register(
            &registry,
            IntGauge::with_opts(opts(
                "kraken_rejected_calls",
                "Calls rejected by Kraken (invalid key, signature, nonce, permission) in the last 15 minutes, all accounts.",
            ))
            .expect("valid"),
        );
        let rejected_calls_max = register(
            &registry,
            IntGauge::with_opts(opts(
                "kraken_rejected_calls_max",
                "The budget of rejected calls per 15 minutes (kraken.max_rejected_calls).",
            ))
            .expect("valid"),
        );
        let reloads = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "config_reloads_total",
                    "Config reloads, by outcome (a failure keeps the running config).",
                ),
                &["result"],
            )
            .expect("valid"),
        );
        let last_reload_ok = register(
            &registry,
            IntGauge::with_opts(opts(
                "config_last_reload_successful",
                "1 when the last config reload was applied (or none was tried), 0 when it was refused.",
            ))
            .expect("valid"),
        );
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        last_reload_ok.set(1);
        let token_reviews = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "token_reviews_total",
                    "TokenReviews of ServiceAccount tokens, by outcome (cache hits are not reviews).",
                ),
                &["result"],
            )
            .expect("valid"),
        );
        for result in ["authenticated", "rejected", "error"] {
            token_reviews.with_label_values(&[result]);
        }
        let rate_limited = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "rate_limited_total",
                    "Requests refused with 429 because the consumer exceeded its own rate limit or share of forced refreshes.",
                ),
                &["consumer"],
            )
            .expect("valid"),
        );
        let audit_dropped = register(
            &registry,
            IntCounter::with_opts(opts(
                "audit_events_dropped_total",
                "Audit lines dropped because the audit sink did not keep up (serving never waits for it).",
            ))
            .expect("valid"),
        );
        let connections_refused = register(
            &registry,
            IntCounterVec::new(
                opts(
                    "connections_refused_total",
                    "Connections closed at accept or early: listener or address full of proven connections, evicted for a newcomer, a failed or stalled TLS handshake, an expired client certificate.",
                ),
                &["listener", "reason"],
            )
            .expect("valid"),
        );
        let connections_open = register(
            &registry,
            IntGaugeVec::new(
                opts("connections_open", "Open connections, by listener."),
                &["listener"],
            )
            .expect("valid"),
        );
        for listener in ["api", "admin"] {
            connections_open.with_label_values(&[listener]);
            for reason in ConnectionRefusal::ALL {
                connections_refused.with_label_values(&[listener, reason.as_str()]);
            }
        }
        let watch_streams = register(
            &registry,
            IntGaugeVec::new(
                opts("watch_streams", "Open GET /v1/token/watch streams, by account."),
                &["account"],
            )
            .expect("valid"),
        );
        for reason in AuthFailure::ALL {
            auth_failures.with_label_values(&[reason.as_str()]);
        }
        let routes = ROUTE_STATUSES
            .iter()
            .map(|(route, statuses)| RouteMetrics {
                route,
                in_flight: http_in_flight.with_label_values(&[*route]),
                duration: http_duration.with_label_values(&[*route]),
                by_status: statuses
                    .iter()
                    .map(|s| (*s, http_requests.with_label_values(&[*route, &s.to_string()])))
                    .collect(),
            })
            .collect();
        Self(std::sync::Arc::new(Inner {
            registry,
            routes,
            refreshes,
            refresh_failures,
            refresh_duration,
            token_expiry,
            last_success,
            last_failure,
            token_valid,
            http_requests,
            http_duration,
            http_in_flight,
            tokens_served,
            auth_failures,
            key_expiry,
            key_info,
            unservable,
            calls_held,
            lockout_until,
            rejected_calls,
            rejected_calls_max,
            reloads,
            last_reload_ok,
            token_reviews,
            rate_limited,
            audit_dropped,
            connections_refused,
            connections_open,
            watch_streams,
        }))
    }

    pub fn token_review(&self, result: &str) {
        self.0.token_reviews.with_label_values(&[result]).inc();
    }

    /// `rate_limited_total{consumer}`, pre-set to 0.
    pub fn rate_limited(&self, consumer: &str) -> IntCounter {
        self.0.rate_limited.with_label_values(&[consumer])
    }

    pub fn remove_rate_limited(&self, consumer: &str) {
        let _ = self.0.rate_limited.remove_label_values(&[consumer]);
    }

    /// `lines` audit lines lost.
    pub fn audit_dropped(&self, lines: u64) {
        self.0.audit_dropped.inc_by(lines);
    }

    pub fn connection_refused(&self, listener: &str, reason: ConnectionRefusal) {
        self.0
            .connections_refused
            .with_label_values(&[listener, reason.as_str()])
            .inc();
    }

    pub fn connections_open(&self, listener: &str) -> IntGauge {
        self.0.connections_open.with_label_values(&[listener])
    }

    /// Records a reload's outcome.
    pub fn reload(&self, applied: bool) {
        let result = if applied { "success" } else { "failure" };
        self.0.reloads.with_label_values(&[result]).inc();
        self.0.last_reload_ok.set(i64::from(applied));
    }

    /// The gate's state, set just before a scrape.
    pub fn set_gate(&self, lockout_until_unix: f64, rejected: u32, max: u32) {
        self.0.lockout_until.set(lockout_until_unix);
        self.0.rejected_calls.set(i64::from(rejected));
        self.0.rejected_calls_max.set(i64::from(max));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.0.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Handles for one account, every series pre-set to 0.
    pub fn account(&self, account: &str) -> AccountMetrics {
        let failures = Reason::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    self.0.refresh_failures.with_label_values(&[account, r.as_str()]),
                    self.0.last_failure.with_label_values(&[account, r.as_str()]),
                )
            })
            .collect();
        for reason in HeldReason::ALL {
            self.0.calls_held.with_label_values(&[account, reason.as_str()]);
        }
        self.0.watch_streams.with_label_values(&[account]);
        AccountMetrics {
            account: account.to_owned(),
            metrics: self.clone(),
            success: self.0.refreshes.with_label_values(&[account, "success"]),
            failure: self.0.refreshes.with_label_values(&[account, "failure"]),
            failures,
            duration: self.0.refresh_duration.with_label_values(&[account]),
            expiry: self.0.token_expiry.with_label_values(&[account]),
            last_success: self.0.last_success.with_label_values(&[account]),
            valid: self.0.token_valid.with_label_values(&[account]),
            unservable: self.0.unservable.with_label_values(&[account]),
        }
    }

    /// Drops an account's series (after a reload removed it).
    pub fn remove_account(&self, account: &str) {
        let _ = self.0.refreshes.remove_label_values(&[account, "success"]);
        let _ = self.0.refreshes.remove_label_values(&[account, "failure"]);
        for r in Reason::ALL {
            let _ = self.0.refresh_failures.remove_label_values(&[account, r.as_str()]);
            let _ = self.0.last_failure.remove_label_values(&[account, r.as_str()]);
        }
        let _ = self.0.refresh_duration.remove_label_values(&[account]);
        let _ = self.0.token_expiry.remove_label_values(&[account]);
        let _ = self.0.last_success.remove_label_values(&[account]);
        let _ = self.0.token_valid.remove_label_values(&[account]);
        let _ = self.0.key_expiry.remove_label_values(&[account]);
        let _ = self.0.unservable.remove_label_values(&[account]);
        let _ = self.0.watch_streams.remove_label_values(&[account]);
        for reason in HeldReason::ALL {
            let _ = self.0.calls_held.remove_label_values(&[account, reason.as_str()]);
        }
        self.remove_key_info(account);
    }

    /// Drops every `api_key_info` series of `account`.
    fn remove_key_info(&self, account: &str) {
        for family in self.0.registry.gather() {
            if family.name() != format!("{NS}_api_key_info") {
                continue;
            }
            for metric in family.get_metric() {
                let labels = metric.get_label();
                let of_account = labels.iter().any(|l| l.name() == "account" && l.value() == account);
                if let Some(fp) = labels.iter().find(|l| l.name() == "key_fingerprint")
                    && of_account
                {
                    let _ = self.0.key_info.remove_label_values(&[account, fp.value()]);
                }
            }
        }
    }

    /// The counter of tokens served to `consumer` from `account`, pre-set to 0.
    /// `watch_streams{account}`.
    pub fn watch_streams(&self, account: &str) -> IntGauge {
        self.0.watch_streams.with_label_values(&[account])
    }

    pub fn served(&self, account: &str, consumer: &str) -> IntCounter {
        self.0.tokens_served.with_label_values(&[account, consumer])
    }

    pub fn remove_served(&self, account: &str, consumer: &str) {
        let _ = self.0.tokens_served.remove_label_values(&[account, consumer]);
    }

    pub fn auth_failure(&self, reason: AuthFailure) {
        self.0.auth_failures.with_label_values(&[reason.as_str()]).inc();
    }

    /// Where one request's metrics go, resolved once for the request.
    pub fn request<'a>(&'a self, route: &'a str) -> RequestMetrics<'a> {
        RequestMetrics {
            metrics: self,
            route,
            known: self.0.routes.iter().find(|r| r.route == route),
        }
    }
}

/// One request's metric handles: a route's pre-resolved series, or (for a
/// route outside the closed set, which `route_label` never yields) a lookup.
pub struct RequestMetrics<'a> {
    metrics: &'a Metrics,
    route: &'a str,
    known: Option<&'a RouteMetrics>,
}

impl RequestMetrics<'_> {
    /// The route's in-flight gauge.
    pub fn in_flight(&self) -> IntGauge {
        match self.known {
            Some(r) => r.in_flight.clone(),
            None => self.metrics.0.http_in_flight.with_label_values(&[self.route]),
        }
    }

    /// Records the answer.
    pub fn record(&self, status: u16, seconds: f64) {
        let m = &self.metrics.0;
        match self.known.and_then(|r| r.by_status.iter().find(|(s, _)| *s == status)) {
            Some((_, counter)) => counter.inc(),
            None => m
                .http_requests
                .with_label_values(&[self.route, &status.to_string()])
                .inc(),
        }
        match self.known {
            Some(r) => r.duration.observe(seconds),
            None => m.http_duration.with_label_values(&[self.route]).observe(seconds),
        }
    }
}

/// One account's metric handles.
#[derive(Clone)]
pub struct AccountMetrics {
    account: String,
    metrics: Metrics,
    unservable: IntCounter,
    success: IntCounter,
    failure: IntCounter,
    /// Per reason: the failure counter and the last-failure timestamp.
    failures: Vec<(Reason, IntCounter, Gauge)>,
    duration: Histogram,
    expiry: Gauge,
    last_success: Gauge,
    valid: IntGauge,
}

impl AccountMetrics {
    pub fn refresh_succeeded(&self, seconds: f64, expires_at_unix: f64, now_unix: f64) {
        self.success.inc();
        self.duration.observe(seconds);
        self.expiry.set(expires_at_unix);
        self.last_success.set(now_unix);
    }

    pub fn refresh_failed(&self, reason: Reason, seconds: f64, now_unix: f64) {
        self.failure.inc();
        self.duration.observe(seconds);
        if let Some((_, counter, last)) = self.failures.iter().find(|(r, _, _)| *r == reason) {
            counter.inc();
            last.set(now_unix);
        }
    }

    /// No token is held any more (dropped after use-by or invalidation).
    pub fn token_dropped(&self) {
        self.expiry.set(0.0);
        self.valid.set(0);
    }

    pub fn set_valid(&self, valid: bool) {
        self.valid.set(i64::from(valid));
    }

    /// Names the key now signing (and its configured expiration).
    pub fn set_key(&self, fingerprint: &str, expires_at: Option<std::time::SystemTime>) {
        let m = &self.metrics.0;
        self.metrics.remove_key_info(&self.account);
        m.key_info.with_label_values(&[&self.account, fingerprint]).set(1);
        match expires_at {
            Some(t) => m
                .key_expiry
                .with_label_values(&[&self.account])
                .set(crate::clock::unix_secs_f64(t)),
            None => {
                let _ = m.key_expiry.remove_label_values(&[&self.account]);
            }
        }
    }

    pub fn unservable_token(&self) {
        self.unservable.inc();
    }

    /// A call not made: the gate held it.
    pub fn call_held(&self, held: &crate::token::gate::Held) {
        let reason = match held {
            crate::token::gate::Held::Lockout { .. } => HeldReason::Lockout,
            crate::token::gate::Held::Budget { .. } => HeldReason::Budget,
        };
        self.metrics
            .0
            .calls_held
            .with_label_values(&[&self.account, reason.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed_with_zeroed_series() {
        let m = Metrics::new();
        let _ = m.account("main");
        let _ = m.served("main", "mm-btc");
        let text = m.encode();
        for name in [
            "kraken_token_broker_refreshes_total{account=\"main\",result=\"success\"} 0",
            "kraken_token_broker_refreshes_total{account=\"main\",result=\"failure\"} 0",
            "kraken_token_broker_refresh_failures_total{account=\"main\",reason=\"invalid_key\"} 0",
            "kraken_token_broker_refresh_failures_total{account=\"main\",reason=\"unavailable\"} 0",
            "kraken_token_broker_refresh_duration_seconds_count{account=\"main\"} 0",
            "kraken_token_broker_token_expiry_timestamp_seconds{account=\"main\"} 0",
            "kraken_token_broker_last_refresh_success_timestamp_seconds{account=\"main\"} 0",
            "kraken_token_broker_token_valid{account=\"main\"} 0",
            "kraken_token_broker_http_requests_total{route=\"/v1/token\",status=\"503\"} 0",
            "kraken_token_broker_http_request_duration_seconds_count{route=\"/v1/token\"} 0",
            "kraken_token_broker_tokens_served_total{account=\"main\",consumer=\"mm-btc\"} 0",
            "kraken_token_broker_auth_failures_total{reason=\"forbidden\"} 0",
            "kraken_token_broker_build_info{version=\"",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        for reason in Reason::ALL {
            let series = format!("refresh_failures_total{{account=\"main\",reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
    }

    #[test]
    fn account_handles_record_and_removal_drops_series() {
        let m = Metrics::new();
        let a = m.account("main");
        a.refresh_failed(Reason::Unavailable, 0.2, 1_799_999_000.0);
        a.refresh_succeeded(0.1, 1_800_000_000.0, 1_799_999_100.0);
        a.set_valid(true);
        let text = m.encode();
        assert!(text.contains("refresh_failures_total{account=\"main\",reason=\"unavailable\"} 1"));
        assert!(
            text.contains("last_refresh_failure_timestamp_seconds{account=\"main\",reason=\"unavailable\"} 1799999000")
        );
        assert!(text.contains("refreshes_total{account=\"main\",result=\"success\"} 1"));
        assert!(text.contains("token_valid{account=\"main\"} 1"));
        assert!(text.contains("token_expiry_timestamp_seconds{account=\"main\"} 1800000000"));
        m.remove_account("main");
        assert!(!m.encode().contains("account=\"main\""));
    }

    #[test]
    fn separate_instances_do_not_share_values() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.auth_failure(AuthFailure::Invalid);
        assert!(a.encode().contains("auth_failures_total{reason=\"invalid\"} 1"));
        assert!(b.encode().contains("auth_failures_total{reason=\"invalid\"} 0"));
    }
}
