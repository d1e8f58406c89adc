//! The audit trail's events, as types: each line is one of these, with the
//! time it was recorded. Tokens appear only as keyed fingerprints.

use serde::Serialize;

/// One audited decision.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event")]
pub enum Event {
    /// A token handed to a consumer.
    #[serde(rename = "token.served")]
    TokenServed {
        consumer: String,
        identity: &'static str,
        account: String,
        peer: Option<String>,
        /// The token's keyed fingerprint.
        token: String,
        expires_at: String,
        via: Via,
    },
    /// A consumer reported a token Kraken refused.
    #[serde(rename = "token.invalidated")]
    TokenInvalidated {
        consumer: String,
        identity: &'static str,
        account: String,
        peer: Option<String>,
        /// The reported token's keyed fingerprint.
        reported: String,
        /// Whether the report replaced the held token (else it was older).
        replaced: bool,
    },
    /// Requests refused for their proof of identity, from one address for
    /// one reason: the first at once (`count` 1), then the repeats of each
    /// interval in one line (`count` of them, `since` when the interval
    /// began), so a flood cannot flood the trail.
    #[serde(rename = "auth.failed")]
    AuthFailed {
        reason: &'static str,
        identity: &'static str,
        /// The address (an IPv4 address or an IPv6 /64), or `*` for
        /// addresses past the number tracked.
        peer: String,
        count: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    /// A trading request sent through the relay, and Kraken's answer: which
    /// engine placed, changed or cancelled which order. Never the token.
    #[serde(rename = "relay.order")]
    RelayOrder(Box<RelayOrder>),
    /// The account's API key was seen used by another signer.
    #[serde(rename = "key.foreign_use")]
    KeyForeignUse {
        account: String,
        /// The key's fingerprint (first 8 hex of its SHA-256; never the key).
        key: String,
        /// How it showed.
        evidence: String,
    },
    /// A config reload's outcome.
    #[serde(rename = "config.reloaded")]
    ConfigReloaded {
        result: ReloadResult,
        #[serde(skip_serializing_if = "Option::is_none")]
        added: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        changed: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        removed: Option<Vec<String>>,
    },
}

/// How a served token left: `get`, `invalidate` or `watch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `GET /v1/token`.
    Get,
    /// `POST /v1/token/invalidate`, answered with the new token.
    Invalidate,
    /// An event of `GET /v1/token/watch`.
    Watch,
}

impl Via {
    /// As logs and audit lines name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Get => "get",
            Via::Invalidate => "invalidate",
            Via::Watch => "watch",
        }
    }
}

/// What a config reload ended in: `applied`, `refused` (invalid) or
/// `failed` (could not be read or put in force).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    Applied,
    Refused,
    Failed,
}

/// An event with the time it was recorded: one audit line.
#[derive(Serialize)]
pub(super) struct Line<'a> {
    #[serde(flatten)]
    pub event: &'a Event,
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_flat_json_with_the_event_name() {
        let event = Event::AuthFailed {
            reason: "invalid",
            identity: "credential",
            peer: "10.0.0.1".into(),
            count: 3,
            since: None,
        };
        let line = serde_json::to_value(Line {
            event: &event,
            time: "t".into(),
        })
        .unwrap();
        assert_eq!(
            line,
            serde_json::json!({"event": "auth.failed", "reason": "invalid", "identity": "credential",
                               "peer": "10.0.0.1", "count": 3, "time": "t"})
        );
    }
}

/// The fields of a `relay.order` line.
#[derive(Debug, Clone, Serialize)]
pub struct RelayOrder {
    pub consumer: String,
    pub account: String,
    pub peer: Option<String>,
    pub method: String,
    /// The request's `req_id`, as the engine sent it.
    pub req_id: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_qty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cl_ord_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_userref: Option<String>,
    /// The order the request names (`cancel_order`, `amend_order`), or the
    /// one Kraken's answer gives (`add_order`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// For `batch_add`/`batch_cancel`: how many orders it carries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders: Option<usize>,
    /// `answered` (Kraken's answer below), `unanswered` (the connection
    /// ended first), or `refused` (the broker answered: no token to be had).
    pub outcome: &'static str,
    pub success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
