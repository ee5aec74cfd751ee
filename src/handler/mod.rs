//! Handlers deliver a task's units: the `Handler` trait and the built-in handlers.
//!
//! A handler gets everything it needs to act idempotently (the stable idempotency key is
//! the same on every attempt) and answers with the units it delivered or a classified
//! error. It never touches the database: the worker records the outcome.

mod simulate;
mod webhook;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

pub use simulate::{Simulate, SimulateConfig};
pub use webhook::{Webhook, WebhookSettings};

use crate::domain::ErrorClass;

/// A boxed, sendable future (handlers are stored as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One attempt of one task, as the handler sees it.
#[derive(Debug, Clone)]
pub struct TaskInput {
    pub order_id: Uuid,
    pub task_id: i64,
    pub seq: i32,
    pub kind: String,
    pub target: String,
    /// Units still to deliver (the task's quantity less earlier partial deliveries).
    pub quantity: u32,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Stable across attempts: `"{order_id}:{seq}"`.
    pub idempotency_key: String,
    /// W3C traceparent of the request that created the order.
    pub trace_context: Option<String>,
}

/// A classified handler failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct HandlerError {
    pub class: ErrorClass,
    pub message: String,
    /// The receiver's Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
}

impl HandlerError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Delivers units. Implementations must be cancel-safe: the worker drops the future when the
/// claim timeout passes or the shutdown grace period ends.
pub trait Handler: Send + Sync + 'static {
    /// Delivers up to `task.quantity` units; `Ok(n)` with `n < quantity` is a partial delivery.
    fn deliver<'a>(&'a self, task: &'a TaskInput) -> BoxFuture<'a, Result<u32, HandlerError>>;
}

/// The handlers of this process, by kind.
#[derive(Clone, Default)]
pub struct Handlers {
    by_kind: BTreeMap<String, Arc<dyn Handler>>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, kind: impl Into<String>, handler: Arc<dyn Handler>) -> Self {
        self.by_kind.insert(kind.into(), handler);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.by_kind.get(kind)
    }

    /// The kinds this process can run: workers claim only these.
    pub fn kinds(&self) -> Vec<String> {
        self.by_kind.keys().cloned().collect()
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_kind.keys()).finish()
    }
}
