//! The steps of a chain run, each an ordinary invocation of its function: resolved under the
//! chain's tenant, run through the one call path (pool, limits, usage, the invocation log
//! line), recorded as a task of the function with the run's id on it. A durable (async) run
//! writes each step as it starts and as it ends; a step found already ended is not run again,
//! and one found started but never ended (the process died under it) is `interrupted`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::invoke::{run as run_call, Looked};
use super::{blocking, Platform, PlatformError, Running};
use crate::auth::Caller;
use crate::chains::engine::{json_size, BoxFuture};
use crate::chains::{ChainRun, Failure, StepRecord, Steps, Target};
use crate::model::{Completion, ErrorKind, Mode, Task, TaskStatus};
use crate::store::Write;

/// The kind of a run's (and a step's) end at the run's `timeout_ms`.
pub(super) const RUN_TIMEOUT: &str = "run_timeout";

/// What an earlier process left of a step.
enum Memory {
    /// It ended: this is how.
    Ended(Result<Value, Failure>),
    /// It was cut short and may run again: as this attempt.
    Again(u32),
}

/// Runs the calls of one chain run.
#[derive(Debug, Clone)]
pub(super) struct Exec {
    inner: Arc<ExecInner>,
}

#[derive(Debug)]
struct ExecInner {
    platform: Platform,
    run_id: String,
    /// The chain's tenant: its steps may call only its functions.
    caller: Caller,
    mode: Mode,
    /// Whether each step is stored as it starts and ends.
    durable: bool,
    /// Every step of the run so far, by path (those of an earlier process included).
    steps: Mutex<HashMap<String, StepRecord>>,
    /// Set when a step was refused because the server is stopping.
    stopped: std::sync::atomic::AtomicBool,
    /// The next step's place in the order of starts.
    next_seq: std::sync::atomic::AtomicU64,
    /// When the run's timeout ends it: no call runs past it.
    deadline_at: Option<i64>,
    /// The calls under way, and a wake-up as each ends: a run that timed out waits for them
    /// ([`Exec::settled`]) so that it tells how each of its steps ended.
    in_flight: AtomicUsize,
    call_ended: tokio::sync::Notify,
}

/// One call under way, counted in [`ExecInner::in_flight`] while it lives.
struct InFlight(Arc<ExecInner>);

impl InFlight {
    fn enter(exec: &Arc<ExecInner>) -> InFlight {
        exec.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(exec.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.call_ended.notify_waiters();
    }
}

impl Exec {
    pub(super) fn new(platform: Platform, run: &ChainRun, durable: bool) -> Exec {
        let steps: HashMap<String, StepRecord> = run
            .steps
            .iter()
            .map(|s| (s.path.clone(), s.clone()))
            .collect();
        let next_seq = steps.values().map(|s| s.seq + 1).max().unwrap_or(0);
        Exec {
            inner: Arc::new(ExecInner {
                platform,
                run_id: run.run_id.clone(),
                caller: Caller {
                    tenant: run.tenant.clone(),
                    admin: false,
                },
                mode: run.mode,
                durable,
                steps: Mutex::new(steps),
                stopped: std::sync::atomic::AtomicBool::new(false),
                next_seq: std::sync::atomic::AtomicU64::new(next_seq),
                deadline_at: run.deadline_at,
                in_flight: AtomicUsize::new(0),
                call_ended: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Every step so far, in the order they started.
    pub(super) fn records(&self) -> Vec<StepRecord> {
        let mut steps: Vec<StepRecord> = self.lock().values().cloned().collect();
        crate::chains::model::in_order(&mut steps);
        steps
    }

    /// Waits, at most `within`, for the calls under way to end (a run's timeout cuts them
    /// short, so they end within moments of it).
    pub(super) async fn settled(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        loop {
            let ended = self.inner.call_ended.notified();
            if self.inner.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(until, ended).await.is_err() {
                return;
            }
        }
    }

    /// The paths of the steps under way, in the order they started.
    pub(super) fn under_way(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .filter(|s| !s.status.is_terminal())
            .map(|s| s.path)
            .collect()
    }

    /// Whether the run was left for the next start because the server is stopping.
    pub(super) fn stopped(&self) -> bool {
        self.inner.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StepRecord>> {
        self.inner.steps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `step` (and, for a durable run, stores it before going on).
    async fn note(&self, step: StepRecord) -> Result<(), Failure> {
        self.lock().insert(step.path.clone(), step.clone());
        if self.inner.durable {
            let (store, tenant, id, path) = (
                self.inner.platform.store(),
                self.inner.caller.tenant.clone(),
                self.inner.run_id.clone(),
                step.path.clone(),
            );
            let saved = blocking(move || store.save_step(&tenant, &id, &step)).await;
            if !matches!(saved, Ok(Ok(()))) {
                tracing::error!(run_id = %self.inner.run_id, step = %path, error = ?saved, "a chain step could not be stored");
                return Err(Failure::new(
                    "sandbox_failure",
                    &path,
                    "the step could not be stored; the run stopped here",
                ));
            }
        }
        Ok(())
    }

    /// What a step already known says, if it has ended; a step started by an earlier process
    /// and never ended takes its task's end if that was stored, else runs again if its
    /// function's `max_retries` allows (as the queue does), else ends `interrupted`.
    async fn remembered(&self, path: &str) -> Option<Memory> {
        let known = self.lock().get(path).cloned()?;
        if known.status.is_terminal() {
            return Some(Memory::Ended(outcome(&known)));
        }
        let stored = match &known.task_id {
            Some(id) => {
                let (store, id) = (self.inner.platform.store(), id.clone());
                blocking(move || store.task(None, &id))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
            }
            None => None,
        };
        let mut ended = known;
        match stored.filter(|t| t.status.is_terminal()) {
            Some(task) => {
                ended.status = task.status;
                ended.output = task.result.clone();
                ended.error = task.error.as_ref().map(|e| failure_of(path, e));
                ended.usage = task.usage.clone();
                ended.finished_at = task.finished_at;
            }
            None => {
                let platform = &self.inner.platform;
                let retries = platform
                    .lookup(&self.inner.caller, &ended.function, None)
                    .await
                    .map_or(0, |(_, v)| v.max_retries);
                if ended.attempts <= retries {
                    return Some(Memory::Again(ended.attempts + 1));
                }
                ended.status = TaskStatus::Failed;
                ended.error = Some(Failure::new(
                    ErrorKind::Interrupted.as_str(),
                    path,
                    "the server stopped while this step ran; it was not run again",
                ));
                ended.finished_at = Some(self.inner.platform.inner.config.clock.now_ms());
            }
        }
        if let Err(f) = self.note(ended.clone()).await {
            return Some(Memory::Ended(Err(f)));
        }
        Some(Memory::Ended(outcome(&ended)))
    }

    async fn step(&self, path: String, target: Target, input: Value) -> Result<Value, Failure> {
        let attempts = match self.remembered(&path).await {
            Some(Memory::Ended(known)) => return known,
            Some(Memory::Again(n)) => n,
            None => 1,
        };
        let platform = &self.inner.platform;
        if platform.stopping() {
            self.inner
                .stopped
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(Failure::new(
                "interrupted",
                &path,
                "the server is stopping; the run resumes at its next start",
            ));
        }
        let now = platform.inner.config.clock.now_ms();
        let mut record = StepRecord {
            path: path.clone(),
            function: target.to_string(),
            task_id: None,
            status: TaskStatus::Failed,
            output: None,
            error: None,
            usage: None,
            started_at: now,
            finished_at: Some(now),
            attempts,
            seq: self
                .inner
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        };
        let cap = platform.max_value_bytes();
        let size = json_size(&input);
        if size > cap {
            record.error = Some(Failure::new(
                "input_too_large",
                &path,
                format!("the input of step {path} is {size} bytes, over the {cap} byte cap"),
            ));
            self.note(record.clone()).await?;
            return outcome(&record);
        }
        let left_ms = self.inner.deadline_at.map(|d| d - now);
        if left_ms.is_some_and(|left| left <= 0) {
            return Err(Failure::new(
                RUN_TIMEOUT,
                &path,
                "the run passed its timeout before this step started",
            ));
        }
        let name = target.to_string();
        let looked_at = platform.inner.pool.drains();
        let found = platform.lookup(&self.inner.caller, &name, None).await;
        let (function, version) = match found {
            Ok(found) => found,
            Err(e) => {
                let why = match e {
                    PlatformError::NotFound(_) => format!("function {name:?} no longer exists"),
                    PlatformError::Inactive(_) => format!("function {name:?} is deactivated"),
                    other => other.to_string(),
                };
                record.error = Some(Failure::new(
                    ErrorKind::FunctionUnavailable.as_str(),
                    &path,
                    why,
                ));
                self.note(record.clone()).await?;
                return outcome(&record);
            }
        };
        let mut task = Task::queued(&function, version.version, self.inner.mode, input);
        task.status = TaskStatus::Running;
        task.attempts = attempts;
        task.started_at = Some(task.created_at);
        task.chain_run = Some(self.inner.run_id.clone());
        record.task_id = Some(task.task_id.clone());
        record.status = TaskStatus::Running;
        record.finished_at = None;
        self.note(record.clone()).await?;
        let sync = self.inner.mode == Mode::Sync;
        // The run's deadline bounds the call as its own timeout does.
        let until = left_ms
            .map(|left| Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0)));
        let looked = Looked {
            function: &function,
            version: &version,
            at: looked_at,
        };
        let (mut completion, _throttled) = run_call(platform, looked, &task, sync, until).await;
        let at = platform.inner.config.clock.now_ms();
        let cut = completion.status == TaskStatus::Timeout
            && (left_ms
                .is_some_and(|left| i64::try_from(version.timeout_ms).is_ok_and(|own| left < own))
                || self.inner.deadline_at.is_some_and(|d| at >= d));
        if cut && completion.usage.is_some() {
            if let Some(e) = completion.error.as_mut() {
                e.message = format!(
                    "the call was cut short at its chain run's deadline, after {} ms \
                     (the function's own timeout is {} ms)",
                    at - now,
                    version.timeout_ms
                );
            }
        }
        let mut ended = ended_record(record, &completion, at);
        if let (true, Some(f)) = (cut, ended.error.as_mut()) {
            // The run's end, not the function's: a `retry` on `timeout` does not take it.
            f.kind = RUN_TIMEOUT.to_string();
        }
        let finished = Write::Finished {
            task: Box::new(task),
            completion,
            at,
        };
        // A durable run's step is stored as ended only once its task is: a crash between
        // the two left a step that had run with no such call in its function's history.
        let recorder = &platform.inner.recorder;
        let written = if self.inner.durable {
            recorder.write(finished).await
        } else {
            recorder.write_behind(finished).await
        };
        if let Err(e) = written {
            tracing::warn!(run_id = %self.inner.run_id, step = %ended.path, error = %e, "a chain step's task was not stored; the step's own record holds its end");
        }
        self.note(ended.clone()).await?;
        outcome(&ended)
    }
}

impl Steps for Exec {
    fn call<'a>(
        &'a self,
        path: String,
        target: &'a Target,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>> {
        let (this, target) = (self.clone(), target.clone());
        Box::pin(async move {
            // A task of its own: a run's timeout (which drops the walk) does not cut a call
            // short, and the call is still recorded. A durable run's calls are waited for by a
            // graceful stop, as the queue's are.
            let at = path.clone();
            let spawned = tokio::spawn(async move {
                let _running = this
                    .inner
                    .durable
                    .then(|| Running::enter(&this.inner.platform.inner.queue_running));
                let _in_flight = InFlight::enter(&this.inner);
                this.step(path, target, input).await
            });
            spawned.await.unwrap_or_else(|e| {
                Err(Failure::new(
                    "sandbox_failure",
                    &at,
                    format!("the step's task failed: {e}"),
                ))
            })
        })
    }
}

fn failure_of(path: &str, e: &crate::model::TaskError) -> Failure {
    Failure {
        kind: e.kind.as_str().to_string(),
        message: e.message.clone(),
        step: path.to_string(),
        error: serde_json::to_value(e).ok(),
    }
}

fn ended_record(mut record: StepRecord, c: &Completion, at: i64) -> StepRecord {
    record.status = c.status;
    record.output = c.result.clone();
    record.error = c.error.as_ref().map(|e| failure_of(&record.path, e));
    record.usage = c.usage.clone();
    record.finished_at = Some(at);
    record
}

/// A step's end as the walk takes it.
fn outcome(step: &StepRecord) -> Result<Value, Failure> {
    match (step.status, &step.error) {
        (TaskStatus::Succeeded, _) => Ok(step.output.clone().unwrap_or(Value::Null)),
        (_, Some(f)) => Err(f.clone()),
        (status, None) => Err(Failure::new(
            status.as_str(),
            &step.path,
            format!("the step ended {}", status.as_str()),
        )),
    }
}
