//! The platform: what every route, the CLI and the queue call. It validates, stores, and runs
//! functions in sandboxes; it knows nothing about HTTP.

mod catalog;
mod monitor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudfunc_sandbox::{
    Engine, Error as SandboxError, Invocation, InvokeOptions, Limits, Outcome, Runtime, Sandbox,
    SandboxSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::archive::{self, ArchiveError, ArchiveLimits};
use crate::auth::Caller;
use crate::isolation::{Engines, Isolation};
use crate::model::{
    now_ms, valid_name, Completion, Function, Task, TaskError, TaskStatus, TaskUsage, Version,
};
use crate::model::{DEFAULT_KEEP_WARM_S, DEFAULT_MAX_INSTANCES};
use crate::pool::{Key, Lease, Pool, PoolError, Request, Start};
use crate::store::{Recorder, Store, StoreError, Write};

pub use catalog::Catalog;

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
    /// At a concurrency or capacity limit: try again after the delay.
    #[error("{message}")]
    TooBusy {
        message: String,
        retry_after: Duration,
    },
    /// Our fault; logged with its cause, shown without it.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for PlatformError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => PlatformError::Conflict(e.to_string()),
            e => PlatformError::Internal(e.into()),
        }
    }
}

impl From<ArchiveError> for PlatformError {
    fn from(e: ArchiveError) -> Self {
        match e {
            ArchiveError::Io(io) => PlatformError::Internal(io.into()),
            e => PlatformError::BadRequest(e.to_string()),
        }
    }
}

/// A `Result` with [`PlatformError`].
pub type Result<T> = std::result::Result<T, PlatformError>;

/// Settings a deploy may give, from a manifest, form fields or JSON. Every field is optional;
/// what is missing comes from the previous version or the defaults.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub name: Option<String>,
    #[serde(alias = "language")]
    pub runtime: Option<String>,
    #[serde(alias = "function_name")]
    pub handler: Option<String>,
    /// Seconds.
    pub timeout: Option<f64>,
    pub timeout_ms: Option<u64>,
    /// MiB.
    #[serde(alias = "memory_mb", alias = "memory_limit_mb")]
    pub memory: Option<u64>,
    /// Thousandths of a core.
    #[serde(alias = "cpu_millicores")]
    pub cpu: Option<u32>,
    pub env: Option<BTreeMap<String, String>>,
    pub max_retries: Option<u32>,
    /// `container` or `gvisor`.
    pub isolation: Option<String>,
    /// Seconds a sandbox stays warm after a call.
    pub keep_warm: Option<u64>,
    pub min_instances: Option<u32>,
    pub max_instances: Option<u32>,
}

impl Settings {
    /// Fields of `other` win over ours.
    pub fn overlay(mut self, other: Settings) -> Settings {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            name,
            runtime,
            handler,
            timeout,
            timeout_ms,
            memory,
            cpu,
            env,
            max_retries,
            isolation,
            keep_warm,
            min_instances,
            max_instances
        );
        self
    }

    /// Reads `cloudfunc.toml` or `manifest.json` from a code directory, if there is one.
    pub fn from_code_dir(dir: &Path) -> Result<Settings> {
        let toml_path = dir.join("cloudfunc.toml");
        if toml_path.is_file() {
            let text = std::fs::read_to_string(&toml_path)
                .map_err(|e| PlatformError::BadRequest(format!("cloudfunc.toml: {e}")))?;
            return toml::from_str(&text).map_err(|e| {
                PlatformError::BadRequest(format!("cloudfunc.toml is invalid: {}", e.message()))
            });
        }
        let json_path = dir.join("manifest.json");
        if json_path.is_file() {
            let text = std::fs::read(&json_path)
                .map_err(|e| PlatformError::BadRequest(format!("manifest.json: {e}")))?;
            return serde_json::from_slice(&text)
                .map_err(|e| PlatformError::BadRequest(format!("manifest.json is invalid: {e}")));
        }
        Ok(Settings::default())
    }
}

/// The code of a deploy.
#[derive(Debug, Clone)]
pub enum Code {
    /// A ZIP archive.
    Zip(bytes::Bytes),
    /// Single files (name, content): seed 002's inline code, seed 004's `python_file`.
    Files(Vec<(String, Vec<u8>)>),
    /// Keep the previous version's code (a settings-only update).
    Unchanged,
}

/// Server-wide settings of the platform.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Where code versions are stored.
    pub code_dir: PathBuf,
    /// Default per-call timeout.
    pub default_timeout_ms: u64,
    /// Default memory limit.
    pub default_memory_mb: u64,
    /// A function's `max_instances` when it sets none.
    pub max_concurrency: usize,
    /// Caps on uploaded archives.
    pub archive: ArchiveLimits,
    /// Longest timeout a function may ask for.
    pub max_timeout_ms: u64,
    /// Largest memory a function may ask for.
    pub max_memory_mb: u64,
}

impl PlatformConfig {
    /// Defaults with code under `data_dir/code`.
    pub fn new(data_dir: &Path) -> Self {
        PlatformConfig {
            code_dir: data_dir.join("code"),
            default_timeout_ms: 30_000,
            default_memory_mb: 256,
            max_concurrency: 8,
            archive: ArchiveLimits::default(),
            max_timeout_ms: 15 * 60 * 1000,
            max_memory_mb: 4096,
        }
    }
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
    sync_running: AtomicU64,
    /// Queue workers between a claim and the stored end of what they claimed.
    queue_running: AtomicU64,
    /// Set at shutdown: the queue workers claim nothing more.
    stopping: std::sync::atomic::AtomicBool,
    pool: Arc<Pool>,
    config: PlatformConfig,
    wake: tokio::sync::Notify,
    started: Instant,
    /// The host's CPU jiffies (busy, total) when health was last read.
    cpu_sample: std::sync::Mutex<Option<(u64, u64)>>,
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
        Ok(Platform {
            inner: Arc::new(Inner {
                recorder: Recorder::start(store.clone())?,
                sync_running: AtomicU64::new(0),
                queue_running: AtomicU64::new(0),
                stopping: std::sync::atomic::AtomicBool::new(false),
                catalog: Catalog::default(),
                store,
                pool,
                config,
                wake: tokio::sync::Notify::new(),
                started: Instant::now(),
                cpu_sample: std::sync::Mutex::new(None),
            }),
        })
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

    /// The warm pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.inner.pool
    }

    /// Sync calls under way: queued tasks are counted by the store, these only here.
    fn sync_running(&self) -> u64 {
        self.inner.sync_running.load(Ordering::Relaxed)
    }

    /// The engine of `level`, or a clear error if this server cannot provide it.
    fn engine(&self, level: Isolation) -> Result<&Engine> {
        self.engines().get(level).map_err(PlatformError::BadRequest)
    }

    /// At shutdown: lets the queue workers finish the tasks they hold (for up to
    /// [`QUEUE_GRACE`]) and claim no more, then stops every kept sandbox and stores what is
    /// queued to be stored. A task still running past the grace stays `running` on disk, and
    /// the next start's recovery ends or requeues it.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_waiters();
        let deadline = Instant::now() + QUEUE_GRACE;
        while self.inner.queue_running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pool = self.inner.pool.clone();
        let _ = blocking(move || pool.shutdown()).await;
        self.inner.recorder.settle().await;
    }

    async fn drain(&self, function_id: &str) {
        let (pool, id) = (self.inner.pool.clone(), function_id.to_string());
        let _ = blocking(move || pool.drain(&id)).await;
    }

    /// Deploys `code` as `name` (a new function, or its next version).
    pub async fn deploy(
        &self,
        caller: &Caller,
        settings: Settings,
        code: Code,
    ) -> Result<(Function, Version)> {
        let store = self.inner.store.clone();
        let name = settings.name.clone().ok_or_else(|| {
            PlatformError::BadRequest(
                "a name is required (form field, JSON field or manifest)".into(),
            )
        })?;
        if !valid_name(&name) {
            return Err(PlatformError::BadRequest(format!(
                "invalid function name {name:?}: use 1-64 of a-z, 0-9, '_' and '-'"
            )));
        }
        let tenant = caller.tenant.clone();
        let previous = {
            let (store, tenant, name) = (store.clone(), tenant.clone(), name.clone());
            blocking(move || -> Result<Option<Version>> {
                let Some(f) = store.function(Some(&tenant), &name)? else {
                    return Ok(None);
                };
                Ok(store.version(&f.id, f.version)?)
            })
            .await??
        };
        let (function_id, number) = {
            let (store, tenant, name) = (store.clone(), tenant.clone(), name.clone());
            blocking(move || store.next_version(&tenant, &name)).await??
        };
        let this = self.clone();
        let tenant2 = tenant.clone();
        let name2 = name.clone();
        blocking(move || {
            this.write_version(
                &tenant2,
                &function_id,
                &name2,
                number,
                settings,
                code,
                previous,
            )
        })
        .await?
    }

    #[allow(clippy::too_many_arguments)]
    fn write_version(
        &self,
        tenant: &str,
        function_id: &str,
        name: &str,
        number: u32,
        settings: Settings,
        code: Code,
        previous: Option<Version>,
    ) -> Result<(Function, Version)> {
        let config = &self.inner.config;
        let code_dir = config.code_dir.join(function_id).join(number.to_string());
        let mut fresh_code = true;
        match code {
            Code::Zip(bytes) => {
                archive::extract(&bytes, &code_dir, config.archive)?;
            }
            Code::Files(files) => write_files(&code_dir, &files)?,
            Code::Unchanged => fresh_code = false,
        }
        let cleanup = |e: PlatformError| {
            if fresh_code {
                let _ = std::fs::remove_dir_all(&code_dir);
            }
            e
        };
        let code_path = if fresh_code {
            code_dir.clone()
        } else {
            PathBuf::from(
                &previous
                    .as_ref()
                    .ok_or_else(|| {
                        PlatformError::BadRequest(
                            "no code given and no earlier version to keep".into(),
                        )
                    })?
                    .code_dir,
            )
        };
        let manifest = Settings::from_code_dir(&code_path).map_err(cleanup)?;
        let from_previous = previous.as_ref().map(settings_of).unwrap_or_default();
        let merged = from_previous.overlay(manifest).overlay(settings);
        let version = self
            .version_from(number, merged, &code_path)
            .map_err(cleanup)?;
        if fresh_code {
            self.precompile(&version, &code_path);
        }
        let loaded = self.load(function_id, name, &version).map_err(cleanup)?;
        let pool = &self.inner.pool;
        let function = match self
            .inner
            .store
            .add_version(tenant, function_id, name, &version)
        {
            Ok(function) => function,
            Err(e) => {
                if let Some(lease) = loaded {
                    pool.discard(lease);
                }
                return Err(cleanup(e.into()));
            }
        };
        self.inner.catalog.invalidate();
        // Sandboxes of earlier versions are not kept for the calls to come; the one that just
        // loaded this version is, so its first call finds it warm.
        let drained = pool.drain(function_id);
        if let Some(lease) = loaded {
            pool.keep(lease, drained);
        }
        Ok((function, version))
    }

    /// Compiles new code once, in a sandbox of its function's isolation, so that its cold
    /// starts do not (see [`Engine::precompile`]). A failure costs only that: the function
    /// compiles its code at each cold start, as it would have anyway.
    fn precompile(&self, version: &Version, code_dir: &Path) {
        let Ok(runtime) = version.runtime.parse::<Runtime>() else {
            return;
        };
        let done = self
            .engine(version.isolation)
            .map_err(|e| e.to_string())
            .and_then(|engine| {
                engine
                    .precompile(runtime, code_dir)
                    .map_err(|e| cloudfunc_sandbox::error_chain(&e))
            });
        if let Err(why) = done {
            eprintln!(
                "cloudfunc: {} is deployed uncompiled: {why}",
                code_dir.display()
            );
        }
    }

    fn version_from(&self, number: u32, s: Settings, code_dir: &Path) -> Result<Version> {
        let config = &self.inner.config;
        let runtime = match &s.runtime {
            Some(r) => r
                .parse::<Runtime>()
                .map_err(|e| PlatformError::BadRequest(e.to_string()))?,
            None => guess_runtime(code_dir).ok_or_else(|| {
                PlatformError::BadRequest(
                    "cannot tell the runtime: set runtime to \"python\" or \"node\"".into(),
                )
            })?,
        };
        if !runtime.available() {
            return Err(PlatformError::BadRequest(format!(
                "the {runtime} runtime is not installed on this server"
            )));
        }
        let timeout_ms = match (s.timeout_ms, s.timeout) {
            (Some(ms), _) => ms,
            // Finite and positive, and capped below: the cast cannot wrap.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            (None, Some(secs)) if secs.is_finite() && secs > 0.0 => {
                (secs * 1000.0).round().min(u64::MAX as f64) as u64
            }
            (None, Some(_)) => {
                return Err(PlatformError::BadRequest(
                    "timeout must be a positive number of seconds".into(),
                ))
            }
            (None, None) => config.default_timeout_ms,
        };
        if timeout_ms == 0 || timeout_ms > config.max_timeout_ms {
            return Err(PlatformError::BadRequest(format!(
                "timeout must be between 1 ms and {} ms",
                config.max_timeout_ms
            )));
        }
        let memory_mb = s.memory.unwrap_or(config.default_memory_mb);
        if !(16..=config.max_memory_mb).contains(&memory_mb) {
            return Err(PlatformError::BadRequest(format!(
                "memory must be between 16 and {} MiB",
                config.max_memory_mb
            )));
        }
        let cpu = s.cpu.unwrap_or(1000);
        if !(10..=64_000).contains(&cpu) {
            return Err(PlatformError::BadRequest(
                "cpu must be between 10 and 64000 millicores".into(),
            ));
        }
        let env = s.env.unwrap_or_default();
        for key in env.keys() {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(PlatformError::BadRequest(format!(
                    "environment variable name {key:?} is not [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
        }
        if let Some(h) = &s.handler {
            let ok = !h.is_empty()
                && h.len() <= 128
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok {
                return Err(PlatformError::BadRequest(format!(
                    "handler {h:?} must look like module.function"
                )));
            }
        }
        let isolation = match &s.isolation {
            Some(name) => name
                .parse::<Isolation>()
                .map_err(PlatformError::BadRequest)?,
            None => self.engines().default_isolation(),
        };
        let keep_warm_s = s.keep_warm.unwrap_or(DEFAULT_KEEP_WARM_S);
        if keep_warm_s > 3600 {
            return Err(PlatformError::BadRequest(
                "keep_warm must be between 0 and 3600 seconds".into(),
            ));
        }
        let max_instances = s.max_instances.unwrap_or_else(|| {
            u32::try_from(config.max_concurrency).unwrap_or(DEFAULT_MAX_INSTANCES)
        });
        let min_instances = s.min_instances.unwrap_or(0);
        if !(1..=1000).contains(&max_instances)
            || min_instances > 100
            || min_instances > max_instances
        {
            return Err(PlatformError::BadRequest(
                "instances: max_instances must be 1 to 1000, min_instances 0 to 100 and at most max_instances".into(),
            ));
        }
        // Refused now, not when it first runs.
        self.engine(isolation)?;
        Ok(Version {
            version: number,
            runtime: runtime.name().to_string(),
            handler: s.handler,
            timeout_ms,
            memory_mb,
            cpu_millicores: cpu,
            env,
            max_retries: s.max_retries.unwrap_or(0).min(10),
            isolation,
            keep_warm_s,
            min_instances,
            max_instances,
            code_dir: code_dir.to_string_lossy().into_owned(),
            created_at: now_ms(),
        })
    }

    /// Proves that `version` loads (a missing handler or a syntax error is reported at
    /// deploy), in a sandbox from the pool that is then kept for its first call. At the
    /// pool's caps it proves it in a sandbox of its own, stopped at once.
    fn load(&self, function_id: &str, name: &str, version: &Version) -> Result<Option<Lease>> {
        let (key, request) = request_for(function_id, name, version);
        match self.inner.pool.load(&key, &request) {
            Ok(lease) => Ok(Some(lease)),
            Err(PoolError::Sandbox(e)) => Err(load_error(e)),
            Err(PoolError::Unavailable(why)) => Err(PlatformError::BadRequest(why)),
            Err(PoolError::Full { .. } | PoolError::Busy { .. }) => {
                match Sandbox::create(self.engine(version.isolation)?, request.spec) {
                    Ok(sandbox) => sandbox
                        .shutdown()
                        .map(|()| None)
                        .map_err(|e| PlatformError::Internal(e.into())),
                    Err(e) => Err(load_error(e)),
                }
            }
        }
    }

    /// Functions the caller sees.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<Function>> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        Ok(blocking(move || store.functions(scope.as_deref())).await??)
    }

    /// One function (by id or name) with its versions.
    pub async fn get(&self, caller: &Caller, key: &str) -> Result<(Function, Vec<Version>)> {
        let function = self.find(caller, key).await?;
        let (store, id) = (self.inner.store.clone(), function.id.clone());
        let versions = blocking(move || store.versions(&id)).await??;
        Ok((function, versions))
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

    /// Activates or deactivates a function.
    pub async fn set_active(&self, caller: &Caller, key: &str, active: bool) -> Result<Function> {
        let function = self.find(caller, key).await?;
        let (store, id) = (self.inner.store.clone(), function.id.clone());
        blocking(move || store.set_active(&id, active)).await??;
        self.inner.catalog.invalidate();
        self.drain(&function.id).await;
        Ok(Function { active, ..function })
    }

    /// Deletes a function, its versions and their code. Its finished tasks stay readable.
    pub async fn delete(&self, caller: &Caller, key: &str) -> Result<Function> {
        let function = self.find(caller, key).await?;
        let (this, id) = (self.clone(), function.id.clone());
        let code_root = self.inner.config.code_dir.join(&function.id);
        // Records of its calls so far go in first, so none is written after the deletion.
        let store = self.settled_store().await;
        blocking(move || -> Result<()> {
            store.delete_function(&id)?;
            // Before the code goes, so that no new call resolves to it.
            this.inner.catalog.invalidate();
            let _ = std::fs::remove_dir_all(&code_root);
            Ok(())
        })
        .await??;
        // After the deletion, so that no call can take a new sandbox for it meanwhile.
        self.drain(&function.id).await;
        Ok(function)
    }

    /// Resolves `key` (optionally `name@version`) to a runnable function version.
    async fn runnable(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
    ) -> Result<(Function, Version)> {
        let (this, caller, key) = (self.clone(), caller.clone(), key.to_string());
        blocking(move || this.resolve(&caller, &key, version)).await?
    }

    /// Resolves `key` (optionally `name@version`) to a runnable function version, from the
    /// catalog (blocking on a miss).
    fn resolve(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
    ) -> Result<(Function, Version)> {
        let (key, version) = versioned(key, version)?;
        let (store, catalog) = (self.inner.store.as_ref(), &self.inner.catalog);
        let function = catalog
            .function(store, caller.scope(), key)?
            .ok_or_else(|| no_function(key))?;
        if !function.active {
            return Err(PlatformError::Inactive(function.name.clone()));
        }
        let number = version.unwrap_or(function.version);
        let version = catalog
            .version(store, &function.id, number)?
            .ok_or_else(|| {
                PlatformError::NotFound(format!("function {key:?} has no version {number}"))
            })?;
        Ok((function, version))
    }

    /// [`Platform::resolve`] from what the catalog holds, without a store read: `None` when
    /// it would need one.
    fn resolve_held(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
    ) -> Option<Result<(Function, Version)>> {
        let (key, version) = match versioned(key, version) {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        let (function, version) = self.inner.catalog.held(caller.scope(), key, version)?;
        if !function.active {
            return Some(Err(PlatformError::Inactive(function.name.clone())));
        }
        Some(Ok((function, version)))
    }

    /// Runs a function now and returns its finished task. The task is stored once, when it
    /// has ended, behind the reply (reads settle the recorder first, so they still find it).
    pub async fn invoke(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<Task> {
        let (this, caller, key) = (self.clone(), caller.clone(), key.to_string());
        // A task of its own: should the caller go away mid-call, the call still ends, its
        // sandbox goes back to the pool, and it is recorded.
        let (ended, refused) = tokio::spawn(async move {
            let _running = Running::enter(&this.inner.sync_running);
            let (task, completion, refused) = this.call(&caller, &key, version, payload).await?;
            let at = now_ms();
            let ended = task.clone().ended(completion.clone(), at);
            // The caller has its result: the record need not be on disk before the reply.
            this.inner
                .recorder
                .write_behind(Write::Finished {
                    task: Box::new(task),
                    completion,
                    at,
                })
                .await?;
            Ok::<_, PlatformError>((ended, refused))
        })
        .await
        .map_err(|e| PlatformError::Internal(e.into()))??;
        match refused {
            Some(e) => Err(e),
            None => Ok(ended),
        }
    }

    /// A sync call, on the async runtime: the lookup from the catalog (a blocking thread
    /// reads the store on a miss), the wait for a sandbox and the exchange with it take no
    /// thread of their own (see [`execute`]).
    async fn call(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<(Task, Completion, Option<PlatformError>)> {
        let (function, version) = match self.resolve_held(caller, key, version) {
            Some(found) => found?,
            None => {
                let (this, caller, key) = (self.clone(), caller.clone(), key.to_string());
                blocking(move || this.resolve(&caller, &key, version)).await??
            }
        };
        let mut task = Task::queued(&function, version.version, "sync", payload);
        task.status = TaskStatus::Running;
        task.attempts = 1;
        task.started_at = Some(task.created_at);
        let ran = execute(&self.inner.pool, &function, &version, &task, true).await;
        let (completion, refused) = settle(&task, ran);
        log_invocation(&task, &version, &completion);
        Ok((task, completion, refused))
    }

    /// Queues a function run; the task is on disk when this returns.
    pub async fn submit(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<Task> {
        let (function, version) = self.runnable(caller, key, version).await?;
        let task = Task::queued(&function, version.version, "async", payload);
        self.inner
            .recorder
            .write(Write::Insert(task.clone()))
            .await?;
        self.inner.wake.notify_one();
        Ok(task)
    }

    /// A task as the caller sees it.
    pub async fn task(&self, caller: &Caller, task_id: &str) -> Result<Task> {
        let (store, scope, id) = (
            self.settled_store().await,
            caller.scope().map(String::from),
            task_id.to_string(),
        );
        blocking(move || store.task(scope.as_deref(), &id))
            .await??
            .ok_or_else(|| PlatformError::NotFound(format!("no task {task_id:?}")))
    }

    /// Recent tasks of a function.
    pub async fn recent(&self, caller: &Caller, key: &str, limit: u32) -> Result<Vec<Task>> {
        let function = self.find(caller, key).await?;
        let store = self.settled_store().await;
        Ok(blocking(move || store.recent_tasks(&function.id, limit)).await??)
    }

    /// Runs a claimed queued `task` in a sandbox from the pool and stores how it ended.
    /// Stores how a stored task ended.
    async fn end(&self, task_id: &str, completion: Completion) -> Result<()> {
        Ok(self
            .inner
            .recorder
            .write(Write::Complete {
                task_id: task_id.into(),
                completion,
                at: now_ms(),
            })
            .await?)
    }

    /// Deletes finished tasks and rollups past their retention, now and then every hour.
    pub fn start_retention(&self, retention: Retention) {
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let store = store.clone();
                let retention = retention.clone();
                let pruned = blocking(move || retention.apply(store.as_ref(), now_ms())).await;
                match pruned {
                    Ok(Ok((0, 0))) => {}
                    Ok(Ok((tasks, rollups))) => eprintln!(
                        "cloudfunc: retention removed {tasks} finished task(s) and {rollups} rollup row(s)"
                    ),
                    other => eprintln!("cloudfunc: retention failed: {other:?}"),
                }
            }
        });
    }

    /// Crash recovery, then `workers` queue workers until the process ends.
    pub async fn start_queue(&self, workers: usize) -> Result<crate::store::Recovery> {
        let store = self.inner.store.clone();
        let report = blocking(move || {
            let versions = store.clone();
            store.recover(
                &|task: &Task| {
                    versions
                        .version(&task.function_id, task.version)
                        .ok()
                        .flatten()
                        .is_some_and(|v| task.attempts <= v.max_retries)
                },
                &|attempts| 500 * (1i64 << attempts.min(8)),
            )
        })
        .await??;
        for _ in 0..workers.max(1) {
            let platform = self.clone();
            tokio::spawn(async move { platform.worker().await });
        }
        Ok(report)
    }

    async fn worker(self) {
        loop {
            // Counted before the flag is read, and the flag is set before shutdown reads the
            // count: a claim either is waited for or does not happen.
            let running = Running::enter(&self.inner.queue_running);
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let store = self.inner.store.clone();
            let claimed = blocking(move || store.claim_next()).await;
            let task = match claimed {
                Ok(Ok(Some(task))) => task,
                Ok(Ok(None)) => {
                    // Nothing held while idle: a stop need not wait for this wait.
                    drop(running);
                    let _ = tokio::time::timeout(
                        Duration::from_millis(250),
                        self.inner.wake.notified(),
                    )
                    .await;
                    continue;
                }
                other => {
                    drop(running);
                    eprintln!("cloudfunc: queue worker could not claim a task: {other:?}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = self.run_claimed(&task).await {
                eprintln!("cloudfunc: task {} failed to run: {e:?}", task.task_id);
                let completion = failed("sandbox_failure", "the platform could not run this task");
                if let Err(e) = self.end(&task.task_id, completion).await {
                    eprintln!(
                        "cloudfunc: task {}: its end was not stored: {e:?}",
                        task.task_id
                    );
                }
            }
        }
    }

    /// Runs a claimed task and stores how it ended. As a sync call, it looks its function up
    /// in the catalog (on a blocking thread when the store must be read) and runs on the async
    /// runtime ([`execute`]).
    async fn run_claimed(&self, task: &Task) -> Result<()> {
        let held = self
            .inner
            .catalog
            .held(None, &task.function_id, Some(task.version));
        let (function, version) = match held {
            Some((function, version)) => (Some(function), Some(version)),
            None => {
                let (this, t) = (self.clone(), task.clone());
                blocking(move || -> Result<_> {
                    let (store, catalog) = (this.inner.store.as_ref(), &this.inner.catalog);
                    let function = catalog.function(store, None, &t.function_id)?;
                    let version = match &function {
                        Some(_) => catalog.version(store, &t.function_id, t.version)?,
                        None => None,
                    };
                    Ok((function, version))
                })
                .await??
            }
        };
        let (completion, refused) = match (function, version) {
            (Some(function), Some(version)) if function.active => {
                let ran = execute(&self.inner.pool, &function, &version, task, false).await;
                let ended = settle(task, ran);
                log_invocation(task, &version, &ended.0);
                ended
            }
            (_, version) => {
                let why = if version.is_some() {
                    "the function was deactivated before this task ran"
                } else {
                    "the function was deleted before this task ran"
                };
                (failed("function_unavailable", why), None)
            }
        };
        self.end(&task.task_id, completion).await?;
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn settings_of(v: &Version) -> Settings {
    Settings {
        name: None,
        runtime: Some(v.runtime.clone()),
        handler: v.handler.clone(),
        timeout: None,
        timeout_ms: Some(v.timeout_ms),
        memory: Some(v.memory_mb),
        cpu: Some(v.cpu_millicores),
        env: Some(v.env.clone()),
        max_retries: Some(v.max_retries),
        isolation: Some(v.isolation.name().into()),
        keep_warm: Some(v.keep_warm_s),
        min_instances: Some(v.min_instances),
        max_instances: Some(v.max_instances),
    }
}

/// The runtime a code directory is written for, by its conventional module names.
pub fn guess_runtime(dir: &Path) -> Option<Runtime> {
    let has = |names: &[&str]| names.iter().any(|n| dir.join(n).is_file());
    if has(&["function.py", "handler.py", "main.py"]) {
        Some(Runtime::Python)
    } else if has(&[
        "index.js",
        "handler.js",
        "function.js",
        "main.js",
        "index.mjs",
        "index.cjs",
    ]) {
        Some(Runtime::Node)
    } else {
        None
    }
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| PlatformError::Internal(e.into()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| PlatformError::Internal(e.into()))?;
    for (name, content) in files {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            let _ = std::fs::remove_dir_all(dir);
            return Err(PlatformError::BadRequest(format!(
                "file name {name:?} must be a plain name like handler.py"
            )));
        }
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(|e| PlatformError::Internal(e.into()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| PlatformError::Internal(e.into()))?;
    }
    Ok(())
}

fn spec_for(name: &str, version: &Version) -> SandboxSpec {
    let runtime = version.runtime.parse().unwrap_or(Runtime::Python);
    let mut spec = SandboxSpec::new(runtime, &version.code_dir);
    spec.handler = version.handler.clone();
    spec.env = version.env.clone();
    spec.function_name = name.to_string();
    spec.function_version = version.version.to_string();
    spec.limits = Limits {
        memory_bytes: version.memory_mb * 1024 * 1024,
        cpu_millicores: version.cpu_millicores,
        ..Limits::default()
    };
    spec
}

fn failed(kind: &str, message: &str) -> Completion {
    Completion {
        status: TaskStatus::Failed,
        result: None,
        error: Some(TaskError {
            kind: kind.into(),
            error_type: String::new(),
            message: message.into(),
            traceback: String::new(),
        }),
        logs: String::new(),
        logs_truncated: false,
        usage: None,
    }
}

/// How a task ends when its sandbox does not start.
fn start_failure(task: &Task, e: SandboxError) -> Completion {
    match e {
        SandboxError::FunctionInit { error, logs } => Completion {
            status: TaskStatus::Failed,
            result: None,
            error: Some(TaskError {
                kind: "init_failed".into(),
                error_type: error.kind,
                message: error.message,
                traceback: error.traceback,
            }),
            logs: logs.text,
            logs_truncated: logs.truncated,
            usage: None,
        },
        e => {
            eprintln!(
                "cloudfunc: task {}: the sandbox could not start: {e:?}",
                task.task_id
            );
            failed("sandbox_failure", "the sandbox could not be started")
        }
    }
}

/// Why a version does not load, for the deployer.
fn load_error(e: SandboxError) -> PlatformError {
    match e {
        SandboxError::FunctionInit { error, logs } => PlatformError::Unprocessable(format!(
            "the function does not load: {}: {}{}",
            error.kind,
            error.message,
            if logs.text.is_empty() {
                String::new()
            } else {
                format!(" (output: {})", logs.text.trim())
            }
        )),
        SandboxError::InitCrashed { exit, .. } => PlatformError::Unprocessable(format!(
            "the runtime died while loading the function ({exit})"
        )),
        SandboxError::StartTimeout(t) => {
            PlatformError::Unprocessable(format!("the function did not load within {t:?}"))
        }
        e => PlatformError::Internal(e.into()),
    }
}

/// What the pool needs to know of a version of function `function_id`, named `name`.
fn request_for(function_id: &str, name: &str, version: &Version) -> (Key, Request) {
    (
        Key {
            function_id: function_id.to_string(),
            version: version.version,
        },
        Request {
            isolation: version.isolation,
            spec: spec_for(name, version),
            keep_warm: Duration::from_secs(version.keep_warm_s),
            min_instances: version.min_instances as usize,
            max_instances: version.max_instances as usize,
        },
    )
}

/// How long finished tasks and each resolution of rollups are kept. A rollup's calls stay
/// counted after their raw records are gone; `None` keeps forever.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub tasks: Duration,
    pub minute_rollups: Option<Duration>,
    pub hour_rollups: Option<Duration>,
    pub day_rollups: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 86_400);
        Retention {
            tasks: days(7),
            minute_rollups: Some(days(30)),
            hour_rollups: Some(days(365)),
            day_rollups: None,
        }
    }
}

impl Retention {
    /// Prunes what is past its time as of `now`; returns (tasks, rollup rows) removed.
    pub fn apply(&self, store: &dyn Store, now: i64) -> Result<(u64, u64)> {
        let cutoff =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let tasks = store.prune(cutoff(self.tasks))?;
        let mut rollups = 0;
        for (resolution, keep) in crate::rollup::RESOLUTIONS.into_iter().zip([
            self.minute_rollups,
            self.hour_rollups,
            self.day_rollups,
        ]) {
            if let Some(keep) = keep {
                rollups += store.prune_rollups(resolution, cutoff(keep))?;
            }
        }
        Ok((tasks, rollups))
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

/// Counts a call under way while it lives.
struct Running<'a>(&'a AtomicU64);

impl<'a> Running<'a> {
    fn enter(count: &'a AtomicU64) -> Running<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a graceful stop waits for the tasks the queue workers are running.
const QUEUE_GRACE: Duration = Duration::from_secs(30);

/// How a run ended, and whether its caller is refused: a call that found the function at its
/// concurrency limit (or the server at its caps) ends as throttled.
fn settle(
    task: &Task,
    ran: std::result::Result<Completion, PoolError>,
) -> (Completion, Option<PlatformError>) {
    match ran {
        Ok(completion) => (completion, None),
        Err(e @ (PoolError::Busy { retry_after, .. } | PoolError::Full { retry_after })) => (
            failed("throttled", &e.to_string()),
            Some(PlatformError::TooBusy {
                message: e.to_string(),
                retry_after,
            }),
        ),
        Err(PoolError::Unavailable(why)) => (failed("sandbox_failure", &why), None),
        Err(PoolError::Sandbox(e)) => (start_failure(task, e), None),
    }
}

/// Runs one task in a sandbox from the pool and says how it ended. It waits for a sandbox
/// and for the reply without holding a thread; a call that ends its sandbox (a timeout, a
/// crash) is finished on a blocking thread, which kills the sandbox and waits for it.
pub async fn execute(
    pool: &Arc<Pool>,
    function: &Function,
    version: &Version,
    task: &Task,
    sync: bool,
) -> std::result::Result<Completion, PoolError> {
    let (key, request) = request_for(&function.id, &function.name, version);
    let mut lease = pool.acquire_async(&key, &request, sync).await?;
    let (engine_name, start) = (lease.sandbox.backend_name(), lease.start);
    let options = InvokeOptions {
        timeout: Duration::from_millis(version.timeout_ms),
        request_id: task.task_id.clone(),
    };
    let result = match lease.sandbox.invoke_async(&task.payload, &options).await {
        Ok(exchanged) if exchanged.finishes_at_once() => {
            let invocation = lease.sandbox.finish(exchanged);
            pool.release(lease);
            Ok(invocation)
        }
        Ok(exchanged) => {
            let pool = pool.clone();
            tokio::task::spawn_blocking(move || {
                let invocation = lease.sandbox.finish(exchanged);
                pool.release(lease);
                invocation
            })
            .await
            .map_err(|e| format!("finishing the call: {e}"))
        }
        Err(e) => {
            pool.release(lease);
            Err(format!("{e:?}"))
        }
    };
    Ok(completion_of(result, start, engine_name, version, task))
}

/// The completion of a call from what its sandbox reported.
fn completion_of(
    result: std::result::Result<Invocation, String>,
    start: Start,
    engine_name: &str,
    version: &Version,
    task: &Task,
) -> Completion {
    let call = match result {
        Ok(call) => call,
        Err(e) => {
            eprintln!("cloudfunc: task {}: invoke failed: {e}", task.task_id);
            return failed("sandbox_failure", "the sandbox failed during the call");
        }
    };
    // A sandbox a deploy loaded serves its first call warm: that call waited for no start.
    let init = match start {
        Start::Warm => Duration::ZERO,
        _ => call.usage.init_duration,
    };
    let usage = TaskUsage {
        duration_ms: call.usage.duration.as_secs_f64() * 1000.0,
        init_duration_ms: init.as_secs_f64() * 1000.0,
        cpu_ms: call.usage.cpu_time.as_secs_f64() * 1000.0,
        peak_memory_bytes: call.usage.peak_memory_bytes,
        cold: start != Start::Warm,
        start: start.name().into(),
        backend: engine_name.to_string(),
        isolation: version.isolation,
    };
    let error = |kind: &str, error_type: String, message: String, traceback: String| {
        Some(TaskError {
            kind: kind.into(),
            error_type,
            message,
            traceback,
        })
    };
    let (status, result, error) = match call.outcome {
        Outcome::Succeeded { result } => (TaskStatus::Succeeded, Some(result), None),
        Outcome::Raised { error: e } => (
            TaskStatus::Failed,
            None,
            error("raised", e.kind, e.message, e.traceback),
        ),
        Outcome::OutputNotSerializable { error: e } => (
            TaskStatus::Failed,
            None,
            error("output_not_serializable", e.kind, e.message, e.traceback),
        ),
        Outcome::OutputTooLarge { message, .. } => (
            TaskStatus::Failed,
            None,
            error("output_too_large", String::new(), message, String::new()),
        ),
        Outcome::Timeout { timeout_ms } => (
            TaskStatus::Timeout,
            None,
            error(
                "timeout",
                String::new(),
                format!("the function ran past its {timeout_ms} ms timeout and was killed"),
                String::new(),
            ),
        ),
        Outcome::OutOfMemory { limit_bytes } => (
            TaskStatus::OutOfMemory,
            None,
            error(
                "out_of_memory",
                String::new(),
                format!(
                    "the function used more than its {} MiB of memory and was killed",
                    limit_bytes >> 20
                ),
                String::new(),
            ),
        ),
        Outcome::Crashed { exit } => (
            TaskStatus::Crashed,
            None,
            error(
                "crashed",
                String::new(),
                format!("the runtime died ({exit})"),
                String::new(),
            ),
        ),
        Outcome::SandboxFailure { message } => (
            TaskStatus::Failed,
            None,
            error("sandbox_failure", String::new(), message, String::new()),
        ),
    };
    Completion {
        status,
        result,
        error,
        logs: call.logs.text,
        logs_truncated: call.logs.truncated,
        usage: Some(usage),
    }
}

/// One line per invocation in the server's log, Lambda's REPORT line in spirit.
fn log_invocation(task: &Task, version: &Version, c: &Completion) {
    let untimed = TaskUsage::default();
    let usage = c.usage.as_ref().unwrap_or(&untimed);
    let billed = (usage.duration_ms / 1.0).ceil();
    // Rendered first and written whole: stderr is unbuffered, and formatting a JSON value
    // straight into it costs a write(2) per fragment.
    #[derive(Serialize)]
    struct Line<'a> {
        event: &'static str,
        task_id: &'a str,
        function: &'a str,
        version: u32,
        status: &'static str,
        duration_ms: f64,
        billed_duration_ms: f64,
        memory_size_mb: u64,
        max_memory_used_mb: f64,
        init_duration_ms: f64,
        cold: bool,
    }
    let mut line = serde_json::to_vec(&Line {
        event: "invocation",
        task_id: &task.task_id,
        function: &task.function,
        version: version.version,
        status: c.status.as_str(),
        duration_ms: usage.duration_ms,
        billed_duration_ms: billed,
        memory_size_mb: version.memory_mb,
        max_memory_used_mb: usage.peak_memory_bytes as f64 / 1048576.0,
        init_duration_ms: usage.init_duration_ms,
        cold: usage.cold,
    })
    .unwrap_or_default();
    line.push(b'\n');
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &line);
}
