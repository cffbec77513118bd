//! Idempotent submissions: a client that sends a run again with the same idempotency key
//! (its first reply lost to a timeout or a broken connection) gets the task, or chain run,
//! the first made, rather than a second run. Keys are the tenant's, kept as long as tasks.

use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use super::{blocking, Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::chains::ChainRun;
use crate::model::{Mode, Task};

/// How long (ms) a key waits for the record of the submission that took it to be stored,
/// before that submission is taken for lost (it failed, or its server stopped) and the key
/// passes on.
const STORED_WITHIN_MS: i64 = 10_000;

/// Refuses a key no header could carry, or one too long to keep.
fn check_key(key: &str) -> Result<()> {
    let ok = (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID, say)".into(),
        ))
    }
}

/// The refusal of a key sent again with another request.
fn reused(idem: &str, first: &str) -> PlatformError {
    PlatformError::Unprocessable(format!(
        "Idempotency-Key {idem:?} was used for another request ({first}): use a new key for a new request"
    ))
}

impl Platform {
    /// [`Platform::submit`] under an idempotency key. The first submission with `idem`
    /// queues its task; one sent again with it gets that task back as it stands now (and
    /// `true`); one with the same key for another function or payload is refused.
    pub async fn submit_once(
        &self,
        caller: &Caller,
        key: &str,
        version: Option<u32>,
        payload: Value,
        idem: &str,
    ) -> Result<(Task, bool)> {
        check_key(idem)?;
        self.admit_invocation(caller)?;
        let task = self.new_task(caller, key, version, payload).await?;
        let owner = owner(caller);
        let find = |id: String| {
            let owner = owner.clone();
            async move { found(self.task(&owner, &id).await) }
        };
        match self.key_holder(caller, idem, &task.task_id, find).await? {
            None => {
                self.store_task(&task).await?;
                Ok((task, false))
            }
            Some(first)
                if first.function_id == task.function_id && first.payload == task.payload =>
            {
                Ok((first, true))
            }
            Some(first) => Err(reused(
                idem,
                &format!("task {} of function {}", first.task_id, first.function),
            )),
        }
    }

    /// [`Platform::run_chain`] under an idempotency key, as [`Platform::submit_once`].
    pub async fn run_chain_once(
        &self,
        caller: &Caller,
        key: &str,
        input: Value,
        idem: &str,
    ) -> Result<(ChainRun, bool)> {
        check_key(idem)?;
        self.admit_invocation(caller)?;
        let run = self.new_run(caller, key, input, Mode::Async).await?;
        let owner = owner(caller);
        let find = |id: String| {
            let owner = owner.clone();
            async move { found(self.chain_run(&owner, &id).await) }
        };
        match self.key_holder(caller, idem, &run.run_id, find).await? {
            None => {
                self.store_run(&run).await?;
                Ok((run, false))
            }
            Some(first) if first.chain_id == run.chain_id && first.input == run.input => {
                Ok((first, true))
            }
            Some(first) => Err(reused(
                idem,
                &format!("run {} of chain {}", first.run_id, first.chain),
            )),
        }
    }

    /// Gives `caller`'s key `idem` to `ours` (`None`: store its record now), or says what
    /// holds it, as `find` reads it. A holder whose record is not stored (yet) is waited
    /// for, then taken for lost and the key taken over.
    async fn key_holder<T, F, Fut>(
        &self,
        caller: &Caller,
        idem: &str,
        ours: &str,
        find: F,
    ) -> Result<Option<T>>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        loop {
            let (store, tenant, key, id) = (
                self.inner.store.clone(),
                caller.tenant.clone(),
                idem.to_string(),
                ours.to_string(),
            );
            let now = self.inner.config.clock.now_ms();
            let (holder, since) =
                blocking(move || store.claim_key(&tenant, &key, &id, now)).await??;
            if holder == ours {
                return Ok(None);
            }
            // A task's key sent for a chain run, or the other way round.
            if holder.split('_').next() != ours.split('_').next() {
                return Err(reused(idem, &holder));
            }
            if let Some(first) = find(holder.clone()).await? {
                return Ok(Some(first));
            }
            if now - since < STORED_WITHIN_MS {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let (store, tenant, key, id) = (
                self.inner.store.clone(),
                caller.tenant.clone(),
                idem.to_string(),
                ours.to_string(),
            );
            blocking(move || store.take_over_key(&tenant, &key, &holder, &id, now)).await??;
        }
    }
}

/// The caller as the owner of its records (an admin's key is its own tenant's).
fn owner(caller: &Caller) -> Caller {
    Caller {
        tenant: caller.tenant.clone(),
        admin: false,
    }
}

/// A read's record, `None` where it is not stored.
fn found<T>(read: Result<T>) -> Result<Option<T>> {
    match read {
        Ok(t) => Ok(Some(t)),
        Err(PlatformError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
