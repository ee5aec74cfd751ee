//! API keys: `X-Api-Key`, stored only as SHA-256 digests, scopes read < operate < admin.
//! The middleware resolves the caller (401 when it cannot), handlers ask for the scope they
//! need (403), and every mutating call is audited with the key that made it.

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiResult};
use crate::http::{constant_time_eq, sha256_hex};
use crate::store::NewAudit;

/// What a key may do. Each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Operate,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "operate" => Some(Scope::Operate),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
            Scope::Admin => "admin",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    pub key_name: String,
    pub scope: Scope,
}

impl Caller {
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.scope >= scope {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this call needs a key with scope {:?} or higher; key {:?} has {:?}",
                scope.as_str(),
                self.key_name,
                self.scope.as_str()
            )))
        }
    }

    /// How this caller appears in audit rows and `actor_id`s.
    pub fn actor(&self) -> String {
        format!("key:{}:{}", self.key_name, self.key_id)
    }
}

/// Extra detail a handler attaches to its response for the audit row.
#[derive(Debug, Clone)]
pub struct AuditDetail(pub serde_json::Value);

/// Attached by a handler that saw to its own audit: its statement wrote the audit rows
/// (intake), or it refused before anything reached the database (intake's 503s, which an
/// audit write would only make worse). The middleware then writes none.
#[derive(Debug, Clone, Copy)]
pub struct AuditHandled;

/// Key secrets are `tly_` + 64 hex characters; any printable ASCII of 16 to 256 characters
/// is accepted (a bootstrap key from a Secret need not follow the format).
pub fn well_formed(key: &str) -> bool {
    (16..=256).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// A new random secret and its listing prefix.
pub fn new_secret() -> (String, String) {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    let secret = format!("tly_{}", hex::encode(bytes));
    let prefix = secret[..12].to_owned();
    (secret, prefix)
}

pub fn prefix_of(secret: &str) -> String {
    secret.chars().take(8).collect()
}

/// Mutating routes whose handlers write their own audit rows, in their own statement
/// (intake: one commit per batch of requests, not two per request).
const SELF_AUDITED: [&str; 2] = ["/api/orders", "/api/orders/batch"];

/// Resolves `X-Api-Key` into a [`Caller`] and audits mutating calls.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get("x-api-key")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let caller = match resolve(&state, presented).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(caller.clone());
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !mutating {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(req.uri().path(), |m| m.as_str())
        .to_owned();
    let action = format!("{} {route}", req.method());
    let target = req.uri().path().to_owned();
    let row = |status: i32, detail: Option<serde_json::Value>| NewAudit {
        key_id: Some(caller.key_id),
        key_name: Some(caller.key_name.clone()),
        action: action.clone(),
        target: Some(target.clone()),
        status,
        detail,
    };
    if *req.method() == Method::POST && SELF_AUDITED.contains(&route.as_str()) {
        let resp = next.run(req).await;
        if resp.extensions().get::<AuditHandled>().is_some() {
            return resp;
        }
        // Refused before its statement (scope, validation): nothing changed, but the attempt
        // is on record as before.
        let audit = row(i32::from(resp.status().as_u16()), detail_of(&resp));
        let store = state.store.clone();
        if let Err(e) = detached(async move { store.write_audit(&audit).await }).await {
            tracing::error!(error = %e, "writing the admin audit row of a refused call failed");
        }
        return resp;
    }
    // The row is written before the call runs: a mutation whose audit row cannot be written
    // does not happen. Its outcome is filled in afterwards (status 0 until then).
    let audit = row(0, None);
    let store = state.store.clone();
    let audit_id = match detached(async move { super::bounded(store.begin_audit(&audit)).await })
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, action = %route, "writing the admin audit row failed; the call was refused");
            return ApiError::from(e).into_response();
        }
    };
    let resp = next.run(req).await;
    let (status, detail) = (i32::from(resp.status().as_u16()), detail_of(&resp));
    let store = state.store.clone();
    let finished =
        detached(async move { store.finish_audit(audit_id, status, detail.as_ref()).await });
    if let Err(e) = finished.await {
        tracing::error!(error = %e, audit.id = audit_id, "recording the outcome in the admin audit row failed (it stays at status 0)");
    }
    resp
}

fn detail_of(resp: &Response) -> Option<serde_json::Value> {
    resp.extensions().get::<AuditDetail>().map(|d| d.0.clone())
}

/// Runs a store write in a task of its own, so a disconnecting client cannot cancel it
/// half-way; a panic of that task fails like the write.
async fn detached<T: Send + 'static>(
    write: impl std::future::Future<Output = Result<T, crate::store::StoreError>> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    tokio::spawn(write).await.unwrap_or_else(|e| {
        Err(crate::store::StoreError::Invalid {
            op: "writing the admin audit",
            message: e.to_string(),
        })
    })
}

async fn resolve(state: &AppState, presented: Option<String>) -> ApiResult<Caller> {
    let Some(key) = presented else {
        return Err(ApiError::unauthorized(
            "send an API key in the X-Api-Key header",
        ));
    };
    if !well_formed(&key) {
        return Err(ApiError::unauthorized("the X-Api-Key header is malformed"));
    }
    let digest = sha256_hex(key.as_bytes());
    if let Some(caller) = state.keys.get(&digest) {
        return Ok(caller);
    }
    let row = super::bounded(state.store.key_by_digest(&digest)).await?;
    let Some(row) = row.filter(|r| constant_time_eq(r.digest.as_bytes(), digest.as_bytes())) else {
        return Err(ApiError::unauthorized("unknown API key"));
    };
    if row.revoked_at.is_some() {
        return Err(ApiError::unauthorized("this API key was revoked"));
    }
    let scope = Scope::parse(&row.scope)
        .ok_or_else(|| ApiError::unauthorized("this API key has no valid scope"))?;
    let caller = Caller {
        key_id: row.id,
        key_name: row.name,
        scope,
    };
    state.keys.put(&digest, caller.clone());
    Ok(caller)
}
