//! The `relay.order` audit line: which engine placed, changed or cancelled
//! which order, and what Kraken answered. Never the token.

use std::net::SocketAddr;

use crate::audit::RelayOrder;
use crate::kraken::ws::{Answer, Request};

/// Whose request it was.
pub(super) struct Who<'a> {
    pub consumer: &'a str,
    pub account: &'a str,
    pub peer: Option<SocketAddr>,
}

/// The line for `request`: `outcome` is `answered` (with Kraken's
/// `answer`), `refused` (by the broker, with its `error`) or `unanswered`.
pub(super) fn order_line(
    who: Who<'_>,
    request: &Request,
    outcome: &'static str,
    answer: Option<&Answer>,
    error: Option<&str>,
) -> RelayOrder {
    RelayOrder {
        consumer: who.consumer.to_owned(),
        account: who.account.to_owned(),
        peer: who.peer.map(|p| p.to_string()),
        method: request.method.clone(),
        req_id: request.req_id().cloned(),
        symbol: request.param("symbol"),
        side: request.param("side"),
        order_qty: request.param("order_qty"),
        limit_price: request.param("limit_price"),
        cl_ord_id: request.param("cl_ord_id"),
        order_userref: request.param("order_userref"),
        order_id: answer
            .and_then(|a| a.order_id.clone())
            .or_else(|| request.param("order_id")),
        orders: request.orders(),
        outcome,
        success: answer.and_then(|a| a.success),
        error: answer
            .and_then(|a| a.error.clone())
            .or_else(|| error.map(str::to_owned)),
    }
}
