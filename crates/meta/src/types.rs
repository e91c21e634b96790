use serde::{Deserialize, Serialize};

pub type Ino = u64;
pub type SessionId = u64;
pub const ROOT_INO: Ino = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Attributes of an inode. Times are nanoseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// 512-byte units the file really holds (`st_blocks`): its bytes backed by stored data,
    /// rounded up; holes and never-written ranges of a sparse file do not count.
    pub blocks: u64,
    pub rdev: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Parent directory (for directories; for other kinds the parent it was created in).
    pub parent: Ino,
    /// Bumped by every change of the content (write, truncate) from any client: a cached layout
    /// or page cache of the file is valid while it is unchanged.
    pub data_version: u64,
}

/// A file's content as one read transaction saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub attr: Attr,
    /// `None` when the data version equals the one the caller already knows.
    pub content: Option<Content>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Inline bytes: the start of the file (bytes past them up to the size read as zeros).
    Inline(Vec<u8>),
    /// The requested chunks with their slices in commit order.
    Chunks(Vec<(u64, Vec<Slice>)>),
}

/// Outcome of [`crate::MetaEngine::commit_slices`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    pub attr: Attr,
    /// (chunk, number of stored objects its slices now read from, a hole counting as one) for
    /// each chunk written to: callers compact chunks that grow fragmented. (A compacted chunk
    /// is one object, read by one slice per run of data.)
    pub chunk_slices: Vec<(u64, usize)>,
}

/// Outcome of [`crate::MetaEngine::copy_range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiedRange {
    /// Bytes copied (the request clipped to the source's size).
    pub len: u64,
    /// The destination's new attributes and the slice count of each chunk written to.
    pub committed: Committed,
}

/// Slice references of a volume from one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceReferences {
    /// (id, stored size) of every slice a chunk references.
    pub live: Vec<(u64, u32)>,
    /// Ids of garbage slices (including pending uploads).
    pub garbage: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(i64),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<i64>,
}

impl SetAttr {
    /// Applies `later` on top: each field it sets wins.
    pub fn merge(&mut self, later: &SetAttr) {
        self.perm = later.perm.or(self.perm);
        self.uid = later.uid.or(self.uid);
        self.gid = later.gid.or(self.gid);
        self.atime = later.atime.or(self.atime);
        self.mtime = later.mtime.or(self.mtime);
        self.ctime = later.ctime.or(self.ctime);
    }

    pub fn is_empty(&self) -> bool {
        *self == SetAttr::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    /// Symlink target (only for `FileKind::Symlink`).
    pub target: Vec<u8>,
}

/// A piece of a chunk: `len` bytes at position `pos` of the chunk, taken from offset `off` of the
/// stored slice `id` (whose whole stored length is `size`). Id 0 is a hole that reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub id: u64,
    pub size: u32,
    pub off: u32,
    pub len: u32,
    pub pos: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GarbageSlice {
    pub id: u64,
    pub size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
    pub cookie: u64,
    pub attr: Option<Attr>,
    /// Whether the inode has extended attributes; read with the attributes only (`plus`).
    pub xattrs: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

#[derive(Clone, Debug)]
pub struct Rename<'a> {
    pub src_parent: Ino,
    pub src_name: &'a [u8],
    pub dst_parent: Ino,
    pub dst_name: &'a [u8],
    pub mode: RenameMode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenameOutcome {
    pub moved: Ino,
    /// The inode that was at the destination (replaced or exchanged), if any.
    pub replaced: Option<Ino>,
}

/// What a volume holds, from counters kept in the transactions that change it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes the files really hold (see [`held_blocks`]): not their sizes, so a sparse file
    /// counts only its data. Inline files count their stored bytes; directories and symlinks 0.
    pub bytes: u64,
    /// Inodes other than the root directory.
    pub inodes: u64,
}

/// `st_blocks` of a file holding `held` bytes.
pub fn held_blocks(held: u64) -> u64 {
    held.div_ceil(512)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    /// XATTR_CREATE: fail with EEXIST if present.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if absent.
    Replace,
}

/// Format-time parameters of a volume; fixed once formatted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: String,
    pub chunk_size: u64,
    pub block_size: u64,
    pub inline_threshold: u64,
    pub created_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub host: String,
    pub pid: u32,
    pub mount_point: String,
    pub now_ns: i64,
}

/// Who holds a lock: the session plus the kernel's lock owner (per open file description for
/// flock, per process for POSIX locks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockOwner {
    pub session: SessionId,
    pub owner: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A POSIX byte range `[start, end]` (inclusive; `end == u64::MAX` means to end of file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRange {
    pub start: u64,
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
}

/// Longest name of a directory entry (NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest xattr name (XATTR_NAME_MAX) and value (XATTR_SIZE_MAX).
pub const MAX_XATTR_NAME_LEN: usize = 255;
pub const MAX_XATTR_VALUE_LEN: usize = 64 << 10;

/// The errno for a name a new directory entry may not take: ENAMETOOLONG past
/// [`MAX_NAME_LEN`]; EINVAL when empty, ".", "..", or holding '/' or NUL.
pub fn invalid_name(name: &[u8]) -> Option<i32> {
    if name.len() > MAX_NAME_LEN {
        return Some(libc::ENAMETOOLONG);
    }
    let reserved = name == b"." || name == b"..";
    if name.is_empty() || reserved || name.contains(&b'/') || name.contains(&0) {
        return Some(libc::EINVAL);
    }
    None
}

/// One committed metadata change, from the volume's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Log position; assigned in commit order.
    pub seq: u64,
    /// [`crate::MetaEngine::origin`] of the engine instance that committed it.
    pub origin: u64,
    /// Inode whose attributes, data or links changed (0 if none). For an entry change, the
    /// inode the entry names (after the change; before it for a removed entry).
    pub ino: Ino,
    /// (parent, name) of a directory entry added, removed or replaced.
    pub entry: Option<(Ino, Vec<u8>)>,
    /// What the change was, as a watcher of paths sees it.
    pub kind: ChangeKind,
    /// The kind of file the change is about, when the writer knew it.
    pub node: Option<FileKind>,
    /// Of a [`ChangeKind::Renamed`] entry: the (parent, name) it had before.
    pub renamed_from: Option<(Ino, Vec<u8>)>,
}

/// The kind of a logged change (its code is stored in the log's `kind` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Bookkeeping only (link counts, directory times, parent pointers, freed inodes, repairs):
    /// caches must drop it, but no path changed as a user sees it.
    Other,
    /// The entry was added (create, mkdir, symlink, mknod, link).
    Created,
    /// The entry was removed (unlink, rmdir, replaced by a rename).
    Removed,
    /// The entry got its inode by a rename from `renamed_from`.
    Renamed,
    /// The entry was the source of a rename (the `Renamed` change of the destination tells it).
    MovedAway,
    /// The inode's content or attributes changed (a data commit, truncate, chmod, chown, utimes).
    Modified,
}

impl ChangeKind {
    pub fn code(self) -> i64 {
        match self {
            ChangeKind::Other => 0,
            ChangeKind::Created => 1,
            ChangeKind::Removed => 2,
            ChangeKind::Renamed => 3,
            ChangeKind::MovedAway => 4,
            ChangeKind::Modified => 5,
        }
    }

    /// Unknown codes (of a newer binary) read as [`ChangeKind::Other`].
    pub fn from_code(code: i64) -> ChangeKind {
        match code {
            1 => ChangeKind::Created,
            2 => ChangeKind::Removed,
            3 => ChangeKind::Renamed,
            4 => ChangeKind::MovedAway,
            5 => ChangeKind::Modified,
            _ => ChangeKind::Other,
        }
    }
}

/// A change of the log as an event on a path (see [`crate::MetaEngine::path_changes_since`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub seq: u64,
    /// Created, Removed, Renamed or Modified.
    pub kind: ChangeKind,
    /// Absolute path in the volume ("/" is the root); for a rename, the new one.
    pub path: Vec<u8>,
    /// Of a rename: the path before.
    pub old_path: Option<Vec<u8>>,
    pub node: Option<FileKind>,
    /// The inode's attributes when the log was read, if it still exists.
    pub attr: Option<Attr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathChangeBatch {
    /// Events of the changes up to `upto` (the last seq read: changes without a visible path,
    /// such as bookkeeping, are skipped but read).
    Changes { upto: u64, events: Vec<PathChange> },
    /// Changes the caller had not read yet were trimmed from the log.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeBatch {
    Changes(Vec<Change>),
    /// Changes the caller had not read yet were trimmed from the log.
    Lost,
}

/// A volume whose stored objects hold some of this volume's slices: those with ids from the
/// previous ancestor's `below` (0 for the first) up to this one's. A fork shares its origin's
/// objects; ids from the last ancestor's `below` up are the volume's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ancestor {
    pub below: u64,
    pub uuid: String,
    pub volume: String,
}

/// The new volume of [`crate::MetaEngine::fork`].
#[derive(Clone, Debug)]
pub struct ForkSpec {
    pub name: String,
    pub uuid: String,
    /// A snapshot: mounts of it are read-only.
    pub read_only: bool,
    pub now_ns: i64,
}

/// What a fork copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkStats {
    pub inodes: u64,
    pub entries: u64,
    pub slices: u64,
    /// The origin's slices below this id are shared with the fork: its gc keeps their objects
    /// while the fork exists.
    pub frozen_below: u64,
}
