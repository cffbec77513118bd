//! The queue's claim on PostgreSQL: the oldest due tasks, taken with `FOR UPDATE SKIP LOCKED`
//! from this node's floor (see [`super::floor`]), and the rows it returns made tasks.

use postgres::types::ToSql;

use super::pool::{Queued, Tx};
use super::rows::{complete, task_row, TASK_COLS};
use super::{sealed, PgStore};
use crate::model::{now_ms, Task};
use crate::store::cluster::{ClusterStore, Signal};
use crate::store::records::{damaged_ending, Pending};
use crate::store::{Result, StoreError};

/// What a claim took: its tasks, oldest first, the ids of the damaged records among the rows
/// it locked, and the stored size of the tasks' payloads.
pub(super) struct Claimed {
    pub tasks: Vec<Task>,
    pub damaged: Vec<String>,
    pub bytes: u64,
}

/// What a claim may take: up to so many tasks, within so many bytes of payloads, and whether
/// its first task is taken whatever its size.
pub(super) type Room = (usize, u64, bool);

impl Claimed {
    /// What a claim again after this one, which had `room`, may take: the tasks and bytes it
    /// left, and a task past them only where this one took none.
    pub fn rest(&self, (limit, bytes, first): Room) -> Room {
        (
            limit.saturating_sub(self.tasks.len()),
            bytes.saturating_sub(self.bytes),
            first && self.tasks.is_empty(),
        )
    }
}

impl PgStore {
    /// Takes the oldest runnable queued tasks that fit in `room` in `tx` for this node and
    /// marks them running; a damaged record found on the way is failed (its ending added to
    /// `ended`), not taken.
    pub(super) fn claim_in(
        &self,
        tx: &mut Tx<'_>,
        mut room: Room,
        ended: &mut Pending,
    ) -> Result<Vec<Task>> {
        let now = now_ms();
        let mut tasks = Vec::with_capacity(room.0);
        // Again while a damaged record took a place (it is failed, so not claimed twice),
        // within what the claims before left.
        while room.0 > 0 {
            let step = self.claim_step(now, room);
            let params: Vec<&(dyn ToSql + Sync)> = step.params.iter().map(|p| &**p as _).collect();
            let rows = tx.query(&step.sql, &params)?;
            let claimed = self.claimed(tx, &rows, room.0, now, ended)?;
            room = claimed.rest(room);
            tasks.extend(claimed.tasks);
            if claimed.damaged.is_empty() {
                break;
            }
        }
        Ok(tasks)
    }

    /// The claim of the tasks due at `now` that fit in `room`, as a statement made ahead; it
    /// starts past this node's floor.
    pub(super) fn claim_step(&self, now: i64, (want, bytes, first): Room) -> Queued<'static> {
        let (past_at, past_id) = self.floor.lock().start();
        Queued {
            sql: format!("{CLAIM} RETURNING {TASK_COLS}, octet_length(payload)::int8"),
            params: vec![
                Box::new(now) as Box<dyn ToSql + Sync>,
                Box::new(now),
                Box::new(i64::try_from(want).unwrap_or(i64::MAX)),
                Box::new(self.node_id.clone()),
                Box::new(past_at),
                Box::new(past_id),
                Box::new(i64::try_from(bytes).unwrap_or(i64::MAX)),
                Box::new(first),
            ],
        }
    }

    /// Puts the tasks of `task_ids` this node claimed and never started back in the queue
    /// (see [`crate::store::Store::give_back`]), and tells the nodes: they keep their place,
    /// behind where the claims start.
    pub(super) fn give_back_unstarted(&self, task_ids: &[String]) -> Result<u64> {
        if task_ids.is_empty() {
            return Ok(0);
        }
        let given = self.pool.get()?.execute(
            "UPDATE tasks SET status = 'queued', attempts = attempts - 1, started_at = NULL,
                              node = NULL
             WHERE id = ANY($1) AND status = 'running' AND node = $2",
            &[&task_ids, &self.node_id],
        )?;
        if given > 0 {
            self.floor.lock().reset();
            self.signal(&Signal::Queued)?;
        }
        Ok(given)
    }

    /// The tasks of a claim of `wanted`'s `rows` (see [`PgStore::claimed_rows`]), the damaged
    /// records among them failed in `tx`: such a record is never run; it ends failed, saying
    /// why (its ending added to `ended`), and the queue goes on.
    pub(super) fn claimed(
        &self,
        tx: &mut Tx<'_>,
        rows: &[postgres::Row],
        wanted: usize,
        now: i64,
        ended: &mut Pending,
    ) -> Result<Claimed> {
        let claimed = self.claimed_rows(rows, wanted)?;
        self.fail_damaged(tx, &claimed.damaged, now, ended)?;
        Ok(claimed)
    }

    /// The tasks of a claim of `wanted`'s `rows`, oldest first, the ids of the damaged
    /// records among them (see [`PgStore::fail_damaged`]) and the stored size of the tasks'
    /// payloads. The floor moves past them all.
    pub(super) fn claimed_rows(&self, rows: &[postgres::Row], wanted: usize) -> Result<Claimed> {
        let keys = rows
            .iter()
            .map(|r| Ok((r.try_get(14)?, r.try_get(0)?)))
            .collect::<Result<Vec<(i64, String)>>>()?;
        self.floor.lock().claimed(keys.into_iter(), wanted);
        let mut claimed = Claimed {
            tasks: Vec::with_capacity(rows.len()),
            damaged: Vec::new(),
            bytes: 0,
        };
        for r in rows {
            match task_row(self, r) {
                Ok(task) => {
                    // The last column, after the task's: its payload's stored size.
                    let size: i64 = r.try_get(r.len() - 1)?;
                    claimed.bytes += u64::try_from(size).unwrap_or(0);
                    claimed.tasks.push(task);
                }
                Err(StoreError::Damaged(why)) => {
                    let id: String = r.try_get(0)?;
                    tracing::error!(task_id = %id, why, "a queued task's record is damaged; failed, not run");
                    claimed.damaged.push(id);
                }
                Err(e) => return Err(e),
            }
        }
        claimed
            .tasks
            .sort_by(|a, b| (a.created_at, &a.task_id).cmp(&(b.created_at, &b.task_id)));
        Ok(claimed)
    }

    /// Ends claimed tasks whose records are damaged as failed, saying why, in `tx` (their
    /// endings added to `ended`): such a record is never run, and the queue goes on.
    pub(super) fn fail_damaged(
        &self,
        tx: &mut Tx<'_>,
        damaged: &[String],
        now: i64,
        ended: &mut Pending,
    ) -> Result<()> {
        let plain = sealed::Seal {
            sealer: &self.sealer,
            key: None,
        };
        for id in damaged {
            complete(tx, id, &damaged_ending(), now, ended, plain)?;
        }
        Ok(())
    }
}

/// The `$3` oldest queued tasks due at `$1` past the key (`$5`, `$6`) (see [`super::floor`]),
/// marked running as of `$2`, skipping those another claim holds: nodes claiming together
/// take different tasks without waiting. The ids are selected once, as an array (`=
/// ANY(ARRAY(...))`), rather than joined (`IN (...)`): the join's plan cost PostgreSQL about
/// twice the time (0.36 against 0.15-0.2 ms, `EXPLAIN (ANALYZE, SUMMARY)`). A queue batch runs
/// it on its generic plan, made once per connection (see `ends`).
///
/// Of the tasks locked, those taken stop before the one whose payload would take theirs past
/// `$7` bytes (as stored; the first is taken whatever its size where `$8`): a running sum
/// over the locked rows, whose payloads' sizes PostgreSQL knows without reading them.
const CLAIM: &str =
    "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = $2, node = $4
     WHERE id = ANY(ARRAY(
         SELECT id FROM (
             SELECT id, sum(size) OVER w AS upto, row_number() OVER w AS n
             FROM (SELECT id, created_at, octet_length(payload)::int8 AS size FROM tasks
                   WHERE status = 'queued' AND not_before <= $1 AND (created_at, id) > ($5, $6)
                   ORDER BY created_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) AS locked
             WINDOW w AS (ORDER BY created_at, id)) AS sized
         WHERE (n = 1 AND $8) OR upto <= $7::int8))";
