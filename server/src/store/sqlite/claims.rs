//! The queue's claim on SQLite: the oldest due tasks, read in the queue index's order, each
//! marked running and read back by key; no more than a byte budget of their payloads.

use rusqlite::params;

use super::rows::{complete, task_row, TASK_COLS};
use super::{sealed, SqliteStore};
use crate::model::{now_ms, Task};
use crate::store::records::{damaged_ending, Pending};
use crate::store::{Result, StoreError};

/// The queued tasks that are due at `?1`, oldest first: first come, first served, except that
/// a task held back by its retry backoff lets younger ones pass. (Selected, then updated by id:
/// one `UPDATE ... WHERE id IN (SELECT ...)` measured 3x slower.) Its reader takes as many rows
/// as it wants and stops: they come in the index's order, so the rest are never read. A `LIMIT
/// ?2` instead had SQLite plan the statement again at every claim, as it plans with a bound
/// limit's value.
pub(super) const CLAIM: &str =
    "SELECT id, length(payload) FROM tasks WHERE status = 'queued' AND not_before <= ?1
     ORDER BY created_at, id";

impl SqliteStore {
    /// Takes up to `limit` of the oldest runnable queued tasks in `tx` and marks them running,
    /// stopping before the one whose payload would take theirs past `bytes` (the first is
    /// taken whatever its size); a damaged record found on the way is failed (its ending added
    /// to `ended`), not taken.
    pub(super) fn claim_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        (limit, bytes): (usize, u64),
        ended: &mut Pending,
    ) -> Result<Vec<Task>> {
        // A plain write (every commit of the recorder) claims nothing: no work for it here.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut tasks = Vec::with_capacity(limit);
        // Each id marked running, then read back by key (not with `RETURNING`, whose
        // temporary table SQLite makes and drops at each run).
        const TAKE: &str = "UPDATE tasks SET status = 'running', attempts = attempts + 1, \
                            started_at = ?2 WHERE id = ?1";
        let read_back = format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1");
        // Again while a damaged record took a place (it is failed, so not selected twice).
        let (mut skipped, mut full) = (true, false);
        let mut held: Option<u64> = None;
        while skipped && !full && tasks.len() < limit {
            skipped = false;
            let mut ids: Vec<String> = Vec::new();
            {
                let mut stmt = tx.prepare_cached(CLAIM)?;
                let mut rows = stmt.query(params![now])?;
                while ids.len() < limit - tasks.len() {
                    let Some(row) = rows.next()? else { break };
                    let size = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
                    let after = held.unwrap_or(0).saturating_add(size);
                    if held.is_some() && after > bytes {
                        full = true;
                        break;
                    }
                    held = Some(after);
                    ids.push(row.get(0)?);
                }
            }
            for id in ids {
                tx.prepare_cached(TAKE)?.execute(params![id, now])?;
                let read = tx
                    .prepare_cached(&read_back)?
                    .query_row([&id], |r| task_row(&self.sealer, r));
                match read.map_err(StoreError::from) {
                    Ok(task) => tasks.push(task),
                    // A record that fails its integrity check is never run: it ends failed, saying
                    // why, and the queue goes on.
                    Err(StoreError::Damaged(why)) => {
                        tracing::error!(task_id = %id, why, "a queued task's record is damaged; failed, not run");
                        let completion = damaged_ending();
                        let plain = sealed::Seal {
                            sealer: &self.sealer,
                            key: None,
                        };
                        complete(tx, &id, &completion, now, ended, plain)?;
                        skipped = true;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(tasks)
    }
}
