//! Idempotent submissions: a client that sends a run again with the same idempotency key
//! (its first reply lost to a timeout or a broken connection) gets the task the first made,
//! rather than a second run of the function. Keys are the tenant's, kept as long as tasks.

use std::time::Duration;

use serde_json::Value;

use super::{blocking, Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::model::{Mode, Task};
use crate::store::Write;

/// How long (ms) a key waits for the task of the submission that took it to be stored,
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

impl Platform {
    /// [`Platform::submit`] under an idempotency key. The first submission with `idem`
    /// queues its task; one sent again with it gets that task back as it stands now (and
    /// `true`), whatever became of it; one with the same key for another function or payload
    /// is refused.
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
        self.require_space()?;
        let (function, version) = self.runnable(caller, key, version).await?;
        let task = Task::queued(&function, version.version, Mode::Async, payload);
        loop {
            let (store, tenant, idem_key, id) = (
                self.inner.store.clone(),
                caller.tenant.clone(),
                idem.to_string(),
                task.task_id.clone(),
            );
            let now = self.inner.config.clock.now_ms();
            let (holder, since) =
                blocking(move || store.claim_key(&tenant, &idem_key, &id, now)).await??;
            if holder == task.task_id {
                self.inner
                    .recorder
                    .write(Write::Insert(task.clone()))
                    .await?;
                self.inner.queued.notify_one();
                return Ok((task, false));
            }
            let owner = Caller {
                tenant: caller.tenant.clone(),
                admin: false,
            };
            match self.task(&owner, &holder).await {
                Ok(first) if first.function_id == task.function_id && first.payload == task.payload => {
                    return Ok((first, true))
                }
                Ok(first) => {
                    return Err(PlatformError::Unprocessable(format!(
                        "Idempotency-Key {idem:?} was used for another request (task {} of function {} with another payload): use a new key for a new request",
                        first.task_id, first.function
                    )))
                }
                Err(PlatformError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            // Taken by a submission whose task is not stored (yet).
            if now - since < STORED_WITHIN_MS {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let (store, tenant, idem_key, id) = (
                self.inner.store.clone(),
                caller.tenant.clone(),
                idem.to_string(),
                task.task_id.clone(),
            );
            blocking(move || store.take_over_key(&tenant, &idem_key, &holder, &id, now)).await??;
        }
    }
}
