//! Idempotency keys on SQLite ([`KeyStore`]).

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::store::{KeyStore, Result};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    task_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_at);
"#;

impl KeyStore for SqliteStore {
    fn claim_key(&self, tenant: &str, key: &str, task_id: &str, at: i64) -> Result<(String, i64)> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO idempotency_keys (tenant, key, task_id, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant, key) DO NOTHING",
            params![tenant, key, task_id, at],
        )?;
        let held = conn
            .query_row(
                "SELECT task_id, created_at FROM idempotency_keys WHERE tenant = ?1 AND key = ?2",
                params![tenant, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        // Pruned between the two statements: it is free again, and this one takes it.
        Ok(held.unwrap_or_else(|| (task_id.to_string(), at)))
    }

    fn take_over_key(
        &self,
        tenant: &str,
        key: &str,
        from: &str,
        task_id: &str,
        at: i64,
    ) -> Result<bool> {
        Ok(self.conn().execute(
            "UPDATE idempotency_keys SET task_id = ?4, created_at = ?5
             WHERE tenant = ?1 AND key = ?2 AND task_id = ?3",
            params![tenant, key, from, task_id, at],
        )? == 1)
    }

    fn prune_keys(&self, before: i64) -> Result<u64> {
        Ok(self.conn().execute(
            "DELETE FROM idempotency_keys WHERE created_at < ?1",
            params![before],
        )? as u64)
    }
}
