//! The entries this mount's kernel holds: counted as the kernel counts lookups, until it forgets
//! them. A mount that missed changes (its position in the change log was trimmed) drops every one
//! of them instead of serving stale entries and attributes until their TTL runs out.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use parking_lot::Mutex;

#[derive(Default)]
pub(crate) struct KernelCache {
    entries: Mutex<HashMap<u64, Held>>,
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
    use super::KernelCache;

    #[test]
    fn an_entry_is_held_until_the_kernel_forgets_every_lookup() {
        let cache = KernelCache::default();
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
        let cache = KernelCache::default();
        cache.entered(1, b"old", 10);
        cache.entered(2, b"new", 10);
        assert_eq!(cache.held(), vec![(10, 2, b"new".to_vec())]);
    }
}
