//! The webhook receiver: answers every delivery 200 after a fixed latency and records the
//! call (idempotency key, order, quantity, attempt, time).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct Call {
    pub key: String,
    pub order_id: uuid::Uuid,
    pub quantity: i64,
    pub attempt: i64,
    pub at: Instant,
}

#[derive(Deserialize)]
struct Body {
    order_id: uuid::Uuid,
    quantity: i64,
    attempt: i64,
    idempotency_key: String,
}

#[derive(Clone)]
pub struct Sink {
    pub calls: Arc<Mutex<Vec<Call>>>,
    latency: Duration,
    pub url: String,
}

impl Sink {
    pub async fn start(latency: Duration) -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/deliver", listener.local_addr()?);
        let sink = Sink {
            calls: Arc::new(Mutex::new(Vec::with_capacity(1 << 20))),
            latency,
            url,
        };
        let app = axum::Router::new()
            .route("/deliver", post(deliver))
            .with_state(sink.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(sink)
    }

    pub fn snapshot(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

async fn deliver(State(sink): State<Sink>, axum::Json(b): axum::Json<Body>) -> &'static str {
    if !sink.latency.is_zero() {
        tokio::time::sleep(sink.latency).await;
    }
    sink.calls.lock().unwrap().push(Call {
        key: b.idempotency_key,
        order_id: b.order_id,
        quantity: b.quantity,
        attempt: b.attempt,
        at: Instant::now(),
    });
    "{}"
}
