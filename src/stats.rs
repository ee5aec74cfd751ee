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
    /// The claims this process is executing right now, task id → claim token. The heartbeat
    /// renews exactly these leases: a claim whose response was lost (the connection died
    /// after the commit) is not in here, so its lease runs out and the sweeper rescues it
    /// instead of it being kept alive forever by a worker that does not know it holds it.
    /// Keyed by task so the renewal is a primary-key lookup per task: looking the leases up
    /// by worker walks every EXECUTING entry vacuum has not removed yet (60 ms a heartbeat
    /// four minutes into a pinned xmin at 2,000 tasks/s).
    held: Mutex<HashMap<i64, Uuid>>,
    /// The process's Prometheus metrics.
    pub metrics: Arc<Metrics>,
}

impl Stats {
    pub fn add(counter: &AtomicI64, n: i64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Holds claimed tasks, as (task id, claim token).
    pub fn hold(&self, claims: impl IntoIterator<Item = (i64, Uuid)>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.extend(claims);
    }

    /// Releases tasks whose outcome is written; a task held under another claim (it was
    /// rescued and claimed again meanwhile) stays held.
    pub fn release(&self, claims: impl IntoIterator<Item = (i64, Uuid)>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for (id, token) in claims {
            if held.get(&id) == Some(&token) {
                held.remove(&id);
            }
        }
    }

    /// The claims held now: task ids and their tokens, in the same order.
    pub fn held(&self) -> (Vec<i64>, Vec<Uuid>) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, token)| (*id, *token))
            .unzip()
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
        stats.hold([(1, batch), (2, batch), (3, other)]);
        stats.release([(1, batch)]);
        let (mut ids, tokens) = stats.held();
        assert_eq!(tokens.iter().filter(|t| **t == batch).count(), 1);
        ids.sort();
        assert_eq!(ids, vec![2, 3], "one task of the batch is still running");
        // A release under an older claim of the same task leaves the newer claim held.
        stats.release([(3, batch)]);
        let (mut ids, _) = stats.held();
        ids.sort();
        assert_eq!(ids, vec![2, 3]);
        stats.release([(2, batch), (3, other)]);
        assert!(stats.held().0.is_empty());
        // Releasing what is not held (a fenced-off duplicate) changes nothing.
        stats.release([(1, batch)]);
        assert!(stats.held().0.is_empty());
    }
}
