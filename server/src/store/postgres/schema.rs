//! The PostgreSQL schema, as ordered migrations recorded in a `schema_version` table and
//! applied at start under an advisory lock, so that nodes starting together apply each once.
//! A database of a newer version than this binary knows is refused, never written.
//!
//! The tables are SQLite's, typed: tenant data in sealed columns is `BYTEA` (a sealed record,
//! or plaintext UTF-8 where sealing is off: the two never look alike), text that is sorted or
//! compared is `COLLATE "C"` (byte order, as in SQLite, whatever the database's locale).

use crate::model::now_ms;
use crate::store::{Result, StoreError};

use super::pool::Conn;

/// One step of the schema.
struct Migration {
    /// What it brings.
    what: &'static str,
    sql: &'static str,
}

/// The migrations, in order; the schema's version is how many have been applied.
const MIGRATIONS: &[Migration] = &[
    Migration {
        what: "functions, versions, tasks, rollups, anomaly detection, alerting, chaining, sealed code, secrets and keys",
        sql: BASE,
    },
    Migration {
        what: "several nodes: each node's row and heartbeat, and the node running each task",
        sql: NODES,
    },
    Migration {
        what: "the index of finished tasks holds finished tasks only",
        sql: FINISHED_ONLY,
    },
    Migration {
        what: "the index of a function's calls by end time holds finished tasks only",
        sql: FUNCTION_FINISHED_ONLY,
    },
    Migration {
        what: "idempotency keys of submissions",
        sql: super::keys::SCHEMA,
    },
];

/// The index of a function's calls by end time serves the calls of a time range (the only
/// read that uses it, `finished_at >= $1 AND finished_at < $2`): the entries of open tasks
/// were never read, and each submission and each claim wrote one.
const FUNCTION_FINISHED_ONLY: &str = r#"
DROP INDEX tasks_function;
CREATE INDEX tasks_function ON tasks (function_id, finished_at) WHERE finished_at IS NOT NULL;
"#;

/// Queued and running tasks (`finished_at` NULL) left the index of finished tasks, which serves
/// the pruning and the calls of a time range: each submission and claim wrote an entry in it
/// for nothing, and plans of the endings' `UPDATE` (`... AND finished_at IS NULL`) could read
/// every open task through it instead of the few they end.
const FINISHED_ONLY: &str = r#"
DROP INDEX tasks_finished;
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
"#;

const NODES: &str = r#"
CREATE TABLE nodes (
    id TEXT COLLATE "C" PRIMARY KEY,
    address TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    version TEXT NOT NULL
);
ALTER TABLE tasks ADD COLUMN node TEXT COLLATE "C";
"#;

/// The schema version this binary writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock held while migrating (any number; this one spells "cfmg").
const MIGRATION_LOCK: i64 = 0x6366_6d67;

const BASE: &str = r#"
CREATE TABLE functions (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    active BOOLEAN NOT NULL DEFAULT true,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant, name)
);
CREATE INDEX functions_name ON functions (name);
CREATE TABLE versions (
    function_id TEXT COLLATE "C" NOT NULL REFERENCES functions(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    settings BYTEA NOT NULL,
    code_dir TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (function_id, version)
);
CREATE TABLE tasks (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    function_id TEXT COLLATE "C" NOT NULL,
    function TEXT NOT NULL,
    version BIGINT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    payload BYTEA NOT NULL,
    result BYTEA,
    error BYTEA,
    error_kind TEXT,
    logs BYTEA NOT NULL DEFAULT ''::bytea,
    logs_truncated BOOLEAN NOT NULL DEFAULT false,
    usage TEXT,
    duration_ms DOUBLE PRECISION,
    cpu_ms DOUBLE PRECISION,
    peak_memory_bytes BIGINT,
    cold BOOLEAN,
    attempts BIGINT NOT NULL DEFAULT 0,
    not_before BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    chain_run TEXT
);
-- Only the tasks waiting to run, in the order they are claimed.
CREATE INDEX tasks_queued ON tasks (created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_running ON tasks (status) WHERE status = 'running';
CREATE INDEX tasks_function ON tasks (function_id, finished_at);
CREATE INDEX tasks_recent ON tasks (function_id, created_at, id);
CREATE INDEX tasks_finished ON tasks (finished_at);

CREATE TABLE rollups (
    resolution BIGINT NOT NULL,
    function_id TEXT COLLATE "C" NOT NULL,
    outcome TEXT COLLATE "C" NOT NULL,
    start BIGINT NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    function TEXT NOT NULL,
    count BIGINT NOT NULL,
    timed BIGINT NOT NULL,
    cold BIGINT NOT NULL,
    duration_sum DOUBLE PRECISION NOT NULL,
    duration_max DOUBLE PRECISION NOT NULL,
    init_sum DOUBLE PRECISION NOT NULL,
    cpu_sum DOUBLE PRECISION NOT NULL,
    cpu_max DOUBLE PRECISION NOT NULL,
    memory_sum DOUBLE PRECISION NOT NULL,
    memory_max BIGINT NOT NULL,
    PRIMARY KEY (resolution, function_id, outcome, start)
);
CREATE INDEX rollups_time ON rollups (resolution, start);
CREATE TABLE rollup_bins (
    resolution BIGINT NOT NULL,
    function_id TEXT COLLATE "C" NOT NULL,
    outcome TEXT COLLATE "C" NOT NULL,
    start BIGINT NOT NULL,
    bin BIGINT NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (resolution, function_id, outcome, start, bin)
);
CREATE INDEX rollup_bins_time ON rollup_bins (resolution, start);

CREATE TABLE anomaly_series (
    function_id TEXT COLLATE "C" NOT NULL,
    series TEXT COLLATE "C" NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    function TEXT NOT NULL,
    detector BYTEA NOT NULL,
    rest TEXT NOT NULL,
    PRIMARY KEY (function_id, series)
);
CREATE TABLE anomaly_progress (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    through BIGINT NOT NULL
);
CREATE TABLE anomaly_scores (
    function_id TEXT COLLATE "C" NOT NULL,
    minute BIGINT NOT NULL,
    series TEXT COLLATE "C" NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (function_id, minute, series)
);
CREATE INDEX anomaly_scores_time ON anomaly_scores (minute);
CREATE TABLE anomaly_events (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    function_id TEXT COLLATE "C" NOT NULL,
    function TEXT NOT NULL,
    series TEXT NOT NULL,
    started BIGINT NOT NULL,
    ended BIGINT,
    peak_score DOUBLE PRECISION NOT NULL,
    peak_at BIGINT NOT NULL,
    points TEXT NOT NULL
);
CREATE INDEX anomaly_events_function ON anomaly_events (function_id, started);
CREATE INDEX anomaly_events_time ON anomaly_events (started);

CREATE TABLE alert_rules (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE alert_phases (
    rule_id TEXT COLLATE "C" NOT NULL,
    subject TEXT COLLATE "C" NOT NULL,
    phase TEXT NOT NULL,
    PRIMARY KEY (rule_id, subject)
);
CREATE TABLE subscriptions (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    secret TEXT NOT NULL,
    admin BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX subscriptions_tenant ON subscriptions (tenant);
CREATE TABLE notifications (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    body TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE TABLE deliveries (
    id TEXT COLLATE "C" PRIMARY KEY,
    notification_id TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    summary TEXT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE status = 'pending';
CREATE INDEX deliveries_tenant ON deliveries (tenant, created_at);

CREATE TABLE chains (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    definition TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE chain_runs (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    chain_id TEXT COLLATE "C" NOT NULL,
    chain TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    input BYTEA NOT NULL,
    output BYTEA,
    error BYTEA,
    definition TEXT NOT NULL,
    deadline_at BIGINT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX chain_runs_recent ON chain_runs (chain_id, created_at);
CREATE INDEX chain_runs_open ON chain_runs (created_at) WHERE status IN ('queued', 'running');
CREATE TABLE chain_steps (
    run_id TEXT COLLATE "C" NOT NULL,
    path TEXT COLLATE "C" NOT NULL,
    body BYTEA NOT NULL,
    started_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, path)
);

CREATE TABLE data_keys (
    id BIGINT PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    master TEXT NOT NULL,
    wrapped BYTEA NOT NULL,
    retired BOOLEAN NOT NULL DEFAULT false,
    created_at BIGINT NOT NULL
);
CREATE TABLE code_archives (
    path TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    archive BYTEA NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE secrets (
    tenant TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    value BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
"#;

/// Brings the database up to [`VERSION`], in one transaction, under the migration lock.
pub fn migrate(conn: &mut Conn) -> Result<i64> {
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL, applied_at BIGINT NOT NULL)",
    )?;
    let found: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM schema_version", &[])?
        .get(0);
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
        tx.batch(m.sql)?;
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            &[&version, &now_ms()],
        )?;
        tracing::info!(version, what = m.what, "database schema migrated");
    }
    tx.commit()?;
    Ok(VERSION)
}
