//! Writes finished attempts in batches: whatever arrived while the previous write was in
//! flight goes into the next one, so batches grow with load and add no latency when idle.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Finished;
use crate::domain::TaskStatus;
use crate::domain::state::decide;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{Store, TaskUpdate, UpdateFence};

/// Most outcomes in one write.
const BATCH_MAX: usize = 500;

/// Runs until every sender is gone. Returns how many tasks it handed back.
pub(super) async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Finished>,
    actor: String,
    stats: Arc<Stats>,
    hard_stop: Shutdown,
) -> u64 {
    let mut handed_back = 0u64;
    let mut batch: Vec<Finished> = Vec::with_capacity(BATCH_MAX);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let updates: Vec<TaskUpdate> = batch
            .iter()
            .filter_map(|f| {
                let draw = fastrand::f64();
                match decide(&f.task.snapshot(), &f.event, &f.backoff, draw) {
                    Ok(transition) => Some(TaskUpdate {
                        task_id: f.task.id,
                        claim_token: f.task.claim_token,
                        transition,
                        error: f.error.clone(),
                    }),
                    Err(e) => {
                        tracing::error!(task.id = f.task.id, error = %e, "undecidable outcome; leaving the task to the sweeper");
                        None
                    }
                }
            })
            .collect();
        let kinds: std::collections::HashMap<i64, &str> = batch
            .iter()
            .map(|f| (f.task.id, f.task.kind.as_str()))
            .collect();
        if let Some(applied) = write(&store, &updates, &actor, &hard_stop).await {
            count(&stats, &updates, &applied, &kinds);
        }
        handed_back += updates
            .iter()
            .filter(|u| u.transition.is_hand_back())
            .count() as u64;
        // Written (or given up to the sweeper): no longer ours to renew. Dropping the batch
        // releases its slots.
        stats.release(batch.iter().map(|f| (f.task.id, f.task.claim_token)));
        batch.clear();
    }
    handed_back
}

/// Writes until it succeeds. If the database stays away past the hard stop, the outcomes
/// are given up: the tasks stay EXECUTING and the sweeper rescues them once their lease
/// expires, which is safe because this write would have been fenced by then anyway.
async fn write(
    store: &Store,
    updates: &[TaskUpdate],
    actor: &str,
    hard_stop: &Shutdown,
) -> Option<crate::store::Applied> {
    let mut delay = Duration::from_millis(50);
    loop {
        match store
            .apply_task_updates(updates, UpdateFence::Claim, actor)
            .await
        {
            Ok(applied) => {
                let fenced = updates.len() - applied.task_ids.len();
                if fenced > 0 {
                    tracing::warn!(
                        fenced,
                        "claims were taken away before the outcome was written; outcomes dropped"
                    );
                }
                for order in &applied.completed_orders {
                    tracing::info!(order.id = %order, "order completed");
                }
                return Some(applied);
            }
            Err(e) => {
                if hard_stop.is_triggered() && delay >= Duration::from_secs(1) {
                    tracing::error!(error = %e, tasks = updates.len(), "giving up on writing outcomes during shutdown; the sweeper will rescue these tasks");
                    return None;
                }
                tracing::warn!(error = %e, retry_in = ?delay, "writing outcomes failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Heartbeat counters and metrics for the outcomes that were written; fenced ones count
/// only as `fenced` attempts.
fn count(
    stats: &Stats,
    updates: &[TaskUpdate],
    applied: &crate::store::Applied,
    kinds: &std::collections::HashMap<i64, &str>,
) {
    let m = &stats.metrics;
    let written: std::collections::HashSet<i64> = applied.task_ids.iter().copied().collect();
    for u in updates {
        let t = &u.transition;
        let kind = kinds.get(&u.task_id).copied().unwrap_or("");
        if !written.contains(&u.task_id) {
            m.attempts_total.with_label_values(&[kind, "fenced"]).inc();
            continue;
        }
        let outcome = match t.reason {
            "delivered" => "delivered",
            "partial_delivery" => "partial",
            "retry_scheduled" => "retry",
            "dead_lettered" => "dead_lettered",
            _ => "handed_back",
        };
        m.attempts_total.with_label_values(&[kind, outcome]).inc();
        if t.is_hand_back() {
            continue;
        }
        m.tasks_total.with_label_values(&[t.to.as_str()]).inc();
        m.units_total
            .with_label_values(&["delivered"])
            .inc_by(u64::from(t.delivered_delta));
        m.units_total
            .with_label_values(&["failed"])
            .inc_by(t.failed_units_delta.max(0) as u64);
        Stats::add(&stats.processed, 1);
        match t.to {
            TaskStatus::Completed => Stats::add(&stats.completed, 1),
            TaskStatus::FailedPermanent => Stats::add(&stats.failed, 1),
            TaskStatus::FailedRetrying => {
                Stats::add(&stats.retries, 1);
                m.retries_total.inc();
            }
            _ => {}
        }
    }
    for age in &applied.completed_ages {
        m.order_completion.observe(*age);
    }
    m.orders_finished_total
        .with_label_values(&["COMPLETED"])
        .inc_by(applied.completed_orders.len() as u64);
}
