//! `tally_control`: the cluster-wide operator switches (global pause, batch-size override).

use super::{Store, StoreError};

impl Store {
    /// The emergency brake: while paused, no worker claims anything.
    pub async fn set_paused(&self, paused: bool, actor: &str) -> Result<(), StoreError> {
        self.call("setting the global pause", async {
            sqlx::query(
                "UPDATE tally_control SET paused = $1, updated_at = now(), updated_by = $2 WHERE id",
            )
            .bind(paused)
            .bind(actor)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await?;
        if !paused {
            self.wake_tasks();
        }
        Ok(())
    }

    pub async fn set_batch_size_override(
        &self,
        size: Option<i32>,
        actor: &str,
    ) -> Result<(), StoreError> {
        self.call("setting the batch-size override", async {
            sqlx::query(
                "UPDATE tally_control SET batch_size_override = $1, updated_at = now(), updated_by = $2 WHERE id",
            )
            .bind(size)
            .bind(actor)
            .execute(self.pool())
            .await
            .map(|_| ())
        })
        .await
    }
}
