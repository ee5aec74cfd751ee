//! Prometheus metrics: a registry owned by the process (no global), served at `/metrics`
//! on `TALLY_METRICS_ADDR`.
//!
//! Two registries:
//! - per process: counters and histograms of what this process did (every pod exports
//!   them; Grafana sums them);
//! - cluster-wide gauges (backlog, dead-letter queue, active workers, …), refreshed by the
//!   sweeper leader and exported only while this process leads, so that a sum over pods
//!   counts them once.
//!
//! Labels stay bounded: status, outcome, kind, route — never ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::Store;

/// The `outcome` values of `tally_attempts_total`.
pub const ATTEMPT_OUTCOMES: [&str; 6] = [
    "delivered",
    "partial",
    "retry",
    "dead_lettered",
    "handed_back",
    "fenced",
];

/// Every metric Tally exports.
pub struct Metrics {
    registry: Registry,
    cluster: Registry,
    /// Whether this process leads and its cluster gauges are current.
    cluster_export: AtomicBool,

    pub tasks_total: IntCounterVec,
    pub retries_total: IntCounter,
    pub orphans_recovered_total: IntCounter,
    pub units_total: IntCounterVec,
    pub task_duration: Histogram,
    pub batch_duration: Histogram,
    pub attempts_total: IntCounterVec,
    pub pickup_latency: Histogram,
    pub recovery: Histogram,
    pub claim_batch_size: Histogram,
    pub claim_duration: Histogram,
    pub order_completion: Histogram,
    pub invariant_checks_total: IntCounterVec,
    pub leader: IntGaugeVec,
    pub http_requests_total: IntCounterVec,
    pub http_duration: HistogramVec,
    pub callbacks_total: IntCounterVec,
    pub db_pool_connections: IntGaugeVec,
    pub db_pool_max: IntGauge,
    pub db_pool_acquire_wait: Gauge,
    pub orders_finished_total: IntCounterVec,

    pub tasks_pending: IntGauge,
    pub tasks_executing: IntGauge,
    pub dead_letter_queue: IntGauge,
    pub worker_active: IntGauge,
    pub executing_over_5m: IntGauge,
    pub orders_open: IntGaugeVec,
    pub orders_needing_attention: IntGauge,
    pub oldest_processing_age: Gauge,
    pub paused: IntGauge,
    pub fault_injection_enabled: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

/// Seconds, finer than [`latency_buckets`] where claims live (a quarter of a millisecond to
/// tens of milliseconds), so a p99 drift of 1.5x is visible (the soak's measure).
fn claim_buckets() -> Vec<f64> {
    vec![
        0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
}

/// Seconds, from a millisecond to ten minutes.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0, 600.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let c = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }
        let build = gauge_vec(
            &r,
            "tally_build_info",
            "Tally build; the value is 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Metrics {
            tasks_total: counter_vec(
                &r,
                "delivery_tasks_total",
                "Task attempts finished by this process, by the status they left the task in.",
                &["status"],
            ),
            retries_total: counter(
                &r,
                "delivery_retries_total",
                "Attempts that scheduled a retry (failures and partial deliveries).",
            ),
            orphans_recovered_total: counter(
                &r,
                "delivery_orphans_recovered_total",
                "Tasks whose worker lease expired, recovered by this sweeper.",
            ),
            units_total: counter_vec(
                &r,
                "delivery_units_total",
                "Units delivered or dead-lettered by this process.",
                &["outcome"],
            ),
            task_duration: histogram(
                &r,
                "delivery_task_duration_seconds",
                "Duration of one handler attempt.",
                latency_buckets(),
            ),
            batch_duration: histogram(
                &r,
                "delivery_batch_duration_seconds",
                "One claim batch, from the claim to its last outcome written.",
                latency_buckets(),
            ),
            attempts_total: counter_vec(
                &r,
                "tally_attempts_total",
                "Attempts by kind and outcome (fenced: the claim was taken away; the outcome was dropped).",
                &["kind", "outcome"],
            ),
            pickup_latency: histogram(
                &r,
                "tally_pickup_latency_seconds",
                "From a task becoming claimable to its claim.",
                latency_buckets(),
            ),
            recovery: histogram(
                &r,
                "tally_recovery_seconds",
                "A re-run's wait: from the end of the failed (or orphaned) attempt to the next claim.",
                latency_buckets(),
            ),
            claim_batch_size: histogram(
                &r,
                "tally_claim_batch_size",
                "Tasks taken by one claim statement.",
                vec![
                    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ],
            ),
            claim_duration: histogram(
                &r,
                "tally_claim_duration_seconds",
                "Duration of one claim statement.",
                claim_buckets(),
            ),
            order_completion: histogram(
                &r,
                "tally_order_completion_seconds",
                "From an order's creation to COMPLETED.",
                vec![
                    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
                    14400.0, 43200.0, 86400.0,
                ],
            ),
            invariant_checks_total: counter_vec(
                &r,
                "tally_invariant_checks_total",
                "Per-order invariant checks run by this sweeper.",
                &["result"],
            ),
            leader: gauge_vec(
                &r,
                "tally_leader",
                "1 while this process holds the leader lease of the role.",
                &["role"],
            ),
            http_requests_total: counter_vec(
                &r,
                "tally_http_requests_total",
                "API requests by route template, method and status.",
                &["route", "method", "status"],
            ),
            http_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "tally_http_request_duration_seconds",
                        "API request duration by route template.",
                    )
                    .buckets(latency_buckets()),
                    &["route"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("registered once");
                h
            },
            callbacks_total: counter_vec(
                &r,
                "tally_callbacks_total",
                "Order callback attempts by outcome.",
                &["outcome"],
            ),
            db_pool_connections: gauge_vec(
                &r,
                "tally_db_pool_connections",
                "Connections of this process's pool.",
                &["state"],
            ),
            db_pool_acquire_wait: {
                let g = Gauge::new(
                    "tally_db_pool_acquire_wait_seconds",
                    "How long taking a connection from this process's pool took, sampled at each scrape.",
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("registered once");
                g
            },
            orders_finished_total: counter_vec(
                &r,
                "tally_orders_finished_total",
                "Orders this process moved to a final status (COMPLETED, PARTIAL, CANCELLED).",
                &["status"],
            ),
            db_pool_max: gauge(
                &r,
                "tally_db_pool_max_connections",
                "Most connections this process's pool may open.",
            ),

            tasks_pending: gauge(
                &c,
                "delivery_tasks_pending",
                "Tasks waiting to run (PENDING and FAILED_RETRYING), cluster-wide.",
            ),
            tasks_executing: gauge(
                &c,
                "delivery_tasks_executing",
                "Tasks EXECUTING, cluster-wide.",
            ),
            dead_letter_queue: gauge(
                &c,
                "delivery_dead_letter_queue",
                "Dead-lettered tasks (FAILED_PERMANENT) of PROCESSING orders, which an operator can replay; cluster-wide.",
            ),
            worker_active: gauge(
                &c,
                "delivery_worker_active",
                "Live processes with the worker role.",
            ),
            executing_over_5m: gauge(
                &c,
                "tally_tasks_executing_over_5m",
                "Tasks EXECUTING whose claim is older than 5 minutes.",
            ),
            orders_open: gauge_vec(
                &c,
                "tally_orders_open",
                "Orders not finished, by status.",
                &["status"],
            ),
            orders_needing_attention: gauge(
                &c,
                "tally_orders_needing_attention",
                "PROCESSING orders whose remaining tasks are all dead-lettered.",
            ),
            oldest_processing_age: {
                let g = Gauge::new(
                    "tally_oldest_processing_order_age_seconds",
                    "Age of the oldest PROCESSING order (0 when none).",
                )
                .expect("valid metric");
                c.register(Box::new(g.clone())).expect("registered once");
                g
            },
            paused: gauge(&c, "tally_paused", "1 while processing is globally paused."),
            fault_injection_enabled: gauge(
                &c,
                "tally_fault_injection_enabled",
                "1 while fault injection is enabled.",
            ),
            registry: r,
            cluster: c,
            cluster_export: AtomicBool::new(false),
        };
        for s in ["COMPLETED", "FAILED_RETRYING", "FAILED_PERMANENT"] {
            m.tasks_total.with_label_values(&[s]);
        }
        for o in ["delivered", "failed"] {
            m.units_total.with_label_values(&[o]);
        }
        for o in ["passed", "failed"] {
            m.invariant_checks_total.with_label_values(&[o]);
        }
        m.leader.with_label_values(&["sweeper"]);
        for o in ["delivered", "retry", "failed"] {
            m.callbacks_total.with_label_values(&[o]);
        }
        for st in ["COMPLETED", "PARTIAL", "CANCELLED"] {
            m.orders_finished_total.with_label_values(&[st]);
        }
        m
    }

    /// Creates a kind's attempt series at 0, so that `increase()` sees their first event.
    pub fn touch_kind(&self, kind: &str) {
        for o in ATTEMPT_OUTCOMES {
            self.attempts_total.with_label_values(&[kind, o]);
        }
    }

    /// Whether this process exports the cluster-wide gauges (it leads, and they are fresh).
    pub fn set_cluster_export(&self, on: bool) {
        self.cluster_export.store(on, Ordering::Relaxed);
    }

    /// The text exposition of everything this process exports now.
    pub fn render(&self, store: Option<&Store>) -> String {
        if let Some(store) = store {
            let pool = store.pool();
            let idle = pool.num_idle() as i64;
            self.db_pool_connections
                .with_label_values(&["idle"])
                .set(idle);
            self.db_pool_connections
                .with_label_values(&["in_use"])
                .set(i64::from(pool.size()) - idle);
            self.db_pool_max
                .set(i64::from(pool.options().get_max_connections()));
        }
        let mut families = self.registry.gather();
        if self.cluster_export.load(Ordering::Relaxed) {
            families.extend(self.cluster.gather());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the exposition is UTF-8")
    }
}

/// Observes a claim batch's duration when its last task's outcome is written (the last
/// clone is dropped).
pub struct BatchTimer {
    started: Instant,
    metrics: Arc<Metrics>,
}

impl BatchTimer {
    pub fn start(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(BatchTimer {
            started: Instant::now(),
            metrics,
        })
    }
}

impl Drop for BatchTimer {
    fn drop(&mut self) {
        self.metrics
            .batch_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Serves `/metrics`, and the probes `/livez` and `/readyz`, on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let probe_store = store.clone();
    let app = axum::Router::new()
        .route("/livez", get(crate::api::livez))
        .route(
            "/readyz",
            get(move || {
                let store = probe_store.clone();
                async move { crate::api::readiness(&store).await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let (metrics, store) = (metrics.clone(), store.clone());
                async move {
                    // The pool's wait right now: take a connection and give it back.
                    let started = Instant::now();
                    let got =
                        tokio::time::timeout(Duration::from_secs(5), store.pool().acquire()).await;
                    metrics
                        .db_pool_acquire_wait
                        .set(started.elapsed().as_secs_f64());
                    drop(got);
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        metrics.render(Some(&store)),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}

/// How often the leader refreshes the cluster-wide gauges.
pub const CLUSTER_GAUGES_EVERY: Duration = Duration::from_secs(5);
