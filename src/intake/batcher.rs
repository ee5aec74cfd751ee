//! The intake batcher: concurrent requests share one intake statement, and so one commit.
//!
//! ```text
//!  request ─┐                      ┌─ flush: one statement for up to `batch_max` orders ─┐
//!  request ─┼─► queue ─► collector ┤                                                     ├─► each
//!  request ─┘   (bounded)          └─ flush (at most `in_flight_max` at once) ───────────┘   its answer
//! ```
//!
//! - No timer: the collector takes everything queued the moment a flush slot is free. An
//!   idle server sends a lone request at once (no added latency); under load, requests
//!   queue behind the statements in flight and the next flush takes them all, so the
//!   commits per order fall as the load rises (group commit done by the client).
//! - Each request keeps its own answer and idempotency semantics: the statement resolves
//!   duplicates inside one batch and across batches (see `store::orders::INTAKE_BATCH`).
//! - A statement that fails for a reason other than the database being unavailable (a
//!   constraint the request checks missed, say) is retried item by item, so one bad request
//!   fails alone and the others are accepted.
//! - Flushes run in spawned tasks: a client that disconnects drops only its answer, never the
//!   statement half-way (DESIGN.md, "sqlx cancellation").
//! - A full queue answers at once (`Overloaded`) instead of growing without bound.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::{Accepted, IntakeItem, Store, StoreError};

/// Batcher settings.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most orders in one statement.
    pub batch_max: usize,
    /// Most intake statements running at once (each holds a pooled connection).
    pub in_flight_max: usize,
    /// Most requests waiting for a statement; past it, requests are refused (503).
    pub queue_max: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            batch_max: 500,
            in_flight_max: 2,
            queue_max: 20_000,
        }
    }
}

/// Why a request was not answered by the statement.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The statement failed; every request of its batch gets the same error.
    #[error(transparent)]
    Store(Arc<StoreError>),
    /// The queue is full.
    #[error("too many intake requests are waiting")]
    Overloaded,
    /// The batcher stopped (the process is shutting down).
    #[error("intake is shutting down")]
    Stopped,
}

struct Job {
    item: IntakeItem,
    reply: oneshot::Sender<Result<Accepted, BatchError>>,
}

/// A handle to the batcher (cheap to clone). The collector stops when every handle is gone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the collector. `known_kinds_only` as in `Store::create_orders`.
    pub fn start(store: Store, config: BatcherConfig, known_kinds_only: bool) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_max.max(1));
        tokio::spawn(collect(store, config, known_kinds_only, rx));
        Self { tx }
    }

    /// Queues one order and waits for its answer.
    pub async fn submit(&self, item: IntakeItem) -> Result<Accepted, BatchError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { item, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BatchError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => BatchError::Stopped,
        })?;
        answer.await.unwrap_or(Err(BatchError::Stopped))
    }
}

async fn collect(
    store: Store,
    config: BatcherConfig,
    known_kinds_only: bool,
    mut rx: mpsc::Receiver<Job>,
) {
    let slots = Arc::new(Semaphore::new(config.in_flight_max.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut jobs = Vec::with_capacity(64);
        jobs.push(first);
        while jobs.len() < config.batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            flush(&store, jobs, known_kinds_only).await;
            drop(slot);
        });
    }
}

/// Runs one batch and answers each of its requests.
async fn flush(store: &Store, jobs: Vec<Job>, known_kinds_only: bool) {
    let (items, replies): (Vec<IntakeItem>, Vec<_>) =
        jobs.into_iter().map(|j| (j.item, j.reply)).unzip();
    for (reply, answer) in replies
        .into_iter()
        .zip(accept(store, &items, known_kinds_only).await)
    {
        let _ = reply.send(answer);
    }
}

/// Accepts `items` in one statement and answers each, in order. When the statement fails
/// for a reason other than the database being out of reach, each item is tried alone, so
/// only the items that break it fail. Used by the batcher and by `POST /api/orders/batch`.
pub async fn accept(
    store: &Store,
    items: &[IntakeItem],
    known_kinds_only: bool,
) -> Vec<Result<Accepted, BatchError>> {
    match store.create_orders(items, known_kinds_only).await {
        Ok(accepted) => accepted.into_iter().map(Ok).collect(),
        Err(e) if items.len() > 1 && !unavailable(&e) => {
            tracing::warn!(error = %e, orders = items.len(), "an intake batch failed; trying its orders one by one");
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(
                    store
                        .create_orders(std::slice::from_ref(item), known_kinds_only)
                        .await
                        .map_err(|e| BatchError::Store(Arc::new(e)))
                        .and_then(|mut v| v.pop().ok_or(BatchError::Stopped)),
                );
            }
            out
        }
        Err(e) => {
            tracing::warn!(error = %e, orders = items.len(), "an intake batch failed");
            let e = Arc::new(e);
            items
                .iter()
                .map(|_| Err(BatchError::Store(e.clone())))
                .collect()
        }
    }
}

/// The database is out of reach or refused for a passing reason (not a problem with the
/// batch's content): the request can be sent again, so the API answers 503.
pub fn unavailable(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout { .. } => true,
        StoreError::Db {
            source: sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed,
            ..
        } => true,
        // 57014: cancelled (statement_timeout, pg_cancel_backend); 55P03: lock_timeout;
        // 53: out of connections, memory or disk.
        StoreError::Db {
            source: sqlx::Error::Database(db),
            ..
        } if db
            .code()
            .is_some_and(|c| matches!(&*c, "57014" | "55P03") || c.starts_with("53")) =>
        {
            true
        }
        _ => e.is_connection_lost(),
    }
}
