//! `workers`: one row per running Tally process (heartbeat, roles, lifetime counters).

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};

/// Who is registering.
#[derive(Debug, Clone)]
pub struct WorkerRegistration {
    pub id: Uuid,
    pub hostname: String,
    pub pid: i32,
    pub roles: String,
    pub version: String,
    /// Task slots this process offers (0 without the worker role).
    pub concurrency: i32,
}

/// Lifetime counters a process reports with each heartbeat (absolute values, so a lost or
/// repeated heartbeat never skews them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    pub processed: i64,
    pub completed: i64,
    pub failed: i64,
    pub retries: i64,
    pub recovered_orphans: i64,
}

/// Renews the process row and the leases of the claims it holds, in one statement. Only the
/// claim tokens the process knows it holds are renewed; a task rescued (or re-claimed by
/// another worker) meanwhile has a new token, so a zombie's heartbeat cannot revive it.
const HEARTBEAT: &str = r#"
WITH w AS (
    UPDATE workers
    SET heartbeat_at = now(),
        lease_expires_at = now() + make_interval(secs => $2),
        total_processed = $3, total_completed = $4, total_failed = $5, total_retries = $6,
        recovered_orphans = $7
    WHERE id = $1 AND stopped_at IS NULL
    RETURNING id
),
t AS (
    -- By key, fenced by the token alone (`order_tasks_executing_has_claim` makes a token
    -- mean EXECUTING): naming the status would let the planner walk
    -- `order_tasks_executing_idx` for this worker, every entry vacuum has not removed yet.
    UPDATE order_tasks t
    SET lease_expires_at = now() + make_interval(secs => $2)
    FROM unnest($8::bigint[], $9::uuid[]) AS h(id, token)
    WHERE t.id = h.id AND t.claim_token = h.token AND t.claimed_by = $1
    RETURNING t.id
)
SELECT (SELECT count(*) FROM w) AS workers, (SELECT count(*) FROM t) AS tasks
"#;

impl Store {
    pub async fn register_worker(
        &self,
        reg: &WorkerRegistration,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.call("registering the worker", async {
            sqlx::query(
                "INSERT INTO workers (id, hostname, pid, roles, version, lease_expires_at, concurrency) \
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL, \
                 lease_expires_at = EXCLUDED.lease_expires_at",
            )
            .bind(reg.id)
            .bind(&reg.hostname)
            .bind(reg.pid)
            .bind(&reg.roles)
            .bind(&reg.version)
            .bind(lease.as_secs_f64())
            .bind(reg.concurrency)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    /// Heartbeat. Returns (whether the worker row was found, task leases renewed).
    pub async fn heartbeat(
        &self,
        worker_id: Uuid,
        lease: Duration,
        c: WorkerCounters,
        held_ids: &[i64],
        held_tokens: &[Uuid],
    ) -> Result<(bool, u64), StoreError> {
        let (w, t): (i64, i64) = self
            .call("sending a heartbeat", async {
                sqlx::query_as(HEARTBEAT)
                    .bind(worker_id)
                    .bind(lease.as_secs_f64())
                    .bind(c.processed)
                    .bind(c.completed)
                    .bind(c.failed)
                    .bind(c.retries)
                    .bind(c.recovered_orphans)
                    .bind(held_ids)
                    .bind(held_tokens)
                    .fetch_one(self.pool())
                    .await
            })
            .await?;
        Ok((w == 1, t as u64))
    }

    /// Marks the process stopped, with its final counters.
    pub async fn deregister_worker(
        &self,
        worker_id: Uuid,
        c: WorkerCounters,
    ) -> Result<(), StoreError> {
        self.call("deregistering the worker", async {
            sqlx::query(
                "UPDATE workers SET stopped_at = now(), heartbeat_at = now(), lease_expires_at = now(), \
                 total_processed = $2, total_completed = $3, total_failed = $4, total_retries = $5, \
                 recovered_orphans = $6 WHERE id = $1",
            )
            .bind(worker_id)
            .bind(c.processed)
            .bind(c.completed)
            .bind(c.failed)
            .bind(c.retries)
            .bind(c.recovered_orphans)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }

    /// Tasks a worker currently holds (used by tests and the demo's chaos mode).
    pub async fn executing_count(&self, worker_id: Option<Uuid>) -> Result<i64, StoreError> {
        self.call("counting executing tasks", async {
            sqlx::query_scalar(
                "SELECT count(*) FROM order_tasks WHERE status = 'EXECUTING' \
                 AND ($1::uuid IS NULL OR claimed_by = $1)",
            )
            .bind(worker_id)
            .fetch_one(self.pool())
            .await
        })
        .await
    }

    /// Live processes (not stopped, lease not expired): (id, pid, roles).
    pub async fn live_workers(&self) -> Result<Vec<(Uuid, i32, String)>, StoreError> {
        self.call("listing live workers", async {
            sqlx::query_as(
                "SELECT id, pid, roles FROM workers WHERE stopped_at IS NULL \
                 AND lease_expires_at > now() ORDER BY started_at",
            )
            .fetch_all(self.pool())
            .await
        })
        .await
    }
}

impl Store {
    /// EXECUTING tasks per holding process id (pid), most first: for the demo's chaos mode.
    pub async fn executing_by_pid(&self) -> Result<Vec<(i32, i64)>, StoreError> {
        self.call("counting executing tasks per process", async {
            sqlx::query_as(
                "SELECT w.pid, count(*) FROM order_tasks t JOIN workers w ON w.id = t.claimed_by \
                 WHERE t.status = 'EXECUTING' AND w.stopped_at IS NULL GROUP BY w.pid ORDER BY 2 DESC",
            )
            .fetch_all(self.pool())
            .await
        })
        .await
    }
}
