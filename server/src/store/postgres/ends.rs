//! A batch that ends tasks, sent and committed in one round trip.
//!
//! An ending counts in the rollups only if its task was still open (a task's end stored again
//! takes the row, and the rollups keep counting the task once). Asked of the rows that the
//! endings' `UPDATE` returns, that costs a round trip before the rollups and the commit can
//! be sent: one of the two waits of a queue batch (the commit's WAL flush is the other). Here
//! one statement stores the endings of the open tasks, then those of the others, and adds the
//! calls of the tasks it opened, with the calls of the batch's finished tasks (sync calls), to
//! the rollup tables: one upsert per table, in the key order [`super::rollups`] writes in, so
//! that batches of several nodes touching the same rows wait for each other instead of
//! deadlocking. The claim, the notification and the commit follow in the same flight.

use postgres::types::ToSql;

use super::pool::Queued;
use super::rollups::{self, BIN_COLUMNS, ON_BIN, ON_ROW, ROW_COLUMNS};
use super::rows::{ending_params, kind_rank, End, Flight, SET_ENDINGS};
use super::sealed::Seal;
use super::{notify_queued, PgStore};
use crate::model::{now_ms, Completion, Task};
use crate::rollup::{bucket_start, Call, RESOLUTIONS};
use crate::store::records::{ended_call, Pending, Share};
use crate::store::{Result, Write};

/// Whether a batch of `writes` (in the order they are stored in) with a claim of `limit` is
/// better sent at once here: it ends tasks or claims some (otherwise nothing waits for an
/// answer, and `rollups::commit` sends it all at once with the rollups added up ahead, which
/// costs PostgreSQL less), and its endings come last, after every new and finished task, and
/// name each task once.
pub(super) fn fits(writes: &[&Write], limit: usize) -> bool {
    let mut ids = std::collections::HashSet::new();
    writes
        .windows(2)
        .all(|w| kind_rank(w[0]) <= kind_rank(w[1]))
        && writes.iter().all(|w| match w {
            Write::Complete { task_id, .. } => ids.insert(task_id.as_str()),
            _ => true,
        })
        && (limit > 0 || !ids.is_empty())
}

/// The calls a statement adds to the rollups, one entry per call and resolution: those of
/// tasks it ends, counted if it opened them (their function and tenant read from the row),
/// and those of finished tasks stored before it in the batch, counted as they are.
#[derive(Default)]
struct Calls<'w> {
    id: Vec<&'w str>,
    tenant: Vec<Option<&'w str>>,
    function_id: Vec<Option<&'w str>>,
    function: Vec<Option<&'w str>>,
    resolution: Vec<i64>,
    start: Vec<i64>,
    outcome: Vec<String>,
    timed: Vec<bool>,
    cold: Vec<bool>,
    duration: Vec<f64>,
    init: Vec<f64>,
    cpu: Vec<f64>,
    memory: Vec<i64>,
    bin: Vec<Option<i64>>,
}

impl<'w> Calls<'w> {
    /// Adds the call of task `id`, of `known`'s function where the batch has the task.
    fn add(&mut self, id: &'w str, known: Option<&'w Task>, call: &Call) {
        let share = Share::of(call);
        for resolution in RESOLUTIONS {
            self.id.push(id);
            self.tenant.push(known.map(|t| t.tenant.as_str()));
            self.function_id.push(known.map(|t| t.function_id.as_str()));
            self.function.push(known.map(|t| t.function.as_str()));
            self.resolution.push(resolution);
            self.start.push(bucket_start(call.at, resolution));
            self.outcome.push(call.outcome.clone());
            self.timed.push(share.timed);
            self.cold.push(share.cold);
            self.duration.push(share.duration);
            self.init.push(share.init);
            self.cpu.push(share.cpu);
            self.memory.push(share.memory);
            self.bin.push(share.bin);
        }
    }

    fn into_params(self) -> Vec<Box<dyn ToSql + Sync + 'w>> {
        vec![
            Box::new(self.id),
            Box::new(self.tenant),
            Box::new(self.function_id),
            Box::new(self.function),
            Box::new(self.resolution),
            Box::new(self.start),
            Box::new(self.outcome),
            Box::new(self.timed),
            Box::new(self.cold),
            Box::new(self.duration),
            Box::new(self.init),
            Box::new(self.cpu),
            Box::new(self.memory),
            Box::new(self.bin),
        ]
    }
}

/// The statement that stores `ends` and adds to the rollups their calls that it opened and
/// the calls of `finished` (stored before it, in the same transaction). Its one row counts
/// the rollup rows and bins written and the tasks it opened and ended again.
pub(super) fn statement<'w>(
    ends: &[End<'w>],
    finished: &[(&'w Task, &'w Completion, i64)],
) -> Result<Queued<'w>> {
    let mut calls = Calls::default();
    for (task, c, at) in finished {
        calls.add(&task.task_id, Some(task), &ended_call(c, *at));
    }
    for (id, c, at, _) in ends {
        calls.add(id, None, &ended_call(c, *at));
    }
    let mut params = ending_params(ends)?;
    params.extend(calls.into_params());
    // The rows are read once each: `opened` sees them as the statement started, `again` takes
    // the others (a row another transaction finished meanwhile is re-read by id and ended
    // again). The sums are written before the bins, as `rollups::commit` does.
    let sql = format!(
        "WITH opened AS (
             UPDATE tasks {SET_ENDINGS} WHERE id = u_id AND finished_at IS NULL
             RETURNING id, tenant, function_id, function),
         again AS (
             UPDATE tasks {SET_ENDINGS} WHERE id = u_id AND NOT EXISTS (SELECT 1 FROM opened WHERE opened.id = u_id)
             RETURNING id),
         calls AS (
             SELECT c.resolution, COALESCE(c.function_id, o.function_id) AS function_id, c.outcome, c.start,
                 COALESCE(c.tenant, o.tenant) AS tenant, COALESCE(c.function, o.function) AS function,
                 c.timed, c.cold, c.duration, c.init, c.cpu, c.memory, c.bin
             FROM unnest($14::text[], $15::text[], $16::text[], $17::text[], $18::int8[], $19::int8[], $20::text[],
                     $21::bool[], $22::bool[], $23::float8[], $24::float8[], $25::float8[], $26::int8[], $27::int8[])
                 AS c(id, tenant, function_id, function, resolution, start, outcome, timed, cold, duration, init,
                      cpu, memory, bin)
             LEFT JOIN opened o ON o.id = c.id
             WHERE c.function_id IS NOT NULL OR o.id IS NOT NULL),
         sums AS (
             INSERT INTO rollups ({ROW_COLUMNS})
             SELECT resolution, function_id, outcome, start, max(tenant), max(function), count(*),
                 count(*) FILTER (WHERE timed), count(*) FILTER (WHERE cold), sum(duration), max(duration),
                 sum(init), sum(cpu), max(cpu), sum(memory::float8), max(memory)
             FROM calls GROUP BY resolution, function_id, outcome, start
             ORDER BY resolution, function_id COLLATE \"C\", outcome COLLATE \"C\", start
             {ON_ROW}
             RETURNING 1),
         bins AS (
             INSERT INTO rollup_bins ({BIN_COLUMNS})
             SELECT resolution, function_id, outcome, start, bin, max(tenant), count(*)
             FROM calls WHERE bin IS NOT NULL GROUP BY resolution, function_id, outcome, start, bin
             ORDER BY resolution, function_id COLLATE \"C\", outcome COLLATE \"C\", start, bin
             {ON_BIN}
             RETURNING 1)
         SELECT (SELECT count(*) FROM sums), (SELECT count(*) FROM bins), (SELECT count(*) FROM opened),
             (SELECT count(*) FROM again)"
    );
    Ok(Queued { sql, params })
}

/// Sets how the rest of the transaction's statements are planned (`plan_cache_mode`).
fn plan_cache(mode: &'static str) -> Queued<'static> {
    Queued {
        sql: "SELECT set_config('plan_cache_mode', $1, true)".to_string(),
        params: vec![Box::new(mode)],
    }
}

/// Has the rest of a transaction that writes and claims tasks read them by key or through an
/// index, never by a scan of the table: each of its statements names a few tasks (or the
/// oldest queued ones, which an index holds), however large the table. A connection keeps
/// its statements prepared, and their plans made while the table was small (a new database,
/// before PostgreSQL has analysed it) scanned it whole at each batch as it grew: the
/// endings' statement took 6 ms instead of 0.3, the claim 1.2 instead of 0.25.
pub(super) fn by_key() -> Queued<'static> {
    Queued {
        sql: "SELECT set_config('enable_seqscan', 'off', true)".to_string(),
        params: Vec::new(),
    }
}

impl PgStore {
    /// [`crate::store::Store::write_and_claim`] of `writes` that [`fits`] (in the order they
    /// are stored in), in one round trip: the new tasks, the finished ones, the endings with
    /// the rollups, the claim, the notification that tasks were queued, and the commit.
    pub(super) fn write_and_claim_at_once<'s>(
        &self,
        writes: &[&Write],
        (limit, bytes): (usize, u64),
        seal: impl Fn(&str) -> Seal<'s>,
    ) -> Result<Vec<Task>> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        let mut inserts = Vec::new();
        let mut finishes = Vec::new();
        let mut ends = Vec::new();
        for w in writes.iter().copied() {
            match w {
                Write::Insert(task) => inserts.push((task, seal(&task.tenant))),
                Write::Finished {
                    task,
                    completion,
                    at,
                } => finishes.push((&**task, completion, *at, seal(&task.tenant))),
                Write::Complete {
                    task_id,
                    tenant,
                    completion,
                    at,
                } => ends.push((task_id.as_str(), completion, *at, seal(tenant))),
            }
        }
        // The flight sends nothing ahead here (it holds no endings that a later insert of
        // the same task would have to wait for), so no rollups come back to `unsent`: the
        // calls are added up by the endings' statement.
        let mut flight = Flight::default();
        flight.lead(by_key());
        let mut unsent = Pending::default();
        flight.inserts(&mut tx, &inserts, &mut unsent)?;
        flight.finished(&mut tx, &finishes, &mut unsent)?;
        debug_assert!(unsent.rows.is_empty());
        let finished: Vec<_> = finishes.iter().map(|(t, c, at, _)| (*t, *c, *at)).collect();
        let mut steps = flight.into_steps();
        // The endings' statement and the claim are planned once per connection: planning
        // either anew took PostgreSQL longer than running it for a few tasks (the endings 0.25
        // ms; the claim 0.2-0.45 ms against 0.01 for its generic plan), and their generic
        // plans read each task by its key and the queue by its index (`by_key` holds for the
        // whole transaction, so no plan made while the table was small scans it).
        steps.push(plan_cache("force_generic_plan"));
        if !ends.is_empty() || !finished.is_empty() {
            steps.push(statement(&ends, &finished)?);
        }
        let now = now_ms();
        let claim = (limit > 0).then(|| {
            steps.push(self.claim_step(now, (limit, bytes, true)));
            steps.len() - 1
        });
        steps.push(plan_cache("auto"));
        steps.extend(notify_queued(writes));
        let mut answers = tx.commit_after(&steps)?;
        let Some(claim) = claim else {
            return Ok(Vec::new());
        };
        let rows = std::mem::take(&mut answers[claim]);
        let claimed = self.claimed_rows(&rows, limit)?;
        let rest = claimed.rest((limit, bytes, true));
        let (mut tasks, damaged) = (claimed.tasks, claimed.damaged);
        if !damaged.is_empty() {
            // Claimed (running) and committed, they fail in a transaction of their own, which
            // claims in their place. Should it fail, the claim made stands: they stay running
            // until recovery interrupts them.
            let more = conn.transaction().and_then(|mut tx| {
                let mut ended = Pending::default();
                self.fail_damaged(&mut tx, &damaged, now, &mut ended)?;
                let more = self.claim_in(&mut tx, rest, &mut ended)?;
                rollups::commit(tx, Vec::new(), ended, Vec::new())?;
                Ok(more)
            });
            match more {
                Ok(more) => tasks.extend(more),
                Err(e) => {
                    tracing::error!(error = %e, tasks = damaged.len(), "damaged queued tasks could not be failed; recovery will interrupt them");
                }
            }
        }
        Ok(tasks)
    }
}
