//! Tenants' secrets and the keys of encryption at rest.
//!
//! A secret is set by name and value, stored sealed, listed by name only, and put in the
//! environment of the functions whose `secrets` setting names it when their sandboxes start
//! ([`fill`]). Changing or deleting one drains the warm sandboxes of the functions that use
//! it, so no call runs with the old value once the change is answered.

use std::sync::Arc;

use super::{blocking, Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::model::{SecretEnv, Version};
use crate::store::{KeyInfo, Reencrypted, SecretInfo, Store};

/// Largest secret value, bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Secrets a tenant may have.
pub const MAX_SECRETS: usize = 1000;

/// What `GET /api/system/keys` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyStatus {
    /// The id (a fingerprint) of the master key that wraps the data keys.
    pub master_key: String,
    /// Whether new records are sealed.
    pub sealing: bool,
    pub data_keys: Vec<KeyInfo>,
}

/// Puts the values of `version`'s secrets (of `tenant`) in its `secret_env`. A secret that
/// is not set is left out; [`missing`] names it.
pub(super) fn fill(
    store: &dyn Store,
    tenant: &str,
    version: &mut Version,
) -> crate::store::Result<()> {
    if version.secrets.is_empty() {
        return Ok(());
    }
    let values = store.secrets(tenant, &version.secrets)?;
    version.secret_env = SecretEnv(Arc::new(values));
    Ok(())
}

/// [`fill`] for a version of function `function_id`, whose tenant is looked up.
pub(super) fn fill_of(
    store: &dyn Store,
    function_id: &str,
    version: &mut Version,
) -> crate::store::Result<()> {
    if version.secrets.is_empty() {
        return Ok(());
    }
    match store.function(None, function_id)? {
        Some(f) => fill(store, &f.tenant, version),
        None => Ok(()),
    }
}

/// The first secret `version` names that has no value, as the error its call gets.
pub(super) fn missing(version: &Version) -> Result<()> {
    match version
        .secrets
        .iter()
        .find(|n| !version.secret_env.0.contains_key(*n))
    {
        None => Ok(()),
        Some(name) => Err(PlatformError::BadRequest(format!(
            "the function needs secret {name}, which is not set: set it with `cloudfunc secrets set {name} VALUE` (PUT /api/secrets/{name})"
        ))),
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.len() <= 128 && super::settings::valid_env_name(name) {
        Ok(())
    } else {
        Err(PlatformError::BadRequest(format!(
            "secret name {name:?} must be [A-Za-z_][A-Za-z0-9_]*, at most 128 characters (it becomes an environment variable)"
        )))
    }
}

fn admin_only(caller: &Caller) -> Result<()> {
    if caller.admin {
        Ok(())
    } else {
        Err(PlatformError::Forbidden(
            "managing the encryption keys needs an admin token".into(),
        ))
    }
}

impl Platform {
    /// Sets `caller`'s secret `name`; the functions using it start again with the new value.
    pub async fn set_secret(&self, caller: &Caller, name: &str, value: String) -> Result<()> {
        check_name(name)?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(PlatformError::BadRequest(format!(
                "a secret's value may be at most {MAX_SECRET_BYTES} bytes"
            )));
        }
        if value.contains('\0') {
            return Err(PlatformError::BadRequest(
                "a secret's value cannot hold a NUL byte (environment variables cannot)".into(),
            ));
        }
        self.require_space()?;
        let (store, tenant, n) = (self.store(), caller.tenant.clone(), name.to_string());
        blocking(move || {
            let known = store.secret_names(&tenant)?;
            if known.len() >= MAX_SECRETS && !known.iter().any(|s| s.name == n) {
                return Err(PlatformError::QuotaExceeded(format!(
                    "tenant {tenant:?} has {MAX_SECRETS} secrets, the most it may have"
                )));
            }
            store.set_secret(&tenant, &n, &value)?;
            Ok(())
        })
        .await??;
        self.secret_changed(&caller.tenant, name).await
    }

    /// Deletes `caller`'s secret `name`.
    pub async fn delete_secret(&self, caller: &Caller, name: &str) -> Result<()> {
        let (store, tenant, n) = (self.store(), caller.tenant.clone(), name.to_string());
        if !blocking(move || store.delete_secret(&tenant, &n)).await?? {
            return Err(PlatformError::NotFound(format!("no secret {name:?}")));
        }
        self.secret_changed(&caller.tenant, name).await
    }

    /// `caller`'s secrets, names only.
    pub async fn secrets(&self, caller: &Caller) -> Result<Vec<SecretInfo>> {
        let (store, tenant) = (self.store(), caller.tenant.clone());
        Ok(blocking(move || store.secret_names(&tenant)).await??)
    }

    /// Forgets the versions held with the old value and drains the warm sandboxes of the
    /// tenant's functions that name `name`, here and on the other nodes.
    async fn secret_changed(&self, tenant: &str, name: &str) -> Result<()> {
        self.drain_users_of(tenant, name).await?;
        self.tell(super::cluster::Change::Secret {
            tenant: tenant.to_string(),
            name: name.to_string(),
        })
        .await;
        Ok(())
    }

    /// Forgets the versions held and drains the warm sandboxes of `tenant`'s functions that
    /// name secret `name`.
    pub(super) async fn drain_users_of(&self, tenant: &str, name: &str) -> Result<()> {
        self.inner.catalog.invalidate();
        let (store, tenant, name) = (self.store(), tenant.to_string(), name.to_string());
        let users = blocking(move || -> crate::store::Result<Vec<String>> {
            let mut users = Vec::new();
            for f in store.functions(Some(&tenant))? {
                if store
                    .versions(&f.id)?
                    .iter()
                    .any(|v| v.secrets.contains(&name))
                {
                    users.push(f.id);
                }
            }
            Ok(users)
        })
        .await??;
        for id in users {
            self.inner.pool.drain(&id);
        }
        Ok(())
    }

    /// The master key's id and the data keys (admin).
    pub async fn key_status(&self, caller: &Caller) -> Result<KeyStatus> {
        admin_only(caller)?;
        let store = self.store();
        blocking(move || {
            Ok(KeyStatus {
                master_key: store.master_key(),
                sealing: store.sealing(),
                data_keys: store.data_keys()?,
            })
        })
        .await?
    }

    /// Rotates the master key (admin): the data keys are rewrapped, no record is rewritten.
    pub async fn rotate_master_key(&self, caller: &Caller) -> Result<KeyStatus> {
        admin_only(caller)?;
        let store = self.store();
        blocking(move || store.rotate_master_key().map_err(key_error)).await??;
        self.key_status(caller).await
    }

    /// Moves `tenant`'s records (or everyone's) to a new data key (admin).
    pub async fn reencrypt(&self, caller: &Caller, tenant: Option<String>) -> Result<Reencrypted> {
        admin_only(caller)?;
        self.require_space()?;
        let store = self.store();
        let done = blocking(move || store.reencrypt(tenant.as_deref())).await??;
        tracing::info!(
            keys = done.keys.len(),
            records = done.records,
            removed = done.retired_keys_removed,
            "records re-encrypted under new data keys"
        );
        Ok(done)
    }
}

/// A rotation refused because the keys come from the environment is the caller's to fix.
fn key_error(e: crate::store::StoreError) -> PlatformError {
    match e {
        crate::store::StoreError::Keys(k @ crate::atrest::AtRestError::NotRotatable(_)) => {
            PlatformError::Conflict(k.to_string())
        }
        e => e.into(),
    }
}
