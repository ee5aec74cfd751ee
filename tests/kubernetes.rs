//! What Kubernetes relies on, tested on Tally itself (there is no cluster here):
//!
//! - the Kubernetes Lease leader election, against an in-process fake of the API server's
//!   Lease endpoints (`common::kubeapi`, which says what it does and does not model);
//! - a rolling deploy: SIGTERM under load leaves no orphans and burns no attempts;
//! - `kubectl scale` from 4 workers to 1 mid-order;
//! - probes: `/livez` stays 200 while PostgreSQL is down for 60 s, `/readyz` recovers
//!   within 10 s of its return.

mod common;
#[path = "common/kubeapi.rs"]
mod kubeapi;

use std::time::{Duration, Instant};

use common::*;
use kubeapi::FakeKube;
use tally::leader::kubernetes::KubeElector;
use tally::leader::{Elector, Leadership};
use tally::pgtemp::{ClusterOptions, TempCluster};

const NS: &str = "tally";
const LEASE: &str = "tally-sweeper";

fn candidate(kube: &FakeKube, who: &str, ttl: Duration) -> KubeElector {
    KubeElector::new(kube.client(), NS, LEASE, who.to_owned(), ttl)
}

async fn term_of(e: &KubeElector) -> Option<i64> {
    e.acquire_or_renew().await.unwrap().map(|g| g.term)
}

#[tokio::test]
async fn a_lease_is_created_renewed_and_released_to_a_standby() {
    let kube = FakeKube::start().await;
    let ttl = Duration::from_secs(2);
    let (a, b) = (
        candidate(&kube, "pod-a", ttl),
        candidate(&kube, "pod-b", ttl),
    );
    assert_eq!(
        term_of(&a).await,
        Some(1),
        "the first candidate creates the Lease"
    );
    assert_eq!(kube.api.count("POST"), 1);
    assert_eq!(kube.api.holder(NS, LEASE).as_deref(), Some("pod-a"));
    let lease = kube.api.lease(NS, LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2);
    assert_eq!(term_of(&b).await, None, "a live Lease is not taken");
    assert_eq!(kube.api.count("PUT"), 0, "the standby only read it");

    // Renewal: the holder rewrites renewTime once a fifth of the TTL has passed.
    let first_renew = lease["spec"]["renewTime"].as_str().unwrap().to_owned();
    assert_eq!(
        term_of(&a).await,
        Some(1),
        "within a fifth of the TTL: no request"
    );
    assert_eq!(kube.api.count("PUT"), 0);
    tokio::time::sleep(ttl / 5 + Duration::from_millis(50)).await;
    assert_eq!(term_of(&a).await, Some(1));
    assert_eq!(kube.api.count("PUT"), 1);
    let renewed = kube.api.lease(NS, LEASE).unwrap();
    assert_ne!(renewed["spec"]["renewTime"].as_str().unwrap(), first_renew);
    assert_eq!(renewed["spec"]["holderIdentity"], "pod-a");

    // Release on shutdown: the standby takes over at its next tick, not after the TTL.
    a.release().await;
    assert_eq!(kube.api.holder(NS, LEASE), None);
    let started = Instant::now();
    assert_eq!(
        term_of(&b).await,
        Some(2),
        "a change of holder is a new term"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(kube.api.holder(NS, LEASE).as_deref(), Some("pod-b"));
    assert_eq!(kube.api.transitions(NS, LEASE), 1);
    // The old holder is a standby now.
    tokio::time::sleep(ttl / 5 + Duration::from_millis(50)).await;
    assert_eq!(term_of(&a).await, None);
    assert_eq!(term_of(&b).await, Some(2));
}

#[tokio::test]
async fn an_abandoned_lease_is_taken_over_only_after_it_expires_and_the_old_leader_has_stepped_down()
 {
    let kube = FakeKube::start().await;
    let ttl = Duration::from_secs(1);
    let mut a = Leadership::new(Box::new(candidate(&kube, "pod-a", ttl)));
    let b = candidate(&kube, "pod-b", ttl);
    assert_eq!(a.tick().await, Some(1));
    // pod-a freezes (SIGSTOP, a partition): it stops renewing but never releases.
    let first_look = Instant::now();
    let mut a_stepped_down = None;
    let taken = loop {
        if a_stepped_down.is_none() && a.current().is_none() {
            a_stepped_down = Some(Instant::now());
        }
        if let Some(term) = term_of(&b).await {
            break (term, Instant::now());
        }
        assert!(
            first_look.elapsed() < Duration::from_secs(5),
            "never taken over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(taken.0, 2);
    let waited = taken.1 - first_look;
    assert!(
        waited >= ttl,
        "taken over after {waited:?}, before the Lease's duration passed unchanged"
    );
    let stepped_down = a_stepped_down.expect("the frozen leader's deadline passed first");
    assert!(
        stepped_down < taken.1,
        "the old leader believed it led until {stepped_down:?}, after the takeover"
    );
    // pod-a wakes up: it reads the Lease, sees pod-b, and does not lead.
    assert_eq!(a.tick().await, None);
    assert_eq!(kube.api.holder(NS, LEASE).as_deref(), Some("pod-b"));
}

#[tokio::test]
async fn a_write_between_read_and_renewal_is_a_conflict_not_leadership() {
    let kube = FakeKube::start().await;
    let ttl = Duration::from_secs(1);
    let a = candidate(&kube, "pod-a", ttl);
    assert_eq!(term_of(&a).await, Some(1));
    // Someone writes the Lease between pod-a's read and its renewal: the PUT carries a
    // stale resourceVersion, is refused with 409, and pod-a does not lead this tick.
    tokio::time::sleep(ttl / 5 + Duration::from_millis(50)).await;
    kube.api.interpose_before_next_put();
    assert_eq!(term_of(&a).await, None);
    assert_eq!(kube.api.conflicts(), 1);
    // Its next tick reads the current version; still the holder, it renews.
    assert_eq!(term_of(&a).await, Some(1));
    assert_eq!(kube.api.holder(NS, LEASE).as_deref(), Some("pod-a"));

    // A takeover race: two standbys read the same version of a released Lease and both
    // write; exactly one write succeeds.
    a.release().await;
    let (b, c) = (
        candidate(&kube, "pod-b", ttl),
        candidate(&kube, "pod-c", ttl),
    );
    let (rb, rc) = tokio::join!(term_of(&b), term_of(&c));
    assert_eq!(
        [rb, rc].iter().filter(|r| r.is_some()).count(),
        1,
        "b: {rb:?}, c: {rc:?}"
    );
    let holder = kube.api.holder(NS, LEASE).unwrap();
    assert_eq!(rb.is_some(), holder == "pod-b");
    assert_eq!(kube.api.transitions(NS, LEASE), 1);
    // Creation races the same way: AlreadyExists for the loser.
    let (d, e) = (
        KubeElector::new(kube.client(), NS, "other", "pod-d".into(), ttl),
        KubeElector::new(kube.client(), NS, "other", "pod-e".into(), ttl),
    );
    let (rd, re) = tokio::join!(term_of(&d), term_of(&e));
    assert_eq!([rd, re].iter().filter(|r| r.is_some()).count(), 1);
}

#[tokio::test]
async fn racing_candidates_never_share_a_term() {
    let kube = FakeKube::start().await;
    let ttl = Duration::from_secs(1);
    let grants = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, String)>::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let e = candidate(&kube, &format!("pod-{i}"), ttl);
        let grants = grants.clone();
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(4);
            let mut n = 0u32;
            while Instant::now() < end {
                if let Some(g) = e.acquire_or_renew().await.unwrap() {
                    grants.lock().unwrap().push((g.term, format!("pod-{i}")));
                    n += 1;
                    // Hand leadership on now and then, so several terms happen.
                    if n.is_multiple_of(7) {
                        e.release().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..40))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let grants = grants.lock().unwrap();
    let mut by_term = std::collections::BTreeMap::<i64, std::collections::BTreeSet<String>>::new();
    for (term, who) in grants.iter() {
        by_term.entry(*term).or_default().insert(who.clone());
    }
    assert!(by_term.len() >= 3, "several terms happened: {by_term:?}");
    for (term, holders) in &by_term {
        assert_eq!(holders.len(), 1, "term {term} had holders {holders:?}");
    }
}

#[tokio::test]
async fn an_unreachable_api_server_makes_the_leader_step_down_and_it_resumes_after() {
    let kube = FakeKube::start().await;
    let ttl = Duration::from_secs(1);
    let mut a = Leadership::new(Box::new(candidate(&kube, "pod-a", ttl)));
    assert_eq!(a.tick().await, Some(1));
    kube.api.set_down(true);
    let down_at = Instant::now();
    while a.tick().await.is_some() {
        assert!(down_at.elapsed() < ttl, "still leading without renewals");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kube.api.set_down(false);
    let back_at = Instant::now();
    // Nobody else took it: the same holder renews and leads again, same term.
    while a.tick().await.is_none() {
        assert!(back_at.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.current(), Some(1));
    // A hung API server (it accepts and never answers): each tick gives up within a
    // quarter of the TTL, and the leader steps down at its deadline all the same.
    kube.api.set_hang(true);
    let hung_at = Instant::now();
    loop {
        let tick = Instant::now();
        let led = a.tick().await;
        assert!(tick.elapsed() < ttl / 2, "a tick took {:?}", tick.elapsed());
        if led.is_none() {
            break;
        }
        assert!(hung_at.elapsed() < ttl, "still leading without renewals");
    }
}

/// The process a Lease holder names: the identity is hostname_processid, and the process id
/// is the workers row.
fn lease_process(holder: &str) -> uuid::Uuid {
    holder.rsplit('_').next().unwrap().parse().unwrap()
}

/// Waits until the leadership record `tally health` reads names `process` in `term`.
async fn wait_for_leader_record(store: &tally::store::Store, process: uuid::Uuid, term: i64) {
    wait_until(Duration::from_secs(5), "the leader is recorded", || {
        let store = store.clone();
        async move {
            store
                .lease_holder(tally::app::SWEEPER_LEASE_RECORD)
                .await
                .unwrap()
                == Some((process, term))
        }
    })
    .await;
}

/// Two `tally serve --roles sweeper` processes elect through the fake API server; SIGTERM
/// on the leader hands the Lease to the other at once.
#[tokio::test]
async fn sweeper_processes_elect_through_a_kubernetes_lease_and_hand_it_over_on_sigterm() {
    let db = TestDb::new().await;
    let kube = FakeKube::start().await;
    let dir = tempdir();
    let kubeconfig = kube.kubeconfig(&dir, NS);
    let kubeconfig = kubeconfig.to_str().unwrap();
    let env = [
        ("TALLY_LEADER_ELECTION", "kubernetes"),
        ("KUBECONFIG", kubeconfig),
        ("TALLY_LEADER_TTL_SEC", "3"),
        ("TALLY_SWEEP_INTERVAL_MS", "100"),
    ];
    let mut one = spawn_tally(&db.url, &["serve", "--roles", "sweeper"], &env);
    let mut two = spawn_tally(&db.url, &["serve", "--roles", "sweeper"], &env);
    let api = kube.api.clone();
    wait_until(Duration::from_secs(30), "a leader holds the Lease", || {
        let api = api.clone();
        async move { api.holder(NS, LEASE).is_some() }
    })
    .await;
    let first = kube.api.holder(NS, LEASE).unwrap();
    let process = lease_process(&first);
    let pid: i32 = sqlx::query_scalar("SELECT pid FROM workers WHERE id = $1")
        .bind(process)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    let (leader, standby) = if one.id() == Some(pid as u32) {
        (&mut one, &mut two)
    } else {
        (&mut two, &mut one)
    };
    assert_eq!(leader.id(), Some(pid as u32));
    // The leadership is recorded for `tally health` (a record, not the lock).
    let store = db.store.clone();
    wait_for_leader_record(&store, process, 1).await;
    // `tally health` (and /api/admin/health) name it through that record.
    let leases = [tally::app::SWEEPER_LEASE, tally::app::SWEEPER_LEASE_RECORD];
    let health = db.store.health(300.0, &leases).await.unwrap();
    assert_eq!(health.leader, Some(process));
    // The leader's sweeper is at work: it records invariant checks.
    OrderSpec::units(10, 10).generated(&db.store).await;
    wait_until(
        Duration::from_secs(20),
        "the leader audits the order",
        || {
            let store = store.clone();
            async move { scalar_i64(&store, "SELECT count(*) FROM invariant_check_log").await > 0 }
        },
    )
    .await;
    signal(leader, libc::SIGTERM);
    let stopped = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), leader.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    wait_until(
        Duration::from_secs(2),
        "the standby takes over well within the TTL",
        || {
            let api = api.clone();
            let first = first.clone();
            async move { api.holder(NS, LEASE).is_some_and(|h| h != first) }
        },
    )
    .await;
    assert!(stopped.elapsed() < Duration::from_secs(3));
    assert_eq!(kube.api.transitions(NS, LEASE), 1);
    // The database record follows the Lease: the old leader deletes its record on the way
    // out and the new one writes its own just after taking the Lease, so wait for it.
    let successor = lease_process(&kube.api.holder(NS, LEASE).unwrap());
    assert_ne!(successor, process);
    wait_for_leader_record(&store, successor, 2).await;
    signal(standby, libc::SIGTERM);
    assert!(standby.wait().await.unwrap().success());
    assert_eq!(kube.api.holder(NS, LEASE), None, "released on the way out");
}

#[tokio::test]
async fn bad_election_settings_refuse_to_start_and_name_the_problem() {
    let db = TestDb::new().await;
    let run = |env: Vec<(&'static str, String)>| {
        let url = db.url.clone();
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
            cmd.args(["serve", "--roles", "sweeper"])
                .env("TALLY_DATABASE_URL", url)
                .env("TALLY_METRICS_ADDR", "off")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .kill_on_drop(true);
            for (k, v) in env {
                cmd.env(k, v);
            }
            tokio::time::timeout(Duration::from_secs(30), cmd.output())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let out = run(vec![("TALLY_LEADER_ELECTION", "etcd".into())]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--leader-election"));
    let out = run(vec![
        ("TALLY_LEADER_ELECTION", "kubernetes".into()),
        ("TALLY_LEADER_LEASE_NAMESPACE", "Not_A_Namespace".into()),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Kubernetes name"));
    // No service account and no kubeconfig: the process says so and exits non-zero.
    let out = run(vec![
        ("TALLY_LEADER_ELECTION", "kubernetes".into()),
        ("KUBECONFIG", "/nonexistent/kubeconfig".into()),
        ("HOME", "/nonexistent".into()),
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes API found"), "{err}");
    assert_no_live_workers(&db.store).await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-kube-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every task completed on its first counted attempt, and no task was ever an orphan.
async fn assert_no_orphans_and_no_burned_attempts(store: &tally::store::Store, order: uuid::Uuid) {
    assert_fully_delivered(store, order).await;
    let burned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_tasks WHERE order_id = $1 AND attempts <> 1",
    )
    .bind(order)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(burned, 0, "tasks whose attempt count moved past 1");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_task_transitions \
         WHERE order_id = $1 AND transition_reason = 'orphan_recovered'",
    )
    .bind(order)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(orphans, 0, "tasks rescued as orphans");
}

async fn handed_back(store: &tally::store::Store, order: uuid::Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM order_task_transitions \
         WHERE order_id = $1 AND transition_reason = 'handed_back'",
    )
    .bind(order)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

const WORKER_ENV: [(&str, &str); 7] = [
    ("TALLY_SIMULATE_LATENCY_MS", "60"),
    ("TALLY_SIMULATE_LATENCY_SIGMA", "1.2"),
    ("TALLY_WORKER_CONCURRENCY", "8"),
    ("TALLY_WORKER_BATCH_SIZE", "8"),
    ("TALLY_POLL_INTERVAL_MS", "100"),
    ("TALLY_DB_POOL_SIZE", "4"),
    ("TALLY_LEASE_TTL_SEC", "3"),
];

async fn delivered(store: &tally::store::Store, id: uuid::Uuid) -> i64 {
    store.get_order(id).await.unwrap().unwrap().delivered
}

/// A rolling deploy: each of three workers in turn gets SIGTERM under load (a short grace,
/// so some attempts are still running and must be handed back) and a replacement starts.
#[tokio::test]
async fn a_rolling_deploy_under_load_leaves_no_orphans_and_burns_no_attempts() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        kind: "simulate",
        ..OrderSpec::units(6000, 10)
    }
    .create(&db.store)
    .await;
    let mut env = WORKER_ENV.to_vec();
    env.push(("TALLY_SHUTDOWN_GRACE_SEC", "0.05"));
    let mut control = spawn_tally(&db.url, &["serve", "--roles", "generator,sweeper"], &env);
    let mut workers: Vec<_> = (0..3)
        .map(|_| spawn_tally(&db.url, &["serve", "--roles", "worker"], &env))
        .collect();
    let store = db.store.clone();
    for round in 0..3 {
        let goal = 1000 * (round + 1);
        wait_until(Duration::from_secs(60), "deliveries progress", || {
            let store = store.clone();
            async move { delivered(&store, id).await >= goal }
        })
        .await;
        let mut old = workers.remove(0);
        signal(&old, libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(20), old.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "round {round}: {status:?}");
        workers.push(spawn_tally(&db.url, &["serve", "--roles", "worker"], &env));
    }
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(120)).await;
    assert_no_orphans_and_no_burned_attempts(&db.store, id).await;
    assert!(
        handed_back(&db.store, id).await > 0,
        "the short grace period left attempts to hand back"
    );
    for c in workers.iter_mut().chain([&mut control]) {
        signal(c, libc::SIGTERM);
        assert!(c.wait().await.unwrap().success());
    }
    assert_no_live_workers(&db.store).await;
}

/// `kubectl scale --replicas=1` from 4: three workers get SIGTERM at once mid-order (with
/// the default grace period, so their attempts finish); the one left completes the order.
#[tokio::test]
async fn scaling_workers_from_four_to_one_mid_order_completes_it() {
    let db = TestDb::new().await;
    let id = OrderSpec {
        kind: "simulate",
        ..OrderSpec::units(4000, 10)
    }
    .create(&db.store)
    .await;
    let env = WORKER_ENV.to_vec();
    let mut control = spawn_tally(&db.url, &["serve", "--roles", "generator,sweeper"], &env);
    let mut workers: Vec<_> = (0..4)
        .map(|_| spawn_tally(&db.url, &["serve", "--roles", "worker"], &env))
        .collect();
    let store = db.store.clone();
    wait_until(Duration::from_secs(60), "all four workers are busy", || {
        let store = store.clone();
        async move { store.executing_by_pid().await.unwrap().len() == 4 }
    })
    .await;
    let at_scale_down = delivered(&db.store, id).await;
    assert!(at_scale_down < 4000, "scaled down mid-order");
    let mut leaving: Vec<_> = workers.drain(1..).collect();
    for w in &leaving {
        signal(w, libc::SIGTERM);
    }
    for w in &mut leaving {
        let status = tokio::time::timeout(Duration::from_secs(30), w.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
    let live: i64 = scalar_i64(
        &db.store,
        "SELECT count(*) FROM workers WHERE stopped_at IS NULL AND roles LIKE '%worker%'",
    )
    .await;
    assert_eq!(live, 1, "three workers deregistered");
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(120)).await;
    assert_no_orphans_and_no_burned_attempts(&db.store, id).await;
    for c in workers.iter_mut().chain([&mut control]) {
        signal(c, libc::SIGTERM);
        assert!(c.wait().await.unwrap().success());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET with a probe's timeout: the kubelet's default 1 s for `/livez`; the chart gives
/// `/readyz` 3 s, as it takes up to 2 s to decide. None when it did not answer in time.
async fn probe(client: &reqwest::Client, url: &str) -> Option<u16> {
    let timeout = if url.ends_with("/livez") { 1 } else { 3 };
    let r = client
        .get(url)
        .timeout(Duration::from_secs(timeout))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

#[tokio::test]
async fn liveness_holds_while_postgres_is_down_and_readiness_recovers_after() {
    // A private cluster: this test stops it for 60 s.
    let cluster = tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let cluster = std::sync::Arc::new(cluster);
    let db = TestDb::on_server(&cluster.url("postgres")).await;
    let (api_port, metrics_port) = (free_port(), free_port());
    let api_addr = format!("127.0.0.1:{api_port}");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut tally = spawn_tally(
        &db.url,
        &["serve"],
        &[
            ("TALLY_API_ADDR", api_addr.as_str()),
            ("TALLY_METRICS_ADDR", metrics_addr.as_str()),
            ("TALLY_SIMULATE_LATENCY_MS", "5"),
            ("TALLY_DB_STATEMENT_TIMEOUT_SEC", "2"),
        ],
    );
    let client = tally::http::client();
    // Both the API port and the metrics port (what worker-only pods are probed on).
    let ports = [api_port, metrics_port];
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    for port in ports {
        while probe(&client, &url(port, "/readyz")).await != Some(200) {
            assert!(Instant::now() < ready_deadline, "never ready on {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let id = OrderSpec {
        kind: "simulate",
        ..OrderSpec::units(2000, 10)
    }
    .create(&db.store)
    .await;
    let store = db.store.clone();
    wait_until(Duration::from_secs(30), "the order is under way", || {
        let store = store.clone();
        async move { store.get_order(id).await.unwrap().unwrap().delivered > 0 }
    })
    .await;
    // The throwaway cluster runs without fsync and with asynchronous commit: make the
    // order durable before the crash, or it may be lost with the unflushed WAL.
    sqlx::query("CHECKPOINT")
        .execute(db.store.pool())
        .await
        .unwrap();

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop("immediate"))
        .await
        .unwrap()
        .unwrap();
    let down_at = Instant::now();
    let (mut live_ok, mut not_ready) = (0, 0);
    while down_at.elapsed() < Duration::from_secs(60) {
        for port in ports {
            let live = probe(&client, &url(port, "/livez")).await;
            assert_eq!(
                live,
                Some(200),
                "/livez on {port} after {:?} without PostgreSQL",
                down_at.elapsed()
            );
            live_ok += 1;
            // Readiness answers within the probe timeout, and says not ready.
            let ready = probe(&client, &url(port, "/readyz")).await;
            if down_at.elapsed() > Duration::from_secs(3) {
                assert_eq!(ready, Some(503), "/readyz on {port} with PostgreSQL down");
                not_ready += 1;
            }
        }
        assert!(tally.try_wait().unwrap().is_none(), "tally exited");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A round takes about 4.5 s: readiness gives the database 2 s on each port.
    assert!(live_ok >= 20 && not_ready >= 16, "{live_ok} {not_ready}");

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart_after_stop())
        .await
        .unwrap()
        .unwrap();
    let back_at = Instant::now();
    for port in ports {
        while probe(&client, &url(port, "/readyz")).await != Some(200) {
            assert!(
                back_at.elapsed() < Duration::from_secs(10),
                "/readyz on {port} not ready 10 s after PostgreSQL returned"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let recovered = back_at.elapsed();
    eprintln!("readiness recovered {recovered:?} after PostgreSQL returned");
    assert!(
        tally.try_wait().unwrap().is_none(),
        "the same process, never restarted"
    );
    // And it goes on working.
    let db_store = db.another_store().await;
    wait_for_status(&db_store, id, "COMPLETED", Duration::from_secs(60)).await;
    assert_fully_delivered(&db_store, id).await;
    signal(&tally, libc::SIGTERM);
    assert!(tally.wait().await.unwrap().success());
    db_store.close().await;
    db.store.close().await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}
