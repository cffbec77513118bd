//! Records as rows: functions and tasks, and how a task's start and end are written.

use postgres::types::ToSql;
use postgres::Row;
use serde_json::Value;

use super::pool::{Queued, Tx};
use super::sealed::Seal;
use super::PgStore;
use crate::model::{Completion, Function, Mode, Task, TaskError, TaskStatus, TaskUsage};
use crate::rollup::Call;
use crate::store::records::{place, Pending};
use crate::store::{Result, StoreError, Write};

/// A number stored as BIGINT that the model keeps as `u32`.
pub(super) fn u32_of(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `writes` in the order they are stored in: kind by kind (the new tasks, then the finished
/// ones, then the endings), so that a batch of submissions and endings takes three statements
/// rather than one per alternation; as they came where that would change what is stored (an
/// ending before a write that adds the same task, which in order finds no row to end).
pub(super) fn statement_order(writes: &[Write]) -> Vec<&Write> {
    let mut ended = std::collections::HashSet::new();
    let by_kind_is_same = writes.iter().all(|w| match w {
        Write::Complete { task_id, .. } => {
            ended.insert(task_id.as_str());
            true
        }
        Write::Insert(task) => !ended.contains(task.task_id.as_str()),
        Write::Finished { task, .. } => !ended.contains(task.task_id.as_str()),
    });
    let mut ordered: Vec<&Write> = writes.iter().collect();
    if by_kind_is_same {
        ordered.sort_by_key(|w| kind_rank(w));
    }
    ordered
}

/// Where a write's kind comes in [`statement_order`]: the new tasks, the finished ones, the
/// endings.
pub(super) fn kind_rank(w: &Write) -> u8 {
    match w {
        Write::Insert(_) => 0,
        Write::Finished { .. } => 1,
        Write::Complete { .. } => 2,
    }
}

/// The columns of tasks as they started, one array per column.
#[derive(Default)]
struct Openings<'a> {
    id: Vec<&'a str>,
    tenant: Vec<&'a str>,
    function_id: Vec<&'a str>,
    function: Vec<&'a str>,
    version: Vec<i64>,
    mode: Vec<&'static str>,
    payload: Vec<Vec<u8>>,
    attempts: Vec<i64>,
    created_at: Vec<i64>,
    started_at: Vec<Option<i64>>,
    chain_run: Vec<Option<&'a str>>,
}

impl<'a> Openings<'a> {
    /// The arrays, in the order of the columns the inserts name first.
    fn into_params(self) -> Vec<Box<dyn ToSql + Sync + 'a>> {
        vec![
            Box::new(self.id),
            Box::new(self.tenant),
            Box::new(self.function_id),
            Box::new(self.function),
            Box::new(self.version),
            Box::new(self.mode),
            Box::new(self.payload),
            Box::new(self.attempts),
            Box::new(self.created_at),
            Box::new(self.started_at),
            Box::new(self.chain_run),
        ]
    }

    fn push(&mut self, task: &'a Task, seal: Seal<'_>) -> Result<()> {
        self.id.push(&task.task_id);
        self.tenant.push(&task.tenant);
        self.function_id.push(&task.function_id);
        self.function.push(&task.function);
        self.version.push(i64::from(task.version));
        self.mode.push(task.mode.as_str());
        self.payload.push(seal.text(
            place::PAYLOAD,
            &task.task_id,
            &serde_json::to_string(&task.payload)?,
        ));
        self.attempts.push(i64::from(task.attempts));
        self.created_at.push(task.created_at);
        self.started_at.push(task.started_at);
        self.chain_run.push(task.chain_run.as_deref());
        Ok(())
    }
}

/// The columns of a task's ending, in [`Ending::values`]'s order.
const ENDING_COLS: &str =
    "status, result, error, error_kind, logs, logs_truncated, usage, duration_ms,
     cpu_ms, peak_memory_bytes, cold, finished_at";

/// The `SET` of a task's ending; `$1` is its id.
const SET_ENDING: &str = "UPDATE tasks SET status = $2, result = $3, error = $4, error_kind = $5, logs = $6,
     logs_truncated = $7, usage = $8, duration_ms = $9, cpu_ms = $10, peak_memory_bytes = $11, cold = $12,
     finished_at = $13 WHERE id = $1";

/// The `SET` and `FROM` of an `UPDATE tasks` storing endings: `$1` their tasks' ids, `$2` to
/// `$13` the arrays of [`Endings::into_params`], each row of them named `u`. The new values
/// go under names of their own, so that the columns RETURNING reads are the row's.
pub(super) const SET_ENDINGS: &str = "SET status = u_status, result = u_result, error = u_error,
     error_kind = u_error_kind, logs = u_logs, logs_truncated = u_logs_truncated, usage = u_usage,
     duration_ms = u_duration_ms, cpu_ms = u_cpu_ms, peak_memory_bytes = u_peak_memory_bytes, cold = u_cold,
     finished_at = u_finished_at
     FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[], $6::bytea[], $7::bool[],
         $8::text[], $9::float8[], $10::float8[], $11::int8[], $12::bool[], $13::int8[])
         AS u(u_id, u_status, u_result, u_error, u_error_kind, u_logs, u_logs_truncated, u_usage,
              u_duration_ms, u_cpu_ms, u_peak_memory_bytes, u_cold, u_finished_at)";

/// The parameters of [`SET_ENDINGS`] storing `ends`: their ids, then their columns.
pub(super) fn ending_params<'w>(ends: &[End<'w>]) -> Result<Vec<Box<dyn ToSql + Sync + 'w>>> {
    let mut e = Endings::default();
    for (id, c, at, seal) in ends {
        e.push(Ending::of(c, *at, id, *seal)?);
    }
    let ids: Vec<&str> = ends.iter().map(|(id, ..)| *id).collect();
    let mut params: Vec<Box<dyn ToSql + Sync + 'w>> = vec![Box::new(ids)];
    params.extend(e.into_params());
    Ok(params)
}

/// A task's ending as column values.
struct Ending {
    status: &'static str,
    result: Option<Vec<u8>>,
    error: Option<Vec<u8>>,
    error_kind: Option<&'static str>,
    logs: Vec<u8>,
    logs_truncated: bool,
    usage: Option<String>,
    duration_ms: Option<f64>,
    cpu_ms: Option<f64>,
    peak_memory_bytes: Option<i64>,
    cold: Option<bool>,
    finished_at: i64,
}

impl Ending {
    /// The ending of task `id`, its data sealed by `seal`.
    fn of(c: &Completion, finished_at: i64, id: &str, seal: Seal<'_>) -> Result<Ending> {
        let usage = c.usage.as_ref();
        let json = |v: Option<String>, column| v.map(|t| seal.text(column, id, &t));
        Ok(Ending {
            status: c.status.as_str(),
            result: json(
                c.result.as_ref().map(serde_json::to_string).transpose()?,
                place::RESULT,
            ),
            error: json(
                c.error.as_ref().map(serde_json::to_string).transpose()?,
                place::ERROR,
            ),
            error_kind: c.error.as_ref().map(|e| e.kind.as_str()),
            logs: if c.logs.is_empty() {
                Vec::new()
            } else {
                seal.text(place::LOGS, id, &c.logs)
            },
            logs_truncated: c.logs_truncated,
            usage: usage.map(serde_json::to_string).transpose()?,
            duration_ms: usage.map(|u| u.duration_ms),
            cpu_ms: usage.map(|u| u.cpu_ms),
            peak_memory_bytes: usage
                .map(|u| i64::try_from(u.peak_memory_bytes).unwrap_or(i64::MAX)),
            cold: usage.map(|u| u.cold),
            finished_at,
        })
    }

    /// The values of [`ENDING_COLS`] (and of `SET_ENDING`'s `$2` to `$13`), in order.
    fn values(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.status,
            &self.result,
            &self.error,
            &self.error_kind,
            &self.logs,
            &self.logs_truncated,
            &self.usage,
            &self.duration_ms,
            &self.cpu_ms,
            &self.peak_memory_bytes,
            &self.cold,
            &self.finished_at,
        ]
    }
}

/// The columns of [`ENDING_COLS`], one array per column.
#[derive(Default)]
struct Endings {
    status: Vec<&'static str>,
    result: Vec<Option<Vec<u8>>>,
    error: Vec<Option<Vec<u8>>>,
    error_kind: Vec<Option<&'static str>>,
    logs: Vec<Vec<u8>>,
    logs_truncated: Vec<bool>,
    usage: Vec<Option<String>>,
    duration_ms: Vec<Option<f64>>,
    cpu_ms: Vec<Option<f64>>,
    peak_memory_bytes: Vec<Option<i64>>,
    cold: Vec<Option<bool>>,
    finished_at: Vec<i64>,
}

impl Endings {
    /// The arrays, in [`ENDING_COLS`]'s order.
    fn into_params(self) -> Vec<Box<dyn ToSql + Sync>> {
        vec![
            Box::new(self.status),
            Box::new(self.result),
            Box::new(self.error),
            Box::new(self.error_kind),
            Box::new(self.logs),
            Box::new(self.logs_truncated),
            Box::new(self.usage),
            Box::new(self.duration_ms),
            Box::new(self.cpu_ms),
            Box::new(self.peak_memory_bytes),
            Box::new(self.cold),
            Box::new(self.finished_at),
        ]
    }

    fn push(&mut self, e: Ending) {
        self.status.push(e.status);
        self.result.push(e.result);
        self.error.push(e.error);
        self.error_kind.push(e.error_kind);
        self.logs.push(e.logs);
        self.logs_truncated.push(e.logs_truncated);
        self.usage.push(e.usage);
        self.duration_ms.push(e.duration_ms);
        self.cpu_ms.push(e.cpu_ms);
        self.peak_memory_bytes.push(e.peak_memory_bytes);
        self.cold.push(e.cold);
        self.finished_at.push(e.finished_at);
    }
}

/// Stores how a task ended; adds it to the rollups to be written only if it was still open.
pub(super) fn complete(
    tx: &mut Tx<'_>,
    task_id: &str,
    c: &Completion,
    at: i64,
    rollups: &mut Pending,
    seal: Seal<'_>,
) -> Result<()> {
    let e = Ending::of(c, at, task_id, seal)?;
    let id: [&(dyn ToSql + Sync); 1] = [&task_id];
    let values: Vec<&(dyn ToSql + Sync)> = id.into_iter().chain(e.values()).collect();
    let opened = tx.query_opt(
        &format!(
            "{SET_ENDING} AND finished_at IS NULL RETURNING tenant, function_id, function, {CALL_COLS}"
        ),
        &values,
    )?;
    match opened {
        Some(r) => {
            let (tenant, function_id, function): (String, String, String) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            rollups.add(&tenant, &function_id, &function, &call_row(&r, 3)?);
        }
        // Already finished (its end stored again): the row takes the new ending, and the
        // rollups keep counting the task once.
        None => {
            tx.execute(SET_ENDING, &values)?;
        }
    }
    Ok(())
}

/// Writes of one batch made ahead and sent at once (see [`Tx::pipeline`]): each run of
/// new tasks, of finished tasks, of endings in one statement, then a claim if one is added.
#[derive(Default)]
pub(super) struct Flight<'w> {
    steps: Vec<Queued<'w>>,
    /// Per step, the endings it stores if they are still open: its rows say which were.
    ends: Vec<Vec<End<'w>>>,
    /// Which step is the claim.
    claim: Option<usize>,
    /// The tasks those endings name. An ending re-stored after the rows come back must not
    /// pass a later insert of its task made ahead with it (in order, it found no row), so
    /// such an insert waits for them.
    ending: std::collections::HashSet<&'w str>,
}

/// A task's ending to store: its id, how it ended, when, and its seal.
pub(super) type End<'w> = (&'w str, &'w Completion, i64, Seal<'w>);

impl<'w> Flight<'w> {
    fn push(&mut self, step: Queued<'w>, ends: Vec<End<'w>>) {
        self.steps.push(step);
        self.ends.push(ends);
    }

    /// Sends what was made so far if it ends one of `tasks` (see `ending`).
    fn before_adding(
        &mut self,
        tx: &mut Tx<'_>,
        mut tasks: impl Iterator<Item = &'w Task>,
        rollups: &mut Pending,
    ) -> Result<()> {
        if tasks.any(|t| self.ending.contains(t.task_id.as_str())) {
            self.send(tx, rollups)?;
        }
        Ok(())
    }

    /// Adds new tasks (queued or running), in one statement.
    pub fn inserts(
        &mut self,
        tx: &mut Tx<'_>,
        tasks: &[(&'w Task, Seal<'_>)],
        rollups: &mut Pending,
    ) -> Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.before_adding(tx, tasks.iter().map(|(t, _)| *t), rollups)?;
        let mut c = Openings::default();
        for (task, seal) in tasks {
            c.push(task, *seal)?;
        }
        let status: Vec<&str> = tasks.iter().map(|(t, _)| t.status.as_str()).collect();
        let mut params = c.into_params();
        params.push(Box::new(status));
        self.push(
            Queued {
                sql: "INSERT INTO tasks (id, tenant, function_id, function, version, mode, payload, attempts, created_at, started_at, chain_run, status)
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::bytea[],
                                          $8::int8[], $9::int8[], $10::int8[], $11::text[], $12::text[])"
                    .to_string(),
                params,
            },
            Vec::new(),
        );
        Ok(())
    }

    /// Adds tasks that have already ended (sync calls), in one statement. Their calls are the
    /// caller's to count: the client-side rollups ([`Pending::finished`]) or the endings'
    /// statement (`ends`), which adds them up in PostgreSQL.
    pub fn finished(
        &mut self,
        tx: &mut Tx<'_>,
        ended: &[(&'w Task, &Completion, i64, Seal<'_>)],
        rollups: &mut Pending,
    ) -> Result<()> {
        if ended.is_empty() {
            return Ok(());
        }
        self.before_adding(tx, ended.iter().map(|(t, ..)| *t), rollups)?;
        let mut o = Openings::default();
        let mut e = Endings::default();
        for (task, c, at, seal) in ended {
            o.push(task, *seal)?;
            e.push(Ending::of(c, *at, &task.task_id, *seal)?);
        }
        let mut params = o.into_params();
        params.extend(e.into_params());
        self.push(
            Queued {
                sql: format!(
                    "INSERT INTO tasks (id, tenant, function_id, function, version, mode, payload, attempts, created_at,
                         started_at, chain_run, {ENDING_COLS})
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::bytea[],
                         $8::int8[], $9::int8[], $10::int8[], $11::text[], $12::text[], $13::bytea[], $14::bytea[], $15::text[],
                         $16::bytea[], $17::bool[], $18::text[], $19::float8[], $20::float8[], $21::int8[], $22::bool[], $23::int8[])"
                ),
                params,
            },
            Vec::new(),
        );
        Ok(())
    }

    /// Stores how several tasks ended: in one statement for those still open (added to the
    /// rollups once, when the rows come back), and once those are known, one by one for any
    /// already finished (their end stored again: the row takes the new ending, the rollups
    /// keep counting it once). A run naming one task twice is stored one by one, in order,
    /// after what was made ahead of it is sent.
    pub fn completes(
        &mut self,
        tx: &mut Tx<'_>,
        ends: Vec<End<'w>>,
        rollups: &mut Pending,
    ) -> Result<()> {
        let distinct: std::collections::HashSet<&str> = ends.iter().map(|(id, ..)| *id).collect();
        if distinct.len() < ends.len() {
            self.send(tx, rollups)?;
            for (id, c, at, seal) in ends {
                complete(tx, id, c, at, rollups, seal)?;
            }
            return Ok(());
        }
        if ends.is_empty() {
            return Ok(());
        }
        self.ending.extend(ends.iter().map(|(id, ..)| *id));
        let params = ending_params(&ends)?;
        self.push(
            Queued {
                sql: format!(
                    "UPDATE tasks {SET_ENDINGS} WHERE id = u_id AND finished_at IS NULL
                     RETURNING id, tenant, function_id, function, {CALL_COLS}"
                ),
                params,
            },
            ends,
        );
        Ok(())
    }

    /// Whether a statement made so far must be answered before the transaction goes on
    /// (the endings', the claim's); otherwise they can leave with the commit.
    pub fn needs_answers(&self) -> bool {
        self.claim.is_some() || self.ends.iter().any(|e| !e.is_empty())
    }

    /// The statements made so far, to send with the commit.
    pub fn into_steps(self) -> Vec<Queued<'w>> {
        self.steps
    }

    /// Adds a statement whose rows no one reads (a setting), before what is added next.
    pub fn lead(&mut self, step: Queued<'w>) {
        self.push(step, Vec::new());
    }

    /// Adds the claim: its rows are the claimed tasks.
    pub fn claim(&mut self, step: Queued<'w>) {
        self.claim = Some(self.steps.len());
        self.push(step, Vec::new());
    }

    /// Sends what was made so far, at once, and takes in the endings' rows (see
    /// [`Flight::completes`]); returns the claim's rows, if it was sent.
    pub fn send(&mut self, tx: &mut Tx<'_>, rollups: &mut Pending) -> Result<Option<Vec<Row>>> {
        if self.steps.is_empty() {
            return Ok(None);
        }
        self.ending.clear();
        let answers = tx.pipeline(&std::mem::take(&mut self.steps))?;
        let mut claimed = None;
        for (i, (rows, ends)) in answers
            .into_iter()
            .zip(std::mem::take(&mut self.ends))
            .enumerate()
        {
            if self.claim == Some(i) {
                claimed = Some(rows);
                continue;
            }
            if ends.is_empty() {
                continue;
            }
            let mut opened = std::collections::HashSet::with_capacity(rows.len());
            for r in &rows {
                let (id, tenant, function_id, function): (&str, &str, &str, &str) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
                rollups.add(tenant, function_id, function, &call_row(r, 4)?);
                opened.insert(id.to_string());
            }
            for (id, c, at, seal) in ends {
                if !opened.contains(id) {
                    complete(tx, id, c, at, rollups, seal)?;
                }
            }
        }
        self.claim = None;
        Ok(claimed)
    }
}

/// A uniqueness violation means a concurrent deploy took the same name or version.
pub(super) fn conflict(e: StoreError) -> StoreError {
    match e {
        StoreError::Postgres(pe)
            if pe.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            StoreError::Conflict
        }
        e => e,
    }
}

pub(super) const FUNCTION_COLS: &str = "id, tenant, name, version, active, created_at, updated_at";

pub(super) fn function_row(row: &Row) -> Result<Function> {
    Ok(Function {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        name: row.try_get(2)?,
        version: u32_of(row.try_get(3)?),
        active: row.try_get(4)?,
        created_at: row.try_get(5)?,
        updated_at: row.try_get(6)?,
    })
}

/// A finished task as a rollup call; read by [`call_row`].
pub(super) const CALL_COLS: &str = "CASE WHEN status = 'succeeded' THEN 'succeeded' ELSE COALESCE(error_kind, status) END,
    finished_at, usage IS NOT NULL, COALESCE(cold, false), COALESCE(duration_ms, 0),
    COALESCE((usage::jsonb ->> 'init_duration_ms')::double precision, 0), COALESCE(cpu_ms, 0), COALESCE(peak_memory_bytes, 0)";

pub(super) fn call_row(row: &Row, first: usize) -> Result<Call> {
    let peak: i64 = row.try_get(first + 7)?;
    Ok(Call {
        outcome: row.try_get(first)?,
        at: row.try_get(first + 1)?,
        timed: row.try_get(first + 2)?,
        cold: row.try_get(first + 3)?,
        duration_ms: row.try_get(first + 4)?,
        init_ms: row.try_get(first + 5)?,
        cpu_ms: row.try_get(first + 6)?,
        peak_memory_bytes: u64::try_from(peak).unwrap_or(0),
    })
}

pub(super) const TASK_COLS: &str = "id, tenant, function_id, function, version, mode, status, payload, result, error, logs, logs_truncated, usage, attempts, created_at, started_at, finished_at, chain_run";

pub(super) fn task_row(store: &PgStore, row: &Row) -> Result<Task> {
    let id: String = row.try_get(0)?;
    let sealed = |i: usize, column: &'static str| -> Result<Option<String>> {
        store.opened(row.try_get(i)?, column, &id, || format!("task {id}"))
    };
    let parse = |text: Option<String>| text.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let status: String = row.try_get(6)?;
    let mode: String = row.try_get(5)?;
    let usage: Option<String> = row.try_get(12)?;
    Ok(Task {
        payload: parse(sealed(7, place::PAYLOAD)?).unwrap_or(Value::Null),
        result: parse(sealed(8, place::RESULT)?),
        error: sealed(9, place::ERROR)?.and_then(|t| serde_json::from_str::<TaskError>(&t).ok()),
        logs: sealed(10, place::LOGS)?.unwrap_or_default(),
        tenant: row.try_get(1)?,
        function_id: row.try_get(2)?,
        function: row.try_get(3)?,
        version: u32_of(row.try_get(4)?),
        mode: Mode::parse(&mode).unwrap_or(Mode::Async),
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
        logs_truncated: row.try_get(11)?,
        usage: usage.and_then(|t| serde_json::from_str::<TaskUsage>(&t).ok()),
        attempts: u32_of(row.try_get(13)?),
        created_at: row.try_get(14)?,
        started_at: row.try_get(15)?,
        finished_at: row.try_get(16)?,
        chain_run: row.try_get(17)?,
        task_id: id,
    })
}
