//! Every operator command of the real `tally` binary against a real API and database:
//! output for people, `--json` for scripts, and the exit codes scripts rely on.

mod common;

use common::http::{ADMIN_KEY, Answer, Api, Receiver};
use common::*;
use serde_json::{Value, json};
use tally::config::Role;
use tally::handler::Handlers;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `tally ARGS` against `api` with `key` (off the async runtime's threads).
async fn tally(api: &Api, key: &str, args: &[&str]) -> Out {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(args)
        .env("TALLY_API_URL", &api.base)
        .env("TALLY_API_KEY", key)
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tally order create --kind simulate --quantity N --target t --json`: the new order's id.
async fn create(api: &Api, quantity: &str) -> String {
    let out = tally(
        api,
        ADMIN_KEY,
        &[
            "order",
            "create",
            "--kind",
            "simulate",
            "--quantity",
            quantity,
            "--target",
            "t",
            "--json",
        ],
    )
    .await;
    out.json()["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn orders_from_creation_to_dead_letters_and_back() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let hooks = Receiver::start().await;
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]),
        Handlers::new(),
    )
    .await;

    // create, with an idempotency key: twice is one order.
    let args = [
        "order",
        "create",
        "--kind",
        "simulate",
        "--quantity",
        "1500",
        "--target",
        "acct-1",
        "--chunk-size",
        "100",
        "--idempotency-key",
        "cli-1",
    ];
    let first = tally(&api, ADMIN_KEY, &args).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.contains("accepted: 1500 units of simulate"),
        "{}",
        first.stdout
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let again = tally(&api, ADMIN_KEY, &json_args).await.json();
    let id = again["id"].as_str().unwrap().to_owned();
    assert!(first.stdout.contains(&id));
    assert_eq!(api.order_count().await, 1);

    // progress --watch follows it to the end and exits 0.
    let watch = tally(
        &api,
        ADMIN_KEY,
        &["order", "progress", &id, "--watch", "--interval", "0.2"],
    )
    .await;
    assert_eq!(watch.code, 0, "{}{}", watch.stdout, watch.stderr);
    let last = watch.stdout.lines().last().unwrap();
    assert!(
        last.contains("100.0%") && last.contains("1500/1500 units") && last.contains("COMPLETED"),
        "{last}"
    );
    let get = tally(&api, ADMIN_KEY, &["order", "get", &id]).await;
    assert!(
        get.stdout.contains("1500 delivered of 1500"),
        "{}",
        get.stdout
    );
    let list = tally(&api, ADMIN_KEY, &["order", "list", "--status", "COMPLETED"]).await;
    assert!(
        list.stdout.starts_with("ID") && list.stdout.contains(&id),
        "{}",
        list.stdout
    );
    let listed = tally(
        &api,
        ADMIN_KEY,
        &["order", "list", "--json", "--kind", "simulate"],
    )
    .await
    .json();
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1);

    // A kind whose receiver refuses: the order dead-letters; inspect, fix, drain.
    hooks.always(Answer::status(422).body("no such account"));
    let put = tally(
        &api,
        ADMIN_KEY,
        &[
            "kinds",
            "put",
            "crm",
            "--handler",
            "webhook",
            "--url",
            &hooks.url("/crm"),
            "--max-attempts",
            "2",
        ],
    )
    .await;
    assert_eq!(put.code, 0, "{}", put.stderr);
    assert!(
        put.stdout.contains("kind        crm (webhook)"),
        "{}",
        put.stdout
    );
    let bad = tally(
        &api,
        ADMIN_KEY,
        &[
            "order",
            "create",
            "--kind",
            "crm",
            "--quantity",
            "20",
            "--target",
            "acct-2",
            "--chunk-size",
            "10",
            "--json",
        ],
    )
    .await
    .json();
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    let stuck = tally(
        &api,
        ADMIN_KEY,
        &["order", "progress", &bad_id, "--watch", "--interval", "0.2"],
    )
    .await;
    assert_eq!(
        stuck.code, 1,
        "a watch that ends in the dead-letter queue is bad news: {}",
        stuck.stdout
    );
    assert!(stuck.stdout.contains("tally order dlq"), "{}", stuck.stdout);
    let dlq = tally(&api, ADMIN_KEY, &["order", "dlq", &bad_id]).await;
    assert!(
        dlq.stdout.contains("ValidationError") && dlq.stdout.contains("no such account"),
        "{}",
        dlq.stdout
    );
    assert_eq!(
        dlq.stdout.lines().count(),
        3,
        "header and two tasks: {}",
        dlq.stdout
    );
    let task_id = tally(&api, ADMIN_KEY, &["order", "dlq", &bad_id, "--json"])
        .await
        .json()["tasks"][0]["id"]
        .to_string();
    let trace = tally(&api, ADMIN_KEY, &["task", "trace", &task_id]).await;
    assert!(
        trace.stdout.contains("dead_lettered") && trace.stdout.contains("FAILED_PERMANENT"),
        "{}",
        trace.stdout
    );
    let health = tally(&api, ADMIN_KEY, &["health"]).await;
    assert_eq!(
        health.code, 0,
        "2 dead letters are under the threshold: {}",
        health.stdout
    );
    hooks.always(Answer::status(200));
    let drain = tally(&api, ADMIN_KEY, &["order", "drain-dlq", &bad_id]).await;
    assert!(
        drain
            .stdout
            .contains("2 dead-lettered tasks (20 units) replayed"),
        "{}",
        drain.stdout
    );
    let watch = tally(
        &api,
        ADMIN_KEY,
        &["order", "progress", &bad_id, "--watch", "--interval", "0.2"],
    )
    .await;
    assert_eq!(watch.code, 0, "{}", watch.stdout);

    // pause, resume, cancel, retry and force-complete on a fresh order, globally paused.
    assert!(
        tally(&api, ADMIN_KEY, &["pause"])
            .await
            .stdout
            .contains("paused cluster-wide")
    );
    let o = create(&api, "10").await;
    assert!(
        tally(&api, ADMIN_KEY, &["order", "pause", &o])
            .await
            .stdout
            .contains("(paused)")
    );
    assert!(
        !tally(&api, ADMIN_KEY, &["order", "resume", &o])
            .await
            .stdout
            .contains("(paused)")
    );
    let retry = tally(&api, ADMIN_KEY, &["order", "retry", &o]).await;
    assert!(
        retry.stdout.contains("made claimable now"),
        "{}",
        retry.stdout
    );
    let fc = tally(&api, ADMIN_KEY, &["order", "force-complete", &o]).await;
    assert_eq!(fc.code, 0, "{}", fc.stderr);
    assert!(
        fc.stdout.contains("PARTIAL") && fc.stdout.contains("shortfall  10"),
        "{}",
        fc.stdout
    );
    let again = tally(&api, ADMIN_KEY, &["order", "cancel", &o]).await;
    assert_eq!(again.code, 3, "a conflict is a refusal: {}", again.stderr);
    assert!(again.stderr.contains("[HTTP 409]"));
    let o2 = create(&api, "10").await;
    let cancel = tally(&api, ADMIN_KEY, &["order", "cancel", &o2]).await;
    assert!(cancel.stdout.contains("CANCELLED"), "{}", cancel.stdout);
    let h = tally(&api, ADMIN_KEY, &["health"]).await;
    assert_eq!(h.code, 1, "paused is unhealthy: {}", h.stdout);
    assert!(h.stdout.contains("verdict: UNHEALTHY") && h.stdout.contains("globally paused"));
    assert!(
        tally(&api, ADMIN_KEY, &["resume"])
            .await
            .stdout
            .contains("resumed")
    );
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn inspection_commands_kinds_and_keys() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]),
        Handlers::new(),
    )
    .await;
    let id = create(&api, "300").await;
    api.wait_completed(&id).await;

    let inv = tally(&api, ADMIN_KEY, &["invariants", "--order", &id]).await;
    assert_eq!(inv.code, 0);
    assert!(
        inv.stdout.contains("expected 300 = delivered 300"),
        "{}",
        inv.stdout
    );
    let all = tally(&api, ADMIN_KEY, &["invariants", "--all"]).await;
    assert!(
        all.stdout.contains("checked 1 orders: 1 passed, 0 failed"),
        "{}",
        all.stdout
    );
    // A broken ledger (written behind Tally's back) is reported with exit 1.
    sqlx::query("ALTER TABLE orders DROP CONSTRAINT orders_completed_means_delivered")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE orders SET delivered = delivered - 1 WHERE id = $1::uuid")
        .bind(&id)
        .execute(db.pool())
        .await
        .unwrap();
    let broken = tally(&api, ADMIN_KEY, &["invariants", "--order", &id]).await;
    assert_eq!(broken.code, 1, "{}", broken.stdout);
    assert!(broken.stdout.contains("VIOLATED"));
    assert_eq!(tally(&api, ADMIN_KEY, &["invariants"]).await.code, 1);

    let orphans = tally(&api, ADMIN_KEY, &["orphans"]).await;
    assert_eq!(
        (orphans.code, orphans.stdout.trim()),
        (0, "no orphaned tasks")
    );
    let workers = tally(&api, ADMIN_KEY, &["workers"]).await;
    assert!(
        workers.stdout.contains(&pod.id.to_string()) && workers.stdout.contains("running"),
        "{}",
        workers.stdout
    );
    let cap = tally(&api, ADMIN_KEY, &["capacity"]).await;
    assert!(
        cap.stdout.contains("live workers      1 (16 slots"),
        "{}",
        cap.stdout
    );
    assert!(
        cap.stdout.contains("ETA to drain      now"),
        "{}",
        cap.stdout
    );
    assert_eq!(
        tally(&api, ADMIN_KEY, &["capacity", "--json"]).await.json()["pending_tasks"],
        0
    );

    // kinds
    let spec = std::env::temp_dir().join(format!("kind-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(
        &spec,
        json!({"handler": "simulate", "max_attempts": 4, "default_chunk_size": 50}).to_string(),
    )
    .unwrap();
    let put = tally(
        &api,
        ADMIN_KEY,
        &["kinds", "put", "bulk", "--file", spec.to_str().unwrap()],
    )
    .await;
    assert_eq!(put.code, 0, "{}", put.stderr);
    let listed = tally(&api, ADMIN_KEY, &["kinds", "list"]).await;
    assert!(
        listed.stdout.contains("bulk") && listed.stdout.contains("simulate"),
        "{}",
        listed.stdout
    );
    assert!(
        tally(&api, ADMIN_KEY, &["kinds", "get", "bulk"])
            .await
            .stdout
            .contains("attempts    4")
    );
    assert!(
        tally(&api, ADMIN_KEY, &["kinds", "pause", "bulk"])
            .await
            .stdout
            .contains("PAUSED")
    );
    assert!(
        !tally(&api, ADMIN_KEY, &["kinds", "resume", "bulk"])
            .await
            .stdout
            .contains("PAUSED")
    );
    let bad = tally(
        &api,
        ADMIN_KEY,
        &["kinds", "put", "bulk", "--handler", "webhook"],
    )
    .await;
    assert_eq!(bad.code, 3);
    assert!(
        bad.stderr.contains("webhook: is required"),
        "{}",
        bad.stderr
    );
    assert_eq!(
        tally(&api, ADMIN_KEY, &["kinds", "delete", "bulk"])
            .await
            .code,
        0
    );
    assert_eq!(
        tally(&api, ADMIN_KEY, &["kinds", "get", "bulk"]).await.code,
        3
    );

    // keys: a read key reads but cannot operate; revoked keys and wrong keys exit 4.
    let created = tally(
        &api,
        ADMIN_KEY,
        &[
            "keys", "create", "--name", "grafana", "--scope", "read", "--json",
        ],
    )
    .await
    .json();
    let secret = created["secret"].as_str().unwrap().to_owned();
    let key_id = created["key"]["id"].as_str().unwrap().to_owned();
    assert_eq!(tally(&api, &secret, &["order", "list"]).await.code, 0);
    let refused = tally(&api, &secret, &["pause"]).await;
    assert_eq!(refused.code, 4);
    assert!(refused.stderr.contains("scope"), "{}", refused.stderr);
    let keys = tally(&api, ADMIN_KEY, &["keys", "list"]).await;
    assert!(
        keys.stdout.contains("grafana") && !keys.stdout.contains(&secret),
        "{}",
        keys.stdout
    );
    let rotated = tally(&api, ADMIN_KEY, &["keys", "rotate", &key_id]).await;
    assert!(rotated.stdout.contains("shown once"), "{}", rotated.stdout);
    let new_secret = rotated
        .stdout
        .lines()
        .last()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(tally(&api, &secret, &["order", "list"]).await.code, 4);
    assert_eq!(tally(&api, &new_secret, &["order", "list"]).await.code, 0);
    let new_id = tally(&api, ADMIN_KEY, &["keys", "list", "--json"])
        .await
        .json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "grafana" && k["revoked_at"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        tally(&api, ADMIN_KEY, &["keys", "revoke", &new_id])
            .await
            .stdout
            .contains("revoked")
    );
    let denied = tally(&api, &new_secret, &["order", "list"]).await;
    assert_eq!(denied.code, 4);
    assert!(
        denied.stderr.contains("TALLY_API_KEY"),
        "the error says what to do: {}",
        denied.stderr
    );

    // Bad input and an unreachable API.
    let neg = tally(
        &api,
        ADMIN_KEY,
        &[
            "order",
            "create",
            "--kind",
            "simulate",
            "--quantity",
            "0",
            "--target",
            "t",
        ],
    )
    .await;
    assert_eq!(neg.code, 3);
    assert!(neg.stderr.contains("quantity:"), "{}", neg.stderr);
    assert_eq!(
        tally(&api, ADMIN_KEY, &["order", "get", "not-an-id"])
            .await
            .code,
        3
    );
    assert_eq!(
        tally(&api, ADMIN_KEY, &["order", "frobnicate"]).await.code,
        2
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.args(["health"])
        .env("TALLY_API_URL", "http://127.0.0.1:9")
        .env("TALLY_API_KEY", ADMIN_KEY);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TALLY_API_URL"));
    pod.stop().await;
    api.stop().await;
}

/// Every command in docs/RUNBOOK.md's `sh` blocks runs against a live cluster: CLI commands
/// exit 0 or 1 (bad news), never with a usage, refusal, auth or connection error; curl
/// commands answer JSON that is not an error.
#[tokio::test]
async fn every_runbook_command_runs() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let hooks = Receiver::start().await;
    hooks.always(Answer::status(400));
    let pod = Pod::start(
        settings(&db.url, &[Role::Generator, Role::Worker, Role::Sweeper]),
        Handlers::new(),
    )
    .await;
    // A cluster with something to look at: a completed order and a dead-lettered one.
    api.put(
        "/api/admin/kinds/crm",
        ADMIN_KEY,
        &json!({"handler": "webhook", "webhook": {"url": hooks.url("/x")}}),
    )
    .await;
    let done = create(&api, "100").await;
    let order = api
        .create_order(&json!({"kind": "crm", "target": "t", "quantity": 20, "chunk_size": 10}))
        .await;
    api.wait_attention(&order).await;
    api.wait_completed(&done).await;
    let task: i64 = sqlx::query_scalar(
        "SELECT id FROM order_tasks WHERE order_id = $1::uuid ORDER BY seq LIMIT 1",
    )
    .bind(&order)
    .fetch_one(db.pool())
    .await
    .unwrap();

    let runbook =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/RUNBOOK.md")).unwrap();
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in runbook.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if in_sh && !t.is_empty() {
            commands.push(
                t.replace("<order-id>", &order)
                    .replace("<task-id>", &task.to_string())
                    .replace("<kind>", "crm"),
            );
        }
    }
    assert!(
        commands.len() >= 20,
        "the runbook has {} runnable commands",
        commands.len()
    );
    for cmd in &commands {
        assert!(!cmd.contains('<'), "unknown placeholder in {cmd:?}");
        // `--watch` would wait for an order that needs attention: run it once instead.
        let cmd = cmd.replace(" --watch", "");
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", &cmd])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    std::path::Path::new(env!("CARGO_BIN_EXE_tally"))
                        .parent()
                        .unwrap()
                        .display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("TALLY_API_URL", &api.base)
            .env("TALLY_API_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn");
        let out = tokio::task::spawn_blocking(move || sh.output().unwrap())
            .await
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let code = out.status.code().unwrap_or(-1);
        if cmd.starts_with("curl ") {
            assert_eq!(code, 0, "{cmd}: {stderr}");
            let v: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{cmd}: not JSON ({e}): {stdout}"));
            assert!(v.get("error").is_none(), "{cmd}: {v}");
        } else {
            assert!(code == 0 || code == 1, "{cmd}: exit {code}: {stderr}");
        }
    }
    pod.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn order_import_creates_each_line_once_reports_failures_and_is_safe_to_rerun() {
    let db = TestDb::new().await;
    let api = Api::start(&db).await;
    let dir = std::env::temp_dir().join(format!("tally-import-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("orders.jsonl");
    let mut lines: Vec<String> = (0..2500)
        .map(|i| format!(r#"{{"kind":"simulate","target":"t-{i}","quantity":1}}"#))
        .collect();
    lines.insert(
        10,
        r#"{"kind":"simulate","target":"t","quantity":0}"#.into(),
    );
    lines.insert(20, "{not json".into());
    lines.insert(
        30,
        r#"{"idempotency_key":"own-key","kind":"simulate","target":"own","quantity":2}"#.into(),
    );
    lines.insert(40, String::new());
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let path = file.to_str().unwrap();

    let out = tally(
        &api,
        ADMIN_KEY,
        &["order", "import", path, "--batch-size", "700"],
    )
    .await;
    assert_eq!(
        out.code, 1,
        "a failed line makes it exit 1: {}{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout
            .contains("2503 lines: 2501 created, 0 replayed, 2 failed"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("line 11: quantity:"), "{}", out.stdout);
    assert!(
        out.stdout.contains("line 21: line: is not valid JSON"),
        "{}",
        out.stdout
    );
    assert_eq!(api.order_count().await, 2501);
    assert_eq!(
        scalar_i64(
            &db.store,
            "SELECT count(*) FROM orders WHERE client_key = 'own-key'"
        )
        .await,
        1
    );

    // Interrupted or not, running it again creates nothing new.
    let again = tally(&api, ADMIN_KEY, &["order", "import", path, "--json"]).await;
    assert_eq!(again.code, 1);
    let v = again.json();
    assert_eq!(
        (
            v["created"].as_u64(),
            v["replayed"].as_u64(),
            v["failed"].as_u64()
        ),
        (Some(0), Some(2501), Some(2))
    );
    assert_eq!(v["failures"][0]["line"], 11);
    assert_eq!(v["failures"][0]["field"], "quantity");
    assert_eq!(api.order_count().await, 2501);

    // A clean file exits 0; a missing one is a usage error.
    let clean = dir.join("clean.jsonl");
    std::fs::write(&clean, r#"{"kind":"simulate","target":"c","quantity":1}"#).unwrap();
    let ok = tally(
        &api,
        ADMIN_KEY,
        &["order", "import", clean.to_str().unwrap()],
    )
    .await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    let missing = tally(
        &api,
        ADMIN_KEY,
        &["order", "import", "/nonexistent/x.jsonl"],
    )
    .await;
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("cannot read /nonexistent/x.jsonl"),
        "{}",
        missing.stderr
    );
    std::fs::remove_dir_all(&dir).ok();
    api.stop().await;
}
