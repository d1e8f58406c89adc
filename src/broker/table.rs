//! Building the serving table the HTTP layer reads: the consumers with
//! their grants, limiters and watch permits (kept across reloads that leave
//! them be), the accounts, the identity checks and the audit trail; swapped
//! whole, so a request never sees half of an old config and half of a new.

use std::sync::Arc;

use crate::audit::Auditor;
use crate::config::{Config, ConsumerConfig};
use crate::http::limits::RateLimiter;
use crate::http::watch::MAX_WATCHERS_PER_CONSUMER;
use crate::http::{Consumer, Grant, ServeTable};
use crate::identity::service_account::TokenReviewer;
use crate::metrics::Metrics;

use super::accounts::AccountTable;

/// What the table is built from besides the config.
pub(super) struct Parts<'a> {
    pub accounts: &'a AccountTable,
    pub reviewer: Option<Arc<TokenReviewer>>,
    pub audit: Option<Arc<Auditor>>,
    pub metrics: &'a Metrics,
}

/// The serving table for `config`, carrying over from `old` what a
/// consumer keeps across reloads, and dropping the series of consumers and
/// grants that are gone.
pub(super) fn build(config: &Config, old: &ServeTable, parts: Parts<'_>) -> ServeTable {
    let consumers = config
        .consumers
        .iter()
        .map(|c| Arc::new(consumer(c, old, &parts)))
        .collect();
    forget_the_gone(config, old, parts.metrics);
    ServeTable {
        consumers,
        accounts: parts
            .accounts
            .handles()
            .map(|(name, handle)| (name.clone(), handle.clone()))
            .collect(),
        ws_url: config.kraken.ws_url.clone(),
        reviewer: parts.reviewer,
        audit: parts.audit,
    }
}

fn consumer(c: &ConsumerConfig, old: &ServeTable, parts: &Parts<'_>) -> Consumer {
    let consumers = parts.metrics.consumers();
    let before = old.consumers.iter().find(|o| o.name == c.name);
    // A consumer's limiter survives a reload that leaves its limit be ...
    let limiter = before
        .filter(|o| o.limiter.limit() == c.rate_limit)
        .map_or_else(|| Arc::new(RateLimiter::new(c.rate_limit)), |o| Arc::clone(&o.limiter));
    // ... and its open watch streams' permits and protected connections,
    // any reload.
    let watchers = before.map_or_else(
        || Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS_PER_CONSUMER)),
        |o| Arc::clone(&o.watchers),
    );
    let proven = before.map(|o| Arc::clone(&o.proven)).unwrap_or_default();
    // Open relays keep their permits while the cap stays the same.
    let relays = before
        .filter(|o| o.relay.max_connections == c.relay.max_connections)
        .map_or_else(
            || Arc::new(tokio::sync::Semaphore::new(c.relay.max_connections)),
            |o| Arc::clone(&o.relays),
        );
    let grants = c
        .accounts
        .iter()
        .filter_map(|name| {
            Some(Grant {
                account: name.clone(),
                handle: parts.accounts.handle(name)?.clone(),
                served: consumers.served(name, &c.name),
            })
        })
        .collect();
    parts.metrics.relay().consumer(&c.name);
    Consumer {
        name: c.name.clone(),
        identity: c.identity.clone(),
        grants,
        limiter,
        rate_limited: consumers.rate_limited(&c.name),
        watchers,
        proven,
        relay: c.relay.clone(),
        relay_only: c.relay_only,
        relays,
    }
}

/// Drops the series of consumers, and of grants, that are gone.
fn forget_the_gone(config: &Config, old: &ServeTable, metrics: &Metrics) {
    let consumers = metrics.consumers();
    for was in &old.consumers {
        let now = config.consumers.iter().find(|c| c.name == was.name);
        if now.is_none() {
            consumers.remove_rate_limited(&was.name);
            metrics.relay().remove_consumer(&was.name);
        }
        for grant in &was.grants {
            if !now.is_some_and(|c| c.accounts.contains(&grant.account)) {
                consumers.remove_served(&grant.account, &was.name);
            }
        }
    }
}
