//! Operator actions on one order: cancel, accept a shortfall (PARTIAL), pause, resume, retry
//! now, and replay the dead-letter queue. What the old runbooks did with hand-written SQL.
//!
//! Each action is one short transaction that locks the order row first, asks the domain
//! what the order and each task become (`decide_order`, `decide`), and writes exactly that,
//! re-checking every task's status in the write. Transactions run in a spawned task, so a
//! client that disconnects mid-call (axum drops the handler) cannot leave a connection
//! inside a transaction (sqlx #4393).

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::state::{OrderEvent, RetryAt, decide, decide_order};
use crate::domain::{Backoff, OrderStatus, TaskEvent, TaskSnapshot, TaskStatus, Transition};

/// What an operator asks of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderAction {
    /// Cancel every task not yet running; running attempts finish and are recorded.
    Cancel,
    /// Accept what was delivered (PARTIAL); the rest is cancelled like `Cancel`.
    ForceComplete,
    /// Stop claiming this order's tasks.
    Pause,
    Resume,
    /// Make every waiting task claimable now (resets `retry_after`).
    RetryNow,
    /// Replay the dead-lettered tasks with a fresh attempt budget.
    DrainDlq,
}

impl OrderAction {
    pub fn name(self) -> &'static str {
        match self {
            OrderAction::Cancel => "cancel",
            OrderAction::ForceComplete => "force-complete",
            OrderAction::Pause => "pause",
            OrderAction::Resume => "resume",
            OrderAction::RetryNow => "retry",
            OrderAction::DrainDlq => "drain-dlq",
        }
    }
}

/// The result of an operator action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionOutcome {
    NotFound,
    /// The order's status does not allow the action.
    Conflict {
        status: String,
        reason: String,
    },
    Done {
        tasks: u64,
        units: i64,
    },
    /// The order row stayed locked (a giant order being fanned out): try again shortly.
    Busy,
}

/// A task row an action may change, locked.
#[derive(Debug, sqlx::FromRow)]
struct OpenTask {
    id: i64,
    status: String,
    attempts: i32,
    max_attempts: i32,
    quantity: i32,
    delivered: i32,
}

const WRITE_TASKS: &str = concat!(
    r#"
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::bool[], $6::text[])
        AS i(id, from_state, to_state, attempts, retry_now, reason)
),
upd AS (
    UPDATE order_tasks t
    SET status = i.to_state,
        attempts = i.attempts,
        retry_after = CASE WHEN i.retry_now THEN now() ELSE t.retry_after END,
        updated_at = now()
    FROM input i
    WHERE t.id = i.id AND t.status = i.from_state
    RETURNING t.id, t.order_id, i.from_state, t.status, i.reason, t.attempts, t.seq, t.kind,
              t.priority
),
-- The ready ring (migration 0005) follows: a task that leaves PENDING loses its ring row,
-- one that becomes PENDING gets one.
unready AS (
    DELETE FROM task_ready r
    WHERE r.task_id = ANY(ARRAY(SELECT id FROM upd WHERE from_state = 'PENDING'
                                                     AND status <> 'PENDING'))
),
ready AS (
    "#,
    insert_ready_rows!("upd WHERE status = 'PENDING' AND from_state <> 'PENDING'"),
    r#"
)
INSERT INTO order_task_transitions (task_id, order_id, from_state, to_state, transition_reason, actor_id, attempt)
SELECT id, order_id, from_state, status, reason, $7, attempts FROM upd
RETURNING task_id
"#
);

impl Store {
    /// Applies `action` to order `id` as `actor`.
    pub async fn order_action(
        &self,
        id: Uuid,
        action: OrderAction,
        actor: &str,
    ) -> Result<ActionOutcome, StoreError> {
        let store = self.clone();
        let actor = actor.to_owned();
        let caller = self.clone();
        let work = async move {
            let mut tx = store.pool().begin().await?;
            // An operator call waits a little for the order row, never for a whole fan-out.
            sqlx::query("SET LOCAL lock_timeout = '3s'")
                .execute(&mut *tx)
                .await?;
            let outcome = match run_action(&mut tx, id, action, &actor).await {
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                    return Ok(ActionOutcome::Busy);
                }
                other => other?,
            };
            tx.commit().await?;
            if matches!(
                (action, &outcome),
                (
                    OrderAction::Resume | OrderAction::RetryNow | OrderAction::DrainDlq,
                    ActionOutcome::Done { .. }
                )
            ) {
                store.wake_tasks();
            }
            Ok::<_, sqlx::Error>(outcome)
        };
        let handle =
            tokio::spawn(async move { caller.call("applying an operator action", work).await });
        handle.await.map_err(|e| StoreError::Invalid {
            op: "applying an operator action",
            message: e.to_string(),
        })?
    }

    /// Finishes cancelled and PARTIAL orders whose last attempts have now ended: cancels
    /// tasks that came back to the queue after the order was closed and lifts the claim hold
    /// once nothing of the order is running. Conditional, so concurrent sweepers are harmless.
    pub async fn close_out_finished_orders(
        &self,
        limit: u32,
        actor: &str,
    ) -> Result<u64, StoreError> {
        let ids: Vec<Uuid> = self
            .call("finding closed orders still held", async {
                sqlx::query_scalar(
                    "SELECT id FROM orders WHERE paused AND status IN ('COMPLETED', 'PARTIAL', 'CANCELLED') \
                     ORDER BY id LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
            })
            .await?;
        let mut closed = 0;
        let started = std::time::Instant::now();
        for id in ids {
            let store = self.clone();
            let actor = actor.to_owned();
            let work = async move {
                let mut tx = store.pool().begin().await?;
                let n = close_out(&mut tx, id, &actor).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(n)
            };
            let caller = self.clone();
            let r = tokio::spawn(async move { caller.call("closing out an order", work).await })
                .await
                .map_err(|e| StoreError::Invalid {
                    op: "closing out an order",
                    message: e.to_string(),
                })??;
            closed += r;
            // One batch per order per pass keeps a pass short; a huge cancelled order is
            // closed out over consecutive passes.
            if started.elapsed() > std::time::Duration::from_secs(2) {
                break;
            }
        }
        Ok(closed)
    }
}

async fn lock_order(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
) -> Result<Option<(OrderStatus, bool)>, sqlx::Error> {
    let row: Option<(String, bool)> =
        sqlx::query_as("SELECT status, paused FROM orders WHERE id = $1 FOR NO KEY UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.and_then(|(s, p)| OrderStatus::parse(&s).map(|s| (s, p))))
}

/// Most tasks one operator transaction changes. Larger orders are finished in batches:
/// cancel closes the order at once and the sweeper's close-out cancels the rest, so no
/// call holds locks for long however big the order.
pub const TASK_BATCH: i64 = 5000;

async fn lock_tasks(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    statuses: &[&str],
) -> Result<Vec<OpenTask>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, status, attempts, max_attempts, quantity, delivered FROM order_tasks \
         WHERE order_id = $1 AND status = ANY($2) ORDER BY id LIMIT $3 FOR UPDATE",
    )
    .bind(id)
    .bind(statuses)
    .bind(TASK_BATCH)
    .fetch_all(&mut **tx)
    .await
}

async fn open_count(tx: &mut Transaction<'static, Postgres>, id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM order_tasks WHERE order_id = $1 \
         AND status IN ('PENDING', 'EXECUTING', 'FAILED_RETRYING')",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await
}

/// Decides `event` for every task; the draw and backoff do not matter for operator events.
fn decide_all(tasks: &[OpenTask], event: &TaskEvent) -> Vec<(i64, Transition)> {
    tasks
        .iter()
        .filter_map(|t| {
            let snap = TaskSnapshot {
                status: TaskStatus::parse(&t.status)?,
                attempts: t.attempts.max(0) as u32,
                max_attempts: t.max_attempts.max(0) as u32,
                quantity: t.quantity.max(0) as u32,
                delivered: t.delivered.max(0) as u32,
            };
            decide(&snap, event, &Backoff::DEFAULT, 0.0)
                .ok()
                .map(|tr| (t.id, tr))
        })
        .collect()
}

async fn write_tasks(
    tx: &mut Transaction<'static, Postgres>,
    decided: &[(i64, Transition)],
    actor: &str,
) -> Result<u64, sqlx::Error> {
    if decided.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = decided.iter().map(|d| d.0).collect();
    let from: Vec<&str> = decided.iter().map(|d| d.1.from.as_str()).collect();
    let to: Vec<&str> = decided.iter().map(|d| d.1.to.as_str()).collect();
    let attempts: Vec<i32> = decided.iter().map(|d| d.1.attempts as i32).collect();
    let now: Vec<bool> = decided
        .iter()
        .map(|d| d.1.retry_at == RetryAt::Now)
        .collect();
    let reasons: Vec<&str> = decided.iter().map(|d| d.1.reason).collect();
    let written: Vec<Option<i64>> = sqlx::query_scalar(WRITE_TASKS)
        .bind(&ids)
        .bind(&from)
        .bind(&to)
        .bind(&attempts)
        .bind(&now)
        .bind(&reasons)
        .bind(actor)
        .fetch_all(&mut **tx)
        .await?;
    Ok(written.len() as u64)
}

async fn order_transition(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    from: OrderStatus,
    to: OrderStatus,
    reason: &str,
    actor: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO order_task_transitions (order_id, from_state, to_state, transition_reason, actor_id) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(reason)
    .bind(actor)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

const WAITING: [&str; 2] = ["PENDING", "FAILED_RETRYING"];

async fn run_action(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    action: OrderAction,
    actor: &str,
) -> Result<ActionOutcome, sqlx::Error> {
    let Some((status, _paused)) = lock_order(tx, id).await? else {
        return Ok(ActionOutcome::NotFound);
    };
    let conflict = |reason: &str| ActionOutcome::Conflict {
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
    };
    match action {
        OrderAction::Cancel | OrderAction::ForceComplete => {
            let (event, reason) = if action == OrderAction::Cancel {
                (OrderEvent::Cancel, "cancelled_by_operator")
            } else {
                (OrderEvent::AcceptPartial, "partial_accepted")
            };
            let next = match decide_order(status, event) {
                Ok(Some(next)) => next,
                _ => {
                    return Ok(conflict(&format!(
                        "an order that is {status} cannot be {}",
                        if action == OrderAction::Cancel {
                            "cancelled"
                        } else {
                            "force-completed (only PROCESSING orders can)"
                        }
                    )));
                }
            };
            let tasks = lock_tasks(tx, id, &WAITING).await?;
            let decided = decide_all(&tasks, &TaskEvent::Cancelled);
            let n = write_tasks(tx, &decided, actor).await?;
            let mut cancelled: i64 = decided.iter().map(|d| d.1.cancelled_units_delta).sum();
            if status == OrderStatus::Pending {
                // No tasks yet: every unit is cancelled.
                cancelled = sqlx::query_scalar("SELECT quantity FROM orders WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await?;
            }
            // Still open (running, or past this batch): held from claims until close-out.
            let open = open_count(tx, id).await?;
            sqlx::query(
                "UPDATE orders SET status = $2, cancelled_units = cancelled_units + $3, \
                 paused = $4, needs_attention = false, finished_at = now(), updated_at = now(), \
                 version = version + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(next.as_str())
            .bind(cancelled)
            .bind(open > 0)
            .execute(&mut **tx)
            .await?;
            order_transition(tx, id, status, next, reason, actor).await?;
            Ok(ActionOutcome::Done {
                tasks: n,
                units: cancelled,
            })
        }
        OrderAction::Pause | OrderAction::Resume => {
            if status.is_final() {
                return Ok(conflict(&format!(
                    "an order that is {status} cannot be paused or resumed"
                )));
            }
            sqlx::query(
                "UPDATE orders SET paused = $2, updated_at = now(), version = version + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(action == OrderAction::Pause)
            .execute(&mut **tx)
            .await?;
            Ok(ActionOutcome::Done { tasks: 0, units: 0 })
        }
        OrderAction::RetryNow => {
            let n = sqlx::query(
                "UPDATE order_tasks SET retry_after = now(), updated_at = now() \
                 WHERE id IN (SELECT id FROM order_tasks WHERE order_id = $1 \
                              AND status IN ('PENDING', 'FAILED_RETRYING') AND retry_after > now() \
                              LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(id)
            .bind(TASK_BATCH)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(ActionOutcome::Done { tasks: n, units: 0 })
        }
        OrderAction::DrainDlq => {
            if status != OrderStatus::Processing {
                return Ok(conflict(&format!(
                    "only a PROCESSING order's dead letters can be replayed; this one is {status}"
                )));
            }
            let tasks = lock_tasks(tx, id, &["FAILED_PERMANENT"]).await?;
            let decided = decide_all(&tasks, &TaskEvent::Replayed);
            let n = write_tasks(tx, &decided, actor).await?;
            let units: i64 = -decided.iter().map(|d| d.1.failed_units_delta).sum::<i64>();
            sqlx::query(
                "UPDATE orders SET failed_permanent_units = failed_permanent_units - $2, \
                 needs_attention = false, \
                 notified_event = CASE WHEN notified_event = 'NEEDS_ATTENTION' THEN NULL ELSE notified_event END, \
                 updated_at = now(), version = version + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(units)
            .execute(&mut **tx)
            .await?;
            Ok(ActionOutcome::Done { tasks: n, units })
        }
    }
}

async fn close_out(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    actor: &str,
) -> Result<u64, sqlx::Error> {
    let Some((status, paused)) = lock_order(tx, id).await? else {
        return Ok(0);
    };
    if !status.is_final() || !paused {
        return Ok(0);
    }
    let tasks = lock_tasks(tx, id, &WAITING).await?;
    let decided = decide_all(&tasks, &TaskEvent::Cancelled);
    write_tasks(tx, &decided, actor).await?;
    let cancelled: i64 = decided.iter().map(|d| d.1.cancelled_units_delta).sum();
    let open = open_count(tx, id).await?;
    sqlx::query(
        "UPDATE orders SET cancelled_units = cancelled_units + $2, paused = $3, updated_at = now(), \
         version = version + 1 WHERE id = $1",
    )
    .bind(id)
    .bind(cancelled)
    .bind(open > 0)
    .execute(&mut **tx)
    .await?;
    Ok(u64::from(open == 0))
}
