//! Function code at rest. Each deploy's code is stored in the store as a ZIP archive, sealed
//! with its tenant's data key like every other record of theirs. The extracted tree that
//! sandboxes read (bind-mounted read-only) lives under the code directory, in the state
//! directory (0700), and is rebuilt from the archive whenever it is missing: after a reboot
//! has emptied `/run`, or when moving a data directory from before archives existed.

use std::path::{Path, PathBuf};

use super::{blocking, deploy::INCOMING, io_error, Platform, Result};
use crate::archive::{self, ArchiveLimits};

/// What [`Platform::restore_code`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Trees rebuilt from their archives.
    pub extracted: usize,
    /// Trees from before archives existed, archived now (and moved under the code directory).
    pub archived: usize,
    /// Versions whose code could not be found at all.
    pub missing: Vec<String>,
}

/// The store's name for the code of version `number` of `function_id` (and its place under
/// the code directory).
pub(super) fn code_key(function_id: &str, number: u32) -> String {
    format!("{function_id}/{number}")
}

/// The key of the code at `dir` (its last two components: function id and version).
fn key_of(dir: &Path) -> Option<String> {
    let number = dir.file_name()?.to_str()?;
    let function = dir.parent()?.file_name()?.to_str()?;
    Some(format!("{function}/{number}"))
}

/// Limits for our own archives: they passed the deploy's limits as uploads, and may since
/// hold compiled files beside them.
const OWN: ArchiveLimits = ArchiveLimits {
    max_entries: 100_000,
    max_file_bytes: 1 << 30,
    max_total_bytes: 4 << 30,
};

impl Platform {
    /// Archives the code just placed at `dir` for `tenant`'s version, before the version is
    /// stored.
    pub(super) fn archive_code(&self, tenant: &str, key: &str, dir: &Path) -> Result<()> {
        let zip = archive::zip_dir(dir).map_err(io_error)?;
        self.inner.store.put_code(tenant, key, &zip)?;
        Ok(())
    }

    /// Makes every stored version's code tree present under the code directory: extracted
    /// from its archive where missing; a tree from before archives is archived (and moved
    /// here, its old copy removed). Versions are pointed at where their code now is.
    pub async fn restore_code(&self) -> Result<Restored> {
        let this = self.clone();
        blocking(move || this.restore_code_now()).await?
    }

    fn restore_code_now(&self) -> Result<Restored> {
        let store = self.inner.store.as_ref();
        let code_dir = &self.inner.config.code_dir;
        let mut report = Restored::default();
        for function in store.functions(None)? {
            for version in store.versions(&function.id)? {
                let Some(key) = key_of(Path::new(&version.code_dir)) else {
                    continue;
                };
                let target = code_dir.join(&key);
                // Whether the archive is known to be stored (read or written just now).
                let mut stored = false;
                if !target.is_dir() {
                    let zip = match store.code(&key)? {
                        Some(zip) => zip,
                        None => {
                            let old = Path::new(&version.code_dir);
                            if !old.is_dir() {
                                tracing::error!(function = %function.name, version = version.version, "no code stored for this version");
                                report
                                    .missing
                                    .push(format!("{}@{}", function.name, version.version));
                                continue;
                            }
                            let zip = archive::zip_dir(old).map_err(io_error)?;
                            store.put_code(&function.tenant, &key, &zip)?;
                            report.archived += 1;
                            zip
                        }
                    };
                    self.extract_to(&zip, &target)?;
                    self.precompile(&version, &target);
                    report.extracted += 1;
                    stored = true;
                }
                let at = target.to_string_lossy();
                if version.code_dir != at {
                    store.set_code_dir(&function.id, version.version, &at)?;
                    let old = PathBuf::from(&version.code_dir);
                    if old.is_dir() && (stored || store.code(&key)?.is_some()) {
                        let _ = std::fs::remove_dir_all(&old);
                    }
                }
            }
        }
        if report.extracted > 0 || report.archived > 0 {
            self.inner.catalog.invalidate();
            tracing::info!(
                extracted = report.extracted,
                archived = report.archived,
                "function code restored from the stored archives"
            );
        }
        Ok(report)
    }

    /// Points `version` at its code in this node's code directory, extracting it from its
    /// stored archive first where this node has not yet (a version another node deployed).
    /// The archive is sealed, so what is extracted is what was deployed.
    pub(super) fn local_code(
        &self,
        version: &mut crate::model::Version,
    ) -> crate::store::Result<()> {
        use crate::store::StoreError;
        let Some(key) = key_of(Path::new(&version.code_dir)) else {
            return Ok(());
        };
        let target = self.inner.config.code_dir.join(&key);
        if !target.is_dir() {
            let zip = self.inner.store.code(&key)?.ok_or_else(|| {
                StoreError::Unavailable(format!("no code is stored for version {key}"))
            })?;
            // Another call may have extracted it meanwhile: that copy serves.
            if let Err(e) = self.extract_to(&zip, &target) {
                if !target.is_dir() {
                    return Err(StoreError::Unavailable(format!(
                        "the code of version {key} could not be extracted here: {e}"
                    )));
                }
            } else {
                self.precompile(version, &target);
                tracing::info!(version = %key, "code extracted from the store for this node");
            }
        }
        version.code_dir = target.to_string_lossy().into_owned();
        Ok(())
    }

    /// Extracts our own archive to `target`, whole or not at all.
    fn extract_to(&self, zip: &[u8], target: &Path) -> Result<()> {
        let staging = self
            .inner
            .config
            .code_dir
            .join(INCOMING)
            .join(format!("{:016x}", rand::random::<u64>()));
        archive::extract(zip, &staging, OWN)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        std::fs::rename(&staging, target).map_err(io_error)
    }
}
