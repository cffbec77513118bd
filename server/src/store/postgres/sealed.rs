//! Sealed columns on PostgreSQL: `BYTEA` holding a sealed record ([`crate::atrest`]) under
//! its tenant's data key, or plaintext UTF-8 (sealing off), which never looks like one. Also
//! the data keys, code archives and secrets, and the keys' upkeep.
//!
//! Nodes share the data keys through the `data_keys` table: a record sealed by a key another
//! node made since this one loaded them makes it load them again.

use std::collections::BTreeMap;
use std::sync::Arc;

use postgres::types::{ToSql, Type};

use super::pool::Conn;
use super::PgStore;
use crate::atrest::{is_sealed, AtRestError, DataKey, KeySource, Sealer, WrappedKey};
use crate::model::now_ms;
use crate::store::records::{place, secret_row, Damaged, SealedColumn, SEALED};
use crate::store::sealed::{KeyInfo, Reencrypted, SealedStore, SecretInfo};
use crate::store::Result;

/// Seals with one tenant's key, or writes plaintext when sealing is off.
#[derive(Clone, Copy)]
pub(super) struct Seal<'a> {
    pub sealer: &'a Sealer,
    pub key: Option<&'a DataKey>,
}

impl Seal<'_> {
    /// `text` as the bytes to store at (`column`, `row`).
    pub fn text(&self, column: &str, row: &str, text: &str) -> Vec<u8> {
        match self.key {
            Some(key) => self.sealer.seal(key, (column, row), text.as_bytes()),
            None => text.as_bytes().to_vec(),
        }
    }
}

/// The stored data keys, oldest first.
fn wrapped_keys(conn: &mut Conn) -> Result<Vec<WrappedKey>> {
    conn.query(
        "SELECT id, tenant, master, wrapped, retired FROM data_keys ORDER BY created_at, id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(WrappedKey {
            id: key_id(r.try_get(0)?),
            tenant: r.try_get(1)?,
            master: r.try_get(2)?,
            wrapped: r.try_get(3)?,
            retired: r.try_get(4)?,
        })
    })
    .collect()
}

fn key_id(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn store_wrapped(conn: &mut Conn, keys: &[WrappedKey]) -> Result<()> {
    let mut tx = conn.transaction()?;
    for w in keys {
        tx.execute(
            "UPDATE data_keys SET master = $2, wrapped = $3, retired = $4 WHERE id = $1",
            &[&i64::from(w.id), &w.master, &w.wrapped, &w.retired],
        )?;
    }
    tx.commit()
}

/// The sealer for the database: the master keys from `source`, every data key unwrapped,
/// and those wrapped by an older master key rewrapped.
pub(super) fn sealer(conn: &mut Conn, source: KeySource, seal: bool) -> Result<Sealer> {
    let stored = wrapped_keys(conn)?;
    let keyring = crate::atrest::Keyring::open(source, stored.first().map(|w| w.master.as_str()))?;
    let sealer = Sealer::new(keyring, seal);
    let rewrapped = sealer.admit(&stored)?;
    if !rewrapped.is_empty() {
        store_wrapped(conn, &rewrapped)?;
        tracing::info!(
            keys = rewrapped.len(),
            master = %sealer.master_id(),
            "data keys rewrapped by the current master key"
        );
    }
    sealer.keyring().forget_old()?;
    Ok(sealer)
}

/// A key column's value.
enum KeyValue {
    Text(String),
    Int(i64),
}

impl KeyValue {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            KeyValue::Text(t) => t,
            KeyValue::Int(i) => i,
        }
    }

    fn place(&self) -> String {
        match self {
            KeyValue::Text(t) => t.clone(),
            KeyValue::Int(i) => i.to_string(),
        }
    }
}

impl PgStore {
    /// Reads a sealed (or plaintext) column of `record` (for messages) at (`column`, `row`).
    pub(super) fn opened(
        &self,
        value: Option<&[u8]>,
        column: &'static str,
        row: &str,
        record: impl Fn() -> String,
    ) -> Result<Option<String>> {
        let damaged = |source| Damaged {
            record: record(),
            column,
            source,
        };
        let Some(bytes) = value else {
            return Ok(None);
        };
        let plain = if is_sealed(bytes) {
            self.open_record(bytes, (column, row)).map_err(damaged)?
        } else {
            bytes.to_vec()
        };
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| damaged(AtRestError::Malformed("not text")).into())
    }

    /// Opens a sealed record; a key another node made since is loaded first.
    fn open_record(
        &self,
        sealed: &[u8],
        at: (&str, &str),
    ) -> std::result::Result<Vec<u8>, AtRestError> {
        match self.sealer.open(sealed, at) {
            Err(AtRestError::UnknownDataKey(id)) => {
                if let Err(e) = self.reload_keys() {
                    tracing::warn!(error = %e, "the data keys could not be read again");
                    return Err(AtRestError::UnknownDataKey(id));
                }
                self.sealer.open(sealed, at)
            }
            opened => opened,
        }
    }

    /// Holds every stored data key (some other node may have made).
    fn reload_keys(&self) -> Result<()> {
        let stored = wrapped_keys(&mut *self.pool.get()?)?;
        self.sealer.admit(&stored)?;
        Ok(())
    }

    /// The key that seals `tenant`'s records (made and committed on its first need), or
    /// `None` when sealing is off.
    pub(super) fn tenant_key(&self, tenant: &str) -> Result<Option<Arc<DataKey>>> {
        if !self.sealer.seals() {
            return Ok(None);
        }
        self.sealing_key(tenant).map(Some)
    }

    /// The key that seals `tenant`'s records, whether sealing is on or not: this node's,
    /// another node's (loaded), or a new one.
    fn sealing_key(&self, tenant: &str) -> Result<Arc<DataKey>> {
        if let Some(key) = self.sealer.current(tenant) {
            return Ok(key);
        }
        let _making = self.key_lock.lock();
        if let Some(key) = self.sealer.current(tenant) {
            return Ok(key);
        }
        self.reload_keys()?;
        match self.sealer.current(tenant) {
            Some(key) => Ok(key),
            None => self.new_data_key(&mut *self.pool.get()?, tenant),
        }
    }

    /// Makes, stores and installs a new sealing key for `tenant`.
    fn new_data_key(&self, conn: &mut Conn, tenant: &str) -> Result<Arc<DataKey>> {
        let (key, wrapped) = self.sealer.make_key(tenant);
        conn.execute(
            "INSERT INTO data_keys (id, tenant, master, wrapped, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&i64::from(wrapped.id), &tenant, &wrapped.master, &wrapped.wrapped, &now_ms()],
        )?;
        self.sealer.install(key.clone());
        Ok(key)
    }

    /// A sealer's view for writing with `key`.
    pub(super) fn seal_for<'a>(&'a self, key: &'a Option<Arc<DataKey>>) -> Seal<'a> {
        Seal {
            sealer: &self.sealer,
            key: key.as_deref(),
        }
    }

    /// Seals every record of `tenant` in `spec` with `key` again, in batches; returns how many.
    fn reseal(&self, spec: &SealedColumn, tenant: &str, key: &Arc<DataKey>) -> Result<u64> {
        let (table, col) = spec.table_column();
        let keys = spec.keys.join(", ");
        let tuple = format!("({keys})");
        let n = spec.keys.len();
        let marks: Vec<String> = (0..n).map(|i| format!("${}", i + 2)).collect();
        let after = format!("({})", marks.join(", "));
        let select = |cont: bool| {
            format!(
                "SELECT {keys}, {col} FROM {table} WHERE {of} AND {col} IS NOT NULL {cont} ORDER BY {keys} LIMIT 500",
                of = spec.of_tenant("$1"),
                cont = if cont { format!("AND {tuple} > {after}") } else { String::new() },
            )
        };
        let set = format!("UPDATE {table} SET {col} = $1 WHERE {tuple} = {after}");
        let mut last: Option<Vec<KeyValue>> = None;
        let mut done = 0;
        let mut conn = self.pool.get()?;
        loop {
            let mut tx = conn.transaction()?;
            let rows = {
                let mut bind: Vec<&(dyn ToSql + Sync)> = vec![&tenant];
                if let Some(last) = &last {
                    bind.extend(last.iter().map(KeyValue::sql));
                }
                tx.query(&select(last.is_some()), &bind)?
            };
            if rows.is_empty() {
                break;
            }
            let mut final_keys = Vec::new();
            for r in &rows {
                let ks = (0..n)
                    .map(|i| {
                        Ok(if r.columns()[i].type_() == &Type::INT8 {
                            KeyValue::Int(r.try_get(i)?)
                        } else {
                            KeyValue::Text(r.try_get(i)?)
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let row = ks.iter().map(KeyValue::place).collect::<Vec<_>>().join("@");
                let value: &[u8] = r.try_get(n)?;
                final_keys = ks;
                if value.is_empty() {
                    continue;
                }
                let plain = if is_sealed(value) {
                    self.open_record(value, (spec.place, &row))
                        .map_err(|source| Damaged {
                            record: format!("{table} {row}"),
                            column: spec.place,
                            source,
                        })?
                } else {
                    value.to_vec()
                };
                let sealed = self.sealer.seal(key, (spec.place, &row), &plain);
                let mut bind: Vec<&(dyn ToSql + Sync)> = vec![&sealed];
                bind.extend(final_keys.iter().map(KeyValue::sql));
                tx.execute(&set, &bind)?;
                done += 1;
            }
            tx.commit()?;
            last = Some(final_keys);
        }
        Ok(done)
    }

    /// Whether any record of `spec` still names data key `id`.
    fn names_key(&self, spec: &SealedColumn, id: u32) -> Result<bool> {
        let (table, c) = spec.table_column();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE substring({c} from 1 for 2) = '\\xcf01'::bytea AND substring({c} from 3 for 4) = $1)"
        );
        Ok(self
            .pool
            .get()?
            .query_one(&sql, &[&id.to_le_bytes().to_vec()])?
            .try_get(0)?)
    }
}

impl SealedStore for PgStore {
    fn put_code(&self, tenant: &str, path: &str, archive: &[u8]) -> Result<()> {
        let key = self.tenant_key(tenant)?;
        let value = match &key {
            Some(k) => self.sealer.seal(k, (place::CODE, path), archive),
            None => archive.to_vec(),
        };
        self.pool.get()?.execute(
            "INSERT INTO code_archives (path, tenant, archive, bytes, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (path) DO UPDATE SET tenant = excluded.tenant, archive = excluded.archive,
                 bytes = excluded.bytes, created_at = excluded.created_at",
            &[&path, &tenant, &value, &(archive.len() as i64), &now_ms()],
        )?;
        Ok(())
    }

    fn code(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let stored: Option<Vec<u8>> = self
            .pool
            .get()?
            .query_opt(
                "SELECT archive FROM code_archives WHERE path = $1",
                &[&path],
            )?
            .map(|r| r.try_get(0))
            .transpose()?;
        stored
            .map(|b| {
                // An archive stored with sealing off is the ZIP itself.
                if !is_sealed(&b) {
                    return Ok(b);
                }
                self.open_record(&b, (place::CODE, path)).map_err(|source| {
                    Damaged {
                        record: format!("the code of {path}"),
                        column: place::CODE,
                        source,
                    }
                    .into()
                })
            })
            .transpose()
    }

    fn set_code_dir(&self, function_id: &str, version: u32, code_dir: &str) -> Result<()> {
        self.pool.get()?.execute(
            "UPDATE versions SET code_dir = $3 WHERE function_id = $1 AND version = $2",
            &[&function_id, &i64::from(version), &code_dir],
        )?;
        Ok(())
    }

    fn code_bytes(&self, tenant: &str) -> Result<u64> {
        let n: i64 = self
            .pool
            .get()?
            .query_one(
                "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM code_archives WHERE tenant = $1",
                &[&tenant],
            )?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn set_secret(&self, tenant: &str, name: &str, value: &str) -> Result<()> {
        // A secret is sealed even with sealing off: it has no plaintext form.
        let key = self.sealing_key(tenant)?;
        let sealed = self.sealer.seal(
            &key,
            (place::SECRET, &secret_row(tenant, name)),
            value.as_bytes(),
        );
        self.pool.get()?.execute(
            "INSERT INTO secrets (tenant, name, value, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (tenant, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            &[&tenant, &name, &sealed, &now_ms()],
        )?;
        Ok(())
    }

    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool> {
        Ok(self.pool.get()?.execute(
            "DELETE FROM secrets WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )? > 0)
    }

    fn secret_names(&self, tenant: &str) -> Result<Vec<SecretInfo>> {
        self.pool
            .get()?
            .query(
                "SELECT name, created_at, updated_at FROM secrets WHERE tenant = $1 ORDER BY name",
                &[&tenant],
            )?
            .iter()
            .map(|r| {
                Ok(SecretInfo {
                    name: r.try_get(0)?,
                    created_at: r.try_get(1)?,
                    updated_at: r.try_get(2)?,
                })
            })
            .collect()
    }

    fn secrets(&self, tenant: &str, names: &[String]) -> Result<BTreeMap<String, String>> {
        let mut conn = self.pool.get()?;
        let mut out = BTreeMap::new();
        for name in names {
            let Some(r) = conn.query_opt(
                "SELECT value FROM secrets WHERE tenant = $1 AND name = $2",
                &[&tenant, name],
            )?
            else {
                continue;
            };
            let row = secret_row(tenant, name);
            if let Some(v) = self.opened(r.try_get(0)?, place::SECRET, &row, || {
                format!("secret {name}")
            })? {
                out.insert(name.clone(), v);
            }
        }
        Ok(out)
    }

    fn data_keys(&self) -> Result<Vec<KeyInfo>> {
        self.pool
            .get()?
            .query(
                "SELECT id, tenant, master, retired, created_at FROM data_keys ORDER BY tenant, created_at",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: key_id(r.try_get(0)?),
                    tenant: r.try_get(1)?,
                    master: r.try_get(2)?,
                    retired: r.try_get(3)?,
                    created_at: r.try_get(4)?,
                })
            })
            .collect()
    }

    fn master_key(&self) -> String {
        self.sealer.master_id()
    }

    fn sealing(&self) -> bool {
        self.sealer.seals()
    }

    fn rotate_master_key(&self) -> Result<String> {
        // No data key is made here meanwhile.
        let _making = self.key_lock.lock();
        let mut conn = self.pool.get()?;
        let new = self.sealer.keyring().rotate()?;
        store_wrapped(&mut conn, &self.sealer.rewrap_all())?;
        self.sealer.keyring().forget_old()?;
        tracing::info!(master = new.id(), "master key rotated; data keys rewrapped");
        Ok(new.id().to_string())
    }

    fn reencrypt(&self, tenant: Option<&str>) -> Result<Reencrypted> {
        let tenants: Vec<String> = match tenant {
            Some(t) => vec![t.to_string()],
            None => self
                .pool
                .get()?
                .query(
                    "SELECT tenant FROM data_keys UNION SELECT tenant FROM functions UNION SELECT tenant FROM tasks
                     UNION SELECT tenant FROM chain_runs UNION SELECT tenant FROM secrets UNION SELECT tenant FROM code_archives",
                    &[],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?,
        };
        let mut report = Reencrypted::default();
        for tenant in tenants {
            let key = {
                let _making = self.key_lock.lock();
                let mut conn = self.pool.get()?;
                conn.execute(
                    "UPDATE data_keys SET retired = true WHERE tenant = $1",
                    &[&tenant],
                )?;
                self.new_data_key(&mut conn, &tenant)?
            };
            report.keys.push(key.id());
            for spec in SEALED {
                report.records += self.reseal(spec, &tenant, &key)?;
            }
            let old: Vec<u32> = self
                .pool
                .get()?
                .query(
                    "SELECT id FROM data_keys WHERE tenant = $1 AND retired",
                    &[&tenant],
                )?
                .iter()
                .map(|r| r.try_get(0).map(key_id))
                .collect::<std::result::Result<_, _>>()?;
            for id in old {
                let mut named = false;
                for spec in SEALED {
                    if self.names_key(spec, id)? {
                        named = true;
                        break;
                    }
                }
                if !named {
                    self.pool
                        .get()?
                        .execute("DELETE FROM data_keys WHERE id = $1", &[&i64::from(id)])?;
                    self.sealer.forget(id);
                    report.retired_keys_removed += 1;
                }
            }
        }
        Ok(report)
    }
}
