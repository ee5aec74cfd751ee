//! The `tally` binary as operators run it: settings validation, migrate, and the demo.

mod common;

use std::process::Command;

use common::*;

fn tally() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.env_remove("TALLY_DATABASE_URL").env("RUST_LOG", "warn");
    c
}

#[test]
fn a_bad_setting_refuses_to_start_and_names_the_variable() {
    for (var, value) in [
        ("TALLY_WORKER_BATCH_SIZE", "0"),
        ("TALLY_CLAIM_TIMEOUT_SEC", "forever"),
        ("TALLY_MAX_RETRIES", "-1"),
        ("TALLY_ROLES", "worker,nonsense"),
        ("TALLY_BACKOFF_JITTER", "0.8"),
        ("TALLY_DATABASE_URL", "mysql://db/x"),
    ] {
        let out = tally()
            .arg("serve")
            .env("TALLY_DATABASE_URL", "postgres://127.0.0.1:1/none")
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must refuse to start");
        let err = String::from_utf8_lossy(&out.stderr);
        let named = err.contains(var) || (var == "TALLY_ROLES" && err.contains("nonsense"));
        assert!(named, "{var}={value}: error does not name it: {err}");
    }
    let out = tally().arg("serve").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TALLY_DATABASE_URL"));
}

#[test]
fn demo_without_postgres_binaries_says_what_to_install() {
    let empty = std::env::temp_dir().join(format!("tally-no-pg-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = tally()
        .args(["demo"])
        .env("TALLY_PG_BINDIR", &empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apt-get install postgresql") && err.contains("--database-url"),
        "{err}"
    );
}

#[test]
fn demo_rejects_bad_flags_by_name() {
    let out = tally().args(["demo", "--quantity", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quantity"));
    let out = tally()
        .args(["demo", "--failure-rate", "1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--failure-rate"));
}

#[tokio::test]
async fn serve_waits_for_migrations_instead_of_racing_them() {
    let url = TestDb::empty().await;
    let mut serve = spawn_tally(&url, &["serve", "--roles", "worker"], &[]);
    let store = tally::store::Store::connect(&tally::store::StoreOptions::new(&url))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        serve.try_wait().unwrap().is_none(),
        "serve must wait, not exit"
    );
    assert!(!store.migrations_current().await.unwrap());
    // Twice: migrating is repeatable.
    for _ in 0..2 {
        let out = tally()
            .args(["migrate", "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_until(
        std::time::Duration::from_secs(10),
        "serve registered after the migration",
        || {
            let store = store.clone();
            async move { !store.live_workers().await.unwrap().is_empty() }
        },
    )
    .await;
    signal(&serve, libc::SIGTERM);
    assert!(serve.wait().await.unwrap().success());
}

fn run_demo(extra: &[&str]) -> serde_json::Value {
    let out = tally()
        .args(["demo", "--json", "--latency-ms", "150"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn demo_delivers_fifteen_thousand_units_exactly() {
    let s = run_demo(&[]);
    assert_eq!(s["expected"], 15_000);
    assert_eq!(s["delivered"], 15_000);
    assert_eq!(s["tasks"], 38);
    assert_eq!(s["status"], "COMPLETED");
    assert_eq!(s["invariant_holds"], true);
    assert_eq!(s["verdict"], "delivered 15000 = expected 15000");
}

#[test]
fn demo_with_chaos_recovers_the_killed_workers_tasks() {
    let s = run_demo(&["--chaos", "--failure-rate", "0.1"]);
    assert_eq!(s["delivered"], 15_000);
    assert_eq!(s["invariant_holds"], true);
    let held = s["chaos_tasks_held"].as_i64().unwrap();
    assert!(s["chaos_killed_pid"].is_number(), "{s}");
    assert!(held >= 1, "{s}");
    // Tasks that finished between the pick and the kill are not orphans; the rest are.
    assert!(s["orphans_recovered"].as_i64().unwrap() >= 1, "{s}");
}

#[tokio::test]
async fn demo_runs_against_an_existing_database() {
    let url = TestDb::empty().await;
    let out = tally()
        .args([
            "demo",
            "--json",
            "--latency-ms",
            "20",
            "--quantity",
            "1000",
            "--chunk-size",
            "100",
            "--workers",
            "2",
            "--database-url",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (s["delivered"].as_i64(), s["tasks"].as_i64()),
        (Some(1000), Some(10))
    );
    // The order really is in that database, and the demo migrated it.
    let store = tally::store::Store::connect(&tally::store::StoreOptions::new(&url))
        .await
        .unwrap();
    let id: uuid::Uuid = s["order_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        store.get_order(id).await.unwrap().unwrap().status,
        "COMPLETED"
    );
}

#[tokio::test]
async fn demo_serves_the_api_and_its_printed_curl_line_works() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let url = TestDb::empty().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "demo",
            "--quantity",
            "400",
            "--chunk-size",
            "100",
            "--latency-ms",
            "5",
            "--keep-running",
        ])
        .env("TALLY_DATABASE_URL", &url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut curl = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline.into(), lines.next_line()).await
    {
        if line.trim_start().starts_with("curl ") && line.contains("/api/orders/") {
            curl = Some(line.trim().to_owned());
        }
        if line.contains("still running") {
            break;
        }
    }
    let curl = curl.expect("the demo printed a curl line for its order");
    // Run the printed line as an operator would.
    let out = tokio::process::Command::new("sh")
        .args(["-c", &curl])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{curl}");
    let progress: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (progress["status"].as_str(), progress["delivered"].as_i64()),
        (Some("COMPLETED"), Some(400)),
        "{progress}"
    );
    signal(&child, libc::SIGTERM);
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn api_keys_never_reach_the_logs_even_at_debug() {
    let db = TestDb::new().await;
    let log = std::env::temp_dir().join(format!("tally-keys-{}.log", uuid::Uuid::new_v4()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = "bootstrap-secret-4f1c9a7e2d";
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--roles", "api"])
        .env("TALLY_DATABASE_URL", &db.url)
        .env("TALLY_METRICS_ADDR", "off")
        .env("TALLY_API_ADDR", format!("127.0.0.1:{port}"))
        .env("TALLY_ADMIN_API_KEY", admin)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = tally::http::client();
    let base = format!("http://127.0.0.1:{port}");
    let mut created = None;
    for _ in 0..200 {
        if let Ok(r) = client
            .post(format!("{base}/api/admin/keys"))
            .header("x-api-key", admin)
            .header("content-type", "application/json")
            .body(r#"{"name":"n","scope":"read"}"#)
            .send()
            .await
            && r.status() == 201
        {
            created = Some(r.json_value().await);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let secret = created.expect("the API came up")["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = "wrong-key-7b3e9d1f0a2c";
    for key in [secret.as_str(), wrong] {
        client
            .get(format!("{base}/api/orders"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
    }
    signal(&serve, libc::SIGTERM);
    assert!(serve.wait().await.unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.len() > 1000,
        "trace logging was on: {} bytes",
        text.len()
    );
    for key in [admin, secret.as_str(), wrong] {
        assert!(!text.contains(key), "a key reached the log");
    }
    let _ = std::fs::remove_file(&log);
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

/// `tally bench` is not in the test suite's timing budget, but it must keep running as the
/// schema grows: a tiny run against an existing database prints its JSON.
#[tokio::test]
async fn bench_runs_on_a_tiny_workload() {
    let url = TestDb::empty().await;
    let out = tally()
        .args([
            "bench",
            "--database-url",
            &url,
            "--tasks",
            "2000",
            "--workers",
            "1",
            "--reps",
            "1",
            "--pickup-samples",
            "3",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tasks_per_sec") || stdout.contains("\"shape\""),
        "{stdout}"
    );
}
