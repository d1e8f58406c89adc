//! The relay's metric families: open connections per account, frames
//! relayed each way, refusals per consumer and reason.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

use super::Refusal;
use crate::metrics::Register;

/// `direction` of `relay_messages_total`: a closed set of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToKraken,
    ToConsumer,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::ToKraken, Direction::ToConsumer];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToKraken => "to_kraken",
            Direction::ToConsumer => "to_consumer",
        }
    }
}

pub struct RelayMetrics {
    connections: IntGaugeVec,
    to_kraken: IntCounter,
    to_consumer: IntCounter,
    refused: IntCounterVec,
    resent: IntCounterVec,
}

impl RelayMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        let messages = r.counters(
            "relay_messages_total",
            "Frames relayed through GET /v1/relay, by direction (the broker's own answers count as to_consumer).",
            &["direction"],
        );
        Self {
            connections: r.int_gauges(
                "relay_connections",
                "Open GET /v1/relay connections (each with its own connection to Kraken), by account.",
                &["account"],
            ),
            to_kraken: messages.with_label_values(&[Direction::ToKraken.as_str()]),
            to_consumer: messages.with_label_values(&[Direction::ToConsumer.as_str()]),
            refused: r.counters(
                "relay_refused_total",
                "Relay requests and connections refused or ended by the broker, by consumer and reason.",
                &["consumer", "reason"],
            ),
            resent: r.counters(
                "relay_resent_total",
                "Relayed requests sent again with a new token after Kraken refused the one injected, by account.",
                &["account"],
            ),
        }
    }

    /// `relay_connections{account}` (pre-set to 0 with the account).
    pub fn connections(&self, account: &str) -> IntGauge {
        let _ = self.resent.with_label_values(&[account]);
        self.connections.with_label_values(&[account])
    }

    pub fn resent(&self, account: &str) -> IntCounter {
        self.resent.with_label_values(&[account])
    }

    pub fn remove_account(&self, account: &str) {
        let _ = self.connections.remove_label_values(&[account]);
        let _ = self.resent.remove_label_values(&[account]);
    }

    /// One frame relayed.
    pub fn message(&self, direction: Direction) {
        match direction {
            Direction::ToKraken => self.to_kraken.inc(),
            Direction::ToConsumer => self.to_consumer.inc(),
        }
    }

    /// Every refusal reason of `consumer`, pre-set to 0.
    pub fn consumer(&self, consumer: &str) {
        for reason in Refusal::ALL {
            self.refused.with_label_values(&[consumer, reason.as_str()]);
        }
    }

    pub fn remove_consumer(&self, consumer: &str) {
        for reason in Refusal::ALL {
            let _ = self.refused.remove_label_values(&[consumer, reason.as_str()]);
        }
    }

    pub fn refused(&self, consumer: &str, reason: Refusal) {
        self.refused.with_label_values(&[consumer, reason.as_str()]).inc();
    }
}
