//! The broker's Prometheus metrics, named as the contract fixes them
//! (`catalogue.txt` holds every family's name, type, labels and help, and a
//! test holds the registry to it).
//!
//! One non-global [`Registry`] per broker (so each test gets its own), base
//! units, timestamps rather than ages, labels only from closed sets (enums)
//! or from the config's own names (accounts, consumers), and every known
//! label combination set to 0 up front so a first failure shows as a rise.
//! Handles for one account or one route are resolved once and kept, so the
//! hot path does no label lookups.
//!
//! Each group is defined beside what it measures and registered here:
//!
//! | group | defined in | measures |
//! |---|---|---|
//! | [`TokenMetrics`], [`AccountMetrics`] | `token/metrics.rs` | refreshes, the held token, the key |
//! | [`GateMetrics`] | `token/metrics.rs` | the lockout and the rejected-call budget |
//! | [`HttpMetrics`] | `http/metrics.rs` | requests by route, connections |
//! | [`ConsumerMetrics`] | `http/metrics.rs` | tokens served, refusals, reviews, watch streams |
//! | [`RelayMetrics`] | `http/relay/metrics.rs` | relay connections, messages, refusals |
//! | [`AuditMetrics`] | `audit/mod.rs` | audit lines lost |
//! | [`ProcessMetrics`] | `metrics/process.rs` | the build, config reloads |

pub mod process;

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub use crate::audit::AuditMetrics;
pub use crate::http::metrics::{AuthFailure, ConnectionRefusal, ConsumerMetrics, HttpMetrics, ListenerName, Route};
pub use crate::http::relay::metrics::RelayMetrics;
pub use crate::token::metrics::{AccountMetrics, GateMetrics, HeldReason, TokenMetrics};
pub use process::ProcessMetrics;

/// The `result` label of counters of attempts (`refreshes_total`,
/// `config_reloads_total`): a closed set of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub const ALL: [Outcome; 2] = [Outcome::Success, Outcome::Failure];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

/// Every metric's name starts with this.
pub const NS: &str = "kraken_token_broker";

/// Registers metrics under [`NS`]; names and label sets are constants of
/// the code, so registering can only fail on a programming error.
pub struct Register<'a>(&'a Registry);

impl Register<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, collector: Result<C, prometheus::Error>) -> C {
        let collector = collector.expect("metric names and labels are valid constants");
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique");
        collector
    }

    fn opts(name: &str, help: &str) -> Opts {
        Opts::new(name, help).namespace(NS)
    }

    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(Self::opts(name, help)))
    }

    pub fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Self::opts(name, help), labels))
    }

    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::with_opts(Self::opts(name, help)))
    }

    pub fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Self::opts(name, help), labels))
    }

    pub fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::with_opts(Self::opts(name, help)))
    }

    pub fn int_gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Self::opts(name, help), labels))
    }

    pub fn histograms(&self, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).namespace(NS).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels))
    }
}

/// All of the broker's metrics. Cloning is one reference-count increment.
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<Inner>);

struct Inner {
    registry: Registry,
    tokens: TokenMetrics,
    gate: GateMetrics,
    http: HttpMetrics,
    consumers: ConsumerMetrics,
    relay: RelayMetrics,
    audit: AuditMetrics,
    process: ProcessMetrics,
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
        let r = Register(&registry);
        let inner = Inner {
            tokens: TokenMetrics::register(&r),
            gate: GateMetrics::register(&r),
            http: HttpMetrics::register(&r),
            consumers: ConsumerMetrics::register(&r),
            relay: RelayMetrics::register(&r),
            audit: AuditMetrics::register(&r),
            process: ProcessMetrics::register(&r),
            registry,
        };
        Self(std::sync::Arc::new(inner))
    }

    pub fn gate(&self) -> &GateMetrics {
        &self.0.gate
    }

    pub fn http(&self) -> &HttpMetrics {
        &self.0.http
    }

    pub fn consumers(&self) -> &ConsumerMetrics {
        &self.0.consumers
    }

    pub fn relay(&self) -> &RelayMetrics {
        &self.0.relay
    }

    pub fn audit(&self) -> &AuditMetrics {
        &self.0.audit
    }

    pub fn process(&self) -> &ProcessMetrics {
        &self.0.process
    }

    /// Handles for one account, every series of it pre-set to 0 (its
    /// watch streams and held calls too).
    pub fn account(&self, account: &str) -> AccountMetrics {
        self.0.consumers.watch_streams(account);
        self.0.relay.connections(account);
        self.0.tokens.account(account, &self.0.gate)
    }

    /// Drops an account's series, in every group (after a reload removed it).
    pub fn remove_account(&self, account: &str) {
        self.0.tokens.remove_account(account);
        self.0.gate.remove_account(account);
        self.0.consumers.remove_account(account);
        self.0.relay.remove_account(account);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        // The text encoder fails only on a write error (none into a String)
        // or a metric without a type (none is registered here).
        TextEncoder::new()
            .encode_to_string(&self.0.registry.gather())
            .unwrap_or_default()
    }

    /// Every family: name, type, label names and help, one line each (the
    /// form of `catalogue.txt`).
    pub fn catalogue(&self) -> String {
        let mut out = String::new();
        for family in self.0.registry.gather() {
            let mut labels: Vec<&str> = family
                .get_metric()
                .iter()
                .flat_map(|m| m.get_label().iter().map(|l| l.name()))
                .collect();
            labels.sort_unstable();
            labels.dedup();
            out.push_str(&format!(
                "{} {:?} [{}] {}\n",
                family.name(),
                family.get_field_type(),
                labels.join(","),
                family.help()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::Reason;

    #[test]
    fn the_exported_catalogue_is_the_contracts() {
        let m = Metrics::new();
        let main = m.account("main");
        let _ = m.consumers().served("main", "mm");
        let _ = m.consumers().rate_limited("mm");
        m.relay().consumer("mm");
        main.set_key("abcd1234", Some(std::time::SystemTime::UNIX_EPOCH));
        main.set_permissions(Some(&["create-ws-token".to_owned()]));
        assert_eq!(m.catalogue(), include_str!("catalogue.txt"));
    }

    #[test]
    fn every_contract_metric_is_exposed_with_zeroed_series() {
        let m = Metrics::new();
        let _ = m.account("main");
        let _ = m.consumers().served("main", "mm-btc");
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
        a.consumers().auth_failure(AuthFailure::Invalid);
        assert!(a.encode().contains("auth_failures_total{reason=\"invalid\"} 1"));
        assert!(b.encode().contains("auth_failures_total{reason=\"invalid\"} 0"));
    }
}
