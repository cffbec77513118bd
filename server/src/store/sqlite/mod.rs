//! The embedded store: one SQLite file in WAL mode. One connection writes, another reads
//! (WAL lets reads go on during a commit), and a third checkpoints the WAL in the background,
//! so no call waits for an fsync.
//!
//! [`schema`] holds the versioned migrations, [`rows`] the mapping of records to rows,
//! [`rollups`] the rollup tables, [`anomalies`] anomaly detection's tables, [`claims`] the
//! queue's claim and [`checkpoint`] the WAL's checkpointer.

mod alerts;
mod anomalies;
mod chains;
mod checkpoint;
mod claims;
mod keys;
mod rollups;
mod rows;
mod schema;
mod sealed;
#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{FairMutex, FairMutexGuard};
use rusqlite::{params, Connection, OptionalExtension};

use super::records::{interrupted_ending, place, version_row, Pending, TenantKeys};
use super::{
    AlertStore, AnomalyStore, Attempt, ChainStore, Recovery, Result, Rollup, Store, StoreError,
    StoreSize, Write,
};
use crate::atrest::{KeySource, Sealer};
use crate::model::{now_ms, Function, Mode, Task, Version};
use crate::rollup::Call;
use checkpoint::{CheckpointStats, Checkpointer};
use rows::{
    call_row, complete, conflict, finished, function_row, insert, task_row, CALL_COLS,
    FUNCTION_COLS, TASK_COLS,
};
pub(crate) use sealed::damaged;

/// A function's newest tasks, from the index of its tasks by age (no sort of them all).
const RECENT: &str = "WHERE function_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2";

/// How many tasks are running now.
const RUNNING: &str = "SELECT COUNT(*) FROM tasks WHERE status = 'running'";

/// The embedded SQLite store: one connection writes, another reads (WAL lets reads go on
/// during a commit), and a third checkpoints the WAL in the background.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    /// The writer and the reader, shared with the checkpointer, which holds both while it
    /// restarts the WAL.
    conn: Arc<FairMutex<Connection>>,
    reader: Arc<FairMutex<Connection>>,
    checkpoints: Arc<CheckpointStats>,
    /// Seals and opens tenant data with the tenants' data keys.
    sealer: Arc<Sealer>,
    /// Dropped with the store, which stops the checkpointer.
    _checkpointer: Checkpointer,
}

/// The WAL's size limit by default.
pub const WAL_LIMIT: u64 = 64 << 20;

/// How often the WAL is copied back into the database, off the writers' path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating) the database at `path`, its WAL bounded to [`WAL_LIMIT`], sealing
    /// with the master key in the file beside it (`<path>.key`, made if missing).
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut key = path.as_os_str().to_owned();
        key.push(".key");
        SqliteStore::open_with(
            path,
            WAL_LIMIT,
            CHECKPOINT_EVERY,
            KeySource::File(key.into()),
            true,
        )
    }

    /// Opens (creating) the database at `path`, checkpointing every `every` and restarting
    /// the WAL once it passes `wal_limit` bytes, with the master keys from `keys`; `seal:
    /// false` writes new records in plaintext (sealed ones are still read).
    pub fn open_with(
        path: &Path,
        wal_limit: u64,
        every: Duration,
        keys: KeySource,
        seal: bool,
    ) -> Result<SqliteStore> {
        let mut conn = connect(path)?;
        schema::migrate(&mut conn)?;
        let sealer = Arc::new(sealed::sealer(&mut conn, keys, seal)?);
        // A commit never waits for a checkpoint (and its fsync); the checkpointer does them.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // Once checkpointed (and restarted), the WAL file is cut back to this size.
        conn.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(wal_limit).unwrap_or(i64::MAX),
        )?;
        let checkpoints = Arc::new(CheckpointStats::default());
        let conn = Arc::new(FairMutex::new(conn));
        let reader = Arc::new(FairMutex::new(connect(path)?));
        let checkpointer = Checkpointer::start(
            connect(path)?,
            reader.clone(),
            conn.clone(),
            wal_path(path),
            every,
            wal_limit,
            checkpoints.clone(),
        );
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn,
            reader,
            checkpoints,
            sealer,
            _checkpointer: checkpointer,
        })
    }

    /// WAL restarts the checkpointer forced because of its size.
    pub fn wal_truncations(&self) -> u64 {
        self.checkpoints
            .truncations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn conn(&self) -> FairMutexGuard<'_, Connection> {
        self.conn.lock()
    }

    fn reader(&self) -> FairMutexGuard<'_, Connection> {
        self.reader.lock()
    }
}

impl SqliteStore {
    /// A version from its row (settings, code_dir, version).
    fn version_row(
        &self,
        function_id: &str,
        r: &rusqlite::Row<'_>,
    ) -> rusqlite::Result<Result<Version>> {
        let number: u32 = r.get(2)?;
        let settings = sealed::opened(
            &self.sealer,
            r,
            0,
            place::SETTINGS,
            &version_row(function_id, number),
            || format!("version {number} of {function_id}"),
        )?
        .unwrap_or_default();
        let code_dir: String = r.get(1)?;
        Ok(serde_json::from_str::<Version>(&settings)
            .map(|mut v| {
                v.code_dir = code_dir;
                v
            })
            .map_err(StoreError::from))
    }
}

/// The WAL file of the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
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
        let key = self.tenant_key(tenant)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO functions (id, tenant, name, version, active, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            params![function_id, tenant, name, version.version, now],
        )
        .map_err(conflict)?;
        let settings = self.seal_for(&key).text(
            place::SETTINGS,
            &version_row(function_id, version.version),
            serde_json::to_string(version)?,
        );
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
        self.reader()
            .prepare_cached(
                "SELECT settings, code_dir, version FROM versions WHERE function_id = ?1 AND version = ?2",
            )?
            .query_row(params![function_id, version], |r| {
                self.version_row(function_id, r)
            })
            .optional()?
            .transpose()
    }

    fn versions(&self, function_id: &str) -> Result<Vec<Version>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT settings, code_dir, version FROM versions WHERE function_id = ?1 ORDER BY version",
        )?;
        let rows: Vec<Result<Version>> = stmt
            .query_map(params![function_id], |r| self.version_row(function_id, r))?
            .collect::<rusqlite::Result<_>>()?;
        rows.into_iter().collect()
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
        tx.execute(
            "DELETE FROM code_archives WHERE path >= ?1 || '/' AND path < ?1 || '0'",
            params![function_id],
        )?;
        tx.execute("DELETE FROM functions WHERE id = ?1", params![function_id])?;
        tx.commit()?;
        Ok(versions)
    }

    fn write_and_claim_within(
        &self,
        writes: &[Write],
        limit: usize,
        bytes: u64,
    ) -> Result<Vec<Task>> {
        let keys = TenantKeys::of(writes, |tenant| self.tenant_key(tenant))?;
        let seal = |tenant: &str| sealed::Seal {
            sealer: &self.sealer,
            key: keys.get(tenant),
        };
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // The calls' rollups, added up over the batch and written once per row.
        let mut ended = Pending::default();
        for w in writes {
            match w {
                Write::Insert(task) => insert(&tx, task, seal(&task.tenant))?,
                Write::Complete {
                    task_id,
                    tenant,
                    completion,
                    at,
                } => complete(&tx, task_id, completion, *at, &mut ended, seal(tenant))?,
                Write::Finished {
                    task,
                    completion,
                    at,
                } => finished(&tx, task, completion, *at, &mut ended, seal(&task.tenant))?,
            }
        }
        let tasks = self.claim_in(&tx, (limit, bytes), &mut ended)?;
        ended.flush(&tx)?;
        tx.commit()?;
        Ok(tasks)
    }

    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>> {
        let sql =
            format!("SELECT {TASK_COLS} FROM tasks WHERE (?1 IS NULL OR tenant = ?1) AND id = ?2");
        Ok(self
            .reader()
            .prepare_cached(&sql)?
            .query_row(params![tenant, task_id], |r| task_row(&self.sealer, r))
            .optional()?)
    }

    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks {RECENT}"))?;
        let rows = stmt.query_map(params![function_id, limit], |r| task_row(&self.sealer, r))?;
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

    fn give_back(&self, task_ids: &[String]) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut given = 0;
        {
            let mut back = tx.prepare_cached(
                "UPDATE tasks SET status = 'queued', attempts = attempts - 1, started_at = NULL \
                 WHERE id = ?1 AND status = 'running'",
            )?;
            for id in task_ids {
                given += back.execute([id])? as u64;
            }
        }
        tx.commit()?;
        Ok(given)
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
            let rows = stmt.query_map([], |r| task_row(&self.sealer, r))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut report = Recovery::default();
        for task in running {
            if task.mode == Mode::Async && retries_left(&task) {
                self.conn().execute(
                    "UPDATE tasks SET status = 'queued', not_before = ?2 WHERE id = ?1",
                    params![task.task_id, now_ms() + backoff_ms(task.attempts)],
                )?;
                report.requeued.push(task.task_id);
            } else {
                let completion = interrupted_ending();
                self.write(&[Write::Complete {
                    task_id: task.task_id.clone(),
                    tenant: task.tenant.clone(),
                    completion,
                    at: now_ms(),
                }])?;
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

    fn size(&self) -> Result<StoreSize> {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(StoreSize {
            database_bytes: len(&self.path),
            wal_bytes: len(&wal_path(&self.path)),
        })
    }

    fn close(&self) -> Result<()> {
        // Everything in the WAL into the database, and the WAL emptied.
        self.conn()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

impl AnomalyStore for SqliteStore {
    fn anomaly_state(&self) -> Result<(Option<i64>, Vec<crate::anomalies::Saved>)> {
        anomalies::state(&self.reader())
    }

    fn save_anomaly_state(&self, through: i64, saved: &[crate::anomalies::Saved]) -> Result<()> {
        anomalies::save_state(&mut self.conn(), through, saved)
    }

    fn record_anomalies(
        &self,
        scored: &[(crate::anomalies::Key, String, crate::anomalies::Point)],
        events: &[crate::anomalies::Event],
    ) -> Result<()> {
        anomalies::record(&mut self.conn(), scored, events)
    }

    fn anomaly_events(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<crate::anomalies::Event>> {
        anomalies::events(&self.reader(), tenant, function_id, since, until, limit)
    }

    fn anomaly_scores(
        &self,
        tenant: Option<&str>,
        function_id: &str,
        since: i64,
        until: i64,
    ) -> Result<Vec<(crate::anomalies::Series, crate::anomalies::Point)>> {
        anomalies::scores(&self.reader(), tenant, function_id, since, until)
    }

    fn prune_anomalies(&self, before: i64) -> Result<u64> {
        anomalies::prune(&self.conn(), before)
    }
}

impl AlertStore for SqliteStore {
    fn put_rule(&self, rule: &crate::alerts::Rule) -> Result<()> {
        alerts::put_rule(&self.conn(), rule)
    }

    fn rules(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Rule>> {
        alerts::rules(&self.reader(), tenant)
    }

    fn delete_rule(&self, tenant: Option<&str>, id: &str) -> Result<bool> {
        alerts::delete_rule(&mut self.conn(), tenant, id)
    }

    fn alert_phases(&self) -> Result<Vec<(String, String, crate::alerts::eval::Phase)>> {
        alerts::phases(&self.reader())
    }

    fn save_alert_phases(
        &self,
        phases: &[(String, String, crate::alerts::eval::Phase)],
    ) -> Result<()> {
        alerts::save_phases(&mut self.conn(), phases)
    }

    fn put_subscription(&self, sub: &crate::alerts::Subscription) -> Result<()> {
        alerts::put_subscription(&self.conn(), sub)
    }

    fn subscriptions(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Subscription>> {
        alerts::subscriptions(&self.reader(), tenant)
    }

    fn delete_subscriptions(
        &self,
        tenant: Option<&str>,
        id: Option<&str>,
        channel_target: Option<(&str, &str)>,
    ) -> Result<u64> {
        alerts::delete_subscriptions(&mut self.conn(), tenant, id, channel_target)
    }

    fn prune_notifications(&self, before: i64) -> Result<u64> {
        alerts::prune_notifications(&mut self.conn(), before)
    }

    fn enqueue(
        &self,
        n: &crate::alerts::Notification,
        subscriptions: &[crate::alerts::Subscription],
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        alerts::enqueue(&mut self.conn(), n, subscriptions)
    }

    fn due_deliveries(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<
        Vec<(
            crate::alerts::deliver::Delivery,
            crate::alerts::Notification,
            crate::alerts::Subscription,
        )>,
    > {
        alerts::due(&self.reader(), now, limit)
    }

    fn record_attempt(
        &self,
        delivery_id: &str,
        outcome: Attempt,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        alerts::record_attempt(&self.conn(), delivery_id, outcome, error, now)
    }

    fn deliveries(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        alerts::deliveries(&self.reader(), tenant, limit)
    }

    fn oldest_queued_at(&self) -> Result<Option<i64>> {
        // The queue's own index holds the queued tasks in age order.
        Ok(self.reader().query_row(
            "SELECT MIN(created_at) FROM tasks WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?)
    }
}

impl ChainStore for SqliteStore {
    fn put_chain(&self, chain: &crate::chains::Chain) -> Result<crate::chains::Chain> {
        chains::put_chain(&self.conn(), chain).map_err(|e| match e {
            super::StoreError::Sqlite(e) => rows::conflict(e),
            e => e,
        })
    }

    fn chain(&self, tenant: Option<&str>, key: &str) -> Result<Option<crate::chains::Chain>> {
        chains::chain(&self.reader(), tenant, key)
    }

    fn chains(&self, tenant: Option<&str>) -> Result<Vec<crate::chains::Chain>> {
        chains::chains(&self.reader(), tenant)
    }

    fn delete_chain(&self, id: &str) -> Result<bool> {
        chains::delete_chain(&self.conn(), id)
    }

    fn prune_runs(&self, before: i64) -> Result<u64> {
        chains::prune_runs(&mut self.conn(), before)
    }

    fn save_run(&self, run: &crate::chains::ChainRun) -> Result<()> {
        let key = self.tenant_key(&run.tenant)?;
        chains::save_run(&mut self.conn(), run, self.seal_for(&key))
    }

    fn save_step(
        &self,
        tenant: &str,
        run_id: &str,
        step: &crate::chains::StepRecord,
    ) -> Result<()> {
        let key = self.tenant_key(tenant)?;
        chains::save_step(&self.conn(), run_id, step, self.seal_for(&key))
    }

    fn chain_run(
        &self,
        tenant: Option<&str>,
        run_id: &str,
    ) -> Result<Option<crate::chains::ChainRun>> {
        chains::chain_run(&self.reader(), &self.sealer, tenant, run_id)
    }

    fn chain_runs(&self, chain_id: &str, limit: u32) -> Result<Vec<crate::chains::ChainRun>> {
        chains::chain_runs(&self.reader(), &self.sealer, chain_id, limit)
    }

    fn unfinished_runs(&self) -> Result<Vec<crate::chains::ChainRun>> {
        chains::unfinished_runs(&self.conn(), &self.sealer)
    }
}
