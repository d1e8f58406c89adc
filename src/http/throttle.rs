//! Per-address throttling of failed authentications, so a client guessing
//! credentials is slowed down while good consumers are not touched.
//!
//! Each client address (an IPv4 address or an IPv6 /64: [`AddressGroup`])
//! has a small token bucket of failures; when it runs out, its failed
//! requests are answered 429 until it refills, and while the cluster's
//! signing keys cannot be read, its ServiceAccount tokens are given no
//! review. A request that proves an identity is never refused by it.

use std::net::IpAddr;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::address::AddressGroup;
use crate::bucket::TokenBucket;

/// Failed authentications an address may make in a burst ...
pub const FAILURE_BURST: f64 = 20.0;
/// ... and how many more per second after that.
pub const FAILURES_PER_SEC: f64 = 2.0;
/// Addresses tracked at most; past this, every address is forgotten at once
/// so the table cannot grow without bound.
const MAX_TRACKED: usize = 65_536;

/// Failure buckets per client address.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    buckets: DashMap<AddressGroup, TokenBucket>,
}

impl AuthThrottle {
    pub fn new() -> Self {
        Self::default()
    }

    /// How long `peer` must wait, if it has used up its failures. On the
    /// path of every request, so it takes no write lock: good consumers
    /// (no failures, no bucket) pay one shared-lock lookup.
    pub fn blocked(&self, peer: Option<IpAddr>) -> Option<Duration> {
        let peer = AddressGroup::of(peer?);
        let now = Instant::now();
        let bucket = *self.buckets.get(&peer)?;
        if bucket.is_full(now) {
            // Fully refilled: forget the address.
            self.buckets.remove_if(&peer, |_, b| b.is_full(Instant::now()));
            return None;
        }
        Some(bucket.wait(now)).filter(|wait| !wait.is_zero())
    }

    /// Counts one failed authentication from `peer`.
    pub fn record_failure(&self, peer: Option<IpAddr>) {
        let Some(peer) = peer.map(AddressGroup::of) else { return };
        if self.buckets.len() >= MAX_TRACKED {
            self.buckets.clear();
        }
        let now = Instant::now();
        self.buckets
            .entry(peer)
            .or_insert_with(|| TokenBucket::new(FAILURE_BURST, FAILURES_PER_SEC, now))
            .spend(now);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_is_blocked_after_its_burst_and_unblocked_as_it_refills() {
        let t = AuthThrottle::new();
        let bad: IpAddr = "10.0.0.9".parse().unwrap();
        let good: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..FAILURE_BURST as usize {
            assert_eq!(t.blocked(Some(bad)), None);
            t.record_failure(Some(bad));
        }
        let wait = t.blocked(Some(bad)).expect("blocked after the burst");
        assert!(wait <= Duration::from_secs(1));
        assert_eq!(t.blocked(Some(good)), None, "others are untouched");
        tokio::time::sleep(wait + Duration::from_millis(1)).await;
        assert_eq!(t.blocked(Some(bad)), None, "one more try after the refill");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(t.blocked(Some(bad)), None);
        assert_eq!(t.tracked(), 0, "a full bucket is forgotten");
    }

    #[test]
    fn an_ipv6_slash_64_shares_one_bucket() {
        let t = AuthThrottle::new();
        for i in 0..FAILURE_BURST as u16 {
            let ip: IpAddr = format!("2001:db8:7:7::{i:x}").parse().unwrap();
            t.record_failure(Some(ip));
        }
        assert!(t.blocked(Some("2001:db8:7:7::ffff".parse().unwrap())).is_some());
        assert!(t.blocked(Some("2001:db8:7:8::1".parse().unwrap())).is_none());
    }

    #[test]
    fn unknown_addresses_are_never_blocked() {
        let t = AuthThrottle::new();
        t.record_failure(None);
        assert_eq!(t.blocked(None), None);
        assert_eq!(t.tracked(), 0);
    }
}
