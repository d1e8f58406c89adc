//! Orders on one connection: `add_order` and `cancel_order`, their acks and
//! `executions` updates.

use rand::RngExt as _;
use serde_json::{Value, json};

use super::replies::{ack, error_reply, now_rfc3339};
use super::{Session, authenticate};
use crate::sim::state::{SimState, SystemStatus};

/// An order placed on this connection.
#[derive(Debug, Clone)]
pub(super) struct Order {
    symbol: String,
    side: String,
    order_type: String,
    qty: f64,
    limit_price: Option<f64>,
    cl_ord_id: Option<String>,
}

/// Kraken's order id shape: `XXXXXX-XXXXX-XXXXXX`.
fn order_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let mut part = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect()
    };
    format!("{}-{}-{}", part(6), part(5), part(6))
}

fn execution(order_id: &str, order: &Order, exec_type: &str) -> Value {
    let mut e = json!({
        "order_id": order_id,
        "symbol": order.symbol,
        "side": order.side,
        "order_type": order.order_type,
        "order_qty": order.qty,
        "exec_type": exec_type,
        "order_status": exec_type,
        "cum_qty": 0.0,
        "cum_cost": 0.0,
        "timestamp": now_rfc3339(),
    });
    if let Some(price) = order.limit_price {
        e["limit_price"] = json!(price);
    }
    if let Some(id) = &order.cl_ord_id {
        e["cl_ord_id"] = json!(id);
    }
    e
}

/// Checks what every trading request needs: the exchange open for it, a
/// good token, and a key allowed to trade.
fn trading_allowed(
    method: &str,
    token: Option<&str>,
    state: &SimState,
    session: &mut Session,
) -> Result<(), &'static str> {
    match (state.system_status(), method) {
        (SystemStatus::Maintenance, _) => return Err("EService:Unavailable"),
        (SystemStatus::CancelOnly, "add_order") => return Err("EService:Market in cancel_only mode"),
        _ => {}
    }
    // As recorded live: a trading request without a token.
    if token.is_none() {
        return Err("Token(s) not found");
    }
    let token = authenticate(state, session, token)?;
    let may_trade = state.key_of_token(&token).is_some_and(|k| k.trade_permission);
    if !may_trade {
        return Err("EGeneral:Permission denied");
    }
    Ok(())
}

/// Appends an `executions` update when the connection subscribed to them.
fn push_execution(replies: &mut Vec<Value>, session: &mut Session, data: Value) {
    if session.subscribed.contains("executions") {
        let sequence = session.next_sequence();
        replies.push(json!({ "channel": "executions", "type": "update", "data": [data], "sequence": sequence }));
    }
}

/// `add_order` or `cancel_order`: refused unless [`trading_allowed`], then
/// answered.
pub(super) fn trade(
    method: &str,
    request: &Value,
    token: Option<&str>,
    state: &SimState,
    session: &mut Session,
    time_in: &str,
) -> Vec<Value> {
    if let Err(error) = trading_allowed(method, token, state, session) {
        return vec![error_reply(error, Some(method), Some(request), time_in)];
    }
    if method == "add_order" {
        add_order(request, session, time_in)
    } else {
        cancel_order(request, session, time_in)
    }
}

fn add_order(request: &Value, session: &mut Session, time_in: &str) -> Vec<Value> {
    let p = |name: &str| request.pointer(&format!("/params/{name}"));
    let text = |name: &str| p(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(symbol), Some(side), Some(order_type), Some(qty)) = (
        text("symbol"),
        text("side").filter(|s| s == "buy" || s == "sell"),
        text("order_type"),
        p("order_qty").and_then(Value::as_f64).filter(|q| *q > 0.0),
    ) else {
        return vec![error_reply(
            "EGeneral:Invalid arguments",
            Some("add_order"),
            Some(request),
            time_in,
        )];
    };
    let limit_price = p("limit_price").and_then(Value::as_f64);
    if order_type == "limit" && limit_price.is_none() {
        return vec![error_reply(
            "EGeneral:Invalid arguments:limit_price",
            Some("add_order"),
            Some(request),
            time_in,
        )];
    }
    let order = Order {
        symbol,
        side,
        order_type,
        qty,
        limit_price,
        cl_ord_id: text("cl_ord_id"),
    };
    let id = order_id();
    let mut result = json!({ "order_id": id });
    if let Some(cl) = &order.cl_ord_id {
        result["cl_ord_id"] = json!(cl);
    }
    let mut replies = vec![ack("add_order", result, request, time_in)];
    push_execution(&mut replies, session, execution(&id, &order, "pending_new"));
    push_execution(&mut replies, session, execution(&id, &order, "new"));
    session.orders.insert(id, order);
    replies
}

fn cancel_order(request: &Value, session: &mut Session, time_in: &str) -> Vec<Value> {
    let ids: Vec<String> = request
        .pointer("/params/order_id")
        .and_then(Value::as_array)
        .map(|ids| ids.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return vec![error_reply(
            "EGeneral:Invalid arguments:order_id",
            Some("cancel_order"),
            Some(request),
            time_in,
        )];
    }
    let mut replies = Vec::new();
    for id in ids {
        match session.orders.remove(&id) {
            Some(order) => {
                replies.push(ack("cancel_order", json!({ "order_id": id }), request, time_in));
                let mut canceled = execution(&id, &order, "canceled");
                // As recorded live: both fields, `cancel_reason` deprecated
                // in favour of `reason` (Kraken's subscribe warnings say so).
                canceled["reason"] = json!("User requested");
                canceled["cancel_reason"] = json!("User requested");
                push_execution(&mut replies, session, canceled);
            }
            None => replies.push(error_reply(
                "EOrder:Unknown order",
                Some("cancel_order"),
                Some(request),
                time_in,
            )),
        }
    }
    replies
}
