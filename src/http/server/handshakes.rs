//! TLS handshakes under way, bounded: a client that sends most of a large
//! ClientHello and stalls costs rustls about 100 KiB until the handshake
//! deadline, so at most [`MAX_HANDSHAKES`] run at once (a newcomer waits its
//! turn, within the deadline), and at most [`HANDSHAKES_PER_ADDRESS`] for
//! one address (more are refused), so one address cannot take every turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::address::AddressGroup;

/// Handshakes under way at once, at most (about 30 MiB at their worst).
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes under way from one address at once, at most: a node whose
/// engines all reconnect at once completes 32 handshakes in milliseconds.
pub const HANDSHAKES_PER_ADDRESS: usize = 32;

/// The handshakes of one listener.
pub(super) struct Handshakes {
    turns: Arc<Semaphore>,
    per_address: Mutex<HashMap<AddressGroup, usize>>,
    per_address_cap: usize,
}

/// One handshake's turn, given back when it ends however it ends.
pub(super) struct Turn {
    _turn: OwnedSemaphorePermit,
    group: AddressGroup,
    handshakes: Arc<Handshakes>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut per_address = self.handshakes.lock();
        if let Some(n) = per_address.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_address.remove(&self.group);
            }
        }
    }
}

impl Handshakes {
    pub fn new(max: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            turns: Arc::new(Semaphore::new(max)),
            per_address: Mutex::new(HashMap::new()),
            per_address_cap: per_address,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AddressGroup, usize>> {
        self.per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A turn for a handshake from `group`, waiting for one if all are
    /// taken; `None` if `group` has its cap of handshakes under way.
    pub async fn turn(self: &Arc<Self>, group: AddressGroup) -> Option<Turn> {
        {
            let mut per_address = self.lock();
            let n = per_address.entry(group).or_default();
            if *n >= self.per_address_cap {
                return None;
            }
            *n += 1;
        }
        // The count is given back by `Turn`'s drop, or here if the wait ends.
        struct Undo<'a>(&'a Handshakes, AddressGroup, bool);
        impl Drop for Undo<'_> {
            fn drop(&mut self) {
                if self.2 {
                    let mut per_address = self.0.lock();
                    if let Some(n) = per_address.get_mut(&self.1) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        let mut undo = Undo(self, group, true);
        let permit = Arc::clone(&self.turns).acquire_owned().await.ok()?;
        undo.2 = false;
        Some(Turn {
            _turn: permit,
            group,
            handshakes: Arc::clone(self),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn group(ip: &str) -> AddressGroup {
        AddressGroup::of(ip.parse().unwrap())
    }

    #[tokio::test]
    async fn an_address_has_its_cap_and_everyone_waits_their_turn() {
        let h = Handshakes::new(3, 2);
        let a1 = h.turn(group("10.0.0.1")).await.unwrap();
        let _a2 = h.turn(group("10.0.0.1")).await.unwrap();
        assert!(h.turn(group("10.0.0.1")).await.is_none(), "the address's cap");
        let _b1 = h.turn(group("10.0.0.2")).await.unwrap();
        // Every turn taken: the next waits until one ends.
        let waiting = tokio::time::timeout(Duration::from_millis(50), h.turn(group("10.0.0.3"))).await;
        assert!(waiting.is_err());
        drop(a1);
        assert!(h.turn(group("10.0.0.3")).await.is_some());
        assert!(
            h.turn(group("10.0.0.1")).await.is_some(),
            "a finished handshake gives its address's turn back"
        );
        assert_eq!(h.lock().get(&group("10.0.0.3")), None, "counts go back to nothing");
    }
}
