//! What one process reports with its heartbeat: lifetime counters (`workers` row) and the
//! claims it really holds (whose leases the heartbeat renews).

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::metrics::Metrics;
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
    pub recovered_orphans: AtomicI64,
    /// Claim tokens this process is executing right now. The heartbeat renews exactly these
    /// leases: a claim whose response was lost (the connection died after the commit) is not
    /// in here, so its lease runs out and the sweeper rescues it instead of it being kept
    /// alive forever by a worker that does not know it holds it.
    held: Mutex<HashSet<Uuid>>,
    /// The process's Prometheus metrics.
    pub metrics: Arc<Metrics>,
}

impl Stats {
    pub fn add(counter: &AtomicI64, n: i64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn hold(&self, tokens: impl IntoIterator<Item = Uuid>) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tokens);
    }

    pub fn release(&self, tokens: impl IntoIterator<Item = Uuid>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for t in tokens {
            held.remove(&t);
        }
    }

    /// The claim tokens held now.
    pub fn held(&self) -> Vec<Uuid> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
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
