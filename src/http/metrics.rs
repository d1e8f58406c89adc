//! The metrics of the HTTP surfaces ([`HttpMetrics`]: requests by route,
//! connections by listener) and of the consumer path ([`ConsumerMetrics`]:
//! tokens served, refusals, reviews, watch streams), with their closed label
//! sets as enums.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use crate::identity::service_account::ReviewResult;
use crate::metrics::Register;

/// HTTP durations: a cached token is served in microseconds; a request that
/// waits for a refresh takes as long as the Kraken call.
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0,
];

/// A route of the consumer or admin API, as labelled: the matched route,
/// never the raw path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Token,
    Invalidate,
    Watch,
    Relay,
    Healthz,
    Readyz,
    Metrics,
    /// Any other path, and requests that could not be parsed.
    Unmatched,
}

impl Route {
    pub const ALL: [Route; 8] = [
        Route::Token,
        Route::Invalidate,
        Route::Watch,
        Route::Relay,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Unmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Token => "/v1/token",
            Route::Invalidate => "/v1/token/invalidate",
            Route::Watch => "/v1/token/watch",
            Route::Relay => "/v1/relay",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::Unmatched => "unmatched",
        }
    }

    /// The route a request path matches (the routes are static).
    pub fn of_path(path: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|route| *route != Route::Unmatched && route.as_str() == path)
            .unwrap_or(Route::Unmatched)
    }

    /// The statuses the route answers, pre-set to 0.
    fn statuses(self) -> &'static [u16] {
        match self {
            Route::Token => &[200, 400, 401, 403, 405, 413, 429, 431, 503],
            Route::Invalidate => &[200, 400, 401, 403, 405, 413, 415, 429, 431, 503],
            Route::Watch => &[200, 400, 401, 403, 405, 429, 431, 503],
            Route::Relay => &[101, 400, 401, 403, 405, 429, 431, 503],
            Route::Healthz | Route::Metrics => &[200],
            Route::Readyz => &[200, 503],
            Route::Unmatched => &[400, 404, 414, 431],
        }
    }
}

/// A listener, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerName {
    Api,
    Admin,
}

impl ListenerName {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerName::Api => "api",
            ListenerName::Admin => "admin",
        }
    }
}

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

/// The series of one route, resolved once: recording a request does no
/// label hashing and no allocation for the statuses it is known to answer.
pub struct RouteMetrics {
    route: Route,
    in_flight: IntGauge,
    duration: Histogram,
    by_status: Vec<(u16, IntCounter)>,
    /// For a status the route is not known to answer (a 500 from a handler
    /// that panicked).
    requests: IntCounterVec,
}

impl RouteMetrics {
    /// The route's in-flight gauge.
    pub fn in_flight(&self) -> IntGauge {
        self.in_flight.clone()
    }

    /// Records the answer.
    pub fn record(&self, status: u16, seconds: f64) {
        match self.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.inc(),
            None => self
                .requests
                .with_label_values(&[self.route.as_str(), &status.to_string()])
                .inc(),
        }
        self.duration.observe(seconds);
    }
}

/// Requests by route, connections by listener.
pub struct HttpMetrics {
    routes: Vec<RouteMetrics>,
    connections_refused: IntCounterVec,
    connections_open: IntGaugeVec,
}

impl HttpMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        let requests = r.counters(
            "http_requests_total",
            "HTTP requests answered, by matched route and status.",
            &["route", "status"],
        );
        let duration = r.histograms(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by matched route.",
            HTTP_BUCKETS,
            &["route"],
        );
        let in_flight = r.int_gauges(
            "http_requests_in_flight",
            "HTTP requests being answered now, by route.",
            &["route"],
        );
        let connections_refused = r.counters(
            "connections_refused_total",
            "Connections closed at accept or early: listener or address full of proven connections, evicted for a newcomer, a failed or stalled TLS handshake, an expired client certificate.",
            &["listener", "reason"],
        );
        let connections_open = r.int_gauges("connections_open", "Open connections, by listener.", &["listener"]);
        for listener in [ListenerName::Api, ListenerName::Admin] {
            connections_open.with_label_values(&[listener.as_str()]);
            for reason in ConnectionRefusal::ALL {
                connections_refused.with_label_values(&[listener.as_str(), reason.as_str()]);
            }
        }
        let routes = Route::ALL
            .into_iter()
            .map(|route| RouteMetrics {
                route,
                in_flight: in_flight.with_label_values(&[route.as_str()]),
                duration: duration.with_label_values(&[route.as_str()]),
                by_status: route
                    .statuses()
                    .iter()
                    .map(|s| (*s, requests.with_label_values(&[route.as_str(), &s.to_string()])))
                    .collect(),
                requests: requests.clone(),
            })
            .collect();
        Self {
            routes,
            connections_refused,
            connections_open,
        }
    }

    /// Where one request's metrics go (`routes` holds every route, in the
    /// order of its declaration).
    pub fn request(&self, route: Route) -> &RouteMetrics {
        &self.routes[route as usize]
    }

    pub fn connection_refused(&self, listener: ListenerName, reason: ConnectionRefusal) {
        self.connections_refused
            .with_label_values(&[listener.as_str(), reason.as_str()])
            .inc();
    }

    pub fn connections_open(&self, listener: ListenerName) -> IntGauge {
        self.connections_open.with_label_values(&[listener.as_str()])
    }
}

/// The consumer path: who was served, who was refused, reviews, streams.
pub struct ConsumerMetrics {
    tokens_served: IntCounterVec,
    auth_failures: IntCounterVec,
    rate_limited: IntCounterVec,
    token_reviews: IntCounterVec,
    watch_streams: IntGaugeVec,
}

impl ConsumerMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        let auth_failures = r.counters(
            "auth_failures_total",
            "Consumer requests refused: missing or invalid credential, or an account not granted.",
            &["reason"],
        );
        for reason in AuthFailure::ALL {
            auth_failures.with_label_values(&[reason.as_str()]);
        }
        let token_reviews = r.counters(
            "token_reviews_total",
            "TokenReviews of ServiceAccount tokens, by outcome (cache hits are not reviews).",
            &["result"],
        );
        for result in ReviewResult::ALL {
            token_reviews.with_label_values(&[result.as_str()]);
        }
        Self {
            tokens_served: r.counters(
                "tokens_served_total",
                "Tokens handed to consumers.",
                &["account", "consumer"],
            ),
            auth_failures,
            rate_limited: r.counters(
                "rate_limited_total",
                "Requests refused with 429 because the consumer exceeded its own rate limit or share of forced refreshes.",
                &["consumer"],
            ),
            token_reviews,
            watch_streams: r.int_gauges(
                "watch_streams",
                "Open GET /v1/token/watch streams, by account.",
                &["account"],
            ),
        }
    }

    /// The counter of tokens served to `consumer` from `account`, pre-set to 0.
    pub fn served(&self, account: &str, consumer: &str) -> IntCounter {
        self.tokens_served.with_label_values(&[account, consumer])
    }

    pub fn remove_served(&self, account: &str, consumer: &str) {
        let _ = self.tokens_served.remove_label_values(&[account, consumer]);
    }

    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures.with_label_values(&[reason.as_str()]).inc();
    }

    /// `rate_limited_total{consumer}`, pre-set to 0.
    pub fn rate_limited(&self, consumer: &str) -> IntCounter {
        self.rate_limited.with_label_values(&[consumer])
    }

    pub fn remove_rate_limited(&self, consumer: &str) {
        let _ = self.rate_limited.remove_label_values(&[consumer]);
    }

    pub fn token_review(&self, result: ReviewResult) {
        self.token_reviews.with_label_values(&[result.as_str()]).inc();
    }

    /// `watch_streams{account}`.
    pub fn watch_streams(&self, account: &str) -> IntGauge {
        self.watch_streams.with_label_values(&[account])
    }

    pub fn remove_account(&self, account: &str) {
        let _ = self.watch_streams.remove_label_values(&[account]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_listed_in_their_declared_order() {
        for (i, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(route as usize, i);
        }
    }

    #[test]
    fn paths_map_to_their_route_and_anything_else_to_unmatched() {
        for route in Route::ALL {
            if route != Route::Unmatched {
                assert_eq!(Route::of_path(route.as_str()), route);
            }
        }
        assert_eq!(Route::of_path("unmatched"), Route::Unmatched);
        assert_eq!(Route::of_path("/v1/token/"), Route::Unmatched);
        assert_eq!(Route::of_path("/x"), Route::Unmatched);
    }
}
