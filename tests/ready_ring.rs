//! The ready ring (migration 0005): every PENDING task has exactly one ring row, claims take
//! them, and the sweeper's reclaim truncates drained slots, pinned xmin or not, without ever
//! losing a row that a writer has not committed yet.

mod common;

use std::time::Duration;

use common::*;
use tally::domain::TaskEvent;
use tally::store::OrderAction;
use uuid::Uuid;

/// PENDING tasks without a ring row, ring rows of tasks that are not PENDING, and tasks with
/// more than one ring row: all must be zero whatever happened before.
async fn ring_mismatches(db: &TestDb) -> (i64, i64, i64) {
    let missing = scalar_i64(
        &db.store,
        "SELECT count(*) FROM order_tasks t WHERE t.status = 'PENDING' \
         AND NOT EXISTS (SELECT 1 FROM task_ready r WHERE r.task_id = t.id)",
    )
    .await;
    let stale = scalar_i64(
        &db.store,
        "SELECT count(*) FROM task_ready r WHERE NOT EXISTS \
         (SELECT 1 FROM order_tasks t WHERE t.id = r.task_id AND t.status = 'PENDING')",
    )
    .await;
    let doubled = scalar_i64(
        &db.store,
        "SELECT count(*) FROM (SELECT task_id FROM task_ready GROUP BY task_id \
         HAVING count(*) > 1) d",
    )
    .await;
    (missing, stale, doubled)
}

/// An order of `units` single-unit tasks, fanned out by the intake statement itself (the
/// API's path for small orders).
async fn create_inline(store: &tally::store::Store, units: u64) -> Uuid {
    let req = tally::intake::OrderRequest {
        kind: "test".into(),
        target: "acct-42".into(),
        quantity: units,
        chunk_size: Some(1),
        ..Default::default()
    };
    let defaults = tally::intake::IntakeDefaults {
        inline_fanout_max_tasks: 64,
        ..Default::default()
    };
    match tally::intake::submit(store, &req, defaults, None)
        .await
        .unwrap()
    {
        tally::store::IntakeOutcome::Created(id) => id,
        other => panic!("{other:?}"),
    }
}

/// The ring slots rows are in now.
async fn slots_in_use(db: &TestDb) -> Vec<i16> {
    sqlx::query_scalar("SELECT DISTINCT slot FROM task_ready ORDER BY slot")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// Waits until every one of `slots` is out of the writers' window (two or more slots away
/// from the one being written, either way round the 8-slot ring), so the reclaim looks at it.
async fn wait_until_old(db: &TestDb, slots: &[i16]) {
    wait_until(Duration::from_secs(10), "the ring to move on", || async {
        let cur: i16 = sqlx::query_scalar("SELECT tally_ready_slot()")
            .fetch_one(db.pool())
            .await
            .unwrap();
        slots
            .iter()
            .all(|s| (2..=6).contains(&(cur - s).rem_euclid(8)))
    })
    .await;
}

#[tokio::test]
async fn every_path_into_and_out_of_pending_keeps_one_ring_row_per_task() {
    let db = TestDb::new().await;
    // Intake's own fan-out (small orders) and the generator's (big ones).
    let small = create_inline(&db.store, 3).await;
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM task_ready").await,
        3
    );
    let big = OrderSpec::units(5_000, 10).generated(&db.store).await;
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM task_ready").await,
        503
    );

    // A claim takes the rows of what it claimed.
    let worker = Uuid::new_v4();
    let claimed = claim_up_to(&db.store, worker, 10).await;
    assert_eq!(claimed.len(), 10);
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));

    // A hand-back before any attempt counted is PENDING again, with a ring row again.
    let back = &claimed[0];
    assert_eq!(
        apply_event(&db.store, back, TaskEvent::HandedBack).await,
        vec![back.id]
    );
    let status: String = sqlx::query_scalar("SELECT status FROM order_tasks WHERE id = $1")
        .bind(back.id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "PENDING");
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));

    // A retryable failure is claimed through the retry index, not the ring.
    let failed = &claimed[1];
    apply_event(
        &db.store,
        failed,
        TaskEvent::Failed {
            class: tally::domain::ErrorClass::RateLimited,
            retry_in: Some(Duration::from_millis(1)),
        },
    )
    .await;
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = claim_up_to(&db.store, worker, 2).await;
    assert!(
        again.iter().any(|t| t.id == failed.id),
        "the due retry is claimed in its turn: {again:?}"
    );
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));

    // Cancelling removes the ring rows of the tasks it cancels.
    for id in [small, big] {
        db.store
            .order_action(id, OrderAction::Cancel, "test")
            .await
            .unwrap();
    }
    // Close-out cancels what one operator call did not reach.
    while db
        .store
        .close_out_finished_orders(100, "test")
        .await
        .unwrap()
        > 0
    {}
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM order_tasks WHERE status = 'PENDING'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_stale_ring_row_claims_nothing_and_is_cleared_by_the_claim() {
    let db = TestDb::new().await;
    let id = create_inline(&db.store, 20).await;
    // Tasks finished behind the ring's back (what a bug, or a hand edit, would leave).
    sqlx::query(
        "UPDATE order_tasks SET status = 'COMPLETED', delivered = quantity, attempts = 1 \
         WHERE order_id = $1 AND seq < 15",
    )
    .bind(id)
    .execute(db.pool())
    .await
    .unwrap();
    let got = claim_up_to(&db.store, Uuid::new_v4(), 100).await;
    let mut seqs: Vec<i32> = got.iter().map(|t| t.seq).collect();
    seqs.sort();
    assert_eq!(seqs, (15..20).collect::<Vec<_>>());
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM task_ready").await,
        0
    );
}

#[tokio::test]
async fn a_drained_slot_is_truncated_while_the_xmin_is_pinned_and_a_backlog_is_kept() {
    let db = TestDb::new().await;
    // The pin: an open transaction holding an xid, as a long report would.
    let mut pin = db.pool().begin().await.unwrap();
    sqlx::query("SELECT txid_current()")
        .execute(&mut *pin)
        .await
        .unwrap();

    let drained = OrderSpec::units(5_000, 1).generated(&db.store).await;
    let drained_slots = slots_in_use(&db).await;
    let worker = Uuid::new_v4();
    let claimed = claim_all(&db.store, worker).await;
    assert_eq!(claimed, 5_000);
    // Work written after the drain, in another slot, then left waiting: a backlog the
    // reclaim must keep.
    wait_until_old(&db, &drained_slots).await;
    let waiting = create_inline(&db.store, 5).await;
    let waiting_slots = slots_in_use(&db).await;
    wait_until_old(
        &db,
        &[drained_slots.clone(), waiting_slots.clone()].concat(),
    )
    .await;

    let report = db.store.reclaim_ready_slots().await.unwrap();
    assert!(report.truncated >= 1, "{report:?}");
    assert!(report.occupied >= 1, "{report:?}");
    // Nothing the pin keeps alive is left on disk in the ring but the backlog's slot.
    let used_slots = scalar_i64(
        &db.store,
        "SELECT count(*) FROM generate_series(0, 7) s \
         WHERE pg_relation_size(format('task_ready_%s', s)::regclass) > 0",
    )
    .await;
    assert_eq!(used_slots, 1, "{report:?}");

    // The claim after the reclaim reads only the backlog's rows: it takes them, and its
    // index walk touches a handful of pages (11 here), not the 5,000 entries the pin keeps
    // (about 90 pages without the reclaim).
    let plan: Vec<String> = {
        let mut tx = db.pool().begin().await.unwrap();
        let plan = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) {}",
            tally::store::CLAIM_SQL
        )))
        .bind(worker)
        .bind(100i64)
        .bind(vec!["test".to_owned()])
        .bind(30.0f64)
        .bind("explain")
        .bind(Uuid::new_v4())
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        plan
    };
    let ring_scan_buffers: u64 = plan
        .iter()
        .skip_while(|l| !l.contains("Merge Append"))
        .take_while(|l| !l.contains("order_tasks_retry_idx"))
        .filter_map(|l| l.trim().strip_prefix("Buffers: shared hit="))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(
        ring_scan_buffers < 25,
        "the ring walk read {ring_scan_buffers} pages:\n{}",
        plan.join("\n")
    );
    let got = claim_up_to(&db.store, worker, 100).await;
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|t| t.order_id == waiting));
    let drained_executing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_tasks WHERE order_id = $1 AND status = 'EXECUTING' \
         AND attempts = 1",
    )
    .bind(drained)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        drained_executing, 5_000,
        "each drained task was claimed exactly once"
    );
    pin.rollback().await.unwrap();
}

#[tokio::test]
async fn a_slot_with_an_uncommitted_writer_is_never_truncated() {
    let db = TestDb::new().await;
    let id = create_inline(&db.store, 1).await;
    let task: i64 = sqlx::query_scalar("SELECT id FROM order_tasks WHERE order_id = $1")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    // Take the committed row away, then write it again from a transaction that stays open
    // while its slot ages out of the writers' window.
    sqlx::query("DELETE FROM task_ready")
        .execute(db.pool())
        .await
        .unwrap();
    let mut writer = db.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO task_ready (slot, task_id, priority, run, kind, order_id) \
         VALUES (tally_ready_slot(), $1, 0, 0, 'test', $2)",
    )
    .bind(task)
    .bind(id)
    .execute(&mut *writer)
    .await
    .unwrap();
    let slot: i16 = sqlx::query_scalar("SELECT slot FROM task_ready WHERE task_id = $1")
        .bind(task)
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    wait_until_old(&db, &[slot]).await;
    // Two sweepers at once, as during a leader hand-over: both must leave it.
    let other = db.another_store().await;
    let (a, b) = tokio::join!(db.store.reclaim_ready_slots(), other.reclaim_ready_slots());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.busy + b.busy >= 2, "{a:?} {b:?}");
    writer.commit().await.unwrap();
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    let got = claim_one(&db.store, Uuid::new_v4()).await;
    assert_eq!(got.id, task);
}

#[tokio::test]
async fn reclaiming_all_the_while_orders_arrive_loses_no_ring_row() {
    let db = TestDb::new().await;
    let reclaimer = {
        let store = db.another_store().await;
        tokio::spawn(async move {
            let mut truncated = 0;
            for _ in 0..60 {
                truncated += store.reclaim_ready_slots().await.unwrap().truncated;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            truncated
        })
    };
    let worker = Uuid::new_v4();
    let mut created = 0u64;
    let mut claimed = 0usize;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        for _ in 0..10 {
            create_inline(&db.store, 2).await;
            created += 2;
        }
        claimed += claim_up_to(&db.store, worker, 15).await.len();
    }
    let truncated = reclaimer.await.unwrap();
    assert!(truncated >= 1, "the reclaim never truncated a slot");
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    claimed += claim_all(&db.store, worker).await;
    assert_eq!(
        claimed as u64, created,
        "every task was claimable exactly once"
    );
}

#[tokio::test]
async fn the_sweepers_repair_gives_a_stranded_pending_task_its_ring_row_once() {
    let db = TestDb::new().await;
    create_inline(&db.store, 7).await;
    // What a restore without task_ready's data leaves: PENDING tasks nothing points at.
    sqlx::query("TRUNCATE task_ready")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(ring_mismatches(&db).await, (7, 0, 0));
    assert!(claim_up_to(&db.store, Uuid::new_v4(), 100).await.is_empty());
    assert_eq!(db.store.repair_ready_ring().await.unwrap(), 7);
    assert_eq!(
        db.store.repair_ready_ring().await.unwrap(),
        0,
        "a repair is idempotent"
    );
    assert_eq!(ring_mismatches(&db).await, (0, 0, 0));
    assert_eq!(claim_all(&db.store, Uuid::new_v4()).await, 7);
}
