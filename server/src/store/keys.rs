//! Storage of idempotency keys: which task (or chain run) a tenant's key made, so that a
//! submission sent again with the same key is answered with it.

use super::Result;

/// Idempotency keys, each `tenant`'s own.
pub trait KeyStore {
    /// Gives `tenant`'s idempotency key `key` to task `task_id` (made at `at`) unless a task
    /// holds it already; returns the task that holds it, and when it took it.
    fn claim_key(&self, tenant: &str, key: &str, task_id: &str, at: i64) -> Result<(String, i64)>;
    /// Gives `key` to `task_id` if `from` still holds it (a submission that took the key and
    /// never stored its task); whether it did.
    fn take_over_key(
        &self,
        tenant: &str,
        key: &str,
        from: &str,
        task_id: &str,
        at: i64,
    ) -> Result<bool>;
    /// Forgets the keys taken before `before`; returns how many.
    fn prune_keys(&self, before: i64) -> Result<u64>;
}
