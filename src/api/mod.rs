//! The HTTP API (role `api`): orders, the runbook's admin endpoints, kinds, API keys,
//! `/livez`, `/readyz` and the OpenAPI document. See `openapi/openapi.json`.
//!
//! - Every `/api` route except the document needs `X-Api-Key` (see [`auth`]).
//! - Errors are `{"error": {"code", "message", "field"?}}`; client input never causes a 5xx.
//! - Bodies are limited to 64 KiB.
//! - Store calls that open a transaction run in spawned tasks (see `store::ops`), so a
//!   client that disconnects cannot cancel them half-way.

mod admin;
pub mod auth;
mod cache;
pub mod error;
mod manage;
mod orders;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::intake::batcher::{Batcher, BatcherConfig};
use crate::kinds::KindDefaults;
use crate::shutdown::Shutdown;
use crate::store::Store;
use error::ApiError;

/// The OpenAPI document, served at `/api/openapi.json` (and committed in the repository).
pub const OPENAPI: &str = include_str!("../../openapi/openapi.json");

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// API settings (validated by `config`).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    /// Bootstrap admin key (`TALLY_ADMIN_API_KEY`).
    pub admin_key: Option<String>,
    /// Whether `/api/admin/testing/enable` may switch fault injection on.
    pub fault_injection_allowed: bool,
    /// Hosts order callbacks may name; empty: any.
    pub callback_allowed_hosts: Vec<String>,
    /// Orders of at most this many tasks are fanned out at intake (`TALLY_INLINE_FANOUT_MAX_TASKS`).
    pub inline_fanout_max_tasks: u32,
    /// How long a looked-up API key and a kind's settings are trusted (`TALLY_API_KEY_CACHE_SEC`).
    pub cache_ttl: Duration,
    /// Most orders in one intake statement (`TALLY_INTAKE_BATCH_MAX`).
    pub intake_batch_max: usize,
    /// Kinds created without a policy field get these.
    pub kind_defaults: KindDefaults,
    /// An EXECUTING task older than this counts as stuck in the health check.
    pub stuck_task_after: Duration,
    /// An order PROCESSING longer than this is reported by the health check.
    pub stuck_order_after: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_key: None,
            fault_injection_allowed: false,
            callback_allowed_hosts: Vec::new(),
            inline_fanout_max_tasks: crate::intake::INLINE_FANOUT_MAX_TASKS,
            cache_ttl: Duration::from_secs(5),
            intake_batch_max: crate::intake::batcher::BatcherConfig::default().batch_max,
            kind_defaults: KindDefaults::default(),
            stuck_task_after: Duration::from_secs(300),
            stuck_order_after: Duration::from_secs(2 * 3600),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<ApiConfig>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Concurrent intake requests share statements through it.
    pub intake: Batcher,
    /// API keys looked up in the last `cache_ttl`.
    pub keys: Arc<cache::TtlCache<auth::Caller>>,
    /// Kinds read in the last `cache_ttl` (intake reads a kind's defaults and allow-list).
    pub kinds: Arc<cache::TtlCache<crate::store::KindRow>>,
}

impl AppState {
    pub fn new(store: Store, config: ApiConfig, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let intake = Batcher::start(
            store.clone(),
            BatcherConfig {
                batch_max: config.intake_batch_max.max(1),
                ..BatcherConfig::default()
            },
            true,
        );
        let ttl = config.cache_ttl;
        Self {
            store,
            config: Arc::new(config),
            metrics,
            intake,
            keys: Arc::new(cache::TtlCache::new(ttl)),
            kinds: Arc::new(cache::TtlCache::new(ttl)),
        }
    }
}

/// Every route.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/orders", post(orders::create).get(orders::list))
        .route(
            "/api/orders/batch",
            post(orders::create_batch).layer(DefaultBodyLimit::max(orders::BATCH_BODY_LIMIT)),
        )
        .route("/api/orders/{id}", get(orders::get_one))
        .route("/api/orders/{id}/progress", get(orders::progress))
        .route("/api/orders/{id}/cancel", post(orders::cancel))
        .route("/api/orders/{id}/pause", post(orders::pause))
        .route("/api/orders/{id}/resume", post(orders::resume))
        .route("/api/orders/{id}/retry", post(orders::retry))
        .route("/api/orders/{id}/drain-dlq", post(orders::drain_dlq))
        .route(
            "/api/orders/{id}/force-complete",
            post(orders::force_complete),
        )
        .route("/api/orders/{id}/callbacks", get(orders::callbacks))
        .route("/api/tasks/{id}/trace", get(orders::trace))
        .route("/api/admin/worker/status", get(admin::worker_status))
        .route("/api/admin/workers", get(admin::workers))
        .route(
            "/api/admin/invariants/orders/{id}",
            get(admin::invariants_order),
        )
        .route("/api/admin/invariants/all", get(admin::invariants_all))
        .route("/api/admin/invariants/orphans", get(admin::orphans))
        .route("/api/admin/capacity", get(admin::capacity))
        .route(
            "/api/admin/orders/{id}/failed-tasks",
            get(admin::failed_tasks),
        )
        .route("/api/admin/orders/{id}/progress", get(orders::progress))
        .route("/api/admin/testing/status", get(admin::testing_status))
        .route("/api/admin/testing/enable", post(admin::testing_enable))
        .route("/api/admin/testing/disable", post(admin::testing_disable))
        .route("/api/admin/control", get(admin::control))
        .route("/api/admin/pause", post(admin::pause))
        .route("/api/admin/resume", post(admin::resume))
        .route("/api/admin/health", get(admin::health))
        .route("/api/admin/archive", post(admin::archive))
        .route("/api/admin/audit", get(admin::audit))
        .route("/api/admin/kinds", get(manage::list_kinds))
        .route(
            "/api/admin/kinds/{name}",
            get(manage::get_kind)
                .put(manage::put_kind)
                .delete(manage::delete_kind),
        )
        .route("/api/admin/kinds/{name}/pause", post(manage::pause_kind))
        .route("/api/admin/kinds/{name}/resume", post(manage::resume_kind))
        .route(
            "/api/admin/keys",
            get(manage::list_keys).post(manage::create_key),
        )
        .route("/api/admin/keys/{id}/revoke", post(manage::revoke_key))
        .route("/api/admin/keys/{id}/rotate", post(manage::rotate_key))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/api/openapi.json", get(openapi))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .with_state(state)
}

/// Installs the bootstrap key, binds, and serves until `shutdown`.
pub async fn serve(store: Store, config: ApiConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| anyhow::anyhow!("TALLY_API_ADDR {}: cannot listen: {e}", config.addr))?;
    serve_on(listener, store, config, shutdown).await
}

/// Like [`serve`] on a bound listener (tests bind port 0), with metrics of its own.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    store: Store,
    config: ApiConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    serve_with_metrics(listener, store, config, Default::default(), shutdown).await
}

/// Serves on `listener`, recording into `metrics`.
pub async fn serve_with_metrics(
    listener: tokio::net::TcpListener,
    store: Store,
    config: ApiConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    if let Some(key) = config.admin_key.clone() {
        // In the background: the database may not be there (or migrated) yet, and /livez
        // and /readyz must answer meanwhile.
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let digest = crate::http::sha256_hex(key.as_bytes());
            while let Err(e) = store
                .ensure_bootstrap_key(&digest, &auth::prefix_of(&key))
                .await
            {
                tracing::debug!(error = %e, "installing the bootstrap admin key failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait() => return,
                }
            }
        });
    }
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    let app = router(AppState::new(store, config, metrics));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}

/// Counts every request by route template (never the raw path: ids would make the label
/// set unbounded), method and status, and times it.
async fn measure(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.http_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    m.http_requests_total
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    resp
}

/// How long a request waits for a read it needs before anything else (its key, its kind):
/// with the database out of reach, the API answers 503 within about this, not after the
/// pool's whole deadline.
pub const LOOKUP_DEADLINE: Duration = Duration::from_millis(1500);

/// Bounds a store read by [`LOOKUP_DEADLINE`] (a read only: dropping it half-way is harmless).
pub(crate) async fn bounded<T>(
    read: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
) -> Result<T, crate::store::StoreError> {
    tokio::time::timeout(LOOKUP_DEADLINE, read)
        .await
        .unwrap_or(Err(crate::store::StoreError::Timeout {
            op: "reading what the request needs",
            timeout: LOOKUP_DEADLINE,
        }))
}

/// `/livez`: the process answers; never touches the database. Also served on the metrics port.
pub async fn livez() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Answers within [`READY_DEADLINE`] whatever the database does (probes have short timeouts).
const READY_DEADLINE: Duration = Duration::from_secs(2);

async fn readyz(State(state): State<AppState>) -> Response {
    readiness(&state.store).await
}

/// `/readyz`: 200 when the database answers and is migrated, else 503 naming why. Also
/// served on the metrics port, so pods without the API role can be probed.
pub async fn readiness(store: &Store) -> Response {
    let checked = tokio::time::timeout(READY_DEADLINE, store.migrations_current()).await;
    let checked = checked.unwrap_or_else(|_| {
        Err(crate::store::StoreError::Timeout {
            op: "checking readiness",
            timeout: READY_DEADLINE,
        })
    });
    match checked {
        Ok(true) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        Ok(false) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "migrations are not applied yet (run `tally migrate`)",
        )
        .into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the database is unreachable: {e}"),
        )
        .into_response(),
    }
}

async fn openapi() -> Response {
    ([("content-type", "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /api/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see /api/openapi.json",
    )
}
