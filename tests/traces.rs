//! Traces end to end: a real OTLP/HTTP receiver (decoding the protobuf) gets the spans from
//! order intake through claims and task attempts to webhook calls, linked as one trace.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::http::{ADMIN_KEY, Api, Receiver};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use tally::config::{LogFormat, Role};
use tally::handler::Handlers;

/// Collects what the JSON log layer writes.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts an OTLP/HTTP receiver; returns its traces URL and the spans it has received.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut all = sink.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(v) => Some(v.clone()),
            AnyValue::IntValue(v) => Some(v.to_string()),
            AnyValue::BoolValue(v) => Some(v.to_string()),
            AnyValue::DoubleValue(v) => Some(v.to_string()),
            _ => None,
        }
    })
}

#[tokio::test]
async fn one_trace_runs_from_order_intake_to_every_webhook_call() {
    let (endpoint, spans) = otlp_receiver().await;
    let logs = LogBuffer::default();
    let sink = logs.clone();
    let telemetry = tally::telemetry::init_with(
        LogFormat::Json,
        Some(endpoint),
        "warn,tally=debug",
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || sink.clone()),
    );
    assert!(telemetry.tracing_enabled());
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let hooks = Receiver::start().await;
    api.put(
        "/api/admin/kinds/crm",
        ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": hooks.url("/in")}}),
    )
    .await;
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]),
        Handlers::new(),
    )
    .await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let created = api
        .send(
            reqwest::Method::POST,
            "/api/orders",
            Some(ADMIN_KEY),
            Some(&json!({"kind": "crm", "target": "acct-1", "quantity": 30, "chunk_size": 10})),
            &[(
                "traceparent",
                &format!("00-{caller_trace}-{caller_span}-01"),
            )],
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    api.wait_completed(&id).await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // a sweeper pass or two
    telemetry.flush();
    wait_until(Duration::from_secs(10), "spans exported", || async {
        spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == "webhook.call")
            .count()
            >= 3
    })
    .await;
    let spans = spans.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();

    // Intake: a child of the caller's span, in the caller's trace.
    let intake: Vec<&Span> = spans.iter().filter(|s| s.name == "order.intake").collect();
    assert_eq!(intake.len(), 1);
    let intake = intake[0];
    assert_eq!(hex(&intake.trace_id), caller_trace);
    assert_eq!(hex(&intake.parent_span_id), caller_span);
    assert_eq!(attr(intake, "order.id").as_deref(), Some(id.as_str()));
    assert_eq!(attr(intake, "order.kind").as_deref(), Some("crm"));

    // Every attempt continues that trace as a child of the intake span, with its facts.
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.name == "task.attempt").collect();
    assert_eq!(attempts.len(), 3);
    for a in &attempts {
        assert_eq!(hex(&a.trace_id), caller_trace);
        assert_eq!(
            a.parent_span_id, intake.span_id,
            "attempt links back to intake"
        );
        assert_eq!(attr(a, "order.id").as_deref(), Some(id.as_str()));
        assert_eq!(attr(a, "kind").as_deref(), Some("crm"));
        assert_eq!(attr(a, "attempt").as_deref(), Some("1"));
        assert_eq!(attr(a, "outcome").as_deref(), Some("delivered"));
        assert!(attr(a, "task.id").is_some());
    }
    // Each webhook call is a child of its attempt, and the receiver got the call's context.
    let calls: Vec<&Span> = spans.iter().filter(|s| s.name == "webhook.call").collect();
    assert_eq!(calls.len(), 3);
    let received: Vec<String> = hooks
        .calls()
        .iter()
        .map(|c| c.header("traceparent").unwrap())
        .collect();
    for c in &calls {
        assert!(
            attempts.iter().any(|a| a.span_id == c.parent_span_id),
            "webhook.call under an attempt"
        );
        assert_eq!(attr(c, "http.status_code").as_deref(), Some("200"));
        let header = format!("00-{caller_trace}-{}-01", hex(&c.span_id));
        assert!(received.contains(&header), "{header} not in {received:?}");
    }
    // JSON log lines written inside an attempt carry its trace id.
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let finished: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("attempt finished"))
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .collect();
    assert!(finished.len() >= 3, "{text}");
    for line in &finished {
        assert_eq!(line["span"]["trace_id"], caller_trace, "{line}");
        assert_eq!(line["span"]["name"], "task.attempt");
    }
    // The other roles trace their passes too.
    for name in ["tasks.claim", "orders.generate", "sweeper.pass"] {
        assert!(spans.iter().any(|s| s.name == name), "no {name} span");
    }
    pod.stop().await;
    api.stop().await;
}
