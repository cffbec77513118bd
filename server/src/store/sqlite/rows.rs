//! Records as rows: the columns of functions, versions and tasks, and how a task's start and
//! end are written.

use rusqlite::{params, params_from_iter, Connection, Row, ToSql};
use serde_json::Value;

use super::sealed::{opened, Seal};
use crate::atrest::Sealer;
use crate::model::{Completion, Function, Mode, Task, TaskError, TaskStatus, TaskUsage};
use crate::rollup::Call;
use crate::store::records::{ended_call, place, Pending};
use crate::store::{Result, StoreError};

/// Adds a new task.
pub(super) fn insert(tx: &Connection, task: &Task, seal: Seal<'_>) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO tasks (id, tenant, function_id, function, version, mode, status, payload, attempts, created_at, started_at, chain_run)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        task.task_id,
        task.tenant,
        task.function_id,
        task.function,
        task.version,
        task.mode.as_str(),
        task.status.as_str(),
        seal.text(place::PAYLOAD, &task.task_id, serde_json::to_string(&task.payload)?),
        task.attempts,
        task.created_at,
        task.started_at,
        task.chain_run
    ])?;
    Ok(())
}

/// The columns of a task's ending, in [`Ending::values`]'s order.
pub(super) const ENDING_COLS: &str =
    "status, result, error, error_kind, logs, logs_truncated, usage, duration_ms,
     cpu_ms, peak_memory_bytes, cold, finished_at";

/// The `SET` of a task's ending; `?1` is its id.
pub(super) const SET_ENDING: &str = "UPDATE tasks SET status = ?2, result = ?3, error = ?4, error_kind = ?5, logs = ?6,
     logs_truncated = ?7, usage = ?8, duration_ms = ?9, cpu_ms = ?10, peak_memory_bytes = ?11, cold = ?12,
     finished_at = ?13 WHERE id = ?1";

/// A task's ending as column values.
struct Ending {
    status: &'static str,
    result: rusqlite::types::Value,
    error: rusqlite::types::Value,
    error_kind: Option<&'static str>,
    logs: rusqlite::types::Value,
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
        let logs = if c.logs.is_empty() {
            rusqlite::types::Value::Text(String::new())
        } else {
            seal.text(place::LOGS, id, c.logs.as_str())
        };
        Ok(Ending {
            status: c.status.as_str(),
            result: seal.opt(
                place::RESULT,
                id,
                c.result.as_ref().map(serde_json::to_string).transpose()?,
            ),
            error: seal.opt(
                place::ERROR,
                id,
                c.error.as_ref().map(serde_json::to_string).transpose()?,
            ),
            error_kind: c.error.as_ref().map(|e| e.kind.as_str()),
            logs,
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

    /// The values of [`ENDING_COLS`] (and of `SET_ENDING`'s `?2` to `?13`), in order.
    fn values(&self) -> [&dyn ToSql; 12] {
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

/// Stores a task that has already ended (a sync call) in one insert, and adds it to the
/// rollups to be written.
pub(super) fn finished(
    tx: &Connection,
    task: &Task,
    c: &Completion,
    at: i64,
    rollups: &mut Pending,
    seal: Seal<'_>,
) -> Result<()> {
    let e = Ending::of(c, at, &task.task_id, seal)?;
    let payload = seal.text(
        place::PAYLOAD,
        &task.task_id,
        serde_json::to_string(&task.payload)?,
    );
    let opening: [&dyn ToSql; 11] = [
        &task.task_id,
        &task.tenant,
        &task.function_id,
        &task.function,
        &task.version,
        &task.mode.as_str(),
        &payload,
        &task.attempts,
        &task.created_at,
        &task.started_at,
        &task.chain_run,
    ];
    tx.prepare_cached(&format!(
        "INSERT INTO tasks (id, tenant, function_id, function, version, mode, payload, attempts, created_at,
             started_at, chain_run, {ENDING_COLS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)"
    ))?
    .execute(params_from_iter(opening.into_iter().chain(e.values())))?;
    let call = ended_call(c, at);
    rollups.add(&task.tenant, &task.function_id, &task.function, &call);
    Ok(())
}

/// Stores how a task ended; adds it to the rollups to be written only if it was still open.
pub(super) fn complete(
    tx: &Connection,
    task_id: &str,
    c: &Completion,
    at: i64,
    rollups: &mut Pending,
    seal: Seal<'_>,
) -> Result<()> {
    let e = Ending::of(c, at, task_id, seal)?;
    let id: [&dyn ToSql; 1] = [&task_id];
    let values = || params_from_iter(id.into_iter().chain(e.values()));
    // No `RETURNING`: SQLite gathers a statement's returned rows in a temporary table of its
    // own, made and dropped at each run, which cost more than reading the row again by key.
    let opened = tx
        .prepare_cached(&format!("{SET_ENDING} AND finished_at IS NULL"))?
        .execute(values())?;
    if opened == 1 {
        let (tenant, function_id, function): (String, String, String) = tx
            .prepare_cached("SELECT tenant, function_id, function FROM tasks WHERE id = ?1")?
            .query_row([task_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rollups.add(&tenant, &function_id, &function, &ended_call(c, at));
    } else {
        // Already finished (its end stored again): the row takes the new ending, and the
        // rollups keep counting the task once.
        tx.prepare_cached(SET_ENDING)?.execute(values())?;
    }
    Ok(())
}

/// A uniqueness violation means a concurrent deploy took the same name or version.
pub(super) fn conflict(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict
        }
        e => e.into(),
    }
}

pub(super) const FUNCTION_COLS: &str = "id, tenant, name, version, active, created_at, updated_at";

pub(super) fn function_row(row: &Row<'_>) -> rusqlite::Result<Function> {
    Ok(Function {
        id: row.get(0)?,
        tenant: row.get(1)?,
        name: row.get(2)?,
        version: row.get(3)?,
        active: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
    })
}

/// A finished task as a rollup call; read by [`call_row`].
pub(super) const CALL_COLS: &str = "CASE WHEN status = 'succeeded' THEN 'succeeded' ELSE COALESCE(error_kind, status) END,
    finished_at, usage IS NOT NULL, COALESCE(cold, 0), COALESCE(duration_ms, 0),
    COALESCE(json_extract(usage, '$.init_duration_ms'), 0), COALESCE(cpu_ms, 0), COALESCE(peak_memory_bytes, 0)";

pub(super) fn call_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Call> {
    let peak: i64 = row.get(first + 7)?;
    Ok(Call {
        outcome: row.get(first)?,
        at: row.get(first + 1)?,
        timed: row.get(first + 2)?,
        cold: row.get(first + 3)?,
        duration_ms: row.get(first + 4)?,
        init_ms: row.get(first + 5)?,
        cpu_ms: row.get(first + 6)?,
        peak_memory_bytes: u64::try_from(peak).unwrap_or(0),
    })
}

pub(super) const TASK_COLS: &str = "id, tenant, function_id, function, version, mode, status, payload, result, error, logs, logs_truncated, usage, attempts, created_at, started_at, finished_at, chain_run";

pub(super) fn task_row(sealer: &Sealer, row: &Row<'_>) -> rusqlite::Result<Task> {
    let id: String = row.get(0)?;
    let sealed = |i: usize, column: &'static str| {
        opened(sealer, row, i, column, &id, || format!("task {id}"))
    };
    let parse = |text: Option<String>| text.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let status: String = row.get(6)?;
    let mode: String = row.get(5)?;
    let usage: Option<String> = row.get(12)?;
    Ok(Task {
        payload: parse(sealed(7, place::PAYLOAD)?).unwrap_or(Value::Null),
        result: parse(sealed(8, place::RESULT)?),
        error: sealed(9, place::ERROR)?.and_then(|t| serde_json::from_str::<TaskError>(&t).ok()),
        logs: sealed(10, place::LOGS)?.unwrap_or_default(),
        tenant: row.get(1)?,
        function_id: row.get(2)?,
        function: row.get(3)?,
        version: row.get(4)?,
        mode: Mode::parse(&mode).unwrap_or(Mode::Async),
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
        logs_truncated: row.get(11)?,
        usage: usage.and_then(|t| serde_json::from_str::<TaskUsage>(&t).ok()),
        attempts: row.get(13)?,
        created_at: row.get(14)?,
        started_at: row.get(15)?,
        finished_at: row.get(16)?,
        chain_run: row.get(17)?,
        task_id: id,
    })
}
