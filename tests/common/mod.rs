//! Shared integration-test harness: a real PostgreSQL, a fresh database per test,
//! factories, in-process roles, real `tally` processes, and a recording handler.
//!
//! The cluster: `TALLY_TEST_DATABASE_URL` (a superuser URL; `.ci/run` starts one) or else
//! a throwaway cluster started once per test process and stopped when it exits.
#![allow(dead_code)]

pub mod http;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tally::config::{Role, ServeSettings};
use tally::domain::Backoff;
use tally::generator::GeneratorConfig;
use tally::handler::{BoxFuture, Handler, HandlerError, Handlers, SimulateConfig, TaskInput};
use tally::intake::{IntakeDefaults, OrderRequest};
use tally::pgtemp::{ClusterOptions, TempCluster};
use tally::shutdown::{self, ShutdownTrigger};
use tally::store::{IntakeOutcome, Store, StoreOptions};
use tally::sweeper::SweeperConfig;
use tally::worker::WorkerConfig;
use tokio::task::JoinHandle;
use uuid::Uuid;

static CLUSTER: Mutex<Option<TempCluster>> = Mutex::new(None);
static ADMIN_URL: OnceLock<String> = OnceLock::new();

extern "C" fn stop_cluster_at_exit() {
    if let Ok(mut c) = CLUSTER.lock() {
        drop(c.take());
    }
}

/// A superuser URL (database `postgres`) of the test server.
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| {
            if let Ok(url) = std::env::var("TALLY_TEST_DATABASE_URL")
                && !url.is_empty()
            {
                return url;
            }
            let cluster = TempCluster::start(ClusterOptions::default())
                .unwrap_or_else(|e| panic!("starting the test PostgreSQL: {e}"));
            let url = cluster.url("postgres");
            *CLUSTER.lock().unwrap() = Some(cluster);
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe {
                libc::atexit(stop_cluster_at_exit);
            }
            url
        })
        .clone()
}

/// Replaces the database name in a URL.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let cut = base.rfind('/').expect("URL has a path");
    format!("{}/{db}{query}", &base[..cut])
}

/// Creates a fresh, empty database on the server and returns its URL.
async fn create_database(admin: &str) -> String {
    let name = format!("tally_t_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    url_with_db(admin, &name)
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub url: String,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::on_server(&admin_url()).await
    }

    /// An empty database (no migrations) on the test server; returns its URL.
    pub async fn empty() -> String {
        create_database(&admin_url()).await
    }

    pub async fn on_server(admin: &str) -> Self {
        if let Ok(filter) = std::env::var("TALLY_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let url = create_database(admin).await;
        let store = Store::connect(&StoreOptions {
            pool_size_max: 20,
            ..StoreOptions::new(&url)
        })
        .await
        .expect("connect test database");
        store.migrate().await.expect("migrate test database");
        Self { url, store }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.store.pool()
    }

    /// A second store on the same database (a separate pool, like another pod).
    pub async fn another_store(&self) -> Store {
        Store::connect(&StoreOptions {
            pool_size_max: 10,
            ..StoreOptions::new(&self.url)
        })
        .await
        .unwrap()
    }
}

/// Order factory: defaults for everything, override what the test is about.
#[derive(Debug, Clone)]
pub struct OrderSpec {
    pub kind: &'static str,
    pub quantity: u64,
    pub chunk_size: u64,
    pub priority: i16,
    pub max_attempts: u32,
}

impl Default for OrderSpec {
    fn default() -> Self {
        Self {
            kind: "test",
            quantity: 1000,
            chunk_size: 100,
            priority: 0,
            max_attempts: 3,
        }
    }
}

impl OrderSpec {
    pub fn units(quantity: u64, chunk_size: u64) -> Self {
        Self {
            quantity,
            chunk_size,
            ..Self::default()
        }
    }

    /// Creates the order (PENDING, no tasks yet).
    pub async fn create(&self, store: &Store) -> Uuid {
        let req = OrderRequest {
            kind: self.kind.into(),
            target: "acct-42".into(),
            quantity: self.quantity,
            chunk_size: Some(self.chunk_size),
            priority: self.priority,
            max_attempts: Some(self.max_attempts),
            ..Default::default()
        };
        match tally::intake::submit(store, &req, IntakeDefaults::default(), None)
            .await
            .unwrap()
        {
            IntakeOutcome::Created(id) => id,
            other => panic!("{other:?}"),
        }
    }

    /// Creates the order and fans it out into tasks.
    pub async fn generated(&self, store: &Store) -> Uuid {
        let id = self.create(store).await;
        while store.generate_tasks(100, "test").await.unwrap().0 > 0 {}
        id
    }
}

/// Polls `cond` until it holds or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Scalar helper for assertions.
pub async fn scalar_i64(store: &Store, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

pub async fn order_status(store: &Store, id: Uuid) -> String {
    store.get_order(id).await.unwrap().unwrap().status
}

/// Settings for in-process roles, tuned for tests: short lease, fast backoff and ticks.
pub fn settings(url: &str, roles: &[Role]) -> ServeSettings {
    let backoff = Backoff::new(
        Duration::from_millis(50),
        2.0,
        Duration::from_millis(400),
        0.2,
    )
    .unwrap();
    ServeSettings {
        roles: roles.to_vec(),
        store: StoreOptions {
            pool_size_max: 8,
            ..StoreOptions::new(url)
        },
        worker: WorkerConfig {
            batch_size_max: 16,
            concurrency_max: 16,
            lease_ttl: Duration::from_secs(2),
            claim_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            listen: true,
            shutdown_grace: Duration::from_secs(5),
            backoff,
        },
        generator: GeneratorConfig {
            orders_per_pass_max: 50,
            tasks_per_pass_max: tally::store::GENERATE_TASKS_BUDGET,
            poll_interval: Duration::from_millis(100),
            listen: true,
        },
        sweeper: SweeperConfig {
            tick_interval: Duration::from_millis(100),
            audit_interval: Duration::from_millis(200),
            backoff,
            ..SweeperConfig::default()
        },
        leader_ttl: Duration::from_secs(2),
        election: tally::config::ElectionBackend::Postgres,
        simulate: SimulateConfig::default(),
        api: tally::api::ApiConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            fault_injection_allowed: true,
            ..Default::default()
        },
        callbacks: tally::callbacks::CallbackConfig {
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        },
        kinds: Vec::new(),
        simulate_kind: true,
        metrics_addr: None,
    }
}

/// Roles running in this test process (a "pod"), stopped by [`Pod::stop`].
pub struct Pod {
    pub id: Uuid,
    trigger: ShutdownTrigger,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Pod {
    pub async fn start(settings: ServeSettings, handlers: Handlers) -> Pod {
        let store = Store::connect(&settings.store).await.unwrap();
        let (trigger, shutdown) = shutdown::channel();
        let id = Uuid::new_v4();
        let handle = tokio::spawn(tally::app::run_roles(
            store, settings, handlers, id, shutdown,
        ));
        Pod {
            id,
            trigger,
            handle,
        }
    }

    /// Graceful stop: fires shutdown and waits for the roles to drain.
    pub async fn stop(self) {
        self.trigger.fire();
        self.handle.await.unwrap().unwrap();
    }
}

/// Records every handler call; detects a task running twice at once.
#[derive(Default)]
pub struct Recorder {
    pub calls: Mutex<HashMap<i64, u32>>,
    pub keys: Mutex<HashMap<i64, String>>,
    in_flight: Mutex<HashMap<i64, u32>>,
    pub overlaps: Mutex<u32>,
    pub delay: Mutex<Duration>,
    /// Fail each task's first `fail_first` attempts with this class.
    pub fail_first: Mutex<Option<(u32, tally::domain::ErrorClass)>>,
}

impl Recorder {
    pub fn new(delay: Duration) -> Arc<Self> {
        let r = Self::default();
        *r.delay.lock().unwrap() = delay;
        Arc::new(r)
    }

    pub fn total_calls(&self) -> u32 {
        self.calls.lock().unwrap().values().sum()
    }
}

impl Handler for Recorder {
    fn deliver<'a>(&'a self, task: &'a TaskInput) -> BoxFuture<'a, Result<u32, HandlerError>> {
        Box::pin(async move {
            {
                let mut f = self.in_flight.lock().unwrap();
                let n = f.entry(task.task_id).or_default();
                *n += 1;
                if *n > 1 {
                    *self.overlaps.lock().unwrap() += 1;
                }
                *self.calls.lock().unwrap().entry(task.task_id).or_default() += 1;
                let mut keys = self.keys.lock().unwrap();
                let key = keys
                    .entry(task.task_id)
                    .or_insert_with(|| task.idempotency_key.clone());
                assert_eq!(
                    *key, task.idempotency_key,
                    "idempotency key changed between attempts"
                );
            }
            struct Leave<'r>(&'r Recorder, i64);
            impl Drop for Leave<'_> {
                fn drop(&mut self) {
                    *self.0.in_flight.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
                }
            }
            let _leave = Leave(self, task.task_id);
            let delay = *self.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some((n, class)) = *self.fail_first.lock().unwrap()
                && task.attempt <= n
            {
                return Err(HandlerError::new(class, "injected failure"));
            }
            Ok(task.quantity)
        })
    }
}

pub fn handlers_for(kind: &str, h: Arc<dyn Handler>) -> Handlers {
    Handlers::new().with(kind, h)
}

/// Runs the auditor over every order and returns the violations found.
pub async fn audit_all(store: &Store) -> Vec<(Uuid, serde_json::Value)> {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let s = tally::sweeper::Sweeper::new(
        store.clone(),
        SweeperConfig::default(),
        "test-audit".into(),
        Default::default(),
    );
    let r = s.audit_orders(&ids).await.unwrap();
    assert_eq!(r.orders_checked as usize, ids.len());
    r.violations
}

/// A real `tally` process.
pub fn spawn_tally(url: &str, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(args)
        .env("TALLY_DATABASE_URL", url)
        // Tests run in parallel: no process may take the default metrics port.
        .env("TALLY_METRICS_ADDR", "off")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn tally")
}

pub fn signal(child: &tokio::process::Child, sig: i32) {
    let pid = child.id().expect("child running") as i32;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Claims up to `n` tasks of kind `test` for `worker` (lease 30 s).
pub async fn claim_up_to(store: &Store, worker: Uuid, n: u32) -> Vec<tally::store::ClaimedTask> {
    store
        .claim_tasks(worker, n, &["test".into()], Duration::from_secs(30))
        .await
        .unwrap()
}

/// Claims one task of kind `test` for `worker` (lease 30 s).
pub async fn claim_one(store: &Store, worker: Uuid) -> tally::store::ClaimedTask {
    let mut got = claim_up_to(store, worker, 1).await;
    assert_eq!(got.len(), 1, "expected a claimable task");
    got.remove(0)
}

/// Claims batches of kind `test` until none is left; returns how many were claimed.
pub async fn claim_all(store: &Store, worker: Uuid) -> usize {
    let mut claimed = 0;
    loop {
        let got = claim_up_to(store, worker, 1000).await.len();
        if got == 0 {
            return claimed;
        }
        claimed += got;
    }
}

/// The update the state machine decides for `event` on a claimed task.
pub fn decided(
    t: &tally::store::ClaimedTask,
    event: tally::domain::TaskEvent,
) -> tally::store::TaskUpdate {
    let transition =
        tally::domain::state::decide(&t.snapshot(), &event, &Backoff::DEFAULT, 0.0).unwrap();
    tally::store::TaskUpdate {
        task_id: t.id,
        claim_token: t.claim_token,
        transition,
        error: None,
    }
}

/// Decides and writes `event` for a claimed task under the claim fence; returns the task ids
/// that were written.
pub async fn apply_event(
    store: &Store,
    t: &tally::store::ClaimedTask,
    event: tally::domain::TaskEvent,
) -> Vec<i64> {
    store
        .apply_task_updates(
            &[decided(t, event)],
            tally::store::UpdateFence::Claim,
            "test",
        )
        .await
        .unwrap()
        .task_ids
}

/// The sweeper's rescue updates for tasks it read as expired.
pub fn rescue_updates(stale: &[tally::store::ExpiredTask]) -> Vec<tally::store::TaskUpdate> {
    stale
        .iter()
        .map(|e| tally::store::TaskUpdate {
            task_id: e.id,
            claim_token: e.claim_token,
            transition: tally::domain::state::decide(
                &e.snapshot(),
                &tally::domain::TaskEvent::LeaseExpired,
                &Backoff::DEFAULT,
                0.0,
            )
            .unwrap(),
            error: None,
        })
        .collect()
}

/// Waits until the scalar `sql` returns `expected`.
pub async fn wait_for_count(store: &Store, sql: &'static str, expected: i64, timeout: Duration) {
    wait_until(timeout, sql, || {
        let store = store.clone();
        async move { scalar_i64(&store, sql).await == expected }
    })
    .await
}

/// Waits until order `id` has `status`.
pub async fn wait_for_status(store: &Store, id: Uuid, status: &'static str, timeout: Duration) {
    wait_until(timeout, status, || {
        let store = store.clone();
        async move { matches!(store.get_order(id).await, Ok(Some(o)) if o.status == status) }
    })
    .await
}

/// Waits until order `id` needs attention (every remaining task dead-lettered).
pub async fn wait_for_attention(store: &Store, id: Uuid, timeout: Duration) {
    wait_until(timeout, "order needs attention", || {
        let store = store.clone();
        async move { store.get_order(id).await.unwrap().unwrap().needs_attention }
    })
    .await
}

/// Every task of the order is back in the queue, PENDING with no attempt counted.
pub async fn assert_all_handed_back(store: &Store, order: Uuid) {
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT status, attempts FROM order_tasks WHERE order_id = $1")
            .bind(order)
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|(s, a)| s == "PENDING" && *a == 0),
        "{rows:?}"
    );
}

/// The order delivered every unit, every task is COMPLETED, and the auditor finds nothing.
pub async fn assert_fully_delivered(store: &Store, order: Uuid) {
    let o = store.get_order(order).await.unwrap().unwrap();
    assert_eq!((o.status.as_str(), o.delivered), ("COMPLETED", o.quantity));
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_tasks WHERE order_id = $1 AND status <> 'COMPLETED'",
    )
    .bind(order)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(open, 0);
    assert!(audit_all(store).await.is_empty());
}

/// Every process deregistered on its way out.
pub async fn assert_no_live_workers(store: &Store) {
    assert_eq!(
        scalar_i64(
            store,
            "SELECT count(*) FROM workers WHERE stopped_at IS NULL"
        )
        .await,
        0
    );
}

/// A TCP proxy in front of the test PostgreSQL that can cut every connection and refuse
/// new ones, as a network partition or a stopped server does.
pub struct CutProxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free port and forwards to the server of `url`.
    pub async fn start(url: &str) -> CutProxy {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("a database URL");
        let upstream = format!("{}:{}", opts.get_host(), opts.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        CutProxy { port, cut, task }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("a database URL");
        url.replacen(
            &format!("{}:{}", opts.get_host(), opts.get_port()),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }

    /// Drops every proxied connection and stops accepting: connects are refused from now on.
    pub fn cut(&self) {
        self.task.abort();
        let _ = self.cut.send(true);
    }
}

/// The pid of a backend (other than `except`) whose statement, matching the `LIKE` pattern
/// `query`, waits on a lock; waits up to 10 s for one.
pub async fn backend_waiting_on_a_lock(pool: &sqlx::PgPool, query: &str, except: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid = sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE $1 AND pid <> $2",
        )
        .bind(query)
        .bind(except)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        if Instant::now() >= deadline {
            let seen: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT wait_event_type, state, left(query, 60) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            panic!("no statement like {query:?} waits on a lock; backends: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
