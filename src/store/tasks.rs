//! `order_tasks`: the claim and the fenced, batched finishing write.

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::state::{RetryAt, Transition};
use crate::domain::{TaskSnapshot, TaskStatus};

/// A task this worker now holds. `(id, claim_token)` fences every write about it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedTask {
    pub id: i64,
    pub order_id: Uuid,
    pub seq: i32,
    pub kind: String,
    pub quantity: i32,
    pub delivered: i32,
    /// Attempt number of this claim (1-based).
    pub attempts: i32,
    pub max_attempts: i32,
    /// One token per claim statement, shared by the tasks it claimed: with the task id it
    /// names this claim of this task, and fences every write about it.
    pub claim_token: Uuid,
    pub target: String,
    pub trace_context: Option<String>,
    /// `kinds.updated_at` of the task's kind when it was claimed (None: not a stored kind),
    /// so a worker notices a changed kind before it runs the task.
    pub kind_version: Option<chrono::DateTime<chrono::Utc>>,
    /// Seconds from the task becoming claimable (created, or its retry due) to this claim.
    pub pickup_secs: f64,
    /// For a re-run (attempt 2 and later): seconds since the previous attempt ended (failed,
    /// or was rescued as an orphan) — the recovery time operators track.
    pub recovery_secs: Option<f64>,
}

impl ClaimedTask {
    pub fn snapshot(&self) -> TaskSnapshot {
        TaskSnapshot {
            status: TaskStatus::Executing,
            attempts: self.attempts.max(0) as u32,
            max_attempts: self.max_attempts.max(0) as u32,
            quantity: self.quantity.max(0) as u32,
            delivered: self.delivered.max(0) as u32,
        }
    }

    /// Stable across attempts: the receiver deduplicates on it.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.order_id, self.seq)
    }
}

/// One decided transition of a claimed task, ready to be written.
#[derive(Debug, Clone)]
pub struct TaskUpdate {
    pub task_id: i64,
    pub claim_token: Uuid,
    pub transition: Transition,
    pub error: Option<String>,
}

/// What must still hold for a finishing write to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateFence {
    /// The writer still holds the claim (token matches, task still EXECUTING).
    Claim,
    /// The sweeper's rescue: the claim is unchanged AND its lease has expired, re-checked in
    /// the write itself (a task that completed since it was read is left alone).
    ExpiredLease,
}

/// Tasks of one order a claim takes in a row before another order's turn (the `64` in
/// `CLAIM`, in the ring rows' `run` (`seq / 64`) and in migration 0004's index expression,
/// which must all match it).
pub const CLAIM_RUN: i32 = 64;

/// Claims up to `limit` tasks of the given kinds in one statement.
///
/// Candidates come from two places, each walked in its own index order and locked with
/// `FOR UPDATE SKIP LOCKED`:
/// - new work (PENDING) from the ready ring `task_ready` (migration 0005), in the order of
///   `task_ready_claim_idx`: priority, then runs of [`CLAIM_RUN`] tasks (`seq / 64`), then
///   id. Orders interleave run by run: a small order's first run competes with a giant
///   order's next run, not its last, while one batch still takes whole runs of few orders;
/// - due retries (FAILED_RETRYING) through `order_tasks_retry_idx`, oldest due first.
///
/// The tasks themselves are then locked by primary key and re-checked (still claimable,
/// due, attempts left), and the best `limit` of them by (priority, run, id) are claimed.
/// The ring rows of claimed tasks are deleted in the same statement, and so are ring rows
/// whose task is no longer PENDING (a pointer the claim found stale). Neither walk meets
/// the entries of tasks claimed long ago, which is what keeps the claim flat while a
/// pinned xmin keeps vacuum from removing them (see migration 0005).
/// The global pause and batch-size override from `tally_control`, paused orders and paused
/// kinds apply in the same statement, so a pause takes effect at the next claim.
pub const CLAIM: &str = r#"
WITH ctl AS (
    SELECT paused, batch_size_override FROM tally_control WHERE id
),
lim AS (
    SELECT least($2, coalesce((SELECT batch_size_override FROM ctl), $2)) AS n
),
-- The worker's kinds less the paused ones, as a positive list: the planner estimates
-- `kind <> ALL(<subquery>)` as matching nothing when one kind dominates the table, and
-- then sorts every candidate instead of walking the index (570 ms claims at 200,000
-- tasks; `engine::the_real_claim_walks_its_index_…` guards it).
kinds_ok AS (
    SELECT ARRAY(SELECT k FROM unnest($3::text[]) AS k
                 EXCEPT SELECT name FROM kinds WHERE paused) AS k
),
-- Held orders (paused, or closed with attempts still running): a tiny list (partial
-- index), computed once per statement. Compared as text on purpose: the column's
-- statistics make `order_id <> ALL(<subquery>)` estimate to nothing when one order fills
-- the queue (a giant order), with the same sorted full read as above.
held AS (
    SELECT ARRAY(SELECT id::text FROM orders WHERE paused) AS ids
),
ready AS MATERIALIZED (
    SELECT r.task_id
    FROM task_ready r
    WHERE r.kind = ANY((SELECT k FROM kinds_ok)::text[])
      AND r.order_id::text <> ALL((SELECT ids FROM held)::text[])
      AND NOT coalesce((SELECT paused FROM ctl), false)
    ORDER BY r.priority DESC, r.run, r.task_id
    LIMIT (SELECT n FROM lim)
    FOR UPDATE OF r SKIP LOCKED
),
retrying AS MATERIALIZED (
    SELECT t.id
    FROM order_tasks t
    WHERE t.status = 'FAILED_RETRYING'
      AND t.retry_after <= now()
      AND t.kind = ANY((SELECT k FROM kinds_ok)::text[])
      AND t.order_id::text <> ALL((SELECT ids FROM held)::text[])
      AND NOT coalesce((SELECT paused FROM ctl), false)
    ORDER BY t.retry_after
    LIMIT (SELECT n FROM lim)
    FOR UPDATE OF t SKIP LOCKED
),
picked AS MATERIALIZED (
    -- `= ANY(ARRAY(...))` keeps these primary-key lookups: joining the CTEs instead lets
    -- the planner, which cannot estimate the LIMIT expression, hash the whole table.
    -- The status lists are sub-selects so the planner cannot match them to the partial
    -- `order_tasks_claim_idx` and AND a bitmap of that whole index (every entry vacuum
    -- has not removed yet) with the key lookups: 10 ms per claim at 66,000 entries.
    SELECT t.id, t.status
    FROM order_tasks t
    WHERE t.id = ANY(ARRAY(SELECT task_id FROM ready UNION SELECT id FROM retrying))
      AND t.status = ANY((SELECT '{PENDING,FAILED_RETRYING}'::text[])::text[])
      AND t.retry_after <= now()
      AND t.attempts < t.max_attempts
    ORDER BY t.priority DESC, t.seq / 64, t.id
    LIMIT (SELECT n FROM lim)
    FOR UPDATE OF t SKIP LOCKED
),
-- Ring rows taken whose task is still PENDING (by key: a NOT EXISTS here is planned as a
-- hashed read of all of order_tasks).
pending AS MATERIALIZED (
    SELECT t.id
    FROM order_tasks t
    WHERE t.id = ANY(ARRAY(SELECT task_id FROM ready))
      AND t.status = (SELECT 'PENDING'::text)
),
spent AS (
    DELETE FROM task_ready r
    WHERE r.task_id = ANY(ARRAY(SELECT id FROM picked
                                UNION ALL
                                (SELECT task_id FROM ready EXCEPT SELECT id FROM pending)))
),
claimed AS (
    -- `= ANY(ARRAY(...))` keeps this a primary-key lookup: joining the CTE instead lets
    -- the planner, which cannot estimate the LIMIT expression, hash the whole table.
    UPDATE order_tasks t
    SET status = 'EXECUTING',
        attempts = t.attempts + 1,
        claimed_by = $1,
        claimed_at = now(),
        -- One token for the whole batch: (id, token) is still unique per claim of a task,
        -- and it spares a gen_random_uuid() per row (about 6 µs each, a sixth of the
        -- claim's cost per task at batch 1,000).
        claim_token = $6,
        lease_expires_at = now() + make_interval(secs => $4),
        updated_at = now()
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.attempts < t.max_attempts
    RETURNING t.id, t.order_id, t.seq, t.kind, t.quantity, t.delivered, t.attempts,
              t.max_attempts, t.claim_token,
              greatest(extract(epoch FROM now() - greatest(t.created_at, t.retry_after)), 0)::float8
                  AS pickup_secs,
              CASE WHEN t.attempts > 1 AND t.executed_at IS NOT NULL
                   THEN greatest(extract(epoch FROM now() - t.executed_at), 0)::float8 END
                  AS recovery_secs
),
audit AS (
    INSERT INTO order_task_transitions
        (task_id, order_id, from_state, to_state, transition_reason, actor_id, attempt)
    SELECT c.id, c.order_id, p.status, 'EXECUTING', 'claimed', $5, c.attempts
    FROM claimed c
    JOIN picked p ON p.id = c.id
)
SELECT c.id, c.order_id, c.seq, c.kind, c.quantity, c.delivered, c.attempts, c.max_attempts,
       c.claim_token, o.target, o.trace_context, k.updated_at AS kind_version, c.pickup_secs,
       c.recovery_secs
FROM claimed c
CROSS JOIN LATERAL (SELECT target, trace_context FROM orders WHERE id = c.order_id) o
LEFT JOIN LATERAL (SELECT updated_at FROM kinds WHERE name = c.kind) k ON true
"#;

/// The claim runs on the connection's cached generic plan (see [`Store::claim_tasks`]).
const GENERIC_PLAN: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

/// The tasks of one claim, by its token, with the columns `CLAIM` returns (through the
/// small `order_tasks_executing_idx`).
const CLAIMED_WITH: &str = r#"
SELECT t.id, t.order_id, t.seq, t.kind, t.quantity, t.delivered, t.attempts, t.max_attempts,
       t.claim_token, o.target, o.trace_context, k.updated_at AS kind_version,
       greatest(extract(epoch FROM t.claimed_at - greatest(t.created_at, t.retry_after)), 0)::float8
           AS pickup_secs,
       NULL::float8 AS recovery_secs
FROM order_tasks t
JOIN orders o ON o.id = t.order_id
LEFT JOIN kinds k ON k.name = t.kind
WHERE t.claimed_by = $1 AND t.status = 'EXECUTING' AND t.claim_token = $2
"#;

/// Applies decided transitions of claimed tasks and rolls their unit deltas into the
/// orders' counters, all in one statement (one round trip, one commit).
///
/// - Fence: each task row changes only if it is still EXECUTING under the same claim token
///   (and, for rescues, its lease has expired *now*). A stale writer changes nothing.
/// - Hot rows: the order counters are updated once per order per batch, not per task, and
///   the orders are locked in id order so concurrent batches cannot deadlock on them.
/// - Completion: the order becomes COMPLETED in the same statement that delivers its last
///   unit; `needs_attention` is set when every remaining unit is dead-lettered.
pub const APPLY: &str = concat!(
    r#"
WITH input AS (
    SELECT *
    FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::int[], $6::bigint[],
                $7::bigint[], $8::float8[], $9::text[], $10::text[], $11::text[])
         AS i(id, token, to_state, attempts, delivered_delta, failed_delta, cancelled_delta,
              retry_in_secs, reason, error_class, error)
),
upd AS (
    UPDATE order_tasks t
    SET status = i.to_state,
        attempts = i.attempts,
        delivered = t.delivered + i.delivered_delta,
        retry_after = CASE WHEN i.retry_in_secs IS NULL THEN t.retry_after
                           ELSE now() + make_interval(secs => i.retry_in_secs) END,
        claim_token = NULL,
        lease_expires_at = NULL,
        executed_at = CASE WHEN i.reason = 'handed_back' THEN t.executed_at ELSE now() END,
        last_error = CASE WHEN i.error IS NULL THEN t.last_error ELSE i.error END,
        last_error_class = CASE WHEN i.error_class IS NULL THEN t.last_error_class
                                ELSE i.error_class END,
        updated_at = now()
    FROM input i
    -- The fence is the claim token alone: `order_tasks_executing_has_claim` makes a token
    -- mean EXECUTING. Naming the status, or listing the ids as `t.id = ANY($1)`, let the
    -- planner start from `order_tasks_executing_idx` or the id list with a one-row
    -- estimate and re-run the unnest for every task it found: after an ANALYZE mid-run,
    -- 130-150 ms per 500-task batch instead of 10 ms. Without them the only sane plan is
    -- one primary-key lookup per input row (`engine::the_completion_write_…` guards it).
    WHERE t.id = i.id
      AND t.claim_token = i.token
      AND (NOT $12 OR t.lease_expires_at < now())
    RETURNING t.id, t.order_id, t.status, t.attempts, i.delivered_delta, i.failed_delta,
              i.cancelled_delta, i.reason, i.error_class, i.retry_in_secs, t.seq, t.kind,
              t.priority
),
-- A task handed back to PENDING is new work again: it goes back into the ready ring
-- (FAILED_RETRYING ones are claimed through `order_tasks_retry_idx`).
requeue AS (
    "#,
    insert_ready_rows!("upd WHERE status = 'PENDING'"),
    r#"
),
agg AS (
    SELECT order_id, sum(delivered_delta)::bigint AS d, sum(failed_delta)::bigint AS f,
           sum(cancelled_delta)::bigint AS c
    FROM upd
    GROUP BY order_id
    HAVING sum(delivered_delta) <> 0 OR sum(failed_delta) <> 0 OR sum(cancelled_delta) <> 0
),
locked AS (
    SELECT o.id, o.status AS old_status
    FROM orders o
    WHERE o.id = ANY(ARRAY(SELECT order_id FROM agg))
    ORDER BY o.id
    FOR NO KEY UPDATE
),
ord AS (
    UPDATE orders o
    SET delivered = o.delivered + a.d,
        failed_permanent_units = o.failed_permanent_units + a.f,
        cancelled_units = o.cancelled_units + a.c,
        status = CASE WHEN o.status = 'PROCESSING' AND o.delivered + a.d = o.quantity
                      THEN 'COMPLETED' ELSE o.status END,
        finished_at = CASE WHEN o.status = 'PROCESSING' AND o.delivered + a.d = o.quantity
                           THEN now() ELSE o.finished_at END,
        needs_attention = o.status = 'PROCESSING'
                          AND o.failed_permanent_units + a.f > 0
                          AND o.delivered + a.d + o.failed_permanent_units + a.f
                              + o.cancelled_units + a.c = o.quantity,
        version = o.version + 1,
        updated_at = now()
    FROM agg a
    JOIN locked l ON l.id = a.order_id
    WHERE o.id = l.id
    RETURNING o.id, l.old_status, o.status, extract(epoch FROM now() - o.created_at)::float8 AS age
),
audit_tasks AS (
    INSERT INTO order_task_transitions
        (task_id, order_id, from_state, to_state, transition_reason, error_class, actor_id, attempt)
    SELECT u.id, u.order_id, 'EXECUTING', u.status, u.reason, u.error_class, $13, u.attempts
    FROM upd u
),
audit_orders AS (
    INSERT INTO order_task_transitions (order_id, from_state, to_state, transition_reason, actor_id)
    SELECT o.id, o.old_status, o.status, 'all_units_delivered', $13
    FROM ord o
    WHERE o.old_status <> o.status
)
SELECT coalesce((SELECT array_agg(id) FROM upd), '{}') AS applied,
       coalesce((SELECT array_agg(id) FROM ord WHERE status = 'COMPLETED' AND old_status <> status),
                '{}') AS completed_orders,
       coalesce((SELECT array_agg(age) FROM ord WHERE status = 'COMPLETED' AND old_status <> status),
                '{}') AS completed_ages,
       -- Re-queued for immediate claim (hand-back, rescue): the caller wakes workers after
       -- the commit (`Store::wake_tasks`), never with a NOTIFY inside it.
       (SELECT count(*) FROM upd WHERE retry_in_secs = 0) AS requeued
"#
);

/// Result of [`Store::apply_task_updates`].
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Tasks whose update was written; the others were fenced off (stale claim).
    pub task_ids: Vec<i64>,
    /// Orders that became COMPLETED in this write.
    pub completed_orders: Vec<Uuid>,
    /// Their ages (seconds since creation), in the same order.
    pub completed_ages: Vec<f64>,
}

impl Store {
    /// Claims up to `limit` claimable tasks of `kinds` for `worker_id`, with a lease of `lease`.
    pub async fn claim_tasks(
        &self,
        worker_id: Uuid,
        limit: u32,
        kinds: &[String],
        lease: Duration,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        let token = Uuid::new_v4();
        let mut tries = 0;
        loop {
            tries += 1;
            let claimed = self
                .call("claiming a task batch", async {
                    // Planning the claim costs 3-5 ms (the ring's partitions, twice), several
                    // times its execution, and Postgres keeps re-planning it per call when
                    // left to choose: at 2,000 orders/s that alone kept a backlog. The
                    // generic plan is made once per connection and re-made after an ANALYZE;
                    // its shape is what `engine::the_real_claim_…` checks.
                    let mut tx = self.pool().begin().await?;
                    sqlx::query(GENERIC_PLAN).execute(&mut *tx).await?;
                    let claimed = sqlx::query_as::<_, ClaimedTask>(CLAIM)
                        .bind(worker_id)
                        .bind(i64::from(limit))
                        .bind(kinds)
                        .bind(lease.as_secs_f64())
                        .bind(worker_id.to_string())
                        .bind(token)
                        .fetch_all(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(claimed)
                })
                .await;
            match claimed {
                Err(e) if e.is_connection_lost() && tries < 3 => {
                    // The connection died under the claim, which may have committed: its
                    // tasks carry this claim's token, so take them now instead of leaving
                    // them to the sweeper's rescue a lease later. None: claim again.
                    tracing::debug!(error = %e, "the claim lost its connection; looking for its tasks");
                    match self.claimed_with(worker_id, token).await {
                        Ok(found) if !found.is_empty() => return Ok(found),
                        Ok(_) => {}
                        Err(_) => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    /// The tasks `worker_id` holds under claim `token` (a claim whose answer was lost).
    async fn claimed_with(
        &self,
        worker_id: Uuid,
        token: Uuid,
    ) -> Result<Vec<ClaimedTask>, StoreError> {
        self.call("finding a claim's tasks", async {
            sqlx::query_as::<_, ClaimedTask>(CLAIMED_WITH)
                .bind(worker_id)
                .bind(token)
                .fetch_all(self.pool())
                .await
        })
        .await
    }

    /// Writes a batch of decided transitions, fenced as `fence` says. Deadlocks with a
    /// concurrent batch are retried here: the write is idempotent under its fence.
    pub async fn apply_task_updates(
        &self,
        updates: &[TaskUpdate],
        fence: UpdateFence,
        actor: &str,
    ) -> Result<Applied, StoreError> {
        if updates.is_empty() {
            return Ok(Applied::default());
        }
        let n = updates.len();
        let mut ids = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        let mut to_states = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut delivered = Vec::with_capacity(n);
        let mut failed = Vec::with_capacity(n);
        let mut cancelled = Vec::with_capacity(n);
        let mut retry_in = Vec::with_capacity(n);
        let mut reasons = Vec::with_capacity(n);
        let mut classes = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        for u in updates {
            let t = &u.transition;
            ids.push(u.task_id);
            tokens.push(u.claim_token);
            to_states.push(t.to.as_str());
            attempts.push(t.attempts as i32);
            delivered.push(t.delivered_delta as i32);
            failed.push(t.failed_units_delta);
            cancelled.push(t.cancelled_units_delta);
            retry_in.push(match t.retry_at {
                RetryAt::Unchanged => None,
                RetryAt::Now => Some(0.0),
                RetryAt::After(d) => Some(d.as_secs_f64()),
            });
            reasons.push(t.reason);
            classes.push(t.error_class.map(|c| c.as_str()));
            errors.push(u.error.as_deref().map(|e| truncate(e, 2000)));
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let res = self
                .call("writing task outcomes", async {
                    sqlx::query_as::<_, (Vec<i64>, Vec<Uuid>, Vec<f64>, i64)>(APPLY)
                        .bind(&ids)
                        .bind(&tokens)
                        .bind(&to_states)
                        .bind(&attempts)
                        .bind(&delivered)
                        .bind(&failed)
                        .bind(&cancelled)
                        .bind(&retry_in)
                        .bind(&reasons)
                        .bind(&classes)
                        .bind(&errors)
                        .bind(fence == UpdateFence::ExpiredLease)
                        .bind(actor)
                        .fetch_one(self.pool())
                        .await
                })
                .await;
            match res {
                Ok((task_ids, completed_orders, completed_ages, requeued)) => {
                    if requeued > 0 {
                        self.wake_tasks();
                    }
                    return Ok(Applied {
                        task_ids,
                        completed_orders,
                        completed_ages,
                    });
                }
                Err(e) if e.is_transient_conflict() && tries < 5 => {
                    tracing::debug!(error = %e, tries, "retrying task outcome write after a conflict");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
