//! The `small-orders` scenario: single-unit orders at a steady rate over HTTP (one order per
//! request, or `--batch-intake` calls of `POST /api/orders/batch`), from at most `--clients`
//! requests in flight, optionally with one session pinning the xmin (`--pin-xmin`) and Tally's
//! database connections terminated (`--kill-backends-per-sec`). Reports, per window of
//! `--window-sec`: accepted/s, POST and pickup p50/p99, queue depth and the hot tables' dead
//! tuples; and the cost of one order end to end (commits, WAL bytes and flushes, rows
//! written, statements).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use sqlx::Connection;
use tokio::sync::Semaphore;

use crate::sink::Call;
use crate::{RunArgs, Submitted};

/// HTTP answers other than 201/200 that intake gave (each retried with the same key).
#[derive(Debug, Default)]
pub struct IntakeErrors {
    pub status_500: AtomicU64,
    pub status_503: AtomicU64,
    pub other: AtomicU64,
    /// Orders given up after every retry failed.
    pub given_up: AtomicU64,
}

impl IntakeErrors {
    fn count(&self, status: u16) {
        let c = match status {
            500 => &self.status_500,
            503 => &self.status_503,
            _ => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Submits single-unit orders at `args.rate` per second until `args.duration_sec` is up.
pub async fn drive(
    args: &RunArgs,
    client: reqwest::Client,
    api: String,
    key: String,
    submitted: Arc<Mutex<Vec<Submitted>>>,
    errors: Arc<IntakeErrors>,
) -> anyhow::Result<()> {
    let clients = Arc::new(Semaphore::new(args.clients.max(1)));
    let started = Instant::now();
    let end = Duration::from_secs_f64(args.duration_sec);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut set = tokio::task::JoinSet::new();
    let run = uuid::Uuid::new_v4().simple().to_string();
    while started.elapsed() < end {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * args.rate) as u64;
        if due <= sent {
            continue;
        }
        let keys: Vec<String> = (sent..due).map(|n| format!("so-{run}-{n}")).collect();
        sent = due;
        let ctx = Ctx {
            client: client.clone(),
            api: api.clone(),
            key: key.clone(),
            submitted: submitted.clone(),
            errors: errors.clone(),
            clients: clients.clone(),
        };
        if args.batch_intake {
            set.spawn(async move { ctx.batch(keys).await });
        } else {
            for k in keys {
                let ctx = ctx.clone();
                set.spawn(async move { ctx.one(k).await });
            }
        }
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

#[derive(Clone)]
struct Ctx {
    client: reqwest::Client,
    api: String,
    key: String,
    submitted: Arc<Mutex<Vec<Submitted>>>,
    errors: Arc<IntakeErrors>,
    clients: Arc<Semaphore>,
}

fn body(key: &str) -> serde_json::Value {
    json!({"kind": "loadtest", "target": format!("acct-{}", &key[key.len() - 3..]), "quantity": 1})
}

impl Ctx {
    /// POSTs `payload` to `path` (through a client slot) until `accept` takes the answer,
    /// retrying anything else with the same body (and so the same keys), as a client should.
    /// `accept` gets the JSON answer, when the POST started and how long it took.
    async fn post_until(
        &self,
        path: &str,
        idempotency_key: Option<&str>,
        payload: Vec<u8>,
        ok_status: u16,
        orders: u64,
        accept: impl Fn(&serde_json::Value, Instant, f64) -> bool,
    ) {
        for attempt in 0..30u64 {
            let permit = self.clients.acquire().await.expect("open semaphore");
            let t0 = Instant::now();
            let mut req = self
                .client
                .post(format!("{}{path}", self.api))
                .header("x-api-key", &self.key)
                .header("content-type", "application/json");
            if let Some(k) = idempotency_key {
                req = req.header("idempotency-key", k);
            }
            let (status, bytes) = match req.body(payload.clone()).send().await {
                Ok(r) => (r.status().as_u16(), r.bytes().await.ok()),
                Err(_) => (0, None),
            };
            let post_ms = t0.elapsed().as_secs_f64() * 1000.0;
            drop(permit);
            if status == ok_status
                && let Some(v) = bytes.and_then(|b| serde_json::from_slice(&b).ok())
                && accept(&v, t0, post_ms)
            {
                return;
            }
            self.errors.count(status);
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1).min(20))).await;
        }
        self.errors.given_up.fetch_add(orders, Ordering::Relaxed);
    }

    /// One order per request.
    async fn one(self, key: String) {
        let payload = serde_json::to_vec(&body(&key)).expect("json");
        let accept = |v: &serde_json::Value, t0, post_ms| {
            let Some(id) = v["id"].as_str().and_then(|s| s.parse().ok()) else {
                return false;
            };
            self.submitted.lock().unwrap().push(Submitted {
                id,
                quantity: 1,
                submitted_at: t0,
                post_ms,
            });
            true
        };
        self.post_until("/api/orders", Some(&key), payload, 201, 1, accept)
            .await;
    }

    /// All of one tick's orders in one `POST /api/orders/batch`.
    async fn batch(self, keys: Vec<String>) {
        let orders: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                let mut b = body(k);
                b["idempotency_key"] = json!(k);
                b
            })
            .collect();
        let payload = serde_json::to_vec(&json!({ "orders": orders })).expect("json");
        let accept = |v: &serde_json::Value, t0, post_ms| {
            let Some(results) = v["results"].as_array() else {
                return false;
            };
            let ids: Vec<uuid::Uuid> = results
                .iter()
                .filter_map(|r| r["id"].as_str().and_then(|s| s.parse().ok()))
                .collect();
            if ids.len() != keys.len() {
                return false;
            }
            let mut s = self.submitted.lock().unwrap();
            s.extend(ids.into_iter().map(|id| Submitted {
                id,
                quantity: 1,
                submitted_at: t0,
                post_ms,
            }));
            true
        };
        let n = keys.len() as u64;
        self.post_until("/api/orders/batch", None, payload, 200, n, accept)
            .await;
    }
}

/// Holds an open transaction with an xid (what a long report or a forgotten `BEGIN` does)
/// from `after` for `hold`; returns when it started and ended, in seconds since `started`.
pub async fn pin_xmin(
    url: String,
    started: Instant,
    after: Duration,
    hold: Duration,
) -> anyhow::Result<(f64, f64)> {
    tokio::time::sleep(after).await;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("BEGIN").execute(&mut conn).await?;
    sqlx::query("SELECT txid_current()")
        .execute(&mut conn)
        .await?;
    let from = started.elapsed().as_secs_f64();
    tokio::time::sleep(hold).await;
    sqlx::query("ROLLBACK").execute(&mut conn).await?;
    Ok((from, started.elapsed().as_secs_f64()))
}

/// Terminates one of Tally's database connections `per_sec` times a second until `until`
/// (what a failover proxy, an idle-session killer or an operator does), one running a
/// statement when there is one. Returns how many.
pub async fn kill_backends(pool: sqlx::PgPool, per_sec: f64, until: Instant) -> u64 {
    let every = Duration::from_secs_f64(1.0 / per_sec.max(0.01));
    let mut killed = 0;
    while Instant::now() < until {
        tokio::time::sleep(every).await;
        let done: Result<Option<bool>, _> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'tally%' \
             ORDER BY state = 'active' DESC, random() LIMIT 1",
        )
        .fetch_optional(&pool)
        .await;
        if let Ok(Some(true)) = done {
            killed += 1;
        }
    }
    killed
}

/// The hot tables whose dead tuples are sampled.
const HOT_TABLES: [&str; 5] = [
    "order_tasks",
    "orders",
    "order_task_transitions",
    "idempotency_ledger",
    "admin_audit",
];

/// One sample of the queue and the hot tables.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSample {
    pub at_sec: f64,
    /// Tasks waiting to be claimed (PENDING or FAILED_RETRYING).
    pub depth: i64,
    pub executing: i64,
    /// Dead tuples per hot table.
    pub dead: HashMap<String, i64>,
}

/// Samples the queue depth and dead tuples every `every` until aborted.
pub async fn sample_queue(
    pool: sqlx::PgPool,
    started: Instant,
    every: Duration,
    samples: Arc<Mutex<Vec<QueueSample>>>,
) {
    loop {
        tokio::time::sleep(every).await;
        let depth: Result<(i64, i64), _> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status IN ('PENDING', 'FAILED_RETRYING')), \
                    count(*) FILTER (WHERE status = 'EXECUTING') \
             FROM order_tasks WHERE status IN ('PENDING', 'FAILED_RETRYING', 'EXECUTING')",
        )
        .fetch_one(&pool)
        .await;
        let dead: Result<Vec<(String, i64)>, _> = sqlx::query_as(
            "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables WHERE relname = ANY($1)",
        )
        .bind(&HOT_TABLES[..])
        .fetch_all(&pool)
        .await;
        if let (Ok((depth, executing)), Ok(dead)) = (depth, dead) {
            samples.lock().unwrap().push(QueueSample {
                at_sec: started.elapsed().as_secs_f64(),
                depth,
                executing,
                dead: dead.into_iter().collect(),
            });
        }
    }
}

/// Cumulative database counters, to take differences of.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    pub commits: i64,
    pub wal_bytes: i64,
    pub wal_syncs: i64,
    pub rows_written: i64,
    pub statements: Option<i64>,
}

/// Reads the counters (`pg_stat_statements` when it is installed).
pub async fn counters(pool: &sqlx::PgPool) -> anyhow::Result<Counters> {
    let (commits, wal_bytes, wal_syncs, rows_written): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
                (pg_current_wal_lsn() - '0/0')::bigint, \
                (SELECT wal_sync FROM pg_stat_wal), \
                (SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint \
                   FROM pg_stat_user_tables)",
    )
    .fetch_one(pool)
    .await?;
    let statements = sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .ok();
    Ok(Counters {
        commits,
        wal_bytes,
        wal_syncs,
        rows_written,
        statements,
    })
}

/// One window of the load.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub from_sec: f64,
    pub accepted_per_sec: f64,
    pub post_p50_ms: Option<f64>,
    pub post_p99_ms: Option<f64>,
    pub pickup_p50_ms: Option<f64>,
    pub pickup_p99_ms: Option<f64>,
    /// The last queue sample in the window.
    pub depth: Option<i64>,
    pub dead_order_tasks: Option<i64>,
    pub dead_all_hot: Option<i64>,
    /// The xmin was pinned during (part of) this window.
    pub pinned: bool,
}

/// Per single-unit order, end to end: intake, claim, completion and everything else the
/// cluster did meanwhile, divided by the orders.
#[derive(Debug, Clone, Serialize)]
pub struct CostPerOrder {
    pub orders: usize,
    pub commits: f64,
    pub wal_bytes: f64,
    pub wal_syncs: f64,
    pub rows_written: f64,
    pub statements: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SmallReport {
    pub rate: f64,
    pub clients: usize,
    pub batch_intake: bool,
    pub accepted_per_sec: f64,
    pub post_p50_ms: Option<f64>,
    pub post_p99_ms: Option<f64>,
    pub intake_500: u64,
    pub intake_503: u64,
    pub intake_other_errors: u64,
    pub intake_given_up: u64,
    pub backends_killed: u64,
    pub pin: Option<(f64, f64)>,
    /// Worst window pickup p99 while pinned, and after the pin how long until a window's
    /// p99 was back within 25 % (or 10 ms) of the p99 before it.
    pub pinned_pickup_p99_max_ms: Option<f64>,
    pub pin_recovery_sec: Option<f64>,
    pub depth_at_end_of_load: Option<i64>,
    pub cost_per_order: CostPerOrder,
    pub windows: Vec<Window>,
}

fn pct(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

#[allow(clippy::too_many_arguments)]
pub fn report(
    args: &RunArgs,
    orders: &[Submitted],
    calls: &[Call],
    started: Instant,
    samples: &[QueueSample],
    before: Counters,
    after: Counters,
    errors: &IntakeErrors,
    backends_killed: u64,
    pin: Option<(f64, f64)>,
) -> SmallReport {
    let mut first_call: HashMap<uuid::Uuid, Instant> = HashMap::new();
    for c in calls {
        first_call
            .entry(c.order_id)
            .and_modify(|t| *t = (*t).min(c.at))
            .or_insert(c.at);
    }
    let w = args.window_sec.max(1.0);
    let n = (args.duration_sec / w).ceil() as usize;
    let mut windows = Vec::with_capacity(n);
    for k in 0..n {
        let (from, to) = (k as f64 * w, (k + 1) as f64 * w);
        let inside: Vec<&Submitted> = orders
            .iter()
            .filter(|o| {
                let t = o.submitted_at.duration_since(started).as_secs_f64();
                t >= from && t < to
            })
            .collect();
        let posts = inside.iter().map(|o| o.post_ms).collect::<Vec<_>>();
        let pickups = inside
            .iter()
            .filter_map(|o| {
                first_call
                    .get(&o.id)
                    .map(|t| t.saturating_duration_since(o.submitted_at).as_secs_f64() * 1000.0)
            })
            .collect::<Vec<_>>();
        let sample = samples.iter().rfind(|s| s.at_sec >= from && s.at_sec < to);
        windows.push(Window {
            from_sec: from,
            accepted_per_sec: inside.len() as f64 / w,
            post_p50_ms: pct(posts.clone(), 50.0),
            post_p99_ms: pct(posts, 99.0),
            pickup_p50_ms: pct(pickups.clone(), 50.0),
            pickup_p99_ms: pct(pickups, 99.0),
            depth: sample.map(|s| s.depth),
            dead_order_tasks: sample.and_then(|s| s.dead.get("order_tasks").copied()),
            dead_all_hot: sample.map(|s| s.dead.values().sum()),
            pinned: pin.is_some_and(|(a, b)| a < to && b > from),
        });
    }
    let (pinned_max, recovery) = match pin {
        Some((a, b)) => {
            let before: Vec<f64> = windows
                .iter()
                .filter(|x| x.from_sec + w <= a && x.from_sec >= w)
                .filter_map(|x| x.pickup_p99_ms)
                .collect();
            let baseline = pct(before, 50.0);
            let max = windows
                .iter()
                .filter(|x| x.pinned)
                .filter_map(|x| x.pickup_p99_ms)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            let rec = baseline.and_then(|base| {
                windows
                    .iter()
                    .filter(|x| x.from_sec >= b)
                    .find(|x| {
                        x.pickup_p99_ms
                            .is_some_and(|p| p <= (base * 1.25).max(base + 10.0))
                    })
                    .map(|x| x.from_sec + w - b)
            });
            (max, rec)
        }
        None => (None, None),
    };
    let load_end = args.duration_sec;
    let depth_at_end = samples
        .iter()
        .rfind(|s| s.at_sec <= load_end + 0.5)
        .map(|s| s.depth);
    let count = orders.len().max(1) as f64;
    let posts: Vec<f64> = orders.iter().map(|o| o.post_ms).collect();
    SmallReport {
        rate: args.rate,
        clients: args.clients,
        batch_intake: args.batch_intake,
        // Answered 201 while the load ran (orders still queued for a client at the end are
        // accepted later and do not count).
        accepted_per_sec: orders
            .iter()
            .filter(|o| {
                o.submitted_at.duration_since(started).as_secs_f64() + o.post_ms / 1000.0
                    <= args.duration_sec
            })
            .count() as f64
            / args.duration_sec.max(0.001),
        post_p50_ms: pct(posts.clone(), 50.0),
        post_p99_ms: pct(posts, 99.0),
        intake_500: errors.status_500.load(Ordering::Relaxed),
        intake_503: errors.status_503.load(Ordering::Relaxed),
        intake_other_errors: errors.other.load(Ordering::Relaxed),
        intake_given_up: errors.given_up.load(Ordering::Relaxed),
        backends_killed,
        pin,
        pinned_pickup_p99_max_ms: pinned_max,
        pin_recovery_sec: recovery,
        depth_at_end_of_load: depth_at_end,
        cost_per_order: CostPerOrder {
            orders: orders.len(),
            commits: (after.commits - before.commits) as f64 / count,
            wal_bytes: (after.wal_bytes - before.wal_bytes) as f64 / count,
            wal_syncs: (after.wal_syncs - before.wal_syncs) as f64 / count,
            rows_written: (after.rows_written - before.rows_written) as f64 / count,
            statements: after
                .statements
                .zip(before.statements)
                .map(|(a, b)| (a - b) as f64 / count),
        },
        windows,
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

/// The scenario's section of report.md.
pub fn markdown(r: &SmallReport) -> String {
    let mut s = String::new();
    let c = &r.cost_per_order;
    s.push_str(&format!(
        "\n## Small orders\n\n{} single-unit orders/s offered from at most {} requests in flight ({}); \
         **{:.0} accepted/s**, POST p50/p99 {} / {} ms; intake answered 500 ×{}, 503 ×{}, other ×{} \
         (each retried with its key), {} given up; {} backends killed.\n",
        r.rate,
        r.clients,
        if r.batch_intake { "POST /api/orders/batch per 5 ms" } else { "one POST /api/orders per order" },
        r.accepted_per_sec,
        opt(r.post_p50_ms),
        opt(r.post_p99_ms),
        r.intake_500,
        r.intake_503,
        r.intake_other_errors,
        r.intake_given_up,
        r.backends_killed,
    ));
    if let Some((a, b)) = r.pin {
        s.push_str(&format!(
            "\nxmin pinned from {a:.0} s to {b:.0} s: worst window pickup p99 {} ms; back to the p99 before the pin {} after it ended.\n",
            opt(r.pinned_pickup_p99_max_ms),
            r.pin_recovery_sec.map_or("never (within the run)".into(), |s| format!("{s:.0} s")),
        ));
    }
    s.push_str(&format!(
        "\nCost per order, end to end ({} orders): **{:.2} commits**, {:.0} WAL bytes, {:.3} WAL flushes, \
         {:.2} rows written, {} statements. Queue depth at the end of the load: {}.\n",
        c.orders,
        c.commits,
        c.wal_bytes,
        c.wal_syncs,
        c.rows_written,
        c.statements.map_or("–".into(), |v| format!("{v:.2}")),
        r.depth_at_end_of_load.map_or("–".into(), |d| d.to_string()),
    ));
    s.push_str("\n| from (s) | accepted/s | POST p50 / p99 (ms) | pickup p50 / p99 (ms) | depth | dead tuples: order_tasks / all hot | pinned |\n|---|---|---|---|---|---|---|\n");
    for w in &r.windows {
        s.push_str(&format!(
            "| {:.0} | {:.0} | {} / {} | {} / {} | {} | {} / {} | {} |\n",
            w.from_sec,
            w.accepted_per_sec,
            opt(w.post_p50_ms),
            opt(w.post_p99_ms),
            opt(w.pickup_p50_ms),
            opt(w.pickup_p99_ms),
            w.depth.map_or("–".into(), |d| d.to_string()),
            w.dead_order_tasks.map_or("–".into(), |d| d.to_string()),
            w.dead_all_hot.map_or("–".into(), |d| d.to_string()),
            if w.pinned { "yes" } else { "" },
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(pct(vec![], 99.0), None);
        assert_eq!(pct(vec![3.0, 1.0, 2.0], 50.0), Some(2.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(v.clone(), 99.0), Some(99.0));
        assert_eq!(pct(v, 100.0), Some(100.0));
    }
}
