//! The ready ring (migration 0005): reclaiming the slots whose rows are all claimed.
//!
//! A claim deletes the ring rows it takes. Vacuum would remove them in time, but not while
//! some session pins the xmin, and then every claim would walk them again. TRUNCATE does
//! not care about snapshots: it needs the slot's lock for a moment, and takes it only when
//! the slot is empty under that lock, so no row can be lost (a writer still inserting holds
//! its own lock on the slot until it commits).

use std::time::Duration;

use super::{Store, StoreError};

/// How long the reclaimer waits for a slot's lock before leaving it for the next pass: a
/// TRUNCATE waiting for its lock holds up the claims queued behind it.
const RECLAIM_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '10ms'";

/// How often the sweeper leader reclaims slots (a slot is written for 0.5 s per 4 s turn).
pub const RECLAIM_EVERY: Duration = Duration::from_millis(500);

/// Slots worth a look, of the ring's eight (`task_ready_0` … `task_ready_7`, as
/// `tally_ready_slot()` in migration 0005 counts them): not the one being written, nor its neighbours (a writer whose
/// clock reading is a moment old may still insert there), and not already empty on disk.
const CANDIDATES: &str = r#"
SELECT s::int2
FROM generate_series(0, 7) AS s, (SELECT tally_ready_slot() AS cur) c
WHERE s NOT IN (c.cur, (c.cur + 1) % 8, (c.cur + 7) % 8)
  AND pg_relation_size(format('task_ready_%s', s)::regclass) > 0
ORDER BY s
"#;

/// Gives every PENDING task that has no ring row one. Every writer keeps the ring in the
/// statement that changes the task, so this finds nothing unless something went around
/// them: a restore without the ring's data, a hand edit, a bug.
const REPAIR: &str = insert_ready_rows!(
    "order_tasks t
    WHERE t.status = 'PENDING'
      AND NOT EXISTS (SELECT 1 FROM task_ready r WHERE r.task_id = t.id)"
);

/// What one reclaim pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Slots emptied with TRUNCATE.
    pub truncated: u32,
    /// Slots still holding unclaimed rows (a backlog).
    pub occupied: u32,
    /// Slots whose lock was not free within the timeout.
    pub busy: u32,
}

impl Store {
    /// The sweeper's safety net for the ring (see [`REPAIR`]); returns the tasks repaired.
    pub async fn repair_ready_ring(&self) -> Result<u64, StoreError> {
        self.call("repairing the ready ring", async {
            sqlx::query(REPAIR)
                .execute(self.pool())
                .await
                .map(|r| r.rows_affected())
        })
        .await
    }

    /// Truncates every ring slot that holds no unclaimed row (see the module docs).
    pub async fn reclaim_ready_slots(&self) -> Result<ReclaimReport, StoreError> {
        let slots: Vec<i16> = self
            .call("listing ready-ring slots", async {
                sqlx::query_scalar(CANDIDATES).fetch_all(self.pool()).await
            })
            .await?;
        let mut report = ReclaimReport::default();
        for slot in slots {
            let table = format!("task_ready_{slot}");
            let any_row = format!("SELECT EXISTS (SELECT 1 FROM {table})");
            let outcome = self
                .call("reclaiming a ready-ring slot", async {
                    // Cheap look first, without the lock: a slot with a backlog stays.
                    let occupied: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(any_row.clone()))
                        .fetch_one(self.pool())
                        .await?;
                    if occupied {
                        return Ok(Some(false));
                    }
                    let mut tx = self.pool().begin().await?;
                    sqlx::query(RECLAIM_LOCK_TIMEOUT).execute(&mut *tx).await?;
                    let locked = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
                    )))
                    .execute(&mut *tx)
                    .await;
                    match locked {
                        Ok(_) => {}
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                            return Ok(None);
                        }
                        Err(e) => return Err(e),
                    }
                    // Under the lock no writer is mid-insert: empty now means empty.
                    let occupied: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(any_row.clone()))
                        .fetch_one(&mut *tx)
                        .await?;
                    if !occupied {
                        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {table}")))
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(Some(!occupied))
                })
                .await?;
            match outcome {
                Some(true) => report.truncated += 1,
                Some(false) => report.occupied += 1,
                None => report.busy += 1,
            }
        }
        Ok(report)
    }
}
