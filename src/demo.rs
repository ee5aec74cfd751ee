//! `tally demo`: one command that shows the engine working end to end.
//!
//! Starts a throwaway PostgreSQL (unless given a URL), several `tally serve --roles worker`
//! processes and one generator+sweeper process, submits an order, shows live progress,
//! optionally SIGKILLs a worker that holds tasks (`--chaos`), and ends with a summary and the
//! invariant verdict. Exits 0 only when the invariant holds.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::intake::{IntakeDefaults, OrderRequest};
use crate::pgtemp::{ClusterOptions, TempCluster};
use crate::store::{IntakeOutcome, Store, StoreOptions};
use crate::sweeper::{Sweeper, SweeperConfig};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Use this database instead of a throwaway cluster.
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Units to deliver.
    #[arg(long, default_value_t = 15_000)]
    pub quantity: u64,
    /// Units per task.
    #[arg(long, default_value_t = 400)]
    pub chunk_size: u64,
    /// Worker processes to start.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Probability that an attempt fails transiently (retried with backoff).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// SIGKILL a worker that holds tasks mid-run; its tasks must be recovered.
    #[arg(long)]
    pub chaos: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Median simulated delivery latency per task, milliseconds.
    #[arg(long, default_value_t = 250.0)]
    pub latency_ms: f64,
    /// Attempts per task before it is dead-lettered.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_sec: u64,
}

/// The demo's closing report.
#[derive(Debug, Serialize)]
pub struct DemoSummary {
    pub order_id: Uuid,
    pub status: String,
    pub expected: i64,
    pub delivered: i64,
    pub dead_lettered_units: i64,
    pub tasks: i64,
    pub tasks_dead_lettered: i64,
    pub attempts: i64,
    pub retries: i64,
    pub orphans_recovered: i64,
    pub workers: u32,
    pub chaos_killed_pid: Option<i32>,
    pub chaos_tasks_held: i64,
    pub duration_secs: f64,
    pub audit_violations: serde_json::Value,
    pub invariant_holds: bool,
    pub verdict: String,
}

struct Fleet {
    children: Vec<(String, Child)>,
    log_dir: PathBuf,
}

impl Fleet {
    async fn stop(&mut self) {
        for (_, c) in &self.children {
            if let Some(pid) = c.id() {
                // SAFETY: sending a signal to our own child process.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
        }
        for (_, c) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(15), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    if !(0.0..1.0).contains(&args.failure_rate) {
        bail!(
            "--failure-rate must be at least 0 and below 1, got {}",
            args.failure_rate
        );
    }
    let request = OrderRequest {
        kind: "simulate".into(),
        target: "demo-account".into(),
        quantity: args.quantity,
        chunk_size: Some(args.chunk_size),
        priority: 0,
        max_attempts: Some(args.max_attempts),
        ..Default::default()
    };
    let order = crate::intake::prepare(&request, IntakeDefaults::default(), None, None)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))?;

    let (cluster, url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            say(&args, "starting a throwaway PostgreSQL …");
            let cluster =
                tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
                    .await?
                    .context("starting a throwaway PostgreSQL (or pass --database-url)")?;
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let store = Store::connect(&StoreOptions::new(&url)).await?;
    store.migrate().await?;

    let log_dir = std::env::temp_dir().join(format!("tally-demo-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&log_dir)?;
    let mut fleet = start_fleet(&args, &url, &log_dir)?;
    let result = drive(&args, &store, &order, &mut fleet).await;
    fleet.stop().await;
    let outcome = match result {
        Ok(summary) => {
            if args.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_summary(&summary);
            }
            if summary.invariant_holds {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "demo failed: {e:#}\nprocess logs are in {}",
                fleet.log_dir.display()
            );
            std::process::ExitCode::FAILURE
        }
    };
    store.close().await;
    if outcome == std::process::ExitCode::SUCCESS {
        let _ = std::fs::remove_dir_all(&fleet.log_dir);
    }
    if let Some(c) = cluster {
        tokio::task::spawn_blocking(move || drop(c)).await?;
    }
    Ok(outcome)
}

fn start_fleet(args: &DemoArgs, url: &str, log_dir: &std::path::Path) -> anyhow::Result<Fleet> {
    let exe = std::env::current_exe().context("locating the tally binary")?;
    let mut children = Vec::new();
    let spawn = |name: String, roles: &str| -> anyhow::Result<(String, Child)> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        let child = Command::new(&exe)
            .args(["serve", "--roles", roles])
            .env("TALLY_DATABASE_URL", url)
            .env("TALLY_LEASE_TTL_SEC", "3")
            .env("TALLY_LEADER_TTL_SEC", "3")
            .env("TALLY_SWEEP_INTERVAL_MS", "500")
            .env("TALLY_AUDIT_INTERVAL_SEC", "2")
            .env("TALLY_POLL_INTERVAL_MS", "500")
            .env("TALLY_WORKER_CONCURRENCY", "4")
            .env("TALLY_WORKER_BATCH_SIZE", "4")
            .env("TALLY_DB_POOL_SIZE", "4")
            .env("TALLY_BACKOFF_BASE_SEC", "0.2")
            .env("TALLY_BACKOFF_MAX_SEC", "2")
            .env("TALLY_SHUTDOWN_GRACE_SEC", "5")
            .env("TALLY_SIMULATE_LATENCY_MS", args.latency_ms.to_string())
            .env(
                "TALLY_SIMULATE_TRANSIENT_FAILURE_RATE",
                args.failure_rate.to_string(),
            )
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok((name, child))
    };
    children.push(spawn("sweeper".into(), "generator,sweeper")?);
    for i in 0..args.workers {
        children.push(spawn(format!("worker-{i}"), "worker")?);
    }
    Ok(Fleet {
        children,
        log_dir: log_dir.to_owned(),
    })
}

async fn drive(
    args: &DemoArgs,
    store: &Store,
    order: &crate::store::NewOrder,
    fleet: &mut Fleet,
) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    let id = match store.create_order(order).await? {
        IntakeOutcome::Created(id) => id,
        other => bail!("unexpected intake outcome {other:?}"),
    };
    say(
        args,
        &format!(
            "order {id}: {} units of simulate in {} tasks of ~{}, {} workers{}",
            order.quantity,
            order.task_count,
            order.chunk_size,
            args.workers,
            if args.chaos { ", chaos on" } else { "" }
        ),
    );
    let tty = std::io::stderr().is_terminal() && !args.json;
    let mut chaos: Option<(i32, i64)> = None;
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let deadline = started + Duration::from_secs(args.timeout_sec);
    let row = loop {
        let row = store.get_order(id).await?.context("the order vanished")?;
        let done = crate::domain::OrderStatus::parse(&row.status).is_some_and(|s| s.is_final())
            || row.needs_attention;
        if args.chaos && chaos.is_none() && row.delivered * 4 >= row.quantity && !done {
            chaos = kill_a_busy_worker(store, fleet).await?;
            if let Some((pid, held)) = chaos {
                say(
                    args,
                    &format!("chaos: SIGKILL worker pid {pid} holding {held} tasks"),
                );
            }
        }
        if tty {
            eprint!("\r{}", progress_line(&row, started.elapsed()));
            let _ = std::io::stderr().flush();
        } else if last_line.elapsed() >= Duration::from_secs(1) || done {
            last_line = Instant::now();
            if !args.json {
                eprintln!("{}", progress_line(&row, started.elapsed()));
            }
        }
        if done {
            break row;
        }
        if Instant::now() > deadline {
            bail!(
                "the order did not finish within {} s (status {})",
                args.timeout_sec,
                row.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if tty {
        eprintln!();
    }
    let duration = started.elapsed();

    // The verdict comes from the sweeper's own auditor, run once more now.
    let auditor = Sweeper::new(
        store.clone(),
        SweeperConfig::default(),
        "demo".into(),
        Default::default(),
    );
    let audit = auditor.audit_orders(&[id]).await?;
    let counts = store.order_task_counts(id).await?;
    let reasons = store.order_transition_counts(id).await?;
    let get = |v: &[(String, i64)], k: &str| v.iter().find(|(s, _)| s == k).map_or(0, |(_, n)| *n);
    let tasks: i64 = counts.iter().map(|(_, n)| n).sum();
    let violations = audit
        .violations
        .first()
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| serde_json::json!([]));
    let conserved =
        row.delivered + row.failed_permanent_units + row.cancelled_units == row.quantity;
    let holds = conserved && audit.violations.is_empty() && audit.orders_checked == 1;
    let verdict = if row.failed_permanent_units == 0 {
        format!(
            "delivered {} {} expected {}",
            row.delivered,
            if row.delivered == row.quantity {
                "="
            } else {
                "≠"
            },
            row.quantity
        )
    } else {
        format!(
            "delivered {} + dead-lettered {} {} expected {}",
            row.delivered,
            row.failed_permanent_units,
            if conserved { "=" } else { "≠" },
            row.quantity
        )
    };
    Ok(DemoSummary {
        order_id: id,
        status: row.status.clone(),
        expected: row.quantity,
        delivered: row.delivered,
        dead_lettered_units: row.failed_permanent_units,
        tasks,
        tasks_dead_lettered: get(&counts, "FAILED_PERMANENT"),
        attempts: get(&reasons, "claimed"),
        retries: get(&reasons, "retry_scheduled") + get(&reasons, "partial_delivery"),
        orphans_recovered: get(&reasons, "orphan_recovered"),
        workers: args.workers,
        chaos_killed_pid: chaos.map(|c| c.0),
        chaos_tasks_held: chaos.map_or(0, |c| c.1),
        duration_secs: duration.as_secs_f64(),
        audit_violations: violations,
        invariant_holds: holds,
        verdict,
    })
}

/// SIGKILLs the worker child holding the most EXECUTING tasks. Returns (pid, tasks held).
async fn kill_a_busy_worker(
    store: &Store,
    fleet: &mut Fleet,
) -> anyhow::Result<Option<(i32, i64)>> {
    let busy = store.executing_by_pid().await?;
    for (pid, held) in busy {
        if let Some((_, child)) = fleet
            .children
            .iter_mut()
            .find(|(name, c)| name.starts_with("worker") && c.id() == Some(pid as u32))
        {
            child.start_kill()?; // SIGKILL on Unix
            let _ = child.wait().await;
            return Ok(Some((pid, held)));
        }
    }
    Ok(None)
}

fn progress_line(row: &crate::store::OrderRow, elapsed: Duration) -> String {
    let width = 30usize;
    let filled = ((row.delivered as f64 / row.quantity as f64) * width as f64) as usize;
    format!(
        "[{}{}] {:>10}/{} units  {:<10}  {:>5.1}s",
        "#".repeat(filled.min(width)),
        ".".repeat(width - filled.min(width)),
        row.delivered,
        row.quantity,
        row.status,
        elapsed.as_secs_f64()
    )
}

fn say(args: &DemoArgs, msg: &str) {
    if !args.json {
        eprintln!("{msg}");
    }
}

fn print_summary(s: &DemoSummary) {
    println!("order             {}", s.order_id);
    println!("status            {}", s.status);
    println!(
        "tasks             {} ({} dead-lettered)",
        s.tasks, s.tasks_dead_lettered
    );
    println!("attempts          {}", s.attempts);
    println!("retries           {}", s.retries);
    println!("orphans recovered {}", s.orphans_recovered);
    if let Some(pid) = s.chaos_killed_pid {
        println!(
            "chaos             SIGKILLed worker pid {pid} holding {} tasks",
            s.chaos_tasks_held
        );
    }
    println!("duration          {:.2} s", s.duration_secs);
    println!(
        "invariant         {} — {}",
        s.verdict,
        if s.invariant_holds {
            "holds"
        } else {
            "VIOLATED"
        }
    );
}
