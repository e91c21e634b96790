//! The control database: organisations, API keys, volumes, sandboxes, runners and runner
//! tokens. SQLite (`<data dir>/control.db`) by default, or PostgreSQL (`--database
//! postgres://...`, the schema `cellar_control`): one implementation over `cellar_sql` serves
//! both. On PostgreSQL a writing transaction is SERIALIZABLE and may be run again after losing a
//! race, so every closure passed to `write` is re-runnable.

use std::path::Path;
use std::sync::Arc;

use cellar_sql::{params, Database, Migrations, OptionalExtension, PgUrl, Row, Tx};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod s3_credentials;
pub use s3_credentials::S3CredentialRow;

/// Schema versions, applied in order (`schema_migrations` records them). The statements are
/// valid in both dialects.
const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    r#"
-- A runner is identified by its name. last_heartbeat_ms is on the server's clock.
CREATE TABLE runners (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    url TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    state TEXT NOT NULL,
    running INTEGER NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL,
    token_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE runner_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
-- Sandboxes of servers before runners existed ran on the embedded runner.
ALTER TABLE sandboxes ADD COLUMN runner_id TEXT NOT NULL DEFAULT 'local';
CREATE INDEX sandboxes_runner ON sandboxes(runner_id, state);
"#,
    r#"
-- Secrets of the server (the key signed URLs are made with), created on first use.
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at TEXT NOT NULL
);
-- The byte quota a volume was created with (the volume's metadata enforces it); provisioning
-- after a crash applies it again.
ALTER TABLE volumes ADD COLUMN quota_bytes BIGINT;
"#,
    r#"
-- Forks and snapshots: the volume (or snapshot) a volume was made from, and what it is
-- ('volume', or 'snapshot': read-only). Its metadata holds the lineage that shares objects.
ALTER TABLE volumes ADD COLUMN origin_id TEXT;
ALTER TABLE volumes ADD COLUMN kind TEXT NOT NULL DEFAULT 'volume';
CREATE INDEX volumes_origin ON volumes(origin_id);
"#,
    r#"
-- Credentials of the S3 gateway, each scoped to one volume of one organisation. The secret is
-- not stored: it is derived from the access key id and the server secret 's3_credentials'.
CREATE TABLE s3_credentials (
    access_key_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES orgs(id),
    volume_id TEXT NOT NULL REFERENCES volumes(id),
    prefix TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    expires_at_ms BIGINT,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX s3_credentials_volume ON s3_credentials(volume_id);
"#,
];

/// What a volume row is.
pub mod volume_kind {
    pub const VOLUME: &str = "volume";
    /// A read-only, point-in-time copy of another volume.
    pub const SNAPSHOT: &str = "snapshot";
}

/// The name of the runner embedded in `cellar server`.
pub const EMBEDDED_RUNNER: &str = "local";

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
    /// Its runner stopped heartbeating; answered as `error` (a state Daytona's clients know).
    pub const LOST: &str = "lost";
}

/// Runner states.
pub mod runner_state {
    pub const LIVE: &str = "live";
    pub const LOST: &str = "lost";
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
    /// The byte quota it was given (its metadata holds and enforces it).
    pub quota_bytes: Option<u64>,
    /// The volume or snapshot it was forked from.
    pub origin_id: Option<String>,
    /// `volume_kind::VOLUME` or `volume_kind::SNAPSHOT`.
    pub kind: String,
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
    /// Name of the runner the sandbox is scheduled on.
    pub runner_id: String,
}

/// Where a new sandbox may run.
pub struct Placement<'a> {
    /// Runners the server can reach now (registered in this process).
    pub connected: &'a [String],
    /// The runner the request pins, if any.
    pub pinned: Option<&'a str>,
    /// Whether a remote runner can mount the sandbox's volumes (their metadata is not in an
    /// SQLite file on the server's disk).
    pub remote_volumes: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerTokenRow {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// A runner as the server last heard of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerRow {
    pub id: String,
    pub url: String,
    pub capacity: i64,
    pub state: String,
    /// Sandboxes it reported running in its last heartbeat (the embedded runner: those started).
    pub running: i64,
    pub last_heartbeat_ms: i64,
}

/// A runner that missed its heartbeats.
#[derive(Debug)]
pub struct LostRunner {
    pub id: String,
    pub last_heartbeat_ms: i64,
    pub sandboxes: usize,
}

/// What a runner reports: who it is and what it runs.
pub struct RunnerReport<'a> {
    pub name: &'a str,
    pub instance: &'a str,
    pub capacity: u32,
    pub sandboxes: &'a [String],
}

/// What a heartbeat found.
pub enum HeartbeatOutcome {
    /// The sandboxes the runner must destroy (the server no longer wants them).
    Accepted {
        destroy: Vec<String>,
        rejoined: bool,
    },
    /// The server does not know this runner instance: it must register.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sql(#[from] cellar_sql::Error),
    #[error("stored sandbox settings are not valid JSON: {0}")]
    Settings(#[from] serde_json::Error),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// No runner can take the work now.
    #[error("{0}")]
    Unavailable(String),
}
pub type DbResult<T> = Result<T, DbError>;

/// A volume to insert (see `ControlDb::insert_volume`).
pub struct NewVolume {
    pub name: String,
    pub quota_bytes: Option<u64>,
    /// The volume or snapshot a fork or snapshot is made from.
    pub origin: Option<String>,
    /// `volume_kind::VOLUME` or `volume_kind::SNAPSHOT`.
    pub kind: &'static str,
}

/// Outcome of a volume delete request.
pub enum DeleteVolume {
    /// Now pending_delete (or already on its way): the caller starts the background deletion.
    Accepted(Box<VolumeRow>),
    /// Mounted by these sandboxes (ids).
    InUse(Vec<String>),
    /// Still being provisioned (which takes moments).
    Creating,
    NotFound,
}

/// Where the control state lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// `<data dir>/control.db`.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (its URL may hold a password: Debug shows it redacted).
    Postgres(PgUrl),
}

impl Location {
    /// `database` (`postgres://...`) if given, else the SQLite file of the data directory.
    pub fn new(data_dir: &Path, database: Option<&str>) -> DbResult<Location> {
        match database {
            None => Ok(Location::Sqlite(data_dir.join("control.db"))),
            Some(url) => {
                let url = PgUrl::parse(url)?;
                if url.volume().is_some() {
                    return Err(DbError::Invalid(format!(
                        "--database {} must not name a volume",
                        url.redacted()
                    )));
                }
                Ok(Location::Postgres(url))
            }
        }
    }
}

/// The schema of the control tables in a PostgreSQL database (volumes have `vol_<id>`).
pub const CONTROL_SCHEMA: &str = "cellar_control";

#[derive(Clone)]
pub struct ControlDb {
    db: Arc<Database>,
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
pub(crate) fn generate_key() -> String {
    format!(
        "cellar_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

const VOLUME_COLUMNS: &str =
    "id, org_id, name, state, error_reason, created_at, updated_at, last_used_at, quota_bytes, origin_id, kind";
const SANDBOX_COLUMNS: &str =
    "id, org_id, name, state, error_reason, settings, created_at, updated_at, runner_id";

/// Milliseconds since the epoch on this host's clock.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

fn volume_from_row(row: &Row) -> cellar_sql::Result<VolumeRow> {
    Ok(VolumeRow {
        id: row.get(0)?,
        org_id: row.get(1)?,
        name: row.get(2)?,
        state: row.get(3)?,
        error_reason: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
        last_used_at: row.get(7)?,
        quota_bytes: row.get::<_, Option<i64>>(8)?.map(|q| q.max(0) as u64),
        origin_id: row.get(9)?,
        kind: row.get(10)?,
    })
}

/// Collects mapped rows.
fn collect<T>(rows: std::vec::IntoIter<cellar_sql::Result<T>>) -> DbResult<Vec<T>> {
    Ok(rows.collect::<cellar_sql::Result<Vec<T>>>()?)
}

impl ControlDb {
    /// Opens (creating and migrating) the control database.
    pub fn open(location: &Location) -> DbResult<ControlDb> {
        let db = match location {
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        DbError::Invalid(format!(
                            "cannot create data directory {}: {e}",
                            dir.display()
                        ))
                    })?;
                }
                let db = Database::open_sqlite(path)?;
                adopt_user_version(&db)?;
                db
            }
            Location::Postgres(url) => Database::open_postgres(url, Some(CONTROL_SCHEMA))?,
        };
        db.migrate(&Migrations {
            sqlite: MIGRATIONS,
            postgres: MIGRATIONS,
        })?;
        Ok(ControlDb { db: Arc::new(db) })
    }

    /// Runs `work` on a blocking thread: the database calls block (PostgreSQL's client must
    /// never run on an async worker).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ControlDb) -> DbResult<T> + Send + 'static,
    ) -> DbResult<T> {
        let db = self.clone();
        match tokio::task::spawn_blocking(move || work(&db)).await {
            Ok(result) => result,
            Err(e) => Err(DbError::Invalid(format!("database task failed: {e}"))),
        }
    }

    fn write<T>(&self, f: impl FnMut(&Tx<'_>) -> DbResult<T>) -> DbResult<T> {
        self.db.write(f)
    }

    fn read<T>(&self, f: impl FnMut(&Tx<'_>) -> DbResult<T>) -> DbResult<T> {
        self.db.read(f)
    }

    // ---- organisations and keys ----

    pub fn create_org(&self, name: &str) -> DbResult<String> {
        if name.trim().is_empty() {
            return Err(DbError::Invalid(
                "organization name must not be empty".into(),
            ));
        }
        self.write(|tx| {
            ensure_free(
                tx,
                "SELECT count(*) FROM orgs WHERE name = ?1",
                params![name],
                || format!("organization {name:?} already exists"),
            )?;
            let id = new_id();
            tx.execute(
                "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id, name, now()],
            )?;
            Ok(id)
        })
    }

    pub fn org_id_by_name(&self, name: &str) -> DbResult<Option<String>> {
        self.read(|tx| {
            Ok(tx
                .query_row("SELECT id FROM orgs WHERE name = ?1", params![name], |r| {
                    r.get(0)
                })
                .optional()?)
        })
    }

    /// Creates an API key for the organisation and returns it (only its hash is stored).
    pub fn create_key(&self, org_id: &str) -> DbResult<String> {
        let key = generate_key();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO api_keys (id, org_id, key_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![new_id(), org_id, hash_key(&key), now()],
            )?;
            Ok(())
        })?;
        Ok(key)
    }

    pub fn org_for_key(&self, key: &str) -> DbResult<Option<String>> {
        let hash = hash_key(key);
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT org_id FROM api_keys WHERE key_hash = ?1",
                    params![hash],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    /// On the very first start: the organisation `default` and a key for it (returned once).
    pub fn bootstrap(&self) -> DbResult<Option<String>> {
        let key = generate_key();
        let created = self.write(|tx| {
            let orgs: i64 = tx.query_row("SELECT count(*) FROM orgs", (), |r| r.get(0))?;
            if orgs > 0 {
                return Ok(false);
            }
            let org_id = new_id();
            tx.execute(
                "INSERT INTO orgs (id, name, created_at) VALUES (?1, 'default', ?2)",
                params![org_id, now()],
            )?;
            tx.execute(
                "INSERT INTO api_keys (id, org_id, key_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![new_id(), org_id, hash_key(&key), now()],
            )?;
            Ok(true)
        })?;
        Ok(created.then_some(key))
    }

    /// The server secret `name`; `candidate` becomes it if no server of this database has
    /// made it yet.
    pub fn server_secret(&self, name: &str, candidate: &str) -> DbResult<String> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO server_secrets (name, value, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO NOTHING",
                params![name, candidate, now()],
            )?;
            Ok(tx.query_row(
                "SELECT value FROM server_secrets WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )?)
        })
    }

    // ---- volumes ----

    /// Inserts a volume in state `creating`, enforcing the name's uniqueness and the quota.
    /// `quota_bytes` is the volume's byte quota, applied by provisioning. A fork or snapshot
    /// names its origin, which must be ready (provisioning copies it), and takes its quota.
    pub fn insert_volume(&self, org_id: &str, new: &NewVolume, quota: u32) -> DbResult<VolumeRow> {
        self.write(|tx| {
            let live: i64 = tx.query_row(
                "SELECT count(*) FROM volumes WHERE org_id = ?1 AND state <> 'deleted'",
                params![org_id],
                |r| r.get(0),
            )?;
            if live >= i64::from(quota) {
                return Err(DbError::Invalid(format!(
                    "volume quota exceeded: an organization may have at most {quota} volumes"
                )));
            }
            let name = new.name.as_str();
            ensure_free(
                tx,
                "SELECT count(*) FROM volumes WHERE org_id = ?1 AND name = ?2 AND state <> 'deleted'",
                params![org_id, name],
                || format!("volume with name {name:?} already exists"),
            )?;
            let mut quota_bytes = new.quota_bytes;
            if let Some(origin) = new.origin.as_deref() {
                let origin = volume_by_id(tx, org_id, origin)?
                    .filter(|v| v.state != volume_state::DELETED)
                    .ok_or_else(|| DbError::NotFound(format!("volume {origin} not found")))?;
                if origin.state != volume_state::READY {
                    return Err(DbError::Conflict(format!(
                        "volume {} is {}: only a ready volume can be forked or snapshotted",
                        origin.id, origin.state
                    )));
                }
                quota_bytes = origin.quota_bytes;
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
                quota_bytes,
                origin_id: new.origin.clone(),
                kind: new.kind.to_string(),
            };
            tx.execute(
                "INSERT INTO volumes (id, org_id, name, state, created_at, updated_at, quota_bytes, origin_id, kind) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8)",
                params![
                    row.id,
                    row.org_id,
                    row.name,
                    row.state,
                    row.created_at,
                    quota_bytes.map(|q| q as i64),
                    row.origin_id,
                    row.kind
                ],
            )?;
            Ok(row)
        })
    }

    /// Records a volume's byte quota (after its metadata took it).
    pub fn set_volume_quota(&self, id: &str, quota_bytes: Option<u64>) -> DbResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE volumes SET quota_bytes = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, quota_bytes.map(|q| q as i64), now()],
            )?;
            Ok(())
        })
    }

    /// A volume by id in whichever organisation (a signed URL names the volume, not the org).
    pub fn volume_by_id_in_any_org(&self, id: &str) -> DbResult<Option<VolumeRow>> {
        self.read(|tx| {
            let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1");
            Ok(tx
                .query_row(&sql, params![id], volume_from_row)
                .optional()?)
        })
    }

    pub fn volume(&self, org_id: &str, id: &str) -> DbResult<Option<VolumeRow>> {
        self.read(|tx| volume_by_id(tx, org_id, id))
    }

    /// The volume with this name that is not deleted.
    pub fn volume_by_name(&self, org_id: &str, name: &str) -> DbResult<Option<VolumeRow>> {
        self.read(|tx| {
            let sql = format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND name = ?2 AND state <> 'deleted'"
            );
            Ok(tx
                .query_row(&sql, params![org_id, name], volume_from_row)
                .optional()?)
        })
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
        // Snapshots are listed with their volume (`snapshots_of`).
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND kind = 'volume'{filter} ORDER BY created_at, id"
        );
        self.read(|tx| collect(tx.query_map(&sql, params![org_id], volume_from_row)?))
    }

    /// The snapshots of a volume that are not deleted, oldest first.
    pub fn snapshots_of(&self, org_id: &str, origin_id: &str) -> DbResult<Vec<VolumeRow>> {
        let sql = format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND origin_id = ?2 \
             AND kind = 'snapshot' AND state <> 'deleted' ORDER BY created_at, id"
        );
        self.read(|tx| collect(tx.query_map(&sql, params![org_id, origin_id], volume_from_row)?))
    }

    /// Volumes of every organisation in one of these states (for the reconciler).
    pub fn volumes_in_states(&self, states: &[&str]) -> DbResult<Vec<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = ?1");
        self.read(|tx| {
            let mut volumes = Vec::new();
            for state in states {
                volumes.extend(collect(tx.query_map(
                    &sql,
                    params![state],
                    volume_from_row,
                )?)?);
            }
            Ok(volumes)
        })
    }

    /// Marks a volume pending_delete unless a sandbox that is not being destroyed mounts it.
    pub fn begin_volume_delete(&self, org_id: &str, id: &str) -> DbResult<DeleteVolume> {
        self.write(|tx| {
            let Some(mut volume) = volume_by_id(tx, org_id, id)? else {
                return Ok(DeleteVolume::NotFound);
            };
            if volume.state == volume_state::DELETED {
                return Ok(DeleteVolume::NotFound);
            }
            let users: Vec<String> = collect(tx.query_map(
                "SELECT DISTINCT s.id FROM sandbox_volumes m JOIN sandboxes s ON s.id = m.sandbox_id \
                 WHERE m.volume_id = ?1 AND s.state NOT IN ('destroying', 'destroyed') ORDER BY s.id",
                params![id],
                |r| r.get(0),
            )?)?;
            if !users.is_empty() {
                return Ok(DeleteVolume::InUse(users));
            }
            // A fork being made copies this volume's metadata: it must still be there.
            let forking: i64 = tx.query_row(
                "SELECT count(*) FROM volumes WHERE origin_id = ?1 AND state = 'creating'",
                params![id],
                |r| r.get(0),
            )?;
            if volume.state == volume_state::CREATING || forking > 0 {
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
            Ok(DeleteVolume::Accepted(Box::new(volume)))
        })
    }

    // ---- sandboxes ----

    /// Inserts a sandbox in state `creating` with its mounts, provided every volume is ready,
    /// scheduled on the least loaded live runner with room that `placement` allows. Choosing
    /// and inserting in one transaction keeps concurrent creates within every capacity.
    pub fn insert_sandbox(
        &self,
        org_id: &str,
        name: Option<&str>,
        settings: &SandboxSettings,
        mounts: &[MountRow],
        placement: &Placement<'_>,
    ) -> DbResult<SandboxRow> {
        let settings_json = serde_json::to_string(settings)?;
        self.write(|tx| {
            let now = now();
            for mount in mounts {
                let state: Option<String> = tx
                    .query_row(
                        "SELECT state FROM volumes WHERE id = ?1 AND org_id = ?2",
                        params![mount.volume_id, org_id],
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
            }
            let runner_id = choose_runner(tx, placement, !mounts.is_empty())?;
            for mount in mounts {
                tx.execute(
                    "UPDATE volumes SET last_used_at = ?2 WHERE id = ?1",
                    params![mount.volume_id, now],
                )?;
            }
            let id = new_id();
            let name = name.unwrap_or(&id).to_string();
            ensure_free(
                tx,
                "SELECT count(*) FROM sandboxes WHERE org_id = ?1 AND name = ?2 AND state <> 'destroyed'",
                params![org_id, name],
                || format!("sandbox with name {name:?} already exists"),
            )?;
            tx.execute(
                "INSERT INTO sandboxes (id, org_id, name, state, settings, created_at, updated_at, runner_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
                params![
                    id,
                    org_id,
                    name,
                    sandbox_state::CREATING,
                    settings_json,
                    now,
                    runner_id
                ],
            )?;
            for (position, mount) in mounts.iter().enumerate() {
                tx.execute(
                    "INSERT INTO sandbox_volumes (sandbox_id, volume_id, mount_path, subpath, read_only, position) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![id, mount.volume_id, mount.mount_path, mount.subpath, mount.read_only, position],
                )?;
            }
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
                runner_id,
            })
        })
    }

    /// A sandbox by id (any state), else by the name of a sandbox not destroyed.
    /// Records a volume mount added to a started sandbox (hot attach), before the runner makes
    /// it: the volume is then in use (it cannot be deleted meanwhile). Refuses a sandbox that is
    /// not started, a volume that is not ready, and a mount path the sandbox uses.
    pub fn add_sandbox_mount(&self, sandbox_id: &str, mount: &MountRow) -> DbResult<()> {
        self.write(|tx| {
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM sandboxes WHERE id = ?1",
                    params![sandbox_id],
                    |r| r.get(0),
                )
                .optional()?;
            if state.as_deref() != Some(sandbox_state::STARTED) {
                return Err(DbError::Conflict(format!(
                    "sandbox {sandbox_id} is not started"
                )));
            }
            let volume: Option<String> = tx
                .query_row(
                    "SELECT state FROM volumes WHERE id = ?1",
                    params![mount.volume_id],
                    |r| r.get(0),
                )
                .optional()?;
            if volume.as_deref() != Some(volume_state::READY) {
                return Err(DbError::Conflict(format!(
                    "volume {} is not ready",
                    mount.volume_id
                )));
            }
            ensure_free(
                tx,
                "SELECT count(*) FROM sandbox_volumes WHERE sandbox_id = ?1 AND mount_path = ?2",
                params![sandbox_id, mount.mount_path],
                || format!("{} is already a mount path of the sandbox", mount.mount_path),
            )?;
            tx.execute(
                "INSERT INTO sandbox_volumes (sandbox_id, volume_id, mount_path, subpath, read_only, position) \
                 VALUES (?1, ?2, ?3, ?4, ?5, (SELECT COALESCE(MAX(position), -1) + 1 FROM sandbox_volumes WHERE sandbox_id = ?1))",
                params![sandbox_id, mount.volume_id, mount.mount_path, mount.subpath, mount.read_only],
            )?;
            Ok(())
        })
    }

    /// Forgets a volume mount of a sandbox (hot detach, or an attach that failed).
    pub fn remove_sandbox_mount(&self, sandbox_id: &str, mount_path: &str) -> DbResult<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM sandbox_volumes WHERE sandbox_id = ?1 AND mount_path = ?2",
                params![sandbox_id, mount_path],
            )?;
            Ok(())
        })
    }

    pub fn sandbox(&self, org_id: &str, id_or_name: &str) -> DbResult<Option<SandboxRow>> {
        self.read(|tx| {
            let by_id =
                query_sandboxes(tx, "org_id = ?1 AND id = ?2", params![org_id, id_or_name])?;
            if let Some(sandbox) = by_id.into_iter().next() {
                return Ok(Some(sandbox));
            }
            let by_name = query_sandboxes(
                tx,
                "org_id = ?1 AND name = ?2 AND state <> 'destroyed'",
                params![org_id, id_or_name],
            )?;
            Ok(by_name.into_iter().next())
        })
    }

    /// Sandboxes of the organisation that are not destroyed, oldest first.
    pub fn list_sandboxes(&self, org_id: &str) -> DbResult<Vec<SandboxRow>> {
        self.read(|tx| {
            query_sandboxes(
                tx,
                "org_id = ?1 AND state <> 'destroyed' ORDER BY created_at, id",
                params![org_id],
            )
        })
    }

    pub fn sandboxes_in_state(&self, state: &str) -> DbResult<Vec<SandboxRow>> {
        self.read(|tx| query_sandboxes(tx, "state = ?1", params![state]))
    }

    /// Sandboxes of a runner in this state.
    pub fn sandboxes_on_runner(&self, runner_id: &str, state: &str) -> DbResult<Vec<SandboxRow>> {
        self.read(|tx| {
            query_sandboxes(
                tx,
                "runner_id = ?1 AND state = ?2",
                params![runner_id, state],
            )
        })
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
        self.write(|tx| {
            let mut args = params![id, to, error, now()].to_vec();
            args.extend(from.iter().map(cellar_sql::ToValue::to_value));
            Ok(tx.execute(&sql, args)? > 0)
        })
    }

    // ---- runner tokens ----

    /// Mints a runner token (returned once; only its hash is stored).
    pub fn create_runner_token(&self, name: &str) -> DbResult<(String, String)> {
        let id = new_id();
        let token = format!("cellar_runner_{}", &generate_key()["cellar_".len()..]);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO runner_tokens (id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, hash_key(&token), now()],
            )?;
            Ok(())
        })?;
        Ok((id, token))
    }

    pub fn list_runner_tokens(&self) -> DbResult<Vec<RunnerTokenRow>> {
        self.read(|tx| {
            collect(tx.query_map(
                "SELECT id, name, created_at, revoked_at FROM runner_tokens ORDER BY created_at, id",
                (),
                |r| {
                    Ok(RunnerTokenRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                        revoked_at: r.get(3)?,
                    })
                },
            )?)
        })
    }

    /// Revokes the token with this id, or every unrevoked token with this name; returns how many.
    pub fn revoke_runner_token(&self, id_or_name: &str) -> DbResult<usize> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE runner_tokens SET revoked_at = ?2 \
                 WHERE (id = ?1 OR name = ?1) AND revoked_at IS NULL",
                params![id_or_name, now()],
            )?)
        })
    }

    /// The id of the unrevoked runner token `token`.
    pub fn runner_token_id(&self, token: &str) -> DbResult<Option<String>> {
        let hash = hash_key(token);
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT id FROM runner_tokens WHERE token_hash = ?1 AND revoked_at IS NULL",
                    params![hash],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    // ---- runners ----

    pub fn list_runners(&self) -> DbResult<Vec<RunnerRow>> {
        self.read(|tx| {
            collect(tx.query_map(
                "SELECT id, url, capacity, state, CASE WHEN id = ?1 THEN \
                 (SELECT count(*) FROM sandboxes s WHERE s.runner_id = ?1 AND s.state = 'started') \
                 ELSE running END, last_heartbeat_ms FROM runners ORDER BY id",
                params![EMBEDDED_RUNNER],
                |r| {
                    Ok(RunnerRow {
                        id: r.get(0)?,
                        url: r.get(1)?,
                        capacity: r.get(2)?,
                        state: r.get(3)?,
                        running: r.get(4)?,
                        last_heartbeat_ms: r.get(5)?,
                    })
                },
            )?)
        })
    }

    /// Records the embedded runner as live (it cannot miss heartbeats), or, when the server runs
    /// without it, as lost together with the sandboxes it ran.
    pub fn set_embedded_runner(&self, capacity: Option<u32>, now_ms: i64) -> DbResult<()> {
        self.write(|tx| {
            match capacity {
                Some(capacity) => {
                    tx.execute(
                        "INSERT INTO runners (id, instance, url, capacity, state, running, last_heartbeat_ms, created_at, updated_at) \
                         VALUES (?1, ?1, '', ?2, ?3, 0, ?4, ?5, ?5) \
                         ON CONFLICT (id) DO UPDATE SET capacity = ?2, state = ?3, last_heartbeat_ms = ?4, updated_at = ?5",
                        params![EMBEDDED_RUNNER, capacity, runner_state::LIVE, now_ms, now()],
                    )?;
                }
                None => {
                    tx.execute(
                        "UPDATE runners SET state = ?2, updated_at = ?3 WHERE id = ?1",
                        params![EMBEDDED_RUNNER, runner_state::LOST, now()],
                    )?;
                    mark_sandboxes_lost(
                        tx,
                        EMBEDDED_RUNNER,
                        "the server runs without its embedded runner",
                    )?;
                }
            }
            Ok(())
        })
    }

    /// After a server restart: remote runners get a full timeout to heartbeat again before they
    /// count as lost (the server's downtime is not theirs).
    pub fn restart_runner_clocks(&self, now_ms: i64) -> DbResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE runners SET last_heartbeat_ms = ?2 WHERE id <> ?1 AND state = ?3",
                params![EMBEDDED_RUNNER, now_ms, runner_state::LIVE],
            )?;
            Ok(())
        })
    }

    /// A runner joins (or rejoins after a restart, a lost period or a server restart). Another
    /// live instance under the same name is a conflict. Returns the sandboxes it must destroy.
    pub fn register_runner(
        &self,
        report: &RunnerReport<'_>,
        url: &str,
        token_id: &str,
        now_ms: i64,
        timeout_ms: i64,
    ) -> DbResult<Vec<String>> {
        if report.name == EMBEDDED_RUNNER {
            return Err(DbError::Conflict(format!(
                "the runner name {EMBEDDED_RUNNER:?} is reserved for the server's embedded runner"
            )));
        }
        self.write(|tx| {
            let existing: Option<(String, String, i64)> = tx
                .query_row(
                    "SELECT instance, state, last_heartbeat_ms FROM runners WHERE id = ?1",
                    params![report.name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((instance, state, last)) = &existing {
                if instance != report.instance
                    && state == runner_state::LIVE
                    && now_ms - last < timeout_ms
                {
                    return Err(DbError::Conflict(format!(
                        "another runner named {:?} is live; give this one another --name",
                        report.name
                    )));
                }
            }
            tx.execute(
                "INSERT INTO runners (id, instance, url, capacity, state, running, last_heartbeat_ms, token_id, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) \
                 ON CONFLICT (id) DO UPDATE SET instance = ?2, url = ?3, capacity = ?4, state = ?5, \
                 running = ?6, last_heartbeat_ms = ?7, token_id = ?8, updated_at = ?9",
                params![
                    report.name,
                    report.instance,
                    url,
                    report.capacity,
                    runner_state::LIVE,
                    report.sandboxes.len(),
                    now_ms,
                    token_id,
                    now()
                ],
            )?;
            reconcile_runner(tx, report.name, report.sandboxes, true)
        })
    }

    /// A heartbeat of a registered runner instance, on the server's clock. A runner that was lost
    /// is live again and reconciled.
    pub fn heartbeat_runner(
        &self,
        report: &RunnerReport<'_>,
        token_id: &str,
        now_ms: i64,
    ) -> DbResult<HeartbeatOutcome> {
        self.write(|tx| {
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM runners WHERE id = ?1 AND instance = ?2 AND token_id = ?3",
                    params![report.name, report.instance, token_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(state) = state else {
                return Ok(HeartbeatOutcome::Unknown);
            };
            tx.execute(
                "UPDATE runners SET capacity = ?2, state = ?3, running = ?4, last_heartbeat_ms = ?5, updated_at = ?6 \
                 WHERE id = ?1",
                params![
                    report.name,
                    report.capacity,
                    runner_state::LIVE,
                    report.sandboxes.len(),
                    now_ms,
                    now()
                ],
            )?;
            let rejoined = state == runner_state::LOST;
            let destroy = reconcile_runner(tx, report.name, report.sandboxes, rejoined)?;
            Ok(HeartbeatOutcome::Accepted { destroy, rejoined })
        })
    }

    /// Marks every live remote runner whose last heartbeat is older than `timeout_ms` lost, and
    /// its sandboxes with it.
    pub fn mark_lost_runners(&self, now_ms: i64, timeout_ms: i64) -> DbResult<Vec<LostRunner>> {
        // Most checks find nothing: a read does not contend with the heartbeats.
        let overdue = |tx: &Tx<'_>| -> DbResult<Vec<(String, i64)>> {
            collect(tx.query_map(
                "SELECT id, last_heartbeat_ms FROM runners \
                 WHERE state = ?1 AND id <> ?2 AND last_heartbeat_ms < ?3 ORDER BY id",
                params![runner_state::LIVE, EMBEDDED_RUNNER, now_ms - timeout_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        };
        if self.read(overdue)?.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| {
            let mut lost = Vec::new();
            for (id, last_heartbeat_ms) in overdue(tx)? {
                tx.execute(
                    "UPDATE runners SET state = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, runner_state::LOST, now()],
                )?;
                let reason = format!(
                    "runner {id} lost: no heartbeat since {}",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(last_heartbeat_ms.max(0) as u64)
                    )
                );
                let sandboxes = mark_sandboxes_lost(tx, &id, &reason)?;
                lost.push(LostRunner {
                    id,
                    last_heartbeat_ms,
                    sandboxes,
                });
            }
            Ok(lost)
        })
    }
}

/// Before `cellar_sql`, the SQLite control database counted its migrations in
/// `PRAGMA user_version`: such a database gets the same count in `schema_migrations`.
fn adopt_user_version(db: &Database) -> DbResult<()> {
    db.write(|tx| {
        let applied: i64 = tx.query_row("PRAGMA user_version", (), |r| r.get(0))?;
        if applied == 0 {
            return Ok(());
        }
        tx.batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)",
        )?;
        for version in 1..=applied {
            tx.execute(
                "INSERT OR IGNORE INTO schema_migrations (version, applied_ns) VALUES (?1, ?2)",
                params![version, cellar_sql::wall_clock_ns()],
            )?;
        }
        tx.batch("PRAGMA user_version = 0")?;
        Ok(())
    })
}

fn volume_by_id(tx: &Tx<'_>, org_id: &str, id: &str) -> DbResult<Option<VolumeRow>> {
    let sql = format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE org_id = ?1 AND id = ?2");
    Ok(tx
        .query_row(&sql, params![org_id, id], volume_from_row)
        .optional()?)
}

/// A name is free if the count query finds no row using it; checked in the transaction that
/// inserts it (the unique index stays the last guard).
fn ensure_free(
    tx: &Tx<'_>,
    count_sql: &str,
    args: impl cellar_sql::Params,
    conflict: impl FnOnce() -> String,
) -> DbResult<()> {
    let taken: i64 = tx.query_row(count_sql, args, |r| r.get(0))?;
    if taken > 0 {
        return Err(DbError::Conflict(conflict()));
    }
    Ok(())
}

fn load_mounts(tx: &Tx<'_>, sandbox_id: &str) -> DbResult<Vec<MountRow>> {
    collect(tx.query_map(
        "SELECT volume_id, mount_path, subpath, read_only FROM sandbox_volumes \
         WHERE sandbox_id = ?1 ORDER BY position",
        params![sandbox_id],
        |r| {
            Ok(MountRow {
                volume_id: r.get(0)?,
                mount_path: r.get(1)?,
                subpath: r.get(2)?,
                read_only: r.get(3)?,
            })
        },
    )?)
}

fn query_sandboxes(
    tx: &Tx<'_>,
    condition: &str,
    args: impl cellar_sql::Params,
) -> DbResult<Vec<SandboxRow>> {
    let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {condition}");
    let raw: Vec<(SandboxRow, String)> = collect(tx.query_map(&sql, args, |r| {
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
                runner_id: r.get(8)?,
            },
            r.get::<_, String>(5)?,
        ))
    })?)?;
    raw.into_iter()
        .map(|(mut sandbox, settings)| {
            sandbox.settings = serde_json::from_str(&settings)?;
            sandbox.mounts = load_mounts(tx, &sandbox.id)?;
            Ok(sandbox)
        })
        .collect()
}

/// The least loaded (running sandboxes / capacity) live, connected runner with room that the
/// placement allows; the embedded runner wins ties (no network in between).
fn choose_runner(tx: &Tx<'_>, placement: &Placement<'_>, has_volumes: bool) -> DbResult<String> {
    let live: Vec<(String, i64, i64)> = collect(tx.query_map(
        "SELECT r.id, r.capacity, \
         (SELECT count(*) FROM sandboxes s WHERE s.runner_id = r.id AND s.state IN ('creating', 'started')) \
         FROM runners r WHERE r.state = ?1 ORDER BY r.id",
        params![runner_state::LIVE],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?)?
    .into_iter()
    .filter(|(id, _, _)| placement.connected.contains(id))
    .collect();
    let can_mount = |id: &str| !has_volumes || placement.remote_volumes || id == EMBEDDED_RUNNER;
    if let Some(pinned) = placement.pinned {
        let Some((id, capacity, running)) = live.iter().find(|(id, _, _)| id == pinned) else {
            return Err(DbError::Unavailable(format!(
                "runner {pinned:?} (pinned by the label {PIN_LABEL}) is not live"
            )));
        };
        if !can_mount(id) {
            return Err(DbError::Conflict(format!(
                "runner {pinned:?} runs on another host and cannot mount volumes whose metadata \
                 is in SQLite on the server's disk; run the server with --database postgres://..."
            )));
        }
        if running >= capacity {
            return Err(DbError::Unavailable(format!(
                "runner {pinned:?} is full ({running} of {capacity} sandboxes)"
            )));
        }
        return Ok(id.clone());
    }
    let best = live
        .iter()
        .filter(|(id, capacity, running)| can_mount(id) && running < capacity)
        .min_by(|a, b| {
            // a.running / a.capacity < b.running / b.capacity, without division.
            let (left, right) = (a.2 * b.1, b.2 * a.1);
            left.cmp(&right)
                .then_with(|| (a.0 != EMBEDDED_RUNNER).cmp(&(b.0 != EMBEDDED_RUNNER)))
        });
    match best {
        Some((id, _, _)) => Ok(id.clone()),
        None if live.iter().any(|(_, capacity, running)| running < capacity) => {
            Err(DbError::Unavailable(
                "no live runner can mount these volumes: their metadata is in SQLite on the \
                 server's disk and the server has no embedded runner; run the server with \
                 --database postgres://... to mount volumes on other hosts"
                    .into(),
            ))
        }
        None if live.is_empty() => Err(DbError::Unavailable(
            "no live runner: start `cellar runner` on a host, or the server with its embedded runner"
                .into(),
        )),
        None => Err(DbError::Unavailable(
            "every live runner is at its capacity; retry later or add runners".into(),
        )),
    }
}

/// The label of a create request that pins the sandbox to a runner (a Cellar extension).
pub const PIN_LABEL: &str = "cellar.io/runner";

/// Marks the runner's started and creating sandboxes lost; returns how many.
fn mark_sandboxes_lost(tx: &Tx<'_>, runner_id: &str, reason: &str) -> DbResult<usize> {
    Ok(tx.execute(
        "UPDATE sandboxes SET state = ?2, error_reason = ?3, updated_at = ?4 \
         WHERE runner_id = ?1 AND state IN ('started', 'creating')",
        params![runner_id, sandbox_state::LOST, reason, now()],
    )?)
}

/// Squares what a runner runs with what the server wants of it. Reported sandboxes that the
/// server no longer wants on it are returned, for the runner to destroy; lost sandboxes it still
/// runs are started again. When `rejoined` (a registration, or the first heartbeat after being
/// lost), its sandboxes the server believes running that it no longer runs become errors.
fn reconcile_runner(
    tx: &Tx<'_>,
    runner_id: &str,
    reported: &[String],
    rejoined: bool,
) -> DbResult<Vec<String>> {
    let wanted: Vec<(String, String)> = collect(tx.query_map(
        "SELECT id, state FROM sandboxes WHERE runner_id = ?1 \
         AND state IN ('creating', 'started', 'lost', 'destroying')",
        params![runner_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)?;
    let now = now();
    let destroy = reported
        .iter()
        .filter(|id| !wanted.iter().any(|(wanted, _)| wanted == *id))
        .cloned()
        .collect();
    for (id, state) in &wanted {
        let runs = reported.contains(id);
        if runs && state == sandbox_state::LOST {
            tx.execute(
                "UPDATE sandboxes SET state = ?2, error_reason = NULL, updated_at = ?3 WHERE id = ?1",
                params![id, sandbox_state::STARTED, now],
            )?;
        }
        let believed_running =
            state == sandbox_state::LOST || (state == sandbox_state::STARTED && rejoined);
        if !runs && rejoined && believed_running {
            tx.execute(
                "UPDATE sandboxes SET state = ?2, error_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    id,
                    sandbox_state::ERROR,
                    format!("the sandbox stopped while runner {runner_id} was away"),
                    now
                ],
            )?;
        }
    }
    Ok(destroy)
}
