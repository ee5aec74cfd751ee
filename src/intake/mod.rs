//! Order intake: validate a request field by field, plan its chunks, and hand the store a
//! `NewOrder` (which the schema checks once more).

pub mod batcher;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ChunkPlan, PlanError};
use crate::store::{IntakeOutcome, NewOrder, Store, StoreError};

/// An order as a client asks for it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub kind: String,
    pub target: String,
    pub quantity: u64,
    #[serde(default)]
    pub chunk_size: Option<u64>,
    #[serde(default)]
    pub priority: i16,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Where to report the outcome (COMPLETED, PARTIAL, CANCELLED, needs attention).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// `json` (default) or `slack` (a Block Kit message for an incoming-webhook URL).
    #[serde(default)]
    pub callback_format: Option<String>,
}

/// The API's default for [`IntakeDefaults::inline_fanout_max_tasks`]: 64 tasks (25,600 units
/// at the default chunk of 400) is about a millisecond of inserts inside the intake statement.
pub const INLINE_FANOUT_MAX_TASKS: u32 = 64;

/// Defaults for what a request leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeDefaults {
    pub chunk_size: u32,
    pub max_attempts: u32,
    /// Orders of at most this many tasks are fanned out by the intake statement itself, so
    /// their tasks are claimable the moment the order is accepted; bigger ones (and all, at 0)
    /// are left PENDING for the generator. The API uses `TALLY_INLINE_FANOUT_MAX_TASKS`.
    pub inline_fanout_max_tasks: u32,
}

impl Default for IntakeDefaults {
    fn default() -> Self {
        Self {
            chunk_size: 400,
            max_attempts: 3,
            inline_fanout_max_tasks: 0,
        }
    }
}

/// A request field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates a request and plans it.
pub fn prepare(
    req: &OrderRequest,
    defaults: IntakeDefaults,
    idempotency_key: Option<&str>,
    trace_context: Option<&str>,
) -> Result<NewOrder, FieldError> {
    let kind_ok = {
        let mut chars = req.kind.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && req.kind.len() <= 63
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    if !kind_ok {
        return Err(field(
            "kind",
            "must be 1-63 characters: a lower-case letter, then lower-case letters, digits, '_' or '-'",
        ));
    }
    if req.target.is_empty() || req.target.len() > 2048 {
        return Err(field("target", "must be 1 to 2048 bytes"));
    }
    if req.target.chars().any(char::is_control) {
        return Err(field("target", "must not contain control characters"));
    }
    let chunk_size = req.chunk_size.unwrap_or(u64::from(defaults.chunk_size));
    let plan = ChunkPlan::new(req.quantity, chunk_size).map_err(|e| match e {
        PlanError::Quantity(_) => field("quantity", e.to_string()),
        PlanError::ChunkSize(_) => field("chunk_size", e.to_string()),
        PlanError::TooManyTasks { .. } => field("chunk_size", e.to_string()),
    })?;
    let max_attempts = req.max_attempts.unwrap_or(defaults.max_attempts);
    if !(1..=100).contains(&max_attempts) {
        return Err(field("max_attempts", "must be between 1 and 100"));
    }
    if !(-100..=100).contains(&req.priority) {
        return Err(field("priority", "must be between -100 and 100"));
    }
    let callback_format = req.callback_format.as_deref().unwrap_or("json");
    if !matches!(callback_format, "json" | "slack") {
        return Err(field("callback_format", "must be \"json\" or \"slack\""));
    }
    if let Some(url) = &req.callback_url {
        parse_http_url("callback_url", url)?;
    }
    if let Some(key) = idempotency_key
        && (key.is_empty() || key.len() > 255 || key.chars().any(char::is_control))
    {
        return Err(field(
            "Idempotency-Key",
            "must be 1 to 255 printable characters",
        ));
    }
    Ok(NewOrder {
        id: Uuid::now_v7(),
        kind: req.kind.clone(),
        target: req.target.clone(),
        quantity: req.quantity as i64,
        chunk_size: chunk_size as i32,
        task_count: plan.task_count as i32,
        priority: req.priority,
        max_attempts: max_attempts as i32,
        client_key: idempotency_key.map(str::to_owned),
        canonical_request: serde_json::json!({
            "kind": req.kind, "target": req.target, "quantity": req.quantity,
            "chunk_size": chunk_size, "priority": req.priority, "max_attempts": max_attempts,
            "callback_url": req.callback_url, "callback_format": callback_format,
        })
        .to_string(),
        trace_context: trace_context.map(str::to_owned),
        callback_url: req.callback_url.clone(),
        callback_format: callback_format.to_owned(),
        fan_out_now: plan.task_count <= defaults.inline_fanout_max_tasks,
    })
}

/// Parses an absolute http(s) URL with a host, or names `field` in the error.
pub fn parse_http_url(field_name: &'static str, s: &str) -> Result<reqwest::Url, FieldError> {
    if s.is_empty() || s.len() > 2048 {
        return Err(field(field_name, "must be a URL of 1 to 2048 bytes"));
    }
    let url = reqwest::Url::parse(s)
        .map_err(|e| field(field_name, format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(field(field_name, "must be an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(field(field_name, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(field(field_name, "must not carry credentials"));
    }
    Ok(url)
}

/// Whether `url`'s host is on the allow-list. Entries are host names (`hooks.example.com`),
/// optionally with a port (`127.0.0.1:9000`), or a `*.` wildcard for subdomains
/// (`*.example.com`). Matching is on the name in the URL, case-insensitively.
pub fn host_allowed(url: &reqwest::Url, allowed: &[String]) -> bool {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    let port = url.port_or_known_default();
    allowed.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        // `name:port`; IPv6 literals are written in brackets, as in URLs (`[::1]:9000`).
        let (name, want_port) = match entry.rsplit_once(':') {
            Some((n, p))
                if !n.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (n.to_owned(), p.parse::<u16>().ok())
            }
            _ => (entry.clone(), None),
        };
        if want_port.is_some_and(|p| Some(p) != port) {
            return false;
        }
        match name.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => host == name,
        }
    })
}

/// Validates and accepts an order.
pub async fn submit(
    store: &Store,
    req: &OrderRequest,
    defaults: IntakeDefaults,
    idempotency_key: Option<&str>,
) -> Result<IntakeOutcome, IntakeError> {
    let order = prepare(req, defaults, idempotency_key, None)?;
    Ok(store.create_order(&order).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> OrderRequest {
        OrderRequest {
            kind: "simulate".into(),
            target: "acct-1".into(),
            quantity: 15_000,
            chunk_size: None,
            priority: 0,
            max_attempts: None,
            ..OrderRequest::default()
        }
    }

    #[test]
    fn a_valid_order_is_planned_with_defaults() {
        let o = prepare(&req(), IntakeDefaults::default(), Some("k1"), None).unwrap();
        assert_eq!((o.chunk_size, o.task_count, o.max_attempts), (400, 38, 3));
        assert_eq!(o.client_key.as_deref(), Some("k1"));
    }

    #[test]
    fn each_bad_field_is_named() {
        let d = IntakeDefaults::default();
        let bad = |f: fn(&mut OrderRequest)| {
            let mut r = req();
            f(&mut r);
            prepare(&r, d, None, None).unwrap_err().field
        };
        assert_eq!(bad(|r| r.kind = "Bad Kind".into()), "kind");
        assert_eq!(bad(|r| r.kind = String::new()), "kind");
        assert_eq!(bad(|r| r.target = String::new()), "target");
        assert_eq!(bad(|r| r.target = "a\nb".into()), "target");
        assert_eq!(bad(|r| r.quantity = 0), "quantity");
        assert_eq!(bad(|r| r.chunk_size = Some(0)), "chunk_size");
        assert_eq!(
            bad(|r| {
                r.quantity = 1_000_000_000;
                r.chunk_size = Some(1)
            }),
            "chunk_size"
        );
        assert_eq!(bad(|r| r.max_attempts = Some(0)), "max_attempts");
        assert_eq!(bad(|r| r.priority = 101), "priority");
        assert_eq!(
            bad(|r| r.callback_url = Some("ftp://x/y".into())),
            "callback_url"
        );
        assert_eq!(
            bad(|r| r.callback_url = Some("not a url".into())),
            "callback_url"
        );
        assert_eq!(
            bad(|r| r.callback_format = Some("xml".into())),
            "callback_format"
        );
        assert_eq!(
            prepare(&req(), d, Some(""), None).unwrap_err().field,
            "Idempotency-Key"
        );
    }

    #[test]
    fn the_allow_list_matches_names_wildcards_and_ports() {
        let allowed = vec![
            "hooks.example.com".to_string(),
            "*.partner.io".to_string(),
            "127.0.0.1:9000".to_string(),
        ];
        let ok = |u: &str| host_allowed(&reqwest::Url::parse(u).unwrap(), &allowed);
        assert!(ok("https://hooks.example.com/x"));
        assert!(ok("https://HOOKS.example.com:8443/x"));
        assert!(ok("https://a.b.partner.io/"));
        assert!(!ok("https://partner.io/"));
        assert!(!ok("https://evilpartner.io/"));
        assert!(!ok("https://hooks.example.com.evil.net/"));
        assert!(ok("http://127.0.0.1:9000/cb"));
        assert!(!ok("http://127.0.0.1:9001/cb"));
        assert!(!ok("http://169.254.169.254/latest/meta-data"));
    }

    #[test]
    fn canonical_request_ignores_the_key_but_not_the_body() {
        let d = IntakeDefaults::default();
        let a = prepare(&req(), d, Some("a"), None).unwrap();
        let b = prepare(&req(), d, Some("b"), None).unwrap();
        assert_eq!(a.canonical_request, b.canonical_request);
        let mut r = req();
        r.quantity += 1;
        assert_ne!(
            prepare(&r, d, Some("a"), None).unwrap().canonical_request,
            a.canonical_request
        );
    }
}
