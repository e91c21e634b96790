//! What this mount's kernel holds, and what the daemon keeps beside it for as long: the entries,
//! counted as the kernel counts lookups until it forgets them; the negative entries (names looked
//! up and not found) it may hold until their TTL runs out (the kernel sends no FORGET for those);
//! and the inodes known to have no extended attributes (the kernel caches no xattrs, and `ls -l`
//! asks two of every file). A mount that missed changes (its position in the change log was
//! trimmed) drops every one of them instead of serving stale answers until their TTL runs out.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Negative entries and xattr-less inodes remembered at most each; past it (once expired ones are
/// pruned) answers are not cached: a negative entry the kernel held unremembered could not be
/// dropped on a lost feed.
const MAX_REMEMBERED: usize = 1 << 18;

pub(crate) struct KernelCache {
    entries: Mutex<HashMap<u64, Held>>,
    negative: Mutex<Expiring<(u64, Vec<u8>)>>,
    no_xattrs: Mutex<NoXattrs>,
    /// How long the kernel keeps an entry, and the daemon what it remembers beside it.
    ttl: Duration,
}

/// Keys with when they were last handed out; each counts until the TTL has passed.
struct Expiring<K> {
    at: HashMap<K, Instant>,
    pruned: Instant,
}

impl<K: Hash + Eq + Clone> Expiring<K> {
    fn new() -> Self {
        Expiring {
            at: HashMap::new(),
            pruned: Instant::now(),
        }
    }

    /// Remembers `key` from now; false if it is not remembered, because too many are.
    fn insert(&mut self, key: K, ttl: Duration) -> bool {
        let now = Instant::now();
        // Pruning is a full scan: at most a few times per TTL.
        if self.at.len() >= MAX_REMEMBERED && now - self.pruned >= ttl / 4 {
            self.at.retain(|_, at| now - *at < ttl);
            self.pruned = now;
        }
        let full = self.at.len() >= MAX_REMEMBERED;
        match self.at.entry(key) {
            Entry::Occupied(mut held) => *held.get_mut() = now,
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(vacant) => {
                vacant.insert(now);
            }
        }
        true
    }

    fn contains(&self, key: &K, ttl: Duration) -> bool {
        self.at.get(key).is_some_and(|at| at.elapsed() < ttl)
    }

    fn live(&mut self, ttl: Duration) -> Vec<K> {
        let now = Instant::now();
        self.at.retain(|_, at| now - *at < ttl);
        self.at.keys().cloned().collect()
    }
}

/// Inodes without xattrs, and a count of the changes that may have given one some: a READDIRPLUS
/// result read before such a change is not remembered.
struct NoXattrs {
    inodes: Expiring<u64>,
    epoch: u64,
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
    pub(crate) fn new(ttl: Duration) -> Self {
        KernelCache {
            entries: Mutex::default(),
            negative: Mutex::new(Expiring::new()),
            no_xattrs: Mutex::new(NoXattrs {
                inodes: Expiring::new(),
                epoch: 0,
            }),
            ttl,
        }
    }

    /// Whether the kernel may cache that `name` is missing from `parent`: true once it is
    /// remembered (to be dropped on a lost feed), false when too many are.
    pub(crate) fn missing(&self, parent: u64, name: &[u8]) -> bool {
        self.negative
            .lock()
            .insert((parent, name.to_vec()), self.ttl)
    }

    /// The negative entries the kernel may still hold: (parent directory, name).
    pub(crate) fn held_missing(&self) -> Vec<(u64, Vec<u8>)> {
        self.negative.lock().live(self.ttl)
    }

    /// Where the xattr changes stand: pass it to [`KernelCache::without_xattrs`] with what is
    /// read from the metadata engine after this call.
    pub(crate) fn xattr_epoch(&self) -> u64 {
        self.no_xattrs.lock().epoch
    }

    /// Remembers inodes read as having no xattrs, unless a change came in since `epoch`.
    pub(crate) fn without_xattrs(&self, epoch: u64, inodes: impl IntoIterator<Item = u64>) {
        let mut no_xattrs = self.no_xattrs.lock();
        if no_xattrs.epoch != epoch {
            return;
        }
        for ino in inodes {
            if !no_xattrs.inodes.insert(ino, self.ttl) {
                break;
            }
        }
    }

    pub(crate) fn has_no_xattrs(&self, ino: u64) -> bool {
        self.no_xattrs.lock().inodes.contains(&ino, self.ttl)
    }

    /// `ino` (every inode for `None`) may have changed xattrs: called after the change committed.
    pub(crate) fn xattrs_changed(&self, ino: Option<u64>) {
        let mut no_xattrs = self.no_xattrs.lock();
        no_xattrs.epoch += 1;
        match ino {
            Some(ino) => {
                no_xattrs.inodes.at.remove(&ino);
            }
            None => no_xattrs.inodes.at.clear(),
        }
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

    use super::{KernelCache, MAX_REMEMBERED};

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
        for i in 0..MAX_REMEMBERED as u64 {
            assert!(cache.missing(i, b"x"));
        }
        assert!(!cache.missing(u64::MAX, b"x"));
        // One already held is still cached (its lifetime is renewed).
        assert!(cache.missing(0, b"x"));
        assert_eq!(cache.held_missing().len(), MAX_REMEMBERED);
    }

    #[test]
    fn xattr_less_inodes_are_remembered_until_a_change() {
        let cache = KernelCache::new(Duration::from_secs(60));
        let epoch = cache.xattr_epoch();
        cache.without_xattrs(epoch, [10, 11]);
        assert!(cache.has_no_xattrs(10) && cache.has_no_xattrs(11));
        assert!(!cache.has_no_xattrs(12));
        cache.xattrs_changed(Some(10));
        assert!(!cache.has_no_xattrs(10) && cache.has_no_xattrs(11));
        // Read before a change (of any inode): not remembered.
        let before = cache.xattr_epoch();
        cache.xattrs_changed(Some(99));
        cache.without_xattrs(before, [12]);
        assert!(!cache.has_no_xattrs(12));
        cache.xattrs_changed(None);
        assert!(!cache.has_no_xattrs(11));
    }

    #[test]
    fn xattr_less_inodes_expire_with_the_ttl() {
        let cache = KernelCache::new(Duration::from_millis(100));
        cache.without_xattrs(cache.xattr_epoch(), [10]);
        assert!(cache.has_no_xattrs(10));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!cache.has_no_xattrs(10));
    }
}
