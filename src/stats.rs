//! What one process reports with its heartbeat: lifetime counters (`workers` row) and the
//! claims it really holds (whose leases the heartbeat renews).

use std::collections::HashMap;
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
    /// alive forever by a worker that does not know it holds it. A token is shared by the
    /// tasks of one claim batch, so each is counted: it stays held until its last task ends.
    held: Mutex<HashMap<Uuid, usize>>,
    /// The process's Prometheus metrics.
    pub metrics: Arc<Metrics>,
}

impl Stats {
    pub fn add(counter: &AtomicI64, n: i64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn hold(&self, tokens: impl IntoIterator<Item = Uuid>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for t in tokens {
            *held.entry(t).or_default() += 1;
        }
    }

    pub fn release(&self, tokens: impl IntoIterator<Item = Uuid>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for t in tokens {
            if let Some(n) = held.get_mut(&t) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&t);
                }
            }
        }
    }

    /// The claim tokens held now.
    pub fn held(&self) -> Vec<Uuid> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_token_stays_held_until_its_last_task_is_released() {
        let stats = Stats::default();
        let (batch, other) = (Uuid::new_v4(), Uuid::new_v4());
        stats.hold([batch, batch, other]);
        stats.release([batch]);
        let mut held = stats.held();
        held.sort();
        let mut want = vec![batch, other];
        want.sort();
        assert_eq!(held, want, "one task of the batch is still running");
        stats.release([batch, other]);
        assert!(stats.held().is_empty());
        // Releasing what is not held (a fenced-off duplicate) changes nothing.
        stats.release([batch]);
        assert!(stats.held().is_empty());
    }
}
