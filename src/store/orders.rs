//! `orders` and `idempotency_ledger`: intake, generation (fan-out), reads.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// A validated order to accept. Validation (and the chunk plan) happens before this.
#[derive(Debug, Clone)]
pub struct NewOrder {
    pub kind: String,
    pub target: String,
    pub quantity: i64,
    pub chunk_size: i32,
    /// `ceil(quantity / chunk_size)`, from the chunk planner; the schema re-checks it.
    pub task_count: i32,
    pub priority: i16,
    pub max_attempts: i32,
    /// The client's idempotency key, if it sent one.
    pub client_key: Option<String>,
    /// Canonical form of the request, hashed to tell a replay from a conflicting reuse.
    pub canonical_request: String,
    pub trace_context: Option<String>,
    /// Where to report the outcome, and in which format (`json` or `slack`).
    pub callback_url: Option<String>,
    pub callback_format: String,
    /// Fan the order out into tasks in the intake statement itself (small orders; see
    /// `IntakeDefaults::inline_fanout_max_tasks`) instead of leaving it PENDING for the generator.
    pub fan_out_now: bool,
}

/// What intake did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeOutcome {
    Created(Uuid),
    /// Same key, same request: the order accepted the first time.
    Replayed(Uuid),
    /// Same key, different request: nothing was created.
    Conflict(Uuid),
}

/// An order as operators read it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct OrderRow {
    pub id: Uuid,
    pub kind: String,
    pub target: String,
    pub quantity: i64,
    pub chunk_size: i32,
    pub task_count: i32,
    pub priority: i16,
    pub max_attempts: i32,
    pub status: String,
    pub delivered: i64,
    pub failed_permanent_units: i64,
    pub cancelled_units: i64,
    pub needs_attention: bool,
    pub paused: bool,
    pub callback_url: Option<String>,
    pub callback_format: String,
    pub client_key: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub generated_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The explicit column list of [`OrderRow`] (never `*`: cached plans survive migrations).
macro_rules! order_columns {
    () => {
        "id, kind, target, quantity, chunk_size, task_count, priority, max_attempts, status, \
         delivered, failed_permanent_units, cancelled_units, needs_attention, paused, \
         callback_url, callback_format, client_key, version, created_at, updated_at, \
         generated_at, finished_at"
    };
}

/// The tail both intake statements share, after the CTE `ins` (the inserted order, if any).
///
/// With its flag parameter true (a small order, see `IntakeDefaults::inline_fanout_max_tasks`) the order is
/// fanned out in the same statement, exactly as `GENERATE` would do it (same chunk sizes, same
/// audit row), and the workers are woken at once; that saves the generator's round trip on the
/// path from submit to first delivery. Otherwise the order stays PENDING for the generator.
macro_rules! fan_out_now {
    ($now:literal) => {
        concat!(
            "tasks AS (
    INSERT INTO order_tasks (order_id, seq, kind, quantity, priority, max_attempts)
    SELECT ins.id, g.seq, $2,
           ($4::bigint / $6 + CASE WHEN g.seq < $4::bigint % $6 THEN 1 ELSE 0 END)::int, $7, $8
    FROM ins CROSS JOIN LATERAL generate_series(0, $6 - 1) AS g(seq)
    WHERE ", $now, "
    RETURNING 1
),
audit AS (
    INSERT INTO order_task_transitions (order_id, from_state, to_state, transition_reason, actor_id)
    SELECT id, 'PENDING', 'PROCESSING', 'tasks_generated', 'intake' FROM ins WHERE ", $now, "
),
wake AS (
    SELECT pg_notify(CASE WHEN ", $now, " THEN 'tally_tasks' ELSE 'tally_orders' END, '') FROM ins
)"
        )
    };
}

/// Records the key first; the order is inserted only by the request that inserted the key,
/// in the same statement, so a concurrent duplicate waits on the key and then finds the
/// order instead of creating a second one.
const INTAKE_WITH_KEY: &str = concat!(
    r#"
WITH led AS (
    INSERT INTO idempotency_ledger (operation_key, order_id, state, request_hash, attempt_count)
    VALUES ($10, $1, 'ACCEPTED', encode(sha256(convert_to($11, 'UTF8')), 'hex'), 1)
    ON CONFLICT (operation_key) DO UPDATE
        SET attempt_count = idempotency_ledger.attempt_count + 1, last_seen_at = now()
    RETURNING order_id, request_hash, (xmax = 0) AS inserted
),
ins AS (
    INSERT INTO orders (id, kind, target, quantity, chunk_size, task_count, priority,
                        max_attempts, client_key, trace_context, callback_url, callback_format,
                        status, generated_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $10, $9, $12, $13,
           CASE WHEN $14 THEN 'PROCESSING' ELSE 'PENDING' END, CASE WHEN $14 THEN now() END
    FROM led WHERE led.inserted
    RETURNING id
),
"#,
    fan_out_now!("$14"),
    r#"
SELECT led.order_id, led.inserted,
       led.request_hash = encode(sha256(convert_to($11, 'UTF8')), 'hex') AS same_request,
       (SELECT count(*) FROM wake) AS woke
FROM led
"#
);

const INTAKE: &str = concat!(
    r#"
WITH ins AS (
    INSERT INTO orders (id, kind, target, quantity, chunk_size, task_count, priority,
                        max_attempts, trace_context, callback_url, callback_format,
                        status, generated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
            CASE WHEN $12 THEN 'PROCESSING' ELSE 'PENDING' END, CASE WHEN $12 THEN now() END)
    RETURNING id
),
"#,
    fan_out_now!("$12"),
    r#"
SELECT ins.id, (SELECT count(*) FROM wake) FROM ins
"#
);

/// Fans PENDING orders out into tasks and moves them to PROCESSING in one statement.
///
/// Orders are locked with SKIP LOCKED, so two generators never pick the same order; the
/// `(order_id, seq)` unique key and the `status = 'PENDING'` re-check make a repeat harmless
/// even if they did. Task sizes follow the chunk plan: `quantity / task_count`, plus one for
/// the first `quantity % task_count` tasks (see `domain::chunk`).
///
/// A pass takes orders, oldest first, while their tasks fit the budget `$3`, and always the
/// oldest one however big (`running = task_count` only holds for the first row), so a huge
/// order never drags a batch of small ones into one long statement.
const GENERATE: &str = r#"
WITH locked AS (
    SELECT id, quantity, task_count, kind, priority, max_attempts, created_at
    FROM orders
    WHERE status = 'PENDING'
    ORDER BY created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
picked AS (
    SELECT id, quantity, task_count, kind, priority, max_attempts
    FROM (SELECT l.*, sum(task_count) OVER (ORDER BY created_at, id) AS running
          FROM locked l) budgeted
    WHERE running <= $3 OR running = task_count
),
ins AS (
    INSERT INTO order_tasks (order_id, seq, kind, quantity, priority, max_attempts)
    SELECT p.id, g.seq, p.kind,
           (p.quantity / p.task_count
            + CASE WHEN g.seq < p.quantity % p.task_count THEN 1 ELSE 0 END)::int,
           p.priority, p.max_attempts
    FROM picked p
    CROSS JOIN LATERAL generate_series(0, p.task_count - 1) AS g(seq)
    ON CONFLICT (order_id, seq) DO NOTHING
    RETURNING 1
),
upd AS (
    UPDATE orders o
    SET status = 'PROCESSING', generated_at = now(), updated_at = now(), version = o.version + 1
    FROM picked p
    WHERE o.id = p.id AND o.status = 'PENDING'
    RETURNING o.id
),
audit AS (
    INSERT INTO order_task_transitions (order_id, from_state, to_state, transition_reason, actor_id)
    SELECT id, 'PENDING', 'PROCESSING', 'tasks_generated', $2 FROM upd
),
wake AS (SELECT pg_notify('tally_tasks', '') WHERE EXISTS (SELECT 1 FROM ins))
SELECT (SELECT count(*) FROM upd) AS orders, (SELECT count(*) FROM ins) AS tasks,
       (SELECT count(*) FROM wake) AS woke
"#;

/// Longest one generation statement may run (a 10^9-unit order is 2.5 million tasks).
pub const GENERATE_TIMEOUT: Duration = Duration::from_secs(600);
const GENERATE_SET_TIMEOUT: &str = "SET LOCAL statement_timeout = '600s'";
/// Default most tasks generated by one pass (one order is always taken, however big).
pub const GENERATE_TASKS_BUDGET: u64 = 100_000;

impl Store {
    /// Accepts an order (idempotently when it carries a client key).
    pub async fn create_order(&self, order: &NewOrder) -> Result<IntakeOutcome, StoreError> {
        let id = Uuid::now_v7();
        match &order.client_key {
            None => {
                let (id, _): (Uuid, i64) = self
                    .call("creating an order", async {
                        sqlx::query_as(INTAKE)
                            .bind(id)
                            .bind(&order.kind)
                            .bind(&order.target)
                            .bind(order.quantity)
                            .bind(order.chunk_size)
                            .bind(order.task_count)
                            .bind(order.priority)
                            .bind(order.max_attempts)
                            .bind(&order.trace_context)
                            .bind(&order.callback_url)
                            .bind(&order.callback_format)
                            .bind(order.fan_out_now)
                            .fetch_one(self.pool())
                            .await
                    })
                    .await?;
                Ok(IntakeOutcome::Created(id))
            }
            Some(key) => {
                let (order_id, inserted, same, _): (Uuid, bool, bool, i64) = self
                    .call("creating an order with an idempotency key", async {
                        sqlx::query_as(INTAKE_WITH_KEY)
                            .bind(id)
                            .bind(&order.kind)
                            .bind(&order.target)
                            .bind(order.quantity)
                            .bind(order.chunk_size)
                            .bind(order.task_count)
                            .bind(order.priority)
                            .bind(order.max_attempts)
                            .bind(&order.trace_context)
                            .bind(key)
                            .bind(&order.canonical_request)
                            .bind(&order.callback_url)
                            .bind(&order.callback_format)
                            .bind(order.fan_out_now)
                            .fetch_one(self.pool())
                            .await
                    })
                    .await?;
                Ok(match (inserted, same) {
                    (true, _) => IntakeOutcome::Created(order_id),
                    (false, true) => IntakeOutcome::Replayed(order_id),
                    (false, false) => IntakeOutcome::Conflict(order_id),
                })
            }
        }
    }

    /// Generates tasks for up to `orders_max` PENDING orders, stopping at the first order
    /// that would take the pass past `tasks_budget` tasks. Returns (orders, tasks) made.
    ///
    /// Fanning out a very large order (millions of tasks) can outlast the ordinary
    /// statement timeout, so this one statement runs in a short transaction with
    /// `SET LOCAL statement_timeout` of [`GENERATE_TIMEOUT`], and a client deadline just past it.
    pub async fn generate_tasks_budgeted(
        &self,
        orders_max: u32,
        tasks_budget: u64,
        actor: &str,
    ) -> Result<(u64, u64), StoreError> {
        let work = async {
            let mut tx = self.pool().begin().await?;
            sqlx::query(GENERATE_SET_TIMEOUT).execute(&mut *tx).await?;
            let row: (i64, i64, i64) = sqlx::query_as(GENERATE)
                .bind(i64::from(orders_max))
                .bind(actor)
                .bind(i64::try_from(tasks_budget).unwrap_or(i64::MAX))
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        };
        let (orders, tasks, _) =
            match tokio::time::timeout(GENERATE_TIMEOUT + Duration::from_secs(10), work).await {
                Ok(r) => r.map_err(|source| StoreError::Db {
                    op: "generating tasks",
                    source,
                })?,
                Err(_) => {
                    return Err(StoreError::Timeout {
                        op: "generating tasks",
                        timeout: GENERATE_TIMEOUT,
                    });
                }
            };
        Ok((orders as u64, tasks as u64))
    }

    /// [`Store::generate_tasks_budgeted`] with the default budget.
    pub async fn generate_tasks(
        &self,
        orders_max: u32,
        actor: &str,
    ) -> Result<(u64, u64), StoreError> {
        self.generate_tasks_budgeted(orders_max, GENERATE_TASKS_BUDGET, actor)
            .await
    }

    pub async fn get_order(&self, id: Uuid) -> Result<Option<OrderRow>, StoreError> {
        const SQL: &str = concat!("SELECT ", order_columns!(), " FROM orders WHERE id = $1");
        self.call("reading an order", async {
            sqlx::query_as::<_, OrderRow>(SQL)
                .bind(id)
                .fetch_optional(self.pool())
                .await
        })
        .await
    }

    /// Orders newest first (ids are UUIDv7, so id order is creation order), after `before`.
    pub async fn list_orders(
        &self,
        status: Option<&str>,
        kind: Option<&str>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<OrderRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2) \
             AND ($3::uuid IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        self.call("listing orders", async {
            sqlx::query_as::<_, OrderRow>(SQL)
                .bind(status)
                .bind(kind)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
        })
        .await
    }

    /// Task counts of one order by status.
    pub async fn order_task_counts(&self, id: Uuid) -> Result<Vec<(String, i64)>, StoreError> {
        self.call("counting an order's tasks", async {
            sqlx::query_as(
                "SELECT status, count(*) FROM order_tasks WHERE order_id = $1 GROUP BY status ORDER BY status",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    /// How many times each transition reason was recorded for one order.
    pub async fn order_transition_counts(
        &self,
        id: Uuid,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.call("counting an order's transitions", async {
            sqlx::query_as(
                "SELECT transition_reason, count(*) FROM order_task_transitions \
                 WHERE order_id = $1 GROUP BY transition_reason ORDER BY transition_reason",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await
        })
        .await
    }
}
