//! Destinations (Lambda's): a function's `on_success` / `on_failure` names a function of the
//! same tenant, or `chain:NAME`, that receives the record of each async run of it as it ends:
//! the source task, its payload, and its result or error. The record is queued as an async
//! task (or chain run) of the destination, stored like any other.

use serde_json::{json, Value};

use super::{Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::model::{Completion, Task, TaskStatus, Version};
use crate::store::Store;

/// Checks that `version`'s destinations exist for `tenant` and that none is the function
/// itself (a failing function would feed itself forever).
pub(super) fn check(store: &dyn Store, tenant: &str, name: &str, version: &Version) -> Result<()> {
    for (key, d) in [
        ("on_success", &version.on_success),
        ("on_failure", &version.on_failure),
    ] {
        let Some(d) = d else { continue };
        let found = match d.strip_prefix("chain:") {
            Some(chain) => store.chain(Some(tenant), chain)?.is_some(),
            None if d == name => {
                return Err(PlatformError::BadRequest(format!(
                    "{key} names the function itself: name another function or a chain"
                )))
            }
            None => store.function(Some(tenant), d)?.is_some(),
        };
        if !found {
            return Err(PlatformError::BadRequest(format!(
                "{key}: no {} {:?} of this tenant",
                if d.starts_with("chain:") {
                    "chain"
                } else {
                    "function"
                },
                d.trim_start_matches("chain:")
            )));
        }
    }
    Ok(())
}

/// What a destination receives.
pub fn record(task: &Task, c: &Completion) -> Value {
    let mut r = json!({
        "source": {
            "task_id": task.task_id,
            "function": task.function,
            "version": task.version,
            "status": c.status.as_str(),
        },
        "payload": task.payload,
    });
    match c.status {
        TaskStatus::Succeeded => r["result"] = c.result.clone().unwrap_or(Value::Null),
        _ => r["error"] = serde_json::to_value(&c.error).unwrap_or(Value::Null),
    }
    r
}

impl Platform {
    /// Hands an ended async task's record to its version's destination, if it has one for
    /// how it ended. A destination gone since the deploy is logged, not retried.
    pub(super) async fn forward(&self, task: &Task, version: &Version, c: &Completion) {
        let target = match c.status {
            TaskStatus::Succeeded => &version.on_success,
            _ => &version.on_failure,
        };
        let Some(target) = target else { return };
        let caller = Caller {
            tenant: task.tenant.clone(),
            admin: false,
        };
        let payload = record(task, c);
        let sent = match target.strip_prefix("chain:") {
            Some(chain) => {
                // A run is stored beside the recorder: the source's end goes in first.
                self.inner.recorder.settle().await;
                self.start_run(&caller, chain, payload)
                    .await
                    .map(|r| r.run_id)
            }
            None => self
                .queue_task(&caller, target, None, payload)
                .await
                .map(|t| t.task_id),
        };
        match sent {
            Ok(id) => {
                tracing::info!(task_id = %task.task_id, destination = %target, queued = %id, "result sent to its destination")
            }
            Err(e) => {
                tracing::warn!(task_id = %task.task_id, destination = %target, error = %e, "the destination could not take the result")
            }
        }
    }
}
