//! `order_callbacks`: order notifications, queued by the sweeper and delivered by workers
//! with the same discipline as tasks (SKIP LOCKED claim, token-fenced finish, backoff).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// A notification as stored (and as the API shows it).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct CallbackRow {
    pub id: i64,
    pub order_id: Uuid,
    pub event: String,
    pub url: String,
    pub format: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub response_status: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A claimed notification attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallbackJob {
    pub id: i64,
    pub order_id: Uuid,
    pub event: String,
    pub url: String,
    pub format: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub max_attempts: i32,
    pub claim_token: Uuid,
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub struct CallbackResult {
    pub delivered: bool,
    pub response_status: Option<i32>,
    pub error: Option<String>,
    /// When not delivered: wait this long (ignored once attempts are exhausted).
    pub retry_in: Duration,
}

/// Orders that reached a final state or need attention, and have not been notified of it,
/// get one notification each. The order row is updated in the same statement (and locked
/// with SKIP LOCKED), so two sweepers never enqueue the same event twice.
const ENQUEUE: &str = r#"
WITH due AS (
    SELECT id, CASE WHEN status = 'PROCESSING' THEN 'NEEDS_ATTENTION' ELSE status END AS event
    FROM orders
    WHERE callback_url IS NOT NULL
      AND (status IN ('COMPLETED', 'PARTIAL', 'CANCELLED') OR (status = 'PROCESSING' AND needs_attention))
      AND notified_event IS DISTINCT FROM (CASE WHEN status = 'PROCESSING' THEN 'NEEDS_ATTENTION'
                                                ELSE status END)
    ORDER BY updated_at
    LIMIT $1
    FOR NO KEY UPDATE SKIP LOCKED
),
upd AS (
    UPDATE orders o SET notified_event = d.event
    FROM due d
    WHERE o.id = d.id
    RETURNING o.id, d.event, o.callback_url, o.callback_format,
              jsonb_build_object(
                  'event', d.event,
                  'occurred_at', now(),
                  'order', jsonb_build_object(
                      'id', o.id, 'kind', o.kind, 'target', o.target, 'status', o.status,
                      'quantity', o.quantity, 'delivered', o.delivered,
                      'failed_permanent_units', o.failed_permanent_units,
                      'cancelled_units', o.cancelled_units, 'needs_attention', o.needs_attention,
                      'created_at', o.created_at, 'finished_at', o.finished_at)) AS payload
)
INSERT INTO order_callbacks (order_id, event, url, format, payload, max_attempts)
SELECT id, event, callback_url, callback_format, payload, $2 FROM upd
RETURNING id
"#;

const CLAIM: &str = r#"
WITH picked AS (
    SELECT id FROM order_callbacks
    WHERE status = 'PENDING' AND next_attempt_at <= now() AND attempts < max_attempts
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE order_callbacks c
SET attempts = c.attempts + 1, claim_token = gen_random_uuid(),
    locked_until = now() + make_interval(secs => $2)
FROM picked p
WHERE c.id = p.id
RETURNING c.id, c.order_id, c.event, c.url, c.format, c.payload, c.attempts, c.max_attempts, c.claim_token
"#;

impl Store {
    /// Queues notifications for up to `limit` orders. Returns how many were queued.
    pub async fn enqueue_callbacks(
        &self,
        limit: u32,
        max_attempts: i32,
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = self
            .call("queueing order callbacks", async {
                sqlx::query_scalar(ENQUEUE)
                    .bind(i64::from(limit))
                    .bind(max_attempts)
                    .fetch_all(self.pool())
                    .await
            })
            .await?;
        Ok(ids.len() as u64)
    }

    /// Claims due notifications; the claim lasts `lock`.
    pub async fn claim_callbacks(
        &self,
        limit: u32,
        lock: Duration,
    ) -> Result<Vec<CallbackJob>, StoreError> {
        self.call("claiming callbacks", async {
            sqlx::query_as(CLAIM)
                .bind(i64::from(limit))
                .bind(lock.as_secs_f64())
                .fetch_all(self.pool())
                .await
        })
        .await
    }

    /// Records an attempt, fenced by its claim token. Exhausted notifications end FAILED.
    pub async fn finish_callback(
        &self,
        job: &CallbackJob,
        r: &CallbackResult,
    ) -> Result<bool, StoreError> {
        let n = self
            .call("recording a callback attempt", async {
                sqlx::query(
                    "UPDATE order_callbacks SET \
                       status = CASE WHEN $3 THEN 'DELIVERED' WHEN attempts >= max_attempts THEN 'FAILED' ELSE 'PENDING' END, \
                       delivered_at = CASE WHEN $3 THEN now() END, \
                       next_attempt_at = CASE WHEN $3 THEN next_attempt_at ELSE now() + make_interval(secs => $6) END, \
                       response_status = $4, last_error = $5, claim_token = NULL, locked_until = NULL \
                     WHERE id = $1 AND claim_token = $2 AND status = 'PENDING'",
                )
                .bind(job.id)
                .bind(job.claim_token)
                .bind(r.delivered)
                .bind(r.response_status)
                .bind(&r.error)
                .bind(r.retry_in.as_secs_f64())
                .execute(self.pool())
                .await
            })
            .await?;
        Ok(n.rows_affected() == 1)
    }

    /// Notifications whose last claim lapsed with no attempts left end FAILED.
    pub async fn fail_exhausted_callbacks(&self) -> Result<u64, StoreError> {
        let n = self
            .call("failing exhausted callbacks", async {
                sqlx::query(
                    "UPDATE order_callbacks SET status = 'FAILED', claim_token = NULL, \
                       last_error = coalesce(last_error, 'attempts exhausted') \
                     WHERE status = 'PENDING' AND attempts >= max_attempts \
                       AND (locked_until IS NULL OR locked_until < now())",
                )
                .execute(self.pool())
                .await
            })
            .await?;
        Ok(n.rows_affected())
    }

    pub async fn order_callbacks(&self, order: Uuid) -> Result<Vec<CallbackRow>, StoreError> {
        self.call("listing an order's callbacks", async {
            sqlx::query_as(
                "SELECT id, order_id, event, url, format, status, attempts, last_error, response_status, \
                        created_at, next_attempt_at, delivered_at \
                 FROM order_callbacks WHERE order_id = $1 ORDER BY id",
            )
            .bind(order)
            .fetch_all(self.pool())
            .await
        })
        .await
    }
}
