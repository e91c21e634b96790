//! Multipart uploads in progress: each part is a nameless file of the volume, and completing
//! the upload appends the parts by reference to one more nameless file that then gets the key's
//! name (no data is copied). Uploads live in this process's memory: a restart drops them (and
//! their parts go with the closed files).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fs::Writer;

/// An upload neither completed nor aborted for this long is dropped.
const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

pub struct Part {
    pub writer: Writer,
    pub etag: String,
}

pub struct Upload {
    pub volume_id: String,
    pub key: String,
    started: Instant,
    pub parts: Mutex<BTreeMap<i32, Part>>,
}

#[derive(Default)]
pub struct Uploads {
    open: Mutex<HashMap<String, Arc<Upload>>>,
}

impl Uploads {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Upload>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an upload; returns its id.
    pub fn start(&self, volume_id: &str, key: &str) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let upload = Arc::new(Upload {
            volume_id: volume_id.to_string(),
            key: key.to_string(),
            started: Instant::now(),
            parts: Mutex::default(),
        });
        let abandoned: Vec<Arc<Upload>> = {
            let mut open = self.open();
            let old: Vec<String> = open
                .iter()
                .filter(|(_, u)| u.started.elapsed() > ABANDONED_AFTER)
                .map(|(id, _)| id.clone())
                .collect();
            open.insert(id.clone(), upload);
            old.iter().filter_map(|id| open.remove(id)).collect()
        };
        // Their parts close on a blocking thread: a release may commit to the metadata.
        if !abandoned.is_empty() {
            tokio::task::spawn_blocking(move || drop(abandoned));
        }
        id
    }

    /// The upload `id` of `key` in `volume_id`.
    pub fn get(&self, id: &str, volume_id: &str, key: &str) -> Option<Arc<Upload>> {
        self.open()
            .get(id)
            .filter(|u| u.volume_id == volume_id && u.key == key)
            .cloned()
    }

    /// Ends the upload `id` (completed or aborted).
    pub fn take(&self, id: &str, volume_id: &str, key: &str) -> Option<Arc<Upload>> {
        let mut open = self.open();
        open.get(id)
            .filter(|u| u.volume_id == volume_id && u.key == key)?;
        open.remove(id)
    }
}

impl Upload {
    pub fn parts(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Part>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }
}
