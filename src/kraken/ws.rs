//! Kraken's WebSocket v2 as the relay sees it: which requests carry a
//! token, which place or cancel orders, what an error answer looks like,
//! and which errors mean the token was refused. Pure: no I/O.
//!
//! Sources: Kraken's API center (docs.kraken.com/api/docs/websocket-v2):
//! the methods `add_order`, `amend_order`, `edit_order`, `cancel_order`,
//! `cancel_all`, `cancel_all_orders_after`, `batch_add`, `batch_cancel`
//! each take `params.token`; of the channels, `executions`, `balances` and
//! `level3` are subscribed with a token. Error answers, as recorded from
//! the live API (kraken-async-rs fixtures): `{"error": "...", "method":
//! ..., "req_id": ..., "success": false, "time_in": ..., "time_out": ...}`.
//! A trading request without a token answers `Token(s) not found`; an
//! unknown or expired token `ESession:Invalid session`.

use serde_json::{Map, Value, json};

/// Every request method of WebSocket v2 (what `relay.allow` may name).
pub const METHODS: &[&str] = &[
    "ping",
    "subscribe",
    "unsubscribe",
    "add_order",
    "amend_order",
    "edit_order",
    "cancel_order",
    "cancel_all",
    "cancel_all_orders_after",
    "batch_add",
    "batch_cancel",
];

/// The methods that place, change or cancel orders: each one is audited.
pub const TRADING_METHODS: &[&str] = &[
    "add_order",
    "amend_order",
    "edit_order",
    "cancel_order",
    "cancel_all",
    "cancel_all_orders_after",
    "batch_add",
    "batch_cancel",
];

/// The channels subscribed with a token.
pub const PRIVATE_CHANNELS: &[&str] = &["executions", "balances", "level3"];

/// Every channel of WebSocket v2 (what `relay.allow` may name after
/// `subscribe:`/`unsubscribe:`).
pub const CHANNELS: &[&str] = &[
    "executions",
    "balances",
    "level3",
    "ticker",
    "book",
    "ohlc",
    "trade",
    "instrument",
    "status",
    "heartbeat",
];

/// The errors with which Kraken refuses a request's token: the token is
/// unknown, expired or revoked (`ESession:Invalid session`), or missing
/// (`Token(s) not found`).
pub const TOKEN_REFUSALS: &[&str] = &["ESession:Invalid session", "Token(s) not found"];

/// Whether `method` names a subscription (the only methods with a channel).
pub fn has_channel(method: &str) -> bool {
    matches!(method, "subscribe" | "unsubscribe")
}

/// A request as the relay reads it.
#[derive(Debug)]
pub struct Request {
    pub body: Map<String, Value>,
    pub method: String,
    /// `params.channel` of a subscription.
    pub channel: Option<String>,
}

/// Why a frame is not a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    NotJson,
    NoMethod,
}

impl Request {
    /// Reads a consumer's frame.
    pub fn parse(text: &str) -> Result<Self, Malformed> {
        let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
            return Err(Malformed::NotJson);
        };
        let method = body
            .get("method")
            .and_then(Value::as_str)
            .ok_or(Malformed::NoMethod)?
            .to_owned();
        let channel = if has_channel(&method) {
            body.get("params")
                .and_then(|p| p.get("channel"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        } else {
            None
        };
        Ok(Self { body, method, channel })
    }

    /// Whether Kraken needs a token on it.
    pub fn needs_token(&self) -> bool {
        if has_channel(&self.method) {
            return self.channel.as_deref().is_some_and(|c| PRIVATE_CHANNELS.contains(&c));
        }
        TRADING_METHODS.contains(&self.method.as_str())
    }

    /// Whether it places, changes or cancels orders.
    pub fn is_trading(&self) -> bool {
        TRADING_METHODS.contains(&self.method.as_str())
    }

    /// The client's `req_id`, as sent.
    pub fn req_id(&self) -> Option<&Value> {
        self.body.get("req_id")
    }

    /// The request as sent to Kraken with `token` in `params.token`
    /// (overwriting any token the client sent).
    pub fn with_token(&self, token: &str) -> String {
        let mut body = self.body.clone();
        let params = body.entry("params").or_insert_with(|| Value::Object(Map::new()));
        if !params.is_object() {
            *params = Value::Object(Map::new());
        }
        if let Value::Object(params) = params {
            params.insert("token".to_owned(), Value::String(token.to_owned()));
        }
        Value::Object(body).to_string()
    }

    /// The request as sent to Kraken without a token: any token the client
    /// put in is removed (the broker's is the only one that reaches Kraken).
    pub fn without_token(&self) -> String {
        let mut body = self.body.clone();
        if let Some(Value::Object(params)) = body.get_mut("params") {
            params.remove("token");
        }
        Value::Object(body).to_string()
    }

    /// A string field of `params` (for the audit trail).
    pub fn param(&self, name: &str) -> Option<String> {
        let value = self.body.get("params")?.get(name)?;
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// For `batch_add`/`batch_cancel`: how many orders it carries.
    pub fn orders(&self) -> Option<usize> {
        let params = self.body.get("params")?;
        params.get("orders").and_then(Value::as_array).map(Vec::len)
    }
}

/// An answer from Kraken, as the relay reads it to pair it with its request.
#[derive(Debug)]
pub struct Answer {
    pub method: String,
    pub req_id: Option<Value>,
    pub success: Option<bool>,
    pub error: Option<String>,
    /// `result.order_id` of an order's answer.
    pub order_id: Option<String>,
}

impl Answer {
    /// An answer to a request (a message with a `method`); channel data
    /// (`channel` without `method`) is not one.
    pub fn parse(text: &str) -> Option<Self> {
        // Cheap test first: channel data, most of what Kraken sends, has no
        // `"method"` key at all.
        if !text.contains("\"method\"") {
            return None;
        }
        let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
            return None;
        };
        let method = body.get("method")?.as_str()?.to_owned();
        Some(Self {
            method,
            req_id: body.get("req_id").cloned(),
            success: body.get("success").and_then(Value::as_bool),
            error: body.get("error").and_then(Value::as_str).map(str::to_owned),
            order_id: body
                .get("result")
                .and_then(|r| r.get("order_id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// Whether Kraken refused the request's token.
    pub fn refuses_token(&self) -> bool {
        self.success == Some(false)
            && self
                .error
                .as_deref()
                .is_some_and(|e| TOKEN_REFUSALS.iter().any(|r| e.starts_with(r)))
    }
}

/// An answer in Kraken's error shape, from the broker: `method` and
/// `req_id` as the request had them (`method` omitted when it had none).
pub fn error_answer(
    method: Option<&str>,
    req_id: Option<&Value>,
    error: &str,
    time_in: &str,
    time_out: &str,
) -> String {
    let mut answer = Map::new();
    answer.insert("error".to_owned(), json!(error));
    if let Some(method) = method {
        answer.insert("method".to_owned(), json!(method));
    }
    if let Some(req_id) = req_id {
        answer.insert("req_id".to_owned(), req_id.clone());
    }
    answer.insert("success".to_owned(), json!(false));
    answer.insert("time_in".to_owned(), json!(time_in));
    answer.insert("time_out".to_owned(), json!(time_out));
    Value::Object(answer).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trading_requests_and_private_subscriptions_need_a_token() {
        let needs = |text: &str| Request::parse(text).map(|r| r.needs_token());
        assert_eq!(
            needs(r#"{"method":"add_order","params":{"symbol":"BTC/USD"}}"#),
            Ok(true)
        );
        assert_eq!(needs(r#"{"method":"batch_cancel","params":{}}"#), Ok(true));
        assert_eq!(
            needs(r#"{"method":"subscribe","params":{"channel":"executions"}}"#),
            Ok(true)
        );
        assert_eq!(
            needs(r#"{"method":"unsubscribe","params":{"channel":"level3"}}"#),
            Ok(true)
        );
        assert_eq!(
            needs(r#"{"method":"subscribe","params":{"channel":"ticker"}}"#),
            Ok(false)
        );
        assert_eq!(needs(r#"{"method":"ping","req_id":1}"#), Ok(false));
        assert_eq!(needs("not json").unwrap_err(), Malformed::NotJson);
        assert_eq!(needs("[1,2]").unwrap_err(), Malformed::NotJson);
        assert_eq!(needs(r#"{"params":{}}"#).unwrap_err(), Malformed::NoMethod);
        assert_eq!(needs(r#"{"method":7}"#).unwrap_err(), Malformed::NoMethod);
    }

    #[test]
    fn the_token_is_set_over_any_the_client_sent_and_removed_where_none_is_needed() {
        let request =
            Request::parse(r#"{"method":"add_order","params":{"token":"theirs","symbol":"BTC/USD"},"req_id":5}"#)
                .unwrap();
        let sent: Value = serde_json::from_str(&request.with_token("ours")).unwrap();
        assert_eq!(sent["params"]["token"], "ours");
        assert_eq!(sent["params"]["symbol"], "BTC/USD");
        assert_eq!(sent["req_id"], 5);
        let bare = Request::parse(r#"{"method":"cancel_all"}"#).unwrap();
        let sent: Value = serde_json::from_str(&bare.with_token("ours")).unwrap();
        assert_eq!(sent["params"]["token"], "ours");
        let odd = Request::parse(r#"{"method":"cancel_all","params":3}"#).unwrap();
        let sent: Value = serde_json::from_str(&odd.with_token("ours")).unwrap();
        assert_eq!(sent["params"]["token"], "ours");
        let public = Request::parse(r#"{"method":"subscribe","params":{"channel":"ticker","token":"x"}}"#).unwrap();
        assert!(!public.without_token().contains("\"x\""));
    }

    #[test]
    fn answers_pair_by_method_and_req_id_and_token_refusals_are_recognised() {
        assert!(Answer::parse(r#"{"channel":"heartbeat"}"#).is_none());
        let refused = Answer::parse(
            r#"{"error":"ESession:Invalid session","method":"add_order","req_id":9,"success":false,"status":"error"}"#,
        )
        .unwrap();
        assert_eq!(refused.method, "add_order");
        assert_eq!(refused.req_id, Some(json!(9)));
        assert!(refused.refuses_token());
        let missing =
            Answer::parse(r#"{"error":"Token(s) not found","method":"cancel_order","success":false}"#).unwrap();
        assert!(missing.refuses_token());
        let other =
            Answer::parse(r#"{"error":"EOrder:Insufficient funds","method":"add_order","success":false}"#).unwrap();
        assert!(!other.refuses_token());
        let ok = Answer::parse(r#"{"method":"add_order","result":{"order_id":"OABC"},"success":true}"#).unwrap();
        assert_eq!(ok.order_id.as_deref(), Some("OABC"));
        assert!(!ok.refuses_token());
    }

    #[test]
    fn the_brokers_error_answer_has_krakens_shape() {
        let text = error_answer(
            Some("add_order"),
            Some(&json!(7)),
            "EGeneral:Permission denied",
            "a",
            "b",
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["method"], "add_order");
        assert_eq!(v["req_id"], 7);
        assert_eq!(v["success"], false);
        assert_eq!(v["error"], "EGeneral:Permission denied");
        let v: Value = serde_json::from_str(&error_answer(None, None, "EGeneral:Invalid arguments", "a", "b")).unwrap();
        assert!(v.get("method").is_none() && v.get("req_id").is_none());
    }
}
