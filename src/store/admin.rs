//! Read models for operators: workers, orphans, capacity, task traces, health figures, and
//! the cluster controls (global pause, fault injection).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// The cluster-wide switches.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ControlRow {
    pub paused: bool,
    pub updated_at: DateTime<Utc>,
    pub updated_by: Option<String>,
    pub fault_injection_enabled: bool,
    pub fault_injection_rate: f64,
}

/// A registered process.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: Uuid,
    pub hostname: String,
    pub pid: i32,
    pub roles: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// Heartbeat lease still valid.
    pub live: bool,
    pub concurrency: i32,
    pub executing: i64,
    pub total_processed: i64,
    pub total_completed: i64,
    pub total_failed: i64,
    pub total_retries: i64,
    pub recovered_orphans: i64,
}

/// A task as operators read it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TaskRow {
    pub id: i64,
    pub order_id: Uuid,
    pub seq: i32,
    pub kind: String,
    pub status: String,
    pub quantity: i32,
    pub delivered: i32,
    pub attempts: i32,
    pub max_attempts: i32,
    pub retry_after: DateTime<Utc>,
    pub last_error: Option<String>,
    pub last_error_class: Option<String>,
    pub claimed_by: Option<Uuid>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub executed_at: Option<DateTime<Utc>>,
}

macro_rules! task_columns {
    () => {
        "id, order_id, seq, kind, status, quantity, delivered, attempts, max_attempts, \
         retry_after, last_error, last_error_class, claimed_by, claimed_at, executed_at"
    };
}

/// One audited transition.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TransitionRow {
    pub occurred_at: DateTime<Utc>,
    pub from_state: Option<String>,
    pub to_state: String,
    pub transition_reason: String,
    pub error_class: Option<String>,
    pub actor_id: String,
    pub attempt: Option<i32>,
    pub correlation_id: Option<String>,
}

/// An EXECUTING task whose lease expired or whose worker is gone.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrphanRow {
    pub task_id: i64,
    pub order_id: Uuid,
    pub claimed_by: Option<Uuid>,
    pub attempts: i32,
    pub lease_expired_seconds_ago: f64,
}

/// Backlog and throughput.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CapacityRow {
    pub live_workers: i64,
    pub worker_slots: i64,
    pub executing: i64,
    pub pending_tasks: i64,
    pub pending_units: i64,
    pub retrying_tasks: i64,
    pub dead_letter_tasks: i64,
    pub tasks_5m: i64,
    pub paused: bool,
}

/// The daily health check's figures.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HealthRow {
    /// EXECUTING for longer than the stuck threshold.
    pub stuck_tasks: i64,
    pub orphans: i64,
    pub dead_letter: i64,
    pub failures_24h: i64,
    pub invariant_violations_24h: i64,
    pub live_workers: i64,
    pub paused: bool,
    pub leader: Option<Uuid>,
}

/// The cluster-wide gauges the leader exports (each count walks a partial index).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ClusterGauges {
    pub pending: i64,
    pub executing: i64,
    pub dead_letter: i64,
    pub executing_over_5m: i64,
    pub workers: i64,
    pub orders_pending: i64,
    pub orders_processing: i64,
    pub orders_attention: i64,
    pub oldest_processing_secs: f64,
    pub paused: bool,
    pub fault_injection: bool,
}

/// The latest recorded invariant check of an order.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedChecks {
    pub last_check_at: Option<DateTime<Utc>>,
    pub checks_failed: i64,
}

impl Store {
    pub async fn cluster_gauges(&self) -> Result<ClusterGauges, StoreError> {
        self.call("reading the cluster gauges", async {
            sqlx::query_as(
                "SELECT \
                   (SELECT count(*) FROM order_tasks WHERE status IN ('PENDING', 'FAILED_RETRYING')) AS pending, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING') AS executing, \
                   (SELECT count(*) FROM order_tasks t JOIN orders o ON o.id = t.order_id \
                      WHERE t.status = 'FAILED_PERMANENT' AND o.status = 'PROCESSING') AS dead_letter, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING' \
                      AND claimed_at < now() - interval '5 minutes') AS executing_over_5m, \
                   (SELECT count(*) FROM workers WHERE stopped_at IS NULL AND lease_expires_at > now() \
                      AND roles LIKE '%worker%') AS workers, \
                   (SELECT count(*) FROM orders WHERE status = 'PENDING') AS orders_pending, \
                   (SELECT count(*) FROM orders WHERE status = 'PROCESSING') AS orders_processing, \
                   (SELECT count(*) FROM orders WHERE status = 'PROCESSING' AND needs_attention) AS orders_attention, \
                   (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM orders \
                      WHERE status = 'PROCESSING') AS oldest_processing_secs, \
                   (SELECT paused FROM tally_control WHERE id) AS paused, \
                   (SELECT fault_injection_enabled FROM tally_control WHERE id) AS fault_injection",
            )
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    pub async fn control(&self) -> Result<ControlRow, StoreError> {
        self.call("reading the controls", async {
            sqlx::query_as(
                "SELECT paused, updated_at, updated_by, fault_injection_enabled, fault_injection_rate \
                 FROM tally_control WHERE id",
            )
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    pub async fn set_fault_injection(
        &self,
        enabled: bool,
        rate: Option<f64>,
        actor: &str,
    ) -> Result<ControlRow, StoreError> {
        self.call("setting fault injection", async {
            sqlx::query_as(
                "UPDATE tally_control SET fault_injection_enabled = $1, \
                 fault_injection_rate = coalesce($2, fault_injection_rate), updated_at = now(), updated_by = $3 \
                 WHERE id RETURNING paused, updated_at, updated_by, fault_injection_enabled, fault_injection_rate",
            )
            .bind(enabled)
            .bind(rate)
            .bind(actor)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Every registered process, newest first; stopped ones from the last day only.
    pub async fn list_workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.call("listing workers", async {
            sqlx::query_as(
                "SELECT w.id, w.hostname, w.pid, w.roles, w.version, w.started_at, w.heartbeat_at, \
                        w.stopped_at, (w.stopped_at IS NULL AND w.lease_expires_at > now()) AS live, \
                        w.concurrency, \
                        (SELECT count(*) FROM order_tasks t WHERE t.claimed_by = w.id AND t.status = 'EXECUTING') AS executing, \
                        w.total_processed, w.total_completed, w.total_failed, w.total_retries, w.recovered_orphans \
                 FROM workers w \
                 WHERE w.stopped_at IS NULL OR w.stopped_at > now() - interval '1 day' \
                 ORDER BY w.started_at DESC, w.id",
            )
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    /// EXECUTING tasks whose lease expired, or whose worker is stopped or gone.
    pub async fn orphans(&self, limit: u32) -> Result<Vec<OrphanRow>, StoreError> {
        self.call("listing orphans", async {
            sqlx::query_as(
                "SELECT t.id AS task_id, t.order_id, t.claimed_by, t.attempts, \
                        greatest(extract(epoch FROM now() - t.lease_expires_at), 0)::float8 AS lease_expired_seconds_ago \
                 FROM order_tasks t \
                 LEFT JOIN workers w ON w.id = t.claimed_by \
                 WHERE t.status = 'EXECUTING' \
                   AND (t.lease_expires_at < now() OR w.id IS NULL OR w.stopped_at IS NOT NULL \
                        OR w.lease_expires_at < now()) \
                 ORDER BY t.lease_expires_at LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    pub async fn capacity(&self) -> Result<CapacityRow, StoreError> {
        self.call("measuring capacity", async {
            sqlx::query_as(
                "SELECT \
                   (SELECT count(*) FROM workers WHERE stopped_at IS NULL AND lease_expires_at > now() \
                      AND roles LIKE '%worker%') AS live_workers, \
                   (SELECT coalesce(sum(concurrency), 0)::bigint FROM workers \
                      WHERE stopped_at IS NULL AND lease_expires_at > now()) AS worker_slots, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING') AS executing, \
                   (SELECT count(*) FROM order_tasks WHERE status IN ('PENDING', 'FAILED_RETRYING')) AS pending_tasks, \
                   (SELECT coalesce(sum(quantity - delivered), 0)::bigint FROM order_tasks \
                      WHERE status IN ('PENDING', 'FAILED_RETRYING', 'EXECUTING')) AS pending_units, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'FAILED_RETRYING') AS retrying_tasks, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'FAILED_PERMANENT') AS dead_letter_tasks, \
                   (SELECT count(*) FROM order_task_transitions \
                      WHERE occurred_at > now() - interval '5 minutes' AND to_state = 'COMPLETED' \
                        AND task_id IS NOT NULL) AS tasks_5m, \
                   (SELECT paused FROM tally_control WHERE id) AS paused",
            )
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Units delivered in the last five minutes, cluster-wide, from the orders' counters'
    /// audit: the tasks that completed, weighted by their size.
    pub async fn units_delivered_5m(&self, order: Option<Uuid>) -> Result<i64, StoreError> {
        self.call("measuring recent delivery", async {
            sqlx::query_scalar(
                "SELECT coalesce(sum(t.quantity), 0)::bigint FROM order_task_transitions x \
                 JOIN order_tasks t ON t.id = x.task_id \
                 WHERE x.occurred_at > now() - interval '5 minutes' AND x.to_state = 'COMPLETED' \
                   AND x.task_id IS NOT NULL AND ($1::uuid IS NULL OR x.order_id = $1)",
            )
            .bind(order)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    pub async fn get_task(&self, id: i64) -> Result<Option<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            task_columns!(),
            " FROM order_tasks WHERE id = $1 UNION ALL SELECT ",
            task_columns!(),
            " FROM order_tasks_archive WHERE id = $1 LIMIT 1"
        );
        self.call("reading a task", async {
            sqlx::query_as(SQL)
                .bind(id)
                .fetch_optional(self.pool())
                .await
        })
        .await
    }

    /// An order's tasks in one status (the dead-letter queue: FAILED_PERMANENT).
    pub async fn tasks_in_status(
        &self,
        order: Uuid,
        status: &str,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            task_columns!(),
            " FROM order_tasks WHERE order_id = $1 AND status = $2 ORDER BY seq LIMIT $3"
        );
        self.call("listing an order's tasks", async {
            sqlx::query_as(SQL)
                .bind(order)
                .bind(status)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
        })
        .await
    }

    /// Every recorded transition of one task, oldest first (archived ones too).
    pub async fn task_transitions(
        &self,
        order: Uuid,
        task: i64,
    ) -> Result<Vec<TransitionRow>, StoreError> {
        self.call("tracing a task", async {
            sqlx::query_as(
                "SELECT occurred_at, from_state, to_state, transition_reason, error_class, actor_id, \
                        attempt, correlation_id FROM ( \
                   SELECT id, occurred_at, from_state, to_state, transition_reason, error_class, actor_id, \
                          attempt, correlation_id FROM order_task_transitions WHERE order_id = $1 AND task_id = $2 \
                   UNION ALL \
                   SELECT id, occurred_at, from_state, to_state, transition_reason, error_class, actor_id, \
                          attempt, correlation_id FROM order_task_transitions_archive WHERE order_id = $1 AND task_id = $2 \
                 ) x ORDER BY occurred_at, id",
            )
            .bind(order)
            .bind(task)
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    pub async fn health(
        &self,
        stuck_after_secs: f64,
        leases: &[&str],
    ) -> Result<HealthRow, StoreError> {
        self.call("checking health", async {
            sqlx::query_as(
                "SELECT \
                   (SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING' \
                      AND claimed_at < now() - make_interval(secs => $1)) AS stuck_tasks, \
                   (SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING' AND lease_expires_at < now()) AS orphans, \
                   (SELECT count(*) FROM order_tasks t JOIN orders o ON o.id = t.order_id \
                      WHERE t.status = 'FAILED_PERMANENT' AND o.status = 'PROCESSING') AS dead_letter, \
                   (SELECT count(*) FROM order_tasks WHERE status IN ('FAILED_RETRYING', 'FAILED_PERMANENT') \
                      AND updated_at > now() - interval '1 day') AS failures_24h, \
                   (SELECT count(*) FROM invariant_check_log WHERE NOT passed \
                      AND check_timestamp > now() - interval '1 day') AS invariant_violations_24h, \
                   (SELECT count(*) FROM workers WHERE stopped_at IS NULL AND lease_expires_at > now()) AS live_workers, \
                   (SELECT paused FROM tally_control WHERE id) AS paused, \
                   (SELECT holder FROM leader_lease WHERE name = ANY($2) \
                      AND expires_at > now() ORDER BY expires_at DESC LIMIT 1) AS leader",
            )
            .bind(stuck_after_secs)
            .bind(leases)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Task counts by status, cluster-wide.
    pub async fn task_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.call("counting tasks", async {
            sqlx::query_as(
                "SELECT status, count(*) FROM order_tasks GROUP BY status ORDER BY status",
            )
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    pub async fn recorded_checks(&self, order: Uuid) -> Result<RecordedChecks, StoreError> {
        self.call("reading recorded checks", async {
            sqlx::query_as(
                "SELECT max(check_timestamp) AS last_check_at, count(*) FILTER (WHERE NOT passed) AS checks_failed \
                 FROM invariant_check_log WHERE order_id = $1",
            )
            .bind(order)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Orders an all-orders invariant check covers: unfinished ones and those finished in
    /// the last day (older ones were checked when they finished; their checks are recorded).
    pub async fn orders_to_check(&self, limit: u32) -> Result<Vec<Uuid>, StoreError> {
        self.call("choosing orders to check", async {
            sqlx::query_scalar(
                "SELECT id FROM orders WHERE status IN ('PENDING', 'PROCESSING') \
                 UNION ALL \
                 SELECT id FROM orders WHERE finished_at > now() - interval '1 day' AND archived_at IS NULL \
                 LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await
        })
        .await
    }

    pub async fn recorded_failures_24h(&self) -> Result<i64, StoreError> {
        self.call("counting recorded invariant failures", async {
            sqlx::query_scalar(
                "SELECT count(*) FROM invariant_check_log WHERE NOT passed AND check_timestamp > now() - interval '1 day'",
            )
            .fetch_one(self.pool())
            .await
        })
        .await
    }
}
