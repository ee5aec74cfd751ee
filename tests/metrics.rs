//! `/metrics` from real processes' roles: per-pod counters and histograms match what was
//! delivered, and the cluster-wide gauges come from the leader only.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::http::{ADMIN_KEY, Answer, Api, Receiver};
use common::*;
use serde_json::json;
use tally::config::Role;
use tally::handler::Handlers;

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Scrapes `/metrics` into sample → value (the sample with its labels, as exposed).
async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    // Empty until the process listens.
    let text = match tally::http::client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    *m.get(k).unwrap_or_else(|| {
        panic!(
            "{k} not exported; have {:?}",
            m.keys()
                .filter(|x| !x.contains("bucket"))
                .collect::<Vec<_>>()
        )
    })
}

#[tokio::test]
async fn counters_follow_the_deliveries_and_cluster_gauges_come_from_the_leader_only() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    rx.always(Answer::status(400));
    api.put(
        "/api/admin/kinds/bad",
        ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": rx.url("/x")}}),
    )
    .await;

    let flaky = Receiver::start().await;
    flaky.script([Answer::status(503)]);
    api.put(
        "/api/admin/kinds/flaky",
        ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": flaky.url("/f")},
                "backoff_base_sec": 0.2, "backoff_max_sec": 0.2}),
    )
    .await;
    let leader_addr = free_addr();
    let mut s = settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]);
    s.metrics_addr = Some(leader_addr);
    let leader = Pod::start(s, Handlers::new()).await;
    wait_until(Duration::from_secs(10), "leader elected", || async {
        scrape(leader_addr)
            .await
            .get("tally_leader{role=\"sweeper\"}")
            == Some(&1.0)
    })
    .await;
    let standby_addr = free_addr();
    let mut s = settings(&db.url, &[Role::Sweeper]);
    s.metrics_addr = Some(standby_addr);
    let standby = Pod::start(s, Handlers::new()).await;

    let good = api
        .create_order(
            &json!({"kind": "simulate", "target": "t", "quantity": 1000, "chunk_size": 100}),
        )
        .await;
    let bad = api
        .create_order(&json!({"kind": "bad", "target": "t", "quantity": 30, "chunk_size": 10}))
        .await;
    let retried = api
        .create_order(&json!({"kind": "flaky", "target": "t", "quantity": 5}))
        .await;
    for id in [&good, &retried] {
        api.wait_completed(id).await;
    }
    api.wait_attention(&bad).await;
    // Gauges refresh every 5 s on the leader.
    wait_until(
        Duration::from_secs(15),
        "gauges show the dead letters",
        || async { scrape(leader_addr).await.get("delivery_dead_letter_queue") == Some(&3.0) },
    )
    .await;

    let m = scrape(leader_addr).await;
    assert_eq!(get(&m, "delivery_tasks_total{status=\"COMPLETED\"}"), 11.0);
    assert_eq!(
        get(&m, "delivery_tasks_total{status=\"FAILED_RETRYING\"}"),
        1.0
    );
    assert_eq!(get(&m, "delivery_retries_total"), 1.0);
    // The re-run waited about its 0.2 s backoff after the failed attempt.
    assert_eq!(get(&m, "tally_recovery_seconds_count"), 1.0);
    let waited = get(&m, "tally_recovery_seconds_sum");
    assert!((0.15..5.0).contains(&waited), "recovery took {waited} s");
    assert_eq!(
        get(&m, "delivery_tasks_total{status=\"FAILED_PERMANENT\"}"),
        3.0
    );
    assert_eq!(
        get(&m, "delivery_units_total{outcome=\"delivered\"}"),
        1005.0
    );
    assert_eq!(get(&m, "delivery_units_total{outcome=\"failed\"}"), 30.0);
    assert_eq!(
        get(
            &m,
            "tally_attempts_total{kind=\"simulate\",outcome=\"delivered\"}"
        ),
        10.0
    );
    assert_eq!(
        get(
            &m,
            "tally_attempts_total{kind=\"bad\",outcome=\"dead_lettered\"}"
        ),
        3.0
    );
    assert_eq!(get(&m, "tally_pickup_latency_seconds_count"), 15.0);
    assert_eq!(get(&m, "delivery_task_duration_seconds_count"), 15.0);
    assert!(get(&m, "delivery_batch_duration_seconds_count") >= 1.0);
    assert_eq!(get(&m, "tally_order_completion_seconds_count"), 2.0);
    assert!(get(&m, "tally_claim_duration_seconds_count") >= 2.0);
    assert!(get(&m, "tally_invariant_checks_total{result=\"passed\"}") >= 2.0);
    assert_eq!(
        get(&m, "tally_invariant_checks_total{result=\"failed\"}"),
        0.0
    );
    assert_eq!(get(&m, "delivery_dead_letter_queue"), 3.0);
    assert_eq!(get(&m, "delivery_tasks_pending"), 0.0);
    assert_eq!(get(&m, "delivery_worker_active"), 1.0);
    assert_eq!(get(&m, "tally_orders_needing_attention"), 1.0);
    assert_eq!(get(&m, "tally_orders_open{status=\"PROCESSING\"}"), 1.0);
    assert!(get(&m, "tally_oldest_processing_order_age_seconds") > 0.0);
    assert_eq!(get(&m, "tally_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(
        get(&m, "tally_orders_finished_total{status=\"COMPLETED\"}"),
        2.0
    );
    assert_eq!(
        get(&m, "tally_orders_finished_total{status=\"CANCELLED\"}"),
        0.0
    );
    assert!(get(&m, "tally_db_pool_acquire_wait_seconds") >= 0.0);
    assert!(get(&m, "tally_db_pool_max_connections") >= 2.0);
    assert!(
        m.keys()
            .any(|k| k.starts_with("process_resident_memory_bytes"))
    );

    // The standby exports its own counters but not the cluster gauges: sums stay right.
    let sb = scrape(standby_addr).await;
    assert_eq!(get(&sb, "tally_leader{role=\"sweeper\"}"), 0.0);
    assert!(!sb.contains_key("delivery_dead_letter_queue"));
    assert!(!sb.contains_key("delivery_worker_active"));
    assert_eq!(get(&sb, "delivery_tasks_total{status=\"COMPLETED\"}"), 0.0);

    // Leadership moves: the standby takes the gauges over, the old leader stops exporting.
    leader.stop().await;
    wait_until(
        Duration::from_secs(20),
        "the standby exports the gauges",
        || async { scrape(standby_addr).await.get("delivery_dead_letter_queue") == Some(&3.0) },
    )
    .await;
    standby.stop().await;
    api.stop().await;
}
