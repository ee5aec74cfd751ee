//! `/api/orders…` and `/api/tasks/{id}/trace`.

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::auth::{AuditDetail, Caller, Scope};
use super::error::{ApiError, ApiResult, Json, Path, Query};
use crate::domain::{OrderStatus, TaskStatus};
use crate::intake::{IntakeDefaults, OrderRequest, host_allowed, parse_http_url, prepare};
use crate::store::{ActionOutcome, IntakeOutcome, OrderAction, OrderRow, TaskRow};

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderView {
    pub id: Uuid,
    pub kind: String,
    pub target: String,
    pub quantity: i64,
    pub chunk_size: i32,
    pub task_count: i32,
    pub priority: i16,
    pub max_attempts: i32,
    pub status: String,
    pub delivered: i64,
    pub failed_permanent_units: i64,
    pub cancelled_units: i64,
    pub outstanding_units: i64,
    /// Units not delivered, once the order is PARTIAL or CANCELLED.
    pub shortfall: Option<i64>,
    pub needs_attention: bool,
    pub paused: bool,
    pub callback_url: Option<String>,
    pub callback_format: String,
    pub idempotency_key: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub generated_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<OrderRow> for OrderView {
    fn from(o: OrderRow) -> Self {
        let outstanding = o.quantity - o.delivered - o.failed_permanent_units - o.cancelled_units;
        let closed = matches!(o.status.as_str(), "COMPLETED" | "PARTIAL" | "CANCELLED");
        let shortfall =
            matches!(o.status.as_str(), "PARTIAL" | "CANCELLED").then(|| o.quantity - o.delivered);
        OrderView {
            id: o.id,
            kind: o.kind,
            target: o.target,
            quantity: o.quantity,
            chunk_size: o.chunk_size,
            task_count: o.task_count,
            priority: o.priority,
            max_attempts: o.max_attempts,
            status: o.status,
            delivered: o.delivered,
            failed_permanent_units: o.failed_permanent_units,
            cancelled_units: o.cancelled_units,
            outstanding_units: outstanding,
            shortfall,
            needs_attention: o.needs_attention,
            // A closed order held only until its last attempt ends is not "paused".
            paused: o.paused && !closed,
            callback_url: o.callback_url,
            callback_format: o.callback_format,
            idempotency_key: o.client_key,
            version: o.version,
            created_at: o.created_at,
            updated_at: o.updated_at,
            generated_at: o.generated_at,
            finished_at: o.finished_at,
        }
    }
}

/// A task as the API shows it: the row plus its idempotency key.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub task: TaskRow,
    pub idempotency_key: String,
}

impl From<TaskRow> for TaskView {
    fn from(task: TaskRow) -> Self {
        TaskView {
            idempotency_key: format!("{}:{}", task.order_id, task.seq),
            task,
        }
    }
}

/// A W3C traceparent: `00-<32 hex>-<16 hex>-<2 hex>`.
fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| {
            p.len() == *n
                && p.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// `POST /api/orders`, in an `order.intake` span: a child of the caller's `traceparent`,
/// and the context stored with the order, so that its task attempts continue the trace.
pub async fn create(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Json(req): Json<OrderRequest>,
) -> ApiResult<Response> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "order.intake",
        order.kind = %req.kind,
        order.quantity = req.quantity,
        order.id = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    if let Some(tp) = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_traceparent(v))
    {
        crate::telemetry::set_parent(&span, tp);
    }
    crate::telemetry::record_trace_id(&span);
    create_in_span(st, caller, headers, req)
        .instrument(span)
        .await
}

async fn create_in_span(
    st: AppState,
    caller: Caller,
    headers: HeaderMap,
    req: OrderRequest,
) -> ApiResult<Response> {
    caller.require(Scope::Operate)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 printable ASCII characters",
            )
        })?),
    };
    // This span's context when traces are exported, else the caller's header as it came.
    let trace = crate::telemetry::traceparent(&tracing::Span::current()).or_else(|| {
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_traceparent(v))
            .map(str::to_owned)
    });
    if !crate::kinds::valid_name(&req.kind) {
        return Err(ApiError::invalid(
            "kind",
            "must be 1-63 characters: a lower-case letter, then lower-case letters, digits, '_' or '-'",
        ));
    }
    let Some(kind) = st.store.get_kind(&req.kind).await? else {
        let known: Vec<String> = st
            .store
            .list_kinds()
            .await?
            .into_iter()
            .map(|k| k.name)
            .collect();
        return Err(ApiError::invalid(
            "kind",
            format!(
                "unknown kind {:?}; known kinds: {}",
                req.kind,
                known.join(", ")
            ),
        ));
    };
    // A webhook kind without a fixed URL posts to each order's target: the target must be
    // a URL on the kind's allow-list (no SSRF through order targets).
    if let Some(w) = kind
        .webhook
        .clone()
        .and_then(|w| serde_json::from_value::<crate::handler::WebhookSettings>(w).ok())
        && w.url.is_none()
    {
        let url = parse_http_url("target", &req.target)?;
        if !host_allowed(&url, &w.allowed_hosts) {
            return Err(ApiError::invalid(
                "target",
                format!(
                    "host {:?} is not on kind {:?}'s allow-list",
                    url.host_str().unwrap_or(""),
                    kind.name
                ),
            ));
        }
    }
    if let Some(cb) = &req.callback_url {
        let url = parse_http_url("callback_url", cb)?;
        if !st.config.callback_allowed_hosts.is_empty()
            && !host_allowed(&url, &st.config.callback_allowed_hosts)
        {
            return Err(ApiError::invalid(
                "callback_url",
                "its host is not in TALLY_CALLBACK_ALLOWED_HOSTS",
            ));
        }
    }
    let defaults = IntakeDefaults {
        chunk_size: kind.default_chunk_size.max(1) as u32,
        max_attempts: kind.max_attempts.max(1) as u32,
        inline_fanout_max_tasks: st.config.inline_fanout_max_tasks,
    };
    let order = prepare(&req, defaults, key, trace.as_deref())?;
    let (id, replayed) = match st.store.create_order(&order).await? {
        IntakeOutcome::Created(id) => (id, false),
        IntakeOutcome::Replayed(id) => (id, true),
        IntakeOutcome::Conflict(_) => {
            return Err(ApiError {
                field: Some("Idempotency-Key".into()),
                ..ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was already used with a different request body; use a new key",
                )
            });
        }
    };
    tracing::Span::current().record("order.id", tracing::field::display(id));
    let row = st
        .store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found("the order vanished"))?;
    let mut resp = (StatusCode::CREATED, axum::Json(OrderView::from(row))).into_response();
    if replayed {
        resp.headers_mut().insert(
            "idempotent-replayed",
            "true".parse().expect("static header"),
        );
    }
    resp.headers_mut().insert(
        "location",
        format!("/api/orders/{id}")
            .parse()
            .expect("uuid is a valid header"),
    );
    resp.extensions_mut()
        .insert(AuditDetail(json!({"order_id": id, "replayed": replayed})));
    Ok(resp)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OrderList {
    pub orders: Vec<OrderView>,
    pub next_cursor: Option<String>,
}

pub async fn list(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<OrderList>> {
    caller.require(Scope::Read)?;
    if let Some(s) = &q.status
        && OrderStatus::parse(s).is_none()
    {
        return Err(ApiError::invalid(
            "status",
            "must be one of PENDING, PROCESSING, COMPLETED, PARTIAL, CANCELLED",
        ));
    }
    if let Some(k) = &q.kind
        && !crate::kinds::valid_name(k)
    {
        return Err(ApiError::invalid("kind", "is not a valid kind name"));
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 500"));
    }
    let before = match &q.cursor {
        None => None,
        Some(c) => Some(
            Uuid::parse_str(c)
                .map_err(|_| ApiError::invalid("cursor", "is not a cursor this API returned"))?,
        ),
    };
    let rows = st
        .store
        .list_orders(q.status.as_deref(), q.kind.as_deref(), before, limit)
        .await?;
    let next_cursor = (rows.len() == limit as usize)
        .then(|| rows.last().map(|o| o.id.to_string()))
        .flatten();
    Ok(axum::Json(OrderList {
        orders: rows.into_iter().map(OrderView::from).collect(),
        next_cursor,
    }))
}

async fn load(st: &AppState, id: Uuid) -> ApiResult<OrderRow> {
    st.store
        .get_order(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no order {id}")))
}

pub async fn get_one(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<OrderView>> {
    caller.require(Scope::Read)?;
    Ok(axum::Json(load(&st, id).await?.into()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Progress {
    pub order_id: Uuid,
    pub status: String,
    pub expected: i64,
    pub delivered: i64,
    pub failed_permanent: i64,
    pub cancelled: i64,
    pub outstanding: i64,
    pub percent: f64,
    pub tasks_by_status: BTreeMap<String, i64>,
    pub needs_attention: bool,
    pub paused: bool,
    pub units_per_sec: f64,
    pub eta_seconds: Option<f64>,
}

pub async fn progress(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<Progress>> {
    caller.require(Scope::Read)?;
    let o = OrderView::from(load(&st, id).await?);
    let mut tasks_by_status: BTreeMap<String, i64> = TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    for (status, n) in st.store.order_task_counts(id).await? {
        tasks_by_status.insert(status, n);
    }
    // Average rate since the tasks were generated: stable, and exact for a steady fleet.
    // No ETA when nothing is outstanding (finalising, or everything left is dead-lettered).
    let elapsed = o
        .generated_at
        .map(|g| (o.finished_at.unwrap_or_else(Utc::now) - g).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0);
    let units_per_sec = if elapsed > 0.0 {
        o.delivered as f64 / elapsed
    } else {
        0.0
    };
    let eta_seconds = (o.status == "PROCESSING" && units_per_sec > 0.0 && o.outstanding_units > 0)
        .then(|| o.outstanding_units as f64 / units_per_sec);
    Ok(axum::Json(Progress {
        order_id: o.id,
        percent: if o.quantity > 0 {
            100.0 * o.delivered as f64 / o.quantity as f64
        } else {
            0.0
        },
        status: o.status,
        expected: o.quantity,
        delivered: o.delivered,
        failed_permanent: o.failed_permanent_units,
        cancelled: o.cancelled_units,
        outstanding: o.outstanding_units,
        tasks_by_status,
        needs_attention: o.needs_attention,
        paused: o.paused,
        units_per_sec,
        eta_seconds,
    }))
}

async fn act(
    st: &AppState,
    caller: &Caller,
    id: Uuid,
    action: OrderAction,
) -> ApiResult<(u64, i64)> {
    caller.require(Scope::Operate)?;
    match st.store.order_action(id, action, &caller.actor()).await? {
        ActionOutcome::NotFound => Err(ApiError::not_found(format!("no order {id}"))),
        ActionOutcome::Conflict { reason, .. } => Err(ApiError::conflict(reason)),
        ActionOutcome::Busy => Err(ApiError::conflict(
            "the order is locked by a running fan-out of its tasks; retry in a few seconds",
        )),
        ActionOutcome::Done { tasks, units } => Ok((tasks, units)),
    }
}

async fn act_and_show(
    st: AppState,
    caller: Caller,
    id: Uuid,
    action: OrderAction,
) -> ApiResult<Response> {
    let (tasks, units) = act(&st, &caller, id, action).await?;
    let finished = match action {
        OrderAction::Cancel => Some("CANCELLED"),
        OrderAction::ForceComplete => Some("PARTIAL"),
        _ => None,
    };
    if let Some(status) = finished {
        st.metrics
            .orders_finished_total
            .with_label_values(&[status])
            .inc();
    }
    let mut resp = axum::Json(OrderView::from(load(&st, id).await?)).into_response();
    resp.extensions_mut().insert(AuditDetail(
        json!({"order_id": id, "action": action.name(), "tasks": tasks, "units": units}),
    ));
    Ok(resp)
}

pub async fn cancel(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    act_and_show(st, c, id, OrderAction::Cancel).await
}

pub async fn force_complete(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    act_and_show(st, c, id, OrderAction::ForceComplete).await
}

pub async fn pause(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    act_and_show(st, c, id, OrderAction::Pause).await
}

pub async fn resume(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    act_and_show(st, c, id, OrderAction::Resume).await
}

pub async fn retry(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    let (tasks, _) = act(&st, &c, id, OrderAction::RetryNow).await?;
    let mut resp = axum::Json(json!({"order_id": id, "tasks": tasks})).into_response();
    resp.extensions_mut()
        .insert(AuditDetail(json!({"order_id": id, "tasks": tasks})));
    Ok(resp)
}

pub async fn drain_dlq(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    let (tasks, units) = act(&st, &c, id, OrderAction::DrainDlq).await?;
    let body = json!({"order_id": id, "tasks": tasks, "units": units});
    let mut resp = axum::Json(body.clone()).into_response();
    resp.extensions_mut().insert(AuditDetail(body));
    Ok(resp)
}

pub async fn callbacks(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    caller.require(Scope::Read)?;
    load(&st, id).await?;
    let rows = st.store.order_callbacks(id).await?;
    Ok(axum::Json(json!({ "callbacks": rows })))
}

pub async fn trace(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    caller.require(Scope::Read)?;
    let task = st
        .store
        .get_task(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    let transitions = st.store.task_transitions(task.order_id, task.id).await?;
    Ok(axum::Json(
        json!({"task": TaskView::from(task), "transitions": transitions}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent("garbage"));
    }
}
