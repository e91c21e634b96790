//! The file operations of the API on an open volume (blocking vfs calls).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellar_vfs::{Attr, FileKind, Ino, RenameMode, SetAttrRequest, Vfs};

use super::path::{resolve, Resolved, VolumePath};
use super::{FileError, FileResult, Lease, API_CTX, OWNER_CTX};

/// Most entries one list call returns.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// Directory entries read per readdir call.
const READDIR_BATCH: usize = 1024;
/// Names with this prefix are reserved: an upload that replaces a file has one for an instant
/// (see [`Upload::replace`]); listings skip them.
const UPLOAD_PREFIX: &str = ".cellar-upload-";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// One file as the API shows it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: String,
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub modified: SystemTime,
    /// A symlink's target.
    pub target: Option<String>,
}

fn entry_of(vfs: &Vfs, path: &VolumePath, attr: &Attr) -> FileResult<Entry> {
    let kind = match attr.kind {
        FileKind::Regular => EntryKind::File,
        FileKind::Directory => EntryKind::Directory,
        FileKind::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    };
    let target = match kind {
        EntryKind::Symlink => Some(
            String::from_utf8_lossy(
                &vfs.readlink(attr.ino)
                    .map_err(|e| FileError::errno(e, path))?,
            )
            .into_owned(),
        ),
        _ => None,
    };
    Ok(Entry {
        path: path.as_string(),
        name: path.name().to_string(),
        kind,
        size: attr.size,
        mode: attr.perm & 0o7777,
        modified: UNIX_EPOCH + Duration::from_nanos(attr.mtime_ns.max(0) as u64),
        target,
    })
}

/// The node at `path` itself (a link is not followed).
pub fn stat(vfs: &Vfs, path: &VolumePath) -> FileResult<Entry> {
    let attr = resolve(vfs, path, false)?.existing(path)?;
    entry_of(vfs, path, &attr)
}

/// A page of a listing and where the next one starts.
pub struct Listing {
    pub entries: Vec<Entry>,
    /// The last path of this page when more may follow.
    pub next_cursor: Option<String>,
}

/// Lists the directory at `path` (with `recursive`, every descendant depth first: each
/// directory followed by its contents), entries of a directory sorted by name, at most `limit`
/// entries after `cursor` (a path a previous page ended with).
pub fn list(
    vfs: &Vfs,
    path: &VolumePath,
    recursive: bool,
    limit: usize,
    cursor: Option<&VolumePath>,
) -> FileResult<Listing> {
    let attr = resolve(vfs, path, false)?.existing(path)?;
    match attr.kind {
        FileKind::Directory => {}
        FileKind::Symlink => {
            return Err(FileError::NotADirectory(format!(
                "{} is a symbolic link: the API does not follow a link a call names",
                path.as_string()
            )))
        }
        _ => {
            return Err(FileError::NotADirectory(format!(
                "{} is not a directory",
                path.as_string()
            )))
        }
    }
    // The cursor's components below `path`; a cursor elsewhere is a client error.
    let after = match cursor {
        None => None,
        Some(cursor) => {
            let below = cursor
                .components()
                .strip_prefix(path.components())
                .filter(|rest| !rest.is_empty() && (recursive || rest.len() == 1));
            match below {
                Some(rest) => Some(rest.to_vec()),
                None => {
                    return Err(FileError::Invalid(format!(
                        "cursor {} is not an entry of this listing of {}",
                        cursor.as_string(),
                        path.as_string()
                    )))
                }
            }
        }
    };
    let mut listing = Listing {
        entries: Vec::new(),
        next_cursor: None,
    };
    let limit = limit.clamp(1, MAX_LIST_LIMIT);
    walk(
        vfs,
        attr.ino,
        path,
        recursive,
        after.as_deref(),
        limit,
        &mut listing.entries,
    )?;
    if listing.entries.len() == limit {
        listing.next_cursor = listing.entries.last().map(|e| e.path.clone());
    }
    Ok(listing)
}

/// Appends the entries of directory `ino` (at `dir`) after `after` (the rest of a cursor
/// relative to `dir`) until `out` holds `limit` entries.
fn walk(
    vfs: &Vfs,
    ino: Ino,
    dir: &VolumePath,
    recursive: bool,
    after: Option<&[String]>,
    limit: usize,
    out: &mut Vec<Entry>,
) -> FileResult<()> {
    for (name, attr) in read_dir(vfs, ino, dir, false)? {
        if out.len() >= limit {
            return Ok(());
        }
        let name = String::from_utf8_lossy(&name).into_owned();
        let path = dir.join(&name);
        // Resuming: skip what a previous page returned; descend along the cursor.
        let mut below = None;
        if let Some((first, rest)) = after.and_then(<[String]>::split_first) {
            match name.as_str().cmp(first.as_str()) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => below = Some(rest),
                std::cmp::Ordering::Greater => {}
            }
        }
        if below.is_none() {
            out.push(entry_of(vfs, &path, &attr)?);
        }
        if recursive && attr.kind == FileKind::Directory {
            let rest = below.filter(|rest| !rest.is_empty());
            match walk(vfs, attr.ino, &path, recursive, rest, limit, out) {
                // Removed while being listed: it is simply not there.
                Err(FileError::NotFound(_)) | Err(FileError::NotADirectory(_)) => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// A directory's entries (without "." and "..", and reserved upload names), sorted by name.
fn read_dir(
    vfs: &Vfs,
    ino: Ino,
    path: &VolumePath,
    with_reserved: bool,
) -> FileResult<Vec<(Vec<u8>, Attr)>> {
    let fh = vfs
        .opendir(&API_CTX, ino, libc::O_RDONLY)
        .map_err(|e| FileError::errno(e, path))?;
    let mut entries = Vec::new();
    let mut read = || -> FileResult<()> {
        let mut offset = 0;
        loop {
            let batch = vfs
                .readdir(ino, fh, offset, READDIR_BATCH, true)
                .map_err(|e| FileError::errno(e, path))?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            offset = last.offset;
            for e in batch {
                if e.name == b"." || e.name == b".." || (!with_reserved && is_upload_name(&e.name))
                {
                    continue;
                }
                let attr = match e.attr {
                    Some(attr) => attr,
                    None => match vfs.getattr(e.ino) {
                        Ok(attr) => attr,
                        // Removed since the directory was read.
                        Err(e) if e.0 == libc::ENOENT => continue,
                        Err(e) => return Err(FileError::errno(e, path)),
                    },
                };
                entries.push((e.name, attr));
            }
        }
    };
    let read = read();
    let _ = vfs.releasedir(ino, fh);
    read?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Creates the directory at `path` (and its missing parents with `parents`). Returns the entry
/// and whether it was created: an existing directory is fine only with `parents`.
pub fn make_dir(
    vfs: &Vfs,
    path: &VolumePath,
    parents: bool,
    mode: u32,
) -> FileResult<(Entry, bool)> {
    let Resolved { parent, name, attr } = resolve(vfs, path, parents)?;
    let existing = match attr {
        Some(attr) => Some(attr),
        None => match vfs.mkdir(&API_CTX, parent, &name, mode, 0) {
            Ok(attr) => return Ok((entry_of(vfs, path, &attr)?, true)),
            Err(e) if e.0 == libc::EEXIST => Some(
                vfs.lookup(&API_CTX, parent, &name)
                    .map_err(|e| FileError::errno(e, path))?,
            ),
            Err(e) => return Err(FileError::errno(e, path)),
        },
    };
    match existing {
        Some(attr) if parents && attr.kind == FileKind::Directory => {
            Ok((entry_of(vfs, path, &attr)?, false))
        }
        _ => Err(FileError::AlreadyExists(path.as_string())),
    }
}

/// Moves `from` to `to` (replacing what is there only with `overwrite`); returns the moved entry.
pub fn rename(vfs: &Vfs, from: &VolumePath, to: &VolumePath, overwrite: bool) -> FileResult<Entry> {
    if from.is_root() || to.is_root() {
        return Err(FileError::Invalid(
            "the volume's root cannot be moved or replaced".into(),
        ));
    }
    let source = resolve(vfs, from, false)?;
    source
        .attr
        .as_ref()
        .ok_or_else(|| FileError::NotFound(from.as_string()))?;
    let target = resolve(vfs, to, false)?;
    if target.attr.is_some() && !overwrite {
        return Err(FileError::AlreadyExists(format!(
            "{} (pass overwrite=true to replace it)",
            to.as_string()
        )));
    }
    let mode = if overwrite {
        RenameMode::Replace
    } else {
        RenameMode::NoReplace
    };
    vfs.rename(
        &API_CTX,
        source.parent,
        &source.name,
        target.parent,
        &target.name,
        mode,
    )
    .map_err(|e| match e.0 {
        libc::EINVAL => FileError::Invalid(format!(
            "{} cannot be moved into itself ({})",
            from.as_string(),
            to.as_string()
        )),
        libc::ENOTEMPTY => FileError::NotEmpty(format!(
            "{} is a directory that is not empty: it cannot be replaced",
            to.as_string()
        )),
        _ => FileError::errno(e, to),
    })?;
    stat(vfs, to)
}

/// Removes the file, link or empty directory at `path`; with `recursive`, a directory and
/// everything in it.
pub fn remove(vfs: &Vfs, path: &VolumePath, recursive: bool) -> FileResult<()> {
    if path.is_root() {
        return Err(FileError::Invalid(
            "the volume's root cannot be deleted (delete its entries, or the volume)".into(),
        ));
    }
    let Resolved { parent, name, attr } = resolve(vfs, path, false)?;
    let attr = attr.ok_or_else(|| FileError::NotFound(path.as_string()))?;
    remove_entry(vfs, parent, &name, &attr, path, recursive)
}

fn remove_entry(
    vfs: &Vfs,
    parent: Ino,
    name: &[u8],
    attr: &Attr,
    path: &VolumePath,
    recursive: bool,
) -> FileResult<()> {
    if attr.kind != FileKind::Directory {
        return vfs
            .unlink(&API_CTX, parent, name)
            .map_err(|e| FileError::errno(e, path));
    }
    if recursive {
        for (child, child_attr) in read_dir(vfs, attr.ino, path, true)? {
            let child_path = path.join(&String::from_utf8_lossy(&child));
            match remove_entry(vfs, attr.ino, &child, &child_attr, &child_path, true) {
                Err(FileError::NotFound(_)) => {}
                other => other?,
            }
        }
    }
    vfs.rmdir(&API_CTX, parent, name)
        .map_err(|e| FileError::errno(e, path))
}

/// Sets the permission bits of the file or directory at `path`.
pub fn set_mode(vfs: &Vfs, path: &VolumePath, mode: u32) -> FileResult<Entry> {
    let attr = resolve(vfs, path, false)?.existing(path)?;
    if attr.kind == FileKind::Symlink {
        return Err(FileError::NotAFile(format!(
            "{} is a symbolic link: a link has no mode of its own",
            path.as_string()
        )));
    }
    let request = SetAttrRequest {
        mode: Some(mode),
        ..SetAttrRequest::default()
    };
    let attr = vfs
        .setattr(&OWNER_CTX, attr.ino, request)
        .map_err(|e| FileError::errno(e, path))?;
    entry_of(vfs, path, &attr)
}

/// A regular file open for reading; closed when dropped.
pub struct Reader {
    vfs: Lease,
    ino: Ino,
    fh: u64,
    path: VolumePath,
}

/// Times a read looks its file up again when the inode it found is gone before the open (a
/// replace that raced it).
const OPEN_ATTEMPTS: usize = 5;

/// Opens the regular file at `path` for reading; returns its attributes as opened.
pub fn open_for_read(vfs: Lease, path: &VolumePath) -> FileResult<(Reader, Attr)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let attr = resolve(&vfs, path, false)?.existing(path)?;
        check_readable(&vfs, path, &attr)?;
        let opened = match vfs.open(&API_CTX, attr.ino, libc::O_RDONLY) {
            Ok(opened) => opened,
            Err(e) if e.0 == libc::ENOENT && attempt < OPEN_ATTEMPTS => continue,
            Err(e) => return Err(FileError::errno(e, path)),
        };
        // The attributes as of the open: a download reads this version's size.
        let attr = vfs.getattr(attr.ino).unwrap_or(attr);
        let reader = Reader {
            ino: attr.ino,
            fh: opened.fh,
            vfs,
            path: path.clone(),
        };
        return Ok((reader, attr));
    }
}

/// Only regular files have content to download.
fn check_readable(vfs: &Vfs, path: &VolumePath, attr: &Attr) -> FileResult<()> {
    match attr.kind {
        FileKind::Regular => Ok(()),
        FileKind::Directory => Err(FileError::IsADirectory(format!(
            "{} is a directory: list it, or download its files",
            path.as_string()
        ))),
        FileKind::Symlink => Err(FileError::NotAFile(format!(
            "{} is a symbolic link (to {}): the API does not follow a link a call names",
            path.as_string(),
            String::from_utf8_lossy(&vfs.readlink(attr.ino).unwrap_or_default())
        ))),
        _ => Err(FileError::NotAFile(format!(
            "{} is not a regular file",
            path.as_string()
        ))),
    }
}

impl Reader {
    /// Up to `len` bytes at `offset` (fewer only at the end of the file).
    pub fn read(&self, offset: u64, len: u32) -> FileResult<Vec<u8>> {
        self.vfs
            .read(self.ino, self.fh, offset, len)
            .map_err(|e| FileError::errno(e, &self.path))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Err(e) = self.vfs.release(self.ino, self.fh, None) {
            tracing::warn!(path = %self.path.as_string(), "closing a download: {e}");
        }
    }
}

/// A file being uploaded: an inode without a name until [`Upload::finish`], so no reader ever
/// sees part of it, and an upload that fails or is dropped leaves nothing behind.
pub struct Upload {
    vfs: Lease,
    ino: Ino,
    fh: u64,
    parent: Ino,
    name: Vec<u8>,
    path: VolumePath,
    overwrite: bool,
    /// Whether a file was there when the upload began.
    pub replaces: bool,
    written: u64,
}

/// Starts an upload to `path` (creating missing parents with `parents`). Fails at once if the
/// path is a directory, or exists and `overwrite` is off.
pub fn begin_upload(
    vfs: Lease,
    path: &VolumePath,
    parents: bool,
    overwrite: bool,
    mode: u32,
) -> FileResult<Upload> {
    let Resolved { parent, name, attr } = resolve(&vfs, path, parents)?;
    match &attr {
        Some(attr) if attr.kind == FileKind::Directory => {
            return Err(FileError::IsADirectory(format!(
                "{} is a directory: a file cannot replace it",
                path.as_string()
            )))
        }
        Some(_) if !overwrite => {
            return Err(FileError::AlreadyExists(format!(
                "{} (pass overwrite=true to replace it)",
                path.as_string()
            )))
        }
        _ => {}
    }
    let temp = temp_name();
    let (created, opened) = vfs
        .create(&API_CTX, parent, temp.as_bytes(), mode, 0, libc::O_WRONLY)
        .map_err(|e| FileError::errno(e, path))?;
    let upload = Upload {
        ino: created.ino,
        fh: opened.fh,
        parent,
        name,
        path: path.clone(),
        overwrite,
        replaces: attr.is_some(),
        written: 0,
        vfs,
    };
    // Open and nameless from now on: the inode lives while the upload holds it open.
    vfs_call(&upload, |vfs| vfs.unlink(&API_CTX, parent, temp.as_bytes()))?;
    Ok(upload)
}

fn vfs_call<T>(
    upload: &Upload,
    call: impl FnOnce(&Vfs) -> cellar_vfs::VfsResult<T>,
) -> FileResult<T> {
    call(&upload.vfs).map_err(|e| FileError::errno(e, &upload.path))
}

impl Upload {
    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> FileResult<()> {
        let mut done = 0;
        while done < data.len() {
            let offset = self.written;
            let n = vfs_call(self, |vfs| {
                vfs.write(self.ino, self.fh, offset, &data[done..])
            })?;
            done += n as usize;
            self.written += u64::from(n);
        }
        Ok(())
    }

    /// Commits the data and gives the file its name in one step: a link under the free name,
    /// or a link under a reserved name renamed over the file there (with `overwrite`).
    pub fn finish(self) -> FileResult<Entry> {
        vfs_call(&self, |vfs| vfs.flush(self.ino, self.fh, 0))?;
        let linked = self.vfs.link(&API_CTX, self.ino, self.parent, &self.name);
        match linked {
            Ok(_) => {}
            Err(e) if e.0 == libc::EEXIST && self.overwrite => self.replace()?,
            Err(e) => return Err(FileError::errno(e, &self.path)),
        }
        let attr = vfs_call(&self, |vfs| vfs.getattr(self.ino))?;
        entry_of(&self.vfs, &self.path, &attr)
    }

    /// Puts the file in place of the one at its name. For the instant between the link and the
    /// rename the complete file also has a reserved name, which listings skip.
    fn replace(&self) -> FileResult<()> {
        let temp = temp_name();
        vfs_call(self, |vfs| {
            vfs.link(&API_CTX, self.ino, self.parent, temp.as_bytes())
        })?;
        let renamed = vfs_call(self, |vfs| {
            vfs.rename(
                &API_CTX,
                self.parent,
                temp.as_bytes(),
                self.parent,
                &self.name,
                RenameMode::Replace,
            )
        });
        if renamed.is_err() {
            let _ = self.vfs.unlink(&API_CTX, self.parent, temp.as_bytes());
        }
        renamed
    }
}

fn temp_name() -> String {
    format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

/// Whether a directory entry is an upload's reserved name.
pub fn is_upload_name(name: &[u8]) -> bool {
    name.starts_with(UPLOAD_PREFIX.as_bytes())
}

impl Drop for Upload {
    fn drop(&mut self) {
        // A failed or abandoned upload: its nameless inode goes with this close.
        if let Err(e) = self.vfs.release(self.ino, self.fh, None) {
            tracing::warn!(path = %self.path.as_string(), "closing an upload: {e}");
        }
    }
}
