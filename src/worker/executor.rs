//! Runs one claimed task through its handler. No SQL here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::domain::{Backoff, ErrorClass, TaskEvent};
use crate::handler::{HandlerError, TaskInput};
use crate::kinds::KindRuntime;
use crate::metrics::{BatchTimer, Metrics};
use crate::shutdown::Shutdown;
use crate::store::ClaimedTask;

/// A finished attempt on its way to the completer, holding its slot until written.
pub struct Finished {
    pub task: ClaimedTask,
    pub event: TaskEvent,
    pub error: Option<String>,
    /// The kind's retry delays.
    pub backoff: Backoff,
    pub permit: OwnedSemaphorePermit,
    /// The claim batch this task came in (its duration is observed when the last is written).
    pub batch: Arc<BatchTimer>,
}

pub(super) async fn execute(
    task: ClaimedTask,
    kind: Option<Arc<KindRuntime>>,
    fault_rate: f64,
    (permit, batch, metrics): (OwnedSemaphorePermit, Arc<BatchTimer>, Arc<Metrics>),
    claim_timeout: Duration,
    out: mpsc::Sender<Finished>,
    hard_stop: Shutdown,
) {
    let input = TaskInput {
        order_id: task.order_id,
        task_id: task.id,
        seq: task.seq,
        kind: task.kind.clone(),
        target: task.target.clone(),
        quantity: task.snapshot().remaining(),
        attempt: task.attempts.max(1) as u32,
        idempotency_key: task.idempotency_key(),
        trace_context: task.trace_context.clone(),
    };
    let backoff = kind.as_ref().map_or(Backoff::DEFAULT, |k| k.backoff);
    // One span per attempt, a child of the request that created the order (stored with it).
    let span = tracing::info_span!(
        "task.attempt",
        order.id = %task.order_id,
        task.id = task.id,
        task.seq = task.seq,
        attempt = task.attempts,
        kind = %task.kind,
        outcome = tracing::field::Empty,
        error.class = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    if let Some(tp) = &task.trace_context {
        crate::telemetry::set_parent(&span, tp);
    }
    crate::telemetry::record_trace_id(&span);
    let result = match kind {
        None => Err(HandlerError::new(
            ErrorClass::ValidationError,
            format!("no handler for kind {:?} in this worker", task.kind),
        )),
        Some(_) if fault_rate > 0.0 && fastrand::f64() < fault_rate => Err(HandlerError::new(
            ErrorClass::NetworkError,
            "injected fault (fault injection is enabled: /api/admin/testing)",
        )),
        Some(k) => {
            // The kind's concurrency limit (the claim time counts against the claim timeout).
            let attempt = async {
                let _kind_permit = match &k.limit {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let started = std::time::Instant::now();
                let r =
                    tracing::Instrument::instrument(k.handler.deliver(&input), span.clone()).await;
                metrics
                    .task_duration
                    .observe(started.elapsed().as_secs_f64());
                r
            };
            tokio::select! {
                biased;
                _ = hard_stop.wait() => {
                    let _ = out.send(Finished { task, event: TaskEvent::HandedBack, error: None, backoff, permit, batch }).await;
                    return;
                }
                r = tokio::time::timeout(claim_timeout, attempt) => match r {
                    Ok(r) => r,
                    Err(_) => Err(HandlerError::new(
                        ErrorClass::TimeoutError,
                        format!("attempt ran past the claim timeout of {claim_timeout:?}"),
                    )),
                },
            }
        }
    };
    match &result {
        Ok(units) if *units >= input.quantity => span.record("outcome", "delivered"),
        Ok(_) => span.record("outcome", "partial"),
        Err(e) => span
            .record("outcome", "failed")
            .record("error.class", e.class.as_str()),
    };
    span.in_scope(
        || tracing::debug!(outcome = ?result.as_ref().map_err(|e| e.class), "attempt finished"),
    );
    drop(span);
    let (event, error) = match result {
        Ok(units) => (TaskEvent::Delivered { units }, None),
        Err(e) => (
            TaskEvent::Failed {
                class: e.class,
                retry_in: e.retry_after,
            },
            Some(e.message),
        ),
    };
    // The completer outlives every executor; a send error means it gave up, and the task's
    // lease will expire and the sweeper will rescue it.
    let _ = out
        .send(Finished {
            task,
            event,
            error,
            backoff,
            permit,
            batch,
        })
        .await;
}
