//! What encryption at rest ([`crate::atrest`]) asks of a store: the tenants' code archives and
//! secrets (both only ever stored sealed), and the keys' upkeep.

use std::collections::BTreeMap;

use super::Result;

/// A secret's name and when it was set; its value is never listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretInfo {
    pub name: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A data key as reported (never the key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub id: u32,
    pub tenant: String,
    /// The master key that wraps it.
    pub master: String,
    /// Replaced by a newer key: it opens its records, it seals no new ones.
    pub retired: bool,
    /// Unix ms.
    pub created_at: i64,
}

/// What a re-encryption did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reencrypted {
    /// The new data keys, one per tenant.
    pub keys: Vec<u32>,
    /// Records sealed again (plaintext ones from before encryption among them).
    pub records: u64,
    /// Data keys no record names any more, deleted.
    pub retired_keys_removed: u64,
}

/// Code archives, secrets and keys.
pub trait SealedStore {
    /// Stores the archive of the code at `path` (a function id and version) of `tenant`.
    fn put_code(&self, tenant: &str, path: &str, archive: &[u8]) -> Result<()>;
    /// The archive stored for `path`.
    fn code(&self, path: &str) -> Result<Option<Vec<u8>>>;
    /// Points version `version` of `function_id` at its code's new place on disk.
    fn set_code_dir(&self, function_id: &str, version: u32, code_dir: &str) -> Result<()>;
    /// Bytes of archives `tenant` stores.
    fn code_bytes(&self, tenant: &str) -> Result<u64>;
    /// Sets `tenant`'s secret `name`.
    fn set_secret(&self, tenant: &str, name: &str, value: &str) -> Result<()>;
    /// Deletes a secret; whether it was there.
    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool>;
    /// `tenant`'s secrets, by name (no values).
    fn secret_names(&self, tenant: &str) -> Result<Vec<SecretInfo>>;
    /// The values of `tenant`'s secrets among `names` (those not set are left out).
    fn secrets(&self, tenant: &str, names: &[String]) -> Result<BTreeMap<String, String>>;
    /// The data keys.
    fn data_keys(&self) -> Result<Vec<KeyInfo>>;
    /// The master key's id.
    fn master_key(&self) -> String;
    /// Whether new records are sealed.
    fn sealing(&self) -> bool;
    /// Makes a new master key, rewraps every data key with it, and forgets the old one;
    /// returns the new key's id. No record is rewritten.
    fn rotate_master_key(&self) -> Result<String>;
    /// Gives `tenant` (or every tenant) a new data key and seals every record of theirs with
    /// it; keys no record names any more are deleted.
    fn reencrypt(&self, tenant: Option<&str>) -> Result<Reencrypted>;
}
