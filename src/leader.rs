//! Leader election for the sweeper.
//!
//! The default backend is a Postgres lease row (`leader_lease`): acquire it when it is free
//! or expired, renew it while held, and every change of holder increments its `term`.
//!
//! Conservative step-down: a candidate believes it leads only until
//! `send_time + ttl − margin`, measured on its own monotonic clock from *before* it sent the
//! renewal. The database granted the lease at some instant after that send, so the lease
//! cannot expire (and pass to someone else) before this local deadline. A leader whose
//! renewals fail therefore stops acting before anyone else can start.
//!
//! Leadership is an optimisation, never a correctness requirement: every sweeper write is
//! conditional, so two leaders at once (a paused process waking up) change nothing twice.

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::handler::BoxFuture;
use crate::store::{Store, StoreError};

/// A leadership backend. Implementations must grant at most one live holder per term.
pub trait Elector: Send + Sync {
    /// Acquires or renews; `Ok(Some(term))` when this candidate holds the lease.
    fn acquire_or_renew(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>>;
    /// Gives the lease up (best effort).
    fn release(&self) -> BoxFuture<'_, ()>;
    /// The lease's time to live.
    fn ttl(&self) -> Duration;
}

/// The Postgres lease backend.
pub struct PgElector {
    store: Store,
    name: String,
    holder: Uuid,
    ttl: Duration,
}

impl PgElector {
    pub fn new(store: Store, name: impl Into<String>, holder: Uuid, ttl: Duration) -> Self {
        Self {
            store,
            name: name.into(),
            holder,
            ttl,
        }
    }
}

impl Elector for PgElector {
    fn acquire_or_renew(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .store
                .lease_acquire(&self.name, self.holder, self.ttl)
                .await?
                .map(|g| g.term))
        })
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.store.lease_release(&self.name, self.holder).await {
                tracing::warn!(error = %e, "releasing the leader lease failed; it will expire");
            }
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Tracks whether this candidate may act as leader right now.
pub struct Leadership {
    elector: Box<dyn Elector>,
    /// (term, local deadline) while leading.
    held: Option<(i64, Instant)>,
}

impl Leadership {
    pub fn new(elector: Box<dyn Elector>) -> Self {
        Self {
            elector,
            held: None,
        }
    }

    /// Tries to acquire or renew, and returns the term if this candidate leads now.
    pub async fn tick(&mut self) -> Option<i64> {
        let sent = Instant::now();
        let ttl = self.elector.ttl();
        match self.elector.acquire_or_renew().await {
            Ok(Some(term)) => {
                if self.held.map(|h| h.0) != Some(term) {
                    tracing::info!(term, "became leader");
                }
                self.held = Some((term, sent + ttl.mul_f64(0.8)));
            }
            Ok(None) => {
                if let Some((term, _)) = self.held.take() {
                    tracing::warn!(term, "lost leadership");
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader lease renewal failed"),
        }
        self.current()
    }

    /// The term, if the local deadline has not passed.
    pub fn current(&mut self) -> Option<i64> {
        match self.held {
            Some((term, deadline)) if Instant::now() < deadline => Some(term),
            Some((term, _)) => {
                tracing::warn!(term, "stepping down: lease could not be renewed in time");
                self.held = None;
                None
            }
            None => None,
        }
    }

    pub async fn release(&mut self) {
        if self.held.take().is_some() {
            self.elector.release().await;
        }
    }
}
