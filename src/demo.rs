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
use crate::store::{Store, StoreOptions};
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
    /// Where the demo's API listens (port 0: a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_addr: std::net::SocketAddr,
    /// The demo's admin API key (default: a fresh random one).
    #[arg(long, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve `/metrics` from each process on consecutive ports from this one (the
    /// api/generator/sweeper process first, then the workers); default: no metrics.
    #[arg(long)]
    pub metrics_port_base: Option<u16>,
    /// After the verdict, keep PostgreSQL, the API and the workers running until Ctrl-C,
    /// to try the API and the CLI against them.
    #[arg(long)]
    pub keep_running: bool,
}

/// The demo's API: where it listens and the admin key it was started with.
struct DemoApi {
    url: String,
    key: String,
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
    // Checked here first so that a bad flag is named as a flag.
    crate::intake::prepare(&request, IntakeDefaults::default(), None, None)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))?;
    let api_key = args
        .api_key
        .clone()
        .unwrap_or_else(|| crate::api::auth::new_secret().0);
    if !crate::api::auth::well_formed(&api_key) {
        bail!("--api-key must be 16 to 256 printable ASCII characters");
    }
    let api_addr = if args.api_addr.port() == 0 {
        let l = std::net::TcpListener::bind(args.api_addr)
            .context("finding a free port for the API")?;
        l.local_addr()?
    } else {
        args.api_addr
    };
    let api = DemoApi {
        url: format!("http://{api_addr}"),
        key: api_key,
    };

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
    let mut fleet = start_fleet(&args, &url, &log_dir, &api, api_addr)?;
    let result = drive(&args, &store, &request, &api, &mut fleet).await;
    let outcome = match &result {
        Ok(summary) => {
            if args.json {
                println!("{}", serde_json::to_string(summary)?);
            } else {
                print_summary(summary);
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
    if args.keep_running && result.is_ok() {
        eprintln!(
            "\nstill running — try the API and the CLI, then press Ctrl-C to stop:\n  \
             curl -s -H 'X-Api-Key: {key}' {url}/api/admin/health\n  \
             TALLY_API_URL={url} TALLY_API_KEY={key} tally order list",
            key = api.key,
            url = api.url
        );
        crate::shutdown::os_signal().await;
    }
    fleet.stop().await;
    store.close().await;
    if outcome == std::process::ExitCode::SUCCESS {
        let _ = std::fs::remove_dir_all(&fleet.log_dir);
    }
    if let Some(c) = cluster {
        tokio::task::spawn_blocking(move || drop(c)).await?;
    }
    Ok(outcome)
}

fn start_fleet(
    args: &DemoArgs,
    url: &str,
    log_dir: &std::path::Path,
    api: &DemoApi,
    api_addr: std::net::SocketAddr,
) -> anyhow::Result<Fleet> {
    let exe = std::env::current_exe().context("locating the tally binary")?;
    let mut children = Vec::new();
    let metrics_addr = |i: u32| match args.metrics_port_base {
        Some(base) => format!("127.0.0.1:{}", u32::from(base) + i),
        None => "off".into(),
    };
    let spawn = |name: String, roles: &str, i: u32| -> anyhow::Result<(String, Child)> {
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
            .env("TALLY_API_ADDR", api_addr.to_string())
            .env("TALLY_METRICS_ADDR", metrics_addr(i))
            .env("TALLY_ADMIN_API_KEY", &api.key)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok((name, child))
    };
    children.push(spawn("api-sweeper".into(), "api,generator,sweeper", 0)?);
    for i in 0..args.workers {
        children.push(spawn(format!("worker-{i}"), "worker", i + 1)?);
    }
    if let Some(base) = args.metrics_port_base {
        say(
            args,
            &format!(
                "metrics: http://127.0.0.1:{base}/metrics … :{}/metrics",
                u32::from(base) + args.workers
            ),
        );
    }
    Ok(Fleet {
        children,
        log_dir: log_dir.to_owned(),
    })
}

/// Waits for the API to be ready, then submits the order through it.
async fn submit(api: &DemoApi, request: &OrderRequest) -> anyhow::Result<serde_json::Value> {
    let client = crate::http::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client.get(format!("{}/readyz", api.url)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the API at {} did not become ready within 60 s", api.url);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The bootstrap key is installed just after the API starts listening.
    loop {
        let resp = client
            .post(format!("{}/api/orders", api.url))
            .header("x-api-key", &api.key)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(request)?)
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await?).unwrap_or_default();
        if status.as_u16() == 401 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !status.is_success() {
            bail!("the API refused the demo order ({status}): {body}");
        }
        return Ok(body);
    }
}

async fn drive(
    args: &DemoArgs,
    store: &Store,
    request: &OrderRequest,
    api: &DemoApi,
    fleet: &mut Fleet,
) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    let created = submit(api, request).await?;
    let id: Uuid = created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("the API answered without an order id")?;
    say(
        args,
        &format!(
            "order {id}: {} units of simulate in {} tasks of ~{}, {} workers{}",
            created["quantity"],
            created["task_count"],
            created["chunk_size"],
            args.workers,
            if args.chaos { ", chaos on" } else { "" }
        ),
    );
    say(
        args,
        &format!(
            "API {url} — follow along:\n  curl -s -H 'X-Api-Key: {key}' {url}/api/orders/{id}/progress\n  \
             TALLY_API_URL={url} TALLY_API_KEY={key} tally order progress {id} --watch",
            url = api.url,
            key = api.key
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
