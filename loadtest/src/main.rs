//! `loadtest`: runs a real local Tally cluster under load and faults, then proves from the
//! database and a recording webhook sink that nothing was lost or counted twice.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/loadtest run chaos-kill --duration-sec 60
//! ```
//! Writes `report.json` and `report.md` to `--out` and exits 1 when a must-be-zero figure is
//! not zero.

mod chart;
mod claims;
mod cluster;
mod proxy;
mod report;
mod sink;
mod small;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use cluster::{Cluster, Role};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
enum Cli {
    /// Run one scenario and write its report.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Single-unit actions and 15,000-unit orders at a fixed rate.
    Steady,
    /// One 10,000,000-unit order next to a stream of small ones.
    Giant,
    /// 1,000 orders submitted at once.
    Burst,
    /// SIGKILL a random worker every few seconds and restart it.
    ChaosKill,
    /// SIGSTOP a worker past its lease, then SIGCONT: the zombie must be fenced.
    ChaosStop,
    /// Stop PostgreSQL with -m immediate mid-run and start it again.
    DbRestart,
    /// SIGKILL the sweeper leader repeatedly.
    LeaderKill,
    /// A proxy between one worker and PostgreSQL blackholes its traffic (half-open
    /// connections) for 60 s (or half the duration, if shorter), then heals.
    NetCut,
    /// Steady for a long duration, sampling dead tuples, table sizes and pickup latency.
    Soak,
    /// Single-unit orders over HTTP at `--rate` from `--clients` requests in flight, with an
    /// optional pinned xmin (`--pin-xmin`), killed backends (`--kill-backends-per-sec`) and
    /// bulk intake (`--batch-intake`); per-window figures and the cost of one order.
    SmallOrders,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    pub scenario: Scenario,
    /// How long orders are submitted (and faults driven), seconds.
    #[arg(long, default_value = "30")]
    pub duration_sec: f64,
    /// Worker processes.
    #[arg(long, default_value = "3")]
    pub workers: usize,
    /// Orders per second for the steady stream.
    #[arg(long, default_value = "10")]
    pub rate: f64,
    /// Every this many seconds a fault is injected (chaos-kill, leader-kill).
    #[arg(long, default_value = "5")]
    pub fault_every_sec: f64,
    /// The sink's answer latency, milliseconds.
    #[arg(long, default_value = "20")]
    pub sink_latency_ms: u64,
    /// Use this PostgreSQL (a database you can throw away) instead of a throwaway cluster.
    #[arg(long)]
    pub database_url: Option<String>,
    /// The tally binary (default: next to this one).
    #[arg(long)]
    pub tally_bin: Option<PathBuf>,
    /// Where report.json, report.md and the processes' logs go.
    #[arg(long, default_value = "loadtest/out")]
    pub out: PathBuf,
    /// Longest wait for every order to finish after the load stops, seconds.
    #[arg(long, default_value = "180")]
    pub drain_timeout_sec: f64,
    /// small-orders: most requests in flight (keep-alive clients).
    #[arg(long, default_value = "64")]
    pub clients: usize,
    /// small-orders: hold a transaction with an xid open this many seconds (0: no pin).
    #[arg(long, default_value = "0")]
    pub pin_xmin: f64,
    /// small-orders: when the pin starts, seconds after the load does.
    #[arg(long, default_value = "10")]
    pub pin_at_sec: f64,
    /// small-orders: terminate this many of Tally's database connections a second.
    #[arg(long, default_value = "0")]
    pub kill_backends_per_sec: f64,
    /// small-orders: send each 5 ms of orders as one POST /api/orders/batch.
    #[arg(long)]
    pub batch_intake: bool,
    /// small-orders: the report's window, seconds.
    #[arg(long, default_value = "5")]
    pub window_sec: f64,
    /// A setting for the throwaway PostgreSQL, NAME=VALUE (repeatable), e.g.
    /// `--pg-setting autovacuum_naptime=5s`.
    #[arg(long)]
    pub pg_setting: Vec<String>,
}

/// One submitted order as the client saw it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub id: uuid::Uuid,
    pub quantity: i64,
    /// When the POST that created it started (a retried POST: the first one).
    pub submitted_at: Instant,
    /// How long that POST took, milliseconds.
    pub post_ms: f64,
}

/// A fault and when it happened (database clock for recovery times).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fault {
    pub what: String,
    pub at_sec: f64,
    #[serde(skip)]
    pub db_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Leader failover: seconds until another candidate led.
    pub failover_sec: Option<f64>,
    /// Tasks the victim held (EXECUTING) when the fault hit: their rescue times are the
    /// orphan recovery figures.
    #[serde(skip)]
    pub held: Vec<i64>,
}

/// A random worker among those holding tasks (faulting an idle one proves nothing),
/// waiting up to 5 s for one; any worker when none does.
async fn busy_worker(c: &Cluster, pool: &sqlx::PgPool) -> usize {
    let workers = c.indices(Role::Worker);
    for _ in 0..100 {
        let holding: Vec<i32> = sqlx::query_scalar(
            "SELECT DISTINCT w.pid FROM order_tasks t JOIN workers w ON w.id = t.claimed_by \
             WHERE t.status = 'EXECUTING' AND w.stopped_at IS NULL",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        let busy: Vec<usize> = workers
            .iter()
            .copied()
            .filter(|&i| c.procs[i].pid().is_some_and(|p| holding.contains(&p)))
            .collect();
        if !busy.is_empty() {
            return busy[fastrand::usize(..busy.len())];
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workers[fastrand::usize(..workers.len())]
}

/// The tasks process `pid` holds now.
async fn held_by(pool: &sqlx::PgPool, pid: Option<i32>) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT t.id FROM order_tasks t JOIN workers w ON w.id = t.claimed_by \
         WHERE w.pid = $1 AND w.stopped_at IS NULL AND t.status = 'EXECUTING'",
    )
    .bind(pid.unwrap_or(-1))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let Cli::Run(args) = Cli::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let bin = match &args.tally_bin {
        Some(b) => b.clone(),
        None => cluster::default_bin()?,
    };
    let out = args.out.join(format!("{:?}", args.scenario).to_lowercase());
    std::fs::create_dir_all(&out)?;
    let sink = sink::Sink::start(Duration::from_millis(args.sink_latency_ms)).await?;
    let kinds = out.join("kinds.json");
    std::fs::write(
        &kinds,
        serde_json::to_vec(&json!({"loadtest": {
            "handler": "webhook",
            "webhook": {"url": sink.url, "timeout_ms": 10000},
            "backoff_base_sec": 1, "max_attempts": 10,
        }}))?,
    )?;
    let env = vec![("TALLY_KINDS_FILE".to_owned(), kinds.display().to_string())];
    eprintln!("loadtest: {:?} for {} s", args.scenario, args.duration_sec);
    let pg_settings = args
        .pg_setting
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--pg-setting {kv:?}: expected NAME=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut c = Cluster::start(args.database_url.clone(), bin, &out, env, pg_settings).await?;
    let client = tally::http::client();
    c.spawn(Role::Api, None)?;
    c.wait_ready(&client).await?;
    for _ in 0..2 {
        c.spawn(Role::Control, None)?;
    }
    let proxy = if args.scenario == Scenario::NetCut {
        let upstream = c.url.split('@').nth(1).and_then(|h| h.split('/').next());
        let upstream = upstream.unwrap_or_default().to_owned();
        let p = proxy::Proxy::start(upstream.clone()).await?;
        let via = c.url.replace(&upstream, &format!("127.0.0.1:{}", p.port));
        c.spawn(Role::Worker, Some(via))?;
        Some(p)
    } else {
        None
    };
    for _ in proxy.iter().len()..args.workers {
        c.spawn(Role::Worker, None)?;
    }
    // The harness's own statements are not Tally's cost: they are not tracked.
    let harness = c
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .application_name("loadtest")
        .options([("pg_stat_statements.track", "none")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(harness)
        .await?;
    let small_orders = args.scenario == Scenario::SmallOrders;
    if small_orders {
        // Only where the server preloads it (the throwaway cluster does).
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await;
    }
    let before = small::counters(&pool).await?;
    let intake_errors = Arc::new(small::IntakeErrors::default());
    let started = Instant::now();
    let queue_samples = Arc::new(Mutex::new(Vec::<small::QueueSample>::new()));
    let queue_sampler = small_orders.then(|| {
        tokio::spawn(small::sample_queue(
            pool.clone(),
            started,
            Duration::from_secs_f64((args.window_sec / 2.0).max(0.5)),
            queue_samples.clone(),
        ))
    });
    let pin = (small_orders && args.pin_xmin > 0.0).then(|| {
        tokio::spawn(small::pin_xmin(
            c.url.clone(),
            started,
            Duration::from_secs_f64(args.pin_at_sec),
            Duration::from_secs_f64(args.pin_xmin),
        ))
    });
    let killer = (small_orders && args.kill_backends_per_sec > 0.0).then(|| {
        tokio::spawn(small::kill_backends(
            pool.clone(),
            args.kill_backends_per_sec,
            started + Duration::from_secs_f64(args.duration_sec),
        ))
    });
    let submitted = Arc::new(Mutex::new(Vec::<Submitted>::new()));
    let conn_max = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = {
        let (pool, conn_max) = (pool.clone(), conn_max.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(n) = sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'tally%'",
                )
                .fetch_one(&pool)
                .await
                {
                    conn_max.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let load = tokio::spawn(drive_load(
        args.clone(),
        client.clone(),
        c.api_url.clone(),
        c.api_key.clone(),
        submitted.clone(),
        intake_errors.clone(),
    ));
    let status_samples = Arc::new(Mutex::new(Vec::<f64>::new()));
    let status = tokio::spawn(watch_status(
        client.clone(),
        c.api_url.clone(),
        c.api_key.clone(),
        submitted.clone(),
        sink.clone(),
        status_samples.clone(),
    ));
    let table_samples = Arc::new(Mutex::new(Vec::<TableSample>::new()));
    let claim_samples = Arc::new(Mutex::new(Vec::<claims::ClaimSample>::new()));
    let worker_metrics = c
        .procs
        .iter()
        .filter_map(|p| p.metrics_url.clone())
        .collect();
    let soak = tokio::spawn(sample_tables(
        pool.clone(),
        client.clone(),
        worker_metrics,
        started,
        table_samples.clone(),
        claim_samples.clone(),
    ));
    let faults = drive_faults(&args, &mut c, &pool, started, proxy.as_ref()).await?;
    load.await??;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "loadtest: load done after {load_secs:.1} s; {} orders; waiting for them to finish",
        submitted.lock().unwrap().len()
    );
    let orders = submitted.lock().unwrap().clone();
    let drained = wait_finished(
        &pool,
        &orders,
        Duration::from_secs_f64(args.drain_timeout_sec),
    )
    .await;
    let total_secs = started.elapsed().as_secs_f64();
    let backends_killed = match killer {
        Some(k) => k.await.unwrap_or(0),
        None => 0,
    };
    let pinned = match pin {
        Some(p) => Some(p.await??),
        None => None,
    };
    // Every sweeper audit has run once more before the verdict (and, for the cost figures,
    // every backend has published its counters: idle ones do so within 10 s).
    tokio::time::sleep(Duration::from_secs(if small_orders { 11 } else { 2 })).await;
    let after = small::counters(&pool).await?;
    if let Some(q) = queue_sampler {
        q.abort();
    }
    let invariants = client
        .get(format!("{}/api/admin/invariants/all", c.api_url))
        .header("x-api-key", &c.api_key)
        .send()
        .await?
        .bytes()
        .await?;
    let invariants: serde_json::Value = serde_json::from_slice(&invariants)?;
    sampler.abort();
    status.abort();
    soak.abort();
    let tables = std::mem::take(&mut *table_samples.lock().unwrap());
    let claims = std::mem::take(&mut *claim_samples.lock().unwrap());
    let status_latencies = std::mem::take(&mut *status_samples.lock().unwrap());
    let r = report::build(report::Inputs {
        args: &args,
        pool: &pool,
        orders: &orders,
        calls: sink.snapshot(),
        started,
        faults,
        drained,
        load_secs,
        total_secs,
        invariants,
        connections_max: conn_max.load(std::sync::atomic::Ordering::Relaxed),
        status_latencies,
        tables,
        claims,
    })
    .await?;
    let mut r = r;
    if small_orders {
        let samples = std::mem::take(&mut *queue_samples.lock().unwrap());
        r.small = Some(small::report(
            &args,
            &orders,
            &sink.snapshot(),
            started,
            &samples,
            before,
            after,
            &intake_errors,
            backends_killed,
            pinned,
        ));
    }
    c.stop().await;
    pool.close().await;
    if let Some(pg) = c.pg.take() {
        let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
    }
    report::write(&r, &out)?;
    match chart::draw(&r, &out.join("report.png")) {
        Ok(true) => {}
        Ok(false) => eprintln!("loadtest: report.png has no labels (no DejaVu Sans font found)"),
        Err(e) => eprintln!("loadtest: drawing report.png failed: {e}"),
    }
    println!("{}", report::markdown(&r));
    eprintln!("loadtest: report in {}", out.display());
    Ok(r.passed)
}

/// Submits orders through the API for the scenario's duration.
async fn drive_load(
    args: RunArgs,
    client: reqwest::Client,
    api: String,
    key: String,
    submitted: Arc<Mutex<Vec<Submitted>>>,
    errors: Arc<small::IntakeErrors>,
) -> anyhow::Result<()> {
    let submit = |quantity: i64, chunk: Option<i64>| {
        let (client, api, key, submitted) =
            (client.clone(), api.clone(), key.clone(), submitted.clone());
        async move {
            let mut body = json!({"kind": "loadtest", "target": "acct-load", "quantity": quantity});
            if let Some(c) = chunk {
                body["chunk_size"] = json!(c);
            }
            let idem = uuid::Uuid::new_v4().to_string();
            let submitted_at = Instant::now();
            for attempt in 0..30 {
                let sent = client
                    .post(format!("{api}/api/orders"))
                    .header("x-api-key", &key)
                    .header("idempotency-key", &idem)
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&body)?)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().as_u16() == 201 => {
                        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
                        let id = v["id"].as_str().unwrap_or_default().parse()?;
                        submitted.lock().unwrap().push(Submitted {
                            id,
                            quantity,
                            submitted_at,
                            post_ms: submitted_at.elapsed().as_secs_f64() * 1000.0,
                        });
                        return anyhow::Ok(());
                    }
                    // The API answers 503 while PostgreSQL is down: retry with the same key.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1).min(10))).await
                    }
                }
            }
            anyhow::bail!("an order could not be submitted in 30 tries")
        }
    };
    let end = Instant::now() + Duration::from_secs_f64(args.duration_sec);
    match args.scenario {
        Scenario::SmallOrders => {
            small::drive(&args, client, api, key, submitted, errors).await?;
        }
        Scenario::Burst => {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..1000 {
                // Half single units (their pickup is measured), half up to 2,000 units.
                let q = if i % 2 == 0 {
                    1
                } else {
                    1 + (i * 37 % 2000) as i64
                };
                set.spawn(submit(q, None));
                if set.len() >= 64 {
                    set.join_next().await.unwrap()??;
                }
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
        _ => {
            if args.scenario == Scenario::Giant {
                submit(10_000_000, Some(400)).await?;
            }
            let every = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
            let mut tick = tokio::time::interval(every);
            let mut n = 0u64;
            let mut set = tokio::task::JoinSet::new();
            while Instant::now() < end {
                tick.tick().await;
                n += 1;
                // One order in ten is a 15,000-unit order (38 tasks); the rest single units.
                let q = if n.is_multiple_of(10) && args.scenario != Scenario::Giant {
                    15_000
                } else {
                    1
                };
                set.spawn(submit(q, None));
                while let Some(r) = set.try_join_next() {
                    r??;
                }
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
    }
    Ok(())
}

async fn db_now(pool: &sqlx::PgPool) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .ok()
}

/// Injects the scenario's faults until its duration has passed.
async fn drive_faults(
    args: &RunArgs,
    c: &mut Cluster,
    pool: &sqlx::PgPool,
    started: Instant,
    proxy: Option<&proxy::Proxy>,
) -> anyhow::Result<Vec<Fault>> {
    let end = started + Duration::from_secs_f64(args.duration_sec);
    let every = Duration::from_secs_f64(args.fault_every_sec);
    let mut faults = Vec::new();
    let at = || started.elapsed().as_secs_f64();
    match args.scenario {
        Scenario::ChaosKill => {
            tokio::time::sleep(every).await;
            while Instant::now() < end {
                let i = busy_worker(c, pool).await;
                let what = format!("SIGKILL worker {}", c.procs[i].name);
                let db_time = db_now(pool).await;
                let held = held_by(pool, c.procs[i].pid()).await;
                c.kill_and_replace(i).await?;
                faults.push(Fault {
                    what,
                    at_sec: at(),
                    db_time,
                    failover_sec: None,
                    held,
                });
                tokio::time::sleep(every).await;
            }
        }
        Scenario::ChaosStop => {
            // Past the default 10 s lease, so the stopped worker's tasks are rescued and
            // its late completions must be fenced.
            tokio::time::sleep(every).await;
            while Instant::now() < end {
                let i = busy_worker(c, pool).await;
                let p = &c.procs[i];
                let db_time = db_now(pool).await;
                p.signal(libc::SIGSTOP);
                let held = held_by(pool, p.pid()).await;
                faults.push(Fault {
                    what: format!("SIGSTOP worker {} for 20 s", p.name),
                    at_sec: at(),
                    db_time,
                    failover_sec: None,
                    held,
                });
                tokio::time::sleep(Duration::from_secs(20)).await;
                c.procs[i].signal(libc::SIGCONT);
                tokio::time::sleep(every).await;
            }
        }
        Scenario::DbRestart => {
            let Some(pg) = c.pg.clone() else {
                anyhow::bail!("db-restart needs the throwaway cluster (no --database-url)");
            };
            tokio::time::sleep(Duration::from_secs_f64(args.duration_sec / 3.0)).await;
            faults.push(Fault {
                what: "PostgreSQL stopped -m immediate for 5 s".into(),
                at_sec: at(),
                db_time: None,
                failover_sec: None,
                held: Vec::new(),
            });
            let p = pg.clone();
            tokio::task::spawn_blocking(move || p.stop("immediate")).await??;
            tokio::time::sleep(Duration::from_secs(5)).await;
            tokio::task::spawn_blocking(move || pg.restart_after_stop()).await??;
        }
        Scenario::LeaderKill => {
            tokio::time::sleep(every).await;
            while Instant::now() < end {
                let holder: Option<(i32,)> = sqlx::query_as(
                    "SELECT w.pid FROM leader_lease l JOIN workers w ON w.id = l.holder \
                     WHERE l.name = 'sweeper' AND l.expires_at > now()",
                )
                .fetch_optional(pool)
                .await?;
                let Some((pid,)) = holder else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Some(i) = c.procs.iter().position(|p| p.pid() == Some(pid)) else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let what = format!("SIGKILL leader {}", c.procs[i].name);
                let killed = Instant::now();
                c.kill_and_replace(i).await?;
                // Failover: until a live process other than the victim holds the lease.
                let failover = loop {
                    let other: Option<(i32,)> = sqlx::query_as(
                        "SELECT w.pid FROM leader_lease l JOIN workers w ON w.id = l.holder \
                         WHERE l.name = 'sweeper' AND l.expires_at > now() AND w.pid <> $1",
                    )
                    .bind(pid)
                    .fetch_optional(pool)
                    .await?;
                    if other.is_some() || killed.elapsed() > Duration::from_secs(120) {
                        break killed.elapsed().as_secs_f64();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                faults.push(Fault {
                    what,
                    at_sec: at(),
                    db_time: None,
                    failover_sec: Some(failover),
                    held: Vec::new(),
                });
                tokio::time::sleep(every).await;
            }
        }
        Scenario::NetCut => {
            let proxy = proxy.expect("net-cut starts its proxy");
            let cut = Duration::from_secs_f64((args.duration_sec / 2.0).min(60.0));
            tokio::time::sleep(Duration::from_secs_f64(args.duration_sec / 4.0)).await;
            // Cut while the worker behind the proxy holds tasks (up to 10 s of waiting).
            let cut_worker = c.indices(Role::Worker)[0];
            let pid = c.procs[cut_worker].pid();
            for _ in 0..200 {
                if !held_by(pool, pid).await.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let db_time = db_now(pool).await;
            proxy.set_cut(true);
            let held = held_by(pool, pid).await;
            faults.push(Fault {
                what: format!(
                    "blackholed worker 1's PostgreSQL traffic for {} s",
                    cut.as_secs()
                ),
                at_sec: at(),
                db_time,
                failover_sec: None,
                held,
            });
            tokio::time::sleep(cut).await;
            proxy.set_cut(false);
        }
        Scenario::Steady
        | Scenario::Giant
        | Scenario::Burst
        | Scenario::Soak
        | Scenario::SmallOrders => {}
    }
    let left = end.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    Ok(faults)
}

/// Status latency, sampled: for single-unit orders, from the sink's answer to the handler
/// call until `GET /api/orders/{id}` shows COMPLETED (polled every 20 ms; at most 300).
async fn watch_status(
    client: reqwest::Client,
    api: String,
    key: String,
    submitted: Arc<Mutex<Vec<Submitted>>>,
    sink: sink::Sink,
    samples: Arc<Mutex<Vec<f64>>>,
) {
    let mut seen = std::collections::HashSet::new();
    loop {
        let singles: std::collections::HashSet<uuid::Uuid> = submitted
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.quantity == 1)
            .map(|o| o.id)
            .collect();
        let due: Vec<(uuid::Uuid, Instant)> = sink
            .calls
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take(200)
            .filter(|c| singles.contains(&c.order_id) && !seen.contains(&c.order_id))
            .map(|c| (c.order_id, c.at))
            .take(8)
            .collect();
        for (id, at) in due {
            seen.insert(id);
            let (client, api, key, samples) =
                (client.clone(), api.clone(), key.clone(), samples.clone());
            tokio::spawn(async move {
                for _ in 0..500 {
                    let r = client
                        .get(format!("{api}/api/orders/{id}"))
                        .header("x-api-key", &key)
                        .send()
                        .await;
                    if let Ok(r) = r
                        && let Ok(b) = r.bytes().await
                        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                        && v["status"] == "COMPLETED"
                    {
                        samples.lock().unwrap().push(at.elapsed().as_secs_f64());
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        if seen.len() >= 300 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (seconds since start, table, dead tuples, total bytes), every 10 s.
pub type TableSample = (f64, String, i64, i64);

/// Samples the hot tables' dead tuples and sizes, and the workers' claim-duration histograms,
/// every 10 s (soak's drift figures).
async fn sample_tables(
    pool: sqlx::PgPool,
    client: reqwest::Client,
    worker_metrics: Vec<String>,
    started: Instant,
    samples: Arc<Mutex<Vec<TableSample>>>,
    claim_samples: Arc<Mutex<Vec<claims::ClaimSample>>>,
) {
    loop {
        for url in &worker_metrics {
            let text = match client.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => continue,
            };
            let buckets = claims::parse(&text);
            if !buckets.is_empty() {
                let t = started.elapsed().as_secs_f64();
                claim_samples
                    .lock()
                    .unwrap()
                    .push((t, url.clone(), buckets));
            }
        }
        let rows: Result<Vec<(String, i64, i64)>, _> = sqlx::query_as(
            "SELECT relname::text, n_dead_tup, pg_total_relation_size(relid) \
             FROM pg_stat_user_tables \
             WHERE relname IN ('orders', 'order_tasks', 'order_task_transitions', 'workers') \
             ORDER BY relname",
        )
        .fetch_all(&pool)
        .await;
        if let Ok(rows) = rows {
            let t = started.elapsed().as_secs_f64();
            samples
                .lock()
                .unwrap()
                .extend(rows.into_iter().map(|(n, d, b)| (t, n, d, b)));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Waits until every submitted order is finished; false on timeout.
async fn wait_finished(pool: &sqlx::PgPool, orders: &[Submitted], timeout: Duration) -> bool {
    let ids: Vec<uuid::Uuid> = orders.iter().map(|o| o.id).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let open: Result<i64, _> = sqlx::query_scalar(
            "SELECT count(*) FROM orders WHERE id = ANY($1) \
             AND status NOT IN ('COMPLETED', 'PARTIAL', 'CANCELLED')",
        )
        .bind(&ids)
        .fetch_one(pool)
        .await;
        if open.is_ok_and(|n| n == 0) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
