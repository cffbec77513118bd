//! Sealed columns: tenant data is written as a sealed BLOB ([`crate::atrest`]) under its
//! tenant's data key; TEXT in the same column is plaintext (written before encryption, or
//! with it turned off), read as it is and sealed by the next re-encryption. Also the tables
//! of data keys, code archives and secrets, and the keys' upkeep.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::types::{Type, Value, ValueRef};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::SqliteStore;
use crate::atrest::{AtRestError, DataKey, KeySource, Keyring, Sealer, WrappedKey};
use crate::model::now_ms;
use crate::store::records::{place, secret_row, Damaged, SealedColumn, SEALED};
use crate::store::sealed::{KeyInfo, Reencrypted, SealedStore, SecretInfo};
use crate::store::{Result, StoreError};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS data_keys (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    master TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS code_archives (
    path TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    archive BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);
"#;

/// Seals with one tenant's key, or writes plaintext when sealing is off.
#[derive(Clone, Copy)]
pub(super) struct Seal<'a> {
    pub sealer: &'a Sealer,
    pub key: Option<&'a DataKey>,
}

impl Seal<'_> {
    /// `text` as the value to store at `place` (borrowed text is copied only when it is
    /// stored as plaintext).
    pub fn text(&self, column: &str, row: &str, text: impl AsRef<str> + Into<String>) -> Value {
        match self.key {
            Some(key) => Value::Blob(self.sealer.seal(
                key,
                (column, row),
                text.as_ref().as_bytes(),
            )),
            None => Value::Text(text.into()),
        }
    }

    /// Like [`Seal::text`], for an optional value.
    pub fn opt(&self, column: &str, row: &str, text: Option<String>) -> Value {
        text.map_or(Value::Null, |t| self.text(column, row, t))
    }
}

/// Reads a sealed (or plaintext) column of `record` (for messages), whose place is
/// (`column`, `row`).
pub(super) fn opened(
    sealer: &Sealer,
    r: &Row<'_>,
    idx: usize,
    column: &'static str,
    row: &str,
    record: impl Fn() -> String,
) -> rusqlite::Result<Option<String>> {
    let damaged = |source| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Blob,
            Box::new(Damaged {
                record: record(),
                column,
                source,
            }),
        )
    };
    match r.get_ref(idx)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => Ok(Some(String::from_utf8_lossy(t).into_owned())),
        ValueRef::Blob(b) => {
            let plain = sealer.open(b, (column, row)).map_err(damaged)?;
            String::from_utf8(plain)
                .map(Some)
                .map_err(|_| damaged(AtRestError::Malformed("not text")))
        }
        ValueRef::Integer(_) | ValueRef::Real(_) => {
            Err(damaged(AtRestError::Malformed("a number")))
        }
    }
}

/// A [`Damaged`] record inside a row-mapping error, as the store's error.
pub(crate) fn damaged(e: &rusqlite::Error) -> Option<StoreError> {
    if let rusqlite::Error::FromSqlConversionFailure(_, _, source) = e {
        if let Some(d) = source.downcast_ref::<Damaged>() {
            return Some(StoreError::Damaged(d.to_string()));
        }
    }
    None
}

/// The stored data keys, oldest first.
fn wrapped_keys(conn: &Connection) -> Result<Vec<WrappedKey>> {
    let mut stmt = conn.prepare(
        "SELECT id, tenant, master, wrapped, retired FROM data_keys ORDER BY created_at, id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(WrappedKey {
            id: r.get(0)?,
            tenant: r.get(1)?,
            master: r.get(2)?,
            wrapped: r.get(3)?,
            retired: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn store_wrapped(conn: &Connection, keys: &[WrappedKey]) -> Result<()> {
    for w in keys {
        conn.execute(
            "UPDATE data_keys SET master = ?2, wrapped = ?3, retired = ?4 WHERE id = ?1",
            params![w.id, w.master, w.wrapped, w.retired],
        )?;
    }
    Ok(())
}

/// The sealer for the database on `conn`: the master keys from `source` (a missing key
/// file is made only if no data key needs an older one), every data key unwrapped, and those
/// wrapped by an older master key rewrapped (finishing a rotation a crash cut short).
pub(super) fn sealer(conn: &mut Connection, source: KeySource, seal: bool) -> Result<Sealer> {
    let stored = wrapped_keys(conn)?;
    let keyring = Keyring::open(source, stored.first().map(|w| w.master.as_str()))?;
    let sealer = Sealer::new(keyring, seal);
    let rewrapped = sealer.admit(&stored)?;
    if !rewrapped.is_empty() {
        let tx = conn.transaction()?;
        store_wrapped(&tx, &rewrapped)?;
        tx.commit()?;
        tracing::info!(
            keys = rewrapped.len(),
            master = %sealer.master_id(),
            "data keys rewrapped by the current master key"
        );
    }
    sealer.keyring().forget_old()?;
    Ok(sealer)
}

impl SqliteStore {
    /// The key that seals `tenant`'s records (made and committed on its first need), or
    /// `None` when sealing is off. Must not be called while holding the writer.
    pub(super) fn tenant_key(&self, tenant: &str) -> Result<Option<Arc<DataKey>>> {
        if !self.sealer.seals() {
            return Ok(None);
        }
        self.sealing_key(tenant).map(Some)
    }

    /// The key that seals `tenant`'s records, made and committed on its first need, whether
    /// sealing is on or not. Must not be called while holding the writer.
    fn sealing_key(&self, tenant: &str) -> Result<Arc<DataKey>> {
        if let Some(key) = self.sealer.current(tenant) {
            return Ok(key);
        }
        let conn = self.conn();
        match self.sealer.current(tenant) {
            Some(key) => Ok(key),
            None => self.new_data_key(&conn, tenant),
        }
    }

    /// Makes, stores and installs a new sealing key for `tenant`; the writer is held.
    fn new_data_key(&self, conn: &Connection, tenant: &str) -> Result<Arc<DataKey>> {
        let (key, wrapped) = self.sealer.make_key(tenant);
        conn.execute(
            "INSERT INTO data_keys (id, tenant, master, wrapped, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![wrapped.id, tenant, wrapped.master, wrapped.wrapped, now_ms()],
        )?;
        self.sealer.install(key.clone());
        Ok(key)
    }

    /// A sealer's view for writing `tenant`'s records.
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
        let marks: Vec<String> = (0..spec.keys.len())
            .map(|i| format!("?{}", i + 2))
            .collect();
        let after = format!("({})", marks.join(", "));
        let mut last: Option<Vec<Value>> = None;
        let mut done = 0;
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let rows: Vec<(Vec<Value>, Value)> = {
                let sql = format!(
                    "SELECT {keys}, {col} FROM {table} WHERE {of} AND {col} IS NOT NULL {cont} ORDER BY {keys} LIMIT 500",
                    of = spec.of_tenant("?1"),
                    cont = if last.is_some() { format!("AND {tuple} > {after}") } else { String::new() },
                );
                let mut stmt = tx.prepare(&sql)?;
                let mut bind: Vec<Value> = vec![Value::Text(tenant.to_string())];
                if let Some(last) = &last {
                    bind.extend(last.iter().cloned());
                }
                let n = spec.keys.len();
                let rows = stmt.query_map(params_from_iter(bind), |r| {
                    let ks = (0..n)
                        .map(|i| r.get::<_, Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((ks, r.get::<_, Value>(n)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let Some((final_keys, _)) = rows.last() else {
                break;
            };
            let next = final_keys.clone();
            let column = spec.place;
            let set = format!("UPDATE {table} SET {col} = ?1 WHERE {tuple} = {after}");
            for (ks, value) in &rows {
                let row = place_of(ks);
                let plain: Vec<u8> = match value {
                    Value::Text(t) if t.is_empty() => continue,
                    Value::Text(t) => t.clone().into_bytes(),
                    Value::Blob(b) => {
                        self.sealer
                            .open(b, (column, &row))
                            .map_err(|source| Damaged {
                                record: format!("{table} {row}"),
                                column,
                                source,
                            })?
                    }
                    _ => continue,
                };
                let sealed = Value::Blob(self.sealer.seal(key, (column, &row), &plain));
                let mut bind = vec![sealed];
                bind.extend(ks.iter().cloned());
                tx.prepare_cached(&set)?.execute(params_from_iter(bind))?;
                done += 1;
            }
            tx.commit()?;
            last = Some(next);
        }
        Ok(done)
    }

    /// Whether any record of `spec` still names data key `id`.
    fn names_key(&self, spec: &SealedColumn, id: u32) -> Result<bool> {
        let (table, c) = spec.table_column();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE typeof({c}) = 'blob' AND substr({c}, 3, 4) = ?1)"
        );
        Ok(self
            .conn()
            .query_row(&sql, params![id.to_le_bytes().to_vec()], |r| r.get(0))?)
    }
}

/// A record's place row: its key values joined by `@`.
fn place_of(keys: &[Value]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .map(|v| match v {
            Value::Integer(i) => i.to_string(),
            Value::Text(t) => t.clone(),
            Value::Real(r) => r.to_string(),
            Value::Null | Value::Blob(_) => String::new(),
        })
        .collect();
    parts.join("@")
}

impl SealedStore for SqliteStore {
    fn put_code(&self, tenant: &str, path: &str, archive: &[u8]) -> Result<()> {
        let key = self.tenant_key(tenant)?;
        let value = match &key {
            Some(k) => Value::Blob(self.sealer.seal(k, (place::CODE, path), archive)),
            None => Value::Blob(archive.to_vec()),
        };
        self.conn().execute(
            "INSERT OR REPLACE INTO code_archives (path, tenant, archive, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![path, tenant, value, archive.len() as i64, now_ms()],
        )?;
        Ok(())
    }

    fn code(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let stored: Option<Vec<u8>> = self
            .reader()
            .query_row(
                "SELECT archive FROM code_archives WHERE path = ?1",
                params![path],
                |r| r.get(0),
            )
            .optional()?;
        stored
            .map(|b| {
                // An archive stored with sealing off is the ZIP itself.
                if b.starts_with(b"PK") {
                    return Ok(b);
                }
                self.sealer.open(&b, (place::CODE, path)).map_err(|source| {
                    StoreError::from(Damaged {
                        record: format!("the code of {path}"),
                        column: place::CODE,
                        source,
                    })
                })
            })
            .transpose()
    }

    fn set_code_dir(&self, function_id: &str, version: u32, code_dir: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE versions SET code_dir = ?3 WHERE function_id = ?1 AND version = ?2",
            params![function_id, version, code_dir],
        )?;
        Ok(())
    }

    fn code_bytes(&self, tenant: &str) -> Result<u64> {
        let n: i64 = self.reader().query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM code_archives WHERE tenant = ?1",
            params![tenant],
            |r| r.get(0),
        )?;
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
        let now = now_ms();
        self.conn().execute(
            "INSERT INTO secrets (tenant, name, value, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (tenant, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            params![tenant, name, sealed, now],
        )?;
        Ok(())
    }

    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM secrets WHERE tenant = ?1 AND name = ?2",
            params![tenant, name],
        )? > 0)
    }

    fn secret_names(&self, tenant: &str) -> Result<Vec<SecretInfo>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT name, created_at, updated_at FROM secrets WHERE tenant = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map(params![tenant], |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                created_at: r.get(1)?,
                updated_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn secrets(&self, tenant: &str, names: &[String]) -> Result<BTreeMap<String, String>> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare_cached("SELECT value FROM secrets WHERE tenant = ?1 AND name = ?2")?;
        let mut out = BTreeMap::new();
        for name in names {
            let row = secret_row(tenant, name);
            let value = stmt
                .query_row(params![tenant, name], |r| {
                    opened(&self.sealer, r, 0, place::SECRET, &row, || {
                        format!("secret {name}")
                    })
                })
                .optional()?
                .flatten();
            if let Some(v) = value {
                out.insert(name.clone(), v);
            }
        }
        Ok(out)
    }

    fn data_keys(&self) -> Result<Vec<KeyInfo>> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT id, tenant, master, retired, created_at FROM data_keys ORDER BY tenant, created_at",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(KeyInfo {
                id: r.get(0)?,
                tenant: r.get(1)?,
                master: r.get(2)?,
                retired: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn master_key(&self) -> String {
        self.sealer.master_id()
    }

    fn sealing(&self) -> bool {
        self.sealer.seals()
    }

    fn rotate_master_key(&self) -> Result<String> {
        // The writer is held throughout, so no data key is made (and wrapped) meanwhile.
        let mut conn = self.conn();
        let new = self.sealer.keyring().rotate()?;
        let tx = conn.transaction()?;
        store_wrapped(&tx, &self.sealer.rewrap_all())?;
        tx.commit()?;
        self.sealer.keyring().forget_old()?;
        tracing::info!(master = new.id(), "master key rotated; data keys rewrapped");
        Ok(new.id().to_string())
    }

    fn reencrypt(&self, tenant: Option<&str>) -> Result<Reencrypted> {
        let tenants: Vec<String> = match tenant {
            Some(t) => vec![t.to_string()],
            None => {
                let conn = self.reader();
                let mut stmt = conn.prepare(
                    "SELECT tenant FROM data_keys UNION SELECT tenant FROM functions UNION SELECT tenant FROM tasks
                     UNION SELECT tenant FROM chain_runs UNION SELECT tenant FROM secrets UNION SELECT tenant FROM code_archives",
                )?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            }
        };
        let mut report = Reencrypted::default();
        for tenant in tenants {
            let key = {
                let conn = self.conn();
                conn.execute(
                    "UPDATE data_keys SET retired = 1 WHERE tenant = ?1",
                    params![tenant],
                )?;
                self.new_data_key(&conn, &tenant)?
            };
            report.keys.push(key.id());
            for spec in SEALED {
                report.records += self.reseal(spec, &tenant, &key)?;
            }
            let old: Vec<u32> = {
                let conn = self.reader();
                let mut stmt =
                    conn.prepare("SELECT id FROM data_keys WHERE tenant = ?1 AND retired = 1")?;
                let rows = stmt.query_map(params![tenant], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for id in old {
                let mut named = false;
                for spec in SEALED {
                    if self.names_key(spec, id)? {
                        named = true;
                        break;
                    }
                }
                if !named {
                    self.conn()
                        .execute("DELETE FROM data_keys WHERE id = ?1", params![id])?;
                    self.sealer.forget(id);
                    report.retired_keys_removed += 1;
                }
            }
        }
        Ok(report)
    }
}
