//! The worker role: claim → execute → complete.
//!
//! ```text
//!             free slots (semaphore permits)
//!   claim loop ──claims ≤ min(batch, free) in ONE statement──► executor tasks (one per task)
//!        ▲  wakes on NOTIFY (debounced) or the poll timer           │ outcome + permit
//!        │                                                          ▼
//!        └──────────── permits come back after the write ◄── completer (batched, fenced writes)
//! ```
//!
//! - A slot is held from claim until the outcome is durable, so "free slots" always matches
//!   what the database thinks this worker holds.
//! - NOTIFY only shortens the wait; the poll timer is what correctness relies on (retries
//!   come due by time, and notifications are lost across reconnects).
//! - Every finishing write is fenced by the claim token (see `store::tasks`); a write that
//!   matches no row means the claim was taken away, and it is dropped.
//! - Shutdown: stop claiming, let running attempts finish within the grace period, then
//!   cancel the rest and hand them back without burning an attempt.

mod completer;
mod executor;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use uuid::Uuid;

use crate::domain::Backoff;
use crate::handler::Handlers;
use crate::kinds::Catalog;
use crate::shutdown::{self, Shutdown};
use crate::stats::Stats;
use crate::store::{Store, TASKS_CHANNEL};

pub use executor::Finished;

/// Worker settings (validated by `config`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Most tasks claimed by one statement.
    pub batch_size_max: u32,
    /// Most tasks executing at once in this process.
    pub concurrency_max: u32,
    /// How long a claim stays valid without a heartbeat.
    pub lease_ttl: Duration,
    /// Longest one attempt may run before it is cancelled as a TimeoutError.
    pub claim_timeout: Duration,
    /// Longest wait between claims when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Wake early on NOTIFY (off behind PgBouncer in transaction mode).
    pub listen: bool,
    /// How long running attempts may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Retry delays.
    pub backoff: Backoff,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            batch_size_max: 100,
            concurrency_max: 64,
            lease_ttl: Duration::from_secs(10),
            claim_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            listen: true,
            shutdown_grace: Duration::from_secs(25),
            backoff: Backoff::DEFAULT,
        }
    }
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub claimed: u64,
    pub handed_back: u64,
}

/// One worker. Its `id` is the process id in `workers` and the `claimed_by` of its tasks.
pub struct Worker {
    store: Store,
    config: WorkerConfig,
    catalog: Arc<Catalog>,
    id: Uuid,
    stats: Arc<Stats>,
}

/// How often a worker reloads kinds and the fault-injection switch.
const CATALOG_REFRESH: Duration = Duration::from_secs(2);

impl Worker {
    /// A worker that runs exactly `handlers` (stored kinds are ignored).
    pub fn new(
        store: Store,
        config: WorkerConfig,
        handlers: Handlers,
        id: Uuid,
        stats: Arc<Stats>,
    ) -> Self {
        let catalog = Catalog::new(
            handlers,
            config.backoff,
            crate::handler::SimulateConfig::default(),
            false,
        );
        Self::with_catalog(store, config, Arc::new(catalog), id, stats)
    }

    /// A worker that runs the kinds of `catalog` (refreshed while it runs).
    pub fn with_catalog(
        store: Store,
        config: WorkerConfig,
        catalog: Arc<Catalog>,
        id: Uuid,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            store,
            config,
            catalog,
            id,
            stats,
        }
    }

    /// Runs until `shutdown` fires, then drains as described in the module docs.
    pub async fn run(self, shutdown: Shutdown) -> WorkerReport {
        let cfg = &self.config;
        if let Err(e) = self.catalog.refresh(&self.store).await {
            tracing::warn!(error = %e, "loading kinds failed; retrying in the background");
        }
        let refresher = tokio::spawn(refresh(
            self.store.clone(),
            self.catalog.clone(),
            shutdown.clone(),
        ));
        let slots = Arc::new(Semaphore::new(cfg.concurrency_max as usize));
        let wake = Arc::new(Notify::new());
        // Cancels attempts still running when the grace period ends.
        let (hard_stop_trigger, hard_stop) = shutdown::channel();
        let (tx, rx) = mpsc::channel::<Finished>(cfg.concurrency_max as usize);

        let listener = cfg
            .listen
            .then(|| tokio::spawn(listen(self.store.clone(), wake.clone(), shutdown.clone())));
        // Commits of this process (intake, hand-backs) wake it without a database hop.
        let local = tokio::spawn(forward_local(
            self.store.local_task_wakeups(),
            wake.clone(),
            shutdown.clone(),
        ));
        let completer = tokio::spawn(completer::run(
            self.store.clone(),
            rx,
            self.id.to_string(),
            self.stats.clone(),
            hard_stop.clone(),
        ));

        let mut report = WorkerReport::default();
        let mut db_backoff = Duration::from_millis(100);
        let kinds = self.catalog.snapshot().claimable_kinds();
        tracing::info!(worker.id = %self.id, ?kinds, concurrency = cfg.concurrency_max, batch = cfg.batch_size_max, "worker started");
        'claiming: while !shutdown.is_triggered() {
            // Wait for at least one free slot, then take as many as are free, up to a batch.
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.wait() => break,
            };
            let mut permits = vec![first];
            while permits.len() < cfg.batch_size_max as usize {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let want = permits.len() as u32;
            let catalog = self.catalog.snapshot();
            let kinds = catalog.claimable_kinds();
            if kinds.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                    _ = shutdown.wait() => break,
                }
                continue;
            }
            let claim_started = std::time::Instant::now();
            let claim_span = tracing::info_span!("tasks.claim", want, got = tracing::field::Empty);
            let claimed = match tracing::Instrument::instrument(
                self.store.claim_tasks(self.id, want, &kinds, cfg.lease_ttl),
                claim_span.clone(),
            )
            .await
            {
                Ok(tasks) => {
                    db_backoff = Duration::from_millis(100);
                    tasks
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?db_backoff, "claim failed");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(db_backoff) => {}
                        _ = shutdown.wait() => break 'claiming,
                    }
                    db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            // A kind changed since the catalog was loaded (an operator just fixed a webhook
            // URL, say): reload before running anything on the old settings.
            let catalog = if claimed
                .iter()
                .any(|t| catalog.is_stale(&t.kind, t.kind_version))
            {
                if let Err(e) = self.catalog.refresh(&self.store).await {
                    tracing::warn!(error = %e, "reloading changed kinds failed; using the last catalog");
                }
                self.catalog.snapshot()
            } else {
                catalog
            };
            let got = claimed.len() as u32;
            claim_span.record("got", got);
            drop(claim_span);
            let m = &self.stats.metrics;
            m.claim_duration
                .observe(claim_started.elapsed().as_secs_f64());
            m.claim_batch_size.observe(f64::from(got));
            for t in &claimed {
                m.pickup_latency.observe(t.pickup_secs);
                if let Some(r) = t.recovery_secs {
                    m.recovery.observe(r);
                }
            }
            for t in &claimed {
                m.touch_kind(&t.kind);
            }
            let batch = crate::metrics::BatchTimer::start(m.clone());
            self.stats
                .hold(claimed.iter().map(|t| (t.id, t.claim_token)));
            report.claimed += u64::from(got);
            for task in claimed {
                let permit = permits.pop().expect("one permit per claimed task");
                let runtime = catalog.kinds.get(&task.kind).cloned();
                tokio::spawn(executor::execute(
                    task,
                    runtime,
                    catalog.fault_rate,
                    (permit, batch.clone(), m.clone()),
                    cfg.claim_timeout,
                    tx.clone(),
                    hard_stop.clone(),
                ));
            }
            drop(permits);
            if got < want {
                // Drained what is claimable now: sleep until notified, polled, or stopped.
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                    _ = shutdown.wait() => break,
                }
            }
        }

        // Drain: running attempts get the grace period; then they are cancelled (handed back).
        tracing::info!(worker.id = %self.id, "worker stopping: no more claims");
        let all = cfg.concurrency_max;
        let drained =
            tokio::time::timeout(cfg.shutdown_grace, slots.clone().acquire_many_owned(all)).await;
        if drained.is_err() {
            tracing::warn!(worker.id = %self.id, grace = ?cfg.shutdown_grace, "grace period over: handing back unfinished tasks");
            hard_stop_trigger.fire();
            // Hand-backs are written by the completer; give it a bounded time to do so.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                slots.clone().acquire_many_owned(all),
            )
            .await;
        }
        drop(tx);
        match tokio::time::timeout(Duration::from_secs(5), completer).await {
            Ok(Ok(handed_back)) => report.handed_back = handed_back,
            _ => tracing::warn!("completer did not finish; unwritten outcomes will be rescued"),
        }
        if let Some(l) = listener {
            l.abort();
        }
        local.abort();
        refresher.abort();
        drop(hard_stop_trigger);
        tracing::info!(worker.id = %self.id, claimed = report.claimed, handed_back = report.handed_back, "worker stopped");
        report
    }
}

/// Reloads the catalog every [`CATALOG_REFRESH`] until shutdown.
async fn refresh(store: Store, catalog: Arc<Catalog>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CATALOG_REFRESH) => {}
            _ = shutdown.wait() => return,
        }
        if let Err(e) = catalog.refresh(&store).await {
            tracing::debug!(error = %e, "reloading kinds failed; keeping the last catalog");
        }
    }
}

/// Forwards this process's own wake-ups (`Store::wake_tasks`) to `wake`.
pub(crate) async fn forward_local(
    mut local: tokio::sync::watch::Receiver<u64>,
    wake: Arc<Notify>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            changed = local.changed() => match changed {
                Ok(()) => wake.notify_one(),
                Err(_) => return,
            },
            _ = shutdown.wait() => return,
        }
    }
}

/// Forwards NOTIFYs on the tasks channel to `wake`. `Notify` keeps at most one pending
/// wake-up, so a burst of notifications costs one claim, not one each (the debounce).
async fn listen(store: Store, wake: Arc<Notify>, shutdown: Shutdown) {
    while !shutdown.is_triggered() {
        let mut listener = match PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        if let Err(e) = listener.listen(TASKS_CHANNEL).await {
            tracing::debug!(error = %e, "LISTEN failed; polling meanwhile");
            continue;
        }
        // Anything sent while we were not listening is lost: look once.
        wake.notify_one();
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => { tracing::debug!("LISTEN connection lost; reconnecting"); break; }
                    Err(e) => { tracing::debug!(error = %e, "LISTEN failed; reconnecting"); break; }
                },
                _ = shutdown.wait() => return,
            }
        }
    }
}
