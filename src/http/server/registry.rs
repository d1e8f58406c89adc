//! The open connections of a listener, and who gives way to a newcomer: a
//! connection whose last request proved a consumer's identity never does;
//! any other may, at its address's cap its address's oldest, at the
//! listener's cap the oldest of the address holding the most. Each
//! connection's place is held by a [`Slot`], given back however its task
//! ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ServerLimits;
use crate::http::address::AddressGroup;
use crate::metrics::ConnectionRefusal;

/// How a connection stands, carried on each of its requests: whether the
/// last request on it proved a consumer's identity. A proven connection is
/// never evicted for a newcomer; any other is (an unauthenticated request,
/// a 404, a refused credential: what a stranger holding slots sends).
#[derive(Debug, Clone)]
pub struct Standing {
    proof: Arc<Mutex<Option<Proof>>>,
    /// The protected connections one consumer may hold on this listener.
    cap: usize,
    /// Whether the request now handled on the connection proved an identity.
    proved_now: Arc<AtomicBool>,
}

/// A connection counted among a consumer's proven connections; the count
/// goes down when the proof is withdrawn or the connection closes.
#[derive(Debug)]
struct Proof(Arc<AtomicUsize>);

impl Drop for Proof {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One consumer's proven connections, counted across all of them (kept
/// across reloads, as the consumer's limiter is).
pub type ProvenConnections = Arc<AtomicUsize>;

impl Standing {
    /// A connection not proven yet, on a listener where one consumer may
    /// hold `cap` protected connections.
    pub fn new(cap: usize) -> Self {
        Self {
            proof: Arc::default(),
            cap,
            proved_now: Arc::default(),
        }
    }

    /// The handle one request carries. The connection keeps its standing
    /// while the request is handled (a proven connection is not open to
    /// eviction mid-request), and [`Standing::settle`] sets it from what the
    /// request proved once it is answered. HTTP/1 handles one request of a
    /// connection at a time, so one flag per connection serves each in turn
    /// (no allocation per request).
    pub fn for_request(&self) -> Self {
        self.proved_now.store(false, Ordering::Relaxed);
        self.clone()
    }

    /// The request is answered: a connection whose last request proved no
    /// identity is a stranger's again.
    pub fn settle(&self) {
        if !self.proved_now.load(Ordering::Relaxed) {
            self.withdraw();
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Proof>> {
        self.proof.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The request now answered proved the consumer whose proven
    /// connections are `count`: the connection is protected from eviction,
    /// unless that consumer already holds its cap of protected connections
    /// (one consumer cannot hold the listener for itself).
    pub fn prove(&self, count: &ProvenConnections) {
        self.proved_now.store(true, Ordering::Relaxed);
        let cap = self.cap;
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|p| Arc::ptr_eq(&p.0, count)) {
            return;
        }
        *slot = None;
        let taken = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < cap).then_some(n + 1));
        if taken.is_ok() {
            *slot = Some(Proof(Arc::clone(count)));
        }
    }

    /// The connection proves nothing (any more).
    pub fn withdraw(&self) {
        *self.slot() = None;
    }

    pub fn proven(&self) -> bool {
        self.slot().is_some()
    }
}

/// One open connection, as the registry knows it.
pub(super) struct Entry {
    pub(super) group: AddressGroup,
    pub(super) opened: Instant,
    pub(super) standing: Standing,
    pub(super) kill: CancellationToken,
}

/// Why a newcomer was turned away at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// Every connection of the listener is proven.
    Listener,
    /// Every connection of the newcomer's address is proven.
    Address,
}

impl Full {
    pub(super) fn refusal(self) -> ConnectionRefusal {
        match self {
            Full::Listener => ConnectionRefusal::ListenerFull,
            Full::Address => ConnectionRefusal::PerAddress,
        }
    }
}

/// The open connections of one listener.
#[derive(Default)]
pub(super) struct Registry {
    entries: HashMap<u64, Entry>,
    per_group: HashMap<AddressGroup, usize>,
}

impl Registry {
    pub(super) fn insert(&mut self, id: u64, entry: Entry) {
        *self.per_group.entry(entry.group).or_default() += 1;
        self.entries.insert(id, entry);
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(n) = self.per_group.get_mut(&entry.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_group.remove(&entry.group);
            }
        }
        Some(entry)
    }

    /// The oldest unproven connection of `group`.
    pub(super) fn oldest_unproven(&self, group: AddressGroup) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.group == group && !e.standing.proven())
            .min_by_key(|(_, e)| e.opened)
            .map(|(id, _)| *id)
    }

    /// The connection to evict when the listener is full: the oldest
    /// unproven one of the address holding the most connections (or, if all
    /// of its are proven, of the next), so a crowd pays for a newcomer from
    /// elsewhere, never the few connections of a quiet address. The counts
    /// per address are kept as connections come and go: no pass over every
    /// connection to count them.
    pub(super) fn eviction_candidate(&self) -> Option<u64> {
        let mut groups: Vec<(usize, AddressGroup)> = self.per_group.iter().map(|(g, n)| (*n, *g)).collect();
        groups.sort_unstable_by(|a, b| b.cmp(a));
        groups.into_iter().find_map(|(_, group)| self.oldest_unproven(group))
    }

    /// Makes room for a newcomer from `group`: evicts an unproven connection
    /// when a cap is reached (the newcomer's address's own, or else the
    /// listener's); refuses the newcomer when none can go.
    pub(super) fn admit(
        &mut self,
        group: AddressGroup,
        limits: &ServerLimits,
    ) -> Result<Option<CancellationToken>, Full> {
        let victim = if self.per_group.get(&group).copied().unwrap_or(0) >= limits.max_per_address {
            Some(self.oldest_unproven(group).ok_or(Full::Address)?)
        } else if self.entries.len() >= limits.max_connections {
            Some(self.eviction_candidate().ok_or(Full::Listener)?)
        } else {
            None
        };
        Ok(victim.and_then(|id| self.remove(id)).map(|entry| entry.kill))
    }
}

/// A connection's place in the registry and the open-connections gauge,
/// given back when the connection task ends however it ends (a panic in it
/// included: tokio drops a panicked task's future, and this with it).
pub(super) struct Slot {
    pub(super) registry: Arc<Mutex<Registry>>,
    pub(super) id: u64,
    pub(super) open: IntGauge,
}

impl Slot {
    pub(super) fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
        registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        Self::lock(&self.registry).remove(self.id);
        self.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(id: u64, group: AddressGroup, proven: bool) -> (Entry, CancellationToken) {
        let kill = CancellationToken::new();
        let standing = Standing::new(usize::MAX);
        if proven {
            standing.prove(&ProvenConnections::default());
        }
        let entry = Entry {
            group,
            opened: Instant::now() + Duration::from_millis(id),
            standing,
            kill: kill.clone(),
        };
        (entry, kill)
    }

    fn add(reg: &mut Registry, id: u64, group: AddressGroup, proven: bool) -> CancellationToken {
        let (entry, kill) = entry(id, group, proven);
        reg.insert(id, entry);
        kill
    }

    fn group(ip: &str) -> AddressGroup {
        AddressGroup::of(ip.parse().unwrap())
    }

    #[test]
    fn a_newcomer_evicts_an_unproven_connection_and_never_a_proven_one() {
        let limits = ServerLimits {
            max_connections: 3,
            max_per_address: 2,
            ..ServerLimits::default()
        };
        let mut reg = Registry::default();
        let (a, b) = (group("10.0.0.1"), group("10.0.0.2"));
        let unproven_a = add(&mut reg, 1, a, false);
        add(&mut reg, 2, a, true);
        // A third from `a`: its unproven one goes.
        let evicted = reg.admit(a, &limits).unwrap().expect("one evicted");
        evicted.cancel();
        assert!(unproven_a.is_cancelled());
        assert!(!reg.entries.contains_key(&1));
        add(&mut reg, 3, a, true);
        add(&mut reg, 4, b, true);
        // Full, and every connection proven: refused.
        assert_eq!(reg.admit(b, &limits).unwrap_err(), Full::Listener);
        assert_eq!(reg.admit(a, &limits).unwrap_err(), Full::Address);
        assert_eq!(reg.per_group[&a], 2);
    }

    #[test]
    fn at_the_listeners_cap_the_address_holding_the_most_pays() {
        let limits = ServerLimits {
            max_connections: 10,
            max_per_address: 10,
            ..ServerLimits::default()
        };
        let mut reg = Registry::default();
        let (crowd, quiet, newcomer) = (group("10.0.0.9"), group("10.0.0.1"), group("10.0.0.2"));
        // The quiet address's connection is the oldest of all, and unproven.
        let quiet_kill = add(&mut reg, 0, quiet, false);
        let crowd_kills: Vec<_> = (1..10).map(|id| add(&mut reg, id, crowd, false)).collect();
        let evicted = reg.admit(newcomer, &limits).unwrap().expect("one evicted");
        evicted.cancel();
        assert!(!quiet_kill.is_cancelled(), "the quiet address keeps its connection");
        assert!(crowd_kills[0].is_cancelled(), "the crowd's oldest goes");
        assert_eq!(reg.per_group[&crowd], 8);
    }

    #[test]
    fn a_consumer_protects_at_most_its_cap_of_connections() {
        let count = ProvenConnections::default();
        let connections: Vec<Standing> = (0..5).map(|_| Standing::new(3)).collect();
        for c in &connections {
            c.prove(&count);
        }
        let protected = connections.iter().filter(|c| c.proven()).count();
        assert_eq!(protected, 3, "the cap holds");
        assert_eq!(count.load(Ordering::Relaxed), 3);
        // Proving again on a protected connection takes no second place.
        connections[0].prove(&count);
        assert_eq!(count.load(Ordering::Relaxed), 3);
        // A withdrawn proof, or a closed connection, gives its place back.
        connections[0].withdraw();
        drop(connections);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_proven_connection_stays_protected_while_its_next_request_is_handled() {
        let count = ProvenConnections::default();
        let connection = Standing::new(3);
        let first = connection.for_request();
        first.prove(&count);
        first.settle();
        assert!(connection.proven());
        // The next request is under way: the connection keeps its place
        // (a newcomer arriving now must not evict it).
        let next = connection.for_request();
        assert!(connection.proven(), "protected mid-request");
        next.prove(&count);
        next.settle();
        assert!(connection.proven());
        assert_eq!(count.load(Ordering::Relaxed), 1);
        // A request that proves nothing leaves the connection a stranger's
        // once it is answered.
        let stranger = connection.for_request();
        assert!(connection.proven(), "still protected until answered");
        stranger.settle();
        assert!(!connection.proven());
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn every_slot_is_given_back_however_the_task_ends() {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let open = IntGauge::new("open", "open").unwrap();
        let limits = ServerLimits {
            max_connections: 1,
            max_per_address: 1,
            ..ServerLimits::default()
        };
        for id in 0..3u64 {
            {
                let mut reg = Slot::lock(&registry);
                assert!(
                    matches!(reg.admit(group("10.0.0.1"), &limits), Ok(None)),
                    "the slot is free again"
                );
                let (e, _) = entry(id, group("10.0.0.1"), true);
                reg.insert(id, e);
            }
            open.inc();
            let slot = Slot {
                registry: Arc::clone(&registry),
                id,
                open: open.clone(),
            };
            // A task that panics while holding its slot.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _slot = slot;
                panic!("a bug in a connection task");
            }));
            assert!(outcome.is_err());
            assert_eq!(open.get(), 0);
            assert!(Slot::lock(&registry).entries.is_empty());
        }
    }
}
