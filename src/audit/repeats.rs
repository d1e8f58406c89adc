//! Summarising repeated authentication failures: the first failure of an
//! address for a reason is written at once; its repeats within an interval
//! become one line with their count. One address failing in a loop writes a
//! line per interval, not one per request, so it can neither fill the disk
//! nor roll real lines out of a log's retention.

use std::collections::HashMap;

/// Addresses (and reasons) tracked at most; failures beyond go to one
/// shared entry, peer `*`.
pub const MAX_TRACKED: usize = 4096;
/// The peer named for failures past [`MAX_TRACKED`].
pub const OVERFLOW_PEER: &str = "*";

/// What is summarised together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub peer: String,
    pub reason: &'static str,
    pub identity: &'static str,
}

/// The failures counted since the interval began.
#[derive(Debug, Default)]
pub struct Repeats {
    counts: HashMap<Key, u64>,
}

impl Repeats {
    /// Counts one failure; `true` when it is the first of its key since the
    /// key was last quiet for a whole interval (it is written at once).
    pub fn count(&mut self, mut key: Key) -> bool {
        if !self.counts.contains_key(&key) && self.counts.len() >= MAX_TRACKED {
            key.peer = OVERFLOW_PEER.to_owned();
        }
        match self.counts.get_mut(&key) {
            Some(n) => {
                *n += 1;
                false
            }
            None => {
                self.counts.insert(key, 0);
                true
            }
        }
    }

    /// Ends an interval: the keys with repeats and how many (they stay
    /// tracked), while keys with none are forgotten.
    pub fn end_interval(&mut self) -> Vec<(Key, u64)> {
        let repeated: Vec<(Key, u64)> = self
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        self.counts.retain(|_, n| *n > 0);
        for n in self.counts.values_mut() {
            *n = 0;
        }
        repeated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(peer: &str) -> Key {
        Key {
            peer: peer.into(),
            reason: "invalid",
            identity: "credential",
        }
    }

    #[test]
    fn the_first_failure_is_written_and_repeats_are_counted_per_interval() {
        let mut r = Repeats::default();
        assert!(r.count(key("10.0.0.1")));
        for _ in 0..999 {
            assert!(!r.count(key("10.0.0.1")));
        }
        assert!(r.count(key("10.0.0.2")));
        assert_eq!(r.end_interval(), vec![(key("10.0.0.1"), 999)]);
        // Still failing next interval: summarised again.
        assert!(!r.count(key("10.0.0.1")));
        assert_eq!(r.end_interval(), vec![(key("10.0.0.1"), 1)]);
        // A quiet interval forgets it: the next failure is written at once.
        assert!(r.end_interval().is_empty());
        assert!(r.count(key("10.0.0.1")));
    }

    #[test]
    fn addresses_past_the_limit_share_one_entry() {
        let mut r = Repeats::default();
        for i in 0..MAX_TRACKED {
            assert!(r.count(key(&format!("p{i}"))));
        }
        assert!(r.count(key("new-1")), "the overflow entry's first");
        assert!(!r.count(key("new-2")));
        let repeated = r.end_interval();
        assert_eq!(repeated, vec![(key(OVERFLOW_PEER), 1)]);
    }
}
