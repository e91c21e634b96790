//! The memory page cache: fixed-size pages of block objects, shared by every store of a process
//! that asks for the same budget, with the fetches in flight counted against that budget.
//!
//! A page is [`PAGE_SIZE`] aligned bytes of one object (the last page of an object is shorter).
//! Its bytes are immutable like the object, so a cached page never goes stale. The budget covers
//! cached pages *and* pages being fetched: a fetch reserves its bytes first, evicting the least
//! recently used pages to make room. Read-ahead whose reservation does not fit is dropped (the
//! read fetches on demand later); a demand read always gets its reservation (it is bounded by the
//! request sizes of the readers), so it may exceed the budget by what readers are waiting for.
//!
//! Concurrent readers of a page share one fetch: the first one to miss claims the page (it is
//! then "in flight"), the others wait on the claim.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, LazyLock, Weak};
use tokio::sync::watch;

use crate::{StoreError, StoreResult};

/// Bytes of one cache page (also the granularity of random reads).
pub(crate) const PAGE_SIZE: u64 = 1 << 20;

/// A page of one object: the object's store-qualified key and the page's index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PageKey {
    pub object: Arc<str>,
    pub index: u32,
}

type Outcome = Option<StoreResult<Bytes>>;

/// What a reader gets for one page: its bytes, or a fetch in flight to wait for.
pub(crate) enum Page {
    Ready(Bytes),
    Pending(watch::Receiver<Outcome>),
}

impl Page {
    pub async fn bytes(self) -> StoreResult<Bytes> {
        match self {
            Page::Ready(data) => Ok(data),
            Page::Pending(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().expect("waited for Some"),
                Err(_) => Err(StoreError::Io("a page fetch was abandoned".into())),
            },
        }
    }
}

/// A page in flight that its holder must fetch. Completing it caches the page and wakes its
/// waiters; dropped uncompleted (a failed or cancelled fetch) it releases its reservation and
/// its waiters fail.
pub(crate) struct PageClaim {
    cache: Arc<PageCache>,
    pub key: PageKey,
    pub len: u64,
    tx: Option<watch::Sender<Outcome>>,
}

impl PageClaim {
    pub fn complete(mut self, data: Bytes) {
        debug_assert_eq!(data.len() as u64, self.len);
        self.cache.finish(&self.key, self.len, Some(data.clone()));
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(Ok(data)));
        }
    }

    pub fn fail(mut self, err: StoreError) {
        self.cache.finish(&self.key, self.len, None);
        if let Some(tx) = self.tx.take() {
            tx.send_replace(Some(Err(err)));
        }
    }
}

impl Drop for PageClaim {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.cache.finish(&self.key, self.len, None);
        }
    }
}

pub(crate) struct PageCache {
    budget: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pages: HashMap<PageKey, (Bytes, u64)>,
    /// Last-use tick → page, oldest first.
    lru: BTreeMap<u64, PageKey>,
    tick: u64,
    cached_bytes: u64,
    /// Bytes of pages in flight (reserved before their fetch starts).
    reserved_bytes: u64,
    inflight: HashMap<PageKey, watch::Receiver<Outcome>>,
}

/// Whether a claim may exceed the budget.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Demand {
    /// A reader waits for it: always granted.
    Read,
    /// Read-ahead: granted only while the bytes in flight stay within half the budget.
    Ahead,
}

impl State {
    fn touch(&mut self, key: &PageKey) -> Option<Bytes> {
        let (data, tick) = self.pages.get_mut(key)?;
        self.tick += 1;
        self.lru.remove(tick);
        *tick = self.tick;
        self.lru.insert(self.tick, key.clone());
        Some(data.clone())
    }

    fn remove(&mut self, key: &PageKey) {
        if let Some((data, tick)) = self.pages.remove(key) {
            self.lru.remove(&tick);
            self.cached_bytes -= data.len() as u64;
        }
    }

    /// Evicts least recently used pages until `extra` more bytes fit `budget`; false if even an
    /// empty cache would not make room.
    fn make_room(&mut self, budget: u64, extra: u64) -> bool {
        while self.cached_bytes + self.reserved_bytes + extra > budget {
            let Some((_, key)) = self.lru.pop_first() else {
                return false;
            };
            if let Some((data, _)) = self.pages.remove(&key) {
                self.cached_bytes -= data.len() as u64;
            }
        }
        true
    }
}

impl PageCache {
    fn new(budget: u64) -> PageCache {
        PageCache {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    /// The cache of this process for `budget`: stores opened with the same budget (every volume
    /// of a mount daemon) share one.
    pub fn shared(budget: u64) -> Arc<PageCache> {
        static OPEN: LazyLock<Mutex<HashMap<u64, Weak<PageCache>>>> =
            LazyLock::new(Default::default);
        let mut open = OPEN.lock();
        if let Some(cache) = open.get(&budget).and_then(Weak::upgrade) {
            return cache;
        }
        let cache = Arc::new(PageCache::new(budget));
        open.retain(|_, cache| cache.strong_count() > 0);
        open.insert(budget, Arc::downgrade(&cache));
        cache
    }

    /// The pages `indexes` of `object` (`page_len(i)` bytes each) to wait for, and claims for
    /// those neither cached nor in flight (their bytes reserved): the caller fetches them. With
    /// [`Demand::Ahead`], `None` when the missing pages do not fit the budget (nothing is
    /// claimed then).
    pub fn pages(
        self: &Arc<Self>,
        object: &Arc<str>,
        indexes: Range<u32>,
        page_len: impl Fn(u32) -> u64,
        demand: Demand,
    ) -> Option<(Vec<Page>, Vec<PageClaim>)> {
        let mut state = self.state.lock();
        let mut found = Vec::with_capacity(indexes.len());
        let mut missing = 0;
        for index in indexes {
            let key = PageKey {
                object: Arc::clone(object),
                index,
            };
            let page = match state.touch(&key) {
                Some(data) => Some(Page::Ready(data)),
                None => state.inflight.get(&key).cloned().map(Page::Pending),
            };
            if page.is_none() {
                missing += page_len(index);
            }
            found.push((key, page));
        }
        if missing > 0 {
            if demand == Demand::Ahead && state.reserved_bytes + missing > self.budget / 2 {
                return None;
            }
            // Read-ahead within half the budget always fits once cached pages are evicted.
            state.make_room(self.budget, missing);
            state.reserved_bytes += missing;
        }
        let mut claims = Vec::new();
        let pages = found
            .into_iter()
            .map(|(key, page)| {
                page.unwrap_or_else(|| {
                    let (tx, rx) = watch::channel(None);
                    state.inflight.insert(key.clone(), rx.clone());
                    claims.push(PageClaim {
                        cache: Arc::clone(self),
                        len: page_len(key.index),
                        key,
                        tx: Some(tx),
                    });
                    Page::Pending(rx)
                })
            })
            .collect();
        Some((pages, claims))
    }

    /// Ends a page's flight: releases its reservation and caches `data` if given.
    fn finish(&self, key: &PageKey, len: u64, data: Option<Bytes>) {
        let mut state = self.state.lock();
        state.reserved_bytes -= len;
        state.inflight.remove(key);
        if let Some(data) = data {
            self.insert_locked(&mut state, key.clone(), data);
        }
    }

    fn insert_locked(&self, state: &mut State, key: PageKey, data: Bytes) {
        state.remove(&key);
        let len = data.len() as u64;
        if !state.make_room(self.budget, len) {
            return;
        }
        state.tick += 1;
        state.lru.insert(state.tick, key.clone());
        state.pages.insert(key, (data, state.tick));
        state.cached_bytes += len;
    }

    /// Caches a page whose bytes are known (just written), unless it is in flight.
    pub fn insert(&self, key: PageKey, data: Bytes) {
        let mut state = self.state.lock();
        if !state.inflight.contains_key(&key) {
            self.insert_locked(&mut state, key, data);
        }
    }

    /// Cached pages of objects whose key starts with `prefix`.
    #[cfg(test)]
    pub fn count_prefix(&self, prefix: &str) -> usize {
        let state = self.state.lock();
        state
            .pages
            .keys()
            .filter(|k| k.object.starts_with(prefix))
            .count()
    }

    /// Drops the cached pages `indexes` of `object` (its object was deleted).
    pub fn invalidate(&self, object: &Arc<str>, indexes: Range<u32>) {
        let mut state = self.state.lock();
        for index in indexes {
            state.remove(&PageKey {
                object: Arc::clone(object),
                index,
            });
        }
    }

    /// (cached bytes, reserved bytes).
    #[cfg(test)]
    pub fn usage(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.cached_bytes, state.reserved_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn object(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    fn page(byte: u8) -> Bytes {
        Bytes::from(vec![byte; P as usize])
    }

    #[tokio::test]
    async fn concurrent_readers_of_a_page_share_one_claim() {
        let cache = Arc::new(PageCache::new(16 * P));
        let o = object("o");
        let (first, claims) = cache.pages(&o, 0..2, |_| P, Demand::Read).unwrap();
        assert_eq!(claims.len(), 2);
        // A second reader (and read-ahead) of the same pages claims nothing: it waits.
        let (second, again) = cache.pages(&o, 0..2, |_| P, Demand::Read).unwrap();
        assert!(again.is_empty());
        let (_, ahead) = cache.pages(&o, 0..2, |_| P, Demand::Ahead).unwrap();
        assert!(ahead.is_empty());
        assert_eq!(cache.usage(), (0, 2 * P));
        let mut claims = claims.into_iter();
        claims.next().unwrap().complete(page(1));
        claims
            .next()
            .unwrap()
            .fail(StoreError::Io("injected".into()));
        let (mut first, mut second) = (first.into_iter(), second.into_iter());
        for pages in [&mut first, &mut second] {
            assert_eq!(pages.next().unwrap().bytes().await.unwrap(), page(1));
            assert!(pages.next().unwrap().bytes().await.is_err());
        }
        // The failed page is claimed again by the next reader; the other is cached.
        assert_eq!(cache.usage(), (P, 0));
        let (pages, claims) = cache.pages(&o, 0..2, |_| P, Demand::Read).unwrap();
        assert!(matches!(pages[0], Page::Ready(_)));
        assert_eq!(claims.len(), 1);
        // A claim dropped unfinished (a cancelled fetch) fails its waiters.
        drop(claims);
        let mut pages = pages.into_iter();
        pages.next();
        assert!(pages.next().unwrap().bytes().await.is_err());
        assert_eq!(cache.usage(), (P, 0));
    }

    #[tokio::test]
    async fn cached_and_in_flight_bytes_stay_within_the_budget() {
        let cache = Arc::new(PageCache::new(8 * P));
        let o = object("o");
        // Read pages 0..6: all cached.
        for index in 0..6 {
            let (_, claims) = cache
                .pages(&o, index..index + 1, |_| P, Demand::Read)
                .unwrap();
            claims
                .into_iter()
                .for_each(|c| c.complete(page(index as u8)));
        }
        assert_eq!(cache.usage(), (6 * P, 0));
        // Read-ahead of 4 pages fits after evicting the 2 oldest, up to half the budget.
        let (_, ahead) = cache.pages(&o, 10..14, |_| P, Demand::Ahead).unwrap();
        assert_eq!(ahead.len(), 4);
        assert_eq!(cache.usage(), (4 * P, 4 * P));
        // More read-ahead would pass half the budget in flight: dropped, nothing claimed.
        assert!(cache.pages(&o, 14..15, |_| P, Demand::Ahead).is_none());
        assert_eq!(cache.usage(), (4 * P, 4 * P));
        // A demand read is granted anyway, evicting what it must.
        let (_, read) = cache.pages(&o, 20..22, |_| P, Demand::Read).unwrap();
        assert_eq!(cache.usage(), (2 * P, 6 * P));
        // Completed pages become cached bytes, evicting the least recently used.
        ahead
            .into_iter()
            .chain(read)
            .for_each(|c| c.complete(page(9)));
        let (cached, reserved) = cache.usage();
        assert_eq!(reserved, 0);
        assert!(cached <= 8 * P, "{cached}");
        // The least recently used pages went first: 2 and 3 were touched last of 0..6 but
        // evicted before the fetched ones.
        let (pages, claims) = cache.pages(&o, 20..22, |_| P, Demand::Read).unwrap();
        assert!(claims.is_empty());
        assert!(pages.iter().all(|p| matches!(p, Page::Ready(_))));
    }

    #[test]
    fn invalidated_pages_are_gone_and_shared_caches_are_per_budget() {
        let cache = Arc::new(PageCache::new(8 * P));
        let o = object("o");
        cache.insert(
            PageKey {
                object: Arc::clone(&o),
                index: 3,
            },
            page(3),
        );
        assert_eq!(cache.usage(), (P, 0));
        cache.invalidate(&o, 0..4);
        assert_eq!(cache.usage(), (0, 0));

        let a = PageCache::shared(3 * P + 1);
        let b = PageCache::shared(3 * P + 1);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &PageCache::shared(3 * P + 2)));
    }
}
