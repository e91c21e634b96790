//! Objects as files of a volume (blocking vfs calls): a key `a/b/c` is the regular file
//! `/a/b/c`, a key ending in `/` is a directory (a "directory marker"). Links are never
//! followed and are not objects, so no key reaches outside the volume.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellar_vfs::{Attr, Ctx, Errno, FileKind, Ino, RenameMode, ROOT_INO};
use sha2::{Digest, Sha256};

use crate::VolumeHandle;

/// Names with this prefix are reserved (the file API's uploads use them too): an object being
/// put has one for an instant; listings skip them.
const TEMP_PREFIX: &str = ".cellar-upload-";
/// Directory entries read per readdir call.
const READDIR_BATCH: usize = 1024;
/// Longest name of one path component (the metadata's limit).
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such key")]
    NoSuchKey,
    #[error("{0}")]
    InvalidKey(String),
    /// A key that the tree cannot hold: a prefix of it is an object, or it names a directory.
    #[error("{0}")]
    Conflict(String),
    #[error("the volume's quota is exhausted")]
    Quota,
    /// The volume is a snapshot.
    #[error("the volume is a snapshot, which is read-only")]
    ReadOnly,
    #[error("{0}")]
    Io(Errno),
}

pub type FsResult<T> = Result<T, FsError>;

impl From<Errno> for FsError {
    fn from(e: Errno) -> FsError {
        match e.0 {
            libc::ENOENT | libc::ENOTDIR => FsError::NoSuchKey,
            libc::EDQUOT | libc::ENOSPC => FsError::Quota,
            libc::EROFS => FsError::ReadOnly,
            libc::ENAMETOOLONG => FsError::InvalidKey("a path component is too long".into()),
            _ => FsError::Io(e),
        }
    }
}

/// A checked object key.
#[derive(Clone, Debug)]
pub struct Key {
    /// Path components, the last one the object's name.
    components: Vec<String>,
    /// Ends in `/`: the key names a directory.
    pub dir: bool,
}

impl Key {
    pub fn parse(key: &str) -> FsResult<Key> {
        let dir = key.ends_with('/');
        let trimmed = key.strip_suffix('/').unwrap_or(key);
        if trimmed.is_empty() {
            return Err(FsError::InvalidKey("an empty key names no object".into()));
        }
        let mut components = Vec::new();
        for c in trimmed.split('/') {
            match c {
                "" | "." | ".." => {
                    return Err(FsError::InvalidKey(format!(
                        "key {key:?}: empty, '.' and '..' path segments cannot be files of a volume"
                    )))
                }
                c if c.len() > MAX_NAME_LEN => {
                    return Err(FsError::InvalidKey(format!(
                        "key {key:?}: a segment is longer than {MAX_NAME_LEN} bytes"
                    )))
                }
                c if c.contains('\0') => {
                    return Err(FsError::InvalidKey("a key cannot hold a NUL byte".into()))
                }
                c if c.starts_with(TEMP_PREFIX) => {
                    return Err(FsError::InvalidKey(format!(
                        "names starting with {TEMP_PREFIX} are reserved"
                    )))
                }
                c => components.push(c.to_string()),
            }
        }
        Ok(Key { components, dir })
    }

    fn name(&self) -> &[u8] {
        self.components.last().map_or(&[], |c| c.as_bytes())
    }

    fn parents(&self) -> &[String] {
        &self.components[..self.components.len() - 1]
    }
}

/// What a client sees of an object.
#[derive(Clone, Debug)]
pub struct Meta {
    pub size: u64,
    pub modified: SystemTime,
    pub etag: String,
}

impl Meta {
    fn of(attr: &Attr) -> Meta {
        Meta {
            size: if attr.kind == FileKind::Directory {
                0
            } else {
                attr.size
            },
            modified: UNIX_EPOCH + Duration::from_nanos(attr.mtime_ns.max(0) as u64),
            etag: etag(attr),
        }
    }
}

/// Changes whenever the content may have: not the MD5 of the data (which would mean reading
/// every file written through a mount), but a digest of the inode and its data version.
fn etag(attr: &Attr) -> String {
    let mut h = Sha256::new();
    for n in [attr.ino, attr.size, attr.data_version, attr.mtime_ns as u64] {
        h.update(n.to_le_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The files of one volume, acting as `ctx`.
#[derive(Clone)]
pub struct Objects {
    pub vfs: VolumeHandle,
    pub ctx: Ctx,
}

impl Objects {
    fn lookup(&self, parent: Ino, name: &str) -> FsResult<Option<Attr>> {
        match self.vfs.lookup(&self.ctx, parent, name.as_bytes()) {
            Ok(attr) => Ok(Some(attr)),
            Err(e) if e.0 == libc::ENOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The directories along `components` from the root (root first), or None where one is
    /// missing or not a directory.
    fn dirs(&self, components: &[String]) -> FsResult<Option<Vec<Ino>>> {
        let mut chain = vec![ROOT_INO];
        for c in components {
            match self.lookup(*chain.last().unwrap_or(&ROOT_INO), c)? {
                Some(attr) if attr.kind == FileKind::Directory => chain.push(attr.ino),
                _ => return Ok(None),
            }
        }
        Ok(Some(chain))
    }

    /// The object at `key`: a regular file, or a directory for a key ending in `/`.
    pub fn stat(&self, key: &Key) -> FsResult<(Ino, Meta)> {
        let dirs = self.dirs(key.parents())?.ok_or(FsError::NoSuchKey)?;
        let parent = *dirs.last().unwrap_or(&ROOT_INO);
        let name = key.components.last().map_or("", String::as_str);
        let attr = self.lookup(parent, name)?.ok_or(FsError::NoSuchKey)?;
        let wanted = if key.dir {
            FileKind::Directory
        } else {
            FileKind::Regular
        };
        if attr.kind != wanted {
            return Err(FsError::NoSuchKey);
        }
        Ok((attr.ino, Meta::of(&attr)))
    }

    /// Creates the directories along `components` that are missing.
    fn make_dirs(&self, components: &[String]) -> FsResult<Ino> {
        let mut parent = ROOT_INO;
        for (i, c) in components.iter().enumerate() {
            let attr = match self.lookup(parent, c)? {
                Some(attr) => attr,
                None => match self.vfs.mkdir(&self.ctx, parent, c.as_bytes(), 0o755, 0) {
                    Ok(attr) => attr,
                    Err(e) if e.0 == libc::EEXIST => {
                        self.lookup(parent, c)?.ok_or(FsError::NoSuchKey)?
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            if attr.kind != FileKind::Directory {
                return Err(FsError::Conflict(format!(
                    "{} is an object, so it cannot be a prefix of another",
                    components[..=i].join("/")
                )));
            }
            parent = attr.ino;
        }
        Ok(parent)
    }

    /// `PUT` of a key ending in `/`: the directory (and its parents).
    pub fn put_dir(&self, key: &Key) -> FsResult<Meta> {
        let ino = self.make_dirs(&key.components)?;
        Ok(Meta::of(&self.vfs.getattr(ino)?))
    }

    /// A nameless file that becomes `key` on [`Writer::finish`]; missing parents are created.
    pub fn writer(&self, key: &Key) -> FsResult<Writer> {
        let parent = self.make_dirs(key.parents())?;
        Writer::create(self, parent, key.name().to_vec())
    }

    /// A nameless file that never gets a name (a part of a multipart upload).
    pub fn part_writer(&self) -> FsResult<Writer> {
        Writer::create(self, ROOT_INO, Vec::new())
    }

    /// Opens the file `ino` for reading.
    pub fn open(&self, ino: Ino) -> FsResult<Reader> {
        let opened = self.vfs.open(&self.ctx, ino, libc::O_RDONLY)?;
        Ok(Reader {
            vfs: Arc::clone(&self.vfs),
            ino,
            fh: opened.fh,
        })
    }

    /// Removes the object at `key` (nothing there is fine: S3's delete is idempotent), then the
    /// directories its removal left empty, as S3 has no empty prefixes.
    pub fn delete(&self, key: &Key) -> FsResult<()> {
        let Some(dirs) = self.dirs(key.parents())? else {
            return Ok(());
        };
        let parent = *dirs.last().unwrap_or(&ROOT_INO);
        let removed = if key.dir {
            self.vfs.rmdir(&self.ctx, parent, key.name())
        } else {
            match self.lookup(parent, key.components.last().map_or("", String::as_str))? {
                Some(attr) if attr.kind == FileKind::Regular => {
                    self.vfs.unlink(&self.ctx, parent, key.name())
                }
                _ => return Ok(()),
            }
        };
        match removed {
            Ok(()) => {}
            // Gone already, or a directory that still holds objects: nothing to remove.
            Err(e) if matches!(e.0, libc::ENOENT | libc::ENOTEMPTY | libc::ENOTDIR) => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        }
        for depth in (1..dirs.len()).rev() {
            let name = key.components[depth - 1].as_bytes();
            if self.vfs.rmdir(&self.ctx, dirs[depth - 1], name).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// A directory's entries that can be keys (UTF-8 names of regular files and directories,
    /// not reserved), sorted as their keys sort: a directory's name counts with its `/`.
    fn read_dir(&self, ino: Ino) -> FsResult<Vec<(String, Attr)>> {
        let fh = self.vfs.opendir(&self.ctx, ino, libc::O_RDONLY)?;
        let mut entries = Vec::new();
        let mut read = || -> FsResult<()> {
            let mut offset = 0;
            loop {
                let batch = self.vfs.readdir(ino, fh, offset, READDIR_BATCH, true)?;
                let Some(last) = batch.last() else {
                    return Ok(());
                };
                offset = last.offset;
                for e in batch {
                    let Ok(name) = String::from_utf8(e.name) else {
                        continue;
                    };
                    if name == "." || name == ".." || name.starts_with(TEMP_PREFIX) {
                        continue;
                    }
                    let attr = match e.attr {
                        Some(attr) => attr,
                        None => match self.vfs.getattr(e.ino) {
                            Ok(attr) => attr,
                            Err(e) if e.0 == libc::ENOENT => continue,
                            Err(e) => return Err(e.into()),
                        },
                    };
                    match attr.kind {
                        FileKind::Directory => entries.push((format!("{name}/"), attr)),
                        FileKind::Regular => entries.push((name, attr)),
                        _ => {}
                    }
                }
            }
        };
        let read = read();
        let _ = self.vfs.releasedir(ino, fh);
        read?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Up to `max` objects and common prefixes in key order (see [`List`]), and whether more
    /// follow.
    pub fn list(&self, list: &List<'_>, max: usize) -> FsResult<(Vec<Listed>, bool)> {
        let (base, rest) = match list.prefix.rfind('/') {
            Some(i) => list.prefix.split_at(i + 1),
            None => ("", list.prefix),
        };
        let components: Vec<String> = base
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        let mut out = Lister {
            list,
            max,
            items: Vec::new(),
            truncated: false,
        };
        if components.iter().any(|c| c == "." || c == "..") || max == 0 {
            return Ok((out.items, false));
        }
        let Some(dirs) = self.dirs(&components)? else {
            return Ok((out.items, false));
        };
        let ino = *dirs.last().unwrap_or(&ROOT_INO);
        self.walk(ino, base, Some(rest), &mut out)?;
        Ok((out.items, out.truncated))
    }

    /// Lists directory `ino` (whose keys start with `dir`); at the top of a listing only the
    /// names starting with `first`.
    fn walk(&self, ino: Ino, dir: &str, first: Option<&str>, out: &mut Lister<'_>) -> FsResult<()> {
        let entries = match self.read_dir(ino) {
            Ok(entries) => entries,
            // Removed while being listed.
            Err(FsError::NoSuchKey) => return Ok(()),
            Err(e) => return Err(e),
        };
        if entries.is_empty() && !dir.is_empty() && first.is_none_or(str::is_empty) {
            // An empty directory is a directory marker.
            out.object(dir, &self.vfs.getattr(ino)?);
            return Ok(());
        }
        for (name, attr) in entries {
            if out.truncated {
                return Ok(());
            }
            if first.is_some_and(|first| !name.starts_with(first)) {
                continue;
            }
            let key = format!("{dir}{name}");
            if attr.kind != FileKind::Directory {
                out.object(&key, &attr);
            } else if out.list.delimiter == Some("/") && key.len() > out.list.prefix.len() {
                // Rolled up at once: every key below has the common prefix `key`.
                out.prefix(&key);
            } else if out.may_hold(&key) {
                self.walk(attr.ino, &key, None, out)?;
            }
        }
        Ok(())
    }
}

/// A ListObjects request.
pub struct List<'a> {
    pub prefix: &'a str,
    pub delimiter: Option<&'a str>,
    /// Keys up to this one (a start-after key or a continuation token) are skipped.
    pub after: Option<&'a str>,
    /// Only keys under this prefix are shown (a credential's scope).
    pub scope: &'a str,
}

pub enum Listed {
    Object { key: String, meta: Meta },
    Prefix(String),
}

impl Listed {
    pub fn key(&self) -> &str {
        match self {
            Listed::Object { key, .. } | Listed::Prefix(key) => key,
        }
    }
}

struct Lister<'a> {
    list: &'a List<'a>,
    max: usize,
    items: Vec<Listed>,
    truncated: bool,
}

impl Lister<'_> {
    fn push(&mut self, item: Listed) {
        if self.items.len() == self.max {
            self.truncated = true;
        } else {
            self.items.push(item);
        }
    }

    fn after_marker(&self, key: &str) -> bool {
        self.list.after.is_none_or(|after| key > after)
    }

    fn object(&mut self, key: &str, attr: &Attr) {
        if !key.starts_with(self.list.prefix)
            || !key.starts_with(self.list.scope)
            || !self.after_marker(key)
        {
            return;
        }
        // A delimiter other than '/' rolls keys up here: they arrive in order, so keys with the
        // same common prefix are next to each other.
        if let Some(delimiter) = self.list.delimiter.filter(|d| !d.is_empty()) {
            let tail = &key[self.list.prefix.len()..];
            if let Some(i) = tail.find(delimiter) {
                let common = &key[..self.list.prefix.len() + i + delimiter.len()];
                if self.items.last().is_none_or(|last| last.key() != common) {
                    self.prefix(common);
                }
                return;
            }
        }
        self.push(Listed::Object {
            key: key.to_string(),
            meta: Meta::of(attr),
        });
    }

    fn prefix(&mut self, common: &str) {
        if (common.starts_with(self.list.scope) || self.list.scope.starts_with(common))
            && self.after_marker(common)
        {
            self.push(Listed::Prefix(common.to_string()));
        }
    }

    /// Whether the directory with key `dir` may hold keys this listing shows.
    fn may_hold(&self, dir: &str) -> bool {
        let scoped = dir.starts_with(self.list.scope) || self.list.scope.starts_with(dir);
        // Every key below `dir` sorts before `after` unless `after` itself is below `dir`.
        let past = self
            .list
            .after
            .is_some_and(|after| *dir < *after && !after.starts_with(dir));
        scoped && !past
    }
}

/// A file open for reading; closed when dropped.
pub struct Reader {
    vfs: VolumeHandle,
    ino: Ino,
    fh: u64,
}

impl Reader {
    /// Up to `len` bytes at `offset` (fewer only at the end of the file).
    pub fn read(&self, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        Ok(self.vfs.read(self.ino, self.fh, offset, len)?)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.vfs.release(self.ino, self.fh, None);
    }
}

/// A file being written: an inode without a name until [`Writer::finish`], so no reader ever
/// sees part of it, and one that is dropped unfinished leaves nothing behind.
pub struct Writer {
    objects: Objects,
    ino: Ino,
    fh: u64,
    parent: Ino,
    name: Vec<u8>,
    pub written: u64,
}

impl Writer {
    fn create(objects: &Objects, parent: Ino, name: Vec<u8>) -> FsResult<Writer> {
        let temp = temp_name();
        let (attr, opened) = objects.vfs.create(
            &objects.ctx,
            parent,
            temp.as_bytes(),
            0o644,
            0,
            libc::O_RDWR,
        )?;
        let writer = Writer {
            objects: objects.clone(),
            ino: attr.ino,
            fh: opened.fh,
            parent,
            name,
            written: 0,
        };
        // Open and nameless from now on: the inode lives while this handle is open.
        objects.vfs.unlink(&objects.ctx, parent, temp.as_bytes())?;
        Ok(writer)
    }

    pub fn write(&mut self, data: &[u8]) -> FsResult<()> {
        let mut done = 0;
        while done < data.len() {
            let n = self
                .objects
                .vfs
                .write(self.ino, self.fh, self.written, &data[done..])?;
            done += n as usize;
            self.written += u64::from(n);
        }
        Ok(())
    }

    /// Commits what was written (a part is then ready to be copied by reference).
    pub fn commit(&self) -> FsResult<()> {
        Ok(self.objects.vfs.flush(self.ino, self.fh, 0)?)
    }

    /// Appends the content of `part` by reference to its blocks (no data is copied).
    pub fn append(&mut self, part: &Writer) -> FsResult<()> {
        let mut copied = 0;
        while copied < part.written {
            let n = self.objects.vfs.copy_file_range(
                part.ino,
                part.fh,
                copied,
                self.ino,
                self.fh,
                self.written,
                part.written - copied,
            )?;
            if n == 0 {
                return Err(FsError::Io(Errno(libc::EIO)));
            }
            copied += n;
            self.written += n;
        }
        Ok(())
    }

    /// Commits the data and gives the file its name in one step: a link under a free name, or
    /// a link under a reserved name renamed over the file there.
    pub fn finish(self) -> FsResult<Meta> {
        let vfs = &self.objects.vfs;
        let ctx = &self.objects.ctx;
        self.commit()?;
        match vfs.link(ctx, self.ino, self.parent, &self.name) {
            Ok(_) => {}
            Err(e) if e.0 == libc::EEXIST => {
                let existing = vfs.lookup(ctx, self.parent, &self.name)?;
                if existing.kind == FileKind::Directory {
                    return Err(FsError::Conflict(
                        "the key names a directory that holds objects".into(),
                    ));
                }
                let temp = temp_name();
                vfs.link(ctx, self.ino, self.parent, temp.as_bytes())?;
                let renamed = vfs.rename(
                    ctx,
                    self.parent,
                    temp.as_bytes(),
                    self.parent,
                    &self.name,
                    RenameMode::Replace,
                );
                if renamed.is_err() {
                    let _ = vfs.unlink(ctx, self.parent, temp.as_bytes());
                }
                renamed?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Meta::of(&vfs.getattr(self.ino)?))
    }

    /// The identity a part is answered with.
    pub fn etag(&self) -> FsResult<String> {
        Ok(etag(&self.objects.vfs.getattr(self.ino)?))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Unfinished: the nameless inode goes with this close.
        if let Err(e) = self.objects.vfs.release(self.ino, self.fh, None) {
            tracing::warn!("closing an object being written: {e}");
        }
    }
}

fn temp_name() -> String {
    format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_paths_and_bad_segments_are_refused() {
        let k = Key::parse("a/b/c").unwrap();
        assert_eq!(k.components, ["a", "b", "c"]);
        assert!(!k.dir);
        let d = Key::parse("a/b/").unwrap();
        assert_eq!(d.components, ["a", "b"]);
        assert!(d.dir);
        for bad in [
            "",
            "/",
            "a//b",
            "/a",
            "a/./b",
            "a/../b",
            "..",
            ".cellar-upload-x",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Key::parse(&"x".repeat(256)).is_err());
    }
}
