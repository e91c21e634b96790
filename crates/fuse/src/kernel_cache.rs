//! The entries this mount's kernel holds: counted as the kernel counts lookups, until it forgets
//! them, and the negative entries (names looked up and not found) it may hold, until their TTL
//! runs out (the kernel sends no FORGET for those). A mount that missed changes (its position in
//! the change log was trimmed) drops every one of them instead of serving stale entries and
//! attributes until their TTL runs out.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Negative entries remembered at most; past it (once expired ones are pruned) a missing name is
/// answered uncached, since one the kernel held unremembered could not be dropped on a lost feed.
const MAX_NEGATIVE: usize = 100_000;

pub(crate) struct KernelCache {
    entries: Mutex<HashMap<u64, Held>>,
    negative: Mutex<Negative>,
    /// How long the kernel keeps a negative entry.
    negative_ttl: Duration,
}

/// Negative entries by parent directory and name, with when they were handed to the kernel.
struct Negative {
    names: HashMap<(u64, Vec<u8>), Instant>,
    pruned: Instant,
}

struct Held {
    lookups: u64,
    /// The last name the kernel looked the inode up by (a hard link's other names expire by TTL).
    parent: u64,
    name: Vec<u8>,
}

/// An entry the kernel holds: (inode, parent directory, name).
pub(crate) type HeldEntry = (u64, u64, Vec<u8>);

impl KernelCache {
    pub(crate) fn new(negative_ttl: Duration) -> Self {
        KernelCache {
            entries: Mutex::default(),
            negative: Mutex::new(Negative {
                names: HashMap::new(),
                pruned: Instant::now(),
            }),
            negative_ttl,
        }
    }

    /// Whether the kernel may cache that `name` is missing from `parent`: true once it is
    /// remembered (to be dropped on a lost feed), false when too many are.
    pub(crate) fn missing(&self, parent: u64, name: &[u8]) -> bool {
        let mut negative = self.negative.lock();
        let now = Instant::now();
        if negative.names.len() >= MAX_NEGATIVE && now - negative.pruned >= self.negative_ttl / 4 {
            let ttl = self.negative_ttl;
            negative.names.retain(|_, at| now - *at < ttl);
            negative.pruned = now;
        }
        let full = negative.names.len() >= MAX_NEGATIVE;
        match negative.names.entry((parent, name.to_vec())) {
            Entry::Occupied(mut held) => *held.get_mut() = now,
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(vacant) => {
                vacant.insert(now);
            }
        }
        true
    }

    /// The negative entries the kernel may still hold: (parent directory, name).
    pub(crate) fn held_missing(&self) -> Vec<(u64, Vec<u8>)> {
        let mut negative = self.negative.lock();
        let now = Instant::now();
        let ttl = self.negative_ttl;
        negative.names.retain(|_, at| now - *at < ttl);
        negative.names.keys().cloned().collect()
    }

    /// The kernel took an entry reply (lookup, create, mkdir, link, a READDIRPLUS entry, ...).
    pub(crate) fn entered(&self, parent: u64, name: &[u8], ino: u64) {
        let mut entries = self.entries.lock();
        let held = entries.entry(ino).or_insert_with(|| Held {
            lookups: 0,
            parent,
            name: Vec::new(),
        });
        held.lookups += 1;
        held.parent = parent;
        if held.name != name {
            held.name = name.to_vec();
        }
    }

    /// FORGET: the kernel dropped `lookups` of its references to `ino`.
    pub(crate) fn forgot(&self, ino: u64, lookups: u64) {
        if let Entry::Occupied(mut held) = self.entries.lock().entry(ino) {
            let left = held.get().lookups.saturating_sub(lookups);
            if left == 0 {
                held.remove();
            } else {
                held.get_mut().lookups = left;
            }
        }
    }

    pub(crate) fn held(&self) -> Vec<HeldEntry> {
        self.entries
            .lock()
            .iter()
            .map(|(ino, held)| (*ino, held.parent, held.name.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{KernelCache, MAX_NEGATIVE};

    #[test]
    fn an_entry_is_held_until_the_kernel_forgets_every_lookup() {
        let cache = KernelCache::new(Duration::from_secs(60));
        cache.entered(1, b"a", 10);
        cache.entered(1, b"a", 10);
        cache.entered(10, b"b", 11);
        cache.forgot(10, 1);
        cache.forgot(11, 1);
        assert_eq!(cache.held(), vec![(10, 1, b"a".to_vec())]);
        cache.forgot(10, 1);
        assert!(cache.held().is_empty());
        // A forget of an inode never entered (root, or before a restart) is ignored.
        cache.forgot(1, 5);
        assert!(cache.held().is_empty());
    }

    #[test]
    fn the_last_name_looked_up_is_the_one_held() {
        let cache = KernelCache::new(Duration::from_secs(60));
        cache.entered(1, b"old", 10);
        cache.entered(2, b"new", 10);
        assert_eq!(cache.held(), vec![(10, 2, b"new".to_vec())]);
    }

    #[test]
    fn negative_entries_are_held_until_their_ttl_runs_out() {
        let cache = KernelCache::new(Duration::from_millis(200));
        assert!(cache.missing(1, b"a"));
        assert!(cache.missing(1, b"a"));
        assert!(cache.missing(2, b"a"));
        let mut held = cache.held_missing();
        held.sort();
        assert_eq!(held, vec![(1, b"a".to_vec()), (2, b"a".to_vec())]);
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.held_missing().is_empty());
    }

    #[test]
    fn past_the_bound_a_missing_name_is_not_cached() {
        let cache = KernelCache::new(Duration::from_secs(60));
        for i in 0..MAX_NEGATIVE as u64 {
            assert!(cache.missing(i, b"x"));
        }
        assert!(!cache.missing(u64::MAX, b"x"));
        // One already held is still cached (its lifetime is renewed).
        assert!(cache.missing(0, b"x"));
        assert_eq!(cache.held_missing().len(), MAX_NEGATIVE);
    }
}
