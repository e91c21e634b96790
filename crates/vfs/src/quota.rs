//! The volume's byte quota as a mount enforces it before buffering a write: from the quota and
//! usage it read at most [`QUOTA_MAX_AGE`] ago (so a quota set elsewhere, or space freed by
//! another mount, counts within that), plus what this mount buffered or committed since. The
//! commit transaction checks the quota again, exactly (another mount may have raced).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellar_meta::MetaEngine;
use parking_lot::Mutex;

use crate::{Errno, VfsResult};

/// How old the quota and usage a write is checked against may be.
pub(crate) const QUOTA_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct QuotaView {
    read: Mutex<Option<Reading>>,
    /// Bytes this mount committed since the last reading (at most: overwrites count too).
    committed: AtomicU64,
}

struct Reading {
    at: Instant,
    quota: Option<u64>,
    used: u64,
}

impl QuotaView {
    /// EDQUOT if buffering `len` more bytes, on top of `dirty` buffered ones, would take the
    /// volume past its quota.
    /// A write must not depend on the metadata engine being reachable (it is only buffered): if
    /// reading fails, the last reading is used for another second (the commit checks again).
    pub fn check(&self, meta: &dyn MetaEngine, dirty: u64, len: u64) -> VfsResult<()> {
        let (quota, used) = {
            let mut read = self.read.lock();
            let reading = match read.take() {
                Some(reading) if reading.at.elapsed() < QUOTA_MAX_AGE => reading,
                last => self.read_now(meta).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "could not read the volume's quota and usage");
                    Reading {
                        at: Instant::now(),
                        ..last.unwrap_or(Reading {
                            at: Instant::now(),
                            quota: None,
                            used: 0,
                        })
                    }
                }),
            };
            let current = (reading.quota, reading.used);
            *read = Some(reading);
            current
        };
        let Some(quota) = quota else {
            return Ok(());
        };
        let wanted = used
            .saturating_add(self.committed.load(Ordering::SeqCst))
            .saturating_add(dirty)
            .saturating_add(len);
        if wanted > quota {
            return Err(Errno(libc::EDQUOT));
        }
        Ok(())
    }

    /// This mount freed space (unlink, truncate, a replacing rename): with a
    /// quota, the next write reads the usage again, so the space is usable at once.
    pub fn space_freed(&self) {
        let mut read = self.read.lock();
        if read.as_ref().is_some_and(|r| r.quota.is_some()) {
            *read = None;
        }
    }

    /// A commit of this mount stored `bytes` (counted until the next reading includes them).
    pub fn committed(&self, bytes: u64) {
        self.committed.fetch_add(bytes, Ordering::SeqCst);
    }

    fn read_now(&self, meta: &dyn MetaEngine) -> cellar_meta::Result<Reading> {
        // Commits after this point may be missing from the usage read below: they stay counted.
        let counted = self.committed.load(Ordering::SeqCst);
        let quota = meta.quota()?;
        let used = meta.usage()?.bytes;
        self.committed.fetch_sub(counted, Ordering::SeqCst);
        Ok(Reading {
            at: Instant::now(),
            quota,
            used,
        })
    }
}
