//! An in-process stand-in for the Kubernetes API server's Lease endpoints
//! (`coordination.k8s.io/v1`), faithful to the parts leader election relies on:
//!
//! - GET of a missing Lease is `404` with a `Status` whose reason is `NotFound`;
//! - POST of an existing name is `409 AlreadyExists`;
//! - PUT carrying a stale `metadata.resourceVersion` is `409 Conflict`; without one it is
//!   an unconditional update, as on a real API server;
//! - every successful write gets a new `resourceVersion` (a global counter, like etcd's
//!   revision), and the server keeps `uid` and `creationTimestamp`.
//!
//! It does not implement authentication, admission, watches, field validation beyond names,
//! or server-side apply: tests against it prove Tally's client logic and its HTTP exchange,
//! not its behaviour against a real cluster.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Inner {
    leases: HashMap<(String, String), Value>,
    revision: u64,
    /// (method, path) of every request.
    log: Vec<(String, String)>,
    /// Answer every request with 503 (an unreachable control plane).
    down: bool,
    /// Accept requests and never answer (a hung control plane or a half-open connection).
    hang: bool,
    /// Before the next PUT, another client writes the Lease (a write between read and write).
    interpose: bool,
    /// PUTs refused for a stale resourceVersion, and POSTs for an existing name.
    conflicts: usize,
}

#[derive(Clone, Default)]
pub struct KubeApi {
    inner: Arc<Mutex<Inner>>,
}

/// A running fake API server.
pub struct FakeKube {
    pub api: KubeApi,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKube {
    pub async fn start() -> FakeKube {
        let api = KubeApi::default();
        let base = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";
        let app = Router::new()
            .route(base, post(create))
            .route(&format!("{base}/{{name}}"), get(read).put(replace))
            .with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeKube { api, url, task }
    }

    /// A kube client for this server, without credentials.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_retry = false; // as `KubeElector::connect` configures it
        kube::Client::try_from(config).unwrap()
    }

    /// A kubeconfig file naming this server, for `tally` processes (`KUBECONFIG`).
    pub fn kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeApi {
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        let g = self.inner.lock().unwrap();
        g.leases.get(&(ns.to_owned(), name.to_owned())).cloned()
    }

    pub fn holder(&self, ns: &str, name: &str) -> Option<String> {
        self.lease(ns, name)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    }

    pub fn transitions(&self, ns: &str, name: &str) -> i64 {
        self.lease(ns, name)
            .and_then(|l| l["spec"]["leaseTransitions"].as_i64())
            .unwrap_or(0)
    }

    pub fn set_hang(&self, hang: bool) {
        self.inner.lock().unwrap().hang = hang;
    }

    async fn maybe_hang(&self) {
        let hang = self.inner.lock().unwrap().hang;
        if hang {
            std::future::pending::<()>().await;
        }
    }

    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// Makes the next PUT find the Lease written by someone else since it was read.
    pub fn interpose_before_next_put(&self) {
        self.inner.lock().unwrap().interpose = true;
    }

    pub fn conflicts(&self) -> usize {
        self.inner.lock().unwrap().conflicts
    }

    /// Requests so far with this method.
    pub fn count(&self, method: &str) -> usize {
        let g = self.inner.lock().unwrap();
        g.log.iter().filter(|(m, _)| m == method).count()
    }

    /// Another client's write: bumps the resourceVersion, changing nothing else.
    pub fn touch(&self, ns: &str, name: &str) {
        let mut g = self.inner.lock().unwrap();
        bump(&mut g, ns, name);
    }
}

fn bump(g: &mut Inner, ns: &str, name: &str) {
    g.revision += 1;
    let rv = g.revision.to_string();
    if let Some(l) = g.leases.get_mut(&(ns.to_owned(), name.to_owned())) {
        l["metadata"]["resourceVersion"] = json!(rv);
    }
}

/// Writes `body` under `key` with a new resourceVersion, keeping the server-set fields
/// (`uid`, `creationTimestamp`) from `kept`.
fn store(g: &mut Inner, key: (String, String), body: &mut Value, kept: &Value) {
    g.revision += 1;
    body["apiVersion"] = json!("coordination.k8s.io/v1");
    body["kind"] = json!("Lease");
    let meta = &mut body["metadata"];
    meta["namespace"] = json!(key.0);
    meta["resourceVersion"] = json!(g.revision.to_string());
    meta["uid"] = kept["uid"].clone();
    meta["creationTimestamp"] = kept["creationTimestamp"].clone();
    g.leases.insert(key, body.clone());
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

/// Logs the request; `Some(response)` when the server is down.
fn enter(api: &KubeApi, method: &str, path: String) -> Option<Response> {
    let mut g = api.inner.lock().unwrap();
    g.log.push((method.to_owned(), path));
    g.down.then(|| {
        status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the API server is down".into(),
        )
    })
}

async fn read(State(api): State<KubeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    if let Some(r) = enter(&api, "GET", format!("{ns}/{name}")) {
        return r;
    }
    api.maybe_hang().await;
    match api.lease(&ns, &name) {
        Some(l) => axum::Json(l).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

async fn create(
    State(api): State<KubeApi>,
    Path(ns): Path<String>,
    axum::Json(mut body): axum::Json<Value>,
) -> Response {
    if let Some(r) = enter(&api, "POST", ns.clone()) {
        return r;
    }
    api.maybe_hang().await;
    let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "name is required".into(),
        );
    };
    let mut g = api.inner.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if g.leases.contains_key(&key) {
        g.conflicts += 1;
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    let created = json!({
        "uid": uuid::Uuid::new_v4().to_string(),
        "creationTimestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    });
    store(&mut g, key, &mut body, &created);
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

async fn replace(
    State(api): State<KubeApi>,
    Path((ns, name)): Path<(String, String)>,
    axum::Json(mut body): axum::Json<Value>,
) -> Response {
    if let Some(r) = enter(&api, "PUT", format!("{ns}/{name}")) {
        return r;
    }
    api.maybe_hang().await;
    if body["metadata"]["name"].as_str() != Some(name.as_str()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the name on the URL".into(),
        );
    }
    let mut g = api.inner.lock().unwrap();
    if std::mem::take(&mut g.interpose) {
        bump(&mut g, &ns, &name);
    }
    let key = (ns.clone(), name.clone());
    let Some(current) = g.leases.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        );
    };
    if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        g.conflicts += 1;
        return status(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the \
                 object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    store(&mut g, key, &mut body, &current["metadata"]);
    axum::Json(body).into_response()
}
