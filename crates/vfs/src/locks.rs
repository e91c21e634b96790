//! POSIX byte-range locks and BSD flock, kept in the metadata engine so they hold across mounts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cellar_meta::{Ino, LockKind, LockOwner, LockRange};

use crate::errno::err;
use crate::volume::Inner;
use crate::{LockReply, VfsResult};

const BACKOFF_FIRST: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// Attempts to drop locks before the failure is reported (a lock left held blocks every other
/// owner until this session ends).
const UNLOCK_ATTEMPTS: u32 = 4;

impl Inner {
    fn posix_owner(&self, lock_owner: u64) -> LockOwner {
        LockOwner {
            session: self.session(),
            owner: lock_owner,
        }
    }

    /// Tries `attempt` until it grants the lock; without `sleep`, a refusal is EAGAIN.
    fn acquire(
        &self,
        sleep: bool,
        attempt: impl Fn() -> cellar_meta::Result<bool>,
    ) -> VfsResult<()> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            if attempt()? {
                return Ok(());
            }
            if !sleep {
                return err(libc::EAGAIN);
            }
            if self.stopper.wait(backoff) {
                return err(libc::EINTR);
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    pub(crate) fn getlk(
        &self,
        ino: Ino,
        lock_owner: u64,
        range: LockRange,
    ) -> VfsResult<Option<LockRange>> {
        Ok(self
            .core
            .meta
            .getlk(ino, self.posix_owner(lock_owner), &range)?)
    }

    pub(crate) fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        lock_owner: u64,
        range: LockRange,
        sleep: bool,
    ) -> VfsResult<LockReply> {
        let handle = self.registry.handle(fh)?;
        let file = handle.file()?;
        let owner = self.posix_owner(lock_owner);
        if range.kind == LockKind::Unlock {
            // The next holder, on any mount, reads what was written under the lock (as NFS
            // commits on unlock); the lock goes even if that fails, and the failure is reported.
            let committed = self.flush_file(file);
            self.core.meta.setlk(ino, owner, &range)?;
            return committed.map(|()| LockReply { keep_cache: true });
        }
        self.acquire(sleep, || self.core.meta.setlk(ino, owner, &range))?;
        file.posix_locked.store(true, Ordering::SeqCst);
        let attr = self.core.meta.getattr(ino)?;
        Ok(LockReply {
            keep_cache: self.sync_point(file, &attr),
        })
    }

    /// Drops the POSIX locks of `lock_owner` on the inode (close of a descriptor), retrying a
    /// failing engine before reporting the failure.
    pub(crate) fn unlock_posix(&self, ino: Ino, lock_owner: u64) -> VfsResult<()> {
        let owner = self.posix_owner(lock_owner);
        let mut backoff = BACKOFF_MAX;
        for attempt in 1..=UNLOCK_ATTEMPTS {
            match self.core.meta.unlock_all(ino, owner) {
                Ok(()) => return Ok(()),
                Err(e) if attempt == UNLOCK_ATTEMPTS => {
                    tracing::error!(ino, error = %e, "could not drop POSIX locks; they stay held until this mount's session ends");
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(ino, error = %e, attempt, "dropping POSIX locks failed; retrying")
                }
            }
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        Ok(())
    }
}
