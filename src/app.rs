//! Composition root: registers the process, keeps its heartbeat, and runs the enabled roles
//! until shutdown.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::config::{Role, ServeSettings};
use crate::generator::Generator;
use crate::handler::{Handlers, Simulate};
use crate::leader::{Leadership, PgElector};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{Store, WorkerRegistration};
use crate::sweeper::Sweeper;
use crate::worker::Worker;

/// Name of the sweeper's leader lease.
pub const SWEEPER_LEASE: &str = "sweeper";

/// The handlers built into this binary.
pub fn builtin_handlers(settings: &ServeSettings) -> Handlers {
    Handlers::new().with(
        "simulate",
        Arc::new(Simulate::new(settings.simulate.clone())),
    )
}

/// Runs the roles in `settings` until `shutdown` fires; returns once they have drained.
pub async fn serve(settings: ServeSettings, shutdown: Shutdown) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&settings.store)?;
    let handlers = builtin_handlers(&settings);
    run_roles(store, settings, handlers, Uuid::new_v4(), shutdown).await
}

/// Like [`serve`], with the store, handlers and process id given (tests use this).
pub async fn run_roles(
    store: Store,
    settings: ServeSettings,
    handlers: Handlers,
    process_id: Uuid,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    if !wait_for_schema(&store, &shutdown).await {
        return Ok(());
    }
    let roles = settings
        .roles
        .iter()
        .map(|r| format!("{r:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    let reg = WorkerRegistration {
        id: process_id,
        hostname: hostname(),
        pid: std::process::id() as i32,
        roles,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let lease = settings.worker.lease_ttl;
    while let Err(e) = store.register_worker(&reg, lease).await {
        tracing::warn!(error = %e, "registering this process failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait() => return Ok(()),
        }
    }
    tracing::info!(process.id = %process_id, roles = %reg.roles, "tally started");

    let stats = Arc::new(Stats::default());
    let actor = process_id.to_string();
    // The heartbeat outlives the roles: it must keep leases alive while the worker drains.
    let (hb_stop_trigger, hb_stop) = crate::shutdown::channel();
    let heartbeat = tokio::spawn(heartbeat(
        store.clone(),
        reg.clone(),
        lease,
        stats.clone(),
        hb_stop,
    ));

    let mut roles = Vec::new();
    for role in &settings.roles {
        let shutdown = shutdown.clone();
        roles.push(match role {
            Role::Generator => {
                let g = Generator::new(store.clone(), settings.generator.clone(), actor.clone());
                tokio::spawn(g.run(shutdown))
            }
            Role::Worker => {
                let w = Worker::new(
                    store.clone(),
                    settings.worker.clone(),
                    handlers.clone(),
                    process_id,
                    stats.clone(),
                );
                tokio::spawn(async move {
                    w.run(shutdown).await;
                })
            }
            Role::Sweeper => {
                let s = Sweeper::new(
                    store.clone(),
                    settings.sweeper.clone(),
                    actor.clone(),
                    stats.clone(),
                );
                let elector = PgElector::new(
                    store.clone(),
                    SWEEPER_LEASE,
                    process_id,
                    settings.leader_ttl,
                );
                tokio::spawn(s.run(Leadership::new(Box::new(elector)), shutdown))
            }
        });
    }
    for r in roles {
        if let Err(e) = r.await {
            tracing::error!(error = %e, "a role panicked");
        }
    }
    hb_stop_trigger.fire();
    let _ = heartbeat.await;
    if let Err(e) = store.deregister_worker(process_id, stats.counters()).await {
        tracing::warn!(error = %e, "deregistering failed; the sweeper will reap this process");
    }
    tracing::info!(process.id = %process_id, "tally stopped");
    Ok(())
}

/// Waits until the migrations are applied (by `tally migrate` or the chart's hook) rather
/// than racing them. Returns false if shutdown came first.
async fn wait_for_schema(store: &Store, shutdown: &Shutdown) -> bool {
    let mut logged = false;
    loop {
        match store.migrations_current().await {
            Ok(true) => return true,
            Ok(false) if !logged => {
                tracing::info!("waiting for migrations (run `tally migrate`)");
                logged = true;
            }
            Err(e) if !logged => {
                tracing::warn!(error = %e, "waiting for the database");
                logged = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.wait() => return false,
        }
    }
}

/// Renews the process row and the leases of its in-flight tasks every third of the lease.
async fn heartbeat(
    store: Store,
    reg: WorkerRegistration,
    lease: Duration,
    stats: Arc<Stats>,
    stop: Shutdown,
) {
    let every = lease / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait() => return,
        }
        match store
            .heartbeat(reg.id, lease, stats.counters(), &stats.held())
            .await
        {
            Ok((true, _)) => {}
            Ok((false, _)) => {
                // Reaped while we could not reach the database: come back.
                tracing::warn!("process row missing or marked stopped; registering again");
                if let Err(e) = store.register_worker(&reg, lease).await {
                    tracing::warn!(error = %e, "re-registering failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
