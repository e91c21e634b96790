//! Credentials of the S3 gateway (`s3_credentials`).

use cellar_sql::{params, OptionalExtension, Row};

use super::{collect, now, ControlDb, DbResult};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3CredentialRow {
    pub access_key_id: String,
    pub org_id: String,
    pub volume_id: String,
    pub prefix: String,
    pub read_only: bool,
    /// Milliseconds since the epoch; `None`: never.
    pub expires_at_ms: Option<i64>,
    pub created_at: String,
}

const COLUMNS: &str =
    "access_key_id, org_id, volume_id, prefix, read_only, expires_at_ms, created_at";

fn from_row(row: &Row) -> cellar_sql::Result<S3CredentialRow> {
    Ok(S3CredentialRow {
        access_key_id: row.get(0)?,
        org_id: row.get(1)?,
        volume_id: row.get(2)?,
        prefix: row.get(3)?,
        read_only: row.get::<_, i64>(4)? != 0,
        expires_at_ms: row.get(5)?,
        created_at: row.get(6)?,
    })
}

impl ControlDb {
    pub fn insert_s3_credential(&self, row: &S3CredentialRow) -> DbResult<()> {
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO s3_credentials ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    row.access_key_id,
                    row.org_id,
                    row.volume_id,
                    row.prefix,
                    i64::from(row.read_only),
                    row.expires_at_ms,
                    row.created_at
                ],
            )?;
            Ok(())
        })
    }

    /// The unrevoked credential with this access key id.
    pub fn s3_credential(&self, access_key_id: &str) -> DbResult<Option<S3CredentialRow>> {
        self.read(|tx| {
            let sql = format!(
                "SELECT {COLUMNS} FROM s3_credentials WHERE access_key_id = ?1 AND revoked_at IS NULL"
            );
            Ok(tx
                .query_row(&sql, params![access_key_id], from_row)
                .optional()?)
        })
    }

    /// The unrevoked credentials of a volume, oldest first.
    pub fn list_s3_credentials(
        &self,
        org_id: &str,
        volume_id: &str,
    ) -> DbResult<Vec<S3CredentialRow>> {
        self.read(|tx| {
            let sql = format!(
                "SELECT {COLUMNS} FROM s3_credentials \
                 WHERE org_id = ?1 AND volume_id = ?2 AND revoked_at IS NULL \
                 ORDER BY created_at, access_key_id"
            );
            collect(tx.query_map(&sql, params![org_id, volume_id], from_row)?)
        })
    }

    /// Revokes a volume's credential; returns whether one was.
    pub fn revoke_s3_credential(
        &self,
        org_id: &str,
        volume_id: &str,
        access_key_id: &str,
    ) -> DbResult<bool> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE s3_credentials SET revoked_at = ?4 \
                 WHERE org_id = ?1 AND volume_id = ?2 AND access_key_id = ?3 AND revoked_at IS NULL",
                params![org_id, volume_id, access_key_id, now()],
            )? > 0)
        })
    }
}
