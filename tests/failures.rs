//! Failure is the normal case: killed workers, zombies, stale rescues, a restarted
//! PostgreSQL, two sweepers and two leaders at once. Nothing lost, nothing counted twice.

mod common;

use std::time::Duration;

use common::*;
use tally::config::Role;
use tally::domain::TaskEvent;
use tally::leader::{Leadership, PgElector};
use tally::pgtemp::{ClusterOptions, TempCluster};
use tally::store::{TaskUpdate, UpdateFence};
use tally::sweeper::{Sweeper, SweeperConfig};
use uuid::Uuid;

fn sweeper(store: &tally::store::Store, name: &str) -> Sweeper {
    Sweeper::new(
        store.clone(),
        SweeperConfig::default(),
        name.into(),
        Default::default(),
    )
}

fn completion(t: &tally::store::ClaimedTask) -> TaskUpdate {
    decided(
        t,
        TaskEvent::Delivered {
            units: t.quantity as u32,
        },
    )
}

async fn expire_leases(store: &tally::store::Store) {
    sqlx::query("UPDATE order_tasks SET lease_expires_at = now() - interval '1 second' WHERE status = 'EXECUTING'")
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_zombie_worker_cannot_complete_a_rescued_task() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(100, 100).generated(&db.store).await;
    let kinds = vec!["test".to_string()];
    let zombie_id = Uuid::new_v4();
    let zombie = db
        .store
        .claim_tasks(zombie_id, 1, &kinds, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let hb = |held: Vec<(i64, Uuid)>| {
        let store = db.store.clone();
        let (ids, tokens): (Vec<i64>, Vec<Uuid>) = held.into_iter().unzip();
        async move {
            store
                .heartbeat(
                    zombie_id,
                    Duration::from_secs(30),
                    Default::default(),
                    &ids,
                    &tokens,
                )
                .await
                .unwrap()
                .1
        }
    };
    // A heartbeat renews only the claims the worker knows it holds (a claim whose response
    // was lost is left to expire and be rescued).
    assert_eq!(hb(vec![]).await, 0);
    assert_eq!(hb(vec![(zombie.id, zombie.claim_token)]).await, 1);
    expire_leases(&db.store).await;
    assert_eq!(sweeper(&db.store, "s").rescue_once().await.unwrap(), 1);
    // The zombie's heartbeat cannot revive the lost claim.
    assert_eq!(hb(vec![(zombie.id, zombie.claim_token)]).await, 0);
    let fresh = db
        .store
        .claim_tasks(Uuid::new_v4(), 1, &kinds, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((fresh.id, fresh.attempts), (zombie.id, 2));
    // The zombie wakes up and reports success: fenced, nothing written.
    let applied = db
        .store
        .apply_task_updates(&[completion(&zombie)], UpdateFence::Claim, "zombie")
        .await
        .unwrap();
    assert!(
        applied.task_ids.is_empty(),
        "a stale claim must write nothing"
    );
    let o = db.store.get_order(id).await.unwrap().unwrap();
    assert_eq!((o.delivered, o.status.as_str()), (0, "PROCESSING"));
    // The current holder completes it, once.
    let applied = db
        .store
        .apply_task_updates(&[completion(&fresh)], UpdateFence::Claim, "fresh")
        .await
        .unwrap();
    assert_eq!(applied.task_ids, vec![fresh.id]);
    assert_eq!(applied.completed_orders, vec![id]);
    // Replaying either write again changes nothing.
    for t in [&zombie, &fresh] {
        assert!(
            db.store
                .apply_task_updates(&[completion(t)], UpdateFence::Claim, "again")
                .await
                .unwrap()
                .task_ids
                .is_empty()
        );
    }
    let o = db.store.get_order(id).await.unwrap().unwrap();
    assert_eq!((o.delivered, o.status.as_str()), (100, "COMPLETED"));
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn a_stale_rescue_never_resurrects_a_completed_task() {
    let db = TestDb::new().await;
    let id = OrderSpec::units(100, 100).generated(&db.store).await;
    let t = db
        .store
        .claim_tasks(Uuid::new_v4(), 1, &["test".into()], Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    expire_leases(&db.store).await;
    // The sweeper reads the orphan …
    let stale = db.store.expired_tasks(10).await.unwrap();
    assert_eq!(stale.len(), 1);
    // … the slow worker completes it in between (its claim token still matches) …
    assert_eq!(
        db.store
            .apply_task_updates(&[completion(&t)], UpdateFence::Claim, "w")
            .await
            .unwrap()
            .task_ids
            .len(),
        1
    );
    // … and the sweeper's write, re-checking its own conditions, changes nothing.
    let rescue = rescue_updates(&stale);
    let applied = db
        .store
        .apply_task_updates(&rescue, UpdateFence::ExpiredLease, "sweeper")
        .await
        .unwrap();
    assert!(applied.task_ids.is_empty());
    let status: String = sqlx::query_scalar("SELECT status FROM order_tasks WHERE id = $1")
        .bind(t.id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "COMPLETED");
    assert_eq!(order_status(&db.store, id).await, "COMPLETED");
    // A lease renewed between the sweeper's read and its write is not rescued either.
    OrderSpec::units(10, 10).generated(&db.store).await;
    let worker = Uuid::new_v4();
    let alive = db
        .store
        .claim_tasks(worker, 1, &["test".into()], Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    expire_leases(&db.store).await;
    let stale = db.store.expired_tasks(10).await.unwrap();
    assert_eq!(stale.len(), 1);
    let (_, renewed) = db
        .store
        .heartbeat(
            worker,
            Duration::from_secs(30),
            Default::default(),
            &[alive.id],
            &[alive.claim_token],
        )
        .await
        .unwrap();
    assert_eq!(renewed, 1);
    let rescue = rescue_updates(&stale);
    assert!(
        db.store
            .apply_task_updates(&rescue, UpdateFence::ExpiredLease, "sweeper")
            .await
            .unwrap()
            .task_ids
            .is_empty()
    );
    assert_eq!(
        db.store
            .apply_task_updates(&[completion(&alive)], UpdateFence::Claim, "w")
            .await
            .unwrap()
            .task_ids
            .len(),
        1
    );
    // A live lease is not rescued either.
    OrderSpec::units(10, 10).generated(&db.store).await;
    db.store
        .claim_tasks(Uuid::new_v4(), 1, &["test".into()], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(sweeper(&db.store, "s").rescue_once().await.unwrap(), 0);
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn two_sweepers_at_once_recover_each_orphan_exactly_once() {
    let db = TestDb::new().await;
    OrderSpec::units(2000, 10).generated(&db.store).await;
    let claimed = db
        .store
        .claim_tasks(
            Uuid::new_v4(),
            150,
            &["test".into()],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 150);
    expire_leases(&db.store).await;
    let stores = [
        db.another_store().await,
        db.another_store().await,
        db.another_store().await,
    ];
    let mut runs = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        let sw = sweeper(s, &format!("sweeper-{i}"));
        runs.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..3 {
                n += sw.rescue_once().await.unwrap();
                sw.audit_once().await.unwrap();
                sw.finalise_once().await.unwrap();
            }
            n
        }));
    }
    let mut total = 0;
    for r in runs {
        total += r.await.unwrap();
    }
    assert_eq!(total, 150, "each orphan recovered by exactly one sweeper");
    assert_eq!(scalar_i64(&db.store, "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'orphan_recovered'").await, 150);
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM order_tasks WHERE status = 'FAILED_RETRYING' AND attempts = 1"
        )
        .await,
        150
    );
    assert!(audit_all(&db.store).await.is_empty());
}

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let db = TestDb::new().await;
    let ttl = Duration::from_millis(800);
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut la = Leadership::new(Box::new(PgElector::new(
        db.store.clone(),
        "sweeper",
        a,
        ttl,
    )));
    let mut lb = Leadership::new(Box::new(PgElector::new(
        db.another_store().await,
        "sweeper",
        b,
        ttl,
    )));
    let ta = la.tick().await.expect("a acquires the free lease");
    assert_eq!(lb.tick().await, None, "b cannot while a's lease is live");
    assert_eq!(la.tick().await, Some(ta), "renewal keeps the term");
    // a stops renewing (paused): its own local deadline passes before the lease can be taken.
    tokio::time::sleep(ttl).await;
    assert_eq!(la.current(), None, "a stepped down on its own clock");
    let tb = lb.tick().await.expect("b takes over after expiry");
    assert!(tb > ta, "a new holder gets a higher term");
    assert_eq!(la.tick().await, None, "a cannot come back while b holds it");
    // b releases on shutdown: a takes over at once, no waiting for expiry.
    lb.release().await;
    let ta2 = la.tick().await.expect("released lease is free");
    assert!(ta2 > tb);
    assert_eq!(
        db.store.lease_holder("sweeper").await.unwrap(),
        Some((a, ta2))
    );
}

#[tokio::test]
async fn a_worker_killed_with_sigkill_mid_batch_loses_nothing() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        kind: "simulate",
        ..OrderSpec::units(6000, 50)
    }
    .create(&db.store)
    .await;
    let env = [
        ("TALLY_LEASE_TTL_SEC", "1.5"),
        ("TALLY_LEADER_TTL_SEC", "1.5"),
        ("TALLY_SWEEP_INTERVAL_MS", "100"),
        ("TALLY_POLL_INTERVAL_MS", "100"),
        ("TALLY_SIMULATE_LATENCY_MS", "150"),
        ("TALLY_WORKER_CONCURRENCY", "8"),
        ("TALLY_WORKER_BATCH_SIZE", "8"),
        ("TALLY_DB_POOL_SIZE", "4"),
    ];
    let mut victim = spawn_tally(&db.url, &["serve", "--roles", "worker"], &env);
    let mut survivor = spawn_tally(&db.url, &["serve", "--roles", "worker"], &env);
    let mut sweeper = spawn_tally(&db.url, &["serve", "--roles", "generator,sweeper"], &env);
    let victim_pid = victim.id().unwrap() as i32;
    let store = db.store.clone();
    wait_until(
        Duration::from_secs(20),
        "the victim holds tasks mid-batch",
        || {
            let store = store.clone();
            async move {
                store
                    .executing_by_pid()
                    .await
                    .unwrap()
                    .iter()
                    .any(|(pid, n)| *pid == victim_pid && *n >= 4)
            }
        },
    )
    .await;
    victim.start_kill().unwrap(); // SIGKILL
    victim.wait().await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "the order completes without the victim",
        || {
            let store = store.clone();
            async move { order_status(&store, id).await == "COMPLETED" }
        },
    )
    .await;
    let recovered = scalar_i64(
        &db.store,
        "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'orphan_recovered'",
    )
    .await;
    assert!(
        recovered >= 4,
        "the victim's tasks were rescued ({recovered})"
    );
    assert_eq!(
        db.store.get_order(id).await.unwrap().unwrap().quantity,
        6000
    );
    assert_fully_delivered(&db.store, id).await;
    // The survivors shut down cleanly on SIGTERM.
    for c in [&mut survivor, &mut sweeper] {
        signal(c, libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(20), c.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");
    }
}

#[tokio::test]
async fn sigterm_hands_back_in_flight_tasks_and_exits_zero() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        kind: "simulate",
        ..OrderSpec::units(20, 1)
    }
    .generated(&db.store)
    .await;
    let mut w = spawn_tally(
        &db.url,
        &["serve", "--roles", "worker"],
        &[
            ("TALLY_SIMULATE_LATENCY_MS", "600000"),
            ("TALLY_SIMULATE_LATENCY_SIGMA", "0"),
            ("TALLY_WORKER_CONCURRENCY", "5"),
            ("TALLY_SHUTDOWN_GRACE_SEC", "0.5"),
        ],
    );
    let store = db.store.clone();
    wait_until(Duration::from_secs(20), "5 tasks executing", || {
        let store = store.clone();
        async move { store.executing_count(None).await.unwrap() == 5 }
    })
    .await;
    signal(&w, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(20), w.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_all_handed_back(&db.store, id).await;
    assert_no_live_workers(&db.store).await;
}

#[tokio::test]
async fn workers_ride_out_a_postgres_restart_without_restarting() {
    // A private cluster: this test stops it with -m immediate mid-run.
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let db = TestDb::on_server(&cluster.url("postgres")).await;
    let id = OrderSpec::units(3000, 10).generated(&db.store).await;
    let rec = Recorder::new(Duration::from_millis(20));
    let mut s = settings(&db.url, &[Role::Worker, Role::Sweeper]);
    s.store.statement_timeout = Duration::from_secs(2);
    s.store.call_timeout = Duration::from_secs(3);
    let pod_a = Pod::start(s.clone(), handlers_for("test", rec.clone())).await;
    let pod_b = Pod::start(s, handlers_for("test", rec.clone())).await;
    let store = db.store.clone();
    wait_until(Duration::from_secs(20), "a third delivered", || {
        let store = store.clone();
        async move { store.get_order(id).await.unwrap().unwrap().delivered >= 1000 }
    })
    .await;
    let cluster = std::sync::Arc::new(cluster);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop("immediate"))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart_after_stop())
        .await
        .unwrap()
        .unwrap();
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(90)).await;
    pod_a.stop().await;
    pod_b.stop().await;
    assert_eq!(
        db.store.get_order(id).await.unwrap().unwrap().quantity,
        3000
    );
    assert_fully_delivered(&db.store, id).await;
    // A delivery may repeat (its outcome was lost with the crash), but never gets counted twice.
    let calls = rec.total_calls();
    assert!(calls >= 300, "{calls}");
    db.store.close().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_claim_whose_connection_is_killed_still_hands_out_each_task_once() {
    use sqlx::Connection;
    let db = TestDb::new().await;
    let order = OrderSpec::units(1000, 10).generated(&db.store).await;
    // Hold the kinds table so the claim statement waits where we can see it.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE kinds IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let worker = Uuid::new_v4();
    let store = db.store.clone();
    let claim = tokio::spawn(async move {
        store
            .claim_tasks(worker, 10, &["test".into()], Duration::from_secs(30))
            .await
    });
    let pid = backend_waiting_on_a_lock(
        db.pool(),
        "%SELECT paused, batch_size_override FROM tally_control%",
        0,
    )
    .await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(killed);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    // The store looks for the killed claim's tasks by its token (none: it never committed)
    // and claims again on a fresh connection: the caller gets tasks, not an error.
    let got = claim
        .await
        .unwrap()
        .expect("the claim is run again, not failed");
    assert_eq!(got.len(), 10);
    let claimed = scalar_i64(
        &db.store,
        "SELECT count(*) FROM order_task_transitions WHERE transition_reason = 'claimed'",
    )
    .await;
    assert_eq!(claimed, 10, "each task claimed once");
    let executing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_tasks WHERE order_id = $1 AND status = 'EXECUTING'",
    )
    .bind(order)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(executing, 10);
}
