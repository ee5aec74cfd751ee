//! Kinds and API keys (`/api/admin/kinds…`, `/api/admin/keys…`).

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::{AuditDetail, Caller, Scope, new_secret};
use super::error::{ApiError, ApiResult, Json, Path};
use crate::http::sha256_hex;
use crate::kinds::{KindSpec, KindView, valid_name};
use crate::store::{ApiKeyRow, DeleteKind};

fn check_name(name: &str) -> ApiResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            "must be 1-63 characters: a lower-case letter, then lower-case letters, digits, '_' or '-'",
        ))
    }
}

pub async fn list_kinds(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Read)?;
    let kinds: Vec<KindView> = st
        .store
        .list_kinds()
        .await?
        .iter()
        .map(KindView::from)
        .collect();
    Ok(axum::Json(json!({ "kinds": kinds })))
}

pub async fn get_kind(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<KindView>> {
    caller.require(Scope::Read)?;
    check_name(&name)?;
    let k = st
        .store
        .get_kind(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no kind {name:?}")))?;
    Ok(axum::Json(KindView::from(&k)))
}

pub async fn put_kind(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(spec): Json<KindSpec>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    check_name(&name)?;
    let row = spec.to_row(&name, &st.config.kind_defaults)?;
    let saved = st.store.put_kind(&row).await?;
    st.kinds.forget(|k| k.name == name);
    let view = KindView::from(&saved);
    let mut resp = axum::Json(&view).into_response();
    resp.extensions_mut()
        .insert(AuditDetail(json!({"kind": name, "handler": view.handler})));
    Ok(resp)
}

pub async fn delete_kind(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    check_name(&name)?;
    let deleted = st.store.delete_kind(&name).await?;
    st.kinds.forget(|k| k.name == name);
    match deleted {
        DeleteKind::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        DeleteKind::NotFound => Err(ApiError::not_found(format!("no kind {name:?}"))),
        DeleteKind::InUse(n) => Err(ApiError::conflict(format!(
            "kind {name:?} has {n} unfinished orders; pause it, or cancel or finish them first"
        ))),
    }
}

async fn set_kind_paused(
    st: AppState,
    caller: Caller,
    name: String,
    paused: bool,
) -> ApiResult<axum::Json<KindView>> {
    caller.require(Scope::Operate)?;
    check_name(&name)?;
    let k = st
        .store
        .set_kind_paused(&name, paused)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no kind {name:?}")))?;
    st.kinds.forget(|k| k.name == name);
    Ok(axum::Json(KindView::from(&k)))
}

pub async fn pause_kind(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<KindView>> {
    set_kind_paused(st, c, name, true).await
}

pub async fn resume_kind(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<KindView>> {
    set_kind_paused(st, c, name, false).await
}

fn key_view(k: &ApiKeyRow) -> Value {
    json!({"id": k.id, "name": k.name, "scope": k.scope, "prefix": k.prefix, "created_at": k.created_at,
           "revoked_at": k.revoked_at, "last_used_at": k.last_used_at})
}

pub async fn list_keys(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<axum::Json<Value>> {
    caller.require(Scope::Admin)?;
    let keys: Vec<Value> = st.store.list_keys().await?.iter().map(key_view).collect();
    Ok(axum::Json(json!({ "keys": keys })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: String,
    scope: String,
}

pub async fn create_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<NewKey>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    if req.name.trim().is_empty() || req.name.len() > 100 || req.name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "name",
            "must be 1 to 100 printable characters",
        ));
    }
    if super::auth::Scope::parse(&req.scope).is_none() {
        return Err(ApiError::invalid(
            "scope",
            "must be \"read\", \"operate\" or \"admin\"",
        ));
    }
    let (secret, prefix) = new_secret();
    let row = st
        .store
        .create_key(
            &req.name,
            &req.scope,
            &sha256_hex(secret.as_bytes()),
            &prefix,
            Some(caller.key_id),
        )
        .await?;
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(json!({"key": key_view(&row), "secret": secret})),
    )
        .into_response();
    resp.extensions_mut().insert(AuditDetail(
        json!({"key_id": row.id, "name": row.name, "scope": row.scope}),
    ));
    Ok(resp)
}

pub async fn revoke_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    let row = st
        .store
        .revoke_key(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no key {id}")))?;
    // Refused here at once; other API processes within TALLY_API_KEY_CACHE_SEC.
    st.keys.forget(|c| c.key_id == id);
    let mut resp = axum::Json(key_view(&row)).into_response();
    resp.extensions_mut()
        .insert(AuditDetail(json!({"key_id": id})));
    Ok(resp)
}

pub async fn rotate_key(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<Uuid>,
) -> ApiResult<Response> {
    caller.require(Scope::Admin)?;
    let (secret, prefix) = new_secret();
    let row = st
        .store
        .rotate_key(
            id,
            &sha256_hex(secret.as_bytes()),
            &prefix,
            Some(caller.key_id),
        )
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("no live key {id} (unknown or already revoked)"))
        })?;
    st.keys.forget(|c| c.key_id == id);
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(json!({"key": key_view(&row), "secret": secret})),
    )
        .into_response();
    resp.extensions_mut()
        .insert(AuditDetail(json!({"old_key_id": id, "new_key_id": row.id})));
    Ok(resp)
}
