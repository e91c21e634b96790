//! Garbage collection: objects of slices no chunk references any more are deleted once their
//! grace period has passed; objects no slice references at all (leaked) are found by listing the
//! store against one snapshot of the slice references.

use std::collections::HashSet;

use cellar_meta::GarbageSlice;
use cellar_store::{BlockStore, ObjectInfo};
use futures::StreamExt;

use crate::backend::Core;
use crate::VfsResult;

/// How many store deletions run at once.
const DELETE_CONCURRENCY: usize = 32;

impl Core {
    /// Deletes the objects of garbage slices older than `before_ns` and forgets them; returns how
    /// many objects (blocks) were deleted.
    pub fn collect_garbage(&self, before_ns: i64) -> VfsResult<u64> {
        let mut deleted_blocks = 0;
        loop {
            let batch = self.meta.garbage_slices(before_ns, 512)?;
            if batch.is_empty() {
                return Ok(deleted_blocks);
            }
            let store = &self.store;
            // A fork's inherited slices are its ancestors' objects: forgotten, not deleted.
            let (own, inherited): (Vec<GarbageSlice>, Vec<GarbageSlice>) =
                batch.iter().partition(|g| store.owns(g.id));
            let results: Vec<(GarbageSlice, bool)> = self.runtime.block_on(
                futures::stream::iter(own.iter().copied())
                    .map(|g| async move {
                        let outcome = store.delete_slice(g.id, g.size).await;
                        if let Err(e) = &outcome {
                            tracing::warn!(slice = g.id, error = %e, "could not delete a garbage slice");
                        }
                        (g, outcome.is_ok())
                    })
                    .buffer_unordered(DELETE_CONCURRENCY)
                    .collect(),
            );
            let forgotten: Vec<u64> = results
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(g, _)| g.id)
                .chain(inherited.iter().map(|g| g.id))
                .collect();
            deleted_blocks += results
                .iter()
                .filter(|(_, ok)| *ok)
                .map(|(g, _)| self.block_count(g.size))
                .sum::<u64>();
            self.meta.forget_garbage(&forgotten)?;
            if forgotten.len() < batch.len() {
                // Some deletions failed: retry them on the next pass rather than spin here.
                return Ok(deleted_blocks);
            }
        }
    }

    /// Every object of the volume (listed before the references are read: an object uploaded
    /// after the listing is not judged, one uploaded before is pending or live in the snapshot).
    pub fn list_objects(&self) -> anyhow::Result<Vec<ObjectInfo>> {
        use anyhow::Context;
        self.runtime
            .block_on(self.store.list())
            .context("listing the volume's objects")
    }

    /// Objects that no live and no garbage slice references, in one snapshot of the references,
    /// among those last modified before `before_ns` (younger ones may belong to an upload whose
    /// intent record is not visible yet).
    pub fn leaked_objects(
        &self,
        objects: &[ObjectInfo],
        before_ns: i64,
    ) -> anyhow::Result<Vec<ObjectInfo>> {
        let references = self.meta.slice_references()?;
        let referenced: HashSet<u64> = references
            .live
            .iter()
            .map(|(id, _)| *id)
            .chain(references.garbage.iter().copied())
            .collect();
        Ok(objects
            .iter()
            .filter(|o| o.last_modified_ns < before_ns)
            .filter(|o| {
                BlockStore::parse_block_key(&o.key)
                    .is_some_and(|(id, _, _)| !referenced.contains(&id))
            })
            .cloned()
            .collect())
    }

    /// Deletes the given objects; returns how many were deleted.
    pub fn delete_objects(&self, objects: &[ObjectInfo]) -> u64 {
        let store = &self.store;
        self.runtime.block_on(
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
}
