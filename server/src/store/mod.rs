//! Storage of functions, versions and tasks.
//!
//! [`Store`] is the seam between the platform and its database: [`SqliteStore`] (in
//! [`sqlite`]) is the embedded default, one file, WAL, every write in a transaction, so a task
//! is on disk before its 202 is sent and survives `kill -9`; [`PgStore`] (in [`postgres`]) keeps
//! the same records in a PostgreSQL server, which several nodes can share. Writes of
//! tasks come in batches ([`Write`], [`Recorder`]) so that many calls share one commit.

mod alerts;
mod anomalies;
mod chains;
pub mod cluster;
#[cfg(test)]
pub(crate) mod flaky;
mod keys;
pub mod postgres;
mod recorder;
pub(crate) mod records;
mod retry;
pub mod sealed;
pub mod sqlite;

pub use alerts::{AlertStore, Attempt};
pub use anomalies::AnomalyStore;
pub use chains::ChainStore;
pub use cluster::{ClusterStore, NodeInfo, Signal};
pub use keys::KeyStore;
pub use postgres::PgStore;
pub use recorder::{Recorder, Want};
pub use retry::Retry;
pub use sealed::{KeyInfo, Reencrypted, SealedStore, SecretInfo};
pub use sqlite::SqliteStore;

use crate::model::{Completion, Function, Task, Version};
use crate::rollup::{Call, Stats};

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed, for a reason a retry would not change (a constraint, a bug).
    #[error("the database failed")]
    Sqlite(#[source] rusqlite::Error),
    /// PostgreSQL failed, for a reason a retry would not change.
    #[error("the database failed: {0}")]
    Postgres(#[source] ::postgres::Error),
    /// The database's disk is full (or its quota spent): the same write may succeed once
    /// space is freed.
    #[error("the database's disk is full")]
    Full,
    /// The database cannot be written for now (an I/O error, a lock held too long): the same
    /// write may succeed later.
    #[error("the database is unavailable for now")]
    Transient(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored JSON column is unreadable.
    #[error("a stored record is corrupt")]
    Corrupt(#[from] serde_json::Error),
    /// Two deploys raced for the same version.
    #[error("another deploy of this function finished first; retry")]
    Conflict,
    /// The store cannot take writes now (the recorder stopped).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database was written by a newer cloudfunc.
    #[error("the database's schema is version {found}, newer than this cloudfunc's {known}: upgrade cloudfunc")]
    NewerSchema { found: i64, known: i64 },
    /// A sealed record failed to open (tampered with, or damaged on disk): not served.
    #[error("{0}")]
    Damaged(String),
    /// The master key or the data keys are wrong or missing.
    #[error(transparent)]
    Keys(#[from] crate::atrest::AtRestError),
}

impl StoreError {
    /// Whether the same write may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Full | StoreError::Transient(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        if let Some(damaged) = sqlite::damaged(&e) {
            return damaged;
        }
        match e.sqlite_error_code() {
            Some(C::DiskFull) => StoreError::Full,
            Some(
                C::SystemIoFailure
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen
                | C::ReadOnly
                | C::OutOfMemory,
            ) => StoreError::Transient(Box::new(e)),
            _ => StoreError::Sqlite(e),
        }
    }
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
        /// Whose task it is (its records are sealed with this tenant's key).
        tenant: String,
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
    /// Whose task it is.
    pub fn tenant(&self) -> &str {
        match self {
            Write::Insert(task) => &task.tenant,
            Write::Finished { task, .. } => &task.tenant,
            Write::Complete { tenant, .. } => tenant,
        }
    }

    /// The task written.
    pub fn task_id(&self) -> &str {
        match self {
            Write::Insert(task) => &task.task_id,
            Write::Finished { task, .. } => &task.task_id,
            Write::Complete { task_id, .. } => task_id,
        }
    }
}

/// Where functions, versions and tasks are kept (and anomaly detection's findings and
/// alerting's rules and outbox, chains and their runs, and code archives, secrets and keys,
/// through [`AnomalyStore`], [`AlertStore`], [`ChainStore`] and [`SealedStore`]). `tenant: None` means an admin, who sees all.
pub trait Store:
    AnomalyStore + AlertStore + ChainStore + KeyStore + SealedStore + Send + Sync + std::fmt::Debug
{
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
    /// Deletes a function, its versions and their code archives; returns the versions (their
    /// extracted code is the caller's).
    fn delete_function(&self, function_id: &str) -> Result<Vec<Version>>;
    /// Applies `writes` in order, then takes up to `limit` of the oldest runnable queued tasks
    /// and marks them running (none where `limit` is 0), all in one transaction: all of it or
    /// none. A finished task is added to its rollups once, however often its end is stored.
    /// Returns the tasks taken, oldest first.
    ///
    /// The queue claims with the ends of the tasks that ran before: an end is durable no
    /// later than the claim that reuses its task's worker slot.
    fn write_and_claim(&self, writes: &[Write], limit: usize) -> Result<Vec<Task>> {
        self.write_and_claim_within(writes, limit, u64::MAX)
    }
    /// [`Store::write_and_claim`] whose claim also stops before the task whose payload would
    /// take the payloads claimed past `bytes` (as stored); the first task is taken whatever
    /// its size. The queue bounds the memory its claimed tasks hold with it.
    fn write_and_claim_within(
        &self,
        writes: &[Write],
        limit: usize,
        bytes: u64,
    ) -> Result<Vec<Task>>;
    /// Applies `writes` in order, in one transaction: all of them or none.
    fn write(&self, writes: &[Write]) -> Result<()> {
        self.write_and_claim(writes, 0).map(drop)
    }
    /// Takes the `limit` (at least one) oldest runnable queued tasks and marks them running,
    /// in one transaction; oldest first.
    fn claim(&self, limit: usize) -> Result<Vec<Task>> {
        self.write_and_claim(&[], limit.max(1))
    }
    /// Takes the oldest runnable queued task and marks it running.
    fn claim_next(&self) -> Result<Option<Task>> {
        Ok(self.claim(1)?.into_iter().next())
    }

    /// A task as `tenant` sees it.
    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>>;
    /// Recent tasks of a function, newest first.
    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>>;
    /// Tasks waiting in the queue.
    fn queue_depth(&self) -> Result<u64>;
    /// Tasks running now.
    fn running(&self) -> Result<u64>;
    /// At a graceful stop: puts the tasks of `task_ids` that this node claimed and never
    /// started back in the queue, in their old place and with their attempt uncounted, for
    /// the next claim on any node. A task no longer `running` is left as it is. Returns how
    /// many went back.
    fn give_back(&self, task_ids: &[String]) -> Result<u64>;
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
    /// This node's part in a cluster of nodes sharing the store; `None` where a node is
    /// alone (SQLite).
    fn cluster(&self) -> Option<&dyn ClusterStore> {
        None
    }
    /// How big the store's files are now.
    fn size(&self) -> Result<StoreSize>;
    /// At a graceful stop, after the last write: leaves everything durable and compact.
    fn close(&self) -> Result<()>;
}

/// The store's files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreSize {
    /// The database.
    pub database_bytes: u64,
    /// Its write-ahead log (0 where there is none).
    pub wal_bytes: u64,
}

/// One rollup row: the calls of one function with one outcome in one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    /// The bucket's start, Unix ms.
    pub start: i64,
    pub tenant: String,
    pub function_id: String,
    pub function: String,
    pub outcome: String,
    pub stats: Stats,
}
