//! Function code at rest. Each deploy's code is stored in the store as a ZIP archive, sealed
//! with its tenant's data key like every other record of theirs. The extracted tree that
//! sandboxes read (bind-mounted read-only) lives under the code directory, in the state
//! directory (0700), and is rebuilt from the archive whenever it is missing: after a reboot
//! has emptied `/run`, or when moving a data directory from before archives existed.

use std::path::{Path, PathBuf};

use super::{blocking, deploy::INCOMING, io_error, Platform, Result};
use crate::archive::{self, ArchiveLimits};
use crate::model::Version;

/// What [`Platform::restore_code`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Trees rebuilt from their archives.
    pub extracted: usize,
    /// Trees from before archives existed, archived now (and moved under the code directory).
    pub archived: usize,
    /// Versions whose code could not be found at all.
    pub missing: Vec<String>,
    /// Trees of versions no longer current, removed.
    pub retired: usize,
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

    /// Makes each function's current code tree present under the code directory: extracted
    /// from its archive where missing (other versions' when they are called); a tree from
    /// before archives is archived (and moved here, its old copy removed). Versions are
    /// pointed at where their code now is, and trees no current version uses are removed.
    pub async fn restore_code(&self) -> Result<Restored> {
        let this = self.clone();
        blocking(move || this.restore_code_now()).await?
    }

    fn restore_code_now(&self) -> Result<Restored> {
        let store = self.inner.store.as_ref();
        let code_dir = &self.inner.config.code_dir;
        let mut report = Restored::default();
        for function in &store.functions(None)? {
            let versions = store.versions(&function.id)?;
            let current = versions
                .iter()
                .find(|v| v.version == function.version)
                .and_then(|v| key_of(Path::new(&v.code_dir)));
            for version in &versions {
                let Some(key) = key_of(Path::new(&version.code_dir)) else {
                    continue;
                };
                let target = code_dir.join(&key);
                // Whether the archive is known to be stored (read or written just now).
                let mut stored = false;
                if !target.is_dir() {
                    let zip = match store.code(&key)? {
                        // Another version's code waits in its archive until it is called.
                        Some(_) if current.as_ref() != Some(&key) => None,
                        Some(zip) => Some(zip),
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
                            Some(zip)
                        }
                    };
                    if let Some(zip) = zip {
                        self.extract_to(&zip, &target)?;
                        self.precompile(version, &target);
                        report.extracted += 1;
                    }
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
            match self.retire_trees(&function.id, Some((function.version, &versions))) {
                Ok(n) => report.retired += n,
                Err(e) => {
                    tracing::warn!(function = %function.name, error = %e, "old code trees could not be removed")
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
        if report.retired > 0 {
            tracing::info!(
                retired = report.retired,
                "code trees of versions no longer current removed (rebuilt when called)"
            );
        }
        Ok(report)
    }

    /// Removes the code trees of `function_id` that its current version does not use (all of
    /// them once it is deleted), if no sandbox of its other versions is idle, lent or awaited
    /// (else it leaves them for the next time): a version called again is rebuilt from its
    /// archive. Without this a tree piled up per deploy in the state directory, a tmpfs on
    /// most hosts. Runs after each deploy, here or on another node, and at the start;
    /// blocking. Returns how many trees went.
    pub(super) fn prune_code(&self, function_id: &str) -> Result<usize> {
        let store = self.inner.store.as_ref();
        match store.function(None, function_id)? {
            Some(function) => {
                let versions = store.versions(function_id)?;
                self.retire_trees(function_id, Some((function.version, &versions)))
            }
            None => self.retire_trees(function_id, None),
        }
    }

    /// [`Platform::prune_code`] with the function's current version number and its
    /// versions already read (`None`: it was deleted).
    fn retire_trees(&self, function_id: &str, known: Option<(u32, &[Version])>) -> Result<usize> {
        // Each version's tree, and which is the current version's.
        let versions: Vec<(Option<String>, u32)> = known
            .map(|(_, versions)| {
                versions
                    .iter()
                    .map(|v| (key_of(Path::new(&v.code_dir)), v.version))
                    .collect()
            })
            .unwrap_or_default();
        let keep = match known {
            Some((current, _)) => {
                let keep = versions
                    .iter()
                    .find(|(_, n)| *n == current)
                    .and_then(|(key, _)| key.clone());
                if keep.is_none() {
                    return Ok(0);
                }
                keep
            }
            None => None,
        };
        let root = self.inner.config.code_dir.join(function_id);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Ok(0);
        };
        let stale: Vec<(PathBuf, Option<Vec<u32>>)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && key_of(p) != keep)
            .filter_map(|p| {
                // Of a deleted function, any version may still be running.
                if known.is_none() {
                    return Some((p, None));
                }
                let key = key_of(&p);
                let using: Vec<u32> = versions
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .map(|(_, n)| *n)
                    .collect();
                // A tree of no stored version is a deploy's still under way: not ours.
                (!using.is_empty()).then_some((p, Some(using)))
            })
            .collect();
        let trash = self
            .inner
            .config
            .code_dir
            .join(INCOMING)
            .join(format!("retired-{:016x}", rand::random::<u64>()));
        let catalog = &self.inner.catalog;
        let gone = self
            .inner
            .pool
            .retire_code(function_id, &stale, &trash, || catalog.invalidate())
            .map_err(io_error)?;
        let _ = std::fs::remove_dir_all(&trash);
        if known.is_none() {
            // Gone only if empty: a call may have rebuilt a tree meanwhile.
            let _ = std::fs::remove_dir(&root);
        }
        Ok(gone.len())
    }

    /// [`Platform::prune_code`] on a blocking thread, off the caller's path; a failure is
    /// only logged (the trees stay until the next time).
    pub(super) fn prune_code_later(&self, function_id: &str) {
        let (this, id) = (self.clone(), function_id.to_string());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = this.prune_code(&id) {
                tracing::warn!(function_id = %id, error = %e, "old code trees could not be removed");
            }
        });
    }

    /// Points `version` at its code in this node's code directory, extracting it from its
    /// stored archive first where this node has not yet (a version another node deployed).
    /// The archive is sealed, so what is extracted is what was deployed.
    pub(super) fn local_code(&self, version: &mut Version) -> crate::store::Result<()> {
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
