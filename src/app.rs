//! Composition root: registers the process, keeps its heartbeat, and runs the enabled roles
//! until shutdown.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::config::ElectionBackend;
use crate::config::{Role, ServeSettings};
use crate::generator::Generator;
use crate::handler::Handlers;
use crate::kinds::Catalog;
use crate::leader::kubernetes::KubeElector;
use crate::leader::{Elector, Leadership, PgElector, Recorded};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{Store, WorkerRegistration};
use crate::sweeper::Sweeper;
use crate::worker::Worker;

/// Name of the sweeper's leader lease.
pub const SWEEPER_LEASE: &str = "sweeper";
/// Where a sweeper leading through the Kubernetes backend records itself (see
/// `leader::Recorded`); `tally health` reads both names.
pub const SWEEPER_LEASE_RECORD: &str = "sweeper@kubernetes";

/// Runs the roles in `settings` until `shutdown` fires; returns once they have drained.
pub async fn serve(settings: ServeSettings, shutdown: Shutdown) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&settings.store)?;
    // Built-in handlers are chosen per stored kind (see `kinds::Catalog`).
    run_roles(store, settings, Handlers::new(), Uuid::new_v4(), shutdown).await
}

/// Like [`serve`], with the store, fixed handlers (which take precedence over stored kinds of
/// the same name) and process id given (tests use this).
pub async fn run_roles(
    store: Store,
    settings: ServeSettings,
    handlers: Handlers,
    process_id: Uuid,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    // /metrics on its own port, from the start.
    let metrics_server = match settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("TALLY_METRICS_ADDR {addr}: cannot listen: {e}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let (metrics, store, shutdown) =
                (stats.metrics.clone(), store.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, metrics, store, shutdown).await {
                    tracing::error!(error = %e, "the metrics endpoint stopped");
                }
            }))
        }
        None => None,
    };
    // The API listens first: /livez answers at once and /readyz says "not ready" until the
    // migrations are in. A port that cannot be bound is a start-up error.
    let api = if settings.roles.contains(&Role::Api) {
        let addr = settings.api.addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("TALLY_API_ADDR {addr}: cannot listen: {e}"))?;
        let (store, config, shutdown) = (store.clone(), settings.api.clone(), shutdown.clone());
        let metrics = stats.metrics.clone();
        Some(tokio::spawn(async move {
            if let Err(e) =
                crate::api::serve_with_metrics(listener, store, config, metrics, shutdown).await
            {
                tracing::error!(error = %e, "the API stopped");
            }
        }))
    } else {
        None
    };
    if !wait_for_schema(&store, &shutdown).await {
        if let Some(api) = api {
            let _ = api.await;
        }
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        return Ok(());
    }
    setup_kinds(&store, &settings).await;
    // Before registering: a backend that cannot start is a start-up error.
    let mut elector = if settings.roles.contains(&Role::Sweeper) {
        Some(elector(&store, &settings, process_id).await?)
    } else {
        None
    };
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
        concurrency: if settings.roles.contains(&Role::Worker) {
            settings.worker.concurrency_max as i32
        } else {
            0
        },
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

    let catalog = Arc::new(Catalog::new(
        handlers,
        settings.worker.backoff,
        settings.simulate.clone(),
        true,
    ));
    let mut roles = Vec::new();
    for role in &settings.roles {
        let shutdown = shutdown.clone();
        roles.push(match role {
            // Started above, before the schema wait.
            Role::Api => continue,
            Role::Generator => {
                let g = Generator::new(store.clone(), settings.generator.clone(), actor.clone());
                tokio::spawn(g.run(shutdown))
            }
            Role::Worker => {
                let w = Worker::with_catalog(
                    store.clone(),
                    settings.worker.clone(),
                    catalog.clone(),
                    process_id,
                    stats.clone(),
                );
                let callbacks = tokio::spawn(crate::callbacks::run(
                    store.clone(),
                    settings.callbacks.clone(),
                    stats.metrics.clone(),
                    shutdown.clone(),
                ));
                tokio::spawn(async move {
                    w.run(shutdown).await;
                    let _ = callbacks.await;
                })
            }
            Role::Sweeper => {
                let s = Sweeper::new(
                    store.clone(),
                    settings.sweeper.clone(),
                    actor.clone(),
                    stats.clone(),
                );
                let elector = elector.take().expect("one sweeper role");
                tokio::spawn(s.run(Leadership::new(elector), shutdown))
            }
        });
    }
    for r in roles {
        if let Err(e) = r.await {
            tracing::error!(error = %e, "a role panicked");
        }
    }
    if let Some(api) = api {
        let _ = api.await;
    }
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    hb_stop_trigger.fire();
    let _ = heartbeat.await;
    if let Err(e) = store.deregister_worker(process_id, stats.counters()).await {
        tracing::warn!(error = %e, "deregistering failed; the sweeper will reap this process");
    }
    tracing::info!(process.id = %process_id, "tally stopped");
    Ok(())
}

/// The sweeper's leadership backend (`TALLY_LEADER_ELECTION`).
async fn elector(
    store: &Store,
    settings: &ServeSettings,
    process_id: Uuid,
) -> anyhow::Result<Box<dyn Elector>> {
    Ok(match &settings.election {
        ElectionBackend::Postgres => Box::new(PgElector::new(
            store.clone(),
            SWEEPER_LEASE,
            process_id,
            settings.leader_ttl,
        )),
        ElectionBackend::Kubernetes { lease, namespace } => {
            // Unique per process: the pod name says where, the process id which run.
            let identity = format!("{}_{process_id}", hostname());
            let kube =
                KubeElector::connect(lease, namespace.as_deref(), identity, settings.leader_ttl)
                    .await?;
            Box::new(Recorded::new(
                Box::new(kube),
                store.clone(),
                SWEEPER_LEASE_RECORD.to_owned(),
                process_id,
            ))
        }
    })
}

/// Applies `TALLY_KINDS_FILE` and `TALLY_SIMULATE_KIND`. Idempotent, so every replica does
/// it at start; a failure is logged and the stored kinds stay as they were.
async fn setup_kinds(store: &Store, settings: &ServeSettings) {
    for kind in &settings.kinds {
        match store.put_kind(kind).await {
            Ok(_) => {
                tracing::info!(kind = %kind.name, handler = %kind.handler, "kind loaded from TALLY_KINDS_FILE")
            }
            Err(e) => {
                tracing::error!(kind = %kind.name, error = %e, "loading a kind from TALLY_KINDS_FILE failed")
            }
        }
    }
    if !settings.simulate_kind {
        match store.delete_kind("simulate").await {
            Ok(crate::store::DeleteKind::InUse(n)) => tracing::warn!(
                orders = n,
                "TALLY_SIMULATE_KIND=false: the simulate kind still has unfinished orders; kept"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "removing the simulate kind failed"),
        }
    }
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
        let (ids, tokens) = stats.held();
        match store
            .heartbeat(reg.id, lease, stats.counters(), &ids, &tokens)
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
