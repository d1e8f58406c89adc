//! The shapes of the simulator's WebSocket replies (acks, errors,
//! snapshots), as recorded from the live API.

use std::time::SystemTime;

use serde_json::{Value, json};

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

pub(super) fn error_reply(error: &str, method: Option<&str>, request: Option<&Value>, time_in: &str) -> Value {
    let mut reply = json!({
        "error": error,
        "success": false,
        "time_in": time_in,
        "time_out": now_rfc3339(),
    });
    // As recorded live: `"status": "error"` on `ESession:Invalid session`
    // only; other errors (`Token(s) not found`, `Currency pair not
    // supported ...`) carry none.
    if error.starts_with("ESession:") {
        reply["status"] = json!("error");
    }
    if let Some(method) = method {
        reply["method"] = json!(method);
    }
    if let Some(req_id) = request.and_then(|r| r.get("req_id")) {
        reply["req_id"] = req_id.clone();
    }
    if let Some(symbol) = request.and_then(|r| r.pointer("/params/symbol")) {
        reply["symbol"] = symbol.clone();
    }
    reply
}

pub(super) fn ack(method: &str, result: Value, request: &Value, time_in: &str) -> Value {
    let mut ack = json!({
        "method": method,
        "result": result,
        "success": true,
        "time_in": time_in,
        "time_out": now_rfc3339(),
    });
    if let Some(req_id) = request.get("req_id") {
        ack["req_id"] = req_id.clone();
    }
    ack
}

pub(super) fn snapshot(channel: &str, sequence: u64) -> Value {
    let data = if channel == "balances" {
        json!([
            { "asset": "USD", "asset_class": "currency", "balance": 100000.0,
              "wallets": [{ "type": "spot", "id": "main", "balance": 100000.0 }] },
            { "asset": "BTC", "asset_class": "currency", "balance": 1.5,
              "wallets": [{ "type": "spot", "id": "main", "balance": 1.5 }] }
        ])
    } else {
        json!([])
    };
    json!({ "channel": channel, "type": "snapshot", "data": data, "sequence": sequence })
}
