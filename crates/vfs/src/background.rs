//! Background threads of a mounted volume: session heartbeat, idle-buffer flusher, compactor of
//! the chunks writers asked for, the change feed (see [`crate::change_feed`]), and the
//! maintenance sweep (compaction leftovers, garbage collection, trimming the change log), which
//! runs only in the mount holding the volume's maintenance lease. Each holds only a weak
//! reference, so dropping the volume ends them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::backend::now_ns;
use crate::change_feed::{self, CHANGE_LOG_RETENTION};
use crate::compaction::COMPACT_BACKGROUND_SLICES;
use crate::flush::IDLE_FLUSH_AFTER;
use crate::maintenance::MAINTENANCE_LEASE;
use crate::volume::Inner;
use crate::Invalidation;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Reaping runs every this many heartbeats.
const REAP_EVERY_HEARTBEATS: u32 = 6;
const FLUSHER_EVERY: Duration = Duration::from_millis(500);
const COMPACTOR_EVERY: Duration = Duration::from_secs(1);
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Fragmented chunks compacted per maintenance round.
const COMPACT_PER_ROUND: usize = 64;

/// Starts the threads; [`Inner::shutdown`] stops and joins them.
pub(crate) fn start(inner: &Arc<Inner>) -> anyhow::Result<()> {
    let mut threads = threads(inner).context("starting background threads")?;
    threads.push(change_feed::start(inner).context("starting the change feed")?);
    *inner.threads.lock() = threads;
    Ok(())
}

fn threads(inner: &Arc<Inner>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut beats = 0u32;
    Ok(vec![
        // Its own thread, touching only the metadata: a stalled store or a long flush cannot
        // delay the heartbeat into looking like a crashed mount to the others.
        spawn(inner, "cellar-heartbeat", HEARTBEAT_EVERY, move |inner| {
            inner.heartbeat();
            beats += 1;
            if beats.is_multiple_of(REAP_EVERY_HEARTBEATS) {
                inner.reap_stale_sessions();
            }
        })?,
        spawn(inner, "cellar-flusher", FLUSHER_EVERY, flush_idle)?,
        spawn(
            inner,
            "cellar-compactor",
            COMPACTOR_EVERY,
            compact_requested,
        )?,
        spawn(inner, "cellar-maintenance", MAINTENANCE_EVERY, maintain)?,
    ])
}

fn compact_requested(inner: &Inner) {
    let requests: Vec<_> = inner.compaction_requests.lock().drain().collect();
    for (ino, chunk) in requests {
        if let Err(e) = inner.core.compact_chunk(ino, chunk) {
            tracing::warn!(ino, chunk, error = %e, "compaction of a chunk failed");
        }
    }
}

/// The sweep over the whole volume: one mount at a time, the holder of the lease.
fn maintain(inner: &Inner) {
    let lease = (MAINTENANCE_EVERY * 3).as_nanos() as i64;
    match inner
        .core
        .meta
        .try_lease(MAINTENANCE_LEASE, inner.session(), lease)
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "could not take the maintenance lease");
            return;
        }
    }
    if let Err(e) = inner
        .core
        .compact_pass(COMPACT_BACKGROUND_SLICES, COMPACT_PER_ROUND)
    {
        tracing::warn!(error = %e, "compaction pass failed");
    }
    let before = now_ns() - inner.gc_grace.as_nanos() as i64;
    if let Err(e) = inner.core.collect_garbage(before) {
        tracing::warn!(error = %e, "garbage collection failed");
    }
    let trim_before = now_ns() - CHANGE_LOG_RETENTION.as_nanos() as i64;
    match inner.core.meta.trim_changes(trim_before) {
        Ok(0) => {}
        Ok(trimmed) => tracing::debug!(trimmed, "trimmed the change log"),
        Err(e) => tracing::warn!(error = %e, "trimming the change log failed"),
    }
}

fn spawn(
    inner: &Arc<Inner>,
    name: &str,
    period: Duration,
    mut work: impl FnMut(&Inner) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let stopper = inner.stopper.clone();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            while !stopper.wait(period) {
                let Some(inner) = weak.upgrade() else { return };
                work(&inner);
            }
        })
}

/// Commits finished background uploads and flushes buffers left idle.
fn flush_idle(inner: &Inner) {
    if let Err(e) = inner.core.meta.commit_closes() {
        tracing::warn!(error = %e, "recording last closes failed; will retry");
    }
    for file in inner.registry.all_files() {
        // Once a shutdown began, it flushes (within its bound) what is left: a try started
        // here would hold it up by one more store operation.
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let (dirty, idle) = {
            let d = file.data.lock();
            (
                d.is_dirty(),
                d.last_write.is_none_or(|t| t.elapsed() >= IDLE_FLUSH_AFTER),
            )
        };
        if !dirty {
            continue;
        }
        let outcome = if idle {
            inner.flush_file(&file)
        } else {
            inner.commit_finished(&file)
        };
        match outcome {
            Ok(()) if idle => {
                // The commit set the final mtime; let the kernel refresh what it cached.
                inner.invalidate(Invalidation::Inode(file.ino));
                inner.registry.forget_if_idle(file.ino);
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(ino = file.ino, error = %e, "background flush failed; will retry")
            }
        }
    }
}
