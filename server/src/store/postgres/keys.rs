//! Idempotency keys on PostgreSQL ([`KeyStore`]).

use super::PgStore;
use crate::store::{KeyStore, Result};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE idempotency_keys (
    tenant TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    task_id TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
"#;

impl KeyStore for PgStore {
    fn claim_key(&self, tenant: &str, key: &str, task_id: &str, at: i64) -> Result<(String, i64)> {
        let mut conn = self.pool.get()?;
        conn.execute(
            "INSERT INTO idempotency_keys (tenant, key, task_id, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, key) DO NOTHING",
            &[&tenant, &key, &task_id, &at],
        )?;
        let held = conn.query_opt(
            "SELECT task_id, created_at FROM idempotency_keys WHERE tenant = $1 AND key = $2",
            &[&tenant, &key],
        )?;
        // Pruned between the two statements: it is free again, and this one takes it.
        match held {
            Some(row) => Ok((row.try_get(0)?, row.try_get(1)?)),
            None => Ok((task_id.to_string(), at)),
        }
    }

    fn take_over_key(
        &self,
        tenant: &str,
        key: &str,
        from: &str,
        task_id: &str,
        at: i64,
    ) -> Result<bool> {
        Ok(self.pool.get()?.execute(
            "UPDATE idempotency_keys SET task_id = $4, created_at = $5
             WHERE tenant = $1 AND key = $2 AND task_id = $3",
            &[&tenant, &key, &from, &task_id, &at],
        )? == 1)
    }

    fn prune_keys(&self, before: i64) -> Result<u64> {
        self.pool.get()?.execute(
            "DELETE FROM idempotency_keys WHERE created_at < $1",
            &[&before],
        )
    }
}
