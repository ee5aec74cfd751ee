//! `orders` and `idempotency_ledger`: intake, generation (fan-out), reads.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// A validated order to accept. Validation (and the chunk plan) happens before this.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Chosen before the first attempt (UUIDv7), so that running the intake statement again
    /// after a lost connection finds the order instead of creating a second one.
    pub id: Uuid,
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

/// Who sent an order: the intake statement writes its `admin_audit` row itself, so an
/// accepted order is never without one and costs no second commit.
#[derive(Debug, Clone)]
pub struct IntakeAudit {
    pub key_id: Uuid,
    pub key_name: String,
    /// `POST /api/orders`, `POST /api/orders/batch`.
    pub action: String,
    /// The request path.
    pub target: String,
    /// The caller's `X-Request-Id`, or the trace id: also stored on the order's first
    /// transition.
    pub correlation_id: Option<String>,
}

/// One order to accept, and who asks (None: an internal caller, not audited).
#[derive(Debug, Clone)]
pub struct IntakeItem {
    pub order: NewOrder,
    pub audit: Option<IntakeAudit>,
}

/// What intake did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntakeOutcome {
    Created(Uuid),
    /// Same key, same request: the order accepted the first time.
    Replayed(Uuid),
    /// Same key, different request: nothing was created.
    Conflict(Uuid),
    /// The kind does not exist (any more): nothing was created.
    UnknownKind,
}

/// One item's answer: the outcome and, when created or replayed, the order.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub outcome: IntakeOutcome,
    pub order: Option<OrderRow>,
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

/// Accepts a batch of orders in one statement, and so in one commit, however many requests
/// share it (see `intake::Batcher`).
///
/// - Keys: the ledger row is written first; only the request whose proposed id the ledger
///   holds inserts the order. A concurrent duplicate in another statement waits on the key
///   and then finds the order; duplicates inside this batch are resolved here (the first one
///   leads, the others are replays or conflicts by their body's hash), and `attempt_count`
///   counts every one of them.
/// - Retries: the order id is chosen before the first attempt and the insert skips an id that
///   exists, so running the statement again after a lost connection (when it may have
///   committed) neither duplicates an order nor fans it out twice.
/// - Small orders (`fan_out`) are fanned out here exactly as `GENERATE` would, with the same
///   chunk sizes and audit row; the others stay PENDING for the generator.
/// - Audit: one `admin_audit` row per audited request, in this statement.
/// - No NOTIFY: the caller wakes workers after the commit (`Store::wake_tasks`).
/// - `$20`: refuse orders whose kind is not in `kinds` (the API; tests and the bench run
///   kinds that exist only as handlers).
const INTAKE_BATCH: &str = concat!(
    r#"
WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::int[],
                $7::int2[], $8::int[], $9::text[], $10::text[], $11::text[], $12::bool[],
                $13::text[], $14::text[], $15::uuid[], $16::text[], $17::text[], $18::text[],
                $19::text[])
         WITH ORDINALITY
         AS i(id, kind, target, quantity, chunk_size, task_count, priority, max_attempts,
              trace_context, callback_url, callback_format, fan_out, client_key, canonical,
              key_id, key_name, action, path, correlation_id, n)
),
hashed AS (
    SELECT i.*, encode(sha256(convert_to(i.canonical, 'UTF8')), 'hex') AS request_hash,
           (NOT $20 OR EXISTS (SELECT 1 FROM kinds k WHERE k.name = i.kind)) AS kind_known
    FROM input i
),
led AS (
    INSERT INTO idempotency_ledger (operation_key, order_id, state, request_hash, attempt_count)
    SELECT DISTINCT ON (client_key) client_key, id, 'ACCEPTED', request_hash,
           (count(*) OVER (PARTITION BY client_key))::int
    FROM hashed
    WHERE client_key IS NOT NULL AND kind_known
    -- Keys in one order, so two batches that share keys cannot deadlock on them.
    ORDER BY client_key, n
    ON CONFLICT (operation_key) DO UPDATE
        SET attempt_count = idempotency_ledger.attempt_count + EXCLUDED.attempt_count,
            last_seen_at = now()
    RETURNING operation_key, order_id, request_hash
),
resolved AS (
    SELECT h.*,
           CASE WHEN NOT h.kind_known THEN 'unknown_kind'
                WHEN h.client_key IS NULL OR l.order_id = h.id THEN 'created'
                WHEN l.request_hash = h.request_hash THEN 'replayed'
                ELSE 'conflict' END AS outcome,
           coalesce(l.order_id, h.id) AS order_id
    FROM hashed h
    LEFT JOIN led l ON l.operation_key = h.client_key
),
ins AS (
    INSERT INTO orders (id, kind, target, quantity, chunk_size, task_count, priority,
                        max_attempts, client_key, trace_context, callback_url, callback_format,
                        status, generated_at)
    SELECT id, kind, target, quantity, chunk_size, task_count, priority, max_attempts,
           client_key, trace_context, callback_url, callback_format,
           CASE WHEN fan_out THEN 'PROCESSING' ELSE 'PENDING' END,
           CASE WHEN fan_out THEN now() END
    FROM resolved
    WHERE outcome = 'created'
    ORDER BY n
    ON CONFLICT (id) DO NOTHING
    RETURNING "#,
    order_columns!(),
    r#"
),
tasks AS (
    INSERT INTO order_tasks (order_id, seq, kind, quantity, priority, max_attempts)
    SELECT ins.id, g.seq, ins.kind,
           (ins.quantity / ins.task_count
            + CASE WHEN g.seq < ins.quantity % ins.task_count THEN 1 ELSE 0 END)::int,
           ins.priority, ins.max_attempts
    FROM ins CROSS JOIN LATERAL generate_series(0, ins.task_count - 1) AS g(seq)
    WHERE ins.status = 'PROCESSING'
    RETURNING id, order_id, seq, kind, priority
),
ready AS (
    -- Claimable from the ready ring (migration 0005).
    "#,
    insert_ready_rows!("tasks"),
    r#"
),
generated AS (
    INSERT INTO order_task_transitions
        (order_id, from_state, to_state, transition_reason, actor_id, correlation_id)
    SELECT ins.id, 'PENDING', 'PROCESSING', 'tasks_generated', 'intake', r.correlation_id
    FROM ins JOIN resolved r ON r.id = ins.id
    WHERE ins.status = 'PROCESSING'
),
audit AS (
    INSERT INTO admin_audit (key_id, key_name, action, target, status, detail)
    SELECT r.key_id, r.key_name, r.action, r.path,
           CASE WHEN r.outcome IN ('created', 'replayed') THEN 201 ELSE 422 END,
           jsonb_strip_nulls(jsonb_build_object(
               'order_id', CASE WHEN r.kind_known THEN r.order_id END,
               'replayed', r.outcome = 'replayed',
               'outcome', r.outcome,
               'idempotency_key', r.client_key,
               'correlation_id', r.correlation_id))
    FROM resolved r
    -- A created order that was already there (a retried statement) was audited the first time.
    WHERE r.action IS NOT NULL
      AND (r.outcome <> 'created' OR EXISTS (SELECT 1 FROM ins WHERE ins.id = r.id))
    ORDER BY r.n
)
SELECT r.n, r.outcome, r.order_id AS resolved_order_id, ins.*
FROM resolved r
LEFT JOIN ins ON ins.id = r.order_id AND r.outcome IN ('created', 'replayed')
ORDER BY r.n
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
const GENERATE: &str = concat!(
    r#"
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
    RETURNING id, order_id, seq, kind, priority
),
ready AS (
    -- Claimable from the ready ring (migration 0005).
    "#,
    insert_ready_rows!("ins"),
    r#"
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
)
SELECT (SELECT count(*) FROM upd) AS orders, (SELECT count(*) FROM ins) AS tasks
"#
);

/// Longest one generation statement may run (a 10^9-unit order is 2.5 million tasks).
pub const GENERATE_TIMEOUT: Duration = Duration::from_secs(600);
const GENERATE_SET_TIMEOUT: &str = "SET LOCAL statement_timeout = '600s'";
/// Default most tasks generated by one pass (one order is always taken, however big).
pub const GENERATE_TASKS_BUDGET: u64 = 100_000;

impl Store {
    /// Accepts an order (idempotently when it carries a client key).
    pub async fn create_order(&self, order: &NewOrder) -> Result<IntakeOutcome, StoreError> {
        let item = IntakeItem {
            order: order.clone(),
            audit: None,
        };
        let mut out = self
            .create_orders(std::slice::from_ref(&item), false)
            .await?;
        Ok(out.pop().map_or(IntakeOutcome::UnknownKind, |a| a.outcome))
    }

    /// Accepts a batch of orders in one statement (see `INTAKE_BATCH`); one answer per item,
    /// in order. `known_kinds_only` refuses orders whose kind is not in `kinds`.
    ///
    /// A statement that died with its connection, or lost a deadlock, is run again (at most
    /// [`INTAKE_TRIES`] times in all): the ids and keys make that safe. Any other error fails
    /// the whole batch, and nothing of it is written.
    pub async fn create_orders(
        &self,
        items: &[IntakeItem],
        known_kinds_only: bool,
    ) -> Result<Vec<Accepted>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let n = items.len();
        let mut cols = IntakeColumns::with_capacity(n);
        for item in items {
            cols.push(item);
        }
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            // Wait briefly for a connection: with the database unreachable, intake answers
            // 503 in under two seconds instead of queueing on the pool.
            let mut conn =
                match tokio::time::timeout(INTAKE_ACQUIRE_TIMEOUT, self.pool().acquire()).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(source)) => {
                        return Err(StoreError::Db {
                            op: "connecting to accept orders",
                            source,
                        });
                    }
                    Err(_) => {
                        return Err(StoreError::Timeout {
                            op: "connecting to accept orders",
                            timeout: INTAKE_ACQUIRE_TIMEOUT,
                        });
                    }
                };
            let res = self
                .call("accepting orders", async {
                    cols.bind(sqlx::query(INTAKE_BATCH))
                        .bind(known_kinds_only)
                        .fetch_all(&mut *conn)
                        .await
                })
                .await;
            match res {
                Ok(rows) => break rows,
                Err(e)
                    if (e.is_transient_conflict() || e.is_connection_lost())
                        && tries < INTAKE_TRIES =>
                {
                    tracing::debug!(error = %e, tries, "running the intake statement again");
                }
                Err(e) => return Err(e),
            }
        };
        let mut out = Vec::with_capacity(n);
        let mut missing = Vec::new();
        let decode = |source| StoreError::Db {
            op: "reading the intake result",
            source,
        };
        for row in &rows {
            use sqlx::{FromRow, Row};
            let outcome: String = row.try_get("outcome").map_err(decode)?;
            let id: Uuid = row.try_get("resolved_order_id").map_err(decode)?;
            let order = match row.try_get::<Option<Uuid>, _>("id").map_err(decode)? {
                Some(_) => Some(OrderRow::from_row(row).map_err(decode)?),
                None => None,
            };
            let outcome = match outcome.as_str() {
                "created" => IntakeOutcome::Created(id),
                "replayed" => IntakeOutcome::Replayed(id),
                "conflict" => IntakeOutcome::Conflict(id),
                _ => IntakeOutcome::UnknownKind,
            };
            if order.is_none()
                && matches!(
                    outcome,
                    IntakeOutcome::Created(_) | IntakeOutcome::Replayed(_)
                )
            {
                missing.push(id);
            }
            out.push(Accepted { outcome, order });
        }
        if out
            .iter()
            .any(|a| a.order.as_ref().is_some_and(|o| o.status == "PROCESSING"))
        {
            self.wake_tasks();
        }
        if out
            .iter()
            .any(|a| a.order.as_ref().is_some_and(|o| o.status == "PENDING"))
        {
            self.wake_orders();
        }
        // Replays of orders accepted by an earlier statement (and created orders a retried
        // statement found already there): one read for the batch.
        if !missing.is_empty() {
            let found = self.get_orders(&missing).await?;
            for a in &mut out {
                if let IntakeOutcome::Created(id) | IntakeOutcome::Replayed(id) = a.outcome
                    && a.order.is_none()
                {
                    a.order = found.iter().find(|o| o.id == id).cloned();
                }
            }
        }
        Ok(out)
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
            let row: (i64, i64) = sqlx::query_as(GENERATE)
                .bind(i64::from(orders_max))
                .bind(actor)
                .bind(i64::try_from(tasks_budget).unwrap_or(i64::MAX))
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        };
        let (orders, tasks) =
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
        if tasks > 0 {
            self.wake_tasks();
        }
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

    /// The orders with these ids (in no particular order; unknown ids are left out).
    pub async fn get_orders(&self, ids: &[Uuid]) -> Result<Vec<OrderRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            order_columns!(),
            " FROM orders WHERE id = ANY($1)"
        );
        self.call("reading orders", async {
            sqlx::query_as::<_, OrderRow>(SQL)
                .bind(ids)
                .fetch_all(self.pool())
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

/// How many times the intake statement runs at most (see [`Store::create_orders`]).
pub const INTAKE_TRIES: u32 = 3;
/// Longest an intake statement waits for a pooled connection.
pub const INTAKE_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The intake statement's parameters, one array per column.
#[derive(Default)]
struct IntakeColumns<'a> {
    id: Vec<Uuid>,
    kind: Vec<&'a str>,
    target: Vec<&'a str>,
    quantity: Vec<i64>,
    chunk_size: Vec<i32>,
    task_count: Vec<i32>,
    priority: Vec<i16>,
    max_attempts: Vec<i32>,
    trace_context: Vec<Option<&'a str>>,
    callback_url: Vec<Option<&'a str>>,
    callback_format: Vec<&'a str>,
    fan_out: Vec<bool>,
    client_key: Vec<Option<&'a str>>,
    canonical: Vec<&'a str>,
    key_id: Vec<Option<Uuid>>,
    key_name: Vec<Option<&'a str>>,
    action: Vec<Option<&'a str>>,
    path: Vec<Option<&'a str>>,
    correlation_id: Vec<Option<&'a str>>,
}

impl<'a> IntakeColumns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            id: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    fn push(&mut self, item: &'a IntakeItem) {
        let o = &item.order;
        let a = item.audit.as_ref();
        self.id.push(o.id);
        self.kind.push(&o.kind);
        self.target.push(&o.target);
        self.quantity.push(o.quantity);
        self.chunk_size.push(o.chunk_size);
        self.task_count.push(o.task_count);
        self.priority.push(o.priority);
        self.max_attempts.push(o.max_attempts);
        self.trace_context.push(o.trace_context.as_deref());
        self.callback_url.push(o.callback_url.as_deref());
        self.callback_format.push(&o.callback_format);
        self.fan_out.push(o.fan_out_now);
        self.client_key.push(o.client_key.as_deref());
        self.canonical.push(&o.canonical_request);
        self.key_id.push(a.map(|a| a.key_id));
        self.key_name.push(a.map(|a| a.key_name.as_str()));
        self.action.push(a.map(|a| a.action.as_str()));
        self.path.push(a.map(|a| a.target.as_str()));
        self.correlation_id
            .push(a.and_then(|a| a.correlation_id.as_deref()));
    }

    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.id)
            .bind(&self.kind)
            .bind(&self.target)
            .bind(&self.quantity)
            .bind(&self.chunk_size)
            .bind(&self.task_count)
            .bind(&self.priority)
            .bind(&self.max_attempts)
            .bind(&self.trace_context)
            .bind(&self.callback_url)
            .bind(&self.callback_format)
            .bind(&self.fan_out)
            .bind(&self.client_key)
            .bind(&self.canonical)
            .bind(&self.key_id)
            .bind(&self.key_name)
            .bind(&self.action)
            .bind(&self.path)
            .bind(&self.correlation_id)
    }
}
