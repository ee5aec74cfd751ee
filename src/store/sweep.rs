//! The sweeper's statements: orphan candidates, the invariant ledger, the safety-net
//! finaliser, stuck orders, retention and worker reaping. Every write is conditional, so
//! two sweepers at once change nothing twice.

use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::invariants::{OrderLedger, TaskTotals};
use crate::domain::{OrderStatus, TaskSnapshot, TaskStatus};

/// An EXECUTING task whose lease had expired when it was read.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExpiredTask {
    pub id: i64,
    pub order_id: Uuid,
    pub claim_token: Uuid,
    pub claimed_by: Option<Uuid>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub quantity: i32,
    pub delivered: i32,
}

impl ExpiredTask {
    pub fn snapshot(&self) -> TaskSnapshot {
        TaskSnapshot {
            status: TaskStatus::Executing,
            attempts: self.attempts.max(0) as u32,
            max_attempts: self.max_attempts.max(0) as u32,
            quantity: self.quantity.max(0) as u32,
            delivered: self.delivered.max(0) as u32,
        }
    }
}

/// What one retention call moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub tasks_archived: u64,
    pub transitions_archived: u64,
    pub orders_archived: u64,
    pub checks_pruned: u64,
}

/// One snapshot of each order's counters against its tasks' totals.
const LEDGER: &str = r#"
SELECT o.id, o.status, o.quantity, o.delivered, o.failed_permanent_units, o.cancelled_units,
       o.task_count::bigint,
       count(t.id) AS tasks,
       coalesce(sum(t.quantity), 0)::bigint AS t_quantity,
       coalesce(sum(t.delivered), 0)::bigint AS t_delivered,
       coalesce(sum(t.quantity - t.delivered) FILTER (WHERE t.status = 'FAILED_PERMANENT'), 0)::bigint,
       coalesce(sum(t.quantity - t.delivered) FILTER (WHERE t.status = 'CANCELLED'), 0)::bigint,
       coalesce(sum(t.quantity - t.delivered)
                FILTER (WHERE t.status IN ('PENDING', 'EXECUTING', 'FAILED_RETRYING')), 0)::bigint,
       count(t.id) FILTER (WHERE t.status IN ('PENDING', 'EXECUTING', 'FAILED_RETRYING'))
FROM orders o
LEFT JOIN order_tasks t ON t.order_id = o.id
WHERE o.id = ANY($1)
GROUP BY o.id
"#;

type LedgerRow = (
    Uuid,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// Records check results and stamps the orders as audited, in one statement.
const RECORD_CHECKS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::bool[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::bigint[], $8::bigint[], $9::jsonb[])
        AS i(order_id, passed, order_status, expected, delivered, failed, cancelled, outstanding, violations)
),
ins AS (
    INSERT INTO invariant_check_log (order_id, passed, order_status, expected_units, delivered_units,
                                     failed_units, cancelled_units, outstanding_units, violations, checked_by)
    SELECT order_id, passed, order_status, expected, delivered, failed, cancelled, outstanding, violations, $10
    FROM input
)
-- audited_at only schedules the next audit: never wait for (or deadlock with) a writer.
UPDATE orders o SET audited_at = now()
WHERE o.id IN (SELECT id FROM orders WHERE id IN (SELECT order_id FROM input)
               ORDER BY id FOR NO KEY UPDATE SKIP LOCKED)
"#;

const FINALISE: &str = r#"
WITH done AS (
    UPDATE orders o
    SET status = 'COMPLETED', finished_at = now(), updated_at = now(), version = o.version + 1
    WHERE o.status = 'PROCESSING'
      AND o.delivered = o.quantity
      AND NOT EXISTS (SELECT 1 FROM order_tasks t WHERE t.order_id = o.id
                      AND t.status IN ('PENDING', 'EXECUTING', 'FAILED_RETRYING'))
    RETURNING o.id
),
attention AS (
    UPDATE orders o
    SET needs_attention = true, updated_at = now(), version = o.version + 1
    WHERE o.status = 'PROCESSING' AND NOT o.needs_attention
      AND o.failed_permanent_units > 0
      AND o.delivered + o.failed_permanent_units + o.cancelled_units = o.quantity
    RETURNING o.id
),
audit AS (
    INSERT INTO order_task_transitions (order_id, from_state, to_state, transition_reason, actor_id)
    SELECT id, 'PROCESSING', 'COMPLETED', 'finalised_by_sweeper', $1 FROM done
)
SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM attention)
"#;

const ARCHIVE_TASKS: &str = r#"
WITH doomed AS (
    SELECT id FROM orders
    WHERE finished_at < now() - make_interval(days => $1) AND archived_at IS NULL
    ORDER BY finished_at
    LIMIT 100
),
moved AS (
    DELETE FROM order_tasks t
    WHERE t.id IN (SELECT id FROM order_tasks WHERE order_id IN (SELECT id FROM doomed) LIMIT $2)
    RETURNING t.id, t.order_id, t.seq, t.kind, t.quantity, t.delivered, t.status, t.priority,
              t.attempts, t.max_attempts, t.retry_after, t.claimed_by, t.claimed_at,
              t.claim_token, t.lease_expires_at, t.executed_at, t.last_error,
              t.last_error_class, t.created_at, t.updated_at
)
INSERT INTO order_tasks_archive (id, order_id, seq, kind, quantity, delivered, status, priority,
    attempts, max_attempts, retry_after, claimed_by, claimed_at, claim_token, lease_expires_at,
    executed_at, last_error, last_error_class, created_at, updated_at)
SELECT * FROM moved
ON CONFLICT (id) DO NOTHING
"#;

const ARCHIVE_TRANSITIONS: &str = r#"
WITH doomed AS (
    SELECT id FROM orders
    WHERE finished_at < now() - make_interval(days => $1) AND archived_at IS NULL
    ORDER BY finished_at
    LIMIT 100
),
moved AS (
    DELETE FROM order_task_transitions x
    WHERE x.ctid = ANY(ARRAY(SELECT ctid FROM order_task_transitions
                             WHERE order_id IN (SELECT id FROM doomed) LIMIT $2))
    RETURNING x.id, x.task_id, x.order_id, x.occurred_at, x.from_state, x.to_state,
              x.transition_reason, x.error_class, x.actor_id, x.correlation_id, x.attempt
)
INSERT INTO order_task_transitions_archive (id, task_id, order_id, occurred_at, from_state,
    to_state, transition_reason, error_class, actor_id, correlation_id, attempt)
SELECT * FROM moved
"#;

const MARK_ARCHIVED: &str = r#"
UPDATE orders o SET archived_at = now()
WHERE o.id IN (
    SELECT id FROM orders
    WHERE finished_at < now() - make_interval(days => $1) AND archived_at IS NULL
    ORDER BY finished_at LIMIT 1000)
  AND NOT EXISTS (SELECT 1 FROM order_tasks t WHERE t.order_id = o.id)
  AND NOT EXISTS (SELECT 1 FROM order_task_transitions x WHERE x.order_id = o.id)
"#;

impl Store {
    /// EXECUTING tasks whose lease has expired, oldest first.
    pub async fn expired_tasks(&self, limit: u32) -> Result<Vec<ExpiredTask>, StoreError> {
        self.call("listing orphaned tasks", async {
            sqlx::query_as(
                "SELECT id, order_id, claim_token, claimed_by, attempts, max_attempts, quantity, delivered \
                 FROM order_tasks WHERE status = 'EXECUTING' AND lease_expires_at < now() \
                 ORDER BY lease_expires_at LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    /// Orders due for an audit: unfinished orders not audited since they changed (or for
    /// `every_secs`), and orders that finished in the last day and were not audited since.
    /// Both halves walk partial indexes, so the cost follows the live orders, not the
    /// orders table (which keeps every order). Orders past retention are left out: their
    /// rows may be half-way into the archive.
    pub async fn orders_due_for_audit(
        &self,
        limit: u32,
        every_secs: f64,
        retention_days: i32,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.call("choosing orders to audit", async {
            sqlx::query_scalar(
                "SELECT id FROM ( \
                   SELECT id, audited_at FROM orders \
                   WHERE status IN ('PENDING', 'PROCESSING') \
                     AND (audited_at IS NULL OR audited_at < updated_at \
                          OR audited_at < now() - make_interval(secs => $2)) \
                   UNION ALL \
                   SELECT id, audited_at FROM orders \
                   WHERE finished_at IS NOT NULL AND archived_at IS NULL \
                     AND finished_at > greatest(now() - interval '1 day', now() - make_interval(days => $3)) \
                     AND (audited_at IS NULL OR audited_at < updated_at) \
                 ) due ORDER BY audited_at NULLS FIRST LIMIT $1",
            )
            .bind(i64::from(limit))
            .bind(every_secs)
            .bind(retention_days)
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    /// The invariant ledger of each order, read in one snapshot.
    pub async fn order_ledgers(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, OrderLedger)>, StoreError> {
        let rows: Vec<LedgerRow> = self
            .call("reading order ledgers", async {
                sqlx::query_as(LEDGER)
                    .bind(ids)
                    .fetch_all(self.pool())
                    .await
            })
            .await?;
        rows.into_iter()
            .map(|r| {
                let status = OrderStatus::parse(&r.1).ok_or_else(|| StoreError::Invalid {
                    op: "reading order ledgers",
                    message: format!("order {} has unknown status {:?}", r.0, r.1),
                })?;
                Ok((
                    r.0,
                    OrderLedger {
                        status,
                        quantity: r.2,
                        delivered: r.3,
                        failed: r.4,
                        cancelled: r.5,
                        planned_tasks: r.6,
                        tasks: TaskTotals {
                            count: r.7,
                            quantity: r.8,
                            delivered: r.9,
                            failed: r.10,
                            cancelled: r.11,
                            outstanding: r.12,
                            open: r.13,
                        },
                    },
                ))
            })
            .collect()
    }

    /// Appends check results to `invariant_check_log` and stamps the orders as audited.
    pub async fn record_checks(
        &self,
        checks: &[(Uuid, OrderLedger, serde_json::Value)],
        actor: &str,
    ) -> Result<(), StoreError> {
        if checks.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = checks.iter().map(|c| c.0).collect();
        let passed: Vec<bool> = checks
            .iter()
            .map(|c| c.2.as_array().is_some_and(|a| a.is_empty()))
            .collect();
        let status: Vec<&str> = checks.iter().map(|c| c.1.status.as_str()).collect();
        let col = |f: fn(&OrderLedger) -> i64| checks.iter().map(|c| f(&c.1)).collect::<Vec<_>>();
        let violations: Vec<&serde_json::Value> = checks.iter().map(|c| &c.2).collect();
        self.call("recording invariant checks", async {
            sqlx::query(RECORD_CHECKS)
                .bind(&ids)
                .bind(&passed)
                .bind(&status)
                .bind(col(|l| l.quantity))
                .bind(col(|l| l.delivered))
                .bind(col(|l| l.failed))
                .bind(col(|l| l.cancelled))
                .bind(col(|l| l.tasks.outstanding))
                .bind(&violations)
                .bind(actor)
                .execute(self.pool())
                .await
                .map(|_| ())
        })
        .await
    }

    /// Safety net: completes orders whose every unit is delivered and flags those whose
    /// remaining units are all dead-lettered. Returns (completed, flagged).
    pub async fn finalise_orders(&self, actor: &str) -> Result<(u64, u64), StoreError> {
        let (c, a): (i64, i64) = self
            .call("finalising orders", async {
                sqlx::query_as(FINALISE)
                    .bind(actor)
                    .fetch_one(self.pool())
                    .await
            })
            .await?;
        Ok((c as u64, a as u64))
    }

    /// Orders PROCESSING for longer than `older_than_secs`: (id, age in seconds).
    pub async fn stuck_orders(
        &self,
        older_than_secs: f64,
        limit: u32,
    ) -> Result<Vec<(Uuid, f64)>, StoreError> {
        self.call("finding stuck orders", async {
            sqlx::query_as(
                "SELECT id, extract(epoch FROM now() - created_at)::float8 FROM orders \
                 WHERE status = 'PROCESSING' AND created_at < now() - make_interval(secs => $1) \
                 ORDER BY created_at LIMIT $2",
            )
            .bind(older_than_secs)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    /// Moves up to `batch` tasks and `batch` audit rows of orders finished more than
    /// `retention_days` ago to the archive tables, marks fully moved orders archived, and
    /// prunes old invariant checks.
    pub async fn archive_finished(
        &self,
        retention_days: i32,
        batch: u32,
    ) -> Result<RetentionReport, StoreError> {
        let tasks = self
            .call("archiving finished tasks", async {
                sqlx::query(ARCHIVE_TASKS)
                    .bind(retention_days)
                    .bind(i64::from(batch))
                    .execute(self.pool())
                    .await
            })
            .await?
            .rows_affected();
        let transitions = self
            .call("archiving audit rows", async {
                sqlx::query(ARCHIVE_TRANSITIONS)
                    .bind(retention_days)
                    .bind(i64::from(batch))
                    .execute(self.pool())
                    .await
            })
            .await?
            .rows_affected();
        let orders = self
            .call("marking archived orders", async {
                sqlx::query(MARK_ARCHIVED)
                    .bind(retention_days)
                    .execute(self.pool())
                    .await
            })
            .await?
            .rows_affected();
        let checks = self
            .call("pruning old invariant checks", async {
                sqlx::query(
                    "DELETE FROM invariant_check_log WHERE id IN (SELECT id FROM invariant_check_log \
                     WHERE check_timestamp < now() - make_interval(days => $1) LIMIT $2)",
                )
                .bind(retention_days)
                .bind(i64::from(batch))
                .execute(self.pool())
                .await
            })
            .await?
            .rows_affected();
        Ok(RetentionReport {
            tasks_archived: tasks,
            transitions_archived: transitions,
            orders_archived: orders,
            checks_pruned: checks,
        })
    }

    /// Marks processes whose lease expired a minute ago as stopped, and forgets processes
    /// stopped for a day. Returns how many were marked.
    pub async fn reap_workers(&self) -> Result<u64, StoreError> {
        let marked = self
            .call("reaping dead workers", async {
                sqlx::query(
                    "UPDATE workers SET stopped_at = now() WHERE stopped_at IS NULL \
                     AND lease_expires_at < now() - interval '1 minute'",
                )
                .execute(self.pool())
                .await
            })
            .await?
            .rows_affected();
        self.call("forgetting old workers", async {
            sqlx::query("DELETE FROM workers WHERE stopped_at < now() - interval '1 day'")
                .execute(self.pool())
                .await
        })
        .await?;
        Ok(marked)
    }
}
