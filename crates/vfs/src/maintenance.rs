//! Offline maintenance on a volume that may or may not be mounted elsewhere: format, fsck, gc,
//! destroy. Called by `cellar fsck`/`cellar gc` and by the server (from its blocking pool).

use std::time::Duration;

use anyhow::Context;
pub use cellar_meta::ForkStats;
use cellar_meta::{ForkSpec, SessionInfo};
use cellar_store::BlockStore;

use crate::backend::{now_ns, open_meta, Core};
use crate::volume::{gc_grace, STALE_SESSION_AGE};
use crate::VolumeConfig;

/// Bound on compaction passes of one gc run (each pass empties the fragmented list it saw).
const MAX_COMPACTION_PASSES: usize = 100;
const COMPACT_PER_PASS: usize = 1000;
/// `cellar gc` is asked for explicitly: it compacts chunks far less fragmented than the mounts'
/// by-need threshold.
const GC_COMPACT_MIN_SLICES: usize = 16;
/// The lease that makes one client at a time the volume's compactor and garbage collector.
pub(crate) const MAINTENANCE_LEASE: &str = "maintenance";

/// What a volume holds and may hold (see [`usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Bytes the files really hold (a sparse file counts its data only).
    pub bytes: u64,
    /// Files, directories, symlinks and other inodes, the root directory not counted.
    pub files: u64,
    pub quota_bytes: Option<u64>,
    /// Bytes of stored objects that only this volume references (no fork or snapshot shares
    /// them): what deleting it frees. Less than `bytes` when it shares data.
    pub exclusive_bytes: u64,
}

/// The volume's usage counters and quota, read from its metadata alone (no store, no tree
/// walk; PostgreSQL volumes share this process's pool). An unformatted volume holds nothing.
pub fn usage(config: &VolumeConfig) -> anyhow::Result<VolumeUsage> {
    let (meta, volume) = open_meta(config)?;
    let (usage, exclusive_bytes) = match volume {
        Some(_) => (
            meta.usage().context("reading the volume's usage")?,
            meta.exclusive_bytes()
                .context("reading the volume's exclusive bytes")?,
        ),
        None => (cellar_meta::Usage::default(), 0),
    };
    Ok(VolumeUsage {
        bytes: usage.bytes,
        files: usage.inodes,
        quota_bytes: meta.quota().context("reading the volume's quota")?,
        exclusive_bytes,
    })
}

/// Sets (or, with `None`, removes) the volume's byte quota in its metadata: every mount, on
/// every host, enforces it within about a second, without remounting. May precede the
/// volume's formatting.
pub fn set_quota(config: &VolumeConfig, bytes: Option<u64>) -> anyhow::Result<()> {
    let (meta, _) = open_meta(config)?;
    meta.set_quota(bytes).context("storing the volume's quota")
}

/// Formats a new volume (metadata + store probe) without mounting it; idempotent.
pub fn format(config: &VolumeConfig) -> anyhow::Result<()> {
    Core::open(config, true).map(drop)
}

/// Makes `target` (a new volume: its metadata must not exist, or be the leftover of an
/// interrupted fork of the same name, which is replaced) a fork of `origin` (a volume or a
/// snapshot): a copy of its committed metadata, in one transaction, that shares every stored
/// object with it; `read_only` makes a snapshot. Takes time in the number of files, not bytes.
pub fn fork(
    origin: &VolumeConfig,
    target: &VolumeConfig,
    read_only: bool,
) -> anyhow::Result<ForkStats> {
    let (meta, volume) = open_meta(origin)?;
    anyhow::ensure!(
        volume.is_some(),
        "volume {:?} is not formatted",
        origin.volume
    );
    cellar_meta::destroy(&target.meta_url).context("removing an interrupted fork's metadata")?;
    let spec = ForkSpec {
        name: target.volume.clone(),
        uuid: uuid::Uuid::new_v4().to_string(),
        read_only,
        now_ns: now_ns(),
    };
    meta.fork(&target.meta_url, &spec)
        .with_context(|| format!("forking volume {:?}", origin.volume))
}

/// Forgets the fork named `fork` of `origin` (the fork is being deleted): the origin's gc may
/// then delete the objects only the fork kept. Nothing to forget is no error.
pub fn release_fork(origin: &VolumeConfig, fork: &str) -> anyhow::Result<()> {
    let (meta, volume) = open_meta(origin)?;
    if volume.is_some() {
        meta.release_fork(fork)
            .with_context(|| format!("releasing fork {fork:?} of volume {:?}", origin.volume))?;
    }
    Ok(())
}

/// The forks and snapshots of a volume that still share its objects (none if it is gone).
pub fn forks(config: &VolumeConfig) -> anyhow::Result<Vec<String>> {
    let (meta, volume) = open_meta(config)?;
    match volume {
        Some(_) => Ok(meta.forks().context("listing the volume's forks")?),
        None => Ok(Vec::new()),
    }
}

/// `cellar fsck`: metadata invariants plus metadata ↔ objects consistency (missing objects of
/// live slices; leaked objects that no slice references, older than the gc grace). With
/// `repair`, fixes what it can — but only while no mount of the volume is live, unless `force`
/// (a live mount may be writing what looks inconsistent from outside).
pub fn fsck(config: &VolumeConfig, repair: bool, force: bool) -> anyhow::Result<Vec<String>> {
    let core = Core::open(config, false)?;
    let live = core
        .meta
        .live_sessions(STALE_SESSION_AGE.as_nanos() as i64)
        .context("listing live sessions")?;
    let repair_now = repair && (live.is_empty() || force);
    let mut problems = core
        .meta
        .check(repair_now)
        .context("checking the metadata")?;
    if repair && !repair_now {
        problems.push(format!(
            "repair refused: {} live mount session(s) of the volume may be writing; unmount them or pass --force",
            live.len()
        ));
    }
    // Listed before the references are read (see `Core::leaked_objects`).
    let objects = core.list_objects()?;
    let mut blocks: std::collections::HashSet<(u64, u32, u32)> = objects
        .iter()
        .filter_map(|o| BlockStore::parse_block_key(&o.key))
        .collect();
    // A fork's inherited slices are checked against its ancestors' objects.
    blocks.extend(
        core.runtime
            .block_on(core.store.inherited_blocks())
            .context("listing the ancestors' objects")?,
    );
    for o in objects
        .iter()
        .filter(|o| BlockStore::parse_block_key(&o.key).is_none())
    {
        problems.push(format!("object {} is not a block of this volume", o.key));
    }
    let block_size = core.volume.block_size;
    for (id, size) in core.meta.slice_references()?.live {
        for index in 0..core.block_count(size) {
            let len = (u64::from(size) - index * block_size).min(block_size) as u32;
            if !blocks.contains(&(id, index as u32, len)) {
                problems.push(format!("slice {id}: block {index} ({len} bytes) is missing from the object store; files using it read EIO"));
            }
        }
    }
    let before = now_ns().saturating_sub(gc_grace().as_nanos() as i64);
    let leaked = core.leaked_objects(&objects, before)?;
    for o in &leaked {
        problems.push(format!(
            "object {} ({} bytes) is leaked: no slice references it",
            o.key, o.size
        ));
    }
    if repair_now && !leaked.is_empty() {
        let deleted = core.delete_objects(&leaked);
        problems.push(format!("repair: deleted {deleted} leaked object(s)"));
    }
    Ok(problems)
}

/// `cellar gc`: compacts fragmented chunks and deletes garbage objects older than the grace
/// period (and, with `delete_leaked`, objects no slice references that are older than it too),
/// holding the volume's maintenance lease. Returns (deleted objects, compacted chunks).
pub fn gc(
    config: &VolumeConfig,
    grace: Duration,
    delete_leaked: bool,
) -> anyhow::Result<(u64, u64)> {
    let core = Core::open(config, false)?;
    let session = core.meta.open_session(&SessionInfo {
        host: crate::volume::host_name(),
        pid: std::process::id(),
        mount_point: "(cellar gc)".into(),
        now_ns: now_ns(),
    })?;
    let outcome = gc_with_lease(&core, session, grace, delete_leaked);
    core.meta.close_session(session)?;
    outcome
}

fn gc_with_lease(
    core: &Core,
    session: cellar_meta::SessionId,
    grace: Duration,
    delete_leaked: bool,
) -> anyhow::Result<(u64, u64)> {
    let lease = (STALE_SESSION_AGE * 2).as_nanos() as i64;
    anyhow::ensure!(
        core.meta.try_lease(MAINTENANCE_LEASE, session, lease)?,
        "a mount of the volume holds its maintenance lease (it runs gc itself); try again later"
    );
    let mut compacted = 0;
    for _ in 0..MAX_COMPACTION_PASSES {
        let n = core.compact_pass(GC_COMPACT_MIN_SLICES, COMPACT_PER_PASS)?;
        compacted += n;
        if n == 0 {
            break;
        }
    }
    let before = now_ns().saturating_sub(grace.as_nanos() as i64);
    let mut deleted = core.collect_garbage(before)?;
    if delete_leaked {
        let objects = core.list_objects()?;
        deleted += core.delete_objects(&core.leaked_objects(&objects, before)?);
    }
    Ok((deleted, compacted))
}

/// Deletes every object and all metadata of a volume (volume deletion by the server): see
/// [`cellar_meta::destroy`].
pub fn destroy(config: &VolumeConfig) -> anyhow::Result<()> {
    let (meta, volume) = open_meta(config)?;
    if let Some(volume) = volume {
        let forks = meta.forks().context("listing the volume's forks")?;
        anyhow::ensure!(
            forks.is_empty(),
            "forks or snapshots share the volume's objects: {}",
            forks.join(", ")
        );
        let core = Core::connect(meta, volume, config)?;
        let objects = core.list_objects()?;
        let deleted = core.delete_objects(&objects);
        anyhow::ensure!(
            deleted == objects.len() as u64,
            "{} object(s) could not be deleted",
            objects.len() as u64 - deleted
        );
    } else {
        drop(meta);
    }
    cellar_meta::destroy(&config.meta_url).context("deleting the volume's metadata")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cellar_meta::{FileKind, NewNode, Slice, ROOT_INO};

    use super::*;

    fn volume_in(dir: &std::path::Path) -> VolumeConfig {
        let store_dir = dir.join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        VolumeConfig {
            meta_url: format!("sqlite://{}", dir.join("meta.db").display()),
            store_url: format!("file://{}", store_dir.display()),
            volume: "test".into(),
            cache_mem_bytes: 1 << 20,
            cache_dir: None,
            cache_disk_bytes: 0,
            mount_point: "/test".into(),
            store_timeouts: Default::default(),
        }
    }

    /// A writer killed between uploading a slice and committing it leaves an object that is
    /// known garbage (not leaked), which gc keeps while the upload might still be in flight.
    #[test]
    fn an_uncommitted_upload_is_pending_garbage_not_a_leak() {
        let dir = tempfile::tempdir().unwrap();
        let config = volume_in(dir.path());
        let core = Core::open(&config, true).unwrap();
        let data = Bytes::from(vec![7u8; 1000]);
        // The "crash": uploaded, never committed.
        let id = core.put_new_slice(data.clone()).unwrap();
        let object_count = || core.list_objects().unwrap().len();
        assert_eq!(object_count(), 1);

        assert_eq!(fsck(&config, false, false).unwrap(), Vec::<String>::new());
        let (deleted, _) = gc(&config, Duration::ZERO, true).unwrap();
        assert_eq!(deleted, 0, "a pending upload is not due for gc yet");
        assert_eq!(object_count(), 1);

        // A commit (the writer survived after all) makes it live: no longer garbage.
        let file = core
            .meta
            .create_node(
                ROOT_INO,
                b"f",
                &NewNode {
                    kind: FileKind::Regular,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: Vec::new(),
                },
                now_ns(),
            )
            .unwrap();
        let len = data.len() as u32;
        let slice = Slice {
            id,
            size: len,
            off: 0,
            len,
            pos: 0,
        };
        core.meta
            .commit_slices(file.ino, &[(0, slice)], u64::from(len), None, now_ns())
            .unwrap();
        assert_eq!(core.meta.garbage_slices(i64::MAX, 10).unwrap(), vec![]);
        assert_eq!(fsck(&config, false, false).unwrap(), Vec::<String>::new());
        assert_eq!(object_count(), 1);
    }
}
