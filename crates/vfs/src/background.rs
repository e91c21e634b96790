//! Background threads of a mounted volume: session heartbeat, idle-buffer flusher, compaction
//! and garbage collection. Each holds only a weak reference, so dropping the volume ends them.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::now_ns;
use crate::flush::IDLE_FLUSH_AFTER;
use crate::volume::Inner;
use crate::Invalidation;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Reaping runs every this many heartbeats.
const REAP_EVERY_HEARTBEATS: u32 = 6;
const FLUSHER_EVERY: Duration = Duration::from_millis(500);
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
/// Fragmented chunks compacted per maintenance round.
const COMPACT_PER_ROUND: usize = 64;

pub(crate) fn start(inner: &Arc<Inner>) -> std::io::Result<Vec<JoinHandle<()>>> {
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
        spawn(inner, "cellar-maintenance", MAINTENANCE_EVERY, |inner| {
            if let Err(e) = inner.core.compact_pass(COMPACT_PER_ROUND) {
                tracing::warn!(error = %e, "compaction pass failed");
            }
            let before = now_ns() - inner.gc_grace.as_nanos() as i64;
            if let Err(e) = inner.core.collect_garbage(before) {
                tracing::warn!(error = %e, "garbage collection failed");
            }
        })?,
    ])
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
    for file in inner.registry.all_files() {
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
