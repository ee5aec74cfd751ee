//! Leader election for the sweeper.
//!
//! The default backend is a Postgres lease row (`leader_lease`): acquire it when it is free
//! or expired, renew it while held, and every change of holder increments its `term`.
//! `TALLY_LEADER_ELECTION=kubernetes` uses a `coordination.k8s.io/v1` Lease instead
//! ([`kubernetes::KubeElector`]).
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
use crate::store::Store;

pub mod kubernetes;

/// The lease is held: its term, and the local instant *before* the request that granted
/// or last renewed it (the holder's deadline counts from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub term: i64,
    pub sent: Instant,
}

/// A leadership backend. Implementations must grant at most one live holder per term.
pub trait Elector: Send + Sync {
    /// Acquires or renews; `Ok(Some(grant))` when this candidate holds the lease. A backend
    /// may answer from its last renewal without a request, with that renewal's `sent`.
    fn acquire_or_renew(&self) -> BoxFuture<'_, anyhow::Result<Option<Grant>>>;
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
    fn acquire_or_renew(&self) -> BoxFuture<'_, anyhow::Result<Option<Grant>>> {
        Box::pin(async move {
            let sent = Instant::now();
            Ok(self
                .store
                .lease_acquire(&self.name, self.holder, self.ttl)
                .await?
                .map(|g| Grant { term: g.term, sent }))
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

/// Another backend's leadership, recorded in `leader_lease` under `{name}@kubernetes` so that
/// `tally health` and `/api/admin/health` see who leads whatever the backend. The record is
/// best effort and never consulted to decide leadership.
pub struct Recorded {
    inner: Box<dyn Elector>,
    store: Store,
    name: String,
    holder: Uuid,
    /// The grant last recorded: a backend answering from its last renewal is not written again.
    recorded: std::sync::Mutex<Option<Grant>>,
}

impl Recorded {
    pub fn new(inner: Box<dyn Elector>, store: Store, name: String, holder: Uuid) -> Self {
        Self {
            inner,
            store,
            name,
            holder,
            recorded: std::sync::Mutex::new(None),
        }
    }
}

impl Elector for Recorded {
    fn acquire_or_renew(&self) -> BoxFuture<'_, anyhow::Result<Option<Grant>>> {
        Box::pin(async move {
            let got = self.inner.acquire_or_renew().await?;
            let fresh = got.is_some() && *self.recorded.lock().unwrap() != got;
            if let (Some(g), true) = (got, fresh) {
                let ttl = self.inner.ttl();
                if let Err(e) = self
                    .store
                    .lease_record(&self.name, self.holder, g.term, ttl)
                    .await
                {
                    tracing::debug!(error = %e, "recording the leader failed");
                } else {
                    *self.recorded.lock().unwrap() = got;
                }
            }
            Ok(got)
        })
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.release().await;
            *self.recorded.lock().unwrap() = None;
            let _ = self.store.lease_release(&self.name, self.holder).await;
        })
    }

    fn ttl(&self) -> Duration {
        self.inner.ttl()
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
        let ttl = self.elector.ttl();
        match self.elector.acquire_or_renew().await {
            Ok(Some(Grant { term, sent })) => {
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
            Err(e) => tracing::warn!(error = format!("{e:#}"), "leader lease renewal failed"),
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
