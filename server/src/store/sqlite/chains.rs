//! SQLite tables of chaining: chains, runs (with the definition each runs), and step calls
//! keyed by run and path.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::sealed::{opened, Seal};
use crate::atrest::Sealer;
use crate::chains::{Chain, ChainRun, RunStatus, StepRecord};
use crate::model::Mode;
use crate::store::records::{place, step_row};
use crate::store::Result;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS chains (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS chain_runs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    chain TEXT NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    definition TEXT NOT NULL,
    deadline_at INTEGER,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
);
CREATE INDEX IF NOT EXISTS chain_runs_recent ON chain_runs (chain_id, created_at);
CREATE INDEX IF NOT EXISTS chain_runs_open ON chain_runs (created_at) WHERE status IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS chain_steps (
    run_id TEXT NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, path)
) WITHOUT ROWID;
"#;

/// Gives tasks the run they are a step of; a database that already has the column (the
/// migration applied before the schema's version table existed) is left as it is.
pub(super) fn add_task_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('tasks') WHERE name = 'chain_run'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE tasks ADD COLUMN chain_run TEXT")?;
    }
    Ok(())
}

const CHAIN_COLS: &str = "id, tenant, name, definition, created_at, updated_at";
const RUN_COLS: &str = "id, tenant, chain_id, chain, mode, status, input, output, error, definition, deadline_at, created_at, started_at, finished_at";

fn chain_row(r: &Row<'_>) -> rusqlite::Result<(Chain, String)> {
    let definition: String = r.get(3)?;
    Ok((
        Chain {
            id: r.get(0)?,
            tenant: r.get(1)?,
            name: r.get(2)?,
            definition: serde_json::Value::Null,
            created_at: r.get(4)?,
            updated_at: r.get(5)?,
        },
        definition,
    ))
}

fn with_definition((mut chain, text): (Chain, String)) -> Result<Chain> {
    chain.definition = serde_json::from_str(&text)?;
    Ok(chain)
}

pub(super) fn put_chain(conn: &Connection, chain: &Chain) -> Result<Chain> {
    let stored = conn
        .prepare_cached(&format!(
            "INSERT INTO chains ({CHAIN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant, name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at
             RETURNING {CHAIN_COLS}"
        ))?
        .query_row(
            params![
                chain.id,
                chain.tenant,
                chain.name,
                serde_json::to_string(&chain.definition)?,
                chain.created_at,
                chain.updated_at
            ],
            chain_row,
        )?;
    with_definition(stored)
}

pub(super) fn chain(conn: &Connection, tenant: Option<&str>, key: &str) -> Result<Option<Chain>> {
    conn.prepare_cached(&format!(
        "SELECT {CHAIN_COLS} FROM chains WHERE (?1 IS NULL OR tenant = ?1) AND (id = ?2 OR name = ?2)
         ORDER BY id = ?2 DESC LIMIT 1"
    ))?
    .query_row(params![tenant, key], chain_row)
    .optional()?
    .map(with_definition)
    .transpose()
}

pub(super) fn chains(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Chain>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {CHAIN_COLS} FROM chains WHERE (?1 IS NULL OR tenant = ?1) ORDER BY name, tenant"
    ))?;
    let rows = stmt
        .query_map(params![tenant], chain_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(with_definition).collect()
}

pub(super) fn delete_chain(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM chains WHERE id = ?1", params![id])? > 0)
}

pub(super) fn prune_runs(conn: &mut Connection, before: i64) -> Result<u64> {
    let tx = conn.transaction()?;
    let ended = "SELECT id FROM chain_runs
                 WHERE status NOT IN ('queued', 'running') AND finished_at < ?1";
    tx.execute(
        &format!("DELETE FROM chain_steps WHERE run_id IN ({ended})"),
        params![before],
    )?;
    let runs = tx.execute(
        &format!("DELETE FROM chain_runs WHERE id IN ({ended})"),
        params![before],
    )?;
    tx.commit()?;
    Ok(runs as u64)
}

pub(super) fn save_run(conn: &mut Connection, run: &ChainRun, seal: Seal<'_>) -> Result<()> {
    let tx = conn.transaction()?;
    let json = |v: &Option<serde_json::Value>| v.as_ref().map(serde_json::to_string).transpose();
    let id = &run.run_id;
    tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO chain_runs ({RUN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?
    .execute(params![
        run.run_id,
        run.tenant,
        run.chain_id,
        run.chain,
        run.mode.as_str(),
        run.status.as_str(),
        seal.text(place::RUN_INPUT, id, serde_json::to_string(&run.input)?),
        seal.opt(place::RUN_OUTPUT, id, json(&run.output)?),
        seal.opt(
            place::RUN_ERROR,
            id,
            run.error.as_ref().map(serde_json::to_string).transpose()?
        ),
        serde_json::to_string(&run.definition)?,
        run.deadline_at,
        run.created_at,
        run.started_at,
        run.finished_at
    ])?;
    for step in &run.steps {
        save_step(&tx, &run.run_id, step, seal)?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn save_step(
    conn: &Connection,
    run_id: &str,
    step: &StepRecord,
    seal: Seal<'_>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO chain_steps (run_id, path, body, started_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        run_id,
        step.path,
        seal.text(
            place::STEP,
            &step_row(run_id, &step.path),
            serde_json::to_string(step)?
        ),
        step.started_at
    ])?;
    Ok(())
}

type RawRun = (ChainRun, String, Option<String>, Option<String>, String);

fn run_row(sealer: &Sealer, r: &Row<'_>) -> rusqlite::Result<RawRun> {
    let id: String = r.get(0)?;
    let sealed = |i: usize, column: &'static str| {
        opened(sealer, r, i, column, &id, || format!("chain run {id}"))
    };
    let mode: String = r.get(4)?;
    let status: String = r.get(5)?;
    Ok((
        ChainRun {
            run_id: r.get(0)?,
            tenant: r.get(1)?,
            chain_id: r.get(2)?,
            chain: r.get(3)?,
            mode: Mode::parse(&mode).unwrap_or(Mode::Async),
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
            input: serde_json::Value::Null,
            output: None,
            error: None,
            definition: serde_json::Value::Null,
            deadline_at: r.get(10)?,
            created_at: r.get(11)?,
            started_at: r.get(12)?,
            finished_at: r.get(13)?,
            steps: Vec::new(),
        },
        sealed(6, place::RUN_INPUT)?.unwrap_or_default(),
        sealed(7, place::RUN_OUTPUT)?,
        sealed(8, place::RUN_ERROR)?,
        r.get(9)?,
    ))
}

/// A run row with its JSON columns read and its steps, in the order they started.
fn complete(conn: &Connection, sealer: &Sealer, raw: RawRun) -> Result<ChainRun> {
    let (mut run, input, output, error, definition) = raw;
    run.input = serde_json::from_str(&input)?;
    run.output = output.map(|o| serde_json::from_str(&o)).transpose()?;
    run.error = error.map(|e| serde_json::from_str(&e)).transpose()?;
    run.definition = serde_json::from_str(&definition)?;
    let mut stmt = conn.prepare_cached(
        "SELECT body, path FROM chain_steps WHERE run_id = ?1 ORDER BY started_at, path",
    )?;
    let run_id = run.run_id.clone();
    let bodies = stmt
        .query_map(params![run.run_id], |r| {
            let path: String = r.get(1)?;
            let body = opened(sealer, r, 0, place::STEP, &step_row(&run_id, &path), || {
                format!("step {path} of chain run {run_id}")
            })?;
            Ok(body.unwrap_or_default())
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    run.steps = bodies
        .iter()
        .map(|b| serde_json::from_str(b))
        .collect::<std::result::Result<_, _>>()?;
    crate::chains::model::in_order(&mut run.steps);
    Ok(run)
}

pub(super) fn chain_run(
    conn: &Connection,
    sealer: &Sealer,
    tenant: Option<&str>,
    run_id: &str,
) -> Result<Option<ChainRun>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {RUN_COLS} FROM chain_runs WHERE (?1 IS NULL OR tenant = ?1) AND id = ?2"
        ))?
        .query_row(params![tenant, run_id], |r| run_row(sealer, r))
        .optional()?;
    raw.map(|r| complete(conn, sealer, r)).transpose()
}

fn runs_where(
    conn: &Connection,
    sealer: &Sealer,
    sql: &str,
    p: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ChainRun>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {RUN_COLS} FROM chain_runs {sql}"))?;
    let raws = stmt
        .query_map(p, |r| run_row(sealer, r))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raws.into_iter()
        .map(|r| complete(conn, sealer, r))
        .collect()
}

pub(super) fn chain_runs(
    conn: &Connection,
    sealer: &Sealer,
    chain_id: &str,
    limit: u32,
) -> Result<Vec<ChainRun>> {
    runs_where(
        conn,
        sealer,
        "WHERE chain_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2",
        &[&chain_id, &limit],
    )
}

pub(super) fn unfinished_runs(conn: &Connection, sealer: &Sealer) -> Result<Vec<ChainRun>> {
    runs_where(
        conn,
        sealer,
        "WHERE status IN ('queued', 'running') ORDER BY created_at, id",
        &[],
    )
}
