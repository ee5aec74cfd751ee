//! Every setting: a CLI flag and a `TALLY_` environment variable, with its default and its
//! bounds. A bad value refuses to start with a message that names the variable.

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::domain::Backoff;
use crate::generator::GeneratorConfig;
use crate::handler::SimulateConfig;
use crate::store::StoreOptions;
use crate::sweeper::SweeperConfig;
use crate::worker::WorkerConfig;

/// A parser that accepts numbers in `[min, max]` and names the environment variable when it
/// refuses one (clap names the flag).
fn bounded<T>(
    env: &'static str,
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!(
            "{env} must be a number between {min} and {max}, got {s:?}"
        )),
    }
}

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Tally: a PostgreSQL-native order delivery engine",
    long_about = "Orders fan out into chunked tasks that a fleet of workers delivers exactly once, on PostgreSQL."
)]
pub struct Cli {
    /// Log format: text or json (RUST_LOG sets the level).
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub client: crate::cli::ClientArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
    /// Run the selected roles until SIGTERM/SIGINT.
    Serve(Box<ServeArgs>),
    /// Deliver a demo order on a throwaway PostgreSQL, with live progress and a verdict.
    Demo(Box<crate::demo::DemoArgs>),
    /// Measure throughput, pickup latency and fan-out time; prints JSON.
    Bench(Box<crate::bench::BenchArgs>),
    #[command(flatten)]
    Ops(crate::cli::OpsCommand),
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
}

/// Database connection settings.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://tally@db:5432/tally.
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Connections each process may hold (budget: pods × this ≤ max_connections).
    #[arg(long, env = "TALLY_DB_POOL_SIZE", default_value = "10",
          value_parser = bounded::<u32>("TALLY_DB_POOL_SIZE", 2, 1000))]
    pub db_pool_size: u32,
    /// Server-side statement_timeout, seconds; each call's client deadline is 5 s more.
    #[arg(long, env = "TALLY_DB_STATEMENT_TIMEOUT_SEC", default_value = "30",
          value_parser = bounded::<f64>("TALLY_DB_STATEMENT_TIMEOUT_SEC", 0.1, 3600.0))]
    pub db_statement_timeout_sec: f64,
}

impl DbArgs {
    pub fn store_options(&self, application_name: &str) -> Result<StoreOptions, String> {
        let url = self
            .database_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .ok_or("TALLY_DATABASE_URL (--database-url) is required")?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("TALLY_DATABASE_URL must start with postgres:// or postgresql://".into());
        }
        Ok(StoreOptions {
            url,
            pool_size_max: self.db_pool_size,
            statement_timeout: secs(self.db_statement_timeout_sec),
            call_timeout: secs(self.db_statement_timeout_sec + 5.0),
            application_name: application_name.into(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Role {
    Api,
    Generator,
    Worker,
    Sweeper,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Roles this process runs, comma-separated.
    #[arg(
        long,
        env = "TALLY_ROLES",
        value_enum,
        value_delimiter = ',',
        default_value = "api,generator,worker,sweeper"
    )]
    pub roles: Vec<Role>,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub sweeper: SweeperArgs,
    #[command(flatten)]
    pub simulate: SimulateArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Where the API (and /livez, /readyz) listens.
    #[arg(long, env = "TALLY_API_ADDR", default_value = "127.0.0.1:8080",
          value_parser = socket_addr("TALLY_API_ADDR"))]
    pub api_addr: std::net::SocketAddr,
    /// Bootstrap admin API key (at least 16 printable characters); from a Secret on Kubernetes.
    #[arg(long, env = "TALLY_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Kinds to create or update at start: a JSON object of name → kind (see README).
    #[arg(long, env = "TALLY_KINDS_FILE")]
    pub kinds_file: Option<std::path::PathBuf>,
    /// Keep the built-in `simulate` kind (false removes it at start when no order uses it).
    #[arg(long, env = "TALLY_SIMULATE_KIND", default_value_t = true, action = clap::ArgAction::Set)]
    pub simulate_kind: bool,
    /// Allow /api/admin/testing/enable to switch fault injection on.
    #[arg(long, env = "TALLY_FAULT_INJECTION_ALLOWED", default_value_t = false, action = clap::ArgAction::Set)]
    pub fault_injection_allowed: bool,
    /// Hosts order callback URLs may name, comma-separated (empty: any).
    #[arg(long, env = "TALLY_CALLBACK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub callback_allowed_hosts: Vec<String>,
    /// Where `/metrics` listens (Prometheus text format); `off` disables it.
    #[arg(long, env = "TALLY_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: String,
    /// Orders of at most this many tasks are fanned out by the API in the intake statement
    /// itself (claimable at once); bigger ones wait for the generator. 0: always the generator.
    #[arg(long, env = "TALLY_INLINE_FANOUT_MAX_TASKS", default_value_t = crate::intake::INLINE_FANOUT_MAX_TASKS,
          value_parser = bounded::<u32>("TALLY_INLINE_FANOUT_MAX_TASKS", 0, 10_000))]
    pub inline_fanout_max_tasks: u32,
    /// Signs order callbacks (X-Tally-Signature), like webhook kinds' signing_secret.
    #[arg(long, env = "TALLY_CALLBACK_SIGNING_SECRET", hide_env_values = true)]
    pub callback_signing_secret: Option<String>,
    /// How long the API trusts a looked-up API key (and a kind's settings) before reading it
    /// again, seconds: a key revoked through another process stops working within this.
    /// 0: read them on every request.
    #[arg(long, env = "TALLY_API_KEY_CACHE_SEC", default_value = "5",
          value_parser = bounded::<u32>("TALLY_API_KEY_CACHE_SEC", 0, 300))]
    pub api_key_cache_sec: u32,
    /// Most orders one intake statement takes (concurrent POST /api/orders share it).
    #[arg(long, env = "TALLY_INTAKE_BATCH_MAX", default_value = "500",
          value_parser = bounded::<u32>("TALLY_INTAKE_BATCH_MAX", 1, 5_000))]
    pub intake_batch_max: u32,
}

fn socket_addr(
    env: &'static str,
) -> impl Fn(&str) -> Result<std::net::SocketAddr, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        s.trim().parse().map_err(|_| {
            format!("{env} must be an address like 127.0.0.1:8080 or 0.0.0.0:8080, got {s:?}")
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Run the worker role (false removes it from TALLY_ROLES).
    #[arg(long, env = "TALLY_WORKER_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub worker_enabled: bool,
    /// Most tasks claimed by one statement.
    #[arg(long, env = "TALLY_WORKER_BATCH_SIZE", default_value = "100",
          value_parser = bounded::<u32>("TALLY_WORKER_BATCH_SIZE", 1, 10_000))]
    pub worker_batch_size: u32,
    /// Most tasks executing at once in one process. A slot is held from the claim until the
    /// outcome is committed, so even an instant handler keeps it for two commits.
    #[arg(long, env = "TALLY_WORKER_CONCURRENCY", default_value = "64",
          value_parser = bounded::<u32>("TALLY_WORKER_CONCURRENCY", 1, 10_000))]
    pub worker_concurrency: u32,
    /// Longest one attempt may run, seconds; then it is cancelled as a TimeoutError.
    #[arg(long, env = "TALLY_CLAIM_TIMEOUT_SEC", default_value = "300",
          value_parser = bounded::<f64>("TALLY_CLAIM_TIMEOUT_SEC", 0.1, 86_400.0))]
    pub claim_timeout_sec: f64,
    /// Worker lease, seconds: a claim whose worker stops heartbeating is rescued after this.
    #[arg(long, env = "TALLY_LEASE_TTL_SEC", default_value = "10",
          value_parser = bounded::<f64>("TALLY_LEASE_TTL_SEC", 0.5, 3600.0))]
    pub lease_ttl_sec: f64,
    /// Longest wait between claims when no NOTIFY arrives, milliseconds.
    #[arg(long, env = "TALLY_POLL_INTERVAL_MS", default_value = "1000",
          value_parser = bounded::<u64>("TALLY_POLL_INTERVAL_MS", 10, 60_000))]
    pub poll_interval_ms: u64,
    /// Use LISTEN/NOTIFY to wake up early. Set false behind PgBouncer in transaction mode,
    /// where LISTEN does not work: polling alone is what correctness relies on anyway.
    #[arg(long, env = "TALLY_LISTEN_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub listen_enabled: bool,
    /// On SIGTERM, how long running attempts may take to finish before they are handed back.
    #[arg(long, env = "TALLY_SHUTDOWN_GRACE_SEC", default_value = "25",
          value_parser = bounded::<f64>("TALLY_SHUTDOWN_GRACE_SEC", 0.0, 3600.0))]
    pub shutdown_grace_sec: f64,
}

#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// Attempts per task before it is dead-lettered.
    #[arg(long, env = "TALLY_MAX_RETRIES", default_value = "3",
          value_parser = bounded::<u32>("TALLY_MAX_RETRIES", 1, 100))]
    pub max_retries: u32,
    /// Units per task when an order names no chunk size.
    #[arg(long, env = "TALLY_DEFAULT_CHUNK_SIZE", default_value = "400",
          value_parser = bounded::<u32>("TALLY_DEFAULT_CHUNK_SIZE", 1, crate::domain::chunk::CHUNK_SIZE_MAX))]
    pub default_chunk_size: u32,
    /// First retry delay, seconds.
    #[arg(long, env = "TALLY_BACKOFF_BASE_SEC", default_value = "5",
          value_parser = bounded::<f64>("TALLY_BACKOFF_BASE_SEC", 0.001, 86_400.0))]
    pub backoff_base_sec: f64,
    /// Growth factor of the retry delay.
    #[arg(long, env = "TALLY_BACKOFF_MULTIPLIER", default_value = "2",
          value_parser = bounded::<f64>("TALLY_BACKOFF_MULTIPLIER", 1.0, 10.0))]
    pub backoff_multiplier: f64,
    /// Longest retry delay, seconds.
    #[arg(long, env = "TALLY_BACKOFF_MAX_SEC", default_value = "3600",
          value_parser = bounded::<f64>("TALLY_BACKOFF_MAX_SEC", 0.001, 604_800.0))]
    pub backoff_max_sec: f64,
    /// Fraction by which a delay may be shortened at random (at most 1 - 1/multiplier).
    #[arg(long, env = "TALLY_BACKOFF_JITTER", default_value = "0.2",
          value_parser = bounded::<f64>("TALLY_BACKOFF_JITTER", 0.0, 0.9))]
    pub backoff_jitter: f64,
}

impl RetryArgs {
    pub fn backoff(&self) -> Result<Backoff, String> {
        if self.backoff_base_sec > self.backoff_max_sec {
            return Err(format!(
                "TALLY_BACKOFF_BASE_SEC ({}) must not exceed TALLY_BACKOFF_MAX_SEC ({})",
                self.backoff_base_sec, self.backoff_max_sec
            ));
        }
        Backoff::new(
            secs(self.backoff_base_sec),
            self.backoff_multiplier,
            secs(self.backoff_max_sec),
            self.backoff_jitter,
        )
        .map_err(|e| format!("TALLY_BACKOFF_JITTER / TALLY_BACKOFF_MULTIPLIER: {e}"))
    }
}

/// Where the sweeper's leadership lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LeaderElection {
    Postgres,
    Kubernetes,
}

/// Leader election as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElectionBackend {
    Postgres,
    Kubernetes {
        lease: String,
        namespace: Option<String>,
    },
}

/// A Kubernetes object name (RFC 1123 label: lowercase alphanumerics and '-', ≤ 63).
fn lease_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "must be a Kubernetes name (lowercase letters, digits and '-', at most 63), got {s:?}"
        ))
    }
}

#[derive(Debug, Clone, Args)]
pub struct SweeperArgs {
    /// Leader lease, seconds.
    #[arg(long, env = "TALLY_LEADER_TTL_SEC", default_value = "15",
          value_parser = bounded::<f64>("TALLY_LEADER_TTL_SEC", 0.5, 3600.0))]
    pub leader_ttl_sec: f64,
    /// Leader election backend: `postgres` (a lease row; the default) or `kubernetes` (a
    /// coordination.k8s.io Lease; needs RBAC for leases). Safety never depends on either.
    #[arg(long, env = "TALLY_LEADER_ELECTION", value_enum, default_value_t = LeaderElection::Postgres)]
    pub leader_election: LeaderElection,
    /// Name of the Kubernetes Lease (with TALLY_LEADER_ELECTION=kubernetes).
    #[arg(long, env = "TALLY_LEADER_LEASE_NAME", default_value = "tally-sweeper",
          value_parser = lease_name)]
    pub leader_lease_name: String,
    /// Namespace of the Kubernetes Lease; default: the pod's own.
    #[arg(long, env = "TALLY_LEADER_LEASE_NAMESPACE", value_parser = lease_name)]
    pub leader_lease_namespace: Option<String>,
    /// Sweeper tick (lease renewal, orphan rescue), milliseconds.
    #[arg(long, env = "TALLY_SWEEP_INTERVAL_MS", default_value = "1000",
          value_parser = bounded::<u64>("TALLY_SWEEP_INTERVAL_MS", 10, 600_000))]
    pub sweep_interval_ms: u64,
    /// How often running orders are re-audited, seconds.
    #[arg(long, env = "TALLY_AUDIT_INTERVAL_SEC", default_value = "10",
          value_parser = bounded::<f64>("TALLY_AUDIT_INTERVAL_SEC", 0.01, 86_400.0))]
    pub audit_interval_sec: f64,
    /// An order PROCESSING longer than this many hours is reported as stuck.
    #[arg(long, env = "TALLY_STUCK_ORDER_HOURS", default_value = "2",
          value_parser = bounded::<f64>("TALLY_STUCK_ORDER_HOURS", 0.001, 8760.0))]
    pub stuck_order_hours: f64,
    /// Finished orders' tasks and audit rows move to the archive after this many days.
    #[arg(long, env = "TALLY_RETENTION_DAYS", default_value = "30",
          value_parser = bounded::<u32>("TALLY_RETENTION_DAYS", 1, 3650))]
    pub retention_days: u32,
    /// Most rows moved per table per retention pass.
    #[arg(long, env = "TALLY_RETENTION_BATCH", default_value = "5000",
          value_parser = bounded::<u32>("TALLY_RETENTION_BATCH", 1, 1_000_000))]
    pub retention_batch: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Median latency of the simulate handler, milliseconds (0: no-op).
    #[arg(long, env = "TALLY_SIMULATE_LATENCY_MS", default_value = "20",
          value_parser = bounded::<f64>("TALLY_SIMULATE_LATENCY_MS", 0.0, 3_600_000.0))]
    pub simulate_latency_ms: f64,
    /// Log-normal spread of that latency.
    #[arg(long, env = "TALLY_SIMULATE_LATENCY_SIGMA", default_value = "0.5",
          value_parser = bounded::<f64>("TALLY_SIMULATE_LATENCY_SIGMA", 0.0, 3.0))]
    pub simulate_latency_sigma: f64,
    /// Probability of a retryable failure per attempt.
    #[arg(long, env = "TALLY_SIMULATE_TRANSIENT_FAILURE_RATE", default_value = "0",
          value_parser = bounded::<f64>("TALLY_SIMULATE_TRANSIENT_FAILURE_RATE", 0.0, 1.0))]
    pub simulate_transient_failure_rate: f64,
    /// Probability of a permanent failure per attempt.
    #[arg(long, env = "TALLY_SIMULATE_PERMANENT_FAILURE_RATE", default_value = "0",
          value_parser = bounded::<f64>("TALLY_SIMULATE_PERMANENT_FAILURE_RATE", 0.0, 1.0))]
    pub simulate_permanent_failure_rate: f64,
    /// Seed for reproducible simulations.
    #[arg(long, env = "TALLY_SIMULATE_SEED")]
    pub simulate_seed: Option<u64>,
}

impl SimulateArgs {
    pub fn config(&self) -> Result<SimulateConfig, String> {
        if self.simulate_transient_failure_rate + self.simulate_permanent_failure_rate > 1.0 {
            return Err("TALLY_SIMULATE_TRANSIENT_FAILURE_RATE + TALLY_SIMULATE_PERMANENT_FAILURE_RATE must not exceed 1".into());
        }
        Ok(SimulateConfig {
            latency_median: Duration::from_secs_f64(self.simulate_latency_ms / 1000.0),
            latency_sigma: self.simulate_latency_sigma,
            transient_failure_rate: self.simulate_transient_failure_rate,
            permanent_failure_rate: self.simulate_permanent_failure_rate,
            seed: self.simulate_seed,
        })
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub roles: Vec<Role>,
    pub store: StoreOptions,
    pub worker: WorkerConfig,
    pub generator: GeneratorConfig,
    pub sweeper: SweeperConfig,
    pub leader_ttl: Duration,
    pub election: ElectionBackend,
    pub simulate: SimulateConfig,
    pub api: crate::api::ApiConfig,
    pub callbacks: crate::callbacks::CallbackConfig,
    /// Kinds to create or update at start.
    pub kinds: Vec<crate::store::KindRow>,
    /// Keep the built-in `simulate` kind.
    pub simulate_kind: bool,
    /// Where `/metrics` listens (None: not served).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    /// Cross-checks the settings and builds the services' configurations.
    pub fn settings(&self) -> Result<ServeSettings, String> {
        let mut roles = self.roles.clone();
        roles.sort();
        roles.dedup();
        if !self.worker.worker_enabled {
            roles.retain(|r| *r != Role::Worker);
        }
        if roles.is_empty() {
            return Err(
                "TALLY_ROLES selects no role (and TALLY_WORKER_ENABLED=false removed the worker)"
                    .into(),
            );
        }
        let backoff = self.retry.backoff()?;
        let w = &self.worker;
        if w.claim_timeout_sec < 0.1 {
            return Err("TALLY_CLAIM_TIMEOUT_SEC must be at least 0.1".into());
        }
        let poll = Duration::from_millis(w.poll_interval_ms);
        let a = &self.api;
        if let Some(k) = &a.admin_api_key
            && !crate::api::auth::well_formed(k)
        {
            return Err("TALLY_ADMIN_API_KEY must be 16 to 256 printable ASCII characters".into());
        }
        if let Some(s) = &a.callback_signing_secret
            && !(16..=512).contains(&s.len())
        {
            return Err("TALLY_CALLBACK_SIGNING_SECRET must be 16 to 512 bytes".into());
        }
        let metrics_addr = match a.metrics_addr.trim() {
            "off" | "" => None,
            other => Some(other.parse().map_err(|_| {
                format!("TALLY_METRICS_ADDR must be an address like 127.0.0.1:9090 or off, got {other:?}")
            })?),
        };
        let callback_hosts: Vec<String> = a
            .callback_allowed_hosts
            .iter()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .collect();
        let kind_defaults = crate::kinds::KindDefaults {
            max_attempts: self.retry.max_retries as i32,
            chunk_size: self.retry.default_chunk_size as i32,
            backoff_base_sec: self.retry.backoff_base_sec,
            backoff_multiplier: self.retry.backoff_multiplier,
            backoff_max_sec: self.retry.backoff_max_sec,
        };
        let kinds = match &a.kinds_file {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("TALLY_KINDS_FILE {}: {e}", path.display()))?;
                crate::kinds::parse_kinds_file(&text, &kind_defaults)?
            }
        };
        Ok(ServeSettings {
            roles,
            store: self.db.store_options("tally")?,
            worker: WorkerConfig {
                batch_size_max: w.worker_batch_size,
                concurrency_max: w.worker_concurrency,
                lease_ttl: secs(w.lease_ttl_sec),
                claim_timeout: secs(w.claim_timeout_sec),
                poll_interval: poll,
                listen: w.listen_enabled,
                shutdown_grace: secs(w.shutdown_grace_sec),
                backoff,
            },
            generator: GeneratorConfig {
                orders_per_pass_max: 50,
                tasks_per_pass_max: crate::store::GENERATE_TASKS_BUDGET,
                poll_interval: poll,
                listen: w.listen_enabled,
            },
            sweeper: SweeperConfig {
                tick_interval: Duration::from_millis(self.sweeper.sweep_interval_ms),
                audit_interval: secs(self.sweeper.audit_interval_sec),
                stuck_after: secs(self.sweeper.stuck_order_hours * 3600.0),
                retention_days: self.sweeper.retention_days,
                retention_batch_max: self.sweeper.retention_batch,
                backoff,
                ..SweeperConfig::default()
            },
            leader_ttl: secs(self.sweeper.leader_ttl_sec),
            election: match self.sweeper.leader_election {
                LeaderElection::Postgres => ElectionBackend::Postgres,
                LeaderElection::Kubernetes => ElectionBackend::Kubernetes {
                    lease: self.sweeper.leader_lease_name.clone(),
                    namespace: self.sweeper.leader_lease_namespace.clone(),
                },
            },
            simulate: self.simulate.config()?,
            api: crate::api::ApiConfig {
                addr: a.api_addr,
                admin_key: a.admin_api_key.clone(),
                fault_injection_allowed: a.fault_injection_allowed,
                callback_allowed_hosts: callback_hosts.clone(),
                inline_fanout_max_tasks: a.inline_fanout_max_tasks,
                cache_ttl: Duration::from_secs(u64::from(a.api_key_cache_sec)),
                intake_batch_max: a.intake_batch_max as usize,
                kind_defaults,
                stuck_task_after: Duration::from_secs(300),
                stuck_order_after: secs(self.sweeper.stuck_order_hours * 3600.0),
            },
            callbacks: crate::callbacks::CallbackConfig {
                allowed_hosts: callback_hosts,
                signing_secret: a.callback_signing_secret.clone(),
                poll_interval: poll.min(Duration::from_millis(500)),
                ..Default::default()
            },
            kinds,
            simulate_kind: a.simulate_kind,
            metrics_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_runbook() {
        let Command::Serve(s) = parse(&["serve", "--database-url", "postgres://x/y"])
            .unwrap()
            .command
        else {
            panic!("serve expected")
        };
        let st = s.settings().unwrap();
        assert_eq!(
            st.roles,
            vec![Role::Api, Role::Generator, Role::Worker, Role::Sweeper]
        );
        assert_eq!(st.api.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(st.worker.claim_timeout, Duration::from_secs(300));
        assert_eq!(s.retry.max_retries, 3);
        assert_eq!(s.retry.default_chunk_size, 400);
        assert_eq!(st.worker.backoff.base(), Duration::from_secs(5));
        assert_eq!(st.sweeper.retention_days, 30);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = parse(&["serve", "--worker-batch-size", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TALLY_WORKER_BATCH_SIZE"), "{err}");
        let err = parse(&["serve", "--lease-ttl-sec", "soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TALLY_LEASE_TTL_SEC"), "{err}");
        let err = parse(&["serve", "--roles", "generator,api2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("api2"), "{err}");
    }

    #[test]
    fn cross_checks_name_their_variables() {
        let Command::Serve(s) = parse(&["serve"]).unwrap().command else {
            panic!()
        };
        assert!(s.settings().unwrap_err().contains("TALLY_DATABASE_URL"));
        let Command::Serve(s) = parse(&["serve", "--database-url", "mysql://x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(s.settings().unwrap_err().contains("TALLY_DATABASE_URL"));
        let Command::Serve(s) = parse(&[
            "serve",
            "--database-url",
            "postgres://x/y",
            "--backoff-base-sec",
            "10",
            "--backoff-max-sec",
            "5",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(s.settings().unwrap_err().contains("TALLY_BACKOFF_BASE_SEC"));
        let Command::Serve(s) = parse(&[
            "serve",
            "--database-url",
            "postgres://x/y",
            "--backoff-jitter",
            "0.8",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(s.settings().unwrap_err().contains("TALLY_BACKOFF_JITTER"));
        let Command::Serve(s) = parse(&[
            "serve",
            "--database-url",
            "postgres://x/y",
            "--roles",
            "worker",
            "--worker-enabled",
            "false",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(s.settings().unwrap_err().contains("TALLY_ROLES"));
    }
}
