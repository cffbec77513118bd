//! The schema, as ordered migrations recorded in a `schema_version` table. A database written
//! before the table existed holds the first migrations' tables already: each migration is
//! written so that applying it again changes nothing. A database of a newer version than this
//! binary knows is refused, never written.

use rusqlite::{params, Connection, OptionalExtension};

use super::{alerts, anomalies, chains, rollups, sealed};
use crate::store::{Result, StoreError};

/// One step of the schema.
struct Migration {
    /// What it brings.
    what: &'static str,
    /// Its statements.
    sql: &'static str,
    /// Data it derives from what is there, after its statements.
    then: Option<fn(&Connection) -> rusqlite::Result<()>>,
}

/// The migrations, in order; the schema's version is how many have been applied.
const MIGRATIONS: &[Migration] = &[
    Migration {
        what: "functions, versions and tasks",
        sql: BASE,
        then: None,
    },
    Migration {
        what: "rollups of finished calls, counted from the tasks already stored",
        sql: rollups::SCHEMA,
        then: Some(|c| rollups::backfill(c).map(|_| ())),
    },
    Migration {
        what: "an index of each function's tasks by age, so its recent tasks are read without sorting them all",
        sql: "CREATE INDEX IF NOT EXISTS tasks_recent ON tasks (function_id, created_at, id);",
        then: None,
    },
    Migration {
        what: "anomaly detection: saved detectors, scored minutes and events",
        sql: anomalies::SCHEMA,
        then: None,
    },
    Migration {
        what: "alerting: rules and their phases, subscriptions, the notification outbox",
        sql: alerts::SCHEMA,
        then: None,
    },
    Migration {
        what: "chaining: chains, their runs and steps, and each task's run",
        sql: chains::SCHEMA,
        then: Some(chains::add_task_column),
    },
    Migration {
        what: "encryption at rest: wrapped data keys, sealed code archives and secrets",
        sql: sealed::SCHEMA,
        then: None,
    },
    Migration {
        what: "idempotency keys of submissions",
        sql: super::keys::SCHEMA,
        then: None,
    },
];

/// The schema version this binary writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

const BASE: &str = r#"
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

/// Brings the database up to [`VERSION`], in one transaction.
pub fn migrate(conn: &mut Connection) -> Result<i64> {
    let tx = conn.transaction()?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at INTEGER NOT NULL)",
    )?;
    let found: Option<i64> = tx
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .optional()?
        .flatten();
    let found = found.unwrap_or(0);
    if found > VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: VERSION,
        });
    }
    for (i, m) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.execute_batch(m.sql)?;
        if let Some(then) = m.then {
            then(&tx)?;
        }
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            params![version, crate::model::now_ms()],
        )?;
        tracing::info!(version, what = m.what, "database schema migrated");
    }
    tx.commit()?;
    Ok(VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_in_order_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("db")).unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), VERSION);
        assert_eq!(migrate(&mut conn).unwrap(), VERSION);
        let applied: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, VERSION, "each migration recorded once");

        // A database from before the version table: its tables are there, the table is not.
        let old = dir.path().join("old");
        let mut conn = Connection::open(&old).unwrap();
        conn.execute_batch(BASE).unwrap();
        conn.execute_batch(rollups::SCHEMA).unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), VERSION);

        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
            params![VERSION + 1],
        )
        .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::NewerSchema { found, known }) if found == VERSION + 1 && known == VERSION
        ));
    }
}
