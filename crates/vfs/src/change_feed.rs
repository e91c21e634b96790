//! The change feed of a mounted volume: every change another engine instance commits (another
//! mount on this host or another host, the server, fsck) reaches this mount's kernel caches as
//! invalidations, so the kernel can keep entries and attributes for long. The metadata engine's
//! change log orders changes by commit, and this thread's position in it is all the state it
//! needs: a mount that loses its database connection for a while catches up from where it was.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use cellar_meta::{Change, ChangeBatch};

use crate::volume::Inner;
use crate::Invalidation;

/// How long one wait for changes lasts before the thread checks whether the volume is stopping.
const WAIT: Duration = Duration::from_millis(250);
/// Changes read per query.
const BATCH: usize = 1024;
/// Pause after a failed query (the database is unreachable): the position is kept.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Failures logged while the engine stays unreachable: the first, then one in this many.
const LOG_EVERY_FAILURES: u32 = 30;

/// Changes older than this are trimmed from the log by the mount holding the maintenance lease.
/// A mount that falls further behind drops all its kernel caches instead.
pub(crate) const CHANGE_LOG_RETENTION: Duration = Duration::from_secs(600);

/// Starts following the change log from its current end: whatever commits from now on, this
/// mount hears about (its kernel caches nothing yet).
pub(crate) fn start(inner: &Arc<Inner>) -> anyhow::Result<JoinHandle<()>> {
    let start = inner
        .core
        .meta
        .last_change()
        .context("reading the end of the change log")?;
    let weak = Arc::downgrade(inner);
    Ok(std::thread::Builder::new()
        .name("cellar-changes".into())
        .spawn(move || follow(weak, start))?)
}

fn follow(weak: Weak<Inner>, mut position: u64) {
    let Some((meta, stopper)) = weak
        .upgrade()
        .map(|inner| (Arc::clone(&inner.core.meta), Arc::clone(&inner.stopper)))
    else {
        return;
    };
    let origin = meta.origin();
    let mut failures = 0u32;
    while !stopper.wait(Duration::ZERO) {
        let batch = meta
            .wait_for_changes(position, WAIT)
            .and_then(|()| meta.changes_since(position, BATCH));
        let Some(inner) = weak.upgrade() else { return };
        match batch {
            Ok(ChangeBatch::Changes(changes)) => {
                if failures > 0 {
                    tracing::info!("the change feed is back after {failures} failed attempt(s)");
                    failures = 0;
                }
                for change in changes.iter().filter(|change| change.origin != origin) {
                    apply(&inner, change);
                }
                if let Some(last) = changes.last() {
                    position = last.seq;
                }
            }
            Ok(ChangeBatch::Lost) => {
                tracing::warn!(
                    position,
                    "changes this mount had not read were trimmed from the log; dropping every kernel cache"
                );
                match meta.last_change() {
                    Ok(end) => {
                        inner.invalidate(Invalidation::All);
                        inner.forget_all_seen();
                        position = end;
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the end of the change log"),
                }
            }
            Err(e) => {
                if failures.is_multiple_of(LOG_EVERY_FAILURES) {
                    tracing::warn!(error = %e, position, "reading the change log failed; retrying");
                }
                failures += 1;
                drop(inner);
                if stopper.wait(RETRY_AFTER) {
                    return;
                }
            }
        }
    }
}

/// Drops what this mount's kernel may cache about what the change touched.
fn apply(inner: &Inner, change: &Change) {
    if change.ino != 0 {
        inner.forget_seen(change.ino);
        // Reads through descriptors already open load the new layout at once.
        if let Some(file) = inner.registry.file(change.ino) {
            *file.layout.lock() = None;
        }
        inner.invalidate(Invalidation::Inode(change.ino));
    }
    if let Some((parent, name)) = &change.entry {
        inner.invalidate(Invalidation::Entry {
            parent: *parent,
            name: name.clone(),
        });
    }
}
