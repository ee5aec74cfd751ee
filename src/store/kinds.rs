//! `kinds`: each kind's handler and policy.

use chrono::{DateTime, Utc};

use super::{Store, StoreError};

/// A kind as stored. `webhook` holds the webhook settings (see `kinds::WebhookSettings`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct KindRow {
    pub name: String,
    pub handler: String,
    pub webhook: Option<serde_json::Value>,
    pub max_attempts: i32,
    pub backoff_base_sec: f64,
    pub backoff_multiplier: f64,
    pub backoff_max_sec: f64,
    pub default_chunk_size: i32,
    pub concurrency_limit: Option<i32>,
    pub paused: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

macro_rules! kind_columns {
    () => {
        "name, handler, webhook, max_attempts, backoff_base_sec, backoff_multiplier, \
         backoff_max_sec, default_chunk_size, concurrency_limit, paused, created_at, updated_at"
    };
}

const UPSERT: &str = concat!(
    "INSERT INTO kinds (name, handler, webhook, max_attempts, backoff_base_sec, backoff_multiplier, \
       backoff_max_sec, default_chunk_size, concurrency_limit, paused) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (name) DO UPDATE SET handler = EXCLUDED.handler, webhook = EXCLUDED.webhook, \
       max_attempts = EXCLUDED.max_attempts, backoff_base_sec = EXCLUDED.backoff_base_sec, \
       backoff_multiplier = EXCLUDED.backoff_multiplier, backoff_max_sec = EXCLUDED.backoff_max_sec, \
       default_chunk_size = EXCLUDED.default_chunk_size, \
       concurrency_limit = EXCLUDED.concurrency_limit, paused = EXCLUDED.paused, updated_at = now() \
     RETURNING ",
    kind_columns!()
);

/// Why a kind cannot be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteKind {
    Deleted,
    NotFound,
    /// It still has this many unfinished orders.
    InUse(i64),
}

impl Store {
    pub async fn list_kinds(&self) -> Result<Vec<KindRow>, StoreError> {
        const SQL: &str = concat!("SELECT ", kind_columns!(), " FROM kinds ORDER BY name");
        self.call("listing kinds", async {
            sqlx::query_as(SQL).fetch_all(self.pool()).await
        })
        .await
    }

    pub async fn get_kind(&self, name: &str) -> Result<Option<KindRow>, StoreError> {
        const SQL: &str = concat!("SELECT ", kind_columns!(), " FROM kinds WHERE name = $1");
        self.call("reading a kind", async {
            sqlx::query_as(SQL)
                .bind(name)
                .fetch_optional(self.pool())
                .await
        })
        .await
    }

    /// Creates or replaces a kind (`created_at` and `updated_at` are ignored).
    pub async fn put_kind(&self, k: &KindRow) -> Result<KindRow, StoreError> {
        self.call("writing a kind", async {
            sqlx::query_as(UPSERT)
                .bind(&k.name)
                .bind(&k.handler)
                .bind(&k.webhook)
                .bind(k.max_attempts)
                .bind(k.backoff_base_sec)
                .bind(k.backoff_multiplier)
                .bind(k.backoff_max_sec)
                .bind(k.default_chunk_size)
                .bind(k.concurrency_limit)
                .bind(k.paused)
                .fetch_one(self.pool())
                .await
        })
        .await
    }

    pub async fn set_kind_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Option<KindRow>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE kinds SET paused = $2, updated_at = now() WHERE name = $1 RETURNING ",
            kind_columns!()
        );
        let row = self
            .call("pausing a kind", async {
                sqlx::query_as(SQL)
                    .bind(name)
                    .bind(paused)
                    .fetch_optional(self.pool())
                    .await
            })
            .await?;
        if !paused {
            self.wake_tasks();
        }
        Ok(row)
    }

    /// Deletes a kind that no unfinished order uses.
    pub async fn delete_kind(&self, name: &str) -> Result<DeleteKind, StoreError> {
        let (deleted, in_use): (i64, i64) = self
            .call("deleting a kind", async {
                sqlx::query_as(
                    "WITH busy AS (SELECT count(*) AS n FROM orders \
                                   WHERE kind = $1 AND status IN ('PENDING', 'PROCESSING')), \
                     del AS (DELETE FROM kinds WHERE name = $1 AND (SELECT n FROM busy) = 0 RETURNING 1) \
                     SELECT (SELECT count(*) FROM del), (SELECT n FROM busy)",
                )
                .bind(name)
                .fetch_one(self.pool())
                .await
            })
            .await?;
        Ok(if deleted > 0 {
            DeleteKind::Deleted
        } else if in_use > 0 {
            DeleteKind::InUse(in_use)
        } else {
            DeleteKind::NotFound
        })
    }
}
