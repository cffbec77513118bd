//! Chaining's tables on PostgreSQL: chains, runs (with the definition each runs), and step
//! calls keyed by run and path.

use postgres::Row;

use super::pool::{Conn, Tx};
use super::sealed::Seal;
use super::PgStore;
use crate::chains::{Chain, ChainRun, RunStatus, StepRecord};
use crate::model::Mode;
use crate::store::records::{place, step_row};
use crate::store::{ChainStore, Result};

const CHAIN_COLS: &str = "id, tenant, name, definition, created_at, updated_at";
const RUN_COLS: &str = "id, tenant, chain_id, chain, mode, status, input, output, error, definition, deadline_at, created_at, started_at, finished_at";

impl ChainStore for PgStore {
    fn put_chain(&self, chain: &Chain) -> Result<Chain> {
        put_chain(&mut *self.pool.get()?, chain).map_err(super::conflict)
    }

    fn chain(&self, tenant: Option<&str>, key: &str) -> Result<Option<Chain>> {
        chain(&mut *self.pool.get()?, tenant, key)
    }

    fn chains(&self, tenant: Option<&str>) -> Result<Vec<Chain>> {
        chains(&mut *self.pool.get()?, tenant)
    }

    fn delete_chain(&self, id: &str) -> Result<bool> {
        delete_chain(&mut *self.pool.get()?, id)
    }

    fn prune_runs(&self, before: i64) -> Result<u64> {
        prune_runs(&mut *self.pool.get()?, before)
    }

    fn save_run(&self, run: &ChainRun) -> Result<()> {
        let key = self.tenant_key(&run.tenant)?;
        save_run(&mut *self.pool.get()?, run, self.seal_for(&key))
    }

    fn save_step(&self, tenant: &str, run_id: &str, step: &StepRecord) -> Result<()> {
        let key = self.tenant_key(tenant)?;
        save_step(&mut *self.pool.get()?, run_id, step, self.seal_for(&key))
    }

    fn chain_run(&self, tenant: Option<&str>, run_id: &str) -> Result<Option<ChainRun>> {
        Ok(self
            .runs_where(
                "WHERE ($1::TEXT IS NULL OR tenant = $1) AND id = $2",
                &[&tenant, &run_id],
            )?
            .pop())
    }

    fn chain_runs(&self, chain_id: &str, limit: u32) -> Result<Vec<ChainRun>> {
        self.runs_where(
            "WHERE chain_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
            &[&chain_id, &i64::from(limit)],
        )
    }

    fn unfinished_runs(&self) -> Result<Vec<ChainRun>> {
        self.runs_where(
            "WHERE status IN ('queued', 'running') ORDER BY created_at, id",
            &[],
        )
    }
}

fn chain_row(r: &Row) -> Result<Chain> {
    Ok(Chain {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        name: r.try_get(2)?,
        definition: serde_json::from_str(r.try_get(3)?)?,
        created_at: r.try_get(4)?,
        updated_at: r.try_get(5)?,
    })
}

pub(super) fn put_chain(conn: &mut Conn, chain: &Chain) -> Result<Chain> {
    let row = conn.query_one(
        &format!(
            "INSERT INTO chains ({CHAIN_COLS}) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at
             RETURNING {CHAIN_COLS}"
        ),
        &[
            &chain.id,
            &chain.tenant,
            &chain.name,
            &serde_json::to_string(&chain.definition)?,
            &chain.created_at,
            &chain.updated_at,
        ],
    )?;
    chain_row(&row)
}

pub(super) fn chain(conn: &mut Conn, tenant: Option<&str>, key: &str) -> Result<Option<Chain>> {
    conn.query_opt(
        &format!(
            "SELECT {CHAIN_COLS} FROM chains WHERE ($1::TEXT IS NULL OR tenant = $1) AND (id = $2 OR name = $2)
             ORDER BY id = $2 DESC LIMIT 1"
        ),
        &[&tenant, &key],
    )?
    .map(|r| chain_row(&r))
    .transpose()
}

pub(super) fn chains(conn: &mut Conn, tenant: Option<&str>) -> Result<Vec<Chain>> {
    conn.query(
        &format!(
            "SELECT {CHAIN_COLS} FROM chains WHERE ($1::TEXT IS NULL OR tenant = $1) ORDER BY name, tenant"
        ),
        &[&tenant],
    )?
    .iter()
    .map(chain_row)
    .collect()
}

pub(super) fn delete_chain(conn: &mut Conn, id: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM chains WHERE id = $1", &[&id])? > 0)
}

pub(super) fn prune_runs(conn: &mut Conn, before: i64) -> Result<u64> {
    let mut tx = conn.transaction()?;
    let ended = "SELECT id FROM chain_runs
                 WHERE status NOT IN ('queued', 'running') AND finished_at < $1";
    tx.execute(
        &format!("DELETE FROM chain_steps WHERE run_id IN ({ended})"),
        &[&before],
    )?;
    let runs = tx.execute(
        &format!("DELETE FROM chain_runs WHERE id IN ({ended})"),
        &[&before],
    )?;
    tx.commit()?;
    Ok(runs)
}

pub(super) fn save_run(conn: &mut Conn, run: &ChainRun, seal: Seal<'_>) -> Result<()> {
    let mut tx = conn.transaction()?;
    let id = &run.run_id;
    let sealed = |column, v: Option<String>| v.map(|t| seal.text(column, id, &t));
    tx.execute(
        &format!(
            "INSERT INTO chain_runs ({RUN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, chain_id = excluded.chain_id,
                 chain = excluded.chain, mode = excluded.mode, status = excluded.status, input = excluded.input,
                 output = excluded.output, error = excluded.error, definition = excluded.definition,
                 deadline_at = excluded.deadline_at, created_at = excluded.created_at,
                 started_at = excluded.started_at, finished_at = excluded.finished_at"
        ),
        &[
            &run.run_id,
            &run.tenant,
            &run.chain_id,
            &run.chain,
            &run.mode.as_str(),
            &run.status.as_str(),
            &seal.text(place::RUN_INPUT, id, &serde_json::to_string(&run.input)?),
            &sealed(
                place::RUN_OUTPUT,
                run.output.as_ref().map(serde_json::to_string).transpose()?,
            ),
            &sealed(
                place::RUN_ERROR,
                run.error.as_ref().map(serde_json::to_string).transpose()?,
            ),
            &serde_json::to_string(&run.definition)?,
            &run.deadline_at,
            &run.created_at,
            &run.started_at,
            &run.finished_at,
        ],
    )?;
    for step in &run.steps {
        put_step(&mut tx, &run.run_id, step, seal)?;
    }
    tx.commit()
}

/// Stores a step in a transaction.
fn put_step(tx: &mut Tx<'_>, run_id: &str, step: &StepRecord, seal: Seal<'_>) -> Result<()> {
    tx.execute(STEP_UPSERT, &step_values(run_id, step, seal)?.params())?;
    Ok(())
}

pub(super) fn save_step(
    conn: &mut Conn,
    run_id: &str,
    step: &StepRecord,
    seal: Seal<'_>,
) -> Result<()> {
    conn.execute(STEP_UPSERT, &step_values(run_id, step, seal)?.params())?;
    Ok(())
}

const STEP_UPSERT: &str = "INSERT INTO chain_steps (run_id, path, body, started_at) VALUES ($1, $2, $3, $4)
     ON CONFLICT (run_id, path) DO UPDATE SET body = excluded.body, started_at = excluded.started_at";

/// A step's row values.
struct StepValues<'a> {
    run_id: &'a str,
    path: &'a str,
    body: Vec<u8>,
    started_at: i64,
}

impl StepValues<'_> {
    fn params(&self) -> [&(dyn postgres::types::ToSql + Sync); 4] {
        [&self.run_id, &self.path, &self.body, &self.started_at]
    }
}

fn step_values<'a>(
    run_id: &'a str,
    step: &'a StepRecord,
    seal: Seal<'_>,
) -> Result<StepValues<'a>> {
    Ok(StepValues {
        run_id,
        path: &step.path,
        body: seal.text(
            place::STEP,
            &step_row(run_id, &step.path),
            &serde_json::to_string(step)?,
        ),
        started_at: step.started_at,
    })
}

impl PgStore {
    /// A run row with its sealed columns opened and its steps, in the order they started.
    fn run_of(&self, conn: &mut Conn, r: &Row) -> Result<ChainRun> {
        let id: String = r.try_get(0)?;
        let sealed = |i: usize, column: &'static str| -> Result<Option<String>> {
            self.opened(r.try_get(i)?, column, &id, || format!("chain run {id}"))
        };
        let mode: String = r.try_get(4)?;
        let status: String = r.try_get(5)?;
        let json = |t: Option<String>| t.map(|t| serde_json::from_str(&t)).transpose();
        let mut run = ChainRun {
            run_id: id.clone(),
            tenant: r.try_get(1)?,
            chain_id: r.try_get(2)?,
            chain: r.try_get(3)?,
            mode: Mode::parse(&mode).unwrap_or(Mode::Async),
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Failed),
            input: serde_json::from_str(&sealed(6, place::RUN_INPUT)?.unwrap_or_default())?,
            output: json(sealed(7, place::RUN_OUTPUT)?)?,
            error: sealed(8, place::RUN_ERROR)?
                .map(|t| serde_json::from_str(&t))
                .transpose()?,
            definition: serde_json::from_str(r.try_get(9)?)?,
            deadline_at: r.try_get(10)?,
            created_at: r.try_get(11)?,
            started_at: r.try_get(12)?,
            finished_at: r.try_get(13)?,
            steps: Vec::new(),
        };
        let steps = conn.query(
            "SELECT body, path FROM chain_steps WHERE run_id = $1 ORDER BY started_at, path",
            &[&id],
        )?;
        for s in &steps {
            let path: String = s.try_get(1)?;
            let body = self
                .opened(s.try_get(0)?, place::STEP, &step_row(&id, &path), || {
                    format!("step {path} of chain run {id}")
                })?
                .unwrap_or_default();
            run.steps.push(serde_json::from_str(&body)?);
        }
        crate::chains::model::in_order(&mut run.steps);
        Ok(run)
    }

    pub(super) fn runs_where(
        &self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<ChainRun>> {
        let mut conn = self.pool.get()?;
        let rows = conn.query(&format!("SELECT {RUN_COLS} FROM chain_runs {sql}"), p)?;
        rows.iter().map(|r| self.run_of(&mut conn, r)).collect()
    }
}
