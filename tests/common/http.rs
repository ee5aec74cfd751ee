//! HTTP parts of the harness: the API served in-process on a free port, a client that
//! speaks to it, and a real HTTP receiver that records every call and answers as scripted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tally::api::ApiConfig;
use tally::shutdown::{self, ShutdownTrigger};
use tally::store::Store;
use tokio::task::JoinHandle;

use super::TestDb;

/// The bootstrap admin key every test API starts with.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    trigger: ShutdownTrigger,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// A response: status and JSON body (Null when empty or not JSON), plus headers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn error_field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

impl Api {
    pub async fn start(db: &TestDb) -> Api {
        Self::start_with(
            db,
            ApiConfig {
                fault_injection_allowed: true,
                ..ApiConfig::default()
            },
        )
        .await
    }

    pub async fn start_with(db: &TestDb, mut config: ApiConfig) -> Api {
        config.admin_key = Some(ADMIN_KEY.into());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (trigger, shutdown) = shutdown::channel();
        let handle = tokio::spawn(tally::api::serve_on(
            listener,
            db.store.clone(),
            config,
            shutdown,
        ));
        let api = Api {
            base,
            client: tally::http::client(),
            store: db.store.clone(),
            trigger,
            handle,
        };
        // The bootstrap key is installed in the background: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.get("/api/admin/control", ADMIN_KEY).await.status != 200 {
            assert!(
                Instant::now() < deadline,
                "the API never accepted the bootstrap key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        api
    }

    pub async fn stop(self) {
        self.trigger.fire();
        self.handle.await.unwrap().unwrap();
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        let resp = req.send().await.expect("API reachable");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.send(reqwest::Method::GET, path, Some(key), None, &[])
            .await
    }

    pub async fn post(&self, path: &str, key: &str, body: Option<&Value>) -> Reply {
        self.send(reqwest::Method::POST, path, Some(key), body, &[])
            .await
    }

    pub async fn put(&self, path: &str, key: &str, body: &Value) -> Reply {
        self.send(reqwest::Method::PUT, path, Some(key), Some(body), &[])
            .await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Reply {
        self.send(reqwest::Method::DELETE, path, Some(key), None, &[])
            .await
    }

    /// Creates a key with `scope` and returns its secret.
    pub async fn key(&self, name: &str, scope: &str) -> String {
        let r = self
            .post(
                "/api/admin/keys",
                ADMIN_KEY,
                Some(&serde_json::json!({"name": name, "scope": scope})),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["secret"].as_str().unwrap().to_owned()
    }

    /// Creates an order as the admin and returns its id.
    pub async fn create_order(&self, body: &Value) -> String {
        let r = self.post("/api/orders", ADMIN_KEY, Some(body)).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// Waits (20 s at most) until the order is COMPLETED.
    pub async fn wait_completed(&self, id: &str) {
        let id: uuid::Uuid = id.parse().expect("an order id");
        super::wait_for_status(&self.store, id, "COMPLETED", Duration::from_secs(20)).await;
    }

    /// Waits until every remaining task of the order is dead-lettered.
    pub async fn wait_attention(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get(&format!("/api/orders/{id}"), ADMIN_KEY).await.body["needs_attention"]
            != true
        {
            assert!(
                Instant::now() < deadline,
                "order {id} never needed attention"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn order_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }
}

/// One call the receiver saw.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// What the receiver answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

#[derive(Default)]
struct ReceiverState {
    calls: Vec<Call>,
    /// Answers used in order; when empty, `fallback`.
    script: VecDeque<Answer>,
    fallback: Option<Answer>,
    /// Answers from the request body, when set (before the script).
    responder: Option<fn(&Value) -> Option<Answer>>,
}

/// A real HTTP server on a free loopback port that records calls and answers as scripted
/// (200 with an empty body by default).
#[derive(Clone)]
pub struct Receiver {
    pub base: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(record)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { base, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Answers the next calls with these, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Answers every call not scripted with this.
    pub fn always(&self, answer: Answer) {
        self.state.lock().unwrap().fallback = Some(answer);
    }

    /// Answers from each request's JSON body where `f` returns an answer.
    pub fn respond_with(&self, f: fn(&Value) -> Option<Answer>) {
        self.state.lock().unwrap().responder = Some(f);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> Vec<Call> {
        let deadline = Instant::now() + timeout;
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} calls, saw {}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let answer = {
        let mut s = state.lock().unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let computed = s.responder.and_then(|f| f(&json));
        s.calls.push(Call {
            at: Instant::now(),
            path: uri.path().to_owned(),
            headers,
            body: json,
            raw: body.to_vec(),
        });
        let fallback = s.fallback.clone();
        computed
            .or_else(|| s.script.pop_front())
            .or(fallback)
            .unwrap_or_else(|| Answer::status(200))
    };
    tokio::time::sleep(answer.delay).await;
    let mut resp = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    for (k, v) in answer.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}
