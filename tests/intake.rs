//! Intake at API speed: the batcher that lets concurrent requests share one statement, its
//! semantics (duplicates inside and across batches, a bad order beside good ones, a client
//! that leaves, a statement that fails or loses its connection), the bulk endpoint, the
//! key cache's revocation window, and failing fast when the database is out of reach.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{ADMIN_KEY, Api};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::Connection;
use tally::api::ApiConfig;
use tally::intake::batcher::{self, BatchError};
use tally::intake::{IntakeDefaults, OrderRequest, prepare};
use tally::store::{IntakeAudit, IntakeItem, IntakeOutcome, NewOrder, StoreOptions};
use uuid::Uuid;

fn one_unit(target: &str) -> Value {
    json!({"kind": "simulate", "target": target, "quantity": 1})
}

fn new_order(quantity: u64, key: Option<&str>) -> NewOrder {
    let req = OrderRequest {
        kind: "simulate".into(),
        target: "acct-1".into(),
        quantity,
        ..Default::default()
    };
    let defaults = IntakeDefaults {
        inline_fanout_max_tasks: 64,
        ..IntakeDefaults::default()
    };
    prepare(&req, defaults, key, None).unwrap()
}

fn item(order: NewOrder) -> IntakeItem {
    IntakeItem {
        order,
        audit: Some(IntakeAudit {
            key_id: Uuid::nil(),
            key_name: "test".into(),
            action: "POST /api/orders".into(),
            target: "/api/orders".into(),
            correlation_id: Some("req-1".into()),
        }),
    }
}

async fn post_keyed(api: &Api, body: &Value, key: &str) -> common::http::Reply {
    api.send(
        Method::POST,
        "/api/orders",
        Some(ADMIN_KEY),
        Some(body),
        &[("idempotency-key", key)],
    )
    .await
}

/// Holds an uncommitted ledger row for `key` on its own connection: an intake statement
/// with that key waits on it (as behind a concurrent duplicate) until it is released.
struct KeyBlocker(sqlx::PgConnection);

impl KeyBlocker {
    async fn hold(url: &str, key: &str) -> KeyBlocker {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(
            "INSERT INTO idempotency_ledger (operation_key, order_id, state, request_hash) \
             VALUES ($1, gen_random_uuid(), 'ACCEPTED', 'x')",
        )
        .bind(key)
        .execute(&mut conn)
        .await
        .unwrap();
        KeyBlocker(conn)
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
    }
}

/// The pid of the backend (other than `except`) running an intake statement that waits on
/// a lock.
async fn blocked_intake_backend(db: &TestDb, except: i32) -> i32 {
    backend_waiting_on_a_lock(db.pool(), "%idempotency_ledger%", except).await
}

/// Posts a one-unit order with `key` while another session holds that key: returns the
/// holder, the pending call, and the pid of the backend whose statement waits on the key.
async fn post_behind_a_held_key(
    db: &TestDb,
    api: &Arc<Api>,
    key: &'static str,
) -> (
    KeyBlocker,
    tokio::task::JoinHandle<common::http::Reply>,
    i32,
) {
    let blocker = KeyBlocker::hold(&db.url, key).await;
    let api = api.clone();
    let call = tokio::spawn(async move { post_keyed(&api, &one_unit(key), key).await });
    let pid = blocked_intake_backend(db, 0).await;
    (blocker, call, pid)
}

#[tokio::test]
async fn one_statement_resolves_duplicates_inside_it_and_across_statements() {
    let db = TestDb::new().await;
    let a = new_order(1, Some("k-1"));
    let a_again = new_order(1, Some("k-1"));
    let a_other = new_order(2, Some("k-1"));
    let plain = new_order(1, None);
    let b = new_order(500, Some("k-2"));
    let items: Vec<IntakeItem> = [a, a_again, a_other, plain, b]
        .into_iter()
        .map(item)
        .collect();
    let out = db.store.create_orders(&items, true).await.unwrap();
    let outcomes: Vec<IntakeOutcome> = out.iter().map(|a| a.outcome.clone()).collect();
    let first = items[0].order.id;
    assert_eq!(
        outcomes,
        [
            IntakeOutcome::Created(first),
            IntakeOutcome::Replayed(first),
            IntakeOutcome::Conflict(first),
            IntakeOutcome::Created(items[3].order.id),
            IntakeOutcome::Created(items[4].order.id),
        ]
    );
    // The replay inside the batch carries the order it replays.
    assert_eq!(out[1].order.as_ref().unwrap().id, first);
    assert!(out[2].order.is_none());
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM orders").await,
        3
    );
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempt_count FROM idempotency_ledger WHERE operation_key = 'k-1'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(attempts, 3, "every request with the key is counted");
    // Small orders are fanned out in the statement, big ones left to the generator.
    assert_eq!(out[0].order.as_ref().unwrap().status, "PROCESSING");
    assert_eq!(out[4].order.as_ref().unwrap().status, "PROCESSING");
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await,
        1 + 1 + 2
    );
    // One audit row per request, written by the statement, with who and the correlation id.
    let audit: Vec<(i32, Value)> =
        sqlx::query_as("SELECT status, detail FROM admin_audit ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let statuses: Vec<i32> = audit.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [201, 201, 422, 201, 201]);
    assert_eq!(audit[1].1["replayed"], true);
    assert_eq!(audit[2].1["outcome"], "conflict");
    assert_eq!(audit[0].1["correlation_id"], "req-1");
    assert_eq!(audit[0].1["order_id"], first.to_string());
    // One commit for all of it.
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(DISTINCT xmin::text) FROM orders").await,
        1
    );

    // A later statement: the same key and body is a replay, another body a conflict, and
    // nothing is fanned out again.
    let later: Vec<IntakeItem> = [new_order(1, Some("k-1")), new_order(7, Some("k-2"))]
        .into_iter()
        .map(item)
        .collect();
    let out = db.store.create_orders(&later, true).await.unwrap();
    assert_eq!(out[0].outcome, IntakeOutcome::Replayed(first));
    assert_eq!(
        out[0].order.as_ref().unwrap().id,
        first,
        "read back for the replay"
    );
    assert_eq!(out[1].outcome, IntakeOutcome::Conflict(items[4].order.id));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM orders").await,
        3
    );
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await,
        4
    );
}

#[tokio::test]
async fn running_the_same_statement_again_creates_nothing_twice() {
    // What the store does after a connection died under a statement that may have committed.
    let db = TestDb::new().await;
    let items: Vec<IntakeItem> = [new_order(1, None), new_order(3, Some("k"))]
        .into_iter()
        .map(item)
        .collect();
    let first = db.store.create_orders(&items, true).await.unwrap();
    let again = db.store.create_orders(&items, true).await.unwrap();
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(
            a.outcome, b.outcome,
            "the retry answers as the first run did"
        );
        assert_eq!(a.order.as_ref().unwrap().id, b.order.as_ref().unwrap().id);
    }
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM orders").await,
        2
    );
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM order_tasks").await,
        2
    );
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM admin_audit").await,
        2,
        "audited once"
    );
}

#[tokio::test]
async fn a_bad_order_fails_alone_and_its_batch_mates_are_accepted() {
    let db = TestDb::new().await;
    let mut bad = new_order(10, Some("bad"));
    // Passes the API's checks by construction, but not the schema's.
    bad.task_count = 99;
    let items: Vec<IntakeItem> = [new_order(1, Some("good-1")), bad, new_order(2, None)]
        .into_iter()
        .map(item)
        .collect();
    let answers = batcher::accept(&db.store, &items, true).await;
    assert!(matches!(answers[0], Ok(ref a) if matches!(a.outcome, IntakeOutcome::Created(_))));
    assert!(matches!(answers[1], Err(BatchError::Store(_))));
    assert!(matches!(answers[2], Ok(ref a) if matches!(a.outcome, IntakeOutcome::Created(_))));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM orders").await,
        2
    );
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM idempotency_ledger WHERE operation_key = 'bad'"
        )
        .await,
        0,
        "nothing of the bad order was written"
    );
}

#[tokio::test]
async fn concurrent_requests_share_commits_and_each_gets_its_own_answer() {
    let db = TestDb::new().await;
    let api = Arc::new(Api::start(&db).await);
    let mut calls = Vec::new();
    for i in 0..300 {
        let api = api.clone();
        calls.push(tokio::spawn(async move {
            // Every tenth request repeats the key (and body) of the one before it.
            let key = format!("c-{}", if i % 10 == 9 { i - 1 } else { i });
            let body = one_unit(&format!("t-{}", if i % 10 == 9 { i - 1 } else { i }));
            let reply = post_keyed(&api, &body, &key).await;
            (key, reply)
        }));
    }
    let mut by_key = std::collections::HashMap::new();
    for c in calls {
        let (key, r) = c.await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        let id = r.body["id"].as_str().unwrap().to_owned();
        if let Some(prev) = by_key.insert(key.clone(), id.clone()) {
            assert_eq!(prev, id, "both requests with {key} got the same order");
        }
    }
    assert_eq!(by_key.len(), 270);
    assert_eq!(api.order_count().await, 270);
    let commits = scalar_i64(&db.store, "SELECT count(DISTINCT xmin::text) FROM orders").await;
    assert!(commits < 270, "300 requests took {commits} commits");
    // Every request has its audit row, and no more.
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM admin_audit WHERE action = 'POST /api/orders'"
        )
        .await,
        300
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_batch_still_gets_exactly_one_order() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let blocker = KeyBlocker::hold(&db.url, "leaver").await;
    let impatient = tally::http::client();
    let base = api.base.clone();
    let gone = tokio::spawn(async move {
        impatient
            .post(format!("{base}/api/orders"))
            .header("x-api-key", ADMIN_KEY)
            .header("idempotency-key", "leaver")
            .header("content-type", "application/json")
            .body(one_unit("acct-leaver").to_string())
            .timeout(Duration::from_millis(300))
            .send()
            .await
    });
    blocked_intake_backend(&db, 0).await;
    assert!(gone.await.unwrap().is_err(), "the client gave up");
    // Meanwhile other requests are served (the other statement slot).
    let other = post_keyed(&api, &one_unit("acct-2"), "other").await;
    assert_eq!(other.status, 201);
    blocker.release().await;
    wait_for_count(
        &db.store,
        "SELECT count(*) FROM orders WHERE client_key = 'leaver'",
        1,
        Duration::from_secs(10),
    )
    .await;
    // The client comes back with its key: the order it never heard about.
    let back = post_keyed(&api, &one_unit("acct-leaver"), "leaver").await;
    assert_eq!(back.status, 201);
    assert_eq!(back.headers["idempotent-replayed"], "true");
    assert_eq!(api.order_count().await, 2);
    api.stop().await;
}

#[tokio::test]
async fn a_failed_statement_fails_only_its_requests_with_a_retryable_503() {
    let db = TestDb::new().await;
    let api = Arc::new(Api::start(&db).await);
    let (blocker, doomed, pid) = post_behind_a_held_key(&db, &api, "doomed").await;
    let fine = post_keyed(&api, &one_unit("acct-f"), "fine").await;
    assert_eq!(fine.status, 201, "another statement is not affected");
    let cancelled: bool = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(cancelled);
    let r = doomed.await.unwrap();
    assert_eq!(
        (r.status, r.error_code()),
        (503, "unavailable"),
        "{:?}",
        r.body
    );
    assert_eq!(r.headers["retry-after"], "1");
    blocker.release().await;
    // Sent again, as the 503 invites: accepted once.
    let again = post_keyed(&api, &one_unit("doomed"), "doomed").await;
    assert_eq!(again.status, 201);
    assert!(again.headers.get("idempotent-replayed").is_none());
    assert_eq!(api.order_count().await, 2);
}

#[tokio::test]
async fn a_statement_whose_connection_is_killed_is_run_again_on_a_fresh_one() {
    let db = TestDb::new().await;
    let api = Arc::new(Api::start(&db).await);
    let (blocker, call, pid) = post_behind_a_held_key(&db, &api, "killed").await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(killed);
    // The retry waits on the key again; let it through.
    let retry_pid = blocked_intake_backend(&db, pid).await;
    assert_ne!(retry_pid, pid, "a fresh connection");
    blocker.release().await;
    let r = call.await.unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    assert_eq!(api.order_count().await, 1);
}

#[tokio::test]
async fn intake_answers_503_within_two_seconds_when_the_database_is_unreachable() {
    let db = TestDb::new().await;
    let proxy = CutProxy::start(&db.url).await;
    let store = tally::store::Store::connect(&StoreOptions::new(proxy.url(&db.url)))
        .await
        .unwrap();
    let through = TestDb {
        url: proxy.url(&db.url),
        store,
    };
    let api = Api::start(&through).await;
    let ok = post_keyed(&api, &one_unit("acct-1"), "before").await;
    assert_eq!(ok.status, 201);
    proxy.cut();
    for key in ["during-1", "during-2"] {
        let started = Instant::now();
        let r = post_keyed(&api, &one_unit("acct-1"), key).await;
        let took = started.elapsed();
        assert_eq!(
            (r.status, r.error_code()),
            (503, "unavailable"),
            "{:?}",
            r.body
        );
        assert_eq!(r.headers["retry-after"], "1");
        assert!(took < Duration::from_secs(2), "answered in {took:?}");
    }
    // An unknown key cannot be looked up either: 503 as fast, not a hang.
    let started = Instant::now();
    let r = api
        .post(
            "/api/orders",
            "some-other-key-0123456789",
            Some(&one_unit("x")),
        )
        .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        scalar_i64(&db.store, "SELECT count(*) FROM orders").await,
        1
    );
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_every_api_process_within_the_cache_window() {
    let db = TestDb::new().await;
    let ttl = Duration::from_secs(1);
    let config = || ApiConfig {
        cache_ttl: ttl,
        ..ApiConfig::default()
    };
    let a = Api::start_with(&db, config()).await;
    let b = Api::start_with(&db, config()).await;
    let key = a.key("producer", "operate").await;
    let key_id = sqlx::query_scalar::<_, Uuid>("SELECT id FROM api_keys WHERE name = 'producer'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    // Both processes have the key in their cache.
    for api in [&a, &b] {
        assert_eq!(
            api.post("/api/orders", &key, Some(&one_unit("t")))
                .await
                .status,
            201
        );
    }
    let revoked_at = Instant::now();
    let r = a
        .post(&format!("/api/admin/keys/{key_id}/revoke"), ADMIN_KEY, None)
        .await;
    assert_eq!(r.status, 200);
    // The process that revoked it refuses it at once.
    let r = a.post("/api/orders", &key, Some(&one_unit("t"))).await;
    assert_eq!((r.status, r.error_code()), (401, "unauthorized"));
    // The other within the window.
    loop {
        let r = b.post("/api/orders", &key, Some(&one_unit("t"))).await;
        if r.status == 401 {
            break;
        }
        assert_eq!(r.status, 201);
        assert!(
            revoked_at.elapsed() < ttl + Duration::from_millis(500),
            "still accepted {:?} after the revocation",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revoked_at.elapsed() <= ttl + Duration::from_millis(500));
}

#[tokio::test]
async fn the_bulk_endpoint_answers_each_order_and_never_half_writes() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let mut orders: Vec<Value> = (0..995)
        .map(|i| json!({"idempotency_key": format!("bulk-{i}"), "kind": "simulate", "target": format!("t-{i}"), "quantity": 1}))
        .collect();
    // 995: the same key and body as item 0 (a replay); 996: item 1's key, another body.
    orders.push(
        json!({"idempotency_key": "bulk-0", "kind": "simulate", "target": "t-0", "quantity": 1}),
    );
    orders.push(
        json!({"idempotency_key": "bulk-1", "kind": "simulate", "target": "t-1", "quantity": 2}),
    );
    // 997: a bad field; 998: an unknown kind; 999: not an object.
    orders.push(
        json!({"idempotency_key": "bulk-bad", "kind": "simulate", "target": "t", "quantity": 0}),
    );
    orders.push(
        json!({"idempotency_key": "bulk-nokind", "kind": "nope", "target": "t", "quantity": 1}),
    );
    orders.push(json!("not an order"));
    let body = json!({ "orders": orders });
    let r = api.post("/api/orders/batch", ADMIN_KEY, Some(&body)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    assert_eq!(
        (
            r.body["created"].as_u64(),
            r.body["replayed"].as_u64(),
            r.body["failed"].as_u64()
        ),
        (Some(995), Some(1), Some(4))
    );
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["index"], i);
    }
    assert_eq!(results[995]["outcome"], "replayed");
    assert_eq!(results[995]["id"], results[0]["id"]);
    assert!(results[0]["id"].as_str().unwrap().parse::<Uuid>().is_ok());
    let err = |i: usize| {
        (
            results[i]["status"].as_u64().unwrap(),
            results[i]["error"]["field"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        )
    };
    assert_eq!(err(996), (422, "idempotency_key".to_owned()));
    assert_eq!(results[996]["error"]["code"], "idempotency_key_reused");
    assert_eq!(err(997), (422, "quantity".to_owned()));
    assert_eq!(err(998), (422, "kind".to_owned()));
    assert_eq!(err(999), (422, "order".to_owned()));
    assert_eq!(api.order_count().await, 995);
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM idempotency_ledger WHERE operation_key IN ('bulk-bad', 'bulk-nokind')"
        )
        .await,
        0
    );

    // Sent again (a producer retrying after a timeout): nothing new.
    let again = api.post("/api/orders/batch", ADMIN_KEY, Some(&body)).await;
    assert_eq!(
        (
            again.body["created"].as_u64(),
            again.body["replayed"].as_u64()
        ),
        (Some(0), Some(996))
    );
    assert_eq!(api.order_count().await, 995);

    // The call's own bad input.
    let too_many = json!({"orders": vec![one_unit("t"); 1001]});
    let r = api
        .post("/api/orders/batch", ADMIN_KEY, Some(&too_many))
        .await;
    assert_eq!((r.status, r.error_field()), (422, "orders"));
    let r = api
        .post("/api/orders/batch", ADMIN_KEY, Some(&json!({"orders": []})))
        .await;
    assert_eq!((r.status, r.error_field()), (422, "orders"));
    let read_only = api.key("reader", "read").await;
    let r = api
        .post(
            "/api/orders/batch",
            &read_only,
            Some(&json!({"orders": [one_unit("t")]})),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(api.order_count().await, 995);
    api.stop().await;
}
