//! Offline maintenance: format, fsck, gc, destroy.
//!
//! The object listing carries no timestamps, so an object no slice references cannot be dated:
//! it may be a block of a flush that is uploading right now. Leaked objects are therefore only
//! deleted when the grace period is zero (the caller asserts the volume is quiescent).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use cellar_store::{BlockStore, ObjectInfo};
use futures::StreamExt;

use crate::backend::{now_ns, open_meta, Core};
use crate::VolumeConfig;

const DELETE_CONCURRENCY: usize = 32;
/// Bound on compaction passes of one gc run (each pass empties the fragmented list it saw).
const MAX_COMPACTION_PASSES: usize = 100;
const COMPACT_PER_PASS: usize = 1000;

pub(crate) fn format(config: &VolumeConfig) -> anyhow::Result<()> {
    Core::open(config, true).map(drop)
}

/// Objects of the volume that neither a live slice nor a garbage slice references.
fn leaked_objects(core: &Core, objects: &[ObjectInfo]) -> anyhow::Result<Vec<ObjectInfo>> {
    let mut referenced: HashSet<u64> = core
        .meta
        .live_slices()?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    referenced.extend(
        core.meta
            .garbage_slices(i64::MAX, usize::MAX)?
            .into_iter()
            .map(|g| g.id),
    );
    Ok(objects
        .iter()
        .filter(|o| {
            BlockStore::parse_block_key(&o.key).is_some_and(|(id, _, _)| !referenced.contains(&id))
        })
        .cloned()
        .collect())
}

fn delete_objects(core: &Core, objects: &[ObjectInfo]) -> u64 {
    let store = &core.store;
    core.runtime.block_on(
        futures::stream::iter(objects)
            .map(|o| async move {
                match store.delete_key(&o.key).await {
                    Ok(()) => 1,
                    Err(e) => {
                        tracing::warn!(key = %o.key, error = %e, "could not delete an object");
                        0
                    }
                }
            })
            .buffer_unordered(DELETE_CONCURRENCY)
            .fold(0u64, |sum, n| async move { sum + n }),
    )
}

fn list_objects(core: &Core) -> anyhow::Result<Vec<ObjectInfo>> {
    core.runtime
        .block_on(core.store.list())
        .context("listing the volume's objects")
}

pub(crate) fn fsck(config: &VolumeConfig, repair: bool) -> anyhow::Result<Vec<String>> {
    let core = Core::open(config, false)?;
    let mut problems = core.meta.check(repair).context("checking the metadata")?;
    let objects = list_objects(&core)?;
    let blocks: HashSet<(u64, u32, u32)> = objects
        .iter()
        .filter_map(|o| BlockStore::parse_block_key(&o.key))
        .collect();
    for o in objects
        .iter()
        .filter(|o| BlockStore::parse_block_key(&o.key).is_none())
    {
        problems.push(format!("object {} is not a block of this volume", o.key));
    }
    let block_size = core.volume.block_size;
    for (id, size) in core.meta.live_slices()? {
        for index in 0..core.block_count(size) {
            let len = (u64::from(size) - index * block_size).min(block_size) as u32;
            if !blocks.contains(&(id, index as u32, len)) {
                problems.push(format!("slice {id}: block {index} ({len} bytes) is missing from the object store; files using it read EIO"));
            }
        }
    }
    let leaked = leaked_objects(&core, &objects)?;
    for o in &leaked {
        problems.push(format!(
            "object {} ({} bytes) is leaked: no slice references it",
            o.key, o.size
        ));
    }
    if repair && !leaked.is_empty() {
        if crate::volume::gc_grace().is_zero() {
            let deleted = delete_objects(&core, &leaked);
            problems.push(format!("repair: deleted {deleted} leaked object(s)"));
        } else {
            problems.push("repair: leaked objects kept (their age is unknown; run gc with a zero grace on a quiescent volume)".to_string());
        }
    }
    Ok(problems)
}

pub(crate) fn gc(
    config: &VolumeConfig,
    grace: Duration,
    delete_leaked: bool,
) -> anyhow::Result<(u64, u64)> {
    let core = Core::open(config, false)?;
    let mut compacted = 0;
    for _ in 0..MAX_COMPACTION_PASSES {
        let n = core.compact_pass(COMPACT_PER_PASS)?;
        compacted += n;
        if n == 0 {
            break;
        }
    }
    let mut deleted = core.collect_garbage(now_ns().saturating_sub(grace.as_nanos() as i64))?;
    if delete_leaked && grace.is_zero() {
        let objects = list_objects(&core)?;
        deleted += delete_objects(&core, &leaked_objects(&core, &objects)?);
    } else if delete_leaked {
        tracing::warn!(
            "leaked objects are only deleted with a zero grace period (their age is unknown)"
        );
    }
    Ok((deleted, compacted))
}

/// Deletes every object under the volume's prefix, then the metadata. For SQLite metadata the
/// database file and its -wal/-shm companions are removed; other engines are not supported yet.
pub(crate) fn destroy(config: &VolumeConfig) -> anyhow::Result<()> {
    let db_path = sqlite_path(&config.meta_url)?;
    let (meta, volume) = open_meta(config)?;
    if let Some(volume) = volume {
        let core = Core::connect(meta, volume, config)?;
        let objects = list_objects(&core)?;
        let deleted = delete_objects(&core, &objects);
        anyhow::ensure!(
            deleted == objects.len() as u64,
            "{} object(s) could not be deleted",
            objects.len() as u64 - deleted
        );
    } else {
        drop(meta);
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut path = db_path.clone().into_os_string();
        path.push(suffix);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing {}", std::path::Path::new(&path).display()))
            }
        }
    }
    Ok(())
}

fn sqlite_path(meta_url: &str) -> anyhow::Result<std::path::PathBuf> {
    let url = url::Url::parse(meta_url).context("parsing the metadata URL")?;
    anyhow::ensure!(
        url.scheme() == "sqlite",
        "destroy supports sqlite metadata only, not {:?}",
        url.scheme()
    );
    Ok(std::path::PathBuf::from(url.path()))
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
        let object_count = || list_objects(&core).unwrap().len();
        assert_eq!(object_count(), 1);

        assert_eq!(fsck(&config, false).unwrap(), Vec::<String>::new());
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
            .commit_slices(file.ino, &[(0, slice)], u64::from(len), true, now_ns())
            .unwrap();
        assert_eq!(core.meta.garbage_slices(i64::MAX, 10).unwrap(), vec![]);
        assert_eq!(fsck(&config, false).unwrap(), Vec::<String>::new());
        assert_eq!(object_count(), 1);
    }
}
