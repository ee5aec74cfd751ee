//! The webhook handler: POSTs each attempt to an HTTP endpoint the operator owns.
//!
//! Request: JSON `{order_id, task_id, seq, quantity, target, attempt, kind, idempotency_key}`
//! with headers `Idempotency-Key` (stable across attempts), `traceparent` (when the order
//! carries one), `X-Tally-Timestamp` and `X-Tally-Signature` (see `http::signature`).
//!
//! Classification of the answer:
//! - 2xx: delivered. A JSON body `{"delivered": n}` with `n < quantity` is a partial
//!   delivery (the rest is re-queued); anything else means all units.
//! - 408, 429, 5xx, connection errors: retryable (`RateLimited` honouring `Retry-After`
//!   when the receiver sends one, else `NetworkError`).
//! - over the kind's timeout: `TimeoutError`.
//! - any other status (3xx are not followed, 4xx): `ValidationError`, dead-lettered at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BoxFuture, Handler, HandlerError, TaskInput};
use crate::domain::ErrorClass;
use crate::intake::host_allowed;

/// A webhook kind's settings, as stored in `kinds.webhook`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSettings {
    /// The endpoint; `None`: each order's target is the URL (then `allowed_hosts` must say
    /// which hosts targets may name).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub signing_secret: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Hosts this kind may call (see `intake::host_allowed`); empty: only `url`'s host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Most bytes of a response body read (for `{"delivered": n}` and error messages).
const BODY_MAX: usize = 64 * 1024;

pub struct Webhook {
    client: reqwest::Client,
    settings: WebhookSettings,
}

#[derive(Serialize)]
struct Body<'a> {
    order_id: uuid::Uuid,
    task_id: i64,
    seq: i32,
    quantity: u32,
    target: &'a str,
    attempt: u32,
    kind: &'a str,
    idempotency_key: &'a str,
}

impl Webhook {
    pub fn new(client: reqwest::Client, settings: WebhookSettings) -> Self {
        Self { client, settings }
    }

    /// The URL for this task, checked against the allow-list.
    fn url(&self, task: &TaskInput) -> Result<reqwest::Url, HandlerError> {
        let raw = self.settings.url.as_deref().unwrap_or(&task.target);
        let url = crate::intake::parse_http_url("url", raw)
            .map_err(|e| HandlerError::new(ErrorClass::ValidationError, e.to_string()))?;
        let allowed = if self.settings.allowed_hosts.is_empty() {
            // A fixed URL needs no list; a target-as-URL kind without one allows nothing.
            self.settings.url.is_some()
        } else {
            host_allowed(&url, &self.settings.allowed_hosts)
        };
        if !allowed {
            return Err(HandlerError::new(
                ErrorClass::ValidationError,
                format!(
                    "host {:?} is not on kind {:?}'s allow-list",
                    url.host_str().unwrap_or(""),
                    task.kind
                ),
            ));
        }
        Ok(url)
    }

    async fn call(&self, task: &TaskInput) -> Result<u32, HandlerError> {
        let url = self.url(task)?;
        let span = tracing::info_span!(
            "webhook.call",
            http.url = %url,
            http.status_code = tracing::field::Empty
        );
        tracing::Instrument::instrument(self.send(task, url, &span), span.clone()).await
    }

    async fn send(
        &self,
        task: &TaskInput,
        url: reqwest::Url,
        span: &tracing::Span,
    ) -> Result<u32, HandlerError> {
        let body = serde_json::to_vec(&Body {
            order_id: task.order_id,
            task_id: task.task_id,
            seq: task.seq,
            quantity: task.quantity,
            target: &task.target,
            attempt: task.attempt,
            kind: &task.kind,
            idempotency_key: &task.idempotency_key,
        })
        .expect("serialising a fixed struct cannot fail");
        let mut req = self
            .client
            .post(url)
            .timeout(Duration::from_millis(self.settings.timeout_ms))
            .header("content-type", "application/json")
            .header("idempotency-key", &task.idempotency_key);
        for (k, v) in &self.settings.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        // The call's own context when traces are exported, else the order's.
        if let Some(tp) = crate::telemetry::traceparent(span).or_else(|| task.trace_context.clone())
        {
            req = req.header("traceparent", tp);
        }
        if let Some(secret) = &self.settings.signing_secret {
            let ts = chrono::Utc::now().timestamp();
            req = req.header("x-tally-timestamp", ts.to_string()).header(
                "x-tally-signature",
                crate::http::signature(secret.as_bytes(), ts, &body),
            );
        }
        let resp = req.body(body).send().await.map_err(classify_send_error)?;
        let status = resp.status();
        span.record("http.status_code", status.as_u16());
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::http::parse_retry_after);
        let text = read_capped(resp).await;
        if status.is_success() {
            return Ok(delivered_from_body(&text, task.quantity));
        }
        let code = status.as_u16();
        let snippet: String = text.chars().take(200).collect();
        let message = format!("webhook answered {status}: {snippet}");
        if code == 408 || code == 429 || status.is_server_error() {
            let class = if retry_after.is_some() || code == 429 {
                ErrorClass::RateLimited
            } else {
                ErrorClass::NetworkError
            };
            return Err(HandlerError {
                class,
                message,
                retry_after,
            });
        }
        Err(HandlerError::new(ErrorClass::ValidationError, message))
    }
}

impl Handler for Webhook {
    fn deliver<'a>(&'a self, task: &'a TaskInput) -> BoxFuture<'a, Result<u32, HandlerError>> {
        Box::pin(self.call(task))
    }
}

fn classify_send_error(e: reqwest::Error) -> HandlerError {
    if e.is_timeout() {
        HandlerError::new(ErrorClass::TimeoutError, format!("webhook timed out: {e}"))
    } else {
        HandlerError::new(
            ErrorClass::NetworkError,
            format!("webhook unreachable: {e}"),
        )
    }
}

async fn read_capped(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = BODY_MAX.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= BODY_MAX {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `{"delivered": n}` reports a partial delivery; anything else on a 2xx means all of it.
fn delivered_from_body(body: &str, quantity: u32) -> u32 {
    #[derive(Deserialize)]
    struct Answer {
        delivered: u64,
    }
    match serde_json::from_str::<Answer>(body) {
        Ok(a) => a.delivered.min(u64::from(quantity)) as u32,
        Err(_) => quantity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivered_count_in_the_body_is_a_partial_delivery() {
        assert_eq!(delivered_from_body(r#"{"delivered": 3}"#, 10), 3);
        assert_eq!(delivered_from_body(r#"{"delivered": 0}"#, 10), 0);
        assert_eq!(delivered_from_body(r#"{"delivered": 99}"#, 10), 10);
        assert_eq!(delivered_from_body("", 10), 10);
        assert_eq!(delivered_from_body(r#"{"ok": true}"#, 10), 10);
    }
}
