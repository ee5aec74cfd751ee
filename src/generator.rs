//! The generator role: PENDING orders → tasks, set-based (see `store::orders::GENERATE`).
//! Any number of generators may run: SKIP LOCKED splits the orders between them and the
//! write re-checks `status = 'PENDING'`, so an order is never fanned out twice.

use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::shutdown::Shutdown;
use crate::store::{ORDERS_CHANNEL, Store, StoreError};

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Most orders fanned out by one statement.
    pub orders_per_pass_max: u32,
    /// Most tasks made by one statement (the oldest order is always taken, however big).
    pub tasks_per_pass_max: u64,
    /// Longest wait between passes when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Wake early on NOTIFY (off behind PgBouncer in transaction mode).
    pub listen: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            orders_per_pass_max: 50,
            tasks_per_pass_max: crate::store::GENERATE_TASKS_BUDGET,
            poll_interval: Duration::from_secs(1),
            listen: true,
        }
    }
}

/// What one pass generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenerateReport {
    pub orders: u64,
    pub tasks: u64,
}

pub struct Generator {
    store: Store,
    config: GeneratorConfig,
    actor: String,
}

impl Generator {
    pub fn new(store: Store, config: GeneratorConfig, actor: String) -> Self {
        Self {
            store,
            config,
            actor,
        }
    }

    /// One bounded pass.
    pub async fn run_once(&self) -> Result<GenerateReport, StoreError> {
        let span = tracing::info_span!(
            "orders.generate",
            orders = tracing::field::Empty,
            tasks = tracing::field::Empty
        );
        let (orders, tasks) = tracing::Instrument::instrument(
            self.store.generate_tasks_budgeted(
                self.config.orders_per_pass_max,
                self.config.tasks_per_pass_max,
                &self.actor,
            ),
            span.clone(),
        )
        .await?;
        span.record("orders", orders).record("tasks", tasks);
        if orders > 0 {
            tracing::info!(orders, tasks, "generated tasks");
        }
        Ok(GenerateReport { orders, tasks })
    }

    pub async fn run(self, shutdown: Shutdown) {
        let mut listener: Option<PgListener> = None;
        // Intake in this process wakes the generator without a database hop.
        let mut local = self.store.local_order_wakeups();
        while !shutdown.is_triggered() {
            // Drain: keep going while passes find work.
            match self.run_once().await {
                Ok(r) if r.orders > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "generation pass failed"),
            }
            if listener.is_none() && self.config.listen {
                listener = match PgListener::connect_with(self.store.pool()).await {
                    Ok(mut l) => l.listen(ORDERS_CHANNEL).await.ok().map(|_| l),
                    Err(_) => None,
                };
            }
            let wait = async {
                match listener.as_mut() {
                    Some(l) => {
                        match tokio::time::timeout(self.config.poll_interval, l.try_recv()).await {
                            Ok(Ok(Some(_))) | Err(_) => true,
                            Ok(_) => false,
                        }
                    }
                    None => {
                        tokio::time::sleep(self.config.poll_interval).await;
                        true
                    }
                }
            };
            tokio::select! {
                healthy = wait => if !healthy { listener = None; },
                _ = local.changed() => {}
                _ = shutdown.wait() => break,
            }
        }
    }
}
