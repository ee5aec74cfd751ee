//! The operator CLI: `tally order …`, `tally health`, `tally kinds …` and friends, talking to
//! the API (`TALLY_API_URL`, `TALLY_API_KEY`). Tables for people, `--json` for scripts.
//!
//! Exit codes scripts can rely on:
//! 0 done · 1 the answer is bad news (unhealthy, invariant violated, order did not complete)
//! · 2 usage error · 3 the API refused the request (bad input, not found, conflict)
//! · 4 the key is missing, wrong or lacks the scope · 5 the API is unreachable or failing.

mod import;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the API is and who is calling.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the Tally API.
    #[arg(
        long,
        env = "TALLY_API_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api_url: String,
    /// API key (X-Api-Key).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum OrderCmd {
    /// Create an order (idempotent with --idempotency-key).
    Create(CreateOrder),
    /// Show one order.
    Get {
        id: String,
    },
    /// List orders, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Delivered/expected, tasks by status and ETA; --watch redraws until the order ends.
    Progress {
        id: String,
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Cancel: waiting tasks are cancelled, running attempts finish.
    Cancel {
        id: String,
    },
    /// Stop claiming this order's tasks.
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Run every task waiting for its retry now.
    Retry {
        id: String,
    },
    /// The order's dead-letter queue (FAILED_PERMANENT tasks).
    Dlq {
        id: String,
    },
    /// Replay the dead-letter queue with a fresh attempt budget.
    DrainDlq {
        id: String,
    },
    /// Accept what was delivered: the order becomes PARTIAL, the shortfall is recorded.
    ForceComplete {
        id: String,
    },
    /// Create many orders from a JSON-lines file (`-`: standard input), up to 1,000 per call
    /// of POST /api/orders/batch. Each line is an order as `order create` sends it, with an
    /// optional "idempotency_key"; a line without one gets a key derived from its text and
    /// line number, so running the import again after an interruption creates nothing twice.
    /// Exits 1 if any line failed.
    Import {
        file: String,
        /// Orders per call (1 to 1000).
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
    },
}

#[derive(Debug, Args)]
pub struct CreateOrder {
    #[arg(long)]
    pub kind: String,
    #[arg(long)]
    pub quantity: u64,
    #[arg(long)]
    pub target: String,
    #[arg(long)]
    pub chunk_size: Option<u64>,
    #[arg(long)]
    pub priority: Option<i16>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    #[arg(long)]
    pub callback_url: Option<String>,
    /// json or slack.
    #[arg(long)]
    pub callback_format: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// A task's full transition history.
    Trace { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum KindsCmd {
    List,
    Get {
        name: String,
    },
    /// Create or replace a kind from a JSON spec (a file, `-` for stdin) or flags.
    Put {
        name: String,
        /// JSON spec, as in PUT /api/admin/kinds/{name}.
        #[arg(long)]
        file: Option<String>,
        #[arg(long)]
        handler: Option<String>,
        /// Webhook URL (handler webhook).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        max_attempts: Option<i32>,
        #[arg(long)]
        default_chunk_size: Option<i32>,
        #[arg(long)]
        concurrency_limit: Option<i32>,
    },
    Delete {
        name: String,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    List,
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// read, operate or admin.
        #[arg(long)]
        scope: String,
    },
    Revoke {
        id: String,
    },
    /// Replace a key by a new one with the same name and scope.
    Rotate {
        id: String,
    },
}

/// The operator commands (see the module docs for exit codes).
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Orders: create, get, list, progress, cancel, pause, resume, retry, dlq, drain-dlq, force-complete.
    #[command(subcommand)]
    Order(OrderCmd),
    /// Tasks: trace.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Emergency brake: stop all claims cluster-wide.
    Pause,
    /// Release the emergency brake.
    Resume,
    /// Check conservation now: one order, or all unfinished and recent ones (default).
    Invariants {
        #[arg(long, conflicts_with = "all")]
        order: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// EXECUTING tasks whose worker is gone or whose lease expired.
    Orphans,
    /// The cluster's processes.
    Workers,
    /// Backlog, throughput and the ETA to drain it.
    Capacity,
    /// The daily health check; exits 1 when unhealthy.
    Health,
    /// Kinds: list, get, put, delete, pause, resume.
    #[command(subcommand)]
    Kinds(KindsCmd),
    /// API keys: list, create, revoke, rotate.
    #[command(subcommand)]
    Keys(KeysCmd),
}

/// A failed call, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

type CliResult<T> = Result<T, CliError>;

struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs) -> Self {
        Client {
            http: crate::http::client(),
            base: args.api_url.trim_end_matches('/').to_owned(),
            key: args.api_key.clone(),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> CliResult<Value> {
        self.call_with(method, path, body, &[]).await
    }

    async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> CliResult<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(Duration::from_secs(60));
        if let Some(k) = &self.key {
            req = req.header("x-api-key", k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json_body(&b);
        }
        let resp = req.send().await.map_err(|e| CliError {
            code: 5,
            message: format!("cannot reach the Tally API at {}: {e}\nhint: is it running? set TALLY_API_URL or --api-url", self.base),
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        let err = &value["error"];
        let mut message = err["message"]
            .as_str()
            .map_or_else(|| format!("the API answered {status}"), str::to_owned);
        if let Some(f) = err["field"].as_str() {
            message = format!("{f}: {message}");
        }
        let code = match status.as_u16() {
            401 => {
                message.push_str("\nhint: set TALLY_API_KEY (or --api-key) to a valid key; an admin creates one with `tally keys create`");
                4
            }
            403 => 4,
            s if s >= 500 => 5,
            _ => 3,
        };
        Err(CliError {
            code,
            message: format!("{message} [HTTP {}]", status.as_u16()),
        })
    }

    async fn get(&self, path: &str) -> CliResult<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> CliResult<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }
}

trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
}

/// Runs an operator command; prints its result and returns the exit code.
pub async fn run(cmd: OpsCommand, args: ClientArgs) -> ExitCode {
    let client = Client::new(&args);
    match execute(&client, cmd, args.json).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn id_path(id: &str) -> CliResult<String> {
    uuid::Uuid::parse_str(id.trim())
        .map(|u| u.to_string())
        .map_err(|_| CliError {
            code: 3,
            message: format!("{id:?} is not an order id (a UUID, as `tally order list` shows)"),
        })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn execute(c: &Client, cmd: OpsCommand, json_out: bool) -> CliResult<u8> {
    let show = |v: &Value, human: &dyn Fn(&Value)| {
        if json_out { print_json(v) } else { human(v) }
    };
    match cmd {
        OpsCommand::Order(o) => return order(c, o, json_out).await,
        OpsCommand::Task(TaskCmd::Trace { id }) => {
            let v = c.get(&format!("/api/tasks/{id}/trace")).await?;
            show(&v, &|v| {
                let t = &v["task"];
                println!(
                    "task {} of order {} (seq {}), {} — {}/{} units, attempt {}/{}",
                    t["id"],
                    s(&t["order_id"]),
                    t["seq"],
                    s(&t["status"]),
                    t["delivered"],
                    t["quantity"],
                    t["attempts"],
                    t["max_attempts"]
                );
                println!("idempotency key {}", s(&t["idempotency_key"]));
                if !t["last_error"].is_null() {
                    println!(
                        "last error ({}): {}",
                        s(&t["last_error_class"]),
                        s(&t["last_error"])
                    );
                }
                let rows: Vec<Vec<String>> = v["transitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            s(&x["occurred_at"]),
                            s(&x["from_state"]),
                            s(&x["to_state"]),
                            s(&x["transition_reason"]),
                            s(&x["error_class"]),
                            x["attempt"].to_string().replace("null", "-"),
                            s(&x["actor_id"]),
                        ]
                    })
                    .collect();
                table(
                    &["AT", "FROM", "TO", "REASON", "ERROR", "ATTEMPT", "ACTOR"],
                    &rows,
                );
            });
        }
        OpsCommand::Pause => {
            let v = c.post("/api/admin/pause", None).await?;
            show(&v, &|_| {
                println!(
                    "processing paused cluster-wide: no task will be claimed until `tally resume`"
                )
            });
        }
        OpsCommand::Resume => {
            let v = c.post("/api/admin/resume", None).await?;
            show(&v, &|_| println!("processing resumed"));
        }
        OpsCommand::Invariants { order, all: _ } => {
            let v = match &order {
                Some(id) => {
                    c.get(&format!("/api/admin/invariants/orders/{}", id_path(id)?))
                        .await?
                }
                None => c.get("/api/admin/invariants/all").await?,
            };
            let failed = if order.is_some() {
                !v["passed"].as_bool().unwrap_or(false)
            } else {
                v["failed"].as_i64().unwrap_or(1) > 0
            };
            show(&v, &|v| {
                if order.is_some() {
                    println!(
                        "order {} ({}): {}",
                        s(&v["order_id"]),
                        s(&v["order_status"]),
                        if failed { "VIOLATED" } else { "ok" }
                    );
                    println!(
                        "expected {} = delivered {} + failed {} + cancelled {} + outstanding {}",
                        v["expected_units"],
                        v["delivered_units"],
                        v["failed_units"],
                        v["cancelled_units"],
                        v["outstanding_units"]
                    );
                    for x in v["violations"].as_array().into_iter().flatten() {
                        println!("  violation: {}", s(x));
                    }
                } else {
                    println!(
                        "checked {} orders: {} passed, {} failed; {} recorded failures in the last 24 h",
                        v["checked"], v["passed"], v["failed"], v["recorded_failures_24h"]
                    );
                    for r in v["violations"].as_array().into_iter().flatten() {
                        println!("  order {}: {}", s(&r["order_id"]), r["violations"]);
                    }
                }
            });
            return Ok(u8::from(failed));
        }
        OpsCommand::Orphans => {
            let v = c.get("/api/admin/invariants/orphans").await?;
            show(&v, &|v| {
                let rows: Vec<Vec<String>> = v["orphans"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| {
                        vec![
                            o["task_id"].to_string(),
                            s(&o["order_id"]),
                            s(&o["claimed_by"]),
                            o["attempts"].to_string(),
                            format!(
                                "{:.1}s",
                                o["lease_expired_seconds_ago"].as_f64().unwrap_or(0.0)
                            ),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no orphaned tasks");
                } else {
                    table(
                        &["TASK", "ORDER", "CLAIMED BY", "ATTEMPTS", "EXPIRED"],
                        &rows,
                    );
                }
            });
        }
        OpsCommand::Workers => {
            let v = c.get("/api/admin/workers").await?;
            show(&v, &|v| {
                let rows: Vec<Vec<String>> = v["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|w| {
                        vec![
                            s(&w["id"]),
                            s(&w["hostname"]),
                            w["pid"].to_string(),
                            s(&w["roles"]),
                            s(&w["status"]),
                            w["executing"].to_string(),
                            w["total_completed"].to_string(),
                            w["total_failed"].to_string(),
                            w["recovered_orphans"].to_string(),
                            s(&w["heartbeat_at"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "HOST",
                        "PID",
                        "ROLES",
                        "STATUS",
                        "EXECUTING",
                        "COMPLETED",
                        "FAILED",
                        "ORPHANS",
                        "HEARTBEAT",
                    ],
                    &rows,
                );
            });
        }
        OpsCommand::Capacity => {
            let v = c.get("/api/admin/capacity").await?;
            show(&v, &|v| {
                println!(
                    "live workers      {} ({} slots, {} executing)",
                    v["live_workers"], v["worker_slots"], v["executing"]
                );
                println!(
                    "backlog           {} tasks, {} units ({} waiting for a retry)",
                    v["pending_tasks"], v["pending_units"], v["retrying_tasks"]
                );
                println!("dead-letter queue {} tasks", v["dead_letter_tasks"]);
                println!(
                    "throughput (5 m)  {:.1} units/s, {:.2} tasks/s",
                    v["units_per_sec_5m"].as_f64().unwrap_or(0.0),
                    v["tasks_per_sec_5m"].as_f64().unwrap_or(0.0)
                );
                println!("ETA to drain      {}", eta(&v["eta_seconds"]));
                if v["paused"] == true {
                    println!("PAUSED: nothing is being claimed (`tally resume`)");
                }
            });
        }
        OpsCommand::Health => {
            let v = c.get("/api/admin/health").await?;
            let healthy = v["verdict"] == "healthy";
            show(&v, &|v| {
                let by: Vec<String> = v["tasks_by_status"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!("tasks             {}", by.join(", "));
                println!("stuck tasks       {}", v["stuck_tasks"]);
                println!("orphans           {}", v["orphans"]);
                println!("dead-letter queue {}", v["dead_letter"]);
                println!("failures (24 h)   {}", v["failures_24h"]);
                println!(
                    "invariant violations (24 h) {}",
                    v["invariant_violations_24h"]
                );
                println!(
                    "live processes    {}; sweeper leader {}",
                    v["live_workers"],
                    s(&v["leader"])
                );
                for p in v["problems"].as_array().into_iter().flatten() {
                    println!("problem: {}", s(p));
                }
                println!("verdict: {}", if healthy { "HEALTHY" } else { "UNHEALTHY" });
            });
            return Ok(u8::from(!healthy));
        }
        OpsCommand::Kinds(k) => return kinds(c, k, json_out).await,
        OpsCommand::Keys(k) => return keys(c, k, json_out).await,
    }
    Ok(0)
}

async fn order(c: &Client, cmd: OrderCmd, json_out: bool) -> CliResult<u8> {
    let show_order = |v: &Value| {
        if json_out {
            print_json(v)
        } else {
            print_order(v)
        }
    };
    match cmd {
        OrderCmd::Create(o) => {
            let mut body = json!({"kind": o.kind, "quantity": o.quantity, "target": o.target});
            for (k, v) in [
                ("chunk_size", o.chunk_size.map(Value::from)),
                ("priority", o.priority.map(Value::from)),
                ("max_attempts", o.max_attempts.map(Value::from)),
                ("callback_url", o.callback_url.map(Value::from)),
                ("callback_format", o.callback_format.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let headers: Vec<(&str, &str)> = o
                .idempotency_key
                .iter()
                .map(|k| ("idempotency-key", k.as_str()))
                .collect();
            let v = c
                .call_with(reqwest::Method::POST, "/api/orders", Some(body), &headers)
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "order {} accepted: {} units of {} to {} in {} tasks of ~{} (status {})",
                    s(&v["id"]),
                    v["quantity"],
                    s(&v["kind"]),
                    s(&v["target"]),
                    v["task_count"],
                    v["chunk_size"],
                    s(&v["status"])
                );
                println!("watch it: tally order progress {} --watch", s(&v["id"]));
            }
        }
        OrderCmd::Import { file, batch_size } => {
            return import::run(c, &file, batch_size, json_out).await;
        }
        OrderCmd::Get { id } => {
            show_order(&c.get(&format!("/api/orders/{}", id_path(&id)?)).await?)
        }
        OrderCmd::List {
            status,
            kind,
            limit,
            cursor,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [("status", status), ("kind", kind), ("cursor", cursor)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", urlencode(&v)));
                }
            }
            let v = c.get(&format!("/api/orders?{}", q.join("&"))).await?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["orders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|o| {
                        vec![
                            s(&o["id"]),
                            s(&o["status"]),
                            s(&o["kind"]),
                            format!("{}/{}", o["delivered"], o["quantity"]),
                            o["failed_permanent_units"].to_string(),
                            if o["needs_attention"] == true {
                                "yes".into()
                            } else {
                                String::new()
                            },
                            s(&o["created_at"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "STATUS",
                        "KIND",
                        "DELIVERED",
                        "DEAD",
                        "ATTENTION",
                        "CREATED",
                    ],
                    &rows,
                );
                if let Some(next) = v["next_cursor"].as_str() {
                    println!("more: --cursor {next}");
                }
            }
        }
        OrderCmd::Progress {
            id,
            watch,
            interval,
        } => {
            let path = format!("/api/orders/{}/progress", id_path(&id)?);
            let tty = std::io::stdout().is_terminal();
            let mut last = String::new();
            loop {
                let v = c.get(&path).await?;
                let finished = matches!(
                    v["status"].as_str(),
                    Some("COMPLETED" | "PARTIAL" | "CANCELLED")
                );
                let stuck = v["needs_attention"] == true;
                if json_out {
                    println!("{v}");
                } else {
                    let line = progress_line(&v);
                    if !watch {
                        println!("{line}");
                    } else if tty {
                        print!("\r\x1b[2K{line}");
                        use std::io::Write;
                        let _ = std::io::stdout().flush();
                    } else if line != last {
                        println!("{line}");
                    }
                    last = line;
                }
                if !watch || finished || stuck {
                    if watch && tty && !json_out {
                        println!();
                    }
                    if watch && stuck && !json_out {
                        println!(
                            "every remaining task is dead-lettered: inspect with `tally order dlq {id}`, then `tally order drain-dlq {id}`"
                        );
                    }
                    let ok = v["status"] == "COMPLETED" || (!watch && !stuck);
                    return Ok(u8::from(!ok));
                }
                tokio::time::sleep(Duration::from_secs_f64(interval.clamp(0.1, 3600.0))).await;
            }
        }
        OrderCmd::Cancel { id } => show_order(
            &c.post(&format!("/api/orders/{}/cancel", id_path(&id)?), None)
                .await?,
        ),
        OrderCmd::Pause { id } => show_order(
            &c.post(&format!("/api/orders/{}/pause", id_path(&id)?), None)
                .await?,
        ),
        OrderCmd::Resume { id } => show_order(
            &c.post(&format!("/api/orders/{}/resume", id_path(&id)?), None)
                .await?,
        ),
        OrderCmd::ForceComplete { id } => show_order(
            &c.post(
                &format!("/api/orders/{}/force-complete", id_path(&id)?),
                None,
            )
            .await?,
        ),
        OrderCmd::Retry { id } => {
            let v = c
                .post(&format!("/api/orders/{}/retry", id_path(&id)?), None)
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("{} waiting tasks made claimable now", v["tasks"])
            }
        }
        OrderCmd::DrainDlq { id } => {
            let v = c
                .post(&format!("/api/orders/{}/drain-dlq", id_path(&id)?), None)
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!(
                    "{} dead-lettered tasks ({} units) replayed with a fresh attempt budget",
                    v["tasks"], v["units"]
                )
            }
        }
        OrderCmd::Dlq { id } => {
            let v = c
                .get(&format!("/api/admin/orders/{}/failed-tasks", id_path(&id)?))
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["tasks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        vec![
                            t["id"].to_string(),
                            t["seq"].to_string(),
                            format!("{}/{}", t["delivered"], t["quantity"]),
                            format!("{}/{}", t["attempts"], t["max_attempts"]),
                            s(&t["last_error_class"]),
                            s(&t["last_error"]).chars().take(60).collect(),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("the dead-letter queue of this order is empty");
                } else {
                    table(
                        &[
                            "TASK",
                            "SEQ",
                            "DELIVERED",
                            "ATTEMPTS",
                            "CLASS",
                            "LAST ERROR",
                        ],
                        &rows,
                    );
                }
            }
        }
    }
    Ok(0)
}

async fn kinds(c: &Client, cmd: KindsCmd, json_out: bool) -> CliResult<u8> {
    let show_kind = |v: &Value| {
        if json_out {
            print_json(v)
        } else {
            print_kind(v)
        }
    };
    match cmd {
        KindsCmd::List => {
            let v = c.get("/api/admin/kinds").await?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        vec![
                            s(&k["name"]),
                            s(&k["handler"]),
                            s(&k["webhook"]["url"]),
                            k["max_attempts"].to_string(),
                            k["default_chunk_size"].to_string(),
                            s(&k["concurrency_limit"]),
                            if k["paused"] == true {
                                "yes".into()
                            } else {
                                String::new()
                            },
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME", "HANDLER", "URL", "ATTEMPTS", "CHUNK", "LIMIT", "PAUSED",
                    ],
                    &rows,
                );
            }
        }
        KindsCmd::Get { name } => show_kind(
            &c.get(&format!("/api/admin/kinds/{}", urlencode(&name)))
                .await?,
        ),
        KindsCmd::Put {
            name,
            file,
            handler,
            url,
            max_attempts,
            default_chunk_size,
            concurrency_limit,
        } => {
            let mut spec = match file {
                Some(path) => {
                    let text = if path == "-" {
                        std::io::read_to_string(std::io::stdin())
                    } else {
                        std::fs::read_to_string(&path)
                    }
                    .map_err(|e| CliError {
                        code: 3,
                        message: format!("reading {path}: {e}"),
                    })?;
                    serde_json::from_str::<Value>(&text).map_err(|e| CliError {
                        code: 3,
                        message: format!("{path} is not JSON: {e}"),
                    })?
                }
                None => json!({}),
            };
            if let Some(h) = handler {
                spec["handler"] = json!(h);
            }
            if let Some(u) = url {
                spec["webhook"]["url"] = json!(u);
            }
            if let Some(n) = max_attempts {
                spec["max_attempts"] = json!(n);
            }
            if let Some(n) = default_chunk_size {
                spec["default_chunk_size"] = json!(n);
            }
            if let Some(n) = concurrency_limit {
                spec["concurrency_limit"] = json!(n);
            }
            if spec.get("handler").is_none() {
                return Err(CliError {
                    code: 3,
                    message: "give --handler simulate|webhook (or a --file with a spec)".into(),
                });
            }
            show_kind(
                &c.call(
                    reqwest::Method::PUT,
                    &format!("/api/admin/kinds/{}", urlencode(&name)),
                    Some(spec),
                )
                .await?,
            );
        }
        KindsCmd::Delete { name } => {
            c.call(
                reqwest::Method::DELETE,
                &format!("/api/admin/kinds/{}", urlencode(&name)),
                None,
            )
            .await?;
            if !json_out {
                println!("kind {name} deleted");
            }
        }
        KindsCmd::Pause { name } => show_kind(
            &c.post(
                &format!("/api/admin/kinds/{}/pause", urlencode(&name)),
                None,
            )
            .await?,
        ),
        KindsCmd::Resume { name } => show_kind(
            &c.post(
                &format!("/api/admin/kinds/{}/resume", urlencode(&name)),
                None,
            )
            .await?,
        ),
    }
    Ok(0)
}

async fn keys(c: &Client, cmd: KeysCmd, json_out: bool) -> CliResult<u8> {
    let created = |v: &Value| {
        if json_out {
            print_json(v);
        } else {
            println!(
                "key {} ({}, scope {})",
                s(&v["key"]["id"]),
                s(&v["key"]["name"]),
                s(&v["key"]["scope"])
            );
            println!("secret (shown once; store it now): {}", s(&v["secret"]));
        }
    };
    match cmd {
        KeysCmd::List => {
            let v = c.get("/api/admin/keys").await?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|k| {
                        vec![
                            s(&k["id"]),
                            s(&k["name"]),
                            s(&k["scope"]),
                            format!("{}…", s(&k["prefix"])),
                            s(&k["created_at"]),
                            s(&k["last_used_at"]),
                            s(&k["revoked_at"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "NAME",
                        "SCOPE",
                        "PREFIX",
                        "CREATED",
                        "LAST USED",
                        "REVOKED",
                    ],
                    &rows,
                );
            }
        }
        KeysCmd::Create { name, scope } => created(
            &c.post(
                "/api/admin/keys",
                Some(json!({"name": name, "scope": scope})),
            )
            .await?,
        ),
        KeysCmd::Revoke { id } => {
            let v = c
                .post(&format!("/api/admin/keys/{}/revoke", id_path(&id)?), None)
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("key {} revoked", s(&v["id"]))
            }
        }
        KeysCmd::Rotate { id } => created(
            &c.post(&format!("/api/admin/keys/{}/rotate", id_path(&id)?), None)
                .await?,
        ),
    }
    Ok(0)
}

/// A JSON value as plain text: strings unquoted, null as "-".
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn eta(v: &Value) -> String {
    match v.as_f64() {
        None => "unknown (nothing delivered recently)".into(),
        Some(s) if s < 1.0 => "now".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn progress_line(v: &Value) -> String {
    let pct = v["percent"].as_f64().unwrap_or(0.0);
    let width = 30usize;
    let filled = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    let t = &v["tasks_by_status"];
    let n = |k: &str| t[k].as_i64().unwrap_or(0);
    let mut line = format!(
        "[{}{}] {:5.1}%  {}/{} units  tasks: {} done, {} running, {} waiting, {} retrying, {} dead  {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        pct,
        v["delivered"],
        v["expected"],
        n("COMPLETED"),
        n("EXECUTING"),
        n("PENDING"),
        n("FAILED_RETRYING"),
        n("FAILED_PERMANENT"),
        s(&v["status"]),
    );
    if v["status"] == "PROCESSING" && v["outstanding"].as_i64().unwrap_or(0) > 0 {
        line.push_str(&format!("  ETA {}", eta(&v["eta_seconds"])));
    }
    if v["paused"] == true {
        line.push_str("  (paused)");
    }
    if v["needs_attention"] == true {
        line.push_str("  NEEDS ATTENTION");
    }
    line
}

fn print_order(v: &Value) {
    println!("order      {}", s(&v["id"]));
    println!(
        "status     {}{}{}",
        s(&v["status"]),
        if v["paused"] == true { " (paused)" } else { "" },
        if v["needs_attention"] == true {
            " — NEEDS ATTENTION (dead-lettered tasks)"
        } else {
            ""
        }
    );
    println!("kind       {} → {}", s(&v["kind"]), s(&v["target"]));
    println!(
        "units      {} delivered of {} ({} dead-lettered, {} cancelled, {} outstanding)",
        v["delivered"],
        v["quantity"],
        v["failed_permanent_units"],
        v["cancelled_units"],
        v["outstanding_units"]
    );
    if !v["shortfall"].is_null() {
        println!("shortfall  {}", v["shortfall"]);
    }
    println!(
        "tasks      {} of ~{} units, up to {} attempts each",
        v["task_count"], v["chunk_size"], v["max_attempts"]
    );
    println!(
        "created    {}   finished {}",
        s(&v["created_at"]),
        s(&v["finished_at"])
    );
}

fn print_kind(v: &Value) {
    println!(
        "kind        {} ({}){}",
        s(&v["name"]),
        s(&v["handler"]),
        if v["paused"] == true { " PAUSED" } else { "" }
    );
    if !v["webhook"].is_null() {
        let w = &v["webhook"];
        println!(
            "url         {}",
            if w["url"].is_null() {
                "the order's target".into()
            } else {
                s(&w["url"])
            }
        );
        println!(
            "timeout     {} ms; signed: {}; allowed hosts: {}",
            w["timeout_ms"], w["signing_secret_set"], w["allowed_hosts"]
        );
    }
    println!(
        "attempts    {}; backoff {} s × {} up to {} s",
        v["max_attempts"], v["backoff_base_sec"], v["backoff_multiplier"], v["backoff_max_sec"]
    );
    println!(
        "chunk size  {}; concurrency limit {}",
        v["default_chunk_size"],
        s(&v["concurrency_limit"])
    );
}

/// Prints rows under headers, columns aligned.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}
