//! The control database (SQLite, `<data>/control.db`): organisations, API keys, volumes, sandboxes.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema versions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE orgs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    error_reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_used_at TEXT
);
-- A name is unique among an organisation's volumes until the volume is deleted.
CREATE UNIQUE INDEX volumes_live_name ON volumes(org_id, name) WHERE state <> 'deleted';
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    error_reason TEXT,
    settings TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes(org_id, name) WHERE state <> 'destroyed';
CREATE TABLE sandbox_volumes (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes(id),
    volume_id TEXT NOT NULL REFERENCES volumes(id),
    mount_path TEXT NOT NULL,
    subpath TEXT,
    read_only INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, mount_path)
);
CREATE INDEX sandbox_volumes_volume ON sandbox_volumes(volume_id);
"#];

/// Volume states (Daytona's names).
pub mod volume_state {
    pub const CREATING: &str = "creating";
    pub const READY: &str = "ready";
    pub const PENDING_DELETE: &str = "pending_delete";
    pub const DELETING: &str = "deleting";
    pub const DELETED: &str = "deleted";
    pub const ERROR: &str = "error";
}

/// Sandbox states (Daytona's names).
pub mod sandbox_state {
    pub const CREATING: &str = "creating";
    pub const STARTED: &str = "started";
    pub const DESTROYING: &str = "destroying";
    pub const DESTROYED: &str = "destroyed";
    pub const ERROR: &str = "error";
}

#[derive(Clone, Debug)]
pub struct VolumeRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub state: String,
    pub error_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_used_at: Option<String>,
}

/// What a sandbox was created with (stored as JSON; the server's defaults filled in).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SandboxSettings {
    pub user: String,
    pub snapshot: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub cpu: i64,
    pub gpu: i64,
    pub memory: i64,
    pub disk: i64,
    pub public: bool,
    pub network_block_all: bool,
    /// Networks outbound connections may reach (empty: any); absent in rows of older servers.
    #[serde(default)]
    pub network_allow_list: Vec<ipnet::IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRow {
    pub volume_id: String,
    pub mount_path: String,
    pub subpath: Option<String>,
    pub read_only: bool,
}

#[derive(Clone, Debug)]
pub struct SandboxRow {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub state: String,
    pub error_reason: Option<String>,
    pub settings: SandboxSettings,
    pub created_at: String,
    pub updated_at: String,
    pub mounts: Vec<MountRow>,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored sandbox settings are not valid JSON: {0}")]
    Settings(#[from] serde_json::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}
pub type DbResult<T> = Result<T, DbError>;

/// Outcome of a volume delete request.
pub enum DeleteVolume {
    /// Now pending_delete (or already on its way): the caller starts the background deletion.
    Accepted(VolumeRow),
    /// Mounted by these sandboxes (ids).
    InUse(Vec<String>),
    /// Still being provisioned (which takes moments).
    Creating,
    NotFound,
}

#[derive(Clone)]
pub struct ControlDb {
    conn: Arc<Mutex<Connection>>,
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A fresh API key: 244 random bits from two v4 UUIDs.
fn generate_key() -> String {
    format!(
        "cellar_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

const VOLUME_COLUMNS: &str =
    "id, org_id, name, state, error_reason, created_at, updated_at, last_used_at";
const SANDBOX_COLUMNS: &str =
    "id, org_id, name, state, error_reason, settings, created_at, updated_at";

fn volume_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: row.get(0)?,
        org_id: row.get(1)?,
        name: row.get(2)?,
        state: row.get(3)?,
        error_reason: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
        last_used_at: row.get(7)?,
    })
}

impl ControlDb {
    /// Opens (creating and migrating) `<data_dir>/control.db`.
    pub fn open(data_dir: &Path) -> DbResult<ControlDb> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            DbError::Invalid(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let mut conn = Connection::open(data_dir.join("control.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let applied: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (version, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version + 1)?;
            tx.commit()?;
        }
        Ok(ControlDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions roll back).
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- organisations and keys ----

    pub fn create_org(&self, name: &str) -> DbResult<String> {
        if name.trim().is_empty() {
            return Err(DbError::Invalid(
                "organization name must not be empty".into(),
            ));
        }
        let conn = self.lock();
        let id = new_id();
        unique_insert(
            conn.execute(
                "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id, name, now()],
            ),
            || format!("organization {name:?} already exists"),
        )?;
        Ok(id)
    }

    pub fn org_id_by_name(&self, name: &str) -> DbResult<Option<String>> {
        let conn = self.lock();
        Ok(conn
            .query_row("SELECT id FROM orgs WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    /// Creates an API key for the organisation and returns it (only its hash is stored).
    pub fn create_key(&self, org_id: &str) -> DbResult<String> {
        let key = generate_key();
        self.lock().execute(
            "INSERT INTO api_keys (id, org_id, key_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![new_id(), org_id, hash_key(&key), now()],
        )?;
        Ok(key)
    }

    pub fn org_for_key(&self, key: &str) -> DbResult<Option<String>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT org_id FROM api_keys WHERE key_hash = ?1",
                [hash_key(key)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// On the very first start: the organisation `default` and a key for it (returned once).
    pub fn bootstrap(&self) -> DbResult<Option<String>> {
        let orgs: i64 = self
            .lock()
            .query_row("SELECT count(*) FROM orgs", [], |r| r.get(0))?;
        if orgs > 0 {
            return Ok(None);
        }
        let org_id = self.create_org("default")?;
        Ok(Some(self.create_key(&org_id)?))
    }

    // ---- volumes ----

    /// Inserts a volume in state `creating`, enforcing the name's uniqueness and the quota.
    pub fn insert_volume(&self, org_id: &str, name: &str, quota: u32) -> DbResult<VolumeRow> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let live: i64 = tx.query_row(
            "SELECT count(*) FROM volumes WHERE org_id = ?1 AND state <> 'deleted'",
            [org_id],
            |r| r.get(0),
        )?;
        if live >= i64::from(quota) {
            return Err(DbError::Invalid(format!(
                "volume quota exceeded: an organization may have at most {quota} volumes"
            )));
        }
        let now = now();
        let row = VolumeRow {
            id: new_id(),
            org_id: org_id.to_string(),
            name: name.to_string(),
            state: volume_state::CREATING.to_string(),
            error_reason: None,
            created_at: now.clone(),
            updated_at: now,
            last_used_at: None,
        };
        let inserted = tx.execute(
            "INSERT INTO volumes (id, org_id, name, state, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![row.id, row.org_id, row.name, row.state, row.created_at],
        );
        unique_insert(inserted, || {
            format!("volume with name {name:?} already exists")
        })?;
        tx.commit()?;
        Ok(row)
    }

    pub fn volume(&self, org_id: &str, id: &str) -> DbResult<Option<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND id = ?2");
        Ok(self
            .lock()
            .query_row(&sql, [org_id, id], volume_from_row)
            .optional()?)
    }

    /// The volume with this name that is not deleted.
    pub fn volume_by_name(&self, org_id: &str, name: &str) -> DbResult<Option<VolumeRow>> {
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND name = ?2 AND state <> 'deleted'"
        );
        Ok(self
            .lock()
            .query_row(&sql, [org_id, name], volume_from_row)
            .optional()?)
    }

    /// A volume by id, else by (live) name.
    pub fn volume_by_id_or_name(&self, org_id: &str, key: &str) -> DbResult<Option<VolumeRow>> {
        match self.volume(org_id, key)? {
            Some(volume) => Ok(Some(volume)),
            None => self.volume_by_name(org_id, key),
        }
    }

    pub fn list_volumes(&self, org_id: &str, include_deleted: bool) -> DbResult<Vec<VolumeRow>> {
        let filter = if include_deleted {
            ""
        } else {
            " AND state <> 'deleted'"
        };
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1{filter} ORDER BY created_at, id"
        );
        let conn = self.lock();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([org_id], volume_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Volumes of every organisation in one of these states (for the reconciler).
    pub fn volumes_in_states(&self, states: &[&str]) -> DbResult<Vec<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1");
        let conn = self.lock();
        let mut stmt = conn.prepare(&sql)?;
        let mut volumes = Vec::new();
        for state in states {
            for row in stmt.query_map([state], volume_from_row)? {
                volumes.push(row?);
            }
        }
        Ok(volumes)
    }

    /// Marks a volume pending_delete unless a sandbox that is not being destroyed mounts it.
    pub fn begin_volume_delete(&self, org_id: &str, id: &str) -> DbResult<DeleteVolume> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND id = ?2");
        let Some(mut volume) = tx
            .query_row(&sql, [org_id, id], volume_from_row)
            .optional()?
        else {
            return Ok(DeleteVolume::NotFound);
        };
        if volume.state == volume_state::DELETED {
            return Ok(DeleteVolume::NotFound);
        }
        let users: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT s.id FROM sandbox_volumes m JOIN sandboxes s ON s.id = m.sandbox_id \
                 WHERE m.volume_id = ?1 AND s.state NOT IN ('destroying', 'destroyed') ORDER BY s.id",
            )?;
            let ids = stmt.query_map([id], |r| r.get(0))?;
            ids.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Ok(DeleteVolume::InUse(users));
        }
        if volume.state == volume_state::CREATING {
            return Ok(DeleteVolume::Creating);
        }
        if matches!(
            volume.state.as_str(),
            volume_state::READY | volume_state::ERROR
        ) {
            volume.state = volume_state::PENDING_DELETE.to_string();
            volume.updated_at = now();
            tx.execute(
                "UPDATE volumes SET state = ?2, updated_at = ?3 WHERE id = ?1",
                params![volume.id, volume.state, volume.updated_at],
            )?;
        }
        tx.commit()?;
        Ok(DeleteVolume::Accepted(volume))
    }

    // ---- sandboxes ----

    fn load_mounts(conn: &Connection, sandbox_id: &str) -> DbResult<Vec<MountRow>> {
        let mut stmt = conn.prepare(
            "SELECT volume_id, mount_path, subpath, read_only FROM sandbox_volumes \
             WHERE sandbox_id = ?1 ORDER BY position",
        )?;
        let rows = stmt.query_map([sandbox_id], |r| {
            Ok(MountRow {
                volume_id: r.get(0)?,
                mount_path: r.get(1)?,
                subpath: r.get(2)?,
                read_only: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn query_sandboxes(
        conn: &Connection,
        condition: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> DbResult<Vec<SandboxRow>> {
        let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {condition}");
        let mut stmt = conn.prepare(&sql)?;
        let raw: Vec<(SandboxRow, String)> = stmt
            .query_map(args, |r| {
                Ok((
                    SandboxRow {
                        id: r.get(0)?,
                        org_id: r.get(1)?,
                        name: r.get(2)?,
                        state: r.get(3)?,
                        error_reason: r.get(4)?,
                        settings: SandboxSettings::default(),
                        created_at: r.get(6)?,
                        updated_at: r.get(7)?,
                        mounts: Vec::new(),
                    },
                    r.get::<_, String>(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        raw.into_iter()
            .map(|(mut sandbox, settings)| {
                sandbox.settings = serde_json::from_str(&settings)?;
                sandbox.mounts = Self::load_mounts(conn, &sandbox.id)?;
                Ok(sandbox)
            })
            .collect()
    }

    /// Inserts a sandbox in state `creating` with its mounts, provided every volume is ready.
    pub fn insert_sandbox(
        &self,
        org_id: &str,
        name: Option<&str>,
        settings: &SandboxSettings,
        mounts: &[MountRow],
    ) -> DbResult<SandboxRow> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now();
        for mount in mounts {
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM volumes WHERE id = ?1 AND org_id = ?2",
                    [&mount.volume_id, org_id],
                    |r| r.get(0),
                )
                .optional()?;
            if state.as_deref() != Some(volume_state::READY) {
                return Err(DbError::Invalid(format!(
                    "volume {} is not ready (state {})",
                    mount.volume_id,
                    state.as_deref().unwrap_or("deleted")
                )));
            }
            tx.execute(
                "UPDATE volumes SET last_used_at = ?2 WHERE id = ?1",
                params![mount.volume_id, now],
            )?;
        }
        let id = new_id();
        let name = name.unwrap_or(&id).to_string();
        let inserted = tx.execute(
            "INSERT INTO sandboxes (id, org_id, name, state, settings, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![
                id,
                org_id,
                name,
                sandbox_state::CREATING,
                serde_json::to_string(settings)?,
                now
            ],
        );
        unique_insert(inserted, || {
            format!("sandbox with name {name:?} already exists")
        })?;
        for (position, mount) in mounts.iter().enumerate() {
            tx.execute(
                "INSERT INTO sandbox_volumes (sandbox_id, volume_id, mount_path, subpath, read_only, position) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, mount.volume_id, mount.mount_path, mount.subpath, mount.read_only, position as i64],
            )?;
        }
        tx.commit()?;
        Ok(SandboxRow {
            id,
            org_id: org_id.to_string(),
            name,
            state: sandbox_state::CREATING.to_string(),
            error_reason: None,
            settings: settings.clone(),
            created_at: now.clone(),
            updated_at: now,
            mounts: mounts.to_vec(),
        })
    }

    /// A sandbox by id (any state), else by the name of a sandbox not destroyed.
    pub fn sandbox(&self, org_id: &str, id_or_name: &str) -> DbResult<Option<SandboxRow>> {
        let conn = self.lock();
        let by_id =
            Self::query_sandboxes(&conn, "org_id = ?1 AND id = ?2", &[&org_id, &id_or_name])?;
        if let Some(sandbox) = by_id.into_iter().next() {
            return Ok(Some(sandbox));
        }
        let by_name = Self::query_sandboxes(
            &conn,
            "org_id = ?1 AND name = ?2 AND state <> 'destroyed'",
            &[&org_id, &id_or_name],
        )?;
        Ok(by_name.into_iter().next())
    }

    /// Sandboxes of the organisation that are not destroyed, oldest first.
    pub fn list_sandboxes(&self, org_id: &str) -> DbResult<Vec<SandboxRow>> {
        Self::query_sandboxes(
            &self.lock(),
            "org_id = ?1 AND state <> 'destroyed' ORDER BY created_at, id",
            &[&org_id],
        )
    }

    pub fn sandboxes_in_state(&self, state: &str) -> DbResult<Vec<SandboxRow>> {
        Self::query_sandboxes(&self.lock(), "state = ?1", &[&state])
    }

    /// Moves a sandbox to `to` only if it is in one of `from`; returns whether it did.
    pub fn transition_sandbox(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> DbResult<bool> {
        self.transition("sandboxes", id, from, to, error)
    }

    /// Moves a volume to `to` only if it is in one of `from`; returns whether it did.
    pub fn transition_volume(
        &self,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> DbResult<bool> {
        self.transition("volumes", id, from, to, error)
    }

    fn transition(
        &self,
        table: &str,
        id: &str,
        from: &[&str],
        to: &str,
        error: Option<&str>,
    ) -> DbResult<bool> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("?{}", i + 5)).collect();
        let sql = format!(
            "UPDATE {table} SET state = ?2, error_reason = ?3, updated_at = ?4 \
             WHERE id = ?1 AND state IN ({})",
            placeholders.join(", ")
        );
        let now = now();
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&id, &to, &error, &now];
        args.extend(from.iter().map(|s| s as &dyn rusqlite::ToSql));
        Ok(self.lock().execute(&sql, args.as_slice())? > 0)
    }
}

/// The outcome of an INSERT whose unique constraint guards a name: a violation is a conflict.
fn unique_insert(
    inserted: rusqlite::Result<usize>,
    conflict: impl FnOnce() -> String,
) -> Result<(), DbError> {
    match inserted {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            Err(DbError::Conflict(conflict()))
        }
        Err(e) => Err(e.into()),
    }
}
