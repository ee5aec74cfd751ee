//! `leader_lease`: a Postgres lease row per elected role, with a term that increases on
//! every change of holder.

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};

/// A granted (or renewed) lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub term: i64,
}

/// Acquire if free or expired, renew if ours; one statement, decided by the database clock.
const ACQUIRE: &str = r#"
INSERT INTO leader_lease AS l (name, holder, term, expires_at)
VALUES ($1, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET holder = EXCLUDED.holder,
    term = CASE WHEN l.holder = EXCLUDED.holder THEN l.term ELSE l.term + 1 END,
    acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at ELSE now() END,
    renewed_at = now(),
    expires_at = EXCLUDED.expires_at
WHERE l.holder = EXCLUDED.holder OR l.expires_at < now()
RETURNING term
"#;

impl Store {
    /// Acquires or renews `name` for `holder`; `None` when someone else holds a live lease.
    pub async fn lease_acquire(
        &self,
        name: &str,
        holder: Uuid,
        ttl: Duration,
    ) -> Result<Option<LeaseGrant>, StoreError> {
        let term: Option<i64> = self
            .call("acquiring the leader lease", async {
                sqlx::query_scalar(ACQUIRE)
                    .bind(name)
                    .bind(holder)
                    .bind(ttl.as_secs_f64())
                    .fetch_optional(self.pool())
                    .await
            })
            .await?;
        Ok(term.map(|term| LeaseGrant { term }))
    }

    /// Gives the lease up early (on shutdown) so another candidate takes over at once.
    pub async fn lease_release(&self, name: &str, holder: Uuid) -> Result<bool, StoreError> {
        let n = self
            .call("releasing the leader lease", async {
                sqlx::query(
                    "UPDATE leader_lease SET expires_at = now() - interval '1 millisecond' \
                     WHERE name = $1 AND holder = $2 AND expires_at >= now()",
                )
                .bind(name)
                .bind(holder)
                .execute(self.pool())
                .await
            })
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Current holder and term of a lease, if any live one exists.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<(Uuid, i64)>, StoreError> {
        self.call("reading the leader lease", async {
            sqlx::query_as(
                "SELECT holder, term FROM leader_lease WHERE name = $1 AND expires_at > now()",
            )
            .bind(name)
            .fetch_optional(self.pool())
            .await
        })
        .await
    }

    /// Records that `holder` leads `name` under another backend (a record for `tally
    /// health`, not a lock: nothing decides leadership from it).
    pub async fn lease_record(
        &self,
        name: &str,
        holder: Uuid,
        term: i64,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.call("recording the leader", async {
            sqlx::query(
                "INSERT INTO leader_lease AS l (name, holder, term, expires_at) \
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, term = EXCLUDED.term, \
                   acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.term = EXCLUDED.term \
                                      THEN l.acquired_at ELSE now() END, \
                   renewed_at = now(), expires_at = EXCLUDED.expires_at",
            )
            .bind(name)
            .bind(holder)
            .bind(term.max(1))
            .bind(ttl.as_secs_f64())
            .execute(self.pool())
            .await
        })
        .await?;
        Ok(())
    }
}
