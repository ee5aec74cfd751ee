//! The sweeper role: leader-only maintenance services, each a bounded `*_once` that returns
//! counts (tests call them directly) and runs on its own interval while this process leads.
//!
//! - rescue: EXECUTING tasks whose lease expired go back to the queue (`orphan_recovered`);
//!   the write re-checks the expiry itself, so a task that completed after it was read is
//!   left alone (the stale-rescue trap).
//! - audit: conservation, accounting and completion invariants per order, from one snapshot,
//!   recorded in `invariant_check_log`; violations are logged at error level.
//! - finalise: the safety net for orders whose every unit is delivered, or that need
//!   attention, in case a completion write ever missed them.
//! - stuck orders: PROCESSING longer than `stuck_after` is logged.
//! - retention: finished orders' tasks and audit rows move to the archive tables.
//! - ready ring: every half second, slots of `task_ready` whose rows are all claimed are
//!   truncated (`Store::reclaim_ready_slots`), so claims stay flat under a pinned xmin; once
//!   a minute, PENDING tasks without a ring row get one (`Store::repair_ready_ring`).
//!
//! Every write is conditional, so two sweepers at once are harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::domain::state::decide;
use crate::domain::{Backoff, TaskEvent};
use crate::leader::Leadership;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{RECLAIM_EVERY, RetentionReport, Store, StoreError, TaskUpdate, UpdateFence};

#[derive(Debug, Clone)]
pub struct SweeperConfig {
    /// How often the leader loop ticks (lease renewal and rescue).
    pub tick_interval: Duration,
    /// Most orphans rescued per pass.
    pub rescue_batch_max: u32,
    /// How often running orders are re-audited.
    pub audit_interval: Duration,
    /// Most orders audited per pass.
    pub audit_batch_max: u32,
    /// An order PROCESSING longer than this is reported as stuck.
    pub stuck_after: Duration,
    /// Finished orders older than this many days are archived.
    pub retention_days: u32,
    /// Most rows moved per table per retention pass.
    pub retention_batch_max: u32,
    /// How often retention runs.
    pub retention_interval: Duration,
    pub backoff: Backoff,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            tick_interval: Duration::from_secs(1),
            rescue_batch_max: 500,
            audit_interval: Duration::from_secs(10),
            audit_batch_max: 200,
            stuck_after: Duration::from_secs(2 * 3600),
            retention_days: 30,
            retention_batch_max: 5000,
            retention_interval: Duration::from_secs(60),
            backoff: Backoff::DEFAULT,
        }
    }
}

/// What one audit pass found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditReport {
    pub orders_checked: u64,
    pub violations: Vec<(uuid::Uuid, serde_json::Value)>,
}

pub struct Sweeper {
    store: Store,
    config: SweeperConfig,
    actor: String,
    stats: Arc<Stats>,
}

impl Sweeper {
    pub fn new(store: Store, config: SweeperConfig, actor: String, stats: Arc<Stats>) -> Self {
        Self {
            store,
            config,
            actor,
            stats,
        }
    }

    /// Rescues orphaned tasks. Returns how many this sweeper recovered.
    pub async fn rescue_once(&self) -> Result<u64, StoreError> {
        let expired = self
            .store
            .expired_tasks(self.config.rescue_batch_max)
            .await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let updates: Vec<TaskUpdate> = expired
            .iter()
            .filter_map(|t| {
                decide(
                    &t.snapshot(),
                    &TaskEvent::LeaseExpired,
                    &self.config.backoff,
                    0.0,
                )
                .map_err(|e| tracing::error!(task.id = t.id, error = %e, "cannot rescue"))
                .ok()
                .map(|transition| TaskUpdate {
                    task_id: t.id,
                    claim_token: t.claim_token,
                    transition,
                    error: Some(format!(
                        "lease expired while claimed by worker {}",
                        t.claimed_by.map(|w| w.to_string()).unwrap_or_default()
                    )),
                })
            })
            .collect();
        let applied = self
            .store
            .apply_task_updates(&updates, UpdateFence::ExpiredLease, &self.actor)
            .await?;
        let n = applied.task_ids.len() as u64;
        if n > 0 {
            Stats::add(&self.stats.recovered_orphans, n as i64);
            self.stats.metrics.orphans_recovered_total.inc_by(n);
            tracing::warn!(recovered = n, "recovered orphaned tasks");
        }
        Ok(n)
    }

    /// Audits the orders that are due. Violations are logged at error level.
    pub async fn audit_once(&self) -> Result<AuditReport, StoreError> {
        let ids = self
            .store
            .orders_due_for_audit(
                self.config.audit_batch_max,
                self.config.audit_interval.as_secs_f64(),
                self.config.retention_days as i32,
            )
            .await?;
        self.audit_orders(&ids).await
    }

    /// Audits the given orders now.
    pub async fn audit_orders(&self, ids: &[uuid::Uuid]) -> Result<AuditReport, StoreError> {
        if ids.is_empty() {
            return Ok(AuditReport::default());
        }
        let ledgers = self.store.order_ledgers(ids).await?;
        let mut report = AuditReport {
            orders_checked: ledgers.len() as u64,
            ..Default::default()
        };
        let mut checks = Vec::with_capacity(ledgers.len());
        for (id, ledger) in ledgers {
            let violations = ledger.check();
            let json = serde_json::to_value(&violations).unwrap_or_default();
            if !violations.is_empty() {
                tracing::error!(order.id = %id, violations = %json, "invariant violation");
                report.violations.push((id, json.clone()));
            }
            checks.push((id, ledger, json));
        }
        self.store.record_checks(&checks, &self.actor).await?;
        let m = &self.stats.metrics.invariant_checks_total;
        let failed = report.violations.len() as u64;
        m.with_label_values(&["failed"]).inc_by(failed);
        m.with_label_values(&["passed"])
            .inc_by(report.orders_checked.saturating_sub(failed));
        Ok(report)
    }

    /// Safety-net finaliser. Returns (completed, flagged for attention).
    pub async fn finalise_once(&self) -> Result<(u64, u64), StoreError> {
        let (completed, flagged) = self.store.finalise_orders(&self.actor).await?;
        self.stats
            .metrics
            .orders_finished_total
            .with_label_values(&["COMPLETED"])
            .inc_by(completed);
        if completed > 0 {
            tracing::warn!(
                completed,
                "safety net completed orders a completion write missed"
            );
        }
        if flagged > 0 {
            tracing::warn!(
                flagged,
                "orders need attention: every remaining task is dead-lettered"
            );
        }
        Ok((completed, flagged))
    }

    /// Logs orders PROCESSING longer than `stuck_after`. Returns how many.
    pub async fn stuck_once(&self) -> Result<u64, StoreError> {
        let stuck = self
            .store
            .stuck_orders(self.config.stuck_after.as_secs_f64(), 20)
            .await?;
        for (id, age) in &stuck {
            tracing::warn!(order.id = %id, age_secs = *age as u64, "order stuck in PROCESSING");
        }
        Ok(stuck.len() as u64)
    }

    pub async fn retention_once(&self) -> Result<RetentionReport, StoreError> {
        let r = self
            .store
            .archive_finished(
                self.config.retention_days as i32,
                self.config.retention_batch_max,
            )
            .await?;
        if r != RetentionReport::default() {
            tracing::info!(?r, "retention moved finished work to the archive");
        }
        Ok(r)
    }

    /// The leader's work for one tick: each service when its cadence says it is due.
    async fn leader_pass(&self, due: &mut Cadences) {
        if let Some(run) = due.rescue.start() {
            log_err("rescue", self.rescue_once().await);
            due.rescue.ran(run);
        }
        if let Some(run) = due.finalise.start() {
            log_err("finalise", self.finalise_once().await);
            log_err(
                "close-out",
                self.store.close_out_finished_orders(100, &self.actor).await,
            );
            due.finalise.ran(run);
        }
        if let Some(run) = due.callbacks.start() {
            log_err(
                "callback queueing",
                self.store.enqueue_callbacks(500, CALLBACK_ATTEMPTS).await,
            );
            due.callbacks.ran(run);
        }
        if let Some(run) = due.audit.start() {
            log_err("audit", self.audit_once().await);
            due.audit.ran(run);
        }
        if let Some(run) = due.stuck.start() {
            log_err("stuck-order scan", self.stuck_once().await);
            log_err("worker reaping", self.store.reap_workers().await);
            match self.store.repair_ready_ring().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    tasks = n,
                    "PENDING tasks had no ready-ring row and were given one (a restore without \
                     task_ready's data, or a write around Tally)"
                ),
                Err(e) => tracing::warn!(error = %e, "sweeper ready-ring repair failed"),
            }
            due.stuck.ran(run);
        }
        if let Some(run) = due.retention.start() {
            log_err("retention", self.retention_once().await);
            due.retention.ran(run);
        }
    }

    /// The leader loop: renew the lease every tick; while leading, run each service on its
    /// interval. Releases the lease on shutdown so a standby takes over at once.
    pub async fn run(self, mut leadership: Leadership, shutdown: Shutdown) {
        let c = &self.config;
        let mut due = Cadences {
            rescue: Cadence::every(c.tick_interval),
            finalise: Cadence::every(c.tick_interval),
            callbacks: Cadence::every(c.tick_interval),
            audit: Cadence::every(c.audit_interval),
            stuck: Cadence::every(Duration::from_secs(60)),
            retention: Cadence::every(c.retention_interval),
            gauges: Cadence::every(crate::metrics::CLUSTER_GAUGES_EVERY),
        };
        let metrics = self.stats.metrics.clone();
        // The ring reclaimer keeps its own half-second beat: a leader pass (audits,
        // retention) can take longer than that.
        let leading_now = Arc::new(AtomicBool::new(false));
        let reclaimer = tokio::spawn(reclaim_ready_ring(
            self.store.clone(),
            leading_now.clone(),
            shutdown.clone(),
        ));
        while !shutdown.is_triggered() {
            let leading = leadership.tick().await.is_some();
            leading_now.store(leading, Ordering::Relaxed);
            metrics
                .leader
                .with_label_values(&["sweeper"])
                .set(i64::from(leading));
            if !leading {
                metrics.set_cluster_export(false);
            }
            if leading {
                if let Some(run) = due.gauges.start() {
                    match self.store.cluster_gauges().await {
                        Ok(g) => {
                            metrics.tasks_pending.set(g.pending);
                            metrics.tasks_executing.set(g.executing);
                            metrics.dead_letter_queue.set(g.dead_letter);
                            metrics.executing_over_5m.set(g.executing_over_5m);
                            metrics.worker_active.set(g.workers);
                            metrics
                                .orders_open
                                .with_label_values(&["PENDING"])
                                .set(g.orders_pending);
                            metrics
                                .orders_open
                                .with_label_values(&["PROCESSING"])
                                .set(g.orders_processing);
                            metrics.orders_needing_attention.set(g.orders_attention);
                            metrics.oldest_processing_age.set(g.oldest_processing_secs);
                            metrics.paused.set(i64::from(g.paused));
                            metrics
                                .fault_injection_enabled
                                .set(i64::from(g.fault_injection));
                            metrics.set_cluster_export(true);
                        }
                        Err(e) => tracing::warn!(error = %e, "reading the cluster gauges failed"),
                    }
                    due.gauges.ran(run);
                }
                let pass = tracing::info_span!("sweeper.pass");
                tracing::Instrument::instrument(self.leader_pass(&mut due), pass).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.tick_interval) => {}
                _ = shutdown.wait() => break,
            }
        }
        leading_now.store(false, Ordering::Relaxed);
        reclaimer.abort();
        metrics.set_cluster_export(false);
        metrics.leader.with_label_values(&["sweeper"]).set(0);
        leadership.release().await;
    }
}

/// A leader service's next run must wait this many times as long as its last run took, so
/// no service holds a database backend more than a tenth of the time. A pinned xmin makes
/// scans of status-filtered indexes grow for as long as it lasts (their dead entries cannot
/// be removed); the services then run less often instead of crowding out intake and claims.
const STRETCH: u32 = 10;

/// When one leader service runs next: its interval, stretched to [`STRETCH`] × its last run.
#[derive(Debug, Clone, Copy)]
struct Cadence {
    every: Duration,
    next: Instant,
}

impl Cadence {
    /// Due at once, then every `every` (at least).
    fn every(every: Duration) -> Self {
        Cadence {
            every,
            next: Instant::now(),
        }
    }

    /// `Some(start)` when the service is due now.
    fn start(&self) -> Option<Instant> {
        let now = Instant::now();
        (now >= self.next).then_some(now)
    }

    /// Schedules the next run after one that began at `started` and has just ended.
    fn ran(&mut self, started: Instant) {
        self.schedule(started, started.elapsed());
    }

    fn schedule(&mut self, started: Instant, took: Duration) {
        self.next = started + self.every.max(took * STRETCH);
    }
}

/// The leader services' cadences.
struct Cadences {
    rescue: Cadence,
    finalise: Cadence,
    callbacks: Cadence,
    audit: Cadence,
    stuck: Cadence,
    retention: Cadence,
    gauges: Cadence,
}

/// Truncates drained ready-ring slots every [`RECLAIM_EVERY`] while this process leads.
async fn reclaim_ready_ring(store: Store, leading: Arc<AtomicBool>, shutdown: Shutdown) {
    while !shutdown.is_triggered() {
        if leading.load(Ordering::Relaxed) {
            match store.reclaim_ready_slots().await {
                Ok(r) => tracing::debug!(
                    truncated = r.truncated,
                    occupied = r.occupied,
                    busy = r.busy,
                    "ready ring reclaimed"
                ),
                Err(e) => tracing::warn!(error = %e, "sweeper ready-ring reclaim failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECLAIM_EVERY) => {}
            _ = shutdown.wait() => break,
        }
    }
}

/// Attempts per order notification (backoff 2 s doubling to 10 min: about 30 minutes).
pub const CALLBACK_ATTEMPTS: i32 = 8;

fn log_err<T>(what: &str, r: Result<T, StoreError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "sweeper {what} pass failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_service_waits_ten_times_its_run_and_a_fast_one_its_interval() {
        let t0 = Instant::now();
        let mut c = Cadence::every(Duration::from_secs(1));
        assert!(c.start().is_some(), "due at once");
        c.schedule(t0, Duration::from_millis(20));
        assert_eq!(c.next, t0 + Duration::from_secs(1));
        assert!(c.start().is_none());
        c.schedule(t0, Duration::from_millis(300));
        assert_eq!(c.next, t0 + Duration::from_secs(3));
    }
}
