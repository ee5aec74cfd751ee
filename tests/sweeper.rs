//! The sweeper's other services: the auditor catches tampering, the safety-net finaliser,
//! stuck-order detection, and retention into the archive in bounded batches.

mod common;

use std::time::Duration;

use common::*;
use tally::sweeper::{Sweeper, SweeperConfig};

fn sweeper(store: &tally::store::Store, config: SweeperConfig) -> Sweeper {
    Sweeper::new(
        store.clone(),
        config,
        "test-sweeper".into(),
        Default::default(),
    )
}

/// Runs a worker pod until every order is COMPLETED.
async fn deliver_all(db: &TestDb) {
    let rec = Recorder::new(Duration::ZERO);
    let pod = Pod::start(
        settings(&db.url, &[tally::config::Role::Worker]),
        handlers_for("test", rec),
    )
    .await;
    wait_for_count(
        &db.store,
        "SELECT count(*) FROM orders WHERE status <> 'COMPLETED'",
        0,
        Duration::from_secs(20),
    )
    .await;
    pod.stop().await;
}

#[tokio::test]
async fn the_auditor_records_every_check_and_catches_a_double_count() {
    let db = TestDb::new().await;
    OrderSpec::units(500, 100).generated(&db.store).await;
    let bad = OrderSpec::units(500, 100).generated(&db.store).await;
    OrderSpec::units(10, 10).create(&db.store).await;
    let s = sweeper(&db.store, SweeperConfig::default());
    let r = s.audit_once().await.unwrap();
    assert_eq!((r.orders_checked, r.violations.len()), (3, 0));
    // Nothing changed: nothing is due again until the interval passes.
    assert_eq!(s.audit_once().await.unwrap().orders_checked, 0);
    // A unit counted twice on the order (as a zombie completion would).
    sqlx::query("UPDATE orders SET delivered = delivered + 100, updated_at = now() WHERE id = $1")
        .bind(bad)
        .execute(db.pool())
        .await
        .unwrap();
    let r = s.audit_once().await.unwrap();
    assert_eq!(r.orders_checked, 1);
    assert_eq!(r.violations.len(), 1);
    let (id, v) = &r.violations[0];
    assert_eq!(*id, bad);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["invariant"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"accounting") && names.contains(&"conservation"),
        "{v}"
    );
    // Recorded: one passing and one failing check for `bad`, the view shows the latest.
    let (passed, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE passed), count(*) FILTER (WHERE NOT passed) FROM invariant_check_log WHERE order_id = $1",
    )
    .bind(bad)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((passed, failed), (1, 1));
    let health: Vec<(uuid::Uuid, Option<bool>, i64)> = sqlx::query_as(
        "SELECT order_id, last_check_passed, checks_failed FROM v_invariant_health ORDER BY checks_failed DESC, order_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(health[0], (bad, Some(false), 1));
    assert!(health[1..].iter().all(|h| h.1 == Some(true) && h.2 == 0));
}

#[tokio::test]
async fn the_finaliser_completes_what_a_completion_write_missed() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(300, 100).generated(&db.store).await;
    // Every task delivered and counted, but the order left PROCESSING (simulating a missed
    // finalisation, e.g. a hand edit during an incident).
    sqlx::query("UPDATE order_tasks SET status = 'COMPLETED', delivered = quantity, attempts = 1 WHERE order_id = $1")
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET delivered = quantity WHERE id = $1")
        .bind(id)
        .execute(db.pool())
        .await
        .unwrap();
    let s = sweeper(&db.store, SweeperConfig::default());
    let r = s.audit_orders(&[id]).await.unwrap();
    assert_eq!(r.violations[0].1[0]["invariant"], "not_finalised");
    // Two sweepers at once: one finalises, the other finds nothing to do.
    let other = sweeper(&db.another_store().await, SweeperConfig::default());
    let (a, b) = tokio::join!(s.finalise_once(), other.finalise_once());
    assert_eq!(a.unwrap().0 + b.unwrap().0, 1);
    assert_eq!(order_status(&db.store, id).await, "COMPLETED");
    let reason: String = sqlx::query_scalar("SELECT transition_reason FROM order_task_transitions WHERE order_id = $1 AND to_state = 'COMPLETED'")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(reason, "finalised_by_sweeper");
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn orders_processing_too_long_are_reported_as_stuck() {
    let db = TestDb::new().await;
    let old = OrderSpec::units(10, 10).generated(&db.store).await;
    OrderSpec::units(10, 10).generated(&db.store).await;
    sqlx::query("UPDATE orders SET created_at = now() - interval '3 hours' WHERE id = $1")
        .bind(old)
        .execute(db.pool())
        .await
        .unwrap();
    let s = sweeper(&db.store, SweeperConfig::default());
    assert_eq!(s.stuck_once().await.unwrap(), 1);
    let stuck = db.store.stuck_orders(7200.0, 10).await.unwrap();
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0].0, old);
    assert!(stuck[0].1 >= 3.0 * 3600.0 - 5.0);
}

#[tokio::test]
async fn retention_archives_finished_orders_in_bounded_batches() {
    let db = TestDb::new().await;
    let old = OrderSpec::units(1000, 100).generated(&db.store).await; // 10 tasks
    let recent = OrderSpec::units(500, 100).generated(&db.store).await; // 5 tasks
    deliver_all(&db).await;
    let running = OrderSpec::units(300, 100).generated(&db.store).await;
    sqlx::query("UPDATE orders SET finished_at = now() - interval '31 days' WHERE id = $1")
        .bind(old)
        .execute(db.pool())
        .await
        .unwrap();
    let old_transitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_task_transitions WHERE order_id = $1")
            .bind(old)
            .fetch_one(db.pool())
            .await
            .unwrap();
    let s = sweeper(
        &db.store,
        SweeperConfig {
            retention_days: 30,
            retention_batch_max: 4,
            ..Default::default()
        },
    );
    // Bounded: at most 4 rows per table per pass.
    let first = s.retention_once().await.unwrap();
    assert_eq!(
        (
            first.tasks_archived,
            first.transitions_archived,
            first.orders_archived
        ),
        (4, 4, 0)
    );
    // While half-moved, the auditor leaves the order alone rather than report a false loss.
    assert!(s.audit_once().await.unwrap().violations.is_empty());
    let mut passes = 1;
    while s.retention_once().await.unwrap().orders_archived == 0 {
        passes += 1;
        assert!(passes < 50, "retention never finished");
    }
    let count = |sql: &'static str| {
        let store = db.store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(old)
                .fetch_one(store.pool())
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM order_tasks WHERE order_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM order_tasks_archive WHERE order_id = $1").await,
        10
    );
    assert_eq!(
        count("SELECT count(*) FROM order_task_transitions WHERE order_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM order_task_transitions_archive WHERE order_id = $1").await,
        old_transitions
    );
    assert_eq!(
        count("SELECT count(*) FROM orders WHERE id = $1 AND archived_at IS NOT NULL").await,
        1
    );
    // Archived units still add up.
    assert_eq!(
        count("SELECT sum(delivered)::bigint FROM order_tasks_archive WHERE order_id = $1").await,
        1000
    );
    // Recent and running orders are untouched.
    for id in [recent, running] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM order_tasks WHERE order_id = $1")
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert!(n > 0);
    }
    assert_eq!(s.retention_once().await.unwrap(), Default::default());
}
