//! `api_keys` and `admin_audit`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// An API key as stored: never the secret, only its digest.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub digest: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

macro_rules! key_columns {
    () => {
        "id, name, scope, digest, prefix, created_at, revoked_at, last_used_at"
    };
}

/// One audited call.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    pub key_id: Option<Uuid>,
    pub key_name: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub status: i32,
    pub detail: Option<serde_json::Value>,
}

/// An audit row to write.
#[derive(Debug, Clone)]
pub struct NewAudit {
    pub key_id: Option<Uuid>,
    pub key_name: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub status: i32,
    pub detail: Option<serde_json::Value>,
}

impl Store {
    /// The key with this digest, revoked or not. Marks it used (at most once a minute, so
    /// reads do not turn into a write per request).
    pub async fn key_by_digest(&self, digest: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE digest = $1"
        );
        let row: Option<ApiKeyRow> = self
            .call("looking up an API key", async {
                sqlx::query_as(SQL)
                    .bind(digest)
                    .fetch_optional(self.pool())
                    .await
            })
            .await?;
        if let Some(k) = &row
            && k.revoked_at.is_none()
            && k.last_used_at
                .is_none_or(|t| (Utc::now() - t).num_seconds() > 60)
        {
            self.call("marking an API key used", async {
                sqlx::query(
                    "UPDATE api_keys SET last_used_at = now() WHERE id = $1 \
                     AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
                )
                .bind(k.id)
                .execute(self.pool())
                .await
            })
            .await?;
        }
        Ok(row)
    }

    pub async fn create_key(
        &self,
        name: &str,
        scope: &str,
        digest: &str,
        prefix: &str,
        created_by: Option<Uuid>,
    ) -> Result<ApiKeyRow, StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO api_keys (id, name, scope, digest, prefix, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
            key_columns!()
        );
        self.call("creating an API key", async {
            sqlx::query_as(SQL)
                .bind(Uuid::now_v7())
                .bind(name)
                .bind(scope)
                .bind(digest)
                .bind(prefix)
                .bind(created_by)
                .fetch_one(self.pool())
                .await
        })
        .await
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKeyRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys ORDER BY created_at, id"
        );
        self.call("listing API keys", async {
            sqlx::query_as(SQL).fetch_all(self.pool()).await
        })
        .await
    }

    /// Revokes a key (again is harmless: the first revocation time is kept).
    pub async fn revoke_key(&self, id: Uuid) -> Result<Option<ApiKeyRow>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING ",
            key_columns!()
        );
        self.call("revoking an API key", async {
            sqlx::query_as(SQL)
                .bind(id)
                .fetch_optional(self.pool())
                .await
        })
        .await
    }

    /// Replaces a live key by a new one with the same name and scope, in one statement:
    /// the old key is revoked exactly when the new one exists. None if `id` is unknown or
    /// already revoked.
    pub async fn rotate_key(
        &self,
        id: Uuid,
        digest: &str,
        prefix: &str,
        created_by: Option<Uuid>,
    ) -> Result<Option<ApiKeyRow>, StoreError> {
        const SQL: &str = concat!(
            "WITH old AS (UPDATE api_keys SET revoked_at = now() \
                          WHERE id = $1 AND revoked_at IS NULL RETURNING name, scope) \
             INSERT INTO api_keys (id, name, scope, digest, prefix, created_by) \
             SELECT $2, name, scope, $3, $4, $5 FROM old RETURNING ",
            key_columns!()
        );
        self.call("rotating an API key", async {
            sqlx::query_as(SQL)
                .bind(id)
                .bind(Uuid::now_v7())
                .bind(digest)
                .bind(prefix)
                .bind(created_by)
                .fetch_optional(self.pool())
                .await
        })
        .await
    }

    /// Makes the configured bootstrap admin key the only live bootstrap key. Idempotent, so
    /// every replica can run it at start.
    pub async fn ensure_bootstrap_key(&self, digest: &str, prefix: &str) -> Result<(), StoreError> {
        self.call("installing the bootstrap admin key", async {
            sqlx::query(
                "WITH stale AS (UPDATE api_keys SET revoked_at = now() \
                                WHERE bootstrap AND digest <> $1 AND revoked_at IS NULL) \
                 INSERT INTO api_keys (id, name, scope, digest, prefix, bootstrap) \
                 VALUES ($2, 'bootstrap', 'admin', $1, $3, true) \
                 ON CONFLICT (digest) DO NOTHING",
            )
            .bind(digest)
            .bind(Uuid::now_v7())
            .bind(prefix)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    /// Writes the audit row of a call about to run, with status 0 ("under way"); returns its
    /// id for [`Store::finish_audit`].
    pub async fn begin_audit(&self, a: &NewAudit) -> Result<i64, StoreError> {
        self.call("writing the admin audit", async {
            sqlx::query_scalar(
                "INSERT INTO admin_audit (key_id, key_name, action, target, status, detail) \
                 VALUES ($1, $2, $3, $4, 0, $5) RETURNING id",
            )
            .bind(a.key_id)
            .bind(&a.key_name)
            .bind(&a.action)
            .bind(&a.target)
            .bind(&a.detail)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Records how the call of audit row `id` ended.
    pub async fn finish_audit(
        &self,
        id: i64,
        status: i32,
        detail: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.call("completing the admin audit", async {
            sqlx::query(
                "UPDATE admin_audit SET status = $2, detail = coalesce($3, detail) WHERE id = $1",
            )
            .bind(id)
            .bind(status)
            .bind(detail)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    pub async fn write_audit(&self, a: &NewAudit) -> Result<(), StoreError> {
        self.call("writing the admin audit", async {
            sqlx::query(
                "INSERT INTO admin_audit (key_id, key_name, action, target, status, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(a.key_id)
            .bind(&a.key_name)
            .bind(&a.action)
            .bind(&a.target)
            .bind(a.status)
            .bind(&a.detail)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    /// Audit rows newest first, before the id `before`.
    pub async fn list_audit(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.call("reading the admin audit", async {
            sqlx::query_as(
                "SELECT id, occurred_at, key_id, key_name, action, target, status, detail \
                 FROM admin_audit WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            )
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
        })
        .await
    }
}
