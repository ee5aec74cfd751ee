//! The only place with SQL. One file per table or aggregate; every function is one bounded
//! statement (or one short transaction) with a deadline, and state changes are fenced by the
//! state (and claim token) they expect.
//!
//! Connections carry `statement_timeout` and `idle_in_transaction_session_timeout`, and
//! every call is additionally bounded on the client side ([`Store::call`]), so a half-open
//! socket can stall one call, never a loop.

/// The ready-ring rows (migration 0005) of the task rows `$from` yields (it must have
/// `id`, `order_id`, `seq`, `kind` and `priority`): one definition for every statement
/// that makes tasks PENDING.
macro_rules! insert_ready_rows {
    ($from:literal) => {
        concat!(
            "INSERT INTO task_ready (slot, task_id, priority, run, kind, order_id)\n",
            "    SELECT tally_ready_slot(), id, priority, seq / 64, kind, order_id\n",
            "    FROM ",
            $from
        )
    };
}

mod admin;
mod callbacks;
mod control;
mod keys;
mod kinds;
mod leader;
mod ops;
mod orders;
mod ready;
mod sweep;
mod tasks;
mod wake;
mod workers;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use admin::{
    CapacityRow, ControlRow, HealthRow, OrphanRow, RecordedChecks, TaskRow, TransitionRow,
    WorkerRow,
};
pub use callbacks::{CallbackJob, CallbackResult, CallbackRow};
pub use keys::{ApiKeyRow, AuditRow, NewAudit};
pub use kinds::{DeleteKind, KindRow};
pub use leader::LeaseGrant;
pub use ops::{ActionOutcome, OrderAction};
pub use orders::{
    Accepted, GENERATE_TASKS_BUDGET, GENERATE_TIMEOUT, INTAKE_TRIES, IntakeAudit, IntakeItem,
    IntakeOutcome, NewOrder, OrderRow,
};
pub use ready::{RECLAIM_EVERY, ReclaimReport};
pub use sweep::{ExpiredTask, RetentionReport};
/// The claim and completion statements themselves, so a test can EXPLAIN exactly what
/// workers run.
#[doc(hidden)]
pub use tasks::{APPLY as APPLY_SQL, CLAIM as CLAIM_SQL, CLAIM_RUN};
pub use tasks::{Applied, ClaimedTask, TaskUpdate, UpdateFence};
pub use wake::WAKE_WINDOW;
pub use workers::{WorkerCounters, WorkerRegistration};

/// Channel that tells workers new tasks may be claimable.
pub const TASKS_CHANNEL: &str = "tally_tasks";
/// Channel that tells generators new orders are waiting.
pub const ORDERS_CHANNEL: &str = "tally_orders";

/// The embedded, forward-only migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A failed store call, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{op}: PostgreSQL did not answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
}

impl StoreError {
    /// The connection died under the statement (reset, closed, terminated by the server or
    /// an operator): whether it committed is unknown, and a fresh connection may succeed.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed => true,
                // 08: connection exception; 57P01-57P03: admin or crash shutdown, cannot
                // connect now (pg_terminate_backend answers 57P01).
                sqlx::Error::Database(e) => e.code().is_some_and(|c| {
                    c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// A deadlock or serialization failure: the statement can simply be run again.
    pub fn is_transient_conflict(&self) -> bool {
        match self {
            StoreError::Db {
                source: sqlx::Error::Database(e),
                ..
            } => matches!(e.code().as_deref(), Some("40P01" | "40001")),
            _ => false,
        }
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    /// Connections this process may hold.
    pub pool_size_max: u32,
    /// Server-side limit on one statement.
    pub statement_timeout: Duration,
    /// Client-side deadline on one call (statement plus network).
    pub call_timeout: Duration,
    /// `application_name`, visible in `pg_stat_activity`.
    pub application_name: String,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size_max: 10,
            statement_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(35),
            application_name: "tally".into(),
        }
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    call_timeout: Duration,
    wakeups: wake::Wakeups,
}

impl Store {
    /// Builds the pool. Connections are opened lazily, so this succeeds while PostgreSQL is
    /// down; callers that need the database now use [`Store::ping`].
    pub fn connect_lazy(opts: &StoreOptions) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(&opts.url)
            .map_err(|source| StoreError::Db {
                op: "parsing the database URL",
                source,
            })?
            .application_name(&opts.application_name)
            // Statements are logged at debug; only the truly slow ones warn (the batched
            // statements routinely take tens of milliseconds by design).
            .log_statements(log::LevelFilter::Debug)
            .log_slow_statements(log::LevelFilter::Warn, Duration::from_secs(5))
            .options([
                (
                    "statement_timeout",
                    format!("{}ms", opts.statement_timeout.as_millis()),
                ),
                (
                    "idle_in_transaction_session_timeout",
                    format!("{}ms", (opts.statement_timeout * 2).as_millis()),
                ),
                (
                    "lock_timeout",
                    format!("{}ms", opts.statement_timeout.as_millis()),
                ),
                // The batch statements join arrays of a thousand ids; a generic plan cannot
                // see their size and, on stale statistics, rescans the array once per row
                // (a 5x throughput collapse seen in `tally bench`). Planning each execution
                // with its real parameters costs well under a millisecond per batch.
                ("plan_cache_mode", "force_custom_plan".to_string()),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.pool_size_max)
            .min_connections(0)
            .acquire_timeout(opts.call_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .test_before_acquire(true)
            .connect_lazy_with(connect);
        Ok(Self {
            pool,
            call_timeout: opts.call_timeout,
            wakeups: wake::Wakeups::default(),
        })
    }

    /// Connects and checks the database answers.
    pub async fn connect(opts: &StoreOptions) -> Result<Self, StoreError> {
        let store = Self::connect_lazy(opts)?;
        store.ping().await?;
        Ok(store)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `fut` with the client-side deadline and names the operation in errors.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(StoreError::Db { op, source }),
            Err(_) => Err(StoreError::Timeout {
                op,
                timeout: self.call_timeout,
            }),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call("pinging the database", async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Applies pending migrations. Concurrent callers are serialised by sqlx's advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Invalid {
                op: "applying migrations",
                message: e.to_string(),
            })
    }

    /// Whether every embedded migration has been applied (readiness, and roles waiting for
    /// the migration job).
    pub async fn migrations_current(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> = self
            .call("reading applied migrations", async {
                sqlx::query_scalar(
                    "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
                )
                .fetch_all(&self.pool)
                .await
            })
            .await
            .or_else(|e| match &e {
                // No migrations table yet: nothing applied.
                StoreError::Db {
                    source: sqlx::Error::Database(db),
                    ..
                } if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
                _ => Err(e),
            })?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .all(|m| applied.contains(&m.version)))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
