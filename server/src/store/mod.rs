//! Storage of functions, versions and tasks.
//!
//! [`Store`] is the seam where another database (PostgreSQL, for several nodes) plugs in;
//! [`SqliteStore`] is the embedded one: one file, WAL, every write in a transaction, so a
//! task is on disk before its 202 is sent and survives `kill -9`. Writes of tasks come in
//! batches ([`Write`], [`Recorder`]) so that many calls share one commit, and the WAL is
//! checkpointed by a thread of its own, off the calls' path.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, ToSql};
use serde_json::Value;

use crate::rollup::Call;

mod recorder;
mod rollups;

pub use recorder::Recorder;
pub use rollups::Rollup;

use crate::model::{now_ms, Completion, Function, Task, TaskError, TaskStatus, TaskUsage, Version};

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("the database failed")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored JSON column is unreadable.
    #[error("a stored record is corrupt")]
    Corrupt(#[from] serde_json::Error),
    /// Two deploys raced for the same version.
    #[error("another deploy of this function finished first; retry")]
    Conflict,
    /// The store cannot take writes now (the recorder stopped).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A `Result` with [`StoreError`].
pub type Result<T> = std::result::Result<T, StoreError>;

/// What the crash recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Tasks that were running and are now failed with reason `interrupted`.
    pub interrupted: Vec<String>,
    /// Tasks that were running and were put back in the queue (their function allows retries).
    pub requeued: Vec<String>,
}

/// One change to the tasks; [`Store::write`] applies several in one transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new task, as it is (queued, for the queue).
    Insert(Task),
    /// How a stored task ended, as of `at` (Unix ms).
    Complete {
        task_id: String,
        completion: Completion,
        at: i64,
    },
    /// A task stored only once it has ended (a sync call): `task` as it started, and its end.
    Finished {
        task: Box<Task>,
        completion: Completion,
        at: i64,
    },
}

impl Write {
    /// The task written.
    pub fn task_id(&self) -> &str {
        match self {
            Write::Insert(task) => &task.task_id,
            Write::Finished { task, .. } => &task.task_id,
            Write::Complete { task_id, .. } => task_id,
        }
    }
}

/// Where functions, versions and tasks are kept. `tenant: None` means an admin, who sees all.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The function `key` (an id or a name) as `tenant` sees it.
    fn function(&self, tenant: Option<&str>, key: &str) -> Result<Option<Function>>;
    /// Every function `tenant` sees, by name.
    fn functions(&self, tenant: Option<&str>) -> Result<Vec<Function>>;
    /// The id and next version number for `name` (a new id when the name is new).
    fn next_version(&self, tenant: &str, name: &str) -> Result<(String, u32)>;
    /// Stores a version (and the function, when new) and makes it the newest.
    fn add_version(
        &self,
        tenant: &str,
        function_id: &str,
        name: &str,
        version: &Version,
    ) -> Result<Function>;
    /// One version of a function.
    fn version(&self, function_id: &str, version: u32) -> Result<Option<Version>>;
    /// Every version of a function, oldest first.
    fn versions(&self, function_id: &str) -> Result<Vec<Version>>;
    /// Activates or deactivates.
    fn set_active(&self, function_id: &str, active: bool) -> Result<()>;
    /// Deletes a function and its versions; returns the versions (their code is the caller's).
    fn delete_function(&self, function_id: &str) -> Result<Vec<Version>>;
    /// Applies `writes` in order, in one transaction: all of them or none. A finished task
    /// is added to its rollups once, however often its end is stored.
    fn write(&self, writes: &[Write]) -> Result<()>;
    /// Stores a new task.
    fn insert_task(&self, task: &Task) -> Result<()> {
        self.write(&[Write::Insert(task.clone())])
    }
    /// Stores how a task ended.
    fn complete_task(&self, task_id: &str, completion: &Completion) -> Result<()> {
        self.write(&[Write::Complete {
            task_id: task_id.into(),
            completion: completion.clone(),
            at: now_ms(),
        }])
    }
    /// Takes the oldest runnable queued task and marks it running.
    fn claim_next(&self) -> Result<Option<Task>>;
    /// A task as `tenant` sees it.
    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>>;
    /// Recent tasks of a function, newest first.
    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>>;
    /// Tasks waiting in the queue.
    fn queue_depth(&self) -> Result<u64>;
    /// Tasks running now.
    fn running(&self) -> Result<u64>;
    /// After a crash: running tasks are requeued where `retries_left` says so, else failed.
    fn recover(
        &self,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery>;
    /// Finished calls of a function (or all of `tenant`'s) in `[since, until)`, oldest first.
    fn calls(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<Call>>;
    /// Removes finished tasks older than `before` (their rollups stay); returns how many.
    fn prune(&self, before: i64) -> Result<u64>;
    /// Rollups of `resolution` (see [`crate::rollup::RESOLUTIONS`]) whose bucket starts in
    /// `[since, until)`, of a function (or all of `tenant`'s), ordered by start.
    fn rollups(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        resolution: i64,
        since: i64,
        until: i64,
    ) -> Result<Vec<Rollup>>;
    /// Removes rollups of `resolution` older than `before`; returns how many rows.
    fn prune_rollups(&self, resolution: i64, before: i64) -> Result<u64>;
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS functions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE INDEX IF NOT EXISTS functions_name ON functions (name);
CREATE TABLE IF NOT EXISTS versions (
    function_id TEXT NOT NULL REFERENCES functions(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    settings TEXT NOT NULL,
    code_dir TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (function_id, version)
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    function_id TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,
    result TEXT,
    error TEXT,
    error_kind TEXT,
    logs TEXT NOT NULL DEFAULT '',
    logs_truncated INTEGER NOT NULL DEFAULT 0,
    usage TEXT,
    duration_ms REAL,
    cpu_ms REAL,
    peak_memory_bytes INTEGER,
    cold INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
);
-- Only the tasks waiting to run, in the order they are claimed: the oldest due task is found
-- without sorting the backlog, and a finished call is never written into it.
CREATE INDEX IF NOT EXISTS tasks_queued ON tasks (created_at, id, not_before) WHERE status = 'queued';
-- Only the running tasks, for the health counts and crash recovery.
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (status) WHERE status = 'running';
DROP INDEX IF EXISTS tasks_queue;
CREATE INDEX IF NOT EXISTS tasks_function ON tasks (function_id, finished_at);
"#;

/// The oldest queued task that is due at `?1`: first come, first served, except that a task
/// held back by its retry backoff lets younger ones pass.
const CLAIM: &str = "SELECT id FROM tasks WHERE status = 'queued' AND not_before <= ?1 ORDER BY created_at, id LIMIT 1";

/// How many tasks are running now.
const RUNNING: &str = "SELECT COUNT(*) FROM tasks WHERE status = 'running'";

/// The embedded SQLite store: one connection writes, another reads (WAL lets reads go on
/// during a commit), and a third checkpoints the WAL in the background.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// Dropped with the store, which stops the checkpointer.
    _checkpointer: Checkpointer,
}

/// How often the WAL is copied back into the database, off the writers' path.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = connect(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(rollups::SCHEMA)?;
        let tx = conn.unchecked_transaction()?;
        rollups::backfill(&tx)?;
        tx.commit()?;
        // A commit never waits for a checkpoint (and its fsync); the checkpointer does them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // Once checkpointed, the WAL file is cut back to this size.
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: Mutex::new(connect(path)?),
            _checkpointer: Checkpointer::start(connect(path)?),
        })
    }

    /// Stores how a task ended, as of `at` (Unix ms), and adds it to its rollups, once.
    pub fn complete_task_at(&self, task_id: &str, c: &Completion, at: i64) -> Result<()> {
        self.write(&[Write::Complete {
            task_id: task_id.into(),
            completion: c.clone(),
            at,
        }])
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    fn reader(&self) -> std::sync::MutexGuard<'_, Connection> {
        lock(&self.reader)
    }
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A thread that checkpoints the WAL every [`CHECKPOINT_EVERY`] until dropped.
#[derive(Debug)]
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(conn: Connection) -> Checkpointer {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cloudfunc-checkpoint".into())
            .spawn(move || loop {
                // PASSIVE copies what it can without waiting for readers or the writer.
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    eprintln!("cloudfunc: WAL checkpoint failed: {e}");
                }
                match stopped.recv_timeout(CHECKPOINT_EVERY) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            })
            .ok();
        Checkpointer {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Adds a new task.
fn insert(tx: &Connection, task: &Task) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO tasks (id, tenant, function_id, function, version, mode, status, payload, attempts, created_at, started_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        task.task_id,
        task.tenant,
        task.function_id,
        task.function,
        task.version,
        task.mode,
        task.status.as_str(),
        serde_json::to_string(&task.payload)?,
        task.attempts,
        task.created_at,
        task.started_at
    ])?;
    Ok(())
}

/// The columns of a task's ending, in [`Ending::values`]'s order.
const ENDING_COLS: &str =
    "status, result, error, error_kind, logs, logs_truncated, usage, duration_ms,
     cpu_ms, peak_memory_bytes, cold, finished_at";

/// The `SET` of a task's ending; `?1` is its id.
const SET_ENDING: &str = "UPDATE tasks SET status = ?2, result = ?3, error = ?4, error_kind = ?5, logs = ?6,
     logs_truncated = ?7, usage = ?8, duration_ms = ?9, cpu_ms = ?10, peak_memory_bytes = ?11, cold = ?12,
     finished_at = ?13 WHERE id = ?1";

/// A task's ending as column values.
struct Ending<'a> {
    status: &'static str,
    result: Option<String>,
    error: Option<String>,
    error_kind: Option<String>,
    logs: &'a str,
    logs_truncated: bool,
    usage: Option<String>,
    duration_ms: Option<f64>,
    cpu_ms: Option<f64>,
    peak_memory_bytes: Option<i64>,
    cold: Option<bool>,
    finished_at: i64,
}

impl<'a> Ending<'a> {
    fn of(c: &'a Completion, finished_at: i64) -> Result<Ending<'a>> {
        let usage = c.usage.as_ref();
        Ok(Ending {
            status: c.status.as_str(),
            result: c.result.as_ref().map(serde_json::to_string).transpose()?,
            error: c.error.as_ref().map(serde_json::to_string).transpose()?,
            error_kind: c.error.as_ref().map(|e| e.kind.clone()),
            logs: &c.logs,
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
fn finished(
    tx: &Connection,
    task: &Task,
    c: &Completion,
    at: i64,
    rollups: &mut rollups::Pending,
) -> Result<()> {
    let e = Ending::of(c, at)?;
    let payload = serde_json::to_string(&task.payload)?;
    let opening: [&dyn ToSql; 10] = [
        &task.task_id,
        &task.tenant,
        &task.function_id,
        &task.function,
        &task.version,
        &task.mode,
        &payload,
        &task.attempts,
        &task.created_at,
        &task.started_at,
    ];
    tx.prepare_cached(&format!(
        "INSERT INTO tasks (id, tenant, function_id, function, version, mode, payload, attempts, created_at,
             started_at, {ENDING_COLS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
    ))?
    .execute(params_from_iter(opening.into_iter().chain(e.values())))?;
    let call = ended_call(c, at);
    rollups.add(&task.tenant, &task.function_id, &task.function, &call);
    Ok(())
}

/// Stores how a task ended; adds it to the rollups to be written only if it was still open.
fn complete(
    tx: &Connection,
    task_id: &str,
    c: &Completion,
    at: i64,
    rollups: &mut rollups::Pending,
) -> Result<()> {
    let e = Ending::of(c, at)?;
    let id: [&dyn ToSql; 1] = [&task_id];
    let values = || params_from_iter(id.into_iter().chain(e.values()));
    let opened: Option<(String, String, String, Call)> = tx
        .prepare_cached(&format!(
            "{SET_ENDING} AND finished_at IS NULL RETURNING tenant, function_id, function, {CALL_COLS}"
        ))?
        .query_row(values(), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, call_row(r, 3)?))
        })
        .optional()?;
    match opened {
        Some((tenant, function_id, function, call)) => {
            rollups.add(&tenant, &function_id, &function, &call);
        }
        // Already finished (its end stored again): the row takes the new ending, and the
        // rollups keep counting the task once.
        None => {
            tx.prepare_cached(SET_ENDING)?.execute(values())?;
        }
    }
    Ok(())
}

/// A uniqueness violation means a concurrent deploy took the same name or version.
fn conflict(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict
        }
        e => e.into(),
    }
}

const FUNCTION_COLS: &str = "id, tenant, name, version, active, created_at, updated_at";

fn function_row(row: &Row<'_>) -> rusqlite::Result<Function> {
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
const CALL_COLS: &str = "CASE WHEN status = 'succeeded' THEN 'succeeded' ELSE COALESCE(error_kind, status) END,
    finished_at, usage IS NOT NULL, COALESCE(cold, 0), COALESCE(duration_ms, 0),
    COALESCE(json_extract(usage, '$.init_duration_ms'), 0), COALESCE(cpu_ms, 0), COALESCE(peak_memory_bytes, 0)";

/// What [`CALL_COLS`] reads from a stored ending, from the ending itself.
fn ended_call(c: &Completion, at: i64) -> Call {
    let usage = c.usage.as_ref();
    let outcome = match (c.status, &c.error) {
        (TaskStatus::Succeeded, _) => "succeeded".to_string(),
        (_, Some(e)) => e.kind.clone(),
        (status, None) => status.as_str().to_string(),
    };
    Call {
        outcome,
        at,
        timed: usage.is_some(),
        cold: usage.is_some_and(|u| u.cold),
        duration_ms: usage.map_or(0.0, |u| u.duration_ms),
        init_ms: usage.map_or(0.0, |u| u.init_duration_ms),
        cpu_ms: usage.map_or(0.0, |u| u.cpu_ms),
        // As stored: the column is a signed integer.
        peak_memory_bytes: usage.map_or(0, |u| u.peak_memory_bytes.min(i64::MAX as u64)),
    }
}

fn call_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Call> {
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

const TASK_COLS: &str = "id, tenant, function_id, function, version, mode, status, payload, result, error, logs, logs_truncated, usage, attempts, created_at, started_at, finished_at";

fn task_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    let json = |i: usize| -> rusqlite::Result<Option<String>> { row.get(i) };
    let parse = |text: Option<String>| text.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let status: String = row.get(6)?;
    Ok(Task {
        task_id: row.get(0)?,
        tenant: row.get(1)?,
        function_id: row.get(2)?,
        function: row.get(3)?,
        version: row.get(4)?,
        mode: row.get(5)?,
        status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
        payload: parse(json(7)?).unwrap_or(Value::Null),
        result: parse(json(8)?),
        error: json(9)?.and_then(|t| serde_json::from_str::<TaskError>(&t).ok()),
        logs: row.get(10)?,
        logs_truncated: row.get(11)?,
        usage: json(12)?.and_then(|t| serde_json::from_str::<TaskUsage>(&t).ok()),
        attempts: row.get(13)?,
        created_at: row.get(14)?,
        started_at: row.get(15)?,
        finished_at: row.get(16)?,
    })
}

impl Store for SqliteStore {
    fn function(&self, tenant: Option<&str>, key: &str) -> Result<Option<Function>> {
        // An id wins over a name, should one tenant's name equal another function's id. Each
        // lookup is by an index (the primary key, then `UNIQUE (tenant, name)` or `functions_name`).
        let conn = self.reader();
        for by in ["id", "name"] {
            let found = conn
                .prepare_cached(&format!(
                    "SELECT {FUNCTION_COLS} FROM functions WHERE {by} = ?2 AND (?1 IS NULL OR tenant = ?1)
                     ORDER BY tenant LIMIT 1"
                ))?
                .query_row(params![tenant, key], function_row)
                .optional()?;
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    fn functions(&self, tenant: Option<&str>) -> Result<Vec<Function>> {
        let sql = format!("SELECT {FUNCTION_COLS} FROM functions WHERE (?1 IS NULL OR tenant = ?1) ORDER BY name, tenant");
        let conn = self.reader();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![tenant], function_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn next_version(&self, tenant: &str, name: &str) -> Result<(String, u32)> {
        let conn = self.conn();
        let found: Option<(String, u32)> = conn
            .query_row(
                "SELECT f.id, COALESCE((SELECT MAX(version) FROM versions WHERE function_id = f.id), 0) FROM functions f WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match found {
            Some((id, v)) => (id, v + 1),
            None => (crate::model::new_id("fn"), 1),
        })
    }

    fn add_version(
        &self,
        tenant: &str,
        function_id: &str,
        name: &str,
        version: &Version,
    ) -> Result<Function> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO functions (id, tenant, name, version, active, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            params![function_id, tenant, name, version.version, now],
        )
        .map_err(conflict)?;
        let settings = serde_json::to_string(version)?;
        tx.execute(
            "INSERT INTO versions (function_id, version, settings, code_dir, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![function_id, version.version, settings, version.code_dir, version.created_at],
        )
        .map_err(conflict)?;
        let function = tx.query_row(
            &format!("SELECT {FUNCTION_COLS} FROM functions WHERE id = ?1"),
            params![function_id],
            function_row,
        )?;
        tx.commit()?;
        Ok(function)
    }

    fn version(&self, function_id: &str, version: u32) -> Result<Option<Version>> {
        let row: Option<(String, String)> = self
            .reader()
            .prepare_cached(
                "SELECT settings, code_dir FROM versions WHERE function_id = ?1 AND version = ?2",
            )?
            .query_row(params![function_id, version], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        row.map(|(settings, code_dir)| {
            let mut v: Version = serde_json::from_str(&settings)?;
            v.code_dir = code_dir;
            Ok(v)
        })
        .transpose()
    }

    fn versions(&self, function_id: &str) -> Result<Vec<Version>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT settings, code_dir FROM versions WHERE function_id = ?1 ORDER BY version",
        )?;
        let rows: Vec<(String, String)> = stmt
            .query_map(params![function_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter()
            .map(|(settings, code_dir)| {
                let mut v: Version = serde_json::from_str(&settings)?;
                v.code_dir = code_dir;
                Ok(v)
            })
            .collect()
    }

    fn set_active(&self, function_id: &str, active: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE functions SET active = ?2, updated_at = ?3 WHERE id = ?1",
            params![function_id, active, now_ms()],
        )?;
        Ok(())
    }

    fn delete_function(&self, function_id: &str) -> Result<Vec<Version>> {
        let versions = self.versions(function_id)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM versions WHERE function_id = ?1",
            params![function_id],
        )?;
        tx.execute("DELETE FROM functions WHERE id = ?1", params![function_id])?;
        tx.commit()?;
        Ok(versions)
    }

    fn write(&self, writes: &[Write]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // The calls' rollups, added up over the batch and written once per row.
        let mut ended = rollups::Pending::default();
        for w in writes {
            match w {
                Write::Insert(task) => insert(&tx, task)?,
                Write::Complete {
                    task_id,
                    completion,
                    at,
                } => complete(&tx, task_id, completion, *at, &mut ended)?,
                Write::Finished {
                    task,
                    completion,
                    at,
                } => finished(&tx, task, completion, *at, &mut ended)?,
            }
        }
        ended.flush(&tx)?;
        tx.commit()?;
        Ok(())
    }

    fn claim_next(&self) -> Result<Option<Task>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        let id: Option<String> = tx
            .prepare_cached(CLAIM)?
            .query_row(params![now], |r| r.get(0))
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        tx.prepare_cached(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = ?2 WHERE id = ?1",
        )?
        .execute(params![id, now])?;
        let task = tx
            .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
            .query_row(params![id], task_row)?;
        tx.commit()?;
        Ok(Some(task))
    }

    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>> {
        let sql =
            format!("SELECT {TASK_COLS} FROM tasks WHERE (?1 IS NULL OR tenant = ?1) AND id = ?2");
        Ok(self
            .reader()
            .prepare_cached(&sql)?
            .query_row(params![tenant, task_id], task_row)
            .optional()?)
    }

    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE function_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![function_id, limit], task_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn queue_depth(&self) -> Result<u64> {
        Ok(self.reader().query_row(
            "SELECT COUNT(*) FROM tasks WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }

    fn running(&self) -> Result<u64> {
        Ok(self.reader().query_row(RUNNING, [], |r| r.get(0))?)
    }

    fn recover(
        &self,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        let running: Vec<Task> = {
            let conn = self.conn();
            let mut stmt = conn.prepare(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE status = 'running'"
            ))?;
            let rows = stmt.query_map([], task_row)?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut report = Recovery::default();
        for task in running {
            if task.mode == "async" && retries_left(&task) {
                self.conn().execute(
                    "UPDATE tasks SET status = 'queued', not_before = ?2 WHERE id = ?1",
                    params![task.task_id, now_ms() + backoff_ms(task.attempts)],
                )?;
                report.requeued.push(task.task_id);
            } else {
                let completion = Completion {
                    status: TaskStatus::Failed,
                    result: None,
                    error: Some(TaskError {
                        kind: "interrupted".into(),
                        error_type: String::new(),
                        message: "the server stopped while this task was running; it was not retried (at most once)".into(),
                        traceback: String::new(),
                    }),
                    logs: String::new(),
                    logs_truncated: false,
                    usage: None,
                };
                self.complete_task(&task.task_id, &completion)?;
                report.interrupted.push(task.task_id);
            }
        }
        Ok(report)
    }

    fn calls(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<Call>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(&format!(
            "SELECT {CALL_COLS} FROM tasks
             WHERE finished_at >= ?1 AND finished_at < ?2 AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR function_id = ?4)
             ORDER BY finished_at"
        ))?;
        let rows = stmt.query_map(params![since, until, tenant, function_id], |r| {
            call_row(r, 0)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn prune(&self, before: i64) -> Result<u64> {
        let n = self.conn().execute(
            "DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?1",
            params![before],
        )?;
        Ok(n as u64)
    }

    fn rollups(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        resolution: i64,
        since: i64,
        until: i64,
    ) -> Result<Vec<Rollup>> {
        Ok(rollups::read(
            &self.reader(),
            tenant,
            function_id,
            resolution,
            since,
            until,
        )?)
    }

    fn prune_rollups(&self, resolution: i64, before: i64) -> Result<u64> {
        Ok(rollups::prune(&self.conn(), resolution, before)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Isolation;

    pub(crate) fn version(n: u32) -> Version {
        Version {
            version: n,
            runtime: "python".into(),
            handler: None,
            timeout_ms: 1000,
            memory_mb: 128,
            cpu_millicores: 1000,
            env: Default::default(),
            max_retries: 0,
            isolation: Isolation::Container,
            keep_warm_s: 60,
            min_instances: 0,
            max_instances: 8,
            code_dir: format!("/code/{n}"),
            created_at: now_ms(),
        }
    }

    /// A store in a temporary directory holding alice's `hello` at version 1.
    pub(crate) fn alice_hello() -> (tempfile::TempDir, SqliteStore, Function) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let (id, n) = store.next_version("alice", "hello").unwrap();
        let f = store
            .add_version("alice", &id, "hello", &version(n))
            .unwrap();
        (dir, store, f)
    }

    pub(super) fn task(tenant: &str, f: &Function, mode: &str) -> Task {
        let mut task = Task::queued(f, f.version, mode, serde_json::json!({"x": 1}));
        task.tenant = tenant.into();
        task
    }

    #[test]
    fn versions_tenants_and_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let (id, v) = store.next_version("alice", "hello").unwrap();
        assert_eq!(v, 1);
        store
            .add_version("alice", &id, "hello", &version(1))
            .unwrap();
        let (id2, v2) = store.next_version("alice", "hello").unwrap();
        assert_eq!((id2.as_str(), v2), (id.as_str(), 2));
        let f = store
            .add_version("alice", &id, "hello", &version(2))
            .unwrap();
        assert_eq!(f.version, 2);
        assert!(matches!(
            store.add_version("alice", &id, "hello", &version(2)),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.versions(&id).unwrap().len(), 2);
        assert_eq!(store.version(&id, 1).unwrap().unwrap().code_dir, "/code/1");

        // Tenants see only their own; an admin sees all.
        assert!(store.function(Some("alice"), "hello").unwrap().is_some());
        assert!(store.function(Some("alice"), &id).unwrap().is_some());
        assert!(store.function(Some("bob"), "hello").unwrap().is_none());
        assert!(store.function(Some("bob"), &id).unwrap().is_none());
        assert!(store.function(None, &id).unwrap().is_some());
        assert_eq!(store.functions(Some("bob")).unwrap().len(), 0);

        let a = task("alice", &f, "async");
        let b = task("alice", &f, "async");
        store.insert_task(&a).unwrap();
        store.insert_task(&b).unwrap();
        assert_eq!(store.queue_depth().unwrap(), 2);
        let claimed = store.claim_next().unwrap().unwrap();
        assert_eq!(claimed.status, TaskStatus::Running);
        assert_eq!(claimed.attempts, 1);
        assert!(store.task(Some("bob"), &claimed.task_id).unwrap().is_none());

        // A crash now: the running one is interrupted, the queued one stays queued.
        let report = store.recover(&|_| false, &|_| 0).unwrap();
        assert_eq!(report.interrupted, vec![claimed.task_id.clone()]);
        let t = store
            .task(Some("alice"), &claimed.task_id)
            .unwrap()
            .unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.error.unwrap().kind, "interrupted");
        assert_eq!(store.queue_depth().unwrap(), 1);

        let other = store.claim_next().unwrap().unwrap();
        assert_ne!(other.task_id, claimed.task_id);
        let report = store.recover(&|_| true, &|_| 60_000).unwrap();
        assert_eq!(report.requeued, vec![other.task_id.clone()]);
        assert!(
            store.claim_next().unwrap().is_none(),
            "backoff holds it back"
        );
    }

    #[test]
    fn the_oldest_due_task_is_claimed_first_and_the_backlog_is_never_sorted() {
        let (_dir, store, f) = alice_hello();
        let tasks: Vec<Task> = (0..3)
            .map(|i| {
                let mut t = task("alice", &f, "async");
                t.created_at = 1_000 + i;
                t
            })
            .collect();
        for t in tasks.iter().rev() {
            store.insert_task(t).unwrap();
        }
        // The oldest waits out a retry backoff; the younger ones pass it, oldest first.
        store
            .conn()
            .execute(
                "UPDATE tasks SET not_before = ?2 WHERE id = ?1",
                params![tasks[0].task_id, now_ms() + 60_000],
            )
            .unwrap();
        let claimed = |store: &SqliteStore| store.claim_next().unwrap().map(|t| t.task_id);
        assert_eq!(claimed(&store).as_ref(), Some(&tasks[1].task_id));
        assert_eq!(claimed(&store).as_ref(), Some(&tasks[2].task_id));
        assert_eq!(claimed(&store), None);

        // A claim reads the queue in index order: its cost does not grow with the backlog,
        // and the index holds queued tasks only. Counting running tasks reads no ended ones.
        let conn = store.conn();
        let plan = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let steps: Vec<String> = stmt
                .query_map(args, |r| r.get(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            steps.join("; ")
        };
        let claim = plan(CLAIM, &[&0]);
        assert!(
            claim.contains("INDEX tasks_queued") && !claim.contains("TEMP B-TREE"),
            "the claim sorts the queue: {claim}"
        );
        let running = plan(RUNNING, &[]);
        assert!(
            running.contains("INDEX tasks_running"),
            "counting running tasks scans them all: {running}"
        );
    }

    #[test]
    fn an_ended_task_reads_back_the_same_whichever_way_it_was_stored() {
        let (_dir, store, f) = alice_hello();
        let ending = Completion {
            status: TaskStatus::Failed,
            result: None,
            error: Some(TaskError {
                kind: "raised".into(),
                error_type: "ValueError".into(),
                message: "no".into(),
                traceback: "line 1".into(),
            }),
            logs: "printed\n".into(),
            logs_truncated: true,
            usage: Some(TaskUsage {
                duration_ms: 1.5,
                init_duration_ms: 0.25,
                cpu_ms: 0.75,
                peak_memory_bytes: 3 << 20,
                cold: true,
                ..TaskUsage::default()
            }),
        };
        let mut started = task("alice", &f, "sync");
        started.status = TaskStatus::Running;
        started.attempts = 1;
        started.started_at = Some(started.created_at);
        let mut once = started.clone();
        once.task_id = format!("{}_once", started.task_id);
        let at = started.created_at + 2;

        store.insert_task(&started).unwrap();
        store
            .complete_task_at(&started.task_id, &ending, at)
            .unwrap();
        store
            .write(&[Write::Finished {
                task: Box::new(once.clone()),
                completion: ending.clone(),
                at,
            }])
            .unwrap();

        let two_steps = store.task(None, &started.task_id).unwrap().unwrap();
        let one_step = store.task(None, &once.task_id).unwrap().unwrap();
        assert_eq!(one_step.finished_at, Some(at));
        assert_eq!(
            serde_json::to_value(Task {
                task_id: once.task_id.clone(),
                ..two_steps
            })
            .unwrap(),
            serde_json::to_value(&one_step).unwrap()
        );
        assert_eq!(one_step.attempts, 1);
        let calls = store.calls(None, Some(&f.id), 0, i64::MAX).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], calls[1]);
        assert_eq!(calls[0], ended_call(&ending, at));
    }
}
