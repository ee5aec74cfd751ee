//! The HTTP API against real PostgreSQL: auth and scopes, idempotent intake, validation,
//! every order and admin endpoint, kinds, keys, callbacks, and the audit trail.

mod common;

use std::time::Duration;

use common::http::{ADMIN_KEY, Answer, Api, Receiver};
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tally::config::Role;
use tally::handler::Handlers;

const ALL_ROLES: [Role; 3] = [Role::Generator, Role::Worker, Role::Sweeper];

fn order(quantity: u64, chunk: u64) -> Value {
    json!({"kind": "simulate", "target": "acct-1", "quantity": quantity, "chunk_size": chunk})
}

async fn audit_rows(api: &Api) -> Vec<(Option<uuid::Uuid>, String, i32)> {
    sqlx::query_as("SELECT key_id, action, status FROM admin_audit ORDER BY id")
        .fetch_all(api.store.pool())
        .await
        .unwrap()
}

async fn wait_order(api: &Api, id: &str, status: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        last = api.get(&format!("/api/orders/{id}"), ADMIN_KEY).await.body;
        if last["status"] == status {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("order {id} never became {status}: {last}");
}

#[tokio::test]
async fn every_call_needs_a_valid_key_with_enough_scope() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    for path in ["/livez", "/readyz", "/api/openapi.json"] {
        let r = api.send(Method::GET, path, None, None, &[]).await;
        assert_eq!(r.status, 200, "{path} needs no key");
    }
    assert_eq!(
        api.send(Method::GET, "/api/openapi.json", None, None, &[])
            .await
            .body["openapi"],
        "3.0.3"
    );

    let none = api.send(Method::GET, "/api/orders", None, None, &[]).await;
    assert_eq!((none.status, none.error_code()), (401, "unauthorized"));
    for bad in [
        "short",
        "tly_0000000000000000000000000000000000000000",
        "ünïcode-key-ünïcode",
    ] {
        let r = api
            .send(Method::GET, "/api/orders", Some(bad), None, &[])
            .await;
        assert_eq!(r.status, 401, "key {bad:?}: {:?}", r.body);
    }
    let reader = api.key("dashboards", "read").await;
    let operator = api.key("oncall", "operate").await;
    assert_eq!(api.get("/api/orders", &reader).await.status, 200);
    // Too little scope: 403, and nothing changes.
    let before = api.order_count().await;
    let r = api.post("/api/orders", &reader, Some(&order(10, 5))).await;
    assert_eq!(
        (r.status, r.error_code()),
        (403, "forbidden"),
        "{:?}",
        r.body
    );
    assert_eq!(api.order_count().await, before);
    assert_eq!(
        api.post("/api/admin/pause", &reader, None).await.status,
        403
    );
    assert_eq!(
        api.put(
            "/api/admin/kinds/x",
            &operator,
            &json!({"handler": "simulate"})
        )
        .await
        .status,
        403
    );
    assert_eq!(api.get("/api/admin/keys", &operator).await.status, 403);
    assert_eq!(api.get("/api/admin/audit", &operator).await.status, 403);
    assert_eq!(
        api.post("/api/admin/testing/enable", &operator, None)
            .await
            .status,
        403
    );
    assert_eq!(
        api.post("/api/orders", &operator, Some(&order(10, 5)))
            .await
            .status,
        201
    );
    // Revoked keys stop working at once.
    let keys = api.get("/api/admin/keys", ADMIN_KEY).await.body;
    let reader_id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "dashboards")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        api.post(
            &format!("/api/admin/keys/{reader_id}/revoke"),
            ADMIN_KEY,
            None
        )
        .await
        .status,
        200
    );
    let r = api.get("/api/orders", &reader).await;
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked")
    );
    // The 403s were audited with the key that tried.
    let audit = audit_rows(&api).await;
    assert!(
        audit
            .iter()
            .any(|(k, a, s)| k.is_some() && a == "POST /api/orders" && *s == 403),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|(_, a, s)| a == "POST /api/orders" && *s == 201)
    );
    api.stop().await;
}

#[tokio::test]
async fn intake_is_idempotent_by_key_and_a_reused_key_with_another_body_is_422() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let body = order(15_000, 400);
    let send = |b: Value, key: &'static str| {
        let api = &api;
        async move {
            api.send(
                Method::POST,
                "/api/orders",
                Some(ADMIN_KEY),
                Some(&b),
                &[("idempotency-key", key)],
            )
            .await
        }
    };
    let first = send(body.clone(), "order-7").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["task_count"], 38);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = send(body.clone(), "order-7").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let mut other = body.clone();
    other["quantity"] = json!(15_001);
    let conflict = send(other, "order-7").await;
    assert_eq!(
        (conflict.status, conflict.error_code()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(conflict.error_field(), "Idempotency-Key");
    assert_eq!(api.order_count().await, 1);
    let ledger: (i32,) = sqlx::query_as(
        "SELECT attempt_count FROM idempotency_ledger WHERE operation_key = 'order-7'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(ledger.0, 3);
    api.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_duplicates_create_one_order() {
    let db = TestDb::new().await;
    let api = std::sync::Arc::new(Api::start(&db).await);
    let mut calls = Vec::new();
    for _ in 0..50 {
        let api = api.clone();
        calls.push(tokio::spawn(async move {
            api.send(
                Method::POST,
                "/api/orders",
                Some(ADMIN_KEY),
                Some(&order(1000, 100)),
                &[("idempotency-key", "burst-1")],
            )
            .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        ids.insert(r.body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every duplicate got the same order");
    assert_eq!(api.order_count().await, 1);
}

#[tokio::test]
async fn bad_input_is_a_4xx_naming_the_field_and_changes_nothing() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"kind": "nope", "target": "t", "quantity": 1}),
            422,
            "invalid",
            "kind",
        ),
        (
            json!({"kind": "Bad Kind", "target": "t", "quantity": 1}),
            422,
            "invalid",
            "kind",
        ),
        (
            json!({"kind": "simulate", "target": "", "quantity": 1}),
            422,
            "invalid",
            "target",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 0}),
            422,
            "invalid",
            "quantity",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": -5}),
            422,
            "invalid",
            "quantity",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 2_000_000_000_000u64}),
            422,
            "invalid",
            "quantity",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": "ten"}),
            422,
            "invalid",
            "quantity",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "chunk_size": 0}),
            422,
            "invalid",
            "chunk_size",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 1_000_000_000, "chunk_size": 1}),
            422,
            "invalid",
            "chunk_size",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "priority": 1000}),
            422,
            "invalid",
            "priority",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "max_attempts": 0}),
            422,
            "invalid",
            "max_attempts",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "callback_url": "file:///etc/passwd"}),
            422,
            "invalid",
            "callback_url",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "callback_format": "xml"}),
            422,
            "invalid",
            "callback_format",
        ),
        (
            json!({"kind": "simulate", "target": "t", "quantity": 5, "colour": "red"}),
            422,
            "invalid",
            "colour",
        ),
        (
            json!({"target": "t", "quantity": 5}),
            422,
            "invalid",
            "kind",
        ),
        (json!([1, 2, 3]), 422, "invalid", ""),
    ];
    for (body, status, code, field) in cases {
        let r = api.post("/api/orders", ADMIN_KEY, Some(&body)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (status, code),
            "{body}: {:?}",
            r.body
        );
        if !field.is_empty() {
            assert_eq!(r.error_field(), field, "{body}: {:?}", r.body);
        }
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Malformed JSON, no content type, too large, a bad header.
    let raw = |body: &'static str, ct: Option<&'static str>| {
        let mut req = api
            .client
            .post(format!("{}/api/orders", api.base))
            .header("x-api-key", ADMIN_KEY)
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };
    assert_eq!(
        raw("{not json", Some("application/json"))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        raw(r#"{"kind":"simulate"}"#, None).await.unwrap().status(),
        415
    );
    let big = format!(
        r#"{{"kind":"simulate","target":"{}","quantity":1}}"#,
        "x".repeat(70_000)
    );
    let r = api
        .client
        .post(format!("{}/api/orders", api.base))
        .header("x-api-key", ADMIN_KEY)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = api
        .send(
            Method::POST,
            "/api/orders",
            Some(ADMIN_KEY),
            Some(&order(5, 5)),
            &[("idempotency-key", "")],
        )
        .await;
    assert_eq!((r.status, r.error_field()), (422, "Idempotency-Key"));
    assert_eq!(
        api.order_count().await,
        0,
        "no bad request created anything"
    );
    // Bad parameters, unknown things, unknown routes and methods.
    for (path, status, field) in [
        ("/api/orders/not-a-uuid", 422, "id"),
        ("/api/orders?status=DONE", 422, "status"),
        ("/api/orders?limit=0", 422, "limit"),
        ("/api/orders?limit=abc", 422, "limit"),
        ("/api/orders?cursor=zzz", 422, "cursor"),
        ("/api/orders?colour=red", 422, "colour"),
        ("/api/tasks/abc/trace", 422, ""),
        ("/api/admin/kinds/Bad%20Name", 422, "name"),
    ] {
        let r = api.get(path, ADMIN_KEY).await;
        assert_eq!(r.status, status, "{path}: {:?}", r.body);
        if !field.is_empty() {
            assert_eq!(r.error_field(), field, "{path}");
        }
    }
    let missing = uuid::Uuid::now_v7();
    for path in [
        format!("/api/orders/{missing}"),
        format!("/api/orders/{missing}/progress"),
        format!("/api/admin/orders/{missing}/failed-tasks"),
        format!("/api/admin/invariants/orders/{missing}"),
        "/api/tasks/999999/trace".into(),
        "/api/admin/kinds/nope".into(),
        "/api/no/such/route".into(),
    ] {
        let r = api.get(&path, ADMIN_KEY).await;
        assert_eq!((r.status, r.error_code()), (404, "not_found"), "{path}");
    }
    for action in [
        "cancel",
        "pause",
        "resume",
        "retry",
        "drain-dlq",
        "force-complete",
    ] {
        let r = api
            .post(&format!("/api/orders/{missing}/{action}"), ADMIN_KEY, None)
            .await;
        assert_eq!(r.status, 404, "{action}");
    }
    let r = api
        .send(Method::DELETE, "/api/orders", Some(ADMIN_KEY), None, &[])
        .await;
    assert_eq!((r.status, r.error_code()), (405, "method_not_allowed"));
    api.stop().await;
}

#[tokio::test]
async fn orders_are_listed_by_filter_with_cursor_pagination() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    api.put(
        "/api/admin/kinds/other",
        ADMIN_KEY,
        &json!({"handler": "simulate"}),
    )
    .await;
    let mut simulate_ids = Vec::new();
    for i in 0..5 {
        let r = api
            .post("/api/orders", ADMIN_KEY, Some(&order(10 + i, 5)))
            .await;
        simulate_ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    for _ in 0..2 {
        api.post(
            "/api/orders",
            ADMIN_KEY,
            Some(&json!({"kind": "other", "target": "t", "quantity": 3})),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/orders?kind=simulate&limit=2".to_string(),
            Some(c) => format!("/api/orders?kind=simulate&limit=2&cursor={c}"),
        };
        let page = api.get(&path, ADMIN_KEY).await.body;
        for o in page["orders"].as_array().unwrap() {
            assert_eq!(o["kind"], "simulate");
            seen.push(o["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    simulate_ids.reverse();
    assert_eq!(seen, simulate_ids, "newest first, each once");
    // Small orders are fanned out at intake, so they are PROCESSING at once.
    let processing = api
        .get("/api/orders?status=PROCESSING&limit=500", ADMIN_KEY)
        .await
        .body;
    assert_eq!(processing["orders"].as_array().unwrap().len(), 7);
    assert!(processing["next_cursor"].is_null());
    let pending = api.get("/api/orders?status=PENDING", ADMIN_KEY).await.body;
    assert_eq!(pending["orders"].as_array().unwrap().len(), 0);
    let done = api
        .get("/api/orders?status=COMPLETED", ADMIN_KEY)
        .await
        .body;
    assert_eq!(done["orders"].as_array().unwrap().len(), 0);
    api.stop().await;
}

#[tokio::test]
async fn an_order_is_delivered_traced_checked_and_reported_through_the_api() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let mut body = order(1000, 100);
    body["callback_url"] = json!(rx.url("/done"));
    let created = api
        .send(
            Method::POST,
            "/api/orders",
            Some(ADMIN_KEY),
            Some(&body),
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(
        created.headers["location"],
        format!("/api/orders/{}", created.body["id"].as_str().unwrap())
    );
    let id = created.body["id"].as_str().unwrap().to_owned();
    let done = wait_order(&api, &id, "COMPLETED", Duration::from_secs(30)).await;
    assert_eq!(
        (
            done["delivered"].as_i64(),
            done["outstanding_units"].as_i64()
        ),
        (Some(1000), Some(0))
    );
    assert!(done["shortfall"].is_null());

    let p = api
        .get(&format!("/api/orders/{id}/progress"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(
        (
            p["percent"].as_f64(),
            p["tasks_by_status"]["COMPLETED"].as_i64()
        ),
        (Some(100.0), Some(10))
    );
    assert_eq!(p["tasks_by_status"]["PENDING"], 0);
    let p2 = api
        .get(&format!("/api/admin/orders/{id}/progress"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(p2["delivered"], 1000);

    // The callback arrives once, idempotently keyed, and is recorded as delivered.
    let calls = rx.wait_for_calls(1, Duration::from_secs(15)).await;
    assert_eq!(calls[0].path, "/done");
    assert_eq!(calls[0].body["event"], "COMPLETED");
    assert_eq!(calls[0].body["order"]["id"], id.as_str());
    assert_eq!(calls[0].body["order"]["delivered"], 1000);
    assert!(
        calls[0]
            .header("idempotency-key")
            .unwrap()
            .starts_with("tally-callback-")
    );
    wait_until(Duration::from_secs(10), "callback recorded", || async {
        api.get(&format!("/api/orders/{id}/callbacks"), ADMIN_KEY)
            .await
            .body["callbacks"][0]["status"]
            == "DELIVERED"
    })
    .await;
    let cbs = api
        .get(&format!("/api/orders/{id}/callbacks"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(cbs["callbacks"].as_array().unwrap().len(), 1);
    assert_eq!(cbs["callbacks"][0]["response_status"], 200);

    // Trace a task: its whole history.
    let task_id: i64 = sqlx::query_scalar(
        "SELECT id FROM order_tasks WHERE order_id = $1::uuid ORDER BY seq LIMIT 1",
    )
    .bind(&id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    let trace = api
        .get(&format!("/api/tasks/{task_id}/trace"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(trace["task"]["status"], "COMPLETED");
    assert_eq!(trace["task"]["idempotency_key"], format!("{id}:0"));
    let states: Vec<&str> = trace["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to_state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["EXECUTING", "COMPLETED"]);

    // Invariants, workers, capacity and health see the same world.
    let inv = api
        .get(&format!("/api/admin/invariants/orders/{id}"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(
        (inv["passed"].as_bool(), inv["delivered_units"].as_i64()),
        (Some(true), Some(1000))
    );
    let all = api.get("/api/admin/invariants/all", ADMIN_KEY).await.body;
    assert_eq!(
        (all["checked"].as_i64(), all["failed"].as_i64()),
        (Some(1), Some(0))
    );
    let orphans = api
        .get("/api/admin/invariants/orphans", ADMIN_KEY)
        .await
        .body;
    assert_eq!(orphans["count"], 0);
    let status = api.get("/api/admin/worker/status", ADMIN_KEY).await.body;
    let me = status
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workerId"] == pod.id.to_string())
        .expect("this pod listed");
    assert_eq!(me["isRunning"], true);
    for k in [
        "totalProcessed",
        "totalCompleted",
        "totalFailed",
        "totalRetries",
        "recoveredOrphans",
    ] {
        assert!(me[k].is_i64(), "{k} in camelCase: {me}");
    }
    wait_until(
        Duration::from_secs(10),
        "heartbeat reports the counters",
        || async {
            api.get("/api/admin/worker/status", ADMIN_KEY).await.body[0]["totalCompleted"].as_i64()
                >= Some(10)
        },
    )
    .await;
    let workers = api.get("/api/admin/workers", ADMIN_KEY).await.body;
    assert_eq!(workers["workers"][0]["status"], "running");
    assert_eq!(workers["workers"][0]["concurrency"], 16);
    let cap = api.get("/api/admin/capacity", ADMIN_KEY).await.body;
    assert_eq!(
        (cap["pending_tasks"].as_i64(), cap["worker_slots"].as_i64()),
        (Some(0), Some(16))
    );
    assert!(cap["units_per_sec_5m"].as_f64().unwrap() > 0.0, "{cap}");
    assert_eq!(cap["eta_seconds"], 0.0);
    let health = api.get("/api/admin/health", ADMIN_KEY).await.body;
    assert_eq!(health["verdict"], "healthy", "{health}");
    assert_eq!(health["tasks_by_status"]["COMPLETED"], 10);
    pod.stop().await;
    api.stop().await;
}

/// A webhook kind pointing at the receiver, with fast retries.
async fn webhook_kind(api: &Api, name: &str, url: &str, max_attempts: i32) {
    let r = api
        .put(
            &format!("/api/admin/kinds/{name}"),
            ADMIN_KEY,
            &json!({"handler": "webhook", "webhook": {"url": url, "timeout_ms": 2000},
                    "max_attempts": max_attempts, "backoff_base_sec": 0.05, "backoff_max_sec": 0.2}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[tokio::test]
async fn dead_letters_are_inspected_and_drained_back_to_delivery() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let hooks = Receiver::start().await;
    let slack = Receiver::start().await;
    hooks.always(Answer::status(400).body("unknown account"));
    webhook_kind(&api, "crm-sync", &hooks.url("/deliver"), 3).await;
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let created = api
        .post(
            "/api/orders",
            ADMIN_KEY,
            Some(
                &json!({"kind": "crm-sync", "target": "acct-9", "quantity": 30,
              "chunk_size": 10, "callback_url": slack.url("/slack"), "callback_format": "slack"}),
            ),
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    api.wait_attention(&id).await;
    // A 400 is permanent at once: one call per task.
    assert_eq!(hooks.calls().len(), 3);
    let dlq = api
        .get(&format!("/api/admin/orders/{id}/failed-tasks"), ADMIN_KEY)
        .await
        .body;
    let tasks = dlq["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    assert!(tasks.iter().all(|t| {
        t["last_error_class"] == "ValidationError"
            && t["last_error"]
                .as_str()
                .unwrap()
                .contains("unknown account")
    }));
    let o = api.get(&format!("/api/orders/{id}"), ADMIN_KEY).await.body;
    assert_eq!(
        (o["status"].as_str(), o["failed_permanent_units"].as_i64()),
        (Some("PROCESSING"), Some(30))
    );
    // The Slack-formatted callback says so.
    let calls = slack.wait_for_calls(1, Duration::from_secs(10)).await;
    assert_eq!(calls[0].body["blocks"][0]["type"], "header");
    assert!(
        calls[0].body["text"]
            .as_str()
            .unwrap()
            .contains("needs attention"),
        "{}",
        calls[0].body
    );
    // Fix the receiver, drain the queue: everything is delivered, nothing twice.
    hooks.always(Answer::status(200));
    let drained = api
        .post(&format!("/api/orders/{id}/drain-dlq"), ADMIN_KEY, None)
        .await;
    assert_eq!(
        (
            drained.body["tasks"].as_i64(),
            drained.body["units"].as_i64()
        ),
        (Some(3), Some(30)),
        "{:?}",
        drained.body
    );
    let done = wait_order(&api, &id, "COMPLETED", Duration::from_secs(20)).await;
    assert_eq!(
        (
            done["delivered"].as_i64(),
            done["failed_permanent_units"].as_i64()
        ),
        (Some(30), Some(0))
    );
    assert_eq!(hooks.calls().len(), 6);
    let calls = slack.wait_for_calls(2, Duration::from_secs(10)).await;
    assert!(
        calls[1].body["text"]
            .as_str()
            .unwrap()
            .contains("completed"),
        "{}",
        calls[1].body
    );
    let inv = api
        .get(&format!("/api/admin/invariants/orders/{id}"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(inv["passed"], true, "{inv}");
    // The replay is in each task's trace, and the drain in the audit.
    let task_id = tasks[0]["id"].as_i64().unwrap();
    let trace = api
        .get(&format!("/api/tasks/{task_id}/trace"), ADMIN_KEY)
        .await
        .body;
    let reasons: Vec<&str> = trace["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["transition_reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "claimed",
            "dead_lettered",
            "replayed",
            "claimed",
            "delivered"
        ]
    );
    let audit = audit_rows(&api).await;
    assert!(
        audit
            .iter()
            .any(|(k, a, s)| k.is_some() && a == "POST /api/orders/{id}/drain-dlq" && *s == 200)
    );
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn pause_resume_cancel_retry_and_force_complete() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let hooks = Receiver::start().await;

    // Pause before anything runs (the workers start after the pause; a 20-task order is
    // claimable the moment it is accepted): its tasks are never claimed until resumed.
    let a = api.create_order(&order(200, 10)).await;
    let paused = api
        .post(&format!("/api/orders/{a}/pause"), ADMIN_KEY, None)
        .await;
    assert_eq!(paused.body["paused"], true, "{:?}", paused.body);
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    wait_until(Duration::from_secs(10), "tasks generated", || async {
        api.get(&format!("/api/orders/{a}"), ADMIN_KEY).await.body["status"] == "PROCESSING"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p = api
        .get(&format!("/api/orders/{a}/progress"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(
        (
            p["delivered"].as_i64(),
            p["tasks_by_status"]["PENDING"].as_i64()
        ),
        (Some(0), Some(20)),
        "{p}"
    );
    // Cancel it while paused: every unit is cancelled, nothing was delivered.
    let c = api
        .post(&format!("/api/orders/{a}/cancel"), ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(
        (
            c["status"].as_str(),
            c["cancelled_units"].as_i64(),
            c["shortfall"].as_i64()
        ),
        (Some("CANCELLED"), Some(200), Some(200))
    );
    let again = api
        .post(&format!("/api/orders/{a}/cancel"), ADMIN_KEY, None)
        .await;
    assert_eq!((again.status, again.error_code()), (409, "conflict"));
    assert_eq!(
        api.post(&format!("/api/orders/{a}/resume"), ADMIN_KEY, None)
            .await
            .status,
        409
    );
    assert_eq!(
        api.post(&format!("/api/orders/{a}/drain-dlq"), ADMIN_KEY, None)
            .await
            .status,
        409
    );
    assert_eq!(
        api.get(&format!("/api/admin/invariants/orders/{a}"), ADMIN_KEY)
            .await
            .body["passed"],
        true
    );

    // Pause and resume: the order then completes.
    let b = api.create_order(&order(100, 10)).await;
    api.post(&format!("/api/orders/{b}/pause"), ADMIN_KEY, None)
        .await;
    let resumed = api
        .post(&format!("/api/orders/{b}/resume"), ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(resumed["paused"], false);
    wait_order(&api, &b, "COMPLETED", Duration::from_secs(20)).await;

    // Retry now: a task waiting an hour for its retry runs at once.
    let r = api.put("/api/admin/kinds/slow-retry", ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": hooks.url("/retry")}, "backoff_base_sec": 3600})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    hooks.script([Answer::status(503)]);
    let c_id = api
        .create_order(&json!({"kind": "slow-retry", "target": "t", "quantity": 5}))
        .await;
    wait_until(
        Duration::from_secs(20),
        "task waits for its retry",
        || async {
            api.get(&format!("/api/orders/{c_id}/progress"), ADMIN_KEY)
                .await
                .body["tasks_by_status"]["FAILED_RETRYING"]
                == 1
        },
    )
    .await;
    let retried = api
        .post(&format!("/api/orders/{c_id}/retry"), ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(retried["tasks"], 1);
    wait_order(&api, &c_id, "COMPLETED", Duration::from_secs(20)).await;

    // Force-complete: accept what was delivered; the rest is the recorded shortfall.
    hooks.always(Answer::status(200).body(r#"{"delivered": 4}"#));
    let r = api.put("/api/admin/kinds/half", ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": hooks.url("/half")}, "max_attempts": 1})).await;
    assert_eq!(r.status, 200);
    let d = api
        .create_order(&json!({"kind": "half", "target": "t", "quantity": 20, "chunk_size": 10}))
        .await;
    api.wait_attention(&d).await;
    let f = api
        .post(&format!("/api/orders/{d}/force-complete"), ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(
        (
            f["status"].as_str(),
            f["delivered"].as_i64(),
            f["shortfall"].as_i64()
        ),
        (Some("PARTIAL"), Some(8), Some(12)),
        "{f}"
    );
    assert_eq!(
        api.post(&format!("/api/orders/{d}/force-complete"), ADMIN_KEY, None)
            .await
            .status,
        409
    );
    assert_eq!(
        api.get(&format!("/api/admin/invariants/orders/{d}"), ADMIN_KEY)
            .await
            .body["passed"],
        true
    );
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn the_global_pause_stops_every_claim_until_resumed() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let c = api.post("/api/admin/pause", ADMIN_KEY, None).await.body;
    assert_eq!(c["paused"], true);
    assert!(
        c["updated_by"]
            .as_str()
            .unwrap()
            .starts_with("key:bootstrap:")
    );
    let id = api.create_order(&order(50, 10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        api.get(&format!("/api/orders/{id}"), ADMIN_KEY).await.body["delivered"],
        0
    );
    let health = api.get("/api/admin/health", ADMIN_KEY).await.body;
    assert_eq!(health["verdict"], "unhealthy");
    assert!(
        health["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("paused"))
    );
    assert_eq!(
        api.get("/api/admin/control", ADMIN_KEY).await.body["paused"],
        true
    );
    assert_eq!(
        api.post("/api/admin/resume", ADMIN_KEY, None).await.body["paused"],
        false
    );
    wait_order(&api, &id, "COMPLETED", Duration::from_secs(20)).await;
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn kinds_are_validated_managed_and_protected_while_in_use() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let kinds = api.get("/api/admin/kinds", ADMIN_KEY).await.body;
    assert_eq!(
        kinds["kinds"][0]["name"], "simulate",
        "a fresh install has the simulate kind"
    );
    let bad: Vec<(Value, &str)> = vec![
        (json!({"handler": "carrier-pigeon"}), "handler"),
        (json!({"handler": "webhook"}), "webhook"),
        (
            json!({"handler": "simulate", "webhook": {"url": "http://x"}}),
            "webhook",
        ),
        (
            json!({"handler": "webhook", "webhook": {"url": "ftp://x"}}),
            "webhook.url",
        ),
        (
            json!({"handler": "webhook", "webhook": {}}),
            "webhook.allowed_hosts",
        ),
        (
            json!({"handler": "webhook", "webhook": {"url": "http://a.example/x", "allowed_hosts": ["b.example"]}}),
            "webhook.url",
        ),
        (
            json!({"handler": "webhook", "webhook": {"url": "http://a/x", "timeout_ms": 0}}),
            "webhook.timeout_ms",
        ),
        (
            json!({"handler": "webhook", "webhook": {"url": "http://a/x", "signing_secret": "short"}}),
            "webhook.signing_secret",
        ),
        (
            json!({"handler": "webhook", "webhook": {"url": "http://a/x", "headers": {"Idempotency-Key": "x"}}}),
            "webhook.headers",
        ),
        (
            json!({"handler": "simulate", "max_attempts": 0}),
            "max_attempts",
        ),
        (
            json!({"handler": "simulate", "backoff_base_sec": 10, "backoff_max_sec": 1}),
            "backoff_max_sec",
        ),
        (
            json!({"handler": "simulate", "backoff_multiplier": 0.5}),
            "backoff_multiplier",
        ),
        (
            json!({"handler": "simulate", "default_chunk_size": 0}),
            "default_chunk_size",
        ),
        (
            json!({"handler": "simulate", "concurrency_limit": 0}),
            "concurrency_limit",
        ),
        (json!({"handler": "simulate", "colour": "red"}), "colour"),
    ];
    for (spec, field) in bad {
        let r = api.put("/api/admin/kinds/k1", ADMIN_KEY, &spec).await;
        assert_eq!(
            (r.status, r.error_field()),
            (422, field),
            "{spec}: {:?}",
            r.body
        );
    }
    assert_eq!(
        api.get("/api/admin/kinds/k1", ADMIN_KEY).await.status,
        404,
        "no bad spec was stored"
    );
    let spec = json!({"handler": "webhook", "webhook": {"url": "https://hooks.example.com/t", "timeout_ms": 1500,
        "signing_secret": "0123456789abcdef0123", "headers": {"X-Team": "growth"}},
        "max_attempts": 5, "default_chunk_size": 250, "concurrency_limit": 4});
    let k = api.put("/api/admin/kinds/k1", ADMIN_KEY, &spec).await.body;
    assert_eq!(
        (k["max_attempts"].as_i64(), k["default_chunk_size"].as_i64()),
        (Some(5), Some(250))
    );
    assert_eq!(k["webhook"]["signing_secret_set"], true);
    assert!(
        k["webhook"].get("signing_secret").is_none(),
        "the secret is write-only"
    );
    // Orders take the kind's policy.
    let o = api
        .post(
            "/api/orders",
            ADMIN_KEY,
            Some(&json!({"kind": "k1", "target": "t", "quantity": 1000})),
        )
        .await
        .body;
    assert_eq!(
        (
            o["chunk_size"].as_i64(),
            o["max_attempts"].as_i64(),
            o["task_count"].as_i64()
        ),
        (Some(250), Some(5), Some(4))
    );
    assert_eq!(
        api.post("/api/admin/kinds/k1/pause", ADMIN_KEY, None)
            .await
            .body["paused"],
        true
    );
    assert_eq!(
        api.post("/api/admin/kinds/k1/resume", ADMIN_KEY, None)
            .await
            .body["paused"],
        false
    );
    let del = api.delete("/api/admin/kinds/k1", ADMIN_KEY).await;
    assert_eq!(
        (del.status, del.error_code()),
        (409, "conflict"),
        "in use by an unfinished order"
    );
    let oid = o["id"].as_str().unwrap();
    api.post(&format!("/api/orders/{oid}/cancel"), ADMIN_KEY, None)
        .await;
    assert_eq!(
        api.delete("/api/admin/kinds/k1", ADMIN_KEY).await.status,
        204
    );
    assert_eq!(
        api.delete("/api/admin/kinds/k1", ADMIN_KEY).await.status,
        404
    );
    // Target-as-URL kinds only reach their allow-list (no SSRF through order targets).
    let r = api
        .put(
            "/api/admin/kinds/per-target",
            ADMIN_KEY,
            &json!({"handler": "webhook", "webhook": {"allowed_hosts": ["*.partner.example"]}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    for target in [
        "http://169.254.169.254/latest/meta-data",
        "http://localhost:5432/",
        "not a url",
    ] {
        let r = api
            .post(
                "/api/orders",
                ADMIN_KEY,
                Some(&json!({"kind": "per-target", "target": target, "quantity": 1})),
            )
            .await;
        assert_eq!((r.status, r.error_field()), (422, "target"), "{target}");
    }
    let ok = api.post("/api/orders", ADMIN_KEY,
        Some(&json!({"kind": "per-target", "target": "https://eu.partner.example/in", "quantity": 1}))).await;
    assert_eq!(ok.status, 201);
    api.stop().await;
}

#[tokio::test]
async fn keys_are_created_listed_revoked_and_rotated_and_stored_only_as_digests() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let created = api
        .post(
            "/api/admin/keys",
            ADMIN_KEY,
            Some(&json!({"name": "ci", "scope": "operate"})),
        )
        .await;
    assert_eq!(created.status, 201);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let id = created.body["key"]["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tly_") && secret.len() == 68);
    assert_eq!(created.body["key"]["prefix"], &secret[..12]);
    assert_eq!(api.get("/api/orders", &secret).await.status, 200);
    // Only digests are stored; no column holds the secret.
    let leaked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys k WHERE k::text LIKE '%' || $1 || '%'")
            .bind(&secret)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(leaked, 0);
    let listed = api.get("/api/admin/keys", ADMIN_KEY).await.body;
    assert!(!listed.to_string().contains(&secret));
    assert_eq!(
        listed["keys"].as_array().unwrap().len(),
        2,
        "bootstrap and ci"
    );
    for (body, field) in [
        (json!({"name": "", "scope": "read"}), "name"),
        (json!({"name": "x", "scope": "root"}), "scope"),
    ] {
        let r = api.post("/api/admin/keys", ADMIN_KEY, Some(&body)).await;
        assert_eq!((r.status, r.error_field()), (422, field));
    }
    // Rotate: the new secret works, the old one is revoked in the same statement.
    let rotated = api
        .post(&format!("/api/admin/keys/{id}/rotate"), ADMIN_KEY, None)
        .await;
    assert_eq!(rotated.status, 201);
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            rotated.body["key"]["name"].as_str(),
            rotated.body["key"]["scope"].as_str()
        ),
        (Some("ci"), Some("operate"))
    );
    assert_eq!(api.get("/api/orders", &secret).await.status, 401);
    assert_eq!(api.get("/api/orders", &new_secret).await.status, 200);
    assert_eq!(
        api.post(&format!("/api/admin/keys/{id}/rotate"), ADMIN_KEY, None)
            .await
            .status,
        404,
        "a revoked key cannot be rotated"
    );
    let new_id = rotated.body["key"]["id"].as_str().unwrap().to_owned();
    let revoked = api
        .post(&format!("/api/admin/keys/{new_id}/revoke"), ADMIN_KEY, None)
        .await
        .body;
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(api.get("/api/orders", &new_secret).await.status, 401);
    assert_eq!(
        api.post(
            &format!("/api/admin/keys/{}/revoke", uuid::Uuid::now_v7()),
            ADMIN_KEY,
            None
        )
        .await
        .status,
        404
    );
    // Every one of these calls is in the audit, visible through the API.
    let audit = api.get("/api/admin/audit?limit=500", ADMIN_KEY).await.body;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"POST /api/admin/keys/{id}/rotate"));
    assert!(actions.contains(&"POST /api/admin/keys/{id}/revoke"));
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["key_name"] == "bootstrap")
    );
    api.stop().await;
}

#[tokio::test]
async fn fault_injection_is_refused_unless_configured_and_fails_attempts_when_on() {
    let db = TestDb::new().await;
    let locked = Api::start_with(&db, tally::api::ApiConfig::default()).await;
    let r = locked
        .post("/api/admin/testing/enable", ADMIN_KEY, None)
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (403, "fault_injection_not_allowed")
    );
    assert_eq!(
        locked
            .get("/api/admin/testing/status", ADMIN_KEY)
            .await
            .body["enabled"],
        false
    );
    locked.stop().await;

    let api = Api::start(&db).await;
    let bad = api
        .post(
            "/api/admin/testing/enable",
            ADMIN_KEY,
            Some(&json!({"failure_rate": 2})),
        )
        .await;
    assert_eq!((bad.status, bad.error_field()), (422, "failure_rate"));
    let on = api
        .post(
            "/api/admin/testing/enable",
            ADMIN_KEY,
            Some(&json!({"failure_rate": 1.0})),
        )
        .await
        .body;
    assert_eq!(
        (
            on["allowed"].as_bool(),
            on["enabled"].as_bool(),
            on["failure_rate"].as_f64()
        ),
        (Some(true), Some(true), Some(1.0))
    );
    api.put(
        "/api/admin/kinds/flaky",
        ADMIN_KEY,
        &json!({"handler": "simulate", "max_attempts": 2,
        "backoff_base_sec": 0.05, "backoff_max_sec": 0.1}),
    )
    .await;
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let id = api
        .create_order(&json!({"kind": "flaky", "target": "t", "quantity": 10, "chunk_size": 5}))
        .await;
    api.wait_attention(&id).await;
    let dlq = api
        .get(&format!("/api/admin/orders/{id}/failed-tasks"), ADMIN_KEY)
        .await
        .body;
    assert!(dlq["tasks"].as_array().unwrap().iter().all(|t| {
        t["last_error"].as_str().unwrap().contains("injected fault") && t["attempts"] == 2
    }));
    let off = api
        .post("/api/admin/testing/disable", ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(off["enabled"], false);
    tokio::time::sleep(Duration::from_millis(2500)).await; // workers reload the switch every 2 s
    api.post(&format!("/api/orders/{id}/drain-dlq"), ADMIN_KEY, None)
        .await;
    wait_order(&api, &id, "COMPLETED", Duration::from_secs(20)).await;
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn archive_runs_on_demand_and_is_audited() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let r = api
        .post(
            "/api/admin/archive",
            ADMIN_KEY,
            Some(&json!({"older_than_days": 30})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["tasks_archived"], 0);
    let bad = api
        .post(
            "/api/admin/archive",
            ADMIN_KEY,
            Some(&json!({"older_than_days": 0})),
        )
        .await;
    assert_eq!((bad.status, bad.error_field()), (422, "older_than_days"));
    let audit = api.get("/api/admin/audit", ADMIN_KEY).await.body;
    let first = &audit["entries"][0];
    assert_eq!(
        (first["action"].as_str(), first["status"].as_i64()),
        (Some("POST /api/admin/archive"), Some(422))
    );
    assert_eq!(audit["entries"][1]["detail"]["tasks_archived"], 0);
    api.stop().await;
}

#[tokio::test]
async fn kinds_load_from_a_file_and_the_simulate_kind_can_be_removed() {
    let db = TestDb::new().await;
    let mut s = settings(&db.url, &[Role::Sweeper]);
    s.kinds = tally::kinds::parse_kinds_file(
        r#"{"billing": {"handler": "webhook", "webhook": {"url": "https://billing.internal/hook"}, "max_attempts": 7}}"#,
        &Default::default(),
    )
    .unwrap();
    s.simulate_kind = false;
    let pod = Pod::start(s, Handlers::new()).await;
    wait_until(Duration::from_secs(10), "kinds applied", || async {
        db.store
            .list_kinds()
            .await
            .unwrap()
            .iter()
            .map(|k| k.name.clone())
            .collect::<Vec<_>>()
            == ["billing"]
    })
    .await;
    assert_eq!(
        db.store
            .get_kind("billing")
            .await
            .unwrap()
            .unwrap()
            .max_attempts,
        7
    );
    pod.stop().await;
    let err =
        tally::kinds::parse_kinds_file(r#"{"Bad": {"handler": "simulate"}}"#, &Default::default())
            .unwrap_err();
    assert!(
        err.contains("TALLY_KINDS_FILE") && err.contains("Bad"),
        "{err}"
    );
}

#[tokio::test]
async fn a_huge_order_is_cancelled_in_batches_and_closed_out_by_the_sweeper() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let o = api
        .post(
            "/api/orders",
            ADMIN_KEY,
            Some(&json!({"kind": "simulate", "target": "t",
        "quantity": 12_000, "chunk_size": 1})),
        )
        .await
        .body;
    let id = o["id"].as_str().unwrap().to_owned();
    api.post(&format!("/api/orders/{id}/pause"), ADMIN_KEY, None)
        .await;
    while db.store.generate_tasks(10, "test").await.unwrap().0 > 0 {}
    // One call changes at most one batch of tasks; the order is closed at once.
    let c = api
        .post(&format!("/api/orders/{id}/cancel"), ADMIN_KEY, None)
        .await
        .body;
    assert_eq!(
        (c["status"].as_str(), c["cancelled_units"].as_i64()),
        (Some("CANCELLED"), Some(5000)),
        "{c}"
    );
    assert_eq!(
        api.get(&format!("/api/admin/invariants/orders/{id}"), ADMIN_KEY)
            .await
            .body["passed"],
        true
    );
    // The sweeper cancels the rest.
    let pod = Pod::start(settings(&db.url, &[Role::Sweeper]), Handlers::new()).await;
    wait_until(
        Duration::from_secs(30),
        "close-out cancelled every task",
        || async {
            api.get(&format!("/api/orders/{id}"), ADMIN_KEY).await.body["cancelled_units"] == 12_000
        },
    )
    .await;
    let held: bool = sqlx::query_scalar("SELECT paused FROM orders WHERE id = $1::uuid")
        .bind(&id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(!held, "the claim hold is lifted once nothing is open");
    let p = api
        .get(&format!("/api/orders/{id}/progress"), ADMIN_KEY)
        .await
        .body;
    assert_eq!(p["tasks_by_status"]["CANCELLED"], 12_000);
    assert_eq!(
        api.get(&format!("/api/admin/invariants/orders/{id}"), ADMIN_KEY)
            .await
            .body["passed"],
        true
    );
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_changed_kind_takes_effect_at_the_next_claim() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let old = Receiver::start().await;
    let new = Receiver::start().await;
    old.always(Answer::status(400));
    webhook_kind(&api, "crm", &old.url("/v1"), 1).await;
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let id = api
        .create_order(&json!({"kind": "crm", "target": "t", "quantity": 30, "chunk_size": 10}))
        .await;
    api.wait_attention(&id).await;
    // Fix the kind and replay at once: no task may run on the old settings, even though
    // workers only reload kinds on their own every 2 s.
    webhook_kind(&api, "crm", &new.url("/v2"), 1).await;
    api.post(&format!("/api/orders/{id}/drain-dlq"), ADMIN_KEY, None)
        .await;
    wait_order(&api, &id, "COMPLETED", Duration::from_secs(20)).await;
    assert_eq!((old.calls().len(), new.calls().len()), (3, 3));
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn callbacks_are_retried_with_the_same_key_until_delivered() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    rx.script([Answer::status(503)]);
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let mut body = order(100, 10);
    body["callback_url"] = json!(rx.url("/cb"));
    let id = api.create_order(&body).await;
    api.post(&format!("/api/orders/{id}/pause"), ADMIN_KEY, None)
        .await;
    assert_eq!(
        api.post(&format!("/api/orders/{id}/cancel"), ADMIN_KEY, None)
            .await
            .status,
        200
    );
    let calls = rx.wait_for_calls(2, Duration::from_secs(20)).await;
    assert_eq!(calls.len(), 2, "one failure, one delivery, nothing more");
    assert_eq!(
        calls[0].header("idempotency-key"),
        calls[1].header("idempotency-key")
    );
    assert_eq!(calls[1].body["event"], "CANCELLED");
    assert!(
        calls[1].at - calls[0].at >= Duration::from_millis(1500),
        "retried after a backoff"
    );
    wait_until(Duration::from_secs(10), "recorded", || async {
        api.get(&format!("/api/orders/{id}/callbacks"), ADMIN_KEY)
            .await
            .body["callbacks"][0]["status"]
            == "DELIVERED"
    })
    .await;
    let cb = &api
        .get(&format!("/api/orders/{id}/callbacks"), ADMIN_KEY)
        .await
        .body["callbacks"][0];
    assert_eq!(
        (cb["attempts"].as_i64(), cb["response_status"].as_i64()),
        (Some(2), Some(200))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.calls().len(),
        2,
        "a delivered callback is not sent again"
    );
    pod.stop().await;
    api.stop().await;
}

/// The committed OpenAPI document and the router describe the same operations: every
/// documented operation exists (it answers 401 without a key, not 404/405), and every route
/// in `src/api/mod.rs` is documented.
#[tokio::test]
async fn the_openapi_document_matches_the_router() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let doc: Value = serde_json::from_str(tally::api::OPENAPI).unwrap();
    let served = api
        .send(Method::GET, "/api/openapi.json", None, None, &[])
        .await
        .body;
    assert_eq!(served, doc, "served = committed");
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| ["get", "post", "put", "delete"].contains(&m.as_str()))
        {
            documented.insert(format!("{} {path}", method.to_uppercase()));
            let concrete = path.replace("{id}", "1").replace("{name}", "x");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = api.send(m, &concrete, None, None, &[]).await;
            let public = ["/livez", "/readyz", "/api/openapi.json"].contains(&path.as_str());
            assert_eq!(r.status, if public { 200 } else { 401 }, "{method} {path}");
        }
    }
    let source = include_str!("../src/api/mod.rs");
    let mut routed = std::collections::BTreeSet::new();
    for chunk in source.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).unwrap();
        let handlers = chunk.split(')').take(6).collect::<String>();
        for (call, method) in [
            ("get(", "GET"),
            ("post(", "POST"),
            ("put(", "PUT"),
            ("delete(", "DELETE"),
        ] {
            if handlers.contains(call) {
                routed.insert(format!("{method} {path}"));
            }
        }
    }
    assert!(routed.len() >= 40, "{routed:?}");
    assert_eq!(routed, documented);
    api.stop().await;
}

/// `/livez` never touches the database; `/readyz` says whether it is reachable and migrated.
#[tokio::test]
async fn livez_ignores_the_database_and_readyz_reports_it() {
    let client = tally::http::client();
    for (what, url) in [
        ("unmigrated", TestDb::empty().await),
        (
            "unreachable",
            "postgres://tally@127.0.0.1:1/none".to_string(),
        ),
    ] {
        let store =
            tally::store::Store::connect_lazy(&tally::store::StoreOptions::new(&url)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (trigger, shutdown) = tally::shutdown::channel();
        let server = tokio::spawn(tally::api::serve_on(
            listener,
            store,
            Default::default(),
            shutdown,
        ));
        let live = client.get(format!("{base}/livez")).send().await.unwrap();
        assert_eq!(live.status(), 200, "{what}");
        let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503, "{what}");
        let body: Value = serde_json::from_slice(&ready.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "unavailable", "{what}");
        trigger.fire();
        server.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn orphans_are_listed_and_make_the_health_check_fail() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    OrderSpec::units(10, 10).generated(&db.store).await;
    let dead_worker = uuid::Uuid::new_v4();
    let task = claim_one(&db.store, dead_worker).await;
    sqlx::query(
        "UPDATE order_tasks SET lease_expires_at = now() - interval '5 seconds' WHERE id = $1",
    )
    .bind(task.id)
    .execute(db.pool())
    .await
    .unwrap();
    let o = api
        .get("/api/admin/invariants/orphans", ADMIN_KEY)
        .await
        .body;
    assert_eq!(o["count"], 1);
    assert_eq!(o["orphans"][0]["task_id"], task.id);
    assert_eq!(o["orphans"][0]["claimed_by"], dead_worker.to_string());
    assert!(
        o["orphans"][0]["lease_expired_seconds_ago"]
            .as_f64()
            .unwrap()
            >= 4.0,
        "{o}"
    );
    let h = api.get("/api/admin/health", ADMIN_KEY).await.body;
    assert_eq!(
        (h["verdict"].as_str(), h["orphans"].as_i64()),
        (Some("unhealthy"), Some(1))
    );
    assert!(h["problems"].to_string().contains("orphaned"), "{h}");
    let cap = api.get("/api/admin/capacity", ADMIN_KEY).await.body;
    assert_eq!(cap["executing"], 1);
    api.stop().await;
}

#[tokio::test]
async fn a_kind_limits_its_concurrency_and_a_paused_kind_is_not_claimed() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    rx.always(Answer::status(200).delay(Duration::from_millis(300)));
    let r = api
        .put(
            "/api/admin/kinds/narrow",
            ADMIN_KEY,
            &json!({"handler": "webhook",
        "webhook": {"url": rx.url("/n")}, "concurrency_limit": 2, "paused": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let pod = Pod::start(settings(&db.url, &ALL_ROLES), Handlers::new()).await;
    let id = api
        .create_order(&json!({"kind": "narrow", "target": "t", "quantity": 10, "chunk_size": 1}))
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rx.calls().len(), 0, "a paused kind's tasks are not claimed");
    assert_eq!(
        api.post("/api/admin/kinds/narrow/resume", ADMIN_KEY, None)
            .await
            .status,
        200
    );
    wait_order(&api, &id, "COMPLETED", Duration::from_secs(30)).await;
    // Each call takes 300 ms; with a limit of 2 no third call can start within 250 ms of two others.
    let at: Vec<_> = rx.calls().iter().map(|c| c.at).collect();
    assert_eq!(at.len(), 10);
    for (i, t) in at.iter().enumerate() {
        let close = at[..=i]
            .iter()
            .filter(|u| t.duration_since(**u) < Duration::from_millis(250))
            .count();
        assert!(close <= 2, "call {i} started with {close} calls in flight");
    }
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn a_mutation_whose_audit_row_cannot_be_written_does_not_happen() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let id = api.create_order(&order(100, 10)).await;
    // From now on every audit insert fails (as a full disk or a broken table would).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'audit table unavailable'; END $$; \
         CREATE TRIGGER refuse_audit BEFORE INSERT ON admin_audit \
         FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let r = api.post("/api/admin/pause", ADMIN_KEY, None).await;
    assert!(r.status >= 500, "{:?}", r.body);
    let paused: bool = sqlx::query_scalar("SELECT paused FROM tally_control")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(!paused, "the pause was not applied");
    let r = api
        .post(&format!("/api/orders/{id}/cancel"), ADMIN_KEY, None)
        .await;
    assert!(r.status >= 500, "{:?}", r.body);
    assert_eq!(
        order_status(&db.store, id.parse().unwrap()).await,
        "PROCESSING"
    );
    // Order intake audits in its own statement: it fails whole, nothing half-written.
    let r = api.post("/api/orders", ADMIN_KEY, Some(&order(5, 5))).await;
    assert!(r.status >= 500, "{:?}", r.body);
    assert_eq!(api.order_count().await, 1);

    // With the audit table back, the same call works and is on record with its outcome.
    sqlx::raw_sql("DROP TRIGGER refuse_audit ON admin_audit")
        .execute(db.pool())
        .await
        .unwrap();
    let r = api.post("/api/admin/pause", ADMIN_KEY, None).await;
    assert_eq!(r.status, 200);
    let last: (String, i32) =
        sqlx::query_as("SELECT action, status FROM admin_audit ORDER BY id DESC LIMIT 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(last, ("POST /api/admin/pause".to_owned(), 200));
    api.stop().await;
}
