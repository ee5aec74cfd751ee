//! The verdict: figures from the database (orders, tasks, transitions), the sink (every
//! handler call) and the client (submission and status times), written as JSON and Markdown.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::sink::Call;
use crate::{Fault, RunArgs, Scenario, Submitted};

pub struct Inputs<'a> {
    pub args: &'a RunArgs,
    pub pool: &'a sqlx::PgPool,
    pub orders: &'a [Submitted],
    pub calls: Vec<Call>,
    pub started: Instant,
    pub faults: Vec<Fault>,
    pub drained: bool,
    pub load_secs: f64,
    pub total_secs: f64,
    pub invariants: serde_json::Value,
    pub connections_max: i64,
    pub status_latencies: Vec<f64>,
    pub tables: Vec<crate::TableSample>,
    pub claims: Vec<crate::claims::ClaimSample>,
}

#[derive(Debug, Serialize)]
pub struct Kpi {
    pub name: &'static str,
    pub value: f64,
    pub target: &'static str,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub duration_sec: f64,
    pub workers: usize,
    pub orders: usize,
    pub orders_finished: i64,
    pub all_finished_in_time: bool,
    pub tasks: i64,
    pub units_expected: i64,
    pub units_delivered: i64,
    /// Must be zero: accepted orders missing from the database, tasks never finished, and
    /// completed tasks whose side effect never reached the sink.
    pub lost_orders: i64,
    pub lost_tasks: i64,
    pub completed_without_a_call: i64,
    /// Must be zero: the sweeper's recorded failed checks plus a fresh check of every order,
    /// plus COMPLETED orders whose delivered differs from their quantity.
    pub invariant_violations: i64,
    /// Must be zero: units counted twice (a task completed more than once).
    pub effective_duplicate_units: i64,
    /// Handler calls beyond the first per idempotency key (at-least-once delivery).
    pub raw_duplicate_calls: i64,
    pub raw_duplicate_rate: f64,
    pub handler_calls: usize,
    /// Calls that were a re-run (attempt > 1) of an earlier attempt.
    pub retried_calls: usize,
    /// Units the sink saw, once per idempotency key (compare with units_delivered).
    pub units_seen_by_sink: i64,
    pub orphans_recovered: i64,
    /// Tasks a faulted process held that were never rescued as orphans: it finished them in
    /// the moment between the snapshot and the fault, or (SIGSTOP, net cut) after it.
    pub held_not_rescued: i64,
    pub orphan_recovery_p50_sec: Option<f64>,
    pub orphan_recovery_p99_sec: Option<f64>,
    pub leader_failover_sec: Vec<f64>,
    pub pickup_p50_ms: Option<f64>,
    pub pickup_p99_ms: Option<f64>,
    pub tasks_per_sec: f64,
    pub units_per_sec: f64,
    pub db_connections_max: i64,
    pub kpis: Vec<Kpi>,
    pub faults: Vec<Fault>,
    /// Per second since the start: tasks delivered (first call per key) and pickup p99 (ms).
    pub timeline: Vec<(u64, u64, Option<f64>)>,
    pub passed: bool,
    /// Every 10 s: (seconds, table, dead tuples, total bytes).
    pub tables: Vec<crate::TableSample>,
    /// Claim statement p99 (workers' histograms) over the first and the last window of the
    /// load, and their ratio (the soak target: end ≤ 1.5 × start).
    pub claim_window_sec: f64,
    pub claim_p99_start_ms: Option<f64>,
    pub claim_p99_end_ms: Option<f64>,
    pub claim_p99_end_over_start: Option<f64>,
    /// Claim p99 (ms) per window of `claim_window_sec`, keyed by the window's end (s).
    pub claim_p99_timeline: Vec<(f64, Option<f64>)>,
    /// Seconds of load, and from the start until every order finished.
    pub load_secs: f64,
    pub total_secs: f64,
    /// The small-orders scenario's figures (windows, cost per order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub small: Option<crate::small::SmallReport>,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

pub async fn build(i: Inputs<'_>) -> anyhow::Result<Report> {
    let ids: Vec<uuid::Uuid> = i.orders.iter().map(|o| o.id).collect();
    let pool = i.pool;
    let (in_db, finished, expected, delivered, mismatched): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*), \
                    count(*) FILTER (WHERE status IN ('COMPLETED', 'PARTIAL', 'CANCELLED')), \
                    coalesce(sum(quantity), 0)::bigint, coalesce(sum(delivered), 0)::bigint, \
                    count(*) FILTER (WHERE status = 'COMPLETED' AND delivered <> quantity) \
             FROM orders WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(pool)
        .await?;
    let (tasks, open, failed_permanent): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE status NOT IN ('COMPLETED', 'FAILED_PERMANENT', 'CANCELLED')), \
                count(*) FILTER (WHERE status = 'FAILED_PERMANENT') \
         FROM order_tasks WHERE order_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    let twice: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(quantity * (n - 1)), 0)::bigint FROM ( \
           SELECT t.quantity, count(*) AS n FROM order_task_transitions x \
           JOIN order_tasks t ON t.id = x.task_id \
           WHERE x.order_id = ANY($1) AND x.to_state = 'COMPLETED' \
           GROUP BY t.id, t.quantity HAVING count(*) > 1) d",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    // Completed tasks whose idempotency key never reached the sink: a lost side effect.
    let completed_keys: Vec<String> = sqlx::query_scalar(
        "SELECT order_id::text || ':' || seq FROM order_tasks \
         WHERE order_id = ANY($1) AND status = 'COMPLETED'",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let called: HashSet<&str> = i.calls.iter().map(|c| c.key.as_str()).collect();
    let without_call = completed_keys
        .iter()
        .filter(|k| !called.contains(k.as_str()))
        .count() as i64;

    // Recovery: every orphan rescue after a fault, from the fault (database clock).
    let rescues: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT occurred_at FROM order_task_transitions \
         WHERE order_id = ANY($1) AND transition_reason = 'orphan_recovered' ORDER BY 1",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut recovery = Vec::new();
    let mut held_not_rescued = 0i64;
    for f in &i.faults {
        let (Some(at), false) = (f.db_time, f.held.is_empty()) else {
            continue;
        };
        let rescued: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT min(occurred_at) FROM order_task_transitions \
             WHERE task_id = ANY($1) AND transition_reason = 'orphan_recovered' \
               AND occurred_at >= $2 GROUP BY task_id",
        )
        .bind(&f.held)
        .bind(at)
        .fetch_all(pool)
        .await?;
        held_not_rescued += (f.held.len() - rescued.len()) as i64;
        recovery.extend(
            rescued
                .iter()
                .map(|r| (*r - at).num_milliseconds() as f64 / 1000.0),
        );
    }
    let recovery = sorted(recovery);
    // KPI: a failed or orphaned attempt is claimed again within 5 minutes.
    let (setbacks, recovered_5m): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE next_claim <= f.occurred_at + interval '5 minutes') \
         FROM ( \
           SELECT f.occurred_at, \
                  (SELECT min(n.occurred_at) FROM order_task_transitions n \
                    WHERE n.task_id = f.task_id AND n.to_state = 'EXECUTING' \
                      AND n.occurred_at >= f.occurred_at) AS next_claim \
           FROM order_task_transitions f \
           WHERE f.order_id = ANY($1) \
             AND (f.to_state = 'FAILED_RETRYING' OR f.transition_reason = 'orphan_recovered')) f",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;

    // Pickup: single-unit orders, from the start of the POST that created the order to its
    // handler call (intake, the NOTIFY or poll, the claim and the HTTP call).
    let mut first_call: HashMap<uuid::Uuid, Instant> = HashMap::new();
    let mut per_key: HashMap<&str, u32> = HashMap::new();
    for c in &i.calls {
        first_call
            .entry(c.order_id)
            .and_modify(|t| *t = (*t).min(c.at))
            .or_insert(c.at);
        *per_key.entry(c.key.as_str()).or_default() += 1;
    }
    let mut pickups_at = Vec::new();
    for o in i.orders.iter().filter(|o| o.quantity == 1) {
        if let Some(t) = first_call.get(&o.id) {
            let ms = t.saturating_duration_since(o.submitted_at).as_secs_f64() * 1000.0;
            pickups_at.push((o.submitted_at.duration_since(i.started).as_secs(), ms));
        }
    }
    let pickups = sorted(pickups_at.iter().map(|p| p.1).collect());
    // Timeline: first calls per key per second, and pickup p99 per second.
    let mut firsts: HashMap<&str, Instant> = HashMap::new();
    for c in &i.calls {
        firsts
            .entry(c.key.as_str())
            .and_modify(|t| *t = (*t).min(c.at))
            .or_insert(c.at);
    }
    let secs = i.total_secs.ceil() as usize + 1;
    let mut per_sec = vec![0u64; secs];
    for t in firsts.values() {
        let s = t.saturating_duration_since(i.started).as_secs() as usize;
        if s < secs {
            per_sec[s] += 1;
        }
    }
    let mut pick_by_sec: HashMap<u64, Vec<f64>> = HashMap::new();
    for (s, ms) in &pickups_at {
        pick_by_sec.entry(*s).or_default().push(*ms);
    }
    let timeline = per_sec
        .iter()
        .enumerate()
        .map(|(s, n)| {
            let p99 = pick_by_sec
                .remove(&(s as u64))
                .and_then(|v| percentile(&sorted(v), 99.0));
            (s as u64, *n, p99)
        })
        .collect();

    let mut unit_once: HashMap<&str, i64> = HashMap::new();
    for c in &i.calls {
        unit_once.entry(c.key.as_str()).or_insert(c.quantity);
    }
    let units_seen_by_sink: i64 = unit_once.values().sum();
    let raw_dups: i64 = per_key.values().map(|n| i64::from(*n) - 1).sum();
    let unique = per_key.len().max(1) as f64;
    let inv_failed = i.invariants["failed"].as_i64().unwrap_or(-1);
    let inv_recorded = i.invariants["recorded_failures_24h"].as_i64().unwrap_or(0);
    let invariant_violations = inv_failed.max(0) + inv_recorded + mismatched;
    let lost_orders = i.orders.len() as i64 - in_db;
    let status = sorted(i.status_latencies);
    let status_mean = if status.is_empty() {
        f64::NAN
    } else {
        status.iter().sum::<f64>() / status.len() as f64
    };
    let failed_rate = failed_permanent as f64 / tasks.max(1) as f64;
    let recovery_share = if setbacks == 0 {
        1.0
    } else {
        recovered_5m as f64 / setbacks as f64
    };
    let dup_rate = raw_dups as f64 / unique;
    let kpis = vec![
        Kpi {
            name: "failed action rate",
            value: failed_rate,
            target: "<= 2 %",
            met: failed_rate <= 0.02,
        },
        Kpi {
            name: "failed or orphaned attempt claimed again within 5 min",
            value: recovery_share,
            target: ">= 95 %",
            met: recovery_share >= 0.95,
        },
        Kpi {
            name: "duplicate side-effect rate (handler calls beyond the first per key)",
            value: dup_rate,
            target: "<= 0.1 %",
            met: dup_rate <= 0.001,
        },
        Kpi {
            name: "mean status latency, handler answer to COMPLETED seen through the API (s)",
            value: status_mean,
            target: "<= 1.5 s",
            met: status_mean <= 1.5,
        },
    ];
    let passed = lost_orders == 0
        && open == 0
        && without_call == 0
        && invariant_violations == 0
        && twice == 0
        && inv_failed >= 0
        && i.drained;
    // The claim windows: a fifth of the load, between 20 s and 5 minutes.
    let w = (i.load_secs / 5.0).clamp(20.0, 300.0);
    let claim_p99 = |from: f64, to: f64| {
        crate::claims::quantile_ms(&crate::claims::window(&i.claims, from, to), 0.99)
    };
    let claim_p99_start_ms = claim_p99(0.0, w);
    let claim_p99_end_ms = claim_p99(i.load_secs - w, i.load_secs);
    let claim_p99_timeline = (1..=(i.load_secs / w).floor() as usize)
        .map(|k| {
            let end = k as f64 * w;
            (end, claim_p99(end - w, end))
        })
        .collect();
    Ok(Report {
        scenario: i.args.scenario,
        duration_sec: i.args.duration_sec,
        workers: i.args.workers,
        orders: i.orders.len(),
        orders_finished: finished,
        all_finished_in_time: i.drained,
        tasks,
        units_expected: expected,
        units_delivered: delivered,
        lost_orders,
        lost_tasks: open,
        completed_without_a_call: without_call,
        invariant_violations,
        effective_duplicate_units: twice,
        raw_duplicate_calls: raw_dups,
        raw_duplicate_rate: dup_rate,
        handler_calls: i.calls.len(),
        retried_calls: i.calls.iter().filter(|c| c.attempt > 1).count(),
        units_seen_by_sink,
        orphans_recovered: rescues.len() as i64,
        held_not_rescued,
        orphan_recovery_p50_sec: percentile(&recovery, 50.0),
        orphan_recovery_p99_sec: percentile(&recovery, 99.0),
        leader_failover_sec: i.faults.iter().filter_map(|f| f.failover_sec).collect(),
        pickup_p50_ms: percentile(&pickups, 50.0),
        pickup_p99_ms: percentile(&pickups, 99.0),
        tasks_per_sec: firsts.len() as f64 / i.total_secs.max(0.001),
        units_per_sec: delivered as f64 / i.total_secs.max(0.001),
        db_connections_max: i.connections_max,
        kpis,
        faults: i.faults,
        timeline,
        passed,
        tables: i.tables,
        claim_window_sec: w,
        claim_p99_start_ms,
        claim_p99_end_ms,
        claim_p99_end_over_start: claim_p99_end_ms.zip(claim_p99_start_ms).map(|(e, s)| e / s),
        claim_p99_timeline,
        load_secs: i.load_secs,
        total_secs: i.total_secs,
        small: None,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}

pub fn markdown(r: &Report) -> String {
    let zero = |n: i64| {
        if n == 0 {
            "0 ✓".to_owned()
        } else {
            format!("**{n} ✗**")
        }
    };
    let mut s = format!(
        "## {:?}: {} s of load, {} workers — {}\n\n| figure | value |\n|---|---|\n",
        r.scenario,
        r.duration_sec,
        r.workers,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    let rows: Vec<(&str, String)> = vec![
        (
            "orders submitted / finished",
            format!("{} / {}", r.orders, r.orders_finished),
        ),
        ("tasks", r.tasks.to_string()),
        (
            "units delivered / expected / seen by the sink (once per key)",
            format!(
                "{} / {} / {}",
                r.units_delivered, r.units_expected, r.units_seen_by_sink
            ),
        ),
        ("lost orders (must be 0)", zero(r.lost_orders)),
        ("lost tasks (must be 0)", zero(r.lost_tasks)),
        (
            "completed tasks the sink never saw (must be 0)",
            zero(r.completed_without_a_call),
        ),
        (
            "invariant violations (must be 0)",
            zero(r.invariant_violations),
        ),
        (
            "effective duplicates: units counted twice (must be 0)",
            zero(r.effective_duplicate_units),
        ),
        (
            "raw duplicate handler calls (rate)",
            format!(
                "{} ({:.3} %) of {} calls; {} calls were retries",
                r.raw_duplicate_calls,
                r.raw_duplicate_rate * 100.0,
                r.handler_calls,
                r.retried_calls
            ),
        ),
        (
            "orphans recovered; the faulted process's tasks: rescue p50 / p99 after the fault",
            format!(
                "{}; {} s / {} s ({} held tasks not rescued)",
                r.orphans_recovered,
                opt(r.orphan_recovery_p50_sec, 1),
                opt(r.orphan_recovery_p99_sec, 1),
                r.held_not_rescued
            ),
        ),
        (
            "leader failovers (s)",
            if r.leader_failover_sec.is_empty() {
                "—".into()
            } else {
                r.leader_failover_sec
                    .iter()
                    .map(|s| format!("{s:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "pickup p50 / p99 (single-unit orders, POST /api/orders → handler call)",
            format!(
                "{} ms / {} ms",
                opt(r.pickup_p50_ms, 1),
                opt(r.pickup_p99_ms, 1)
            ),
        ),
        (
            "throughput",
            format!(
                "{:.0} tasks/s, {:.0} units/s",
                r.tasks_per_sec, r.units_per_sec
            ),
        ),
        (
            "PostgreSQL connections (max seen)",
            r.db_connections_max.to_string(),
        ),
        (
            "claim statement p99, first / last window of the load (end ÷ start)",
            format!(
                "{} ms / {} ms ({}; windows of {:.0} s)",
                opt(r.claim_p99_start_ms, 2),
                opt(r.claim_p99_end_ms, 2),
                opt(r.claim_p99_end_over_start, 2),
                r.claim_window_sec
            ),
        ),
        ("faults injected", r.faults.len().to_string()),
    ];
    for (k, v) in rows {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    if let (Some(first), Some(last)) = (r.tables.first(), r.tables.last())
        && last.0 > first.0
    {
        s.push_str(&format!(
            "\n| table | dead tuples at {:.0} s → {:.0} s | size at {:.0} s → {:.0} s |\n|---|---|---|\n",
            first.0, last.0, first.0, last.0
        ));
        for name in ["orders", "order_tasks", "order_task_transitions", "workers"] {
            let at = |t: f64| r.tables.iter().find(|x| x.0 == t && x.1 == name);
            if let (Some(a), Some(b)) = (at(first.0), at(last.0)) {
                s.push_str(&format!(
                    "| {name} | {} → {} | {:.1} → {:.1} MiB |\n",
                    a.2,
                    b.2,
                    a.3 as f64 / 1048576.0,
                    b.3 as f64 / 1048576.0
                ));
            }
        }
    }
    s.push_str("\n| KPI | value | target | met |\n|---|---|---|---|\n");
    for k in &r.kpis {
        let v = if k.name.ends_with("(s)") {
            format!("{:.3}", k.value)
        } else {
            format!("{:.3} %", k.value * 100.0)
        };
        s.push_str(&format!(
            "| {} | {v} | {} | {} |\n",
            k.name,
            k.target,
            if k.met { "yes" } else { "no" }
        ));
    }
    if let Some(small) = &r.small {
        s.push_str(&crate::small::markdown(small));
    }
    s
}

pub fn write(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
