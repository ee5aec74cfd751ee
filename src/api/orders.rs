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
use super::auth::{AuditDetail, AuditHandled, Caller, Scope};
use super::error::{ApiError, ApiResult, Json, Path, Query};
use crate::domain::{OrderStatus, TaskStatus};
use crate::intake::batcher::BatchError;
use crate::intake::{IntakeDefaults, OrderRequest, host_allowed, parse_http_url, prepare};
use crate::store::{
    Accepted, ActionOutcome, IntakeAudit, IntakeItem, IntakeOutcome, NewOrder, OrderAction,
    OrderRow, TaskRow,
};

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
    let order = check(&st, &req, key, trace.as_deref()).await?;
    let item = IntakeItem {
        order,
        audit: Some(intake_audit(
            &caller,
            "/api/orders",
            correlation_id(&headers, trace.as_deref()),
        )),
    };
    let mut resp = match st
        .intake
        .submit(item)
        .await
        .map_err(batch_error)
        .and_then(answer)
    {
        Ok((order, replayed)) => {
            tracing::Span::current().record("order.id", tracing::field::display(order.id));
            let id = order.id;
            let mut resp = (StatusCode::CREATED, axum::Json(order)).into_response();
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
            resp
        }
        Err(e) => e.into_response(),
    };
    // The intake statement wrote this request's audit row (created, replayed or refused),
    // or the statement failed and nothing was written.
    resp.extensions_mut().insert(AuditHandled);
    Ok(resp)
}

/// The API's view of one intake answer: the order and whether it was a replay, or the
/// error the statement decided (a reused key, a kind deleted meanwhile).
fn answer(a: Accepted) -> Result<(OrderView, bool), ApiError> {
    let replayed = match a.outcome {
        IntakeOutcome::Created(_) => false,
        IntakeOutcome::Replayed(_) => true,
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
        IntakeOutcome::UnknownKind => {
            return Err(ApiError::invalid(
                "kind",
                "this kind does not exist (any more)",
            ));
        }
    };
    let order = a
        .order
        .ok_or_else(|| ApiError::not_found("the order vanished"))?;
    Ok((OrderView::from(order), replayed))
}

/// A failed intake statement as the client sees it: 503 with Retry-After when the database
/// is out of reach or intake is saturated (the request can be sent again; with its
/// Idempotency-Key that is always safe), 500 only for a fault of ours.
fn batch_error(e: BatchError) -> ApiError {
    let unavailable = |msg: &str| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            msg.to_owned(),
        )
    };
    match e {
        BatchError::Overloaded => unavailable("intake is saturated; retry shortly"),
        BatchError::Stopped => unavailable("intake is shutting down; retry on another replica"),
        BatchError::Store(e) if crate::intake::batcher::unavailable(&e) => {
            unavailable("the database is unavailable; retry shortly")
        }
        BatchError::Store(e) => {
            tracing::error!(error = %e, "accepting an order failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log",
            )
        }
    }
}

/// Who asks, for the audit row the intake statement writes.
fn intake_audit(caller: &Caller, path: &str, correlation_id: Option<String>) -> IntakeAudit {
    IntakeAudit {
        key_id: caller.key_id,
        key_name: caller.key_name.clone(),
        action: format!("POST {path}"),
        target: path.to_owned(),
        correlation_id,
    }
}

/// The caller's `X-Request-Id` (up to 200 printable characters), else the trace id.
fn correlation_id(headers: &HeaderMap, traceparent: Option<&str>) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .or_else(|| traceparent.and_then(|t| t.get(3..35)).map(str::to_owned))
}

/// The kind of an order: read through the API's cache.
async fn kind(st: &AppState, name: &str) -> ApiResult<crate::store::KindRow> {
    if let Some(k) = st.kinds.get(name) {
        return Ok(k);
    }
    if let Some(k) = super::bounded(st.store.get_kind(name)).await? {
        st.kinds.put(name, k.clone());
        return Ok(k);
    }
    let known: Vec<String> = st
        .store
        .list_kinds()
        .await?
        .into_iter()
        .map(|k| k.name)
        .collect();
    Err(ApiError::invalid(
        "kind",
        format!("unknown kind {:?}; known kinds: {}", name, known.join(", ")),
    ))
}

/// Checks one order request against its kind and the API's settings, and plans it.
async fn check(
    st: &AppState,
    req: &OrderRequest,
    key: Option<&str>,
    trace: Option<&str>,
) -> ApiResult<NewOrder> {
    if !crate::kinds::valid_name(&req.kind) {
        return Err(ApiError::invalid(
            "kind",
            "must be 1-63 characters: a lower-case letter, then lower-case letters, digits, '_' or '-'",
        ));
    }
    let kind = kind(st, &req.kind).await?;
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
    Ok(prepare(req, defaults, key, trace)?)
}

/// Most orders in one `POST /api/orders/batch`.
pub const BATCH_ORDERS_MAX: usize = 1000;
/// Body limit of `POST /api/orders/batch` (1,000 orders of up to about 2 KiB each).
pub const BATCH_BODY_LIMIT: usize = 2 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Each an order as `POST /api/orders` takes it, plus an optional `idempotency_key`.
    orders: Vec<serde_json::Value>,
}

/// One item's answer in a batch.
#[derive(Debug, Serialize)]
pub struct BatchItemResult {
    pub index: usize,
    /// The status `POST /api/orders` would have answered for this order alone.
    pub status: u16,
    /// `created`, `replayed` or `error`.
    pub outcome: &'static str,
    /// The order's id (created or replayed); `GET /api/orders/{id}` shows it whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct BatchResponse {
    pub created: usize,
    pub replayed: usize,
    pub failed: usize,
    pub results: Vec<BatchItemResult>,
}

/// `POST /api/orders/batch`: up to [`BATCH_ORDERS_MAX`] orders in one call and one
/// statement, each with its own idempotency key and its own result. An item that is
/// invalid fails alone (its result names the item and the field); the call itself fails
/// only when nothing could be written (503, safe to send again because of the keys).
pub async fn create_batch(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Json(body): Json<BatchRequest>,
) -> ApiResult<Response> {
    caller.require(Scope::Operate)?;
    if body.orders.is_empty() || body.orders.len() > BATCH_ORDERS_MAX {
        return Err(ApiError::invalid(
            "orders",
            format!("must hold 1 to {BATCH_ORDERS_MAX} orders"),
        ));
    }
    let trace = crate::telemetry::traceparent(&tracing::Span::current());
    let correlation = correlation_id(&headers, trace.as_deref());
    let mut results: Vec<Option<BatchItemResult>> = Vec::with_capacity(body.orders.len());
    let mut items = Vec::with_capacity(body.orders.len());
    let mut positions = Vec::with_capacity(body.orders.len());
    for (index, raw) in body.orders.into_iter().enumerate() {
        match batch_item(&st, raw, trace.as_deref()).await {
            Ok(order) => {
                positions.push(index);
                items.push(IntakeItem {
                    order,
                    audit: Some(intake_audit(
                        &caller,
                        "/api/orders/batch",
                        correlation.clone(),
                    )),
                });
                results.push(None);
            }
            Err(e) => results.push(Some(item_error(index, e))),
        }
    }
    let answers = crate::intake::batcher::accept(&st.store, &items, true).await;
    // Nothing written at all because the database is out of reach: the call fails as a whole.
    if !answers.is_empty()
        && answers.iter().all(
            |a| matches!(a, Err(BatchError::Store(e)) if crate::intake::batcher::unavailable(e)),
        )
    {
        let mut resp = batch_error(
            answers
                .into_iter()
                .next()
                .and_then(Result::err)
                .expect("an error"),
        )
        .into_response();
        resp.extensions_mut().insert(AuditHandled);
        return Ok(resp);
    }
    for (index, answer) in positions.into_iter().zip(answers) {
        let r = match answer.map_err(batch_error).and_then(self::answer) {
            Ok((order, replayed)) => BatchItemResult {
                index,
                status: 201,
                outcome: if replayed { "replayed" } else { "created" },
                id: Some(order.id),
                error: None,
            },
            Err(e) => item_error(index, e),
        };
        results[index] = Some(r);
    }
    let results: Vec<BatchItemResult> = results.into_iter().flatten().collect();
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    let body = BatchResponse {
        created: count("created"),
        replayed: count("replayed"),
        failed: count("error"),
        results,
    };
    let mut resp = axum::Json(body).into_response();
    resp.extensions_mut().insert(AuditHandled);
    Ok(resp)
}

/// Parses and checks one batch item: an order plus its `idempotency_key`.
async fn batch_item(
    st: &AppState,
    mut raw: serde_json::Value,
    trace: Option<&str>,
) -> ApiResult<NewOrder> {
    let key = match raw.as_object_mut().map(|o| o.remove("idempotency_key")) {
        None => return Err(ApiError::invalid("order", "must be a JSON object")),
        Some(None) | Some(Some(serde_json::Value::Null)) => None,
        Some(Some(serde_json::Value::String(k))) => Some(k),
        Some(Some(_)) => {
            return Err(ApiError::invalid("idempotency_key", "must be a string"));
        }
    };
    let req: OrderRequest = serde_json::from_value(raw).map_err(|e| {
        let text = e.to_string();
        let field = super::error::field_from_serde(&text).unwrap_or_else(|| "order".into());
        ApiError::invalid(field, text)
    })?;
    check(st, &req, key.as_deref(), trace).await
}

fn item_error(index: usize, e: ApiError) -> BatchItemResult {
    let mut error = json!({"code": e.code, "message": e.message});
    if let Some(f) = e.field {
        // A batch item carries its key as a field, not a header.
        let f = if f == "Idempotency-Key" {
            "idempotency_key".to_owned()
        } else {
            f
        };
        error["field"] = json!(f);
    }
    BatchItemResult {
        index,
        status: e.status.as_u16(),
        outcome: "error",
        id: None,
        error: Some(error),
    }
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
