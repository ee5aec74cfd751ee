//! The engine on a real PostgreSQL: fan-out, claim, exactly-once delivery, retries,
//! dead letters, accounting, fairness, shutdown, and the claim's plan.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tally::config::Role;
use tally::domain::{ChunkPlan, ErrorClass, TaskEvent};
use tally::generator::{Generator, GeneratorConfig};
use tally::stats::Stats;
use tally::worker::{Worker, WorkerConfig};
use uuid::Uuid;

#[tokio::test]
async fn generated_tasks_follow_the_chunk_plan_exactly() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(15_000, 400).generated(&db.store).await;
    let sizes: Vec<i32> =
        sqlx::query_scalar("SELECT quantity FROM order_tasks WHERE order_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(db.pool())
            .await
            .unwrap();
    let plan: Vec<i32> = ChunkPlan::new(15_000, 400)
        .unwrap()
        .sizes()
        .map(|s| s as i32)
        .collect();
    assert_eq!(sizes.len(), 38);
    assert_eq!(sizes, plan);
    assert_eq!(order_status(&db.store, id).await, "PROCESSING");
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn generator_is_idempotent_under_concurrency() {
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for q in [1u64, 399, 400, 401, 15_000, 100_000] {
        ids.push(OrderSpec::units(q, 400).create(&db.store).await);
    }
    // Eight generators (separate pools, like separate pods) race over the same orders.
    let mut racers = Vec::new();
    for i in 0..8 {
        let store = db.another_store().await;
        racers.push(tokio::spawn(async move {
            let g = Generator::new(
                store,
                GeneratorConfig {
                    orders_per_pass_max: 2,
                    ..Default::default()
                },
                format!("g{i}"),
            );
            let mut made = 0;
            for _ in 0..10 {
                made += g.run_once().await.unwrap().tasks;
            }
            made
        }));
    }
    let mut total = 0;
    for r in racers {
        total += r.await.unwrap();
    }
    let expected: u64 = [1u64, 399, 400, 401, 15_000, 100_000]
        .iter()
        .map(|q| q.div_ceil(400))
        .sum();
    assert_eq!(total, expected);
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await as u64,
        expected
    );
    assert_eq!(scalar_i64(&db.store, "SELECT count(*) FROM (SELECT order_id, seq FROM order_tasks GROUP BY 1, 2 HAVING count(*) > 1) d").await, 0);
    assert_eq!(scalar_i64(&db.store, "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'tasks_generated'").await, 6);
    // Running again changes nothing.
    assert_eq!(db.store.generate_tasks(100, "again").await.unwrap(), (0, 0));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn a_generation_pass_stays_within_its_task_budget_but_always_progresses() {
    let db = TestDb::new().await;
    for _ in 0..3 {
        OrderSpec::units(1000, 1).create(&db.store).await; // 1,000 tasks each
    }
    let pass = |budget| {
        let store = db.store.clone();
        async move {
            store
                .generate_tasks_budgeted(50, budget, "t")
                .await
                .unwrap()
        }
    };
    assert_eq!(
        pass(2500).await,
        (2, 2000),
        "two orders fit, the third would not"
    );
    assert_eq!(
        pass(10).await,
        (1, 1000),
        "the oldest order is taken even over budget"
    );
    assert_eq!(pass(10).await, (0, 0));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn a_million_unit_order_fans_out_in_one_statement() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(1_000_000, 400).create(&db.store).await;
    let (orders, tasks) = db.store.generate_tasks(10, "test").await.unwrap();
    assert_eq!((orders, tasks), (1, 2500));
    let sum: i64 =
        sqlx::query_scalar("SELECT sum(quantity)::bigint FROM order_tasks WHERE order_id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(sum, 1_000_000);
}

#[tokio::test]
async fn concurrent_workers_deliver_every_task_exactly_once() {
    let db = TestDb::new().await;
    let mut orders = Vec::new();
    for q in [5_000u64, 1, 777, 12_345] {
        orders.push(OrderSpec::units(q, 50).generated(&db.store).await);
    }
    let total_tasks = scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await;
    let rec = Recorder::new(Duration::from_millis(2));
    // Four worker pods with their own pools, plus a sweeper.
    let mut pods = Vec::new();
    for _ in 0..4 {
        pods.push(
            Pod::start(
                settings(&db.url, &[Role::Worker]),
                handlers_for("test", rec.clone()),
            )
            .await,
        );
    }
    pods.push(
        Pod::start(
            settings(&db.url, &[Role::Sweeper]),
            handlers_for("test", rec.clone()),
        )
        .await,
    );
    wait_for_count(
        &db.store,
        "SELECT count(*) FROM orders WHERE status <> 'COMPLETED'",
        0,
        Duration::from_secs(60),
    )
    .await;
    for p in pods {
        p.stop().await;
    }
    let calls = rec.calls.lock().unwrap().clone();
    assert_eq!(calls.len() as i64, total_tasks, "every task ran");
    assert!(
        calls.values().all(|&n| n == 1),
        "no task ran twice: {calls:?}"
    );
    assert_eq!(*rec.overlaps.lock().unwrap(), 0);
    for id in orders {
        let o = db.store.get_order(id).await.unwrap().unwrap();
        assert_eq!(o.delivered, o.quantity);
    }
    // Every claim is audited, and each task was claimed exactly once.
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'claimed'"
        )
        .await,
        total_tasks
    );
    assert!(audit_all(&db.store).await.is_empty());
    // Workers deregistered on the way out.
    assert_no_live_workers(&db.store).await;
}

#[tokio::test]
async fn an_order_completes_in_the_statement_that_delivers_its_last_unit() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(1000, 100).generated(&db.store).await;
    let rec = Recorder::new(Duration::ZERO);
    // Worker only: no sweeper, so nothing but the completion write can finalise the order.
    let pod = Pod::start(
        settings(&db.url, &[Role::Worker]),
        handlers_for("test", rec),
    )
    .await;
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(10)).await;
    pod.stop().await;
    let (finished, last_task): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT o.finished_at, max(t.executed_at) FROM orders o JOIN order_tasks t ON t.order_id = o.id WHERE o.id = $1 GROUP BY o.finished_at",
    )
    .bind(id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        finished, last_task,
        "finished in the same transaction as the last delivery"
    );
    let reason: String = sqlx::query_scalar("SELECT transition_reason FROM order_task_transitions WHERE order_id = $1 AND task_id IS NULL AND to_state = 'COMPLETED'")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(reason, "all_units_delivered");
}

#[tokio::test]
async fn retries_follow_the_backoff_in_database_time_then_dead_letter() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        quantity: 10,
        chunk_size: 10,
        max_attempts: 3,
        ..Default::default()
    }
    .generated(&db.store)
    .await;
    let rec = Recorder::new(Duration::ZERO);
    *rec.fail_first.lock().unwrap() = Some((99, ErrorClass::NetworkError));
    let s = settings(&db.url, &[Role::Worker]);
    let backoff = s.worker.backoff;
    let pod = Pod::start(s, handlers_for("test", rec.clone())).await;
    wait_for_count(
        &db.store,
        "SELECT count(*) FROM order_tasks WHERE status = 'FAILED_PERMANENT'",
        1,
        Duration::from_secs(20),
    )
    .await;
    pod.stop().await;
    assert_eq!(rec.total_calls(), 3, "max attempts");
    // Gaps between the end of an attempt and the next claim, from the audit trail (DB time).
    let times: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT transition_reason, occurred_at FROM order_task_transitions WHERE order_id = $1 AND task_id IS NOT NULL ORDER BY id",
    )
    .bind(id)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let reasons: Vec<&str> = times.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "claimed",
            "retry_scheduled",
            "claimed",
            "retry_scheduled",
            "claimed",
            "dead_lettered"
        ]
    );
    for (attempt, pair) in [(1u32, (1usize, 2usize)), (2, (3, 4))] {
        let gap = (times[pair.1].1 - times[pair.0].1).to_std().unwrap();
        let (lo, _) = backoff.bounds(attempt);
        assert!(
            gap >= lo,
            "attempt {attempt}: retried after {gap:?}, before the backoff floor {lo:?}"
        );
        assert!(
            gap < lo + Duration::from_secs(2),
            "attempt {attempt}: retried only after {gap:?}"
        );
    }
    let o = db.store.get_order(id).await.unwrap().unwrap();
    assert_eq!(
        (
            o.status.as_str(),
            o.failed_permanent_units,
            o.needs_attention
        ),
        ("PROCESSING", 10, true)
    );
    let (attempts, class): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error_class FROM order_tasks WHERE order_id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((attempts, class.as_str()), (3, "NetworkError"));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn retry_after_is_set_from_database_time() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(5, 5).generated(&db.store).await;
    let w = Uuid::new_v4();
    let t = claim_one(&db.store, w).await;
    let failed = TaskEvent::Failed {
        class: ErrorClass::TimeoutError,
        retry_in: None,
    };
    // draw 0.0: the un-jittered delay, base 5 s for attempt 1.
    assert_eq!(apply_event(&db.store, &t, failed).await, vec![t.id]);
    let secs: f64 = sqlx::query_scalar("SELECT extract(epoch FROM retry_after - executed_at)::float8 FROM order_tasks WHERE order_id = $1")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(
        (secs - 5.0).abs() < 0.001,
        "retry_after = executed_at + 5 s, got {secs}"
    );
    // Not claimable before then.
    assert!(
        db.store
            .claim_tasks(w, 10, &["test".into()], Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    sqlx::query("UPDATE order_tasks SET retry_after = now() - interval '1 ms'")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(
        db.store
            .claim_tasks(w, 10, &["test".into()], Duration::from_secs(30))
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn validation_errors_dead_letter_at_once() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(300, 100).generated(&db.store).await;
    let rec = Recorder::new(Duration::ZERO);
    *rec.fail_first.lock().unwrap() = Some((99, ErrorClass::ValidationError));
    let pod = Pod::start(
        settings(&db.url, &[Role::Worker]),
        handlers_for("test", rec.clone()),
    )
    .await;
    wait_for_attention(&db.store, id, Duration::from_secs(10)).await;
    pod.stop().await;
    assert_eq!(rec.total_calls(), 3, "one attempt per task");
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn partial_delivery_is_counted_once_and_the_rest_requeued() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(100, 100).generated(&db.store).await;
    let w = Uuid::new_v4();
    let t = claim_one(&db.store, w).await;
    apply_event(&db.store, &t, TaskEvent::Delivered { units: 30 }).await;
    let o = db.store.get_order(id).await.unwrap().unwrap();
    assert_eq!((o.delivered, o.status.as_str()), (30, "PROCESSING"));
    sqlx::query("UPDATE order_tasks SET retry_after = now()")
        .execute(db.pool())
        .await
        .unwrap();
    let t = claim_one(&db.store, w).await;
    assert_eq!((t.snapshot().remaining(), t.attempts), (70, 2));
    apply_event(&db.store, &t, TaskEvent::Delivered { units: 70 }).await;
    let o = db.store.get_order(id).await.unwrap().unwrap();
    assert_eq!((o.delivered, o.status.as_str()), (100, "COMPLETED"));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn a_handler_past_the_claim_timeout_is_cancelled_as_timeout_error() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        quantity: 1,
        chunk_size: 1,
        max_attempts: 1,
        ..Default::default()
    }
    .generated(&db.store)
    .await;
    let rec = Recorder::new(Duration::from_secs(600));
    let mut s = settings(&db.url, &[Role::Worker]);
    s.worker.claim_timeout = Duration::from_millis(300);
    let pod = Pod::start(s, handlers_for("test", rec)).await;
    let store = db.store.clone();
    wait_until(
        Duration::from_secs(10),
        "timed out task dead-lettered",
        || {
            let store = store.clone();
            async move { store.get_order(id).await.unwrap().unwrap().needs_attention }
        },
    )
    .await;
    pod.stop().await;
    let class: String =
        sqlx::query_scalar("SELECT last_error_class FROM order_tasks WHERE order_id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(class, "TimeoutError");
}

#[tokio::test]
async fn graceful_shutdown_hands_back_without_burning_attempts() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(40, 1).generated(&db.store).await;
    let rec = Recorder::new(Duration::from_secs(600));
    let mut s = settings(&db.url, &[Role::Worker]);
    s.worker.concurrency_max = 8;
    s.worker.batch_size_max = 8;
    s.worker.shutdown_grace = Duration::from_millis(300);
    let pod = Pod::start(s, handlers_for("test", rec.clone())).await;
    let pod_id = pod.id;
    let store = db.store.clone();
    wait_until(Duration::from_secs(10), "8 tasks executing", || {
        let store = store.clone();
        async move { store.executing_count(Some(pod_id)).await.unwrap() == 8 }
    })
    .await;
    pod.stop().await;
    assert_eq!(rec.total_calls(), 8);
    // Nothing left executing, every task back in the queue with zero attempts.
    assert_all_handed_back(&db.store, id).await;
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'handed_back'"
        )
        .await,
        8
    );
    let stopped: bool =
        sqlx::query_scalar("SELECT stopped_at IS NOT NULL FROM workers WHERE id = $1")
            .bind(pod_id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(stopped, "the worker deregistered");
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn global_pause_stops_claims_and_resume_restarts_them() {
    let db = TestDb::new().await;
    OrderSpec::units(10, 1).generated(&db.store).await;
    let kinds = vec!["test".to_string()];
    db.store.set_paused(true, "test").await.unwrap();
    assert!(
        db.store
            .claim_tasks(Uuid::new_v4(), 10, &kinds, Duration::from_secs(5))
            .await
            .unwrap()
            .is_empty()
    );
    db.store.set_paused(false, "test").await.unwrap();
    db.store
        .set_batch_size_override(Some(3), "test")
        .await
        .unwrap();
    assert_eq!(
        db.store
            .claim_tasks(Uuid::new_v4(), 10, &kinds, Duration::from_secs(5))
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn claims_interleave_orders_and_priority_wins() {
    let db = TestDb::new().await;
    let kinds = vec!["test".to_string()];
    let lease = Duration::from_secs(60);
    let giant = OrderSpec::units(1_000_000, 400).generated(&db.store).await;
    // A worker has already taken the giant's first 500 tasks.
    let first = db
        .store
        .claim_tasks(Uuid::new_v4(), 500, &kinds, lease)
        .await
        .unwrap();
    assert!(
        first.iter().all(|t| t.order_id == giant),
        "work-conserving: the giant alone fills a batch"
    );
    let small = OrderSpec::units(800, 400).generated(&db.store).await;
    let next = db
        .store
        .claim_tasks(Uuid::new_v4(), 10, &kinds, lease)
        .await
        .unwrap();
    let small_claimed = next.iter().filter(|t| t.order_id == small).count();
    assert_eq!(
        small_claimed, 2,
        "the small order's tasks come first in the next claim"
    );
    assert_eq!(next.len(), 10, "and the giant fills the rest of the batch");
    let urgent = OrderSpec {
        priority: 5,
        ..OrderSpec::units(400, 400)
    }
    .generated(&db.store)
    .await;
    let next = db
        .store
        .claim_tasks(Uuid::new_v4(), 1, &kinds, lease)
        .await
        .unwrap();
    assert_eq!(next[0].order_id, urgent, "priority wins over fairness");
}

#[tokio::test]
async fn a_claim_batch_takes_whole_runs_of_an_order() {
    let db = TestDb::new().await;
    let kinds = vec!["test".to_string()];
    let lease = Duration::from_secs(60);
    let run = tally::store::CLAIM_RUN;
    assert!(tally::store::CLAIM_SQL.contains(&format!("t.seq / {run}, t.id")));
    let mut orders = Vec::new();
    for _ in 0..20 {
        orders.push(OrderSpec::units(100, 1).generated(&db.store).await);
    }
    // 20 orders of 100 tasks: a batch of 1,000 is the first run of 15 orders and 40 tasks
    // of the 16th, not the first task of each order as a task-by-task interleave would take.
    let first = db
        .store
        .claim_tasks(Uuid::new_v4(), 1000, &kinds, lease)
        .await
        .unwrap();
    assert_eq!(first.len(), 1000);
    assert!(first.iter().all(|t| t.seq < run), "first runs only");
    let touched: std::collections::BTreeSet<Uuid> = first.iter().map(|t| t.order_id).collect();
    assert_eq!(touched.len(), 16, "one batch touches few orders");
    assert_eq!(
        touched,
        orders[..16].iter().copied().collect(),
        "in arrival order"
    );
    // The next batch finishes every order's first run before any order's second.
    let next = db
        .store
        .claim_tasks(Uuid::new_v4(), 300, &kinds, lease)
        .await
        .unwrap();
    let first_runs = next.iter().filter(|t| t.seq < run).count();
    assert_eq!(first_runs, 24 + 4 * 64);
    let second_runs: Vec<_> = next.iter().filter(|t| t.seq >= run).collect();
    assert_eq!(second_runs.len(), 300 - first_runs);
    assert!(
        second_runs.iter().all(|t| t.order_id == orders[0]),
        "then the oldest order's second run"
    );
}

#[tokio::test]
async fn a_small_order_behind_a_giant_starts_within_seconds() {
    let db = TestDb::new().await;
    OrderSpec::units(1_000_000, 400).create(&db.store).await;
    let rec = Recorder::new(Duration::from_millis(200));
    let mut s = settings(&db.url, &[Role::Generator, Role::Worker]);
    s.worker.concurrency_max = 8;
    s.worker.batch_size_max = 8;
    let pod = Pod::start(s, handlers_for("test", rec.clone())).await;
    let store = db.store.clone();
    wait_until(
        Duration::from_secs(10),
        "the giant is being worked on",
        || {
            let store = store.clone();
            async move { store.executing_count(None).await.unwrap() == 8 }
        },
    )
    .await;
    let small = OrderSpec::units(10, 10).create(&db.store).await;
    wait_for_status(&db.store, small, "COMPLETED", Duration::from_secs(10)).await;
    let waited: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(x.occurred_at) - o.created_at)::float8 FROM orders o \
         JOIN order_task_transitions x ON x.order_id = o.id AND x.transition_reason = 'claimed' WHERE o.id = $1 GROUP BY o.created_at",
    )
    .bind(small)
    .fetch_one(db.pool())
    .await
    .unwrap();
    pod.stop().await;
    assert!(
        waited < 3.0,
        "the small order waited {waited:.2} s behind the giant"
    );
    let giant_left = scalar_i64(
        &db.store,
        "SELECT count(*) FROM order_tasks WHERE status IN ('PENDING', 'FAILED_RETRYING')",
    )
    .await;
    assert!(
        giant_left > 2000,
        "the giant was still far from drained ({giant_left} left)"
    );
}

#[tokio::test]
async fn the_claim_uses_its_partial_index_over_a_million_finished_tasks() {
    let db = TestDb::new().await;
    // A million finished tasks (what a busy month leaves behind), plus a few claimable ones.
    OrderSpec::units(1_000_000, 1).create(&db.store).await;
    db.store.generate_tasks(1, "test").await.unwrap();
    sqlx::query("UPDATE order_tasks SET status = 'COMPLETED', delivered = quantity, attempts = 1")
        .execute(db.pool())
        .await
        .unwrap();
    // Their ring rows went with their claims.
    sqlx::query("TRUNCATE task_ready")
        .execute(db.pool())
        .await
        .unwrap();
    OrderSpec::units(100, 1).generated(&db.store).await;
    sqlx::query("VACUUM ANALYZE order_tasks")
        .execute(db.pool())
        .await
        .unwrap();
    assert_claim_walks_its_indexes(&explain_claim(&db).await);
    // And the real claim statement returns promptly.
    let t = std::time::Instant::now();
    let got = db
        .store
        .claim_tasks(
            Uuid::new_v4(),
            100,
            &["test".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 100);
    eprintln!(
        "claim of 100 over 1,000,000 finished tasks took {:?}",
        t.elapsed()
    );
}

/// The regression this guards: the claim's paused-kind and paused-order filters, written
/// `kind <> ALL(...)` and `order_id <> ALL(...)`, were estimated to match nothing when one
/// kind or one order filled the table, so the planner sorted every claimable row (an
/// external merge sort, 570 ms per claim at 200,000 tasks) instead of walking the claim
/// index. The test EXPLAINs the real statement, with its parameters bound, over a freshly
/// analysed table that is one giant order of one kind, all claimable.
#[tokio::test]
async fn the_real_claim_walks_its_index_when_one_kind_fills_the_queue() {
    let db = TestDb::new().await;
    OrderSpec::units(200_000, 1).create(&db.store).await;
    while db.store.generate_tasks(100, "test").await.unwrap().0 > 0 {}
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM order_tasks WHERE status = 'PENDING'"
        )
        .await,
        200_000
    );
    sqlx::query("VACUUM ANALYZE order_tasks")
        .execute(db.pool())
        .await
        .unwrap();
    assert_claim_walks_its_indexes(&explain_claim(&db).await);
}

/// EXPLAIN of the real claim statement with its parameters bound.
async fn explain_claim(db: &TestDb) -> String {
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        tally::store::CLAIM_SQL
    )))
    .bind(Uuid::new_v4())
    .bind(1000i64)
    .bind(vec!["test".to_owned()])
    .bind(10.0f64)
    .bind("explain")
    .bind(Uuid::new_v4())
    .fetch_all(db.pool())
    .await
    .unwrap();
    plan.join("\n")
}

/// New work is walked in the ring's claim order, due retries in their own index, and the
/// tasks are then locked by key: nothing reads the whole queue or sorts it.
fn assert_claim_walks_its_indexes(plan: &str) {
    assert!(
        plan.contains("Merge Append") && plan.contains("priority_run_task_id_idx"),
        "new work must be walked in the ring's index order: {plan}"
    );
    assert!(
        plan.contains("order_tasks_retry_idx"),
        "due retries must be walked in their own index: {plan}"
    );
    assert!(
        plan.contains("Index Scan using order_tasks_pkey"),
        "the tasks must be locked by key: {plan}"
    );
    assert!(
        !plan.contains("Seq Scan on order_tasks"),
        "the claim must not read the whole queue: {plan}"
    );
    // The ring is merged in index order, never sorted: its only "Sort Key" is the Merge
    // Append's.
    let lines: Vec<&str> = plan.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.contains("Sort Key: r.priority") {
            assert!(
                i > 0 && lines[i - 1].contains("Merge Append"),
                "the index order is the claim order: {plan}"
            );
        }
    }
}

/// The completion write must stay one primary-key lookup per task whatever the statistics
/// say. With a status test or an id list in its WHERE, statistics taken while few tasks
/// were EXECUTING (a VACUUM ANALYZE of a full queue, or an autovacuum mid-run) let the
/// planner start from a one-row estimate and re-run the unnest for every row it found:
/// 500 × 500 rows, 130-150 ms per batch instead of 10 (a 1,000,000-task bench fell from
/// 22,000 to 13,000 tasks/s). Hash and merge joins are switched off here so the planner
/// must pick among nested loops, as it does when those estimates make them look cheapest.
#[tokio::test]
async fn the_completion_write_looks_tasks_up_by_key_whatever_the_statistics() {
    let db = TestDb::new().await;
    OrderSpec::units(20_000, 1).create(&db.store).await;
    while db.store.generate_tasks(100, "test").await.unwrap().0 > 0 {}
    sqlx::query("VACUUM ANALYZE order_tasks")
        .execute(db.pool())
        .await
        .unwrap();
    let claimed = db
        .store
        .claim_tasks(
            Uuid::new_v4(),
            500,
            &["test".to_owned()],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 500);
    let n = claimed.len();
    let ids: Vec<i64> = claimed.iter().map(|t| t.id).collect();
    let tokens: Vec<Uuid> = claimed.iter().map(|t| t.claim_token).collect();
    let delivered: Vec<i32> = claimed.iter().map(|t| t.quantity).collect();

    let mut tx = db.pool().begin().await.unwrap();
    for setting in ["enable_hashjoin", "enable_mergejoin"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL {setting} = off")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, TIMING OFF) {}",
        tally::store::APPLY_SQL
    )))
    .bind(&ids)
    .bind(&tokens)
    .bind(vec!["COMPLETED"; n])
    .bind(vec![1i32; n])
    .bind(&delivered)
    .bind(vec![0i64; n])
    .bind(vec![0i64; n])
    .bind(vec![None::<f64>; n])
    .bind(vec!["completed"; n])
    .bind(vec![None::<&str>; n])
    .bind(vec![None::<&str>; n])
    .bind(false)
    .bind("explain")
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using order_tasks_pkey on order_tasks t"),
        "{plan}"
    );
    for line in plan.lines().filter(|l| l.contains("Function Scan")) {
        assert!(
            line.trim_end().ends_with("loops=1)"),
            "the unnest of the input runs once per statement, not once per task: {plan}"
        );
    }
    assert!(
        plan.contains("Function Scan on i"),
        "the plan reads its input: {plan}"
    );
}

#[tokio::test]
async fn in_process_worker_reports_its_counters() {
    let db = TestDb::new().await;
    OrderSpec::units(20, 10).generated(&db.store).await;
    let rec = Recorder::new(Duration::ZERO);
    let stats = Arc::new(Stats::default());
    let (trigger, shutdown) = tally::shutdown::channel();
    let w = Worker::new(
        db.store.clone(),
        WorkerConfig {
            poll_interval: Duration::from_millis(50),
            ..Default::default()
        },
        handlers_for("test", rec),
        Uuid::new_v4(),
        stats.clone(),
    );
    let h = tokio::spawn(w.run(shutdown));
    wait_for_count(
        &db.store,
        "SELECT count(*) FROM orders WHERE status = 'COMPLETED'",
        1,
        Duration::from_secs(10),
    )
    .await;
    trigger.fire();
    let report = h.await.unwrap();
    assert_eq!(report.claimed, 2);
    let c = stats.counters();
    assert_eq!(
        (c.processed, c.completed, c.failed, c.retries),
        (2, 2, 0, 0)
    );
}

#[tokio::test]
async fn delivery_is_correct_on_polling_alone_without_listen_notify() {
    // As behind PgBouncer in transaction mode: no LISTEN anywhere.
    let db = TestDb::new().await;
    let id = OrderSpec::units(2000, 100).create(&db.store).await;
    let rec = Recorder::new(Duration::ZERO);
    let mut s = settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]);
    s.worker.listen = false;
    s.generator.listen = false;
    let pod = Pod::start(s, handlers_for("test", rec.clone())).await;
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(20)).await;
    // No session of this database ever ran LISTEN (a listening session keeps it as its last query).
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    pod.stop().await;
    assert_eq!(listening, 0);
    assert_eq!(rec.total_calls(), 20);
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn runtime_connections_carry_their_safety_settings() {
    let db = TestDb::new().await;
    let show = |name: &'static str| {
        let store = db.store.clone();
        async move {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    assert_eq!(show("plan_cache_mode").await, "force_custom_plan");
    assert_eq!(show("statement_timeout").await, "30s");
    assert_eq!(show("idle_in_transaction_session_timeout").await, "1min");
}

#[tokio::test]
async fn small_orders_are_fanned_out_at_intake_exactly_as_the_generator_would() {
    use tally::intake::{IntakeDefaults, OrderRequest, submit};
    use tally::store::IntakeOutcome;
    let db = TestDb::new().await;
    let mut wake = sqlx::postgres::PgListener::connect_with(db.pool())
        .await
        .unwrap();
    wake.listen_all(["tally_tasks", "tally_orders"])
        .await
        .unwrap();
    let defaults = IntakeDefaults {
        inline_fanout_max_tasks: 64,
        ..IntakeDefaults::default()
    };
    let order = |quantity: u64| OrderRequest {
        kind: "test".into(),
        target: "acct-42".into(),
        quantity,
        chunk_size: Some(400),
        ..Default::default()
    };
    let created = |o: IntakeOutcome| match o {
        IntakeOutcome::Created(id) => id,
        other => panic!("{other:?}"),
    };
    // 25,600 units are 64 tasks (the limit); 25,601 are 65.
    for quantity in [1u64, 399, 401, 15_000, 25_600] {
        let id = created(
            submit(&db.store, &order(quantity), defaults, None)
                .await
                .unwrap(),
        );
        let n = wake.recv().await.unwrap();
        assert_eq!(
            n.channel(),
            "tally_tasks",
            "workers are woken, not the generator"
        );
        assert_eq!(order_status(&db.store, id).await, "PROCESSING");
        let sizes: Vec<i32> =
            sqlx::query_scalar("SELECT quantity FROM order_tasks WHERE order_id = $1 ORDER BY seq")
                .bind(id)
                .fetch_all(db.pool())
                .await
                .unwrap();
        let plan: Vec<i32> = ChunkPlan::new(quantity, 400)
            .unwrap()
            .sizes()
            .map(|s| s as i32)
            .collect();
        assert_eq!(sizes, plan, "{quantity} units");
        let audit: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT from_state, to_state, transition_reason, actor_id \
             FROM order_task_transitions WHERE order_id = $1",
        )
        .bind(id)
        .fetch_all(db.pool())
        .await
        .unwrap();
        assert_eq!(
            audit,
            [(
                "PENDING".to_owned(),
                "PROCESSING".to_owned(),
                "tasks_generated".to_owned(),
                "intake".to_owned()
            )]
        );
    }
    let big = created(
        submit(&db.store, &order(25_601), defaults, None)
            .await
            .unwrap(),
    );
    assert_eq!(wake.recv().await.unwrap().channel(), "tally_orders");
    assert_eq!(order_status(&db.store, big).await, "PENDING");
    assert_eq!(db.store.generate_tasks(100, "test").await.unwrap(), (1, 65));

    // A replayed or conflicting key fans nothing out a second time.
    let first = created(
        submit(&db.store, &order(800), defaults, Some("k-1"))
            .await
            .unwrap(),
    );
    assert_eq!(
        submit(&db.store, &order(800), defaults, Some("k-1"))
            .await
            .unwrap(),
        IntakeOutcome::Replayed(first)
    );
    assert_eq!(
        submit(&db.store, &order(900), defaults, Some("k-1"))
            .await
            .unwrap(),
        IntakeOutcome::Conflict(first)
    );
    let first_tasks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_tasks WHERE order_id = $1")
            .bind(first)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(first_tasks, 2);
    let expected: u64 = [1u64, 399, 401, 15_000, 25_600, 25_601, 800]
        .iter()
        .map(|q| q.div_ceil(400))
        .sum();
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await as u64,
        expected
    );
    assert_eq!(db.store.generate_tasks(100, "test").await.unwrap(), (0, 0));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn order_counter_updates_stay_hot() {
    // The completion batch's order update (see `store::tasks::APPLY`) changes these columns on
    // every batch; if an index covered one of them, none of those updates could be HOT.
    let db = TestDb::new().await;
    let id = OrderSpec::units(800, 400).generated(&db.store).await;
    let mut tx = db.pool().begin().await.unwrap();
    // This backend's counts not yet flushed to pg_stat_user_tables: compare before and after.
    const COUNTS: &str =
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'orders'";
    let before: (i64, i64) = sqlx::query_as(COUNTS).fetch_one(&mut *tx).await.unwrap();
    sqlx::query(
        "UPDATE orders SET delivered = delivered + 400, \
         failed_permanent_units = failed_permanent_units, cancelled_units = cancelled_units, \
         needs_attention = false, version = version + 1, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    let after: (i64, i64) = sqlx::query_as(COUNTS).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "the counter update was not HOT"
    );
}
