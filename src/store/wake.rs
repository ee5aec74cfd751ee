//! Wake-ups after the commit, never inside it.
//!
//! A commit that issued NOTIFY holds one cluster-wide lock from pre-commit until its commit
//! record is flushed, so concurrent commits that NOTIFY lose group commit and run one at a
//! time (DESIGN.md, "NOTIFY is a hint"). So no hot statement (intake, claim, completion,
//! generation) calls `pg_notify`. Instead, once its commit is back, the caller says "tasks
//! may be claimable" here, and:
//!
//! - workers in this process hear it at once, through a watch channel (no database hop);
//! - one background task per process sends `pg_notify` in a statement of its own, at most
//!   once per [`WAKE_WINDOW`]: a burst of a thousand intake commits costs one NOTIFY, not a
//!   thousand, and none of them waits on the notify lock.
//!
//! Correctness never depends on any of this: workers and generators poll.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::{ORDERS_CHANNEL, Store, TASKS_CHANNEL};

/// Shortest gap between two NOTIFYs of one channel from one process.
pub const WAKE_WINDOW: Duration = Duration::from_millis(2);

/// One channel's post-commit wake-ups (see the module docs).
#[derive(Debug)]
struct Channel {
    name: &'static str,
    /// Bumped on every wake: in-process listeners see it at once.
    local: watch::Sender<u64>,
    /// Set when a NOTIFY is owed; the sender task clears it.
    owed: Notify,
    /// The sender task, started on first use (inside the runtime that uses the store).
    started: OnceLock<()>,
}

impl Channel {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            local: watch::channel(0).0,
            owed: Notify::new(),
            started: OnceLock::new(),
        }
    }
}

/// The wake-up channels of one store (shared by its clones).
#[derive(Debug, Clone)]
pub(crate) struct Wakeups {
    tasks: Arc<Channel>,
    orders: Arc<Channel>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Self {
            tasks: Arc::new(Channel::new(TASKS_CHANNEL)),
            orders: Arc::new(Channel::new(ORDERS_CHANNEL)),
        }
    }
}

impl Store {
    /// Tasks may be claimable: wakes this process's workers now and, within
    /// [`WAKE_WINDOW`], every listening worker elsewhere. Call it after the commit.
    pub fn wake_tasks(&self) {
        self.wake(&self.wakeups.tasks);
    }

    /// Orders wait for fan-out: wakes generators, as [`Store::wake_tasks`] does workers.
    pub fn wake_orders(&self) {
        self.wake(&self.wakeups.orders);
    }

    /// Sees every [`Store::wake_tasks`] of this process (and of clones of this store).
    pub fn local_task_wakeups(&self) -> watch::Receiver<u64> {
        self.wakeups.tasks.local.subscribe()
    }

    /// Sees every [`Store::wake_orders`] of this process.
    pub fn local_order_wakeups(&self) -> watch::Receiver<u64> {
        self.wakeups.orders.local.subscribe()
    }

    fn wake(&self, ch: &Arc<Channel>) {
        ch.local.send_modify(|n| *n = n.wrapping_add(1));
        ch.owed.notify_one();
        if ch.started.get().is_none() && tokio::runtime::Handle::try_current().is_ok() {
            ch.started.get_or_init(|| {
                tokio::spawn(send_notifies(self.clone(), ch.clone()));
            });
        }
    }
}

/// Sends one NOTIFY per window while wake-ups keep coming. `Notify` keeps at most one
/// permit, so every wake-up that arrives while a NOTIFY is sent or the window runs is
/// folded into the next one. Ends when the pool is closed.
async fn send_notifies(store: Store, ch: Arc<Channel>) {
    loop {
        ch.owed.notified().await;
        if store.pool.is_closed() {
            return;
        }
        let sent = store
            .call("sending a wake-up", async {
                sqlx::query("SELECT pg_notify($1, '')")
                    .bind(ch.name)
                    .execute(&store.pool)
                    .await
            })
            .await;
        if let Err(e) = sent {
            // Only a hint: listeners poll anyway.
            tracing::debug!(error = %e, channel = ch.name, "wake-up NOTIFY failed");
        }
        tokio::time::sleep(WAKE_WINDOW).await;
    }
}
