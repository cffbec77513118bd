//! The platform: what every route, the CLI and the queue call. It validates, stores, and runs
//! functions in sandboxes; it knows nothing about HTTP.
//!
//! One `impl Platform` spread over files by responsibility: [`settings`] (the settings table
//! and its resolution), `deploy` (versions, activation, deletion), `invoke` (sync calls and
//! the one path every call runs through), `queue` (async tasks and their workers),
//! `retention`, `monitor` (metrics, health, Prometheus), `anomalies` (anomaly detection fed
//! from the minute rollups), `alerts` (rules and subscriptions), `outbox` (notifications and their delivery),
//! `chains` and `chain_steps` (chains and their durable runs) and the [`Catalog`] of lookups.

mod alerts;
mod anomalies;
mod catalog;
mod chain_steps;
mod chains;
mod cluster;
mod code;
mod deploy;
mod destinations;
mod held;
mod idempotency;
mod invoke;
mod monitor;
mod outbox;
mod queue;
mod quotas;
mod retention;
pub mod secrets;
pub mod settings;
pub mod space;

pub use cluster::NodeConfig;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::archive::{ArchiveError, ArchiveLimits};
use crate::auth::Caller;
use crate::isolation::Engines;
use crate::logging::Sparse;
use crate::model::Function;
use crate::pool::Pool;
use crate::store::{Recorder, Store, StoreError};
use crate::wall::WallClock;

pub use alerts::{AlertConfig, Unsubscribe};
pub use catalog::Catalog;
pub use chains::ChainSpec;
pub use code::Restored;
pub use deploy::Code;
pub use invoke::{execute, Looked};
pub use quotas::Quotas;
pub use retention::Retention;
pub use settings::{guess_runtime, Bounds, Settings};
pub use space::Space;

/// Errors the platform reports; the HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The client sent something unusable; the message says what to fix.
    #[error("{0}")]
    BadRequest(String),
    /// The code was stored but does not load (syntax error, missing handler).
    #[error("{0}")]
    Unprocessable(String),
    /// No such function, version or task for this caller.
    #[error("{0}")]
    NotFound(String),
    /// The function exists but is deactivated.
    #[error("function {0} is deactivated: activate it first")]
    Inactive(String),
    /// A concurrent change won.
    #[error("{0}")]
    Conflict(String),
    /// A tenant's cap on functions or stored code would be passed.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The data directory's disk is (nearly) full: nothing was done.
    #[error("{0}")]
    InsufficientStorage(String),
    /// At a concurrency or capacity limit: try again after the delay.
    #[error("{message}")]
    TooBusy {
        message: String,
        retry_after: Duration,
    },
    /// The database cannot be reached for now (restarting, failing over, its connections
    /// refused): try again after the delay.
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    /// Only an admin may do this.
    #[error("{0}")]
    Forbidden(String),
    /// A stored record failed its integrity check: reported for that record, not served.
    #[error("{0}")]
    Damaged(String),
    /// Our fault; logged with its cause, shown without it.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The answer when the disk refuses a write.
fn no_space() -> PlatformError {
    PlatformError::InsufficientStorage(
        "the server's data directory is out of disk space: nothing was done; retry once space is freed".into(),
    )
}

/// An I/O error as the platform reports it: a full disk is the client's to know of.
pub(crate) fn io_error(e: std::io::Error) -> PlatformError {
    if space::is_full(&e) {
        no_space()
    } else {
        PlatformError::Internal(e.into())
    }
}

impl From<StoreError> for PlatformError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => PlatformError::Conflict(e.to_string()),
            StoreError::Full => no_space(),
            StoreError::Damaged(m) => {
                tracing::error!(record = %m, "a sealed record failed its integrity check");
                PlatformError::Damaged(m)
            }
            // Not our fault, and likely over in seconds: a client that retries gets through
            // (a 500 would tell it the server is broken).
            e @ (StoreError::Transient(_) | StoreError::Unavailable(_)) => {
                static REFUSED: Sparse = Sparse::new(10_000);
                if let Some(refused) = REFUSED.due() {
                    tracing::warn!(refused, error = %cloudfunc_sandbox::error_chain(&e), "requests refused with 503: the database is unavailable for now (said at most every 10 s)");
                }
                PlatformError::Unavailable {
                    message: "the database is unavailable for now; retry shortly".into(),
                    retry_after: Duration::from_secs(1),
                }
            }
            e => PlatformError::Internal(e.into()),
        }
    }
}

impl From<ArchiveError> for PlatformError {
    fn from(e: ArchiveError) -> Self {
        match e {
            ArchiveError::Io(io) => io_error(io),
            e => PlatformError::BadRequest(e.to_string()),
        }
    }
}

/// A `Result` with [`PlatformError`].
pub type Result<T> = std::result::Result<T, PlatformError>;

/// Server-wide settings of the platform (see [`crate::config`] for where they come from).
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// The data directory, whose free space is watched.
    pub data_dir: PathBuf,
    /// Bytes of it kept free: below, new work is refused (0: never).
    pub min_free_bytes: u64,
    /// Where code versions are stored.
    pub code_dir: PathBuf,
    /// Defaults and bounds of functions' settings.
    pub bounds: Bounds,
    /// Caps on uploaded archives.
    pub archive: ArchiveLimits,
    /// Where wall-clock time comes from (calls' times, the minutes anomaly detection
    /// watches).
    pub clock: Arc<dyn WallClock>,
    /// How anomalies are judged.
    pub anomalies: crate::anomalies::WatchConfig,
    /// How alert rules are evaluated and notifications delivered.
    pub alerts: AlertConfig,
    /// Abuse limits per tenant.
    pub quotas: Quotas,
}

/// The platform. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Platform {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    /// Function lookups of calls, from memory between changes.
    catalog: Catalog,
    /// Writes of tasks, committed in groups.
    recorder: Recorder,
    /// Sync calls under way (they are stored when they end).
    sync_running: Arc<AtomicU64>,
    /// Tasks between their claim and their stored end, and the claim under way.
    queue_running: Arc<AtomicU64>,
    /// Set at shutdown: the queue workers claim nothing more.
    stopping: std::sync::atomic::AtomicBool,
    /// Tasks claimed and refused a sandbox because the server is stopping, to give back to
    /// the queue.
    unstarted: parking_lot::Mutex<Vec<String>>,
    pool: Arc<Pool>,
    config: PlatformConfig,
    /// Wakes every background loop at shutdown.
    wake: tokio::sync::Notify,
    /// Wakes the queue's claimer: tasks were queued (here or on another node), or the stop
    /// began. Its own, so that a submission never spends its wake-up on another loop.
    queued: tokio::sync::Notify,
    started: Instant,
    /// The host's CPU jiffies (busy, total) when health was last read.
    cpu_sample: std::sync::Mutex<Option<(u64, u64)>>,
    /// The store's figures health and the exposition reported last, when they were read and
    /// how long that took (see `monitor::health_figures_reused_for`).
    health_figures: tokio::sync::Mutex<Option<monitor::StoreFigures>>,
    /// The data directory's free space.
    space: Arc<Space>,
    /// Anomaly detection on the minute rollups.
    anomalies: anomalies::Anomalies,
    /// Alert rules, their evaluation and the notifications' delivery.
    alerting: alerts::Alerting,
    /// Turns of the async chain runs driven at once.
    chain_turns: Arc<tokio::sync::Semaphore>,
    /// The tenants' invocation and deploy rates.
    rates: quotas::Rates,
    /// This node among the others sharing the store.
    membership: cluster::Membership,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PlatformError::Internal(e.into()))
}

impl Platform {
    /// A platform over `store`, running sandboxes from `pool`.
    pub fn new(
        store: Arc<dyn Store>,
        pool: Arc<Pool>,
        config: PlatformConfig,
    ) -> std::io::Result<Platform> {
        // Code a deploy had staged when the process last stopped belongs to no version.
        let _ = std::fs::remove_dir_all(config.code_dir.join(deploy::INCOMING));
        // Extracted code is plaintext: only the server reads it.
        for what in crate::datadir::private_dir(&config.code_dir)? {
            tracing::warn!(%what, "the code directory let other users in; tightened");
        }
        let space = Arc::new(Space::new(&config.data_dir, config.min_free_bytes));
        if tokio::runtime::Handle::try_current().is_ok() {
            space.watch();
        }
        Ok(Platform {
            inner: Arc::new(Inner {
                recorder: Recorder::start(store.clone())?,
                sync_running: Arc::default(),
                queue_running: Arc::default(),
                stopping: std::sync::atomic::AtomicBool::new(false),
                unstarted: parking_lot::Mutex::default(),
                catalog: Catalog::default(),
                store,
                pool,
                anomalies: anomalies::Anomalies::new(config.anomalies.clone()),
                alerting: alerts::Alerting::new(&config.alerts),
                chain_turns: chains::turns(),
                rates: quotas::Rates::new(&config.quotas),
                membership: cluster::Membership::default(),
                config,
                wake: tokio::sync::Notify::new(),
                queued: tokio::sync::Notify::new(),
                started: Instant::now(),
                cpu_sample: std::sync::Mutex::new(None),
                health_figures: tokio::sync::Mutex::new(None),
                space,
            }),
        })
    }

    /// Refuses new work that needs the disk while its free space is below the floor.
    fn require_space(&self) -> Result<()> {
        if self.inner.space.low() {
            return Err(PlatformError::InsufficientStorage(format!(
                "the server's data directory has less than {} MiB free: nothing was done; retry once space is freed",
                self.inner.config.min_free_bytes >> 20
            )));
        }
        Ok(())
    }

    /// The data directory's free space.
    pub fn space(&self) -> &Space {
        &self.inner.space
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// The store, once every write queued before now is in it: a sync call's record is
    /// written behind its reply, and a read after the reply must still find it.
    async fn settled_store(&self) -> Arc<dyn Store> {
        self.inner.recorder.settle().await;
        self.inner.store.clone()
    }

    /// The sandbox engines.
    pub fn engines(&self) -> &Engines {
        self.inner.pool.engines()
    }

    /// The engine of `level`, or a clear error if this server cannot provide it.
    fn engine(&self, level: crate::isolation::Isolation) -> Result<&cloudfunc_sandbox::Engine> {
        self.engines().get(level).map_err(PlatformError::BadRequest)
    }

    /// Sync calls under way: queued tasks are counted by the store, these only here.
    fn sync_running(&self) -> u64 {
        self.inner.sync_running.load(Ordering::Relaxed)
    }

    /// At shutdown: lets the queue workers finish the tasks they run (for up to
    /// [`QUEUE_GRACE`]) and claim no more, gives the tasks they claimed and had not started
    /// back to the queue, then stops every kept sandbox and stores what is queued to be
    /// stored. A task still running past the grace stays `running` on disk, and the next
    /// start's recovery ends or requeues it.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.pool.stop_lending_to_tasks();
        self.inner.wake.notify_waiters();
        self.inner.queued.notify_one();
        let deadline = Instant::now() + QUEUE_GRACE;
        while self.inner.queue_running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            self.give_back_unstarted().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.give_back_unstarted().await;
        self.leave_cluster().await;
        let pool = self.inner.pool.clone();
        let _ = blocking(move || pool.shutdown()).await;
        if let Err(e) = self.save_detectors(true).await {
            tracing::warn!(error = %e, "the anomaly detectors could not be saved; a restart replays the minutes since their last save");
        }
        let lost = self.inner.recorder.close().await;
        if lost > 0 {
            tracing::error!(lost, "task records the store still refused were lost at the stop (each is in the log above)");
        }
        let store = self.inner.store.clone();
        if let Ok(Err(e)) = blocking(move || store.close()).await {
            tracing::warn!(error = %e, "closing the store failed");
        }
    }

    async fn drain(&self, function_id: &str) {
        let (pool, id) = (self.inner.pool.clone(), function_id.to_string());
        let _ = blocking(move || pool.drain(&id)).await;
    }

    async fn find(&self, caller: &Caller, key: &str) -> Result<Function> {
        let (store, caller, key) = (self.inner.store.clone(), caller.clone(), key.to_string());
        blocking(move || {
            store
                .function(caller.scope(), &key)?
                .ok_or_else(|| no_function(&key))
        })
        .await?
    }
}

/// `key` and the version asked for: `name@3` asks for version 3, else `version`.
fn versioned(key: &str, version: Option<u32>) -> Result<(&str, Option<u32>)> {
    match key.rsplit_once('@') {
        Some((name, v)) => {
            let number = v
                .parse::<u32>()
                .map_err(|_| PlatformError::BadRequest(format!("bad version {v:?} in {key:?}")))?;
            Ok((name, Some(number)))
        }
        None => Ok((key, version)),
    }
}

/// The answer for a function the caller cannot see.
fn no_function(key: &str) -> PlatformError {
    PlatformError::NotFound(format!("no function {key:?}"))
}

/// Counts a call under way while it lives; owned, so it can travel with a spawned task.
struct Running(Arc<AtomicU64>);

impl Running {
    fn enter(count: &Arc<AtomicU64>) -> Running {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a graceful stop waits for the tasks the queue workers are running.
const QUEUE_GRACE: Duration = Duration::from_secs(30);
