//! A bounded shutdown, and the spool that keeps what it could not flush.
//!
//! At unmount every dirty file is flushed until the shutdown bound has passed (each try is
//! itself bounded by the store's operation timeout); what could not be flushed (the store is
//! down, or the bound ran out) is written to the spool, one file per inode under
//! `{spool_dir}/{volume uuid}/{ino}.spool`, synced, and reported. The next mount of the volume
//! that finds the spool directory replays it before serving: each file's writes are applied and
//! flushed if the inode still has the content they were written on (its data version is the
//! one spooled); if it changed (another mount wrote it) or is gone, the spool file is kept as
//! `{ino}.conflict` and logged, never applied over newer data.
//!
//! Spool file: the line `cellar-spool 2 {ino} {data_version} {extents}\n`, the line of the
//! attribute changes still pending (`FileData::pending_attr`: perm uid gid atime mtime ctime,
//! each a number, `now` or `-` when unchanged), then per extent its offset and length (u64 LE
//! each) and bytes, in write order, then the CRC-32 of all that. Version 1 files (no attribute
//! line) are still read.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cellar_meta::{Ino, SetAttr, TimeSet};

use crate::volume::Inner;
use crate::Ctx;

/// What a shutdown could not flush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unflushed {
    pub ino: Ino,
    /// Bytes of buffered writes not in the store.
    pub bytes: u64,
    /// Where they were kept (`None`: no spool directory, or writing it failed: lost).
    pub spooled: Option<PathBuf>,
}

/// What replaying the spool at mount did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Inodes whose spooled writes were applied (and flushed, unless the store failed again).
    pub applied: Vec<Ino>,
    /// Spool files kept aside (`*.conflict`): the inode changed or vanished since.
    pub conflicts: Vec<PathBuf>,
}

const MAGIC: &str = "cellar-spool";
const VERSION: u32 = 2;

impl Inner {
    /// Flushes every dirty inode (none is tried once `bound` has passed), stops the background
    /// threads, spools what is still dirty (if `spool_dir` is given) and closes the session.
    /// Idempotent. Returns what could not be flushed.
    pub(crate) fn shutdown_within(
        &self,
        bound: Duration,
        spool_dir: Option<&Path>,
    ) -> anyhow::Result<Vec<Unflushed>> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let deadline = Instant::now().checked_add(bound);
        let files = self.registry.all_files();
        for file in &files {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                tracing::error!(
                    ino = file.ino,
                    bound_secs = bound.as_secs_f64(),
                    "the shutdown bound has passed: not flushing the file"
                );
            } else if let Err(e) = self.flush_file(file) {
                tracing::error!(ino = file.ino, error = %e, "could not flush a file at shutdown");
            }
        }
        // Nothing flushes once the background threads are gone: what is dirty now stays so.
        self.stopper.stop();
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        let mut unflushed = Vec::new();
        for file in &files {
            let (extents, bytes, attrs) = {
                let d = file.data.lock();
                let extents: Vec<(u64, Vec<u8>)> = d
                    .inflight
                    .iter()
                    .flat_map(|segment| &segment.extents)
                    .map(|run| (run.offset, run.data.to_vec()))
                    .chain(d.buffer.iter().map(|e| (e.offset, e.data.clone())))
                    .collect();
                let bytes = extents
                    .iter()
                    .map(|(_, data)| data.len() as u64)
                    .sum::<u64>();
                (extents, bytes, d.pending_attr.clone())
            };
            if extents.is_empty() && attrs.is_empty() {
                continue;
            }
            let spooled = spool_dir.and_then(|dir| match self.spool(dir, file.ino, &extents, &attrs) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::error!(ino = file.ino, error = %format!("{e:#}"), "could not spool unflushed writes");
                    None
                }
            });
            tracing::error!(
                ino = file.ino,
                bytes,
                spooled = ?spooled,
                "unflushed writes at shutdown"
            );
            unflushed.push(Unflushed {
                ino: file.ino,
                bytes,
                spooled,
            });
        }
        self.core
            .meta
            .close_session(self.session())
            .context("closing the metadata session")?;
        Ok(unflushed)
    }

    fn volume_spool(&self, dir: &Path) -> PathBuf {
        dir.join(&self.core.volume.uuid)
    }

    /// Writes one inode's unflushed writes durably to the spool; returns the file.
    fn spool(
        &self,
        dir: &Path,
        ino: Ino,
        extents: &[(u64, Vec<u8>)],
        attrs: &SetAttr,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.volume_spool(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let body = encode(
            ino,
            self.core.meta.getattr(ino)?.data_version,
            extents,
            attrs,
        );
        let path = dir.join(format!("{ino}.spool"));
        let staging = dir.join(format!("{ino}.spool.tmp"));
        let mut file = File::create(&staging)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&staging, &path)?;
        File::open(&dir)?.sync_all()?;
        Ok(path)
    }

    /// Applies the spool of this volume found under `dir` (see the module comment).
    pub(crate) fn replay_spool(&self, dir: &Path) -> anyhow::Result<Replayed> {
        let dir = self.volume_spool(dir);
        let mut replayed = Replayed::default();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(replayed),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|ext| ext != "spool") {
                continue;
            }
            let Spooled {
                ino,
                version,
                extents,
                attrs,
            } = match parse(&std::fs::read(&path)?) {
                Ok(parsed) => parsed,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "a spool file does not parse");
                    replayed.conflicts.push(set_aside(&path)?);
                    continue;
                }
            };
            let current = self.core.meta.getattr(ino).ok();
            if current.is_none_or(|attr| attr.data_version != version) {
                tracing::error!(
                    ino,
                    path = %path.display(),
                    "the file changed or was removed since its writes were spooled: kept aside, not applied"
                );
                replayed.conflicts.push(set_aside(&path)?);
                continue;
            }
            self.apply(ino, &extents, &attrs)
                .with_context(|| format!("replaying {}", path.display()))?;
            // The writes are this mount's buffered writes now: flushed, or spooled again.
            std::fs::remove_file(&path)?;
            tracing::info!(ino, extents = extents.len(), "replayed spooled writes");
            replayed.applied.push(ino);
        }
        Ok(replayed)
    }

    fn apply(&self, ino: Ino, extents: &[(u64, Vec<u8>)], attrs: &SetAttr) -> anyhow::Result<()> {
        let root = Ctx {
            uid: 0,
            gid: 0,
            pid: std::process::id(),
        };
        let handle = self.open(&root, ino, libc::O_WRONLY)?;
        let written: anyhow::Result<()> = extents.iter().try_for_each(|(offset, data)| {
            self.write(handle.fh, *offset, data)?;
            Ok(())
        });
        // Pending again, as they were at shutdown: the flush commits them after the writes.
        if !attrs.is_empty() {
            let opened = self.registry.handle(handle.fh)?;
            let mut d = opened.file()?.data.lock();
            d.pending_attr.merge(attrs);
            d.pending_attr_gen += 1;
        }
        let synced = written.and_then(|()| Ok(self.fsync(handle.fh)?));
        if let Err(e) = &synced {
            tracing::warn!(ino, error = %format!("{e:#}"), "spooled writes applied but not flushed yet");
        }
        self.release(ino, handle.fh, None)?;
        Ok(())
    }
}

fn set_aside(path: &Path) -> anyhow::Result<PathBuf> {
    let aside = path.with_extension("conflict");
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

type Extents = Vec<(u64, Vec<u8>)>;

/// One parsed spool file.
#[derive(Debug, PartialEq, Eq)]
struct Spooled {
    ino: Ino,
    version: u64,
    extents: Extents,
    attrs: SetAttr,
}

fn encode(ino: Ino, version: u64, extents: &[(u64, Vec<u8>)], attrs: &SetAttr) -> Vec<u8> {
    let number = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    let time = |t: Option<TimeSet>| match t {
        None => "-".to_string(),
        Some(TimeSet::Now) => "now".to_string(),
        Some(TimeSet::At(ns)) => ns.to_string(),
    };
    let mut body = format!(
        "{MAGIC} {VERSION} {ino} {version} {}\n{} {} {} {} {} {}\n",
        extents.len(),
        number(attrs.perm.map(i64::from)),
        number(attrs.uid.map(i64::from)),
        number(attrs.gid.map(i64::from)),
        time(attrs.atime),
        time(attrs.mtime),
        number(attrs.ctime),
    )
    .into_bytes();
    for (offset, data) in extents {
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&(data.len() as u64).to_le_bytes());
        body.extend_from_slice(data);
    }
    body.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    body
}

/// The next line of `body` (without its newline) and what follows it.
fn line(body: &[u8]) -> anyhow::Result<(&str, &[u8])> {
    let newline = body.iter().position(|&b| b == b'\n').context("no header")?;
    Ok((std::str::from_utf8(&body[..newline])?, &body[newline + 1..]))
}

fn parse_attrs(line: &str) -> anyhow::Result<SetAttr> {
    fn number<T: std::str::FromStr>(field: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(match field {
            "-" => None,
            v => Some(v.parse()?),
        })
    }
    let time = |field: &str| -> anyhow::Result<Option<TimeSet>> {
        Ok(match field {
            "now" => Some(TimeSet::Now),
            v => number(v)?.map(TimeSet::At),
        })
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [perm, uid, gid, atime, mtime, ctime] = fields[..] else {
        bail!("bad attribute line");
    };
    Ok(SetAttr {
        perm: number(perm)?,
        uid: number(uid)?,
        gid: number(gid)?,
        atime: time(atime)?,
        mtime: time(mtime)?,
        ctime: number(ctime)?,
    })
}

fn parse(file: &[u8]) -> anyhow::Result<Spooled> {
    let Some((body, crc)) = file.split_last_chunk::<4>() else {
        bail!("too short");
    };
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        bail!("checksum mismatch");
    }
    let (header, mut rest) = line(body)?;
    let fields: Vec<&str> = header
        .strip_prefix(MAGIC)
        .context("not a spool file")?
        .split_whitespace()
        .collect();
    let [format, ino, version, count] = fields[..] else {
        bail!("bad header");
    };
    let attrs = match format {
        "1" => SetAttr::default(),
        "2" => {
            let (attrs, tail) = line(rest)?;
            rest = tail;
            parse_attrs(attrs)?
        }
        other => bail!("spool format {other} is newer than this binary"),
    };
    let (ino, version, count): (Ino, u64, usize) = (ino.parse()?, version.parse()?, count.parse()?);
    let mut extents = Vec::with_capacity(count);
    for _ in 0..count {
        let (offset, tail) = rest.split_first_chunk::<8>().context("truncated")?;
        let (len, tail) = tail.split_first_chunk::<8>().context("truncated")?;
        let len = usize::try_from(u64::from_le_bytes(*len))?;
        anyhow::ensure!(tail.len() >= len, "truncated");
        extents.push((u64::from_le_bytes(*offset), tail[..len].to_vec()));
        rest = &tail[len..];
    }
    anyhow::ensure!(rest.is_empty(), "trailing bytes");
    Ok(Spooled {
        ino,
        version,
        extents,
        attrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_files_round_trip_and_damage_is_refused() {
        let extents = vec![
            (0, b"hello".to_vec()),
            (1 << 20, vec![7; 1000]),
            (3, Vec::new()),
        ];
        let attrs = SetAttr {
            perm: Some(0o600),
            gid: Some(7),
            atime: Some(TimeSet::Now),
            mtime: Some(TimeSet::At(-5)),
            ctime: Some(1_700_000_000_000_000_000),
            ..SetAttr::default()
        };
        let body = encode(42, 9, &extents, &attrs);
        let spooled = Spooled {
            ino: 42,
            version: 9,
            extents,
            attrs,
        };
        assert_eq!(parse(&body).unwrap(), spooled);
        // A spool file of the previous format (no attribute line) still replays.
        let (_, after_header) = line(&body).unwrap();
        let (_, data) = line(after_header).unwrap();
        let mut old = format!("{MAGIC} 1 42 9 3\n").into_bytes();
        old.extend_from_slice(&data[..data.len() - 4]);
        old.extend_from_slice(&crc32fast::hash(&old).to_le_bytes());
        let parsed = parse(&old).unwrap();
        assert_eq!(parsed.extents, spooled.extents);
        assert!(parsed.attrs.is_empty());
        let mut flipped = body.clone();
        flipped[30] ^= 1;
        assert!(parse(&flipped).is_err());
        assert!(parse(&body[..body.len() - 1]).is_err());
        assert!(parse(b"").is_err());
    }
}
