//! The webhook handler against a real HTTP receiver: every error class, the request it
//! sends (idempotency key, trace context, signature), the allow-list, and — through real
//! workers — partial deliveries and Retry-After.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::http::{ADMIN_KEY, Answer, Api, Receiver};
use common::*;
use serde_json::json;
use tally::config::Role;
use tally::domain::ErrorClass;
use tally::handler::{Handler, Handlers, TaskInput, Webhook, WebhookSettings};

fn settings_for(url: Option<String>) -> WebhookSettings {
    WebhookSettings {
        url,
        timeout_ms: 500,
        signing_secret: Some("whsec-0123456789abcdef".into()),
        headers: BTreeMap::from([("X-Team".to_string(), "growth".to_string())]),
        allowed_hosts: Vec::new(),
    }
}

fn task(target: &str) -> TaskInput {
    TaskInput {
        order_id: uuid::Uuid::now_v7(),
        task_id: 17,
        seq: 3,
        kind: "crm".into(),
        target: target.into(),
        quantity: 10,
        attempt: 2,
        idempotency_key: "order:3".into(),
        trace_context: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    }
}

#[tokio::test]
async fn every_answer_is_classified() {
    let rx = Receiver::start().await;
    let hook = Webhook::new(tally::http::client(), settings_for(Some(rx.url("/in"))));
    let t = task("acct-1");
    type Want = Result<u32, (ErrorClass, Option<u64>)>;
    let cases: Vec<(Answer, Want)> = vec![
        (Answer::status(200), Ok(10)),
        (Answer::status(204), Ok(10)),
        (Answer::status(200).body(r#"{"delivered": 4}"#), Ok(4)),
        (Answer::status(200).body(r#"{"delivered": 0}"#), Ok(0)),
        (Answer::status(200).body(r#"{"delivered": 50}"#), Ok(10)),
        (
            Answer::status(429).header("retry-after", "7"),
            Err((ErrorClass::RateLimited, Some(7))),
        ),
        (Answer::status(429), Err((ErrorClass::RateLimited, None))),
        (
            Answer::status(503).header("retry-after", "3"),
            Err((ErrorClass::RateLimited, Some(3))),
        ),
        (Answer::status(503), Err((ErrorClass::NetworkError, None))),
        (Answer::status(500), Err((ErrorClass::NetworkError, None))),
        (Answer::status(408), Err((ErrorClass::NetworkError, None))),
        (
            Answer::status(400).body("bad target"),
            Err((ErrorClass::ValidationError, None)),
        ),
        (
            Answer::status(404),
            Err((ErrorClass::ValidationError, None)),
        ),
        (
            Answer::status(302).header("location", "http://169.254.169.254/"),
            Err((ErrorClass::ValidationError, None)),
        ),
        (
            Answer::status(200).delay(Duration::from_millis(1500)),
            Err((ErrorClass::TimeoutError, None)),
        ),
    ];
    let n = cases.len();
    for (answer, want) in cases {
        rx.script([answer.clone()]);
        let got = hook.deliver(&t).await;
        match (&got, &want) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{answer:?}"),
            (Err(e), Err((class, secs))) => {
                assert_eq!(e.class, *class, "{answer:?}: {e}");
                assert_eq!(e.retry_after, secs.map(Duration::from_secs), "{answer:?}");
            }
            _ => panic!("{answer:?}: got {got:?}, want {want:?}"),
        }
    }
    // Redirects are not followed: exactly one call per case.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(rx.calls().len(), n);
    // Nobody listening: a retryable network error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gone = Webhook::new(
        tally::http::client(),
        settings_for(Some(format!("http://{closed}/in"))),
    );
    assert_eq!(
        gone.deliver(&t).await.unwrap_err().class,
        ErrorClass::NetworkError
    );
}

#[tokio::test]
async fn the_request_carries_the_task_its_keys_and_a_verifiable_signature() {
    let rx = Receiver::start().await;
    let hook = Webhook::new(tally::http::client(), settings_for(Some(rx.url("/in"))));
    let t = task("acct-1");
    hook.deliver(&t).await.unwrap();
    hook.deliver(&TaskInput {
        attempt: 3,
        ..t.clone()
    })
    .await
    .unwrap();
    let calls = rx.calls();
    let c = &calls[0];
    assert_eq!(c.body["order_id"], t.order_id.to_string());
    assert_eq!(
        (c.body["task_id"].as_i64(), c.body["seq"].as_i64()),
        (Some(17), Some(3))
    );
    assert_eq!(
        (c.body["quantity"].as_i64(), c.body["attempt"].as_i64()),
        (Some(10), Some(2))
    );
    assert_eq!(c.body["target"], "acct-1");
    assert_eq!(c.header("idempotency-key").as_deref(), Some("order:3"));
    assert_eq!(
        calls[1].header("idempotency-key").as_deref(),
        Some("order:3"),
        "stable across attempts"
    );
    assert_eq!(calls[1].body["attempt"], 3);
    assert_eq!(
        c.header("traceparent").as_deref(),
        t.trace_context.as_deref()
    );
    assert_eq!(c.header("x-team").as_deref(), Some("growth"));
    assert_eq!(
        c.header("content-type").as_deref(),
        Some("application/json")
    );
    // A receiver verifies: HMAC-SHA256(secret, "{timestamp}.{raw body}"), hex, "v1=" prefix.
    let ts: i64 = c.header("x-tally-timestamp").unwrap().parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
    let expected = tally::http::signature(b"whsec-0123456789abcdef", ts, &c.raw);
    assert_eq!(c.header("x-tally-signature").unwrap(), expected);
    assert_ne!(
        tally::http::signature(b"another-secret-0000", ts, &c.raw),
        expected
    );
}

#[tokio::test]
async fn a_target_off_the_allow_list_is_never_called() {
    let rx = Receiver::start().await;
    let mut s = settings_for(None);
    s.allowed_hosts = vec!["hooks.partner.example".into()];
    let hook = Webhook::new(tally::http::client(), s.clone());
    let e = hook.deliver(&task(&rx.url("/in"))).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::ValidationError);
    assert!(e.message.contains("allow-list"), "{e}");
    // With the receiver's host:port on the list, the target is the URL.
    s.allowed_hosts
        .push(rx.base.trim_start_matches("http://").into());
    let hook = Webhook::new(tally::http::client(), s);
    assert_eq!(hook.deliver(&task(&rx.url("/in"))).await.unwrap(), 10);
    assert_eq!(rx.calls().len(), 1);
}

#[tokio::test]
async fn partial_deliveries_requeue_the_rest_and_conserve_units() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    // A call for all 100 units of a task delivers 40; the call for the rest succeeds.
    rx.respond_with(|body| {
        (body["quantity"] == 100).then(|| Answer::status(200).body(r#"{"delivered": 40}"#))
    });
    api.put(
        "/api/admin/kinds/partial",
        ADMIN_KEY,
        &json!({"handler": "webhook",
        "webhook": {"url": rx.url("/in")}, "backoff_base_sec": 0.05, "backoff_max_sec": 0.1}),
    )
    .await;
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Sweeper]),
        Handlers::new(),
    )
    .await;
    let id = api
        .post(
            "/api/orders",
            ADMIN_KEY,
            Some(&json!({"kind": "partial", "target": "t", "quantity": 500, "chunk_size": 100})),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    let workers = Pod::start(settings(&db.url, &[Role::Worker]), Handlers::new()).await;
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(30)).await;
    assert_fully_delivered(&db.store, id).await;
    let calls = rx.calls();
    assert_eq!(
        calls.len(),
        10,
        "two calls per task: {:?}",
        calls.iter().map(|c| c.body.clone()).collect::<Vec<_>>()
    );
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for c in &calls {
        by_key
            .entry(c.header("idempotency-key").unwrap())
            .or_default()
            .push(c.body["quantity"].as_i64().unwrap());
    }
    assert_eq!(by_key.len(), 5);
    assert!(
        by_key.values().all(|q| q == &[100, 60]),
        "the remainder is asked for: {by_key:?}"
    );
    let partials = db.store.order_transition_counts(id).await.unwrap();
    assert!(
        partials.contains(&("partial_delivery".to_string(), 5)),
        "{partials:?}"
    );
    workers.stop().await;
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_by_the_next_claim() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let rx = Receiver::start().await;
    rx.script([Answer::status(429).header("retry-after", "2")]);
    // A tiny backoff: any wait near 2 s comes from Retry-After.
    api.put(
        "/api/admin/kinds/limited",
        ADMIN_KEY,
        &json!({"handler": "webhook",
        "webhook": {"url": rx.url("/in")}, "backoff_base_sec": 0.01, "backoff_max_sec": 60}),
    )
    .await;
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]),
        Handlers::new(),
    )
    .await;
    let id = api
        .post(
            "/api/orders",
            ADMIN_KEY,
            Some(&json!({"kind": "limited", "target": "t", "quantity": 1})),
        )
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .unwrap();
    wait_for_status(&db.store, id, "COMPLETED", Duration::from_secs(20)).await;
    let calls = rx.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, before Retry-After"
    );
    let classes: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT error_class FROM order_task_transitions WHERE order_id = $1 AND task_id IS NOT NULL ORDER BY id")
        .bind(id).fetch_all(db.pool()).await.unwrap();
    assert!(classes.contains(&Some("RateLimited".into())), "{classes:?}");
    pod.stop().await;
    api.stop().await;
}
