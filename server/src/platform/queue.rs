//! Async tasks: submitted (on disk before the caller hears of it), claimed by queue workers
//! oldest first, run through the same path as sync calls, and ended in the store. At start,
//! tasks a crash left running are ended `interrupted` or requeued.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::held::Held;
use super::invoke::{may_run, run_queued, unavailable, Looked};
use super::{blocking, Platform, Result, Running};
use crate::auth::Caller;
use crate::model::{Completion, ErrorKind, Mode, Task};
use crate::store::{Store, Want, Write};

/// Whether a task that was running when its node stopped may be run again, from its
/// version's retries.
pub(super) fn retries_left(store: &dyn Store, task: &Task) -> bool {
    store
        .version(&task.function_id, task.version)
        .ok()
        .flatten()
        .is_some_and(|v| task.attempts <= v.max_retries)
}

/// The wait before a requeued task's next try.
pub(super) fn backoff_ms(attempts: u32) -> i64 {
    500 * (1i64 << attempts.min(8))
}

impl Platform {
    /// Queues a function run; the task is on disk when this returns.
    pub async fn submit(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<Task> {
        self.admit_invocation(caller)?;
        self.queue_task(caller, key, version, payload).await
    }

    /// [`Platform::submit`] without the caller's rate: for what the platform queues itself
    /// (a destination's record).
    pub(super) async fn queue_task(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<Task> {
        let task = self.new_task(caller, key, version, payload).await?;
        self.store_task(&task).await?;
        Ok(task)
    }

    /// A task of `key` (optionally at `version`) for the queue, not yet stored: refused where
    /// the disk is nearly full or the function cannot run.
    pub(super) async fn new_task(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
    ) -> Result<Task> {
        self.require_space()?;
        let (function, version) = self.runnable(caller, key, version).await?;
        Ok(Task::queued(
            &function,
            version.version,
            Mode::Async,
            payload,
        ))
    }

    /// Stores `task` in the queue (on disk when this returns) and wakes a worker.
    pub(super) async fn store_task(&self, task: &Task) -> Result<()> {
        self.inner
            .recorder
            .write(Write::Insert(task.clone()))
            .await?;
        self.inner.queued.notify_one();
        Ok(())
    }

    /// Stores how a claimed task ended, behind: a write the store refuses for now is kept
    /// and tried again until it is stored, so a full disk never leaves the task `running`
    /// (reads find its end meanwhile).
    async fn end(&self, task: &Task, completion: Completion) -> Result<()> {
        Ok(self
            .inner
            .recorder
            .write_behind(Write::Complete {
                task_id: task.task_id.clone(),
                tenant: task.tenant.clone(),
                completion,
                at: self.inner.config.clock.now_ms(),
            })
            .await?)
    }

    /// Crash recovery, then the queue's claimer, which runs at most `workers` tasks at once,
    /// holding at most `payload_bytes` of their payloads (past one task's), until the process
    /// ends.
    pub async fn start_queue(
        &self,
        workers: usize,
        payload_bytes: u64,
    ) -> Result<crate::store::Recovery> {
        let store = self.inner.store.clone();
        let report = blocking(move || {
            store.recover(
                &|task: &Task| retries_left(store.as_ref(), task),
                &backoff_ms,
            )
        })
        .await??;
        let resumed = self.resume_chains().await?;
        if resumed > 0 {
            tracing::info!(runs = resumed, "chain runs resumed");
        }
        let platform = self.clone();
        let slots = Arc::new(Semaphore::new(workers.max(1)));
        let held = Arc::new(Held::new(payload_bytes));
        tokio::spawn(async move { platform.claimer(slots, held).await });
        Ok(report)
    }

    /// Claims tasks for the free worker slots, all that are free in one transaction (one
    /// commit, and on PostgreSQL one round trip, for as many tasks as workers came free while
    /// the last claim was under way), and runs each claimed task in a slot of its own.
    ///
    /// The payloads of the tasks it holds (claimed, running or waiting for an instance) stay
    /// within the budget of [`Held`]: a claim takes only what fits in what is left of it
    /// (and at least one task), and none is made while nothing is left.
    async fn claimer(self, slots: Arc<Semaphore>, held: Arc<Held>) {
        loop {
            held.room().await;
            let Ok(first) = slots.clone().acquire_owned().await else {
                return;
            };
            // Counted before the flag is read, and the flag is set before shutdown reads the
            // count: a claim either is waited for or does not happen.
            let claiming = Running::enter(&self.inner.queue_running);
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            if self.inner.space.low() {
                // What it would run could not be recorded: the tasks wait, queued.
                drop((claiming, first));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            // Through the recorder: the ends of the tasks that gave these slots back are
            // committed with the claim that reuses them. The slots are counted when the
            // recorder comes to the claim, so those freed while it waited its turn join it.
            let taken = Arc::new(parking_lot::Mutex::new(vec![first]));
            let (counting, free_slots, budget) = (taken.clone(), slots.clone(), held.clone());
            let claimed = self
                .inner
                .recorder
                .claim_with(Box::new(move || {
                    let mut slots = counting.lock();
                    slots.extend(std::iter::from_fn(|| {
                        free_slots.clone().try_acquire_owned().ok()
                    }));
                    Want {
                        tasks: slots.len(),
                        bytes: budget.left(),
                    }
                }))
                .await;
            let free = std::mem::take(&mut *taken.lock());
            match claimed {
                Ok(tasks) if !tasks.is_empty() => {
                    // Each task holds its slot, and is counted for a graceful stop, until it
                    // has run; counted before the claim's own count is dropped.
                    for (task, slot) in tasks.into_iter().zip(free) {
                        let (this, running) =
                            (self.clone(), Running::enter(&self.inner.queue_running));
                        let payload = held.take(&task);
                        tokio::spawn(async move {
                            this.run_task(&task).await;
                            drop((running, slot, payload));
                        });
                    }
                    drop(claiming);
                }
                Ok(_) => {
                    // Nothing held while idle: a stop need not wait for this wait.
                    drop((claiming, free));
                    let _ = tokio::time::timeout(
                        Duration::from_millis(250),
                        self.inner.queued.notified(),
                    )
                    .await;
                }
                Err(e) => {
                    drop((claiming, free));
                    tracing::error!(error = %e, "the queue could not claim tasks");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// At a stop: gives the tasks the pool refused a sandbox back to the queue, unstarted
    /// ([`Store::give_back`]); one the store refuses stays `running`, for the next start's
    /// recovery.
    pub(super) async fn give_back_unstarted(&self) {
        let ids = std::mem::take(&mut *self.inner.unstarted.lock());
        if ids.is_empty() {
            return;
        }
        let store = self.inner.store.clone();
        match blocking(move || store.give_back(&ids)).await {
            Ok(Ok(given)) => tracing::info!(
                tasks = given,
                "tasks claimed and not started went back to the queue"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "tasks claimed and not started could not go back to the queue; the next start recovers them")
            }
            Err(e) => tracing::error!(error = ?e, "giving back unstarted tasks failed"),
        }
    }

    /// Runs a claimed task; should the platform fail to, the task ends failed, saying so.
    async fn run_task(&self, task: &Task) {
        if let Err(e) = self.run_claimed(task).await {
            tracing::error!(task_id = %task.task_id, error = ?e, "the task could not be run");
            let completion = Completion::failed(
                ErrorKind::SandboxFailure,
                "the platform could not run this task",
            );
            if let Err(e) = self.end(task, completion).await {
                tracing::error!(task_id = %task.task_id, error = ?e, "the task's end was not stored");
            }
        }
    }

    /// Runs a claimed task and stores how it ended. As a sync call, it looks its function up
    /// in the catalog (on a blocking thread when the store must be read) and runs on the async
    /// runtime ([`execute`]).
    async fn run_claimed(&self, task: &Task) -> Result<()> {
        let looked_at = self.inner.pool.drains();
        let (function, version) = self.current(&task.function_id, task.version).await?;
        let when = "before this task ran";
        let (completion, refused) = match may_run(function.as_ref(), version.as_ref(), when) {
            Ok((function, version)) => {
                let looked = Looked {
                    function,
                    version,
                    at: looked_at,
                };
                match run_queued(self, looked, task).await {
                    Some(ran) => ran,
                    None => {
                        // It never started: back to the queue, before the stop ends.
                        self.inner.unstarted.lock().push(task.task_id.clone());
                        return Ok(());
                    }
                }
            }
            Err(why) => (unavailable(&why), None),
        };
        // The end is queued to the recorder before the destination's task, whose commit (which
        // the submit waits for) therefore carries the end too.
        let forwarded = version.as_ref().map(|_| completion.clone());
        self.end(task, completion).await?;
        if let (Some(version), Some(completion)) = (&version, forwarded) {
            self.forward(task, version, &completion).await;
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
