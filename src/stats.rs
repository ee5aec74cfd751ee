//! Lifetime counters of one process, reported with its heartbeat (`workers` row).

use std::sync::atomic::{AtomicI64, Ordering};

use crate::store::WorkerCounters;

#[derive(Debug, Default)]
pub struct Stats {
    /// Task outcomes written (any outcome).
    pub processed: AtomicI64,
    pub completed: AtomicI64,
    /// Tasks dead-lettered.
    pub failed: AtomicI64,
    /// Attempts that ended in a scheduled retry.
    pub retries: AtomicI64,
    /// Finishing writes dropped because the claim had been taken away.
    pub fenced: AtomicI64,
    pub recovered_orphans: AtomicI64,
}

impl Stats {
    pub fn add(counter: &AtomicI64, n: i64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn counters(&self) -> WorkerCounters {
        let get = |c: &AtomicI64| c.load(Ordering::Relaxed);
        WorkerCounters {
            processed: get(&self.processed),
            completed: get(&self.completed),
            failed: get(&self.failed),
            retries: get(&self.retries),
            recovered_orphans: get(&self.recovered_orphans),
        }
    }
}
