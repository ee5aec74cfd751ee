//! Order notifications: when an order reaches COMPLETED, PARTIAL or CANCELLED, or needs
//! attention, the sweeper queues one notification (`order_callbacks`); workers deliver it
//! here with retries and backoff, fenced like tasks. Every attempt is recorded on the row
//! (attempts, last error, response status), which the API shows per order.
//!
//! Request: `POST {callback_url}` with the JSON payload (or a Slack Block Kit message for
//! `callback_format = slack`), `Idempotency-Key: tally-callback-{id}` (stable across
//! attempts), and `X-Tally-Timestamp`/`X-Tally-Signature` when a signing secret is set.

use std::time::Duration;

use serde_json::{Value, json};

use crate::domain::Backoff;
use crate::shutdown::Shutdown;
use crate::store::{CallbackJob, CallbackResult, Store};

/// Callback delivery settings.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    /// Hosts callbacks may be sent to; empty: any.
    pub allowed_hosts: Vec<String>,
    pub signing_secret: Option<String>,
    pub timeout: Duration,
    pub poll_interval: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            signing_secret: None,
            timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
        }
    }
}

fn backoff() -> Backoff {
    Backoff::new(Duration::from_secs(2), 2.0, Duration::from_secs(600), 0.2)
        .expect("fixed backoff is valid")
}

/// Delivers due notifications until shutdown.
pub async fn run(
    store: Store,
    config: CallbackConfig,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    shutdown: Shutdown,
) {
    let client = crate::http::client();
    while !shutdown.is_triggered() {
        let _ = store.fail_exhausted_callbacks().await;
        let jobs = match store
            .claim_callbacks(16, config.timeout + Duration::from_secs(30))
            .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::debug!(error = %e, "claiming callbacks failed");
                Vec::new()
            }
        };
        let busy = !jobs.is_empty();
        let mut running = Vec::with_capacity(jobs.len());
        for job in jobs {
            let (store, client, config) = (store.clone(), client.clone(), config.clone());
            let metrics = metrics.clone();
            running.push(tokio::spawn(async move {
                let result = deliver(&client, &config, &job).await;
                let outcome = if result.delivered {
                    "delivered"
                } else if job.attempts >= job.max_attempts {
                    "failed"
                } else {
                    "retry"
                };
                metrics.callbacks_total.with_label_values(&[outcome]).inc();
                if let Some(e) = &result.error {
                    tracing::info!(callback.id = job.id, order.id = %job.order_id, attempt = job.attempts, error = %e, "order callback failed");
                }
                if let Err(e) = store.finish_callback(&job, &result).await {
                    tracing::warn!(callback.id = job.id, error = %e, "recording a callback attempt failed; it will be retried");
                }
            }));
        }
        for r in running {
            let _ = r.await;
        }
        if !busy {
            tokio::select! {
                _ = tokio::time::sleep(config.poll_interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// One attempt.
pub async fn deliver(
    client: &reqwest::Client,
    config: &CallbackConfig,
    job: &CallbackJob,
) -> CallbackResult {
    let retry_in = backoff().delay(job.attempts.max(1) as u32, fastrand::f64());
    let fail = |status: Option<i32>, error: String| CallbackResult {
        delivered: false,
        response_status: status,
        error: Some(error),
        retry_in,
    };
    let url = match crate::intake::parse_http_url("callback_url", &job.url) {
        Ok(u) => u,
        Err(e) => return fail(None, e.to_string()),
    };
    if !config.allowed_hosts.is_empty() && !crate::intake::host_allowed(&url, &config.allowed_hosts)
    {
        return fail(
            None,
            "callback host is not in TALLY_CALLBACK_ALLOWED_HOSTS".into(),
        );
    }
    let body = match job.format.as_str() {
        "slack" => slack_message(&job.payload),
        _ => job.payload.clone(),
    };
    let body = serde_json::to_vec(&body).expect("JSON values serialise");
    let mut req = client
        .post(url)
        .timeout(config.timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", format!("tally-callback-{}", job.id));
    if let Some(secret) = &config.signing_secret {
        let ts = chrono::Utc::now().timestamp();
        req = req.header("x-tally-timestamp", ts.to_string()).header(
            "x-tally-signature",
            crate::http::signature(secret.as_bytes(), ts, &body),
        );
    }
    match req.body(body).send().await {
        Ok(resp) if resp.status().is_success() => CallbackResult {
            delivered: true,
            response_status: Some(i32::from(resp.status().as_u16())),
            error: None,
            retry_in,
        },
        Ok(resp) => {
            let status = resp.status();
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::http::parse_retry_after);
            CallbackResult {
                retry_in: wait.map_or(retry_in, |w| w.min(Duration::from_secs(3600))),
                ..fail(
                    Some(i32::from(status.as_u16())),
                    format!("receiver answered {status}"),
                )
            }
        }
        Err(e) => fail(None, format!("receiver unreachable: {e}")),
    }
}

/// The notification as a Slack incoming-webhook message (Block Kit).
pub fn slack_message(payload: &Value) -> Value {
    let order = &payload["order"];
    let event = payload["event"].as_str().unwrap_or("UPDATE");
    let icon = match event {
        "COMPLETED" => ":white_check_mark:",
        "PARTIAL" => ":warning:",
        "CANCELLED" => ":no_entry_sign:",
        _ => ":rotating_light:",
    };
    let headline = match event {
        "NEEDS_ATTENTION" => {
            "Order needs attention: every remaining task is dead-lettered".to_string()
        }
        other => format!("Order {}", other.to_lowercase()),
    };
    let field = |label: &str, value: String| json!({"type": "mrkdwn", "text": format!("*{label}*\n{value}")});
    let num = |k: &str| order[k].as_i64().unwrap_or(0).to_string();
    json!({
        "text": format!("{icon} {headline}: {} ({} of {} units delivered)",
                        order["id"].as_str().unwrap_or("?"), num("delivered"), num("quantity")),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": format!("{headline}")}},
            {"type": "section", "fields": [
                field("Order", format!("`{}`", order["id"].as_str().unwrap_or("?"))),
                field("Kind", order["kind"].as_str().unwrap_or("?").to_string()),
                field("Status", order["status"].as_str().unwrap_or("?").to_string()),
                field("Delivered", format!("{} / {}", num("delivered"), num("quantity"))),
                field("Dead-lettered units", num("failed_permanent_units")),
                field("Cancelled units", num("cancelled_units")),
            ]},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": format!("{icon} Tally · `tally order progress {}`", order["id"].as_str().unwrap_or("?"))}
            ]}
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slack_message_is_block_kit_with_a_fallback_text() {
        let payload = json!({"event": "COMPLETED", "order": {
            "id": "0191", "kind": "simulate", "status": "COMPLETED", "quantity": 10,
            "delivered": 10, "failed_permanent_units": 0, "cancelled_units": 0}});
        let m = slack_message(&payload);
        assert!(m["text"].as_str().unwrap().contains("10 of 10 units"));
        let blocks = m["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[1]["fields"].as_array().unwrap().len(), 6);
        assert!(
            blocks[1]["fields"][3]["text"]
                .as_str()
                .unwrap()
                .contains("10 / 10")
        );
    }
}
