//! Sync calls, and the one path every call runs through ([`execute`]): a sandbox from the
//! pool, the exchange with it on the async runtime, and the call's completion from what the
//! sandbox reported.

use std::time::{Duration, Instant};

use cloudfunc_sandbox::{
    Error as SandboxError, Invocation, InvokeOptions, Limits, Outcome, SandboxSpec,
};
use serde_json::Value;
use tracing::Instrument;

use super::{blocking, no_function, versioned, Platform, PlatformError, Result, Running};
use crate::auth::Caller;
use crate::model::{
    Completion, ErrorKind, Function, Mode, Task, TaskError, TaskStatus, TaskUsage, Version,
};
use crate::pool::{Key, Lend, PoolError, Request, Start};
use crate::store::Write;

impl Platform {
    /// Resolves `key` (optionally `name@version`) to a runnable function version.
    pub(super) async fn runnable(
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
            .version(store, &function.id, number, |v| self.local_code(v))?
            .ok_or_else(|| {
                PlatformError::NotFound(format!("function {key:?} has no version {number}"))
            })?;
        super::secrets::missing(&version)?;
        Ok((function, version))
    }

    /// Function `function_id` and its version `number` as they stand: from the catalog, or
    /// read from the store on a blocking thread. `None` for what no longer exists.
    pub(super) async fn current(
        &self,
        function_id: &str,
        number: u32,
    ) -> Result<(Option<Function>, Option<Version>)> {
        if let Some((function, version)) = self.inner.catalog.held(None, function_id, Some(number))
        {
            return Ok((Some(function), Some(version)));
        }
        let (this, id) = (self.clone(), function_id.to_string());
        blocking(move || -> Result<_> {
            let (store, catalog) = (this.inner.store.as_ref(), &this.inner.catalog);
            let function = catalog.function(store, None, &id)?;
            let version = match &function {
                Some(_) => catalog.version(store, &id, number, |v| this.local_code(v))?,
                None => None,
            };
            Ok((function, version))
        })
        .await?
    }

    /// Version `number` of function `function_id` again, for a call that waited while a
    /// function was drained (`None` if the store cannot say now); else how that call ends,
    /// saying why it cannot run now.
    async fn again(
        &self,
        function_id: &str,
        number: u32,
    ) -> std::result::Result<Option<Version>, Completion> {
        match self.current(function_id, number).await {
            Ok((function, version)) => {
                let when = "while this call waited for a sandbox";
                match may_run(function.as_ref(), version.as_ref(), when) {
                    Ok(_) => Ok(version),
                    Err(why) => Err(unavailable(&why)),
                }
            }
            // The drain may well have been another function's: the call goes on with what it
            // had rather than fail while the store cannot answer.
            Err(e) => {
                tracing::warn!(function_id, error = %e, "a function could not be looked up again; the call goes on as it was");
                Ok(None)
            }
        }
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
        if let Err(e) = super::secrets::missing(&version) {
            return Some(Err(e));
        }
        Some(Ok((function, version)))
    }

    /// [`Platform::resolve`] from the catalog without leaving the async runtime when it
    /// holds the answer (a blocking thread reads the store on a miss).
    pub(super) async fn lookup(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
    ) -> Result<(Function, Version)> {
        match self.resolve_held(caller, key, version) {
            Some(found) => found,
            None => {
                let (this, caller, key) = (self.clone(), caller.clone(), key.to_string());
                blocking(move || this.resolve(&caller, &key, version)).await?
            }
        }
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
        self.admit_invocation(caller)?;
        let (this, caller, key) = (self.clone(), caller.clone(), key.to_string());
        // A task of its own: should the caller go away mid-call, the call still ends, its
        // sandbox goes back to the pool, and it is recorded.
        let (ended, refused) = tokio::spawn(async move {
            let _running = Running::enter(&this.inner.sync_running);
            let (task, completion, refused) = this.call(&caller, &key, version, payload).await?;
            let at = this.inner.config.clock.now_ms();
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
        self.require_space()?;
        let looked_at = self.inner.pool.drains();
        let (function, version) = self.lookup(caller, key, version).await?;
        let mut task = Task::queued(&function, version.version, Mode::Sync, payload);
        task.status = TaskStatus::Running;
        task.attempts = 1;
        task.started_at = Some(task.created_at);
        let looked = Looked {
            function: &function,
            version: &version,
            at: looked_at,
        };
        let (completion, refused) = run(self, looked, &task, true, None).await;
        Ok((task, completion, refused))
    }

    /// A task as the caller sees it.
    pub async fn task(&self, caller: &Caller, task_id: &str) -> Result<Task> {
        let (store, scope, id) = (
            self.settled_store().await,
            caller.scope().map(String::from),
            task_id.to_string(),
        );
        let stored = blocking(move || store.task(scope.as_deref(), &id)).await??;
        // A record the store refused for now is kept in memory: it is the latest word.
        let kept = self.inner.recorder.kept().find(task_id);
        let visible = |t: &Task| caller.scope().is_none_or(|s| s == t.tenant);
        let task = match (stored, kept) {
            (
                stored,
                Some(Write::Finished {
                    task,
                    completion,
                    at,
                }),
            ) if visible(&task) => Some(stored.unwrap_or(*task).ended(completion, at)),
            (Some(stored), Some(Write::Complete { completion, at, .. })) => {
                Some(stored.ended(completion, at))
            }
            (None, Some(Write::Insert(task))) if visible(&task) => Some(task),
            (stored, _) => stored,
        };
        task.ok_or_else(|| PlatformError::NotFound(format!("no task {task_id:?}")))
    }

    /// Recent tasks of a function.
    pub async fn recent(&self, caller: &Caller, key: &str, limit: u32) -> Result<Vec<Task>> {
        let function = self.find(caller, key).await?;
        let store = self.settled_store().await;
        Ok(blocking(move || store.recent_tasks(&function.id, limit)).await??)
    }
}

/// How a call ends that its deadline (a chain run's timeout) passed before it got a sandbox.
fn not_run_by_deadline() -> Completion {
    let mut ended = Completion::failed(ErrorKind::Timeout, &PoolError::Deadline.to_string());
    ended.status = TaskStatus::Timeout;
    ended
}

/// What [`Platform::current`] found, if it may run now; else why not, saying `when`
/// ("before this task ran") the function changed. A call refused so ends
/// `function_unavailable` ([`unavailable`]).
pub(super) fn may_run<'a>(
    function: Option<&'a Function>,
    version: Option<&'a Version>,
    when: &str,
) -> std::result::Result<(&'a Function, &'a Version), String> {
    match (function, version) {
        (Some(function), Some(version)) if function.active => {
            match super::secrets::missing(version) {
                Ok(()) => Ok((function, version)),
                Err(e) => Err(e.to_string()),
            }
        }
        (Some(_), Some(_)) => Err(format!("the function was deactivated {when}")),
        _ => Err(format!("the function was deleted {when}")),
    }
}

/// How a call ends that [`may_run`] refused, for `why`.
pub(super) fn unavailable(why: &str) -> Completion {
    Completion::failed(ErrorKind::FunctionUnavailable, why)
}

fn spec_for(name: &str, version: &Version) -> SandboxSpec {
    let mut spec = SandboxSpec::new(version.runtime, &version.code_dir);
    spec.handler = version.handler.clone();
    spec.env = version.env.clone();
    spec.env.extend(
        version
            .secret_env
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    spec.function_name = name.to_string();
    spec.function_version = version.version.to_string();
    spec.limits = Limits {
        memory_bytes: version.memory_mb * 1024 * 1024,
        cpu_millicores: version.cpu_millicores,
        ..Limits::default()
    };
    spec
}

/// How a task ends when its sandbox does not start.
pub(super) fn start_failure(task: &Task, e: SandboxError) -> Completion {
    match e {
        SandboxError::FunctionInit { error, logs } => Completion {
            status: TaskStatus::Failed,
            result: None,
            error: Some(TaskError {
                kind: ErrorKind::InitFailed,
                error_type: error.kind,
                message: error.message,
                traceback: error.traceback,
            }),
            logs: logs.text,
            logs_truncated: logs.truncated,
            usage: None,
        },
        e => {
            tracing::error!(
                task_id = %task.task_id,
                error = %cloudfunc_sandbox::error_chain(&e),
                "the sandbox could not start"
            );
            Completion::failed(
                ErrorKind::SandboxFailure,
                "the sandbox could not be started",
            )
        }
    }
}

/// What the pool needs to know of a version of function `function_id`, named `name`.
pub(super) fn request_for(function_id: &str, name: &str, version: &Version) -> (Key, Request) {
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
            resolved_at: None,
            until: None,
        },
    )
}

/// How a run ended, and whether its caller is refused: a call that found the function at its
/// concurrency limit (or the server at its caps) ends as throttled.
fn settle(
    task: &Task,
    ran: std::result::Result<Completion, PoolError>,
) -> (Completion, Option<PlatformError>) {
    match ran {
        Ok(completion) => (completion, None),
        Err(e @ (PoolError::Busy { retry_after, .. } | PoolError::Full { retry_after })) => (
            Completion::failed(ErrorKind::Throttled, &e.to_string()),
            Some(PlatformError::TooBusy {
                message: e.to_string(),
                retry_after,
            }),
        ),
        Err(PoolError::Unavailable(why)) => {
            (Completion::failed(ErrorKind::SandboxFailure, &why), None)
        }
        Err(PoolError::Sandbox(e)) => (start_failure(task, e), None),
        // [`execute`] looks the version up again, or ends the call, instead: seen here only
        // for code still not there after a few looks.
        Err(e @ (PoolError::Stale | PoolError::Deadline | PoolError::CodeGone)) => (
            Completion::failed(ErrorKind::SandboxFailure, &e.to_string()),
            None,
        ),
        // Only the queue's tasks are refused so, and it gives them back ([`run_queued`]).
        Err(e @ PoolError::Stopping) => (
            Completion::failed(ErrorKind::Throttled, &e.to_string()),
            Some(PlatformError::TooBusy {
                message: e.to_string(),
                retry_after: Duration::from_secs(1),
            }),
        ),
    }
}

/// Runs `task` ([`execute`]) in a span of its own, then says how it ended, whether its caller
/// is refused, and logs it. `until` cuts the call short (as its timeout does) at that instant.
pub(super) async fn run(
    platform: &Platform,
    looked: Looked<'_>,
    task: &Task,
    sync: bool,
    until: Option<Instant>,
) -> (Completion, Option<PlatformError>) {
    // At debug: at the default level a span per call cost its fields' formatting and an enter
    // and exit per poll (about 2 % of a warm call's CPU), to repeat on the invocation line
    // what that line says itself; the events inside a call name their task or sandbox.
    let span =
        tracing::debug_span!("call", task_id = %task.task_id, function = %looked.function.name);
    async {
        let lend = if sync { Lend::Sync } else { Lend::Task };
        let ran = execute(platform, looked, task, lend, until).await;
        ended(task, looked.version, ran)
    }
    .instrument(span)
    .await
}

/// [`run`] for a task the queue claimed: `None` where it never started, because the server
/// is stopping ([`PoolError::Stopping`]), and so may go back to the queue.
pub(super) async fn run_queued(
    platform: &Platform,
    looked: Looked<'_>,
    task: &Task,
) -> Option<(Completion, Option<PlatformError>)> {
    let span =
        tracing::debug_span!("call", task_id = %task.task_id, function = %looked.function.name);
    async {
        match execute(platform, looked, task, Lend::Queued, None).await {
            Err(PoolError::Stopping) => None,
            ran => Some(ended(task, looked.version, ran)),
        }
    }
    .instrument(span)
    .await
}

/// A function and its version as a call looked them up, and the pool's count of drains
/// ([`Pool::drains`](crate::pool::Pool::drains)) read before it did: a drain since sends the
/// call to look again before a sandbox starts.
#[derive(Debug, Clone, Copy)]
pub struct Looked<'a> {
    pub function: &'a Function,
    pub version: &'a Version,
    pub at: u64,
}

/// How a call that ran (or could not) ended ([`settle`]), logged.
fn ended(
    task: &Task,
    version: &Version,
    ran: std::result::Result<Completion, PoolError>,
) -> (Completion, Option<PlatformError>) {
    let ended = settle(task, ran);
    log_invocation(task, version, &ended.0);
    ended
}

/// Runs one task in a sandbox from the pool and says how it ended. It waits for a sandbox
/// and for the reply without holding a thread; a call that ends its sandbox (a timeout, a
/// crash) is finished on a blocking thread, which kills the sandbox and waits for it.
///
/// Should the function be drained while the call waits for a sandbox (a secret it names set
/// anew or deleted, the function deactivated or deleted), it is looked up again, so that no
/// sandbox starts with what was true before: a deleted secret reaches no call that waited,
/// and a deleted function runs no more.
pub async fn execute(
    platform: &Platform,
    looked: Looked<'_>,
    task: &Task,
    lend: Lend,
    until: Option<Instant>,
) -> std::result::Result<Completion, PoolError> {
    let Looked {
        function,
        version,
        at: mut resolved_at,
    } = looked;
    let pool = &platform.inner.pool;
    let mut fresh = None;
    // After a drain it looks its version up again; after its code was retired too (which
    // rebuilds it), a few times at most.
    let mut code_looks = 0;
    let mut lease = loop {
        let (key, mut request) = request_for(
            &function.id,
            &function.name,
            fresh.as_ref().unwrap_or(version),
        );
        request.resolved_at = Some(resolved_at);
        request.until = until;
        match pool.acquire_async(&key, &request, lend).await {
            Err(e @ (PoolError::Stale | PoolError::CodeGone)) => {
                if matches!(e, PoolError::CodeGone) {
                    code_looks += 1;
                    if code_looks > 3 {
                        return Err(e);
                    }
                    // Whatever removed the tree, the next look rebuilds it from its archive.
                    platform.inner.catalog.invalidate();
                }
                resolved_at = pool.drains();
                match platform.again(&function.id, version.version).await {
                    Ok(Some(again)) => fresh = Some(again),
                    Ok(None) => {}
                    Err(why) => return Ok(why),
                }
            }
            Err(PoolError::Deadline) => return Ok(not_run_by_deadline()),
            lent => break lent?,
        }
    };
    let version = fresh.as_ref().unwrap_or(version);
    if until.is_some_and(|u| Instant::now() >= u) {
        // Its deadline passed as it got the sandbox, which serves the next call instead.
        pool.release(lease);
        return Ok(not_run_by_deadline());
    }
    let (engine_name, start) = (lease.sandbox.backend_name(), lease.start);
    let timeout = Duration::from_millis(version.timeout_ms);
    let options = InvokeOptions {
        // At least a millisecond: a sandbox got just as `until` passed is still told the call.
        timeout: until.map_or(timeout, |u| {
            timeout.min(
                u.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
        }),
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
            .map_err(CallFailure::Finish)
        }
        Err(e) => {
            pool.release(lease);
            Err(CallFailure::Sandbox(e))
        }
    };
    Ok(completion_of(result, start, engine_name, version, task))
}

/// Why a call got no invocation from its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum CallFailure {
    /// The sandbox refused the call (it had ended, or its pipes failed).
    #[error("the sandbox refused the call")]
    Sandbox(#[source] SandboxError),
    /// The thread that finished the call (killed and reaped its sandbox) failed.
    #[error("finishing the call failed")]
    Finish(#[source] tokio::task::JoinError),
}

/// The completion of a call from what its sandbox reported.
fn completion_of(
    result: std::result::Result<Invocation, CallFailure>,
    start: Start,
    engine_name: &str,
    version: &Version,
    task: &Task,
) -> Completion {
    let call = match result {
        Ok(call) => call,
        Err(e) => {
            tracing::error!(
                task_id = %task.task_id,
                error = %cloudfunc_sandbox::error_chain(&e),
                "the call failed in its sandbox"
            );
            return Completion::failed(
                ErrorKind::SandboxFailure,
                "the sandbox failed during the call",
            );
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
        peak_memory_scope: Some(call.usage.peak_memory_scope),
        cold: start != Start::Warm,
        start: start.name().into(),
        backend: engine_name.to_string(),
        isolation: version.isolation,
    };
    let error = |kind: ErrorKind, error_type: String, message: String, traceback: String| {
        Some(TaskError {
            kind,
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
            error(ErrorKind::Raised, e.kind, e.message, e.traceback),
        ),
        Outcome::OutputNotSerializable { error: e } => (
            TaskStatus::Failed,
            None,
            error(
                ErrorKind::OutputNotSerializable,
                e.kind,
                e.message,
                e.traceback,
            ),
        ),
        Outcome::OutputTooLarge { message, .. } => (
            TaskStatus::Failed,
            None,
            error(
                ErrorKind::OutputTooLarge,
                String::new(),
                message,
                String::new(),
            ),
        ),
        Outcome::Timeout { timeout_ms } => (
            TaskStatus::Timeout,
            None,
            error(
                ErrorKind::Timeout,
                String::new(),
                format!("the function ran past its {timeout_ms} ms timeout and was killed"),
                String::new(),
            ),
        ),
        Outcome::OutOfMemory { limit_bytes } => (
            TaskStatus::OutOfMemory,
            None,
            error(
                ErrorKind::OutOfMemory,
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
                ErrorKind::Crashed,
                String::new(),
                format!("the runtime died ({exit})"),
                String::new(),
            ),
        ),
        Outcome::SandboxFailure { message } => (
            TaskStatus::Failed,
            None,
            error(
                ErrorKind::SandboxFailure,
                String::new(),
                message,
                String::new(),
            ),
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
    tracing::info!(
        target: "cloudfunc::invocation",
        task_id = %task.task_id,
        function = %task.function,
        version = version.version,
        status = c.status.as_str(),
        duration_ms = usage.duration_ms,
        billed_duration_ms = usage.duration_ms.ceil(),
        memory_size_mb = version.memory_mb,
        max_memory_used_mb = usage.peak_memory_bytes as f64 / 1048576.0,
        init_duration_ms = usage.init_duration_ms,
        cold = usage.cold,
        "invocation"
    );
}
