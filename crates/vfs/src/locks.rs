//! POSIX byte-range locks and BSD flock, kept in the metadata engine so they hold across mounts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cellar_meta::{Ino, LockKind, LockOwner, LockRange};

use crate::errno::err;
use crate::volume::Inner;
use crate::VfsResult;

const BACKOFF_FIRST: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// flock owners are per handle; this bit keeps them apart from the kernel's POSIX owners.
const FLOCK_OWNER_BIT: u64 = 1 << 63;

impl Inner {
    fn posix_owner(&self, lock_owner: u64) -> LockOwner {
        LockOwner {
            session: self.session(),
            owner: lock_owner,
        }
    }

    fn flock_owner(&self, fh: u64) -> LockOwner {
        LockOwner {
            session: self.session(),
            owner: fh | FLOCK_OWNER_BIT,
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
    ) -> VfsResult<()> {
        let handle = self.registry.handle(fh)?;
        let owner = self.posix_owner(lock_owner);
        self.acquire(sleep, || self.core.meta.setlk(ino, owner, &range))?;
        if range.kind != LockKind::Unlock {
            handle.file()?.posix_locked.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    pub(crate) fn flock(&self, ino: Ino, fh: u64, kind: LockKind, sleep: bool) -> VfsResult<()> {
        self.registry.handle(fh)?;
        let owner = self.flock_owner(fh);
        self.acquire(sleep, || self.core.meta.flock(ino, owner, kind))
    }

    /// Drops the POSIX locks of `lock_owner` on the inode (close of a descriptor).
    pub(crate) fn unlock_posix(&self, ino: Ino, lock_owner: u64) {
        if let Err(e) = self.core.meta.unlock_all(ino, self.posix_owner(lock_owner)) {
            tracing::warn!(ino, error = %e, "could not drop POSIX locks");
        }
    }

    /// Drops the flock of a handle (its last close).
    pub(crate) fn unlock_flock(&self, ino: Ino, fh: u64) {
        if let Err(e) = self
            .core
            .meta
            .flock(ino, self.flock_owner(fh), LockKind::Unlock)
        {
            tracing::warn!(ino, error = %e, "could not drop a flock");
        }
    }
}
