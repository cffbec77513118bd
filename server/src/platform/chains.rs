//! Chains in the platform: deployed (checked against the tenant's functions and chains),
//! listed, deleted, and run, sync (`invoke_chain`) or async (`run_chain`, durable: accepted
//! runs are on disk before the caller hears of them, and a restart resumes them). The steps
//! themselves run in [`super::chain_steps`].

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::chain_steps::{Exec, RUN_TIMEOUT};
use super::{blocking, Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::chains::definition::{expand_chains, CHAIN_ERROR_KINDS};
use crate::chains::{engine, Chain, ChainRun, Definition, Failure, RunStatus};
use crate::model::{new_id, valid_name, ErrorKind, Mode};
use crate::store::Store;

/// Async runs driven at once; more wait their turn, queued.
pub(super) const RUNS_AT_ONCE: usize = 256;

/// How long a run that passed its timeout waits for its calls to end (they are cut at the
/// deadline; one still getting a sandbox may take a cold start longer).
const TIMED_OUT_GRACE: Duration = Duration::from_secs(10);

/// A chain to deploy: its name and definition.
#[derive(Debug, Clone, Deserialize)]
pub struct ChainSpec {
    pub name: String,
    #[serde(flatten)]
    pub definition: serde_json::Map<String, Value>,
}

/// The error kinds a `retry` may name.
fn known_kinds() -> Vec<&'static str> {
    ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .chain(CHAIN_ERROR_KINDS)
        .collect()
}

/// `source` parsed, as [`PlatformError::BadRequest`] naming the step on a mistake.
pub(super) fn parse(source: &Value) -> Result<Definition> {
    Definition::parse(source, &known_kinds())
        .map_err(|e| PlatformError::BadRequest(format!("step {}: {}", e.path, e.message)))
}

/// The chains a chain names, expanded from what `tenant` has stored now.
fn expanded(store: &dyn Store, tenant: &str, name: &str, source: &Value) -> Result<Value> {
    let mut failed = None;
    let mut load = |n: &str| -> std::result::Result<Option<Value>, String> {
        store
            .chain(Some(tenant), n)
            .map(|c| c.map(|c| c.definition))
            .map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                message
            })
    };
    let full = expand_chains(source, name, &mut load);
    // The store's failure is its own (a database outage is a 503), not the definition's.
    if let Some(e) = failed {
        return Err(e.into());
    }
    full.map_err(|e| PlatformError::BadRequest(format!("step {}: {}", e.path, e.message)))
}

impl Platform {
    /// Deploys (or redeploys, by name) a chain of the caller's tenant. Every function it names
    /// must be the tenant's own (at the version named, where one is), every chain it names
    /// must exist, with no cycle.
    pub async fn deploy_chain(&self, caller: &Caller, spec: ChainSpec) -> Result<Chain> {
        self.require_space()?;
        if !valid_name(&spec.name) {
            return Err(PlatformError::BadRequest(format!(
                "bad chain name {:?}: 1-64 of a-z, 0-9, _ and -",
                spec.name
            )));
        }
        // The name is the spec's own field: the definition is the rest.
        let source = Value::Object(spec.definition);
        let parsed = parse(&source)?;
        let (store, tenant, name) = (self.store(), caller.tenant.clone(), spec.name.clone());
        let clock = self.inner.config.clock.clone();
        let chain = blocking(move || -> Result<Chain> {
            for (path, target) in parsed.functions() {
                let function = store
                    .function(Some(&tenant), &target.name)?
                    .ok_or_else(|| {
                        PlatformError::BadRequest(format!(
                            "step {path}: no function {:?} of this tenant",
                            target.name
                        ))
                    })?;
                if let Some(v) = target.version {
                    if store.version(&function.id, v)?.is_none() {
                        return Err(PlatformError::BadRequest(format!(
                            "step {path}: function {:?} has no version {v}",
                            target.name
                        )));
                    }
                }
            }
            let full = expanded(store.as_ref(), &tenant, &name, &source)?;
            parse(&full)?;
            let now = clock.now_ms();
            Ok(store.put_chain(&Chain {
                id: new_id("chain"),
                tenant,
                name,
                definition: source,
                created_at: now,
                updated_at: now,
            })?)
        })
        .await??;
        Ok(chain)
    }

    /// Every chain the caller sees.
    pub async fn chains(&self, caller: &Caller) -> Result<Vec<Chain>> {
        let (store, scope) = (self.store(), caller.scope().map(String::from));
        Ok(blocking(move || store.chains(scope.as_deref())).await??)
    }

    /// One chain, by id or name.
    pub async fn chain(&self, caller: &Caller, key: &str) -> Result<Chain> {
        let (store, scope, k) = (
            self.store(),
            caller.scope().map(String::from),
            key.to_string(),
        );
        blocking(move || store.chain(scope.as_deref(), &k))
            .await??
            .ok_or_else(|| PlatformError::NotFound(format!("no chain {key:?}")))
    }

    /// Deletes a chain; its runs stay readable, and runs under way finish with the definition
    /// they started with.
    pub async fn delete_chain(&self, caller: &Caller, key: &str) -> Result<Chain> {
        let chain = self.chain(caller, key).await?;
        let (store, id) = (self.store(), chain.id.clone());
        blocking(move || store.delete_chain(&id)).await??;
        Ok(chain)
    }

    /// A chain's newest runs.
    pub async fn chain_runs(
        &self,
        caller: &Caller,
        key: &str,
        limit: u32,
    ) -> Result<Vec<ChainRun>> {
        let chain = self.chain(caller, key).await?;
        let store = self.settled_store().await;
        Ok(blocking(move || store.chain_runs(&chain.id, limit)).await??)
    }

    /// A run, with its steps.
    pub async fn chain_run(&self, caller: &Caller, run_id: &str) -> Result<ChainRun> {
        let (store, scope, id) = (
            self.settled_store().await,
            caller.scope().map(String::from),
            run_id.to_string(),
        );
        blocking(move || store.chain_run(scope.as_deref(), &id))
            .await??
            .ok_or_else(|| PlatformError::NotFound(format!("no chain run {run_id:?}")))
    }

    /// A new run of `key` on `input`, its definition fixed now.
    pub(super) async fn new_run(
        &self,
        caller: &Caller,
        key: &str,
        input: Value,
        mode: Mode,
    ) -> Result<ChainRun> {
        self.require_space()?;
        let chain = self.chain(caller, key).await?;
        let store = self.store();
        let (tenant, name, source) = (
            chain.tenant.clone(),
            chain.name.clone(),
            chain.definition.clone(),
        );
        let fixed = blocking(move || expanded(store.as_ref(), &tenant, &name, &source))
            .await?
            .and_then(|definition| Ok((parse(&definition)?.timeout_ms, definition)));
        // It was whole when deployed: a chain it names has been deleted or redeployed since.
        let (timeout_ms, definition) = fixed.map_err(|e| match e {
            PlatformError::BadRequest(why) => PlatformError::Conflict(format!(
                "chain {:?} cannot run as it stands: {why}; deploy the chain it names again, \
                 or redeploy {:?} without it",
                chain.name, chain.name
            )),
            other => other,
        })?;
        let now = self.inner.config.clock.now_ms();
        Ok(ChainRun {
            run_id: new_id("run"),
            tenant: chain.tenant,
            chain_id: chain.id,
            chain: chain.name,
            mode,
            status: RunStatus::Queued,
            input,
            output: None,
            error: None,
            definition,
            deadline_at: timeout_ms.map(|t| now + i64::try_from(t).unwrap_or(i64::MAX)),
            created_at: now,
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
        })
    }

    /// Runs a chain while the caller waits and returns the ended run (stored before this
    /// returns). Should the caller go away, the run still ends and is stored.
    pub async fn invoke_chain(&self, caller: &Caller, key: &str, input: Value) -> Result<ChainRun> {
        self.admit_invocation(caller)?;
        let run = self.new_run(caller, key, input, Mode::Sync).await?;
        let this = self.clone();
        tokio::spawn(async move {
            let run = this.drive(run, false).await?;
            let (store, saved) = (this.store(), run.clone());
            blocking(move || store.save_run(&saved)).await??;
            Ok(run)
        })
        .await
        .map_err(|e| PlatformError::Internal(e.into()))?
    }

    /// Queues a run of a chain; it is on disk when this returns, and runs at once.
    pub async fn run_chain(&self, caller: &Caller, key: &str, input: Value) -> Result<ChainRun> {
        self.admit_invocation(caller)?;
        self.start_run(caller, key, input).await
    }

    /// [`Platform::run_chain`] without the caller's rate: for what the platform starts itself
    /// (a destination's record).
    pub(super) async fn start_run(
        &self,
        caller: &Caller,
        key: &str,
        input: Value,
    ) -> Result<ChainRun> {
        let run = self.new_run(caller, key, input, Mode::Async).await?;
        self.store_run(&run).await?;
        Ok(run)
    }

    /// Stores a new async run and drives it in the background.
    pub(super) async fn store_run(&self, run: &ChainRun) -> Result<()> {
        let (store, saved) = (self.store(), run.clone());
        blocking(move || store.save_run(&saved)).await??;
        self.spawn_run(run.clone());
        Ok(())
    }

    /// Drives a stored async run to its end in the background, storing each step.
    fn spawn_run(&self, run: ChainRun) {
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_turn) = this.inner.chain_turns.clone().acquire_owned().await else {
                return;
            };
            let id = run.run_id.clone();
            match this.drive(run, true).await {
                Ok(ended) if this.stopping() && !ended.status.is_terminal() => {}
                Ok(ended) => {
                    let store = this.store();
                    if let Err(e) = blocking(move || store.save_run(&ended))
                        .await
                        .and_then(|r| r.map_err(Into::into))
                    {
                        tracing::error!(run_id = %id, error = ?e, "a chain run's end was not stored; a restart resumes it");
                    }
                }
                Err(e) => {
                    tracing::error!(run_id = %id, error = ?e, "a chain run could not be driven")
                }
            }
        });
    }

    /// Resumes the runs a stop or crash left unfinished: steps that ended are not run again.
    pub(super) async fn resume_chains(&self) -> Result<usize> {
        let store = self.store();
        let runs = blocking(move || store.unfinished_runs()).await??;
        let n = runs.len();
        for run in runs {
            self.spawn_run(run);
        }
        Ok(n)
    }

    /// Runs `run` to its end (or, with `durable`, until a stop leaves it to the next start).
    async fn drive(&self, mut run: ChainRun, durable: bool) -> Result<ChainRun> {
        let definition = parse(&run.definition)?;
        let now = self.inner.config.clock.now_ms();
        run.status = RunStatus::Running;
        run.started_at.get_or_insert(now);
        if durable {
            let (store, saved) = (self.store(), run.clone());
            blocking(move || store.save_run(&saved)).await??;
        }
        let exec = Exec::new(self.clone(), &run, durable);
        let caps = engine::Caps {
            max_value_bytes: self.max_value_bytes(),
        };
        let walk = engine::run(&exec, caps, &definition.steps, run.input.clone());
        let ended = match run.deadline_at {
            Some(deadline) => {
                let left = u64::try_from(deadline - now).unwrap_or(0);
                match tokio::time::timeout(Duration::from_millis(left), walk).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        // The calls under way end at the deadline too: wait for them, so
                        // the run tells how each step ended and which were cut short.
                        let during = exec.under_way();
                        exec.settled(TIMED_OUT_GRACE).await;
                        let timeout_ms = definition.timeout_ms.unwrap_or(0);
                        Err(match during.first() {
                            Some(step) => Failure::new(
                                RUN_TIMEOUT,
                                step,
                                format!(
                                    "the run passed its {timeout_ms} ms timeout during step{} {}",
                                    if during.len() > 1 { "s" } else { "" },
                                    during.join(", ")
                                ),
                            ),
                            None => Failure::new(
                                RUN_TIMEOUT,
                                "/",
                                format!("the run passed its {timeout_ms} ms timeout"),
                            ),
                        })
                    }
                }
            }
            None => walk.await,
        };
        run.steps = exec.records();
        if exec.stopped() {
            return Ok(run);
        }
        run.finished_at = Some(self.inner.config.clock.now_ms());
        match ended {
            Ok(output) => {
                run.status = RunStatus::Succeeded;
                run.output = Some(output);
            }
            Err(f) => {
                run.status = if f.kind == RUN_TIMEOUT {
                    RunStatus::Timeout
                } else {
                    RunStatus::Failed
                };
                run.error = Some(f);
            }
        }
        Ok(run)
    }

    /// The largest value a step may take or a join may make: the sandbox's result cap.
    pub(super) fn max_value_bytes(&self) -> usize {
        self.engines()
            .get(crate::isolation::Isolation::Container)
            .map_or(6 << 20, |e| e.config().max_output_bytes)
    }

    pub(super) fn stopping(&self) -> bool {
        self.inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The turns of async runs: [`RUNS_AT_ONCE`] of them.
pub(super) fn turns() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(RUNS_AT_ONCE))
}
