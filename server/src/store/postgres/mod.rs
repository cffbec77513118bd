//! The store on a PostgreSQL server (`serve --database postgres://...`): the same records as
//! the SQLite store, in one database that several nodes can share. Every write is a
//! transaction committed before it is acknowledged; the queue is claimed with
//! `FOR UPDATE SKIP LOCKED`, so nodes claiming together never take the same task and never
//! wait on each other's claims.
//!
//! [`pool`] holds the connections, [`schema`] the versioned migrations, [`rows`] the mapping
//! of records to rows, and [`rollups`], [`alerts`], [`anomalies`], [`chains`] and [`sealed`]
//! their tables.

mod alerts;
mod anomalies;
mod chains;
mod claims;
mod cluster;
mod ends;
mod floor;
mod growth;
mod keys;
mod pool;
mod rollups;
mod rows;
mod schema;
mod sealed;
mod tls;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::records::{place, version_row, Pending, TenantKeys};
use super::{
    AlertStore, AnomalyStore, Attempt, Recovery, Result, Rollup, Signal, Store, StoreError,
    StoreSize, Write,
};
use crate::atrest::{KeySource, Sealer};
use crate::model::{now_ms, Function, Task, Version};
use crate::rollup::Call;
use pool::{Pool, Queued};
use postgres::types::ToSql;
use rows::{
    call_row, conflict, function_row, task_row, End, Flight, CALL_COLS, FUNCTION_COLS, TASK_COLS,
};
pub use schema::VERSION as SCHEMA_VERSION;

/// The store on PostgreSQL.
#[derive(Debug)]
pub struct PgStore {
    pool: Arc<Pool>,
    /// This node: its claims carry it, and a restart ends its own running tasks at once.
    node_id: String,
    /// How long a node that stopped heartbeating keeps its running tasks.
    lease_ms: i64,
    /// Seals and opens tenant data with the tenants' data keys.
    sealer: Arc<Sealer>,
    /// Held while this node makes a data key, so it makes one per tenant.
    key_lock: Mutex<()>,
    /// Where this node's next claim starts.
    floor: Mutex<floor::Floor>,
    /// The tasks this node has added, to analyse a young table as it grows.
    growth: growth::Growth,
}

/// How long a silent node keeps its running tasks, by default.
pub const LEASE_MS: i64 = 15_000;

/// This host's name: a node's id unless one is given.
pub fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "cloudfunc".into())
}

/// Connections each node opens at most, by default.
pub const CONNECTIONS: usize = 16;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        use postgres::error::SqlState as S;
        match e.code() {
            Some(c) if *c == S::DISK_FULL || *c == S::OUT_OF_MEMORY => StoreError::Full,
            Some(c)
                if *c == S::T_R_SERIALIZATION_FAILURE
                    || *c == S::T_R_DEADLOCK_DETECTED
                    || *c == S::LOCK_NOT_AVAILABLE
                    || *c == S::ADMIN_SHUTDOWN
                    || *c == S::CRASH_SHUTDOWN
                    || *c == S::CANNOT_CONNECT_NOW
                    || *c == S::TOO_MANY_CONNECTIONS
                    || *c == S::READ_ONLY_SQL_TRANSACTION
                    || *c == S::QUERY_CANCELED =>
            {
                StoreError::Transient(Box::new(e))
            }
            Some(_) => StoreError::Postgres(e),
            // No server error: the connection failed or closed, which a retry may mend.
            None => StoreError::Transient(Box::new(e)),
        }
    }
}

/// `url` with its password (if any) replaced, for messages.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or `key=value` pairs), brings
    /// its schema up to date (refusing a newer one), and loads the data keys with the master
    /// keys from `keys`; `seal: false` writes new records in plaintext. Connections use TLS
    /// where `url` says `sslmode=require` or `ca` (a PEM file of the server's CA) is given,
    /// the server's certificate verified (see the `tls` module).
    pub fn open(
        url: &str,
        ca: Option<&std::path::Path>,
        keys: KeySource,
        seal: bool,
        connections: usize,
    ) -> Result<PgStore> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Unavailable(format!(
                "the database address {} is not a PostgreSQL URL: {e}",
                redacted(url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("cloudfunc");
        }
        let tls = tls::connector(&mut config, ca)?;
        let pool = Arc::new(Pool::new(config, tls, connections.max(2)));
        let mut conn = pool.get()?;
        schema::migrate(&mut conn)?;
        let sealer = Arc::new(sealed::sealer(&mut conn, keys, seal)?);
        drop(conn);
        Ok(PgStore {
            pool,
            node_id: default_node_id(),
            lease_ms: LEASE_MS,
            sealer,
            key_lock: Mutex::new(()),
            floor: Mutex::default(),
            growth: growth::Growth::default(),
        })
    }

    /// The store as node `id` sees it, whose running tasks another node ends once it has
    /// not heartbeated for `lease_ms`.
    pub fn for_node(mut self, id: String, lease_ms: i64) -> PgStore {
        self.node_id = id;
        self.lease_ms = lease_ms;
        self
    }

    /// A version from its row (settings, code_dir, version).
    fn version_row(&self, function_id: &str, r: &postgres::Row) -> Result<Version> {
        let number = rows::u32_of(r.try_get(2)?);
        let settings = self
            .opened(
                r.try_get(0)?,
                place::SETTINGS,
                &version_row(function_id, number),
                || format!("version {number} of {function_id}"),
            )?
            .unwrap_or_default();
        let mut v: Version = serde_json::from_str(&settings)?;
        v.code_dir = r.try_get(1)?;
        Ok(v)
    }
}

impl Store for PgStore {
    fn function(&self, tenant: Option<&str>, key: &str) -> Result<Option<Function>> {
        // An id wins over a name, should one tenant's name equal another function's id.
        let mut conn = self.pool.get()?;
        for by in ["id", "name"] {
            let found = conn.query_opt(
                &format!(
                    "SELECT {FUNCTION_COLS} FROM functions WHERE {by} = $2 AND ($1::TEXT IS NULL OR tenant = $1)
                     ORDER BY tenant LIMIT 1"
                ),
                &[&tenant, &key],
            )?;
            if let Some(r) = found {
                return function_row(&r).map(Some);
            }
        }
        Ok(None)
    }

    fn functions(&self, tenant: Option<&str>) -> Result<Vec<Function>> {
        self.pool
            .get()?
            .query(
                &format!("SELECT {FUNCTION_COLS} FROM functions WHERE ($1::TEXT IS NULL OR tenant = $1) ORDER BY name, tenant"),
                &[&tenant],
            )?
            .iter()
            .map(function_row)
            .collect()
    }

    fn next_version(&self, tenant: &str, name: &str) -> Result<(String, u32)> {
        let found = self.pool.get()?.query_opt(
            "SELECT f.id, COALESCE((SELECT MAX(version) FROM versions WHERE function_id = f.id), 0)
             FROM functions f WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )?;
        Ok(match found {
            Some(r) => (r.try_get(0)?, rows::u32_of(r.try_get(1)?) + 1),
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
        let settings = self.seal_for(&key).text(
            place::SETTINGS,
            &version_row(function_id, version.version),
            &serde_json::to_string(version)?,
        );
        let number = i64::from(version.version);
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO functions (id, tenant, name, version, active, created_at, updated_at) VALUES ($1, $2, $3, $4, true, $5, $5)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            &[&function_id, &tenant, &name, &number, &now],
        )
        .map_err(conflict)?;
        tx.execute(
            "INSERT INTO versions (function_id, version, settings, code_dir, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&function_id, &number, &settings, &version.code_dir, &version.created_at],
        )
        .map_err(conflict)?;
        let row = tx.query_one(
            &format!("SELECT {FUNCTION_COLS} FROM functions WHERE id = $1"),
            &[&function_id],
        )?;
        tx.commit().map_err(conflict)?;
        function_row(&row)
    }

    fn version(&self, function_id: &str, version: u32) -> Result<Option<Version>> {
        self.pool
            .get()?
            .query_opt(
                "SELECT settings, code_dir, version FROM versions WHERE function_id = $1 AND version = $2",
                &[&function_id, &i64::from(version)],
            )?
            .map(|r| self.version_row(function_id, &r))
            .transpose()
    }

    fn versions(&self, function_id: &str) -> Result<Vec<Version>> {
        self.pool
            .get()?
            .query(
                "SELECT settings, code_dir, version FROM versions WHERE function_id = $1 ORDER BY version",
                &[&function_id],
            )?
            .iter()
            .map(|r| self.version_row(function_id, r))
            .collect()
    }

    fn set_active(&self, function_id: &str, active: bool) -> Result<()> {
        self.pool.get()?.execute(
            "UPDATE functions SET active = $2, updated_at = $3 WHERE id = $1",
            &[&function_id, &active, &now_ms()],
        )?;
        Ok(())
    }

    fn delete_function(&self, function_id: &str) -> Result<Vec<Version>> {
        let versions = self.versions(function_id)?;
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM versions WHERE function_id = $1",
            &[&function_id],
        )?;
        tx.execute(
            "DELETE FROM code_archives WHERE path >= $1 || '/' AND path < $1 || '0'",
            &[&function_id],
        )?;
        tx.execute("DELETE FROM functions WHERE id = $1", &[&function_id])?;
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
        // Each run of inserts (of finished tasks, of endings) in one statement, and all of
        // them and the claim sent at once, then the rollups and the commit: two round trips,
        // or one where nothing needs an answer first (submissions, sync calls' records).
        let writes = rows::statement_order(writes);
        let rows_added = writes
            .iter()
            .filter(|w| matches!(w, Write::Insert(_) | Write::Finished { .. }))
            .count();
        if ends::fits(&writes, limit) {
            let claimed = self.write_and_claim_at_once(&writes, (limit, bytes), seal)?;
            self.growth.added(rows_added, &self.pool);
            return Ok(claimed);
        }
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        let mut ended = Pending::default();
        ended.finished(&writes);
        let mut flight = Flight::default();
        flight.lead(ends::by_key());
        let mut inserts: Vec<(&Task, sealed::Seal<'_>)> = Vec::new();
        let mut finishes: Vec<(&Task, &crate::model::Completion, i64, sealed::Seal<'_>)> =
            Vec::new();
        let mut completes: Vec<End<'_>> = Vec::new();
        for w in writes.iter().copied() {
            if !matches!(w, Write::Insert(_)) {
                flight.inserts(&mut tx, &std::mem::take(&mut inserts), &mut ended)?;
            }
            if !matches!(w, Write::Finished { .. }) {
                flight.finished(&mut tx, &std::mem::take(&mut finishes), &mut ended)?;
            }
            if !matches!(w, Write::Complete { .. }) {
                flight.completes(&mut tx, std::mem::take(&mut completes), &mut ended)?;
            }
            match w {
                Write::Insert(task) => inserts.push((task, seal(&task.tenant))),
                Write::Complete {
                    task_id,
                    tenant,
                    completion,
                    at,
                } => completes.push((task_id, completion, *at, seal(tenant))),
                Write::Finished {
                    task,
                    completion,
                    at,
                } => finishes.push((task, completion, *at, seal(&task.tenant))),
            }
        }
        flight.inserts(&mut tx, &inserts, &mut ended)?;
        flight.finished(&mut tx, &finishes, &mut ended)?;
        flight.completes(&mut tx, completes, &mut ended)?;
        let now = now_ms();
        if limit > 0 {
            flight.claim(self.claim_step(now, (limit, bytes, true)));
        }
        let mut tasks = Vec::new();
        if flight.needs_answers() {
            let rows = flight.send(&mut tx, &mut ended)?.unwrap_or_default();
            let claimed = self.claimed(&mut tx, &rows, limit, now, &mut ended)?;
            let rest = claimed.rest((limit, bytes, true));
            tasks = claimed.tasks;
            if !claimed.damaged.is_empty() {
                tasks.extend(self.claim_in(&mut tx, rest, &mut ended)?);
            }
        }
        let also = notify_queued(&writes).into_iter().collect();
        rollups::commit(tx, flight.into_steps(), ended, also)?;
        self.growth.added(rows_added, &self.pool);
        Ok(tasks)
    }

    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>> {
        self.pool
            .get()?
            .query_opt(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE ($1::TEXT IS NULL OR tenant = $1) AND id = $2"),
                &[&tenant, &task_id],
            )?
            .map(|r| task_row(self, &r))
            .transpose()
    }

    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>> {
        self.pool
            .get()?
            .query(
                &format!("SELECT {TASK_COLS} FROM tasks WHERE function_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2"),
                &[&function_id, &i64::from(limit)],
            )?
            .iter()
            .map(|r| task_row(self, r))
            .collect()
    }

    fn queue_depth(&self) -> Result<u64> {
        let n: i64 = self
            .pool
            .get()?
            .query_one("SELECT COUNT(*) FROM tasks WHERE status = 'queued'", &[])?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn running(&self) -> Result<u64> {
        let n: i64 = self
            .pool
            .get()?
            .query_one("SELECT COUNT(*) FROM tasks WHERE status = 'running'", &[])?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn give_back(&self, task_ids: &[String]) -> Result<u64> {
        self.give_back_unstarted(task_ids)
    }

    fn recover(
        &self,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        self.recover_running(retries_left, backoff_ms)
    }

    fn cluster(&self) -> Option<&dyn crate::store::ClusterStore> {
        Some(self)
    }

    fn calls(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<Call>> {
        self.pool
            .get()?
            .query(
                &format!(
                    "SELECT {CALL_COLS} FROM tasks
                     WHERE finished_at >= $1 AND finished_at < $2 AND ($3::TEXT IS NULL OR tenant = $3) AND ($4::TEXT IS NULL OR function_id = $4)
                     ORDER BY finished_at"
                ),
                &[&since, &until, &tenant, &function_id],
            )?
            .iter()
            .map(|r| call_row(r, 0))
            .collect()
    }

    fn prune(&self, before: i64) -> Result<u64> {
        self.pool.get()?.execute(
            "DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < $1",
            &[&before],
        )
    }

    fn rollups(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        resolution: i64,
        since: i64,
        until: i64,
    ) -> Result<Vec<Rollup>> {
        rollups::read(
            &mut *self.pool.get()?,
            tenant,
            function_id,
            resolution,
            since,
            until,
        )
    }

    fn prune_rollups(&self, resolution: i64, before: i64) -> Result<u64> {
        rollups::prune(&mut *self.pool.get()?, resolution, before)
    }

    fn size(&self) -> Result<StoreSize> {
        let n: i64 = self
            .pool
            .get()?
            .query_one("SELECT pg_database_size(current_database())", &[])?
            .try_get(0)?;
        Ok(StoreSize {
            database_bytes: u64::try_from(n).unwrap_or(0),
            wal_bytes: 0,
        })
    }

    fn close(&self) -> Result<()> {
        // Every write was committed when it was made; the server keeps its own WAL.
        Ok(())
    }
}

impl AnomalyStore for PgStore {
    fn anomaly_state(&self) -> Result<(Option<i64>, Vec<crate::anomalies::Saved>)> {
        anomalies::state(&mut *self.pool.get()?)
    }

    fn save_anomaly_state(&self, through: i64, saved: &[crate::anomalies::Saved]) -> Result<()> {
        anomalies::save_state(&mut *self.pool.get()?, through, saved)
    }

    fn record_anomalies(
        &self,
        scored: &[(crate::anomalies::Key, String, crate::anomalies::Point)],
        events: &[crate::anomalies::Event],
    ) -> Result<()> {
        anomalies::record(&mut *self.pool.get()?, scored, events)
    }

    fn anomaly_events(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<crate::anomalies::Event>> {
        anomalies::events(
            &mut *self.pool.get()?,
            tenant,
            function_id,
            since,
            until,
            limit,
        )
    }

    fn anomaly_scores(
        &self,
        tenant: Option<&str>,
        function_id: &str,
        since: i64,
        until: i64,
    ) -> Result<Vec<(crate::anomalies::Series, crate::anomalies::Point)>> {
        anomalies::scores(&mut *self.pool.get()?, tenant, function_id, since, until)
    }

    fn prune_anomalies(&self, before: i64) -> Result<u64> {
        anomalies::prune(&mut *self.pool.get()?, before)
    }
}

impl AlertStore for PgStore {
    fn put_rule(&self, rule: &crate::alerts::Rule) -> Result<()> {
        alerts::put_rule(&mut *self.pool.get()?, rule)
    }

    fn rules(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Rule>> {
        alerts::rules(&mut *self.pool.get()?, tenant)
    }

    fn delete_rule(&self, tenant: Option<&str>, id: &str) -> Result<bool> {
        alerts::delete_rule(&mut *self.pool.get()?, tenant, id)
    }

    fn alert_phases(&self) -> Result<Vec<(String, String, crate::alerts::eval::Phase)>> {
        alerts::phases(&mut *self.pool.get()?)
    }

    fn save_alert_phases(
        &self,
        phases: &[(String, String, crate::alerts::eval::Phase)],
    ) -> Result<()> {
        alerts::save_phases(&mut *self.pool.get()?, phases)
    }

    fn put_subscription(&self, sub: &crate::alerts::Subscription) -> Result<()> {
        alerts::put_subscription(&mut *self.pool.get()?, sub)
    }

    fn subscriptions(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Subscription>> {
        alerts::subscriptions(&mut *self.pool.get()?, tenant)
    }

    fn delete_subscriptions(
        &self,
        tenant: Option<&str>,
        id: Option<&str>,
        channel_target: Option<(&str, &str)>,
    ) -> Result<u64> {
        alerts::delete_subscriptions(&mut *self.pool.get()?, tenant, id, channel_target)
    }

    fn prune_notifications(&self, before: i64) -> Result<u64> {
        alerts::prune_notifications(&mut *self.pool.get()?, before)
    }

    fn enqueue(
        &self,
        n: &crate::alerts::Notification,
        subscriptions: &[crate::alerts::Subscription],
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        alerts::enqueue(&mut *self.pool.get()?, n, subscriptions)
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
        alerts::due(&mut *self.pool.get()?, now, limit)
    }

    fn record_attempt(
        &self,
        delivery_id: &str,
        outcome: Attempt,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        alerts::record_attempt(&mut *self.pool.get()?, delivery_id, outcome, error, now)
    }

    fn deliveries(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        alerts::deliveries(&mut *self.pool.get()?, tenant, limit)
    }

    fn oldest_queued_at(&self) -> Result<Option<i64>> {
        Ok(self
            .pool
            .get()?
            .query_one(
                "SELECT MIN(created_at) FROM tasks WHERE status = 'queued'",
                &[],
            )?
            .try_get(0)?)
    }
}

/// Where `writes` queue tasks, tells idle workers on every node so, at the commit (not
/// before).
fn notify_queued(writes: &[&Write]) -> Option<Queued<'static>> {
    writes
        .iter()
        .any(|w| matches!(w, Write::Insert(t) if t.status == crate::model::TaskStatus::Queued))
        .then(|| Queued {
            sql: "SELECT pg_notify($1, $2)".to_string(),
            params: vec![
                Box::new(cluster::CHANNEL) as Box<dyn ToSql + Sync>,
                Box::new(Signal::Queued.encode()),
            ],
        })
}
