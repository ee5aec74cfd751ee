//! The runbook's admin endpoints (`/api/admin/…`), at the paths operators script against.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::{AuditDetail, Caller, Scope};
use super::error::{ApiError, ApiResult, Json, Path, Query};
use super::orders::TaskView;
use crate::domain::{OrderLedger, TaskStatus};

/// `/api/admin/worker/status`: the runbook's camelCase shape, one entry per process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub worker_id: Uuid,
    pub hostname: String,
    pub roles: String,
    pub total_processed: i64,
    pub total_completed: i64,
    pub total_failed: i64,
    pub total_retries: i64,
    pub recovered_orphans: i64,
    pub is_running: bool,
    pub last_heartbeat_at: DateTime<Utc>,
}

pub async fn worker_status(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Vec<WorkerStatus>>> {
    caller.require(Scope::Read)?;
    let rows = st.store.list_workers().await?;
    Ok(axum::Json(
        rows.into_iter()
            .map(|w| WorkerStatus {
                worker_id: w.id,
                hostname: w.hostname,
                roles: w.roles,
                total_processed: w.total_processed,
                total_completed: w.total_completed,
                total_failed: w.total_failed,
                total_retries: w.total_retries,
                recovered_orphans: w.recovered_orphans,
                is_running: w.live,
                last_heartbeat_at: w.heartbeat_at,
            })
            .collect(),
    ))
}

pub async fn workers(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let rows = st.store.list_workers().await?;
    let workers: Vec<Value> = rows
        .into_iter()
        .map(|w| {
            let status = match (w.stopped_at.is_some(), w.live) {
                (true, _) => "stopped",
                (false, true) => "running",
                (false, false) => "lost",
            };
            json!({
                "id": w.id, "hostname": w.hostname, "pid": w.pid, "roles": w.roles,
                "version": w.version, "status": status, "started_at": w.started_at,
                "heartbeat_at": w.heartbeat_at, "stopped_at": w.stopped_at,
                "concurrency": w.concurrency, "executing": w.executing,
                "total_processed": w.total_processed, "total_completed": w.total_completed,
                "total_failed": w.total_failed, "total_retries": w.total_retries,
                "recovered_orphans": w.recovered_orphans,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "workers": workers })))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InvariantReport {
    pub order_id: Uuid,
    pub order_status: String,
    pub passed: bool,
    pub checked_at: DateTime<Utc>,
    pub expected_units: i64,
    pub delivered_units: i64,
    pub failed_units: i64,
    pub cancelled_units: i64,
    pub outstanding_units: i64,
    pub violations: Vec<String>,
    pub last_recorded_check_at: Option<DateTime<Utc>>,
    pub recorded_checks_failed: i64,
}

fn report(id: Uuid, l: &OrderLedger) -> InvariantReport {
    let violations: Vec<String> = l.check().iter().map(|v| format!("{v:?}")).collect();
    InvariantReport {
        order_id: id,
        order_status: l.status.as_str().to_owned(),
        passed: violations.is_empty(),
        checked_at: Utc::now(),
        expected_units: l.quantity,
        delivered_units: l.delivered,
        failed_units: l.failed,
        cancelled_units: l.cancelled,
        outstanding_units: l.tasks.outstanding,
        violations,
        last_recorded_check_at: None,
        recorded_checks_failed: 0,
    }
}

/// Checks one order now, from one snapshot of its counters and tasks.
pub async fn invariants_order(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<InvariantReport>> {
    caller.require(Scope::Read)?;
    let ledgers = st.store.order_ledgers(&[id]).await?;
    let Some((_, ledger)) = ledgers.first() else {
        return Err(ApiError::not_found(format!("no order {id}")));
    };
    let mut r = report(id, ledger);
    let recorded = st.store.recorded_checks(id).await?;
    r.last_recorded_check_at = recorded.last_check_at;
    r.recorded_checks_failed = recorded.checks_failed;
    Ok(axum::Json(r))
}

/// Checks every unfinished order and those finished in the last day, now.
pub async fn invariants_all(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let ids = st.store.orders_to_check(100_000).await?;
    let (mut checked, mut failed) = (0i64, Vec::new());
    for chunk in ids.chunks(1000) {
        for (id, ledger) in st.store.order_ledgers(chunk).await? {
            checked += 1;
            let r = report(id, &ledger);
            if !r.passed {
                failed.push(r);
            }
        }
    }
    let recorded = st.store.recorded_failures_24h().await?;
    Ok(axum::Json(json!({
        "checked": checked, "passed": checked - failed.len() as i64, "failed": failed.len(),
        "violations": failed, "recorded_failures_24h": recorded,
    })))
}

pub async fn orphans(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let rows = st.store.orphans(1000).await?;
    let orphans: Vec<Value> = rows
        .iter()
        .map(|o| {
            json!({"task_id": o.task_id, "order_id": o.order_id, "claimed_by": o.claimed_by,
                   "attempts": o.attempts, "lease_expired_seconds_ago": o.lease_expired_seconds_ago})
        })
        .collect();
    Ok(axum::Json(
        json!({"count": orphans.len(), "orphans": orphans}),
    ))
}

pub async fn capacity(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let c = st.store.capacity().await?;
    let units_5m = st.store.units_delivered_5m(None).await?;
    let units_per_sec = units_5m as f64 / 300.0;
    let eta = (units_per_sec > 0.0).then(|| c.pending_units as f64 / units_per_sec);
    let eta = if c.pending_units == 0 { Some(0.0) } else { eta };
    Ok(axum::Json(json!({
        "live_workers": c.live_workers, "worker_slots": c.worker_slots, "executing": c.executing,
        "pending_tasks": c.pending_tasks, "pending_units": c.pending_units,
        "retrying_tasks": c.retrying_tasks, "dead_letter_tasks": c.dead_letter_tasks,
        "units_per_sec_5m": units_per_sec, "tasks_per_sec_5m": c.tasks_5m as f64 / 300.0,
        "eta_seconds": eta, "paused": c.paused,
    })))
}

pub async fn failed_tasks(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    if st.store.get_order(id).await?.is_none() {
        return Err(ApiError::not_found(format!("no order {id}")));
    }
    let tasks: Vec<TaskView> = st
        .store
        .tasks_in_status(id, TaskStatus::FailedPermanent.as_str(), 10_000)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(axum::Json(json!({"order_id": id, "tasks": tasks})))
}

async fn fault_status(st: &AppState) -> ApiResult<Value> {
    let c = st.store.control().await?;
    Ok(
        json!({"allowed": st.config.fault_injection_allowed, "enabled": c.fault_injection_enabled,
              "failure_rate": c.fault_injection_rate}),
    )
}

pub async fn testing_status(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    Ok(axum::Json(fault_status(&st).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableFaults {
    failure_rate: Option<f64>,
}

pub async fn testing_enable(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Admin)?;
    if !st.config.fault_injection_allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "fault_injection_not_allowed",
            "fault injection is disabled by configuration (set TALLY_FAULT_INJECTION_ALLOWED=true on the API)",
        ));
    }
    // The body is optional: none (or empty) keeps the current rate.
    let rate = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice::<EnableFaults>(&body)
            .map_err(|e| {
                ApiError::invalid(
                    "failure_rate",
                    format!("the body must be {{\"failure_rate\": 0..1}}: {e}"),
                )
            })?
            .failure_rate
    };
    if let Some(r) = rate
        && !(0.0..=1.0).contains(&r)
    {
        return Err(ApiError::invalid("failure_rate", "must be between 0 and 1"));
    }
    st.store
        .set_fault_injection(true, rate, &caller.actor())
        .await?;
    Ok(axum::Json(fault_status(&st).await?))
}

pub async fn testing_disable(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Admin)?;
    st.store
        .set_fault_injection(false, None, &caller.actor())
        .await?;
    Ok(axum::Json(fault_status(&st).await?))
}

async fn control_view(st: &AppState) -> ApiResult<Value> {
    let c = st.store.control().await?;
    Ok(json!({"paused": c.paused, "updated_at": c.updated_at, "updated_by": c.updated_by}))
}

pub async fn control(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    Ok(axum::Json(control_view(&st).await?))
}

pub async fn pause(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Operate)?;
    st.store.set_paused(true, &caller.actor()).await?;
    Ok(axum::Json(control_view(&st).await?))
}

pub async fn resume(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Operate)?;
    st.store.set_paused(false, &caller.actor()).await?;
    Ok(axum::Json(control_view(&st).await?))
}

/// The daily health check: one verdict and the problems behind it.
pub async fn health(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let h = st
        .store
        .health(
            st.config.stuck_task_after.as_secs_f64(),
            &[crate::app::SWEEPER_LEASE, crate::app::SWEEPER_LEASE_RECORD],
        )
        .await?;
    let stuck_orders = st
        .store
        .stuck_orders(st.config.stuck_order_after.as_secs_f64(), 100)
        .await?;
    let mut tasks_by_status: BTreeMap<String, i64> = TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    for (s, n) in st.store.task_counts().await? {
        tasks_by_status.insert(s, n);
    }
    let mut problems = Vec::new();
    if h.invariant_violations_24h > 0 {
        problems.push(format!(
            "{} invariant violations in the last 24 h (run `tally invariants --all`)",
            h.invariant_violations_24h
        ));
    }
    if h.orphans > 0 {
        problems.push(format!(
            "{} orphaned tasks (lease expired, not yet recovered; is a sweeper running?)",
            h.orphans
        ));
    }
    if h.stuck_tasks > 10 {
        problems.push(format!(
            "{} tasks executing for over {} s",
            h.stuck_tasks,
            st.config.stuck_task_after.as_secs()
        ));
    }
    if h.dead_letter > 50 {
        problems.push(format!(
            "{} tasks in the dead-letter queue (over 50)",
            h.dead_letter
        ));
    }
    if !stuck_orders.is_empty() {
        problems.push(format!(
            "{} orders PROCESSING for over {:.1} h",
            stuck_orders.len(),
            st.config.stuck_order_after.as_secs_f64() / 3600.0
        ));
    }
    if h.live_workers == 0 {
        problems.push("no live Tally process is registered".into());
    }
    if h.leader.is_none() {
        problems.push("no sweeper holds the leader lease (orphans are not being recovered)".into());
    }
    if h.paused {
        problems.push("processing is globally paused (`tally resume`)".into());
    }
    Ok(axum::Json(json!({
        "verdict": if problems.is_empty() { "healthy" } else { "unhealthy" },
        "problems": problems, "tasks_by_status": tasks_by_status, "stuck_tasks": h.stuck_tasks,
        "orphans": h.orphans, "dead_letter": h.dead_letter, "failures_24h": h.failures_24h,
        "invariant_violations_24h": h.invariant_violations_24h, "live_workers": h.live_workers,
        "paused": h.paused, "leader": h.leader.map(|l| l.to_string()),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveRequest {
    older_than_days: i64,
}

pub async fn archive(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<ArchiveRequest>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    if !(1..=3650).contains(&req.older_than_days) {
        return Err(ApiError::invalid(
            "older_than_days",
            "must be between 1 and 3650",
        ));
    }
    let r = st
        .store
        .archive_finished(req.older_than_days as i32, 10_000)
        .await?;
    let body = json!({"tasks_archived": r.tasks_archived, "transitions_archived": r.transitions_archived,
                      "orders_archived": r.orders_archived, "checks_pruned": r.checks_pruned});
    let mut resp = axum::Json(body.clone()).into_response();
    resp.extensions_mut().insert(AuditDetail(body));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn audit(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Admin)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 500"));
    }
    let before = match &q.cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "is not a cursor this API returned"))?,
        ),
    };
    let rows = st.store.list_audit(before, limit).await?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    let entries: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({"id": r.id, "occurred_at": r.occurred_at, "key_id": r.key_id, "key_name": r.key_name,
                   "action": r.action, "target": r.target, "status": r.status, "detail": r.detail})
        })
        .collect();
    Ok(axum::Json(json!({"entries": entries, "next_cursor": next})))
}
