//! `tally bench`: figures, not a timed test. Prints one JSON object:
//!
//! - `throughput`: no-op handler, full claim → complete cycle, W in-process workers, on a
//!   queue prefilled with N tasks; tasks/s from the first claim until every order is COMPLETED.
//! - `pickup`: with the fleet idle, single-unit orders submitted at random gaps; latency from
//!   the submit call to the handler's start (intake fans a one-task order out itself, as the
//!   API does by default, so this is the intake statement, one NOTIFY hop and one claim).
//! - `fanout`: time for the generator to fan out a 1,000,000-unit order (2,500 tasks), and a
//!   10,000,000-unit one.
//!
//! Runs on a throwaway *durable* cluster (fsync on) unless `--database-url` is given.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::generator::{Generator, GeneratorConfig};
use crate::handler::{BoxFuture, Handler, HandlerError, Handlers, TaskInput};
use crate::intake::{IntakeDefaults, OrderRequest};
use crate::pgtemp::{ClusterOptions, TempCluster};
use crate::shutdown::{self, Shutdown};
use crate::store::{Store, StoreOptions};
use crate::worker::{Worker, WorkerConfig};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Use this database (it must be empty or a Tally database you can spare).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Tasks in each throughput run.
    #[arg(long, default_value_t = 200_000)]
    pub tasks: u64,
    /// In-process worker counts to measure, comma-separated (each worker has its own claim
    /// loop and completer, like a pod).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<u32>,
    /// Queue shapes to measure: `many` (orders of 100 tasks) and/or `single` (one order
    /// holding every task: the hot-row case).
    #[arg(long, value_delimiter = ',', default_value = "many,single")]
    pub shapes: Vec<String>,
    /// Repetitions of each throughput cell; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Claim batch size per worker.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: u32,
    /// Concurrency per worker.
    #[arg(long, default_value_t = 2000)]
    pub concurrency: u32,
    /// Pickup-latency samples.
    #[arg(long, default_value_t = 50)]
    pub pickup_samples: u32,
}

/// Answers at once, and tells the bench when it started.
struct Probe(mpsc::UnboundedSender<(Uuid, Instant)>);

impl Handler for Probe {
    fn deliver<'a>(&'a self, task: &'a TaskInput) -> BoxFuture<'a, Result<u32, HandlerError>> {
        let _ = self.0.send((task.order_id, Instant::now()));
        Box::pin(async move { Ok(task.quantity) })
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let (cluster, url) = match &args.database_url {
        Some(u) => (None, u.clone()),
        None => {
            let c = tokio::task::spawn_blocking(|| {
                TempCluster::start(ClusterOptions {
                    durable: true,
                    extra_settings: vec![
                        ("shared_buffers".into(), "1GB".into()),
                        ("max_wal_size".into(), "8GB".into()),
                        ("checkpoint_timeout".into(), "15min".into()),
                    ],
                    ..Default::default()
                })
            })
            .await?
            .context("starting a throwaway PostgreSQL")?;
            let u = c.url("postgres");
            (Some(c), u)
        }
    };
    let store = Store::connect(&StoreOptions {
        pool_size_max: args.workers.iter().max().copied().unwrap_or(1) * 2 + 4,
        ..StoreOptions::new(&url)
    })
    .await?;
    store.migrate().await?;
    let gen_cfg = GeneratorConfig {
        orders_per_pass_max: 1000,
        tasks_per_pass_max: crate::store::GENERATE_TASKS_BUDGET,
        poll_interval: Duration::from_millis(1000),
        listen: true,
    };
    let generator = Generator::new(store.clone(), gen_cfg.clone(), "bench".into());

    if args.database_url.is_some() {
        let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(store.pool())
            .await?;
        anyhow::ensure!(
            existing == 0,
            "--database-url: the bench empties its tables between runs, so it needs a database with no orders (found {existing})"
        );
    }

    // Throughput: each shape x worker count on a freshly prefilled queue.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handlers = Handlers::new().with("noop", Arc::new(Probe(tx)));
    let worker_cfg = WorkerConfig {
        batch_size_max: args.batch_size,
        concurrency_max: args.concurrency,
        poll_interval: Duration::from_millis(1000),
        lease_ttl: Duration::from_secs(60),
        ..WorkerConfig::default()
    };
    let mut runs = Vec::new();
    for shape in &args.shapes {
        let (shape, per_order) = match shape.as_str() {
            "many" => ("many_orders", 100u64),
            "single" => ("single_order", args.tasks),
            other => anyhow::bail!("--shapes: unknown shape {other:?} (many, single)"),
        };
        for &workers in &args.workers {
            let mut cell = Vec::new();
            for _ in 0..args.reps.max(1) {
                sqlx::query(
                    "TRUNCATE order_task_transitions, order_tasks, order_callbacks, orders, idempotency_ledger",
                )
                .execute(store.pool())
                .await?;
                let mut left = args.tasks;
                while left > 0 {
                    let q = left.min(per_order);
                    submit(&store, "noop", q, 1).await?;
                    left -= q;
                }
                while generator.run_once().await?.orders > 0 {}
                sqlx::query("VACUUM ANALYZE order_tasks")
                    .execute(store.pool())
                    .await?;
                sqlx::query("CHECKPOINT").execute(store.pool()).await.ok();
                let (trigger, stop) = shutdown::channel();
                let started = Instant::now();
                let fleet = start_workers(&store, &worker_cfg, &handlers, workers, &stop);
                loop {
                    // Stops at the first open order, and not too often: a count of every
                    // order each 20 ms took about a tenth of the database's time at
                    // 1,000,000 tasks (10,000 orders).
                    let open: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM orders WHERE status IN ('PENDING', 'PROCESSING'))",
                    )
                    .fetch_one(store.pool())
                    .await?;
                    if !open {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let secs = started.elapsed().as_secs_f64();
                trigger.fire();
                for w in fleet {
                    let _ = w.await;
                }
                while rx.try_recv().is_ok() {}
                let per_sec = args.tasks as f64 / secs;
                eprintln!("{shape}, {workers} workers: {per_sec:.0} tasks/s");
                cell.push(per_sec);
            }
            cell.sort_by(f64::total_cmp);
            runs.push(json!({
                "shape": shape, "orders": args.tasks.div_ceil(per_order), "workers": workers,
                "tasks_per_sec_median": round(cell[cell.len() / 2]),
                "tasks_per_sec_runs": cell.iter().map(|v| round(*v)).collect::<Vec<_>>(),
            }));
        }
    }
    sqlx::query(
        "TRUNCATE order_task_transitions, order_tasks, order_callbacks, orders, idempotency_ledger",
    )
    .execute(store.pool())
    .await?;
    let (trigger, stop) = shutdown::channel();
    let fleet = start_workers(&store, &worker_cfg, &handlers, 1, &stop);

    // Pickup latency: the fleet is idle; submit single-unit orders at random gaps.
    let gen_task =
        tokio::spawn(Generator::new(store.clone(), gen_cfg, "bench".into()).run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Vec::with_capacity(args.pickup_samples as usize);
    for _ in 0..args.pickup_samples {
        tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..500))).await;
        let t0 = Instant::now();
        let id = submit(&store, "noop", 1, 1).await?;
        let started_at = loop {
            let (order, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .context("a pickup sample was not picked up within 10 s")?
                .context("probe channel closed")?;
            if order == id {
                break at;
            }
        };
        samples.push(started_at.duration_since(t0).as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    trigger.fire();
    for w in fleet {
        let _ = w.await;
    }
    let _ = gen_task.await;

    // Fan-out: generation time of one big order each (no worker claims kind "fanout").
    let mut fanout = serde_json::Map::new();
    for quantity in [1_000_000u64, 10_000_000] {
        submit(&store, "fanout", quantity, 400).await?;
        let t = Instant::now();
        let r = generator.run_once().await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        fanout.insert(
            format!("units_{quantity}"),
            json!({"tasks": r.tasks, "ms": round(ms)}),
        );
    }

    let server_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(store.pool())
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(store.pool())
        .await?;
    let out = json!({
        "postgres": {"version": server_version, "fsync": fsync},
        "throughput": {
            "tasks": args.tasks, "batch_size": args.batch_size,
            "concurrency": args.concurrency, "runs": runs,
        },
        "pickup_ms": {
            "samples": samples.len(),
            "p50": round(percentile(&samples, 0.50)),
            "p99": round(percentile(&samples, 0.99)),
            "max": round(samples.last().copied().unwrap_or(0.0)),
        },
        "fanout": fanout,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    store.close().await;
    if let Some(c) = cluster {
        tokio::task::spawn_blocking(move || drop(c)).await?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn start_workers(
    store: &Store,
    cfg: &WorkerConfig,
    handlers: &Handlers,
    n: u32,
    stop: &Shutdown,
) -> Vec<tokio::task::JoinHandle<crate::worker::WorkerReport>> {
    (0..n)
        .map(|_| {
            let w = Worker::new(
                store.clone(),
                cfg.clone(),
                handlers.clone(),
                Uuid::new_v4(),
                Default::default(),
            );
            tokio::spawn(w.run(stop.clone()))
        })
        .collect()
}

async fn submit(store: &Store, kind: &str, quantity: u64, chunk: u64) -> anyhow::Result<Uuid> {
    let req = OrderRequest {
        kind: kind.into(),
        target: "bench".into(),
        quantity,
        chunk_size: Some(chunk),
        priority: 0,
        max_attempts: None,
        ..Default::default()
    };
    // As the API does by default: small orders (the pickup samples) are fanned out at intake.
    let defaults = IntakeDefaults {
        inline_fanout_max_tasks: crate::intake::INLINE_FANOUT_MAX_TASKS,
        ..IntakeDefaults::default()
    };
    match crate::intake::submit(store, &req, defaults, None).await? {
        crate::store::IntakeOutcome::Created(id) => Ok(id),
        other => anyhow::bail!("unexpected intake outcome {other:?}"),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
