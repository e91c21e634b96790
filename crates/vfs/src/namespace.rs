//! Namespace operations: lookup, attributes (with the permission rules the kernel leaves to the
//! file system), node creation, removal, rename, directories, xattrs, statfs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cellar_meta::{Attr, FileKind, Ino, NewNode, Rename, RenameMode, SetAttr, TimeSet};

use crate::backend::now_ns;
use crate::errno::err;
use crate::handles::{FileState, Handle, HandleKind};
use crate::volume::Inner;
use crate::{Ctx, DirEntryPlus, SetAttrRequest, StatFs, VfsResult, MAX_FILE_SIZE};

use cellar_meta::{MAX_NAME_LEN as NAME_MAX, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN};

const SYMLINK_MAX: usize = 4095;
/// Virtual capacity reported by statfs (the object store has no fixed size).
const CAPACITY_BYTES: u64 = 1 << 50;
const CAPACITY_INODES: u64 = 1 << 40;
const STATFS_BSIZE: u64 = 4096;

const S_ISUID: u32 = libc::S_ISUID;
const S_ISGID: u32 = libc::S_ISGID;
const S_IXGRP: u32 = libc::S_IXGRP;

fn check_name(name: &[u8]) -> VfsResult<()> {
    cellar_meta::invalid_name(name).map_or(Ok(()), err)
}

/// Whether the caller belongs to `gid`: its primary group, or a supplementary group of its
/// process (FUSE requests carry only the primary gid, so those are read from /proc).
fn in_group(ctx: &Ctx, gid: u32) -> bool {
    if ctx.gid == gid {
        return true;
    }
    if ctx.pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", ctx.pid)) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(gid))
        })
}

/// The file kind named by the type bits of a mknod mode (no type bits: a regular file).
fn kind_of_mode(mode: u32) -> VfsResult<FileKind> {
    Ok(match mode & libc::S_IFMT {
        0 => FileKind::Regular,
        m if m == libc::S_IFREG => FileKind::Regular,
        m if m == libc::S_IFIFO => FileKind::Fifo,
        m if m == libc::S_IFSOCK => FileKind::Socket,
        m if m == libc::S_IFCHR => FileKind::CharDevice,
        m if m == libc::S_IFBLK => FileKind::BlockDevice,
        m if m == libc::S_IFDIR => return err(libc::EPERM),
        _ => return err(libc::EINVAL),
    })
}

impl Inner {
    pub(crate) fn lookup(&self, parent: Ino, name: &[u8]) -> VfsResult<Attr> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        self.overlay_attr(self.core.meta.lookup(parent, name)?)
    }

    pub(crate) fn getattr(&self, ino: Ino) -> VfsResult<Attr> {
        match self.registry.file(ino) {
            Some(file) => self.open_file_attr(&file),
            None => Ok(self.core.meta.getattr(ino)?),
        }
    }

    pub(crate) fn setattr(&self, ctx: &Ctx, ino: Ino, req: SetAttrRequest) -> VfsResult<Attr> {
        let before = self.attr_before_change(ino)?;
        // What this mount sees: the permission checks below go by it.
        let attr = before.seen.clone();
        let root = ctx.uid == 0;
        let owner = root || ctx.uid == attr.uid;
        let mut changes = SetAttr {
            atime: req.atime,
            mtime: req.mtime,
            ctime: req.ctime,
            ..SetAttr::default()
        };
        if let Some(uid) = req.uid {
            if !root && uid != attr.uid {
                return err(libc::EPERM);
            }
            changes.uid = Some(uid);
        }
        if let Some(gid) = req.gid {
            // Non-root owners may only pick a group they belong to (primary or supplementary).
            if !root && (ctx.uid != attr.uid || (gid != attr.gid && !in_group(ctx, gid))) {
                return err(libc::EPERM);
            }
            changes.gid = Some(gid);
        }
        let chown = req.uid.is_some() || req.gid.is_some();
        let directory = attr.kind == FileKind::Directory;
        if let Some(mode) = req.mode {
            let mut perm = mode & 0o7777;
            // A write by a non-owner makes the kernel clear setuid/setgid through setattr: only
            // dropping those bits is allowed to anyone.
            let drops_privileges_only =
                perm != attr.perm && perm == attr.perm & !(S_ISUID | S_ISGID) & 0o7777;
            if !owner && !drops_privileges_only {
                return err(libc::EPERM);
            }
            if !root
                && !directory
                && perm & S_ISGID != 0
                && !in_group(ctx, changes.gid.unwrap_or(attr.gid))
            {
                perm &= !S_ISGID;
            }
            changes.perm = Some(perm);
        } else if chown && !directory && attr.perm & (S_ISUID | S_ISGID) != 0 {
            // chown drops setuid, and setgid when it means "set group id" (group-executable).
            let mut perm = attr.perm & !S_ISUID;
            if perm & S_IXGRP != 0 {
                perm &= !S_ISGID;
            }
            changes.perm = Some(perm);
        }
        let explicit_time =
            matches!(req.atime, Some(TimeSet::At(_))) || matches!(req.mtime, Some(TimeSet::At(_)));
        if explicit_time && !owner {
            return err(libc::EPERM);
        }
        if let Some(size) = req.size {
            match attr.kind {
                FileKind::Regular => {}
                FileKind::Directory => return err(libc::EISDIR),
                _ => return err(libc::EINVAL),
            }
            if size > MAX_FILE_SIZE {
                return err(libc::EFBIG);
            }
            self.truncate_file(ino, size)?;
            if changes.is_empty() {
                return self.getattr(ino);
            }
            return self.change_attr(ino, self.attr_before_change(ino)?, changes);
        }
        if changes.is_empty() {
            return Ok(attr);
        }
        self.change_attr(ino, before, changes)
    }

    /// An inode's attributes before a change, as committed and as this mount sees them.
    pub(crate) fn attr_before_change(&self, ino: Ino) -> VfsResult<AttrBefore> {
        let open = self.registry.file(ino);
        let (committed, generation) = match &open {
            Some(file) => self.committed_attr(file)?,
            None => (self.core.meta.getattr(ino)?, 0),
        };
        let mut seen = committed.clone();
        if let Some(file) = &open {
            file.data.lock().overlay_attr(&mut seen);
        }
        Ok(AttrBefore {
            open,
            committed,
            generation,
            seen,
        })
    }

    /// Applies checked attribute changes (not the size) and returns the attributes after them.
    /// While this mount holds unflushed writes of the file they are kept for the flush that
    /// commits those (see `FileData::pending_attr`): durable and visible to other mounts with
    /// them, at close or fsync.
    pub(crate) fn change_attr(
        &self,
        ino: Ino,
        before: AttrBefore,
        mut changes: SetAttr,
    ) -> VfsResult<Attr> {
        let now = now_ns();
        if let Some(file) = &before.open {
            let mut d = file.data.lock();
            if d.is_dirty() {
                // Resolved now: the commit comes later.
                for time in [&mut changes.atime, &mut changes.mtime] {
                    if *time == Some(TimeSet::Now) {
                        *time = Some(TimeSet::At(now));
                    }
                }
                changes.ctime.get_or_insert(now);
                d.pending_attr.merge(&changes);
                d.pending_attr_gen += 1;
                if d.commit_gen == before.generation {
                    let mut after = before.committed;
                    d.overlay_attr(&mut after);
                    return Ok(after);
                }
                drop(d);
                return self.getattr(ino);
            }
        }
        let after = self.core.meta.setattr(ino, &changes, now)?;
        match before.open {
            // Unflushed writes may have come meanwhile.
            Some(_) => self.getattr(ino),
            None => Ok(after),
        }
    }

    pub(crate) fn readlink(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        Ok(self.core.meta.readlink(ino)?)
    }

    /// Creates `node` owned by the caller, with the group (plus, for directories, the setgid bit)
    /// inherited from a setgid parent; `open`: recorded as open by this mount in the same
    /// transaction (see `MetaEngine::create_open`).
    pub(crate) fn create_node(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mut node: NewNode,
        open: bool,
    ) -> VfsResult<Attr> {
        check_name(name)?;
        let parent_attr = self.core.meta.getattr(parent)?;
        if parent_attr.kind != FileKind::Directory {
            return err(libc::ENOTDIR);
        }
        let inherit_group = parent_attr.perm & S_ISGID != 0;
        node.perm &= 0o7777;
        node.uid = ctx.uid;
        node.gid = if inherit_group {
            parent_attr.gid
        } else {
            ctx.gid
        };
        if node.kind == FileKind::Directory && inherit_group {
            node.perm |= S_ISGID;
        } else if node.kind != FileKind::Directory
            && node.perm & S_ISGID != 0
            && ctx.uid != 0
            && node.gid != ctx.gid
        {
            node.perm &= !S_ISGID;
        }
        let meta = &self.core.meta;
        let attr = if open {
            meta.create_open(self.session(), parent, name, &node, now_ns())?
        } else {
            meta.create_node(parent, name, &node, now_ns())?
        };
        self.note_seen(&attr);
        Ok(attr)
    }

    pub(crate) fn mknod(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> VfsResult<Attr> {
        let kind = kind_of_mode(mode)?;
        self.create_node(
            ctx,
            parent,
            name,
            new_node(kind, mode & !umask, rdev, Vec::new()),
            false,
        )
    }

    pub(crate) fn mkdir(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> VfsResult<Attr> {
        self.create_node(
            ctx,
            parent,
            name,
            new_node(FileKind::Directory, mode & !umask, 0, Vec::new()),
            false,
        )
    }

    pub(crate) fn symlink(
        &self,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> VfsResult<Attr> {
        if target.is_empty() {
            return err(libc::ENOENT);
        }
        if target.len() > SYMLINK_MAX {
            return err(libc::ENAMETOOLONG);
        }
        self.create_node(
            ctx,
            parent,
            name,
            new_node(FileKind::Symlink, 0o777, 0, target.to_vec()),
            false,
        )
    }

    pub(crate) fn unlink(&self, parent: Ino, name: &[u8]) -> VfsResult<()> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        let unlinked = self.core.meta.unlink(parent, name, now_ns())?;
        self.quota.space_freed();
        self.note_unlinked(unlinked);
        Ok(())
    }

    /// `ino` may have lost its last link: if it is open here, its last close frees it at once.
    fn note_unlinked(&self, ino: Option<Ino>) {
        if let Some(file) = ino.and_then(|ino| self.registry.file(ino)) {
            file.unlinked.store(true, Ordering::SeqCst);
        }
    }

    pub(crate) fn rmdir(&self, parent: Ino, name: &[u8]) -> VfsResult<()> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        if name == b"." {
            return err(libc::EINVAL);
        }
        if name == b".." {
            return err(libc::ENOTEMPTY);
        }
        self.core.meta.rmdir(parent, name, now_ns())?;
        Ok(())
    }

    pub(crate) fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
    ) -> VfsResult<()> {
        if name.len() > NAME_MAX {
            return err(libc::ENAMETOOLONG);
        }
        check_name(new_name)?;
        let req = Rename {
            src_parent: parent,
            src_name: name,
            dst_parent: new_parent,
            dst_name: new_name,
            mode,
        };
        let replaced = self.core.meta.rename(&req, now_ns())?.replaced;
        if replaced.is_some() {
            self.quota.space_freed();
            self.note_unlinked(replaced);
        }
        Ok(())
    }

    pub(crate) fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> VfsResult<Attr> {
        check_name(new_name)?;
        let attr = self.core.meta.link(ino, new_parent, new_name, now_ns())?;
        self.overlay_attr(attr)
    }

    pub(crate) fn opendir(&self, ctx: &Ctx, ino: Ino, flags: i32) -> VfsResult<u64> {
        if self.core.meta.getattr(ino)?.kind != FileKind::Directory {
            return err(libc::ENOTDIR);
        }
        Ok(self.registry.insert_handle(Handle {
            ino,
            flags,
            uid: ctx.uid,
            kind: HandleKind::Dir,
        }))
    }

    /// "." (offset 1), ".." (offset 2), then entries whose offsets are their stable cookies.
    pub(crate) fn readdir(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        limit: usize,
        plus: bool,
    ) -> VfsResult<Vec<DirEntryPlus>> {
        let handle = self.registry.handle(fh)?;
        if !matches!(handle.kind, HandleKind::Dir) {
            return err(libc::ENOTDIR);
        }
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        if offset < 2 {
            let dir = self.core.meta.getattr(ino)?;
            let parent = if ino == crate::ROOT_INO {
                ino
            } else {
                dir.parent
            };
            if offset < 1 {
                out.push(DirEntryPlus {
                    ino,
                    offset: 1,
                    kind: FileKind::Directory,
                    name: b".".to_vec(),
                    attr: plus.then(|| dir.clone()),
                    xattrs: None,
                });
            }
            if out.len() < limit {
                let attr = if plus {
                    Some(self.core.meta.getattr(parent)?)
                } else {
                    None
                };
                out.push(DirEntryPlus {
                    ino: parent,
                    offset: 2,
                    kind: FileKind::Directory,
                    name: b"..".to_vec(),
                    attr,
                    xattrs: None,
                });
            }
        }
        if out.len() < limit {
            for e in self
                .core
                .meta
                .readdir(ino, offset.max(2), limit - out.len(), plus)?
            {
                out.push(DirEntryPlus {
                    ino: e.ino,
                    offset: e.cookie,
                    kind: e.kind,
                    name: e.name,
                    attr: e.attr.map(|a| self.listed_attr(a)).transpose()?,
                    xattrs: e.xattrs,
                });
            }
        }
        Ok(out)
    }

    /// The attributes of an entry of a listing, as this mount sees them. An inode open or
    /// dirty here is read again for its overlay; if it went after the listing's snapshot (its
    /// last link removed by another mount and its last close recorded meanwhile), the entry is
    /// listed as the snapshot saw it, like any entry removed while a listing runs.
    fn listed_attr(&self, attr: Attr) -> VfsResult<Attr> {
        let listed = attr.clone();
        match self.overlay_attr(attr) {
            Err(e) if e.0 == libc::ENOENT => Ok(listed),
            other => other,
        }
    }

    pub(crate) fn releasedir(&self, fh: u64) -> VfsResult<()> {
        self.registry.remove_handle(fh).map(drop)
    }

    pub(crate) fn statfs(&self) -> VfsResult<StatFs> {
        let usage = self.core.meta.usage()?;
        // With a quota, `df` shows it as the size.
        let (blocks, bfree) = match self.core.meta.quota()? {
            Some(quota) => (
                quota / STATFS_BSIZE,
                quota.saturating_sub(usage.bytes) / STATFS_BSIZE,
            ),
            None => {
                let blocks = CAPACITY_BYTES / STATFS_BSIZE;
                (
                    blocks,
                    blocks.saturating_sub(usage.bytes.div_ceil(STATFS_BSIZE)),
                )
            }
        };
        let ffree = CAPACITY_INODES.saturating_sub(usage.inodes);
        Ok(StatFs {
            blocks,
            bfree,
            bavail: bfree,
            files: CAPACITY_INODES,
            ffree,
            bsize: STATFS_BSIZE as u32,
            namelen: NAME_MAX as u32,
            frsize: STATFS_BSIZE as u32,
        })
    }

    pub(crate) fn setxattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> VfsResult<()> {
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE_LEN {
            return err(libc::E2BIG);
        }
        let mode = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
            0 => cellar_meta::XattrMode::Any,
            libc::XATTR_CREATE => cellar_meta::XattrMode::Create,
            libc::XATTR_REPLACE => cellar_meta::XattrMode::Replace,
            _ => return err(libc::EINVAL),
        };
        Ok(self.core.meta.set_xattr(ino, name, value, mode, now_ns())?)
    }

    pub(crate) fn getxattr(&self, ino: Ino, name: &[u8]) -> VfsResult<Vec<u8>> {
        check_xattr_name(name)?;
        Ok(self.core.meta.get_xattr(ino, name)?)
    }

    /// Names, each followed by a NUL (the listxattr(2) format).
    pub(crate) fn listxattr(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        let mut out = Vec::new();
        for name in self.core.meta.list_xattr(ino)? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    pub(crate) fn removexattr(&self, ino: Ino, name: &[u8]) -> VfsResult<()> {
        check_xattr_name(name)?;
        Ok(self.core.meta.remove_xattr(ino, name, now_ns())?)
    }
}

/// A node to create; ownership is filled in by `create_node`.
/// See [`Inner::attr_before_change`].
pub(crate) struct AttrBefore {
    open: Option<Arc<FileState>>,
    committed: Attr,
    /// This mount's commit generation `committed` is current at (files open here).
    generation: u64,
    pub seen: Attr,
}

pub(crate) fn new_node(kind: FileKind, perm: u32, rdev: u32, target: Vec<u8>) -> NewNode {
    NewNode {
        kind,
        perm,
        uid: 0,
        gid: 0,
        rdev,
        target,
    }
}

fn check_xattr_name(name: &[u8]) -> VfsResult<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
        return err(libc::ERANGE);
    }
    Ok(())
}
