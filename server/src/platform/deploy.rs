//! Deploys (a new function or its next version), and the lifecycle after: listing,
//! activation, deletion. A version is proven to load, in a sandbox kept for its first call,
//! before it is stored.

use std::path::{Path, PathBuf};

use cloudfunc_sandbox::{Error as SandboxError, Sandbox};

use super::cluster::Change;
use super::invoke::request_for;
use super::{blocking, io_error, Platform, PlatformError, Result, Settings};
use crate::archive::{self, ArchiveLimits};
use crate::auth::Caller;
use crate::model::{valid_name, Function, Version};
use crate::pool::{Lease, PoolError};

/// The code of a deploy.
#[derive(Debug, Clone)]
pub enum Code {
    /// A ZIP archive.
    Zip(bytes::Bytes),
    /// Single files (name, content): seed 002's inline code, seed 004's `python_file`.
    Files(Vec<(String, Vec<u8>)>),
    /// Keep the previous version's code (a settings-only update).
    Unchanged,
    /// The code and settings of this earlier version, as the next version: a rollback.
    Version(u32),
}

/// Where code waits under the code directory until its function and version are known.
pub(super) const INCOMING: &str = ".incoming";

/// Which version a deploy writes.
struct NewVersion<'a> {
    tenant: &'a str,
    function_id: &'a str,
    name: &'a str,
    number: u32,
}

/// A deploy's code, written out before its function is known. Removed if dropped unplaced.
#[derive(Debug)]
struct Staged {
    dir: PathBuf,
    placed: bool,
}

impl Staged {
    /// Writes `code` under `incoming`; `None` for code already stored ([`Code::Unchanged`],
    /// [`Code::Version`]).
    fn write(incoming: &Path, code: Code, limits: ArchiveLimits) -> Result<Option<Staged>> {
        let dir = incoming.join(format!("{:016x}", rand::random::<u64>()));
        let staged = Staged { dir, placed: false };
        match code {
            Code::Zip(bytes) => {
                archive::extract(&bytes, &staged.dir, limits)?;
            }
            Code::Files(files) => write_files(&staged.dir, &files)?,
            Code::Unchanged | Code::Version(_) => return Ok(None),
        }
        Ok(Some(staged))
    }

    /// Moves the code to `dest`, its version's place.
    fn place(mut self, dest: &Path) -> Result<()> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        std::fs::rename(&self.dir, dest).map_err(io_error)?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Platform {
    /// Deploys `code` as a new function, or as the next version of the caller's function of
    /// that name. The name is the settings', else the manifest's in the code.
    pub async fn deploy(
        &self,
        caller: &Caller,
        settings: Settings,
        code: Code,
    ) -> Result<(Function, Version)> {
        self.require_space()?;
        self.admit_deploy(caller)?;
        // A rollback starts from that version, as an update starts from the current one.
        let from = match code {
            Code::Version(n) => Some(n),
            _ => None,
        };
        // The code first, into a staging directory: its manifest may name the function.
        let staged = {
            let incoming = self.inner.config.code_dir.join(INCOMING);
            let limits = self.inner.config.archive;
            blocking(move || Staged::write(&incoming, code, limits)).await??
        };
        let manifest = match &staged {
            Some(staged) => Settings::from_code_dir(&staged.dir)?,
            None => Settings::default(),
        };
        let name = settings
            .name
            .clone()
            .or_else(|| manifest.name.clone())
            .ok_or_else(|| {
                PlatformError::BadRequest(
                    "a name is required (form field, JSON field or manifest)".into(),
                )
            })?;
        if !valid_name(&name) {
            return Err(PlatformError::BadRequest(format!(
                "invalid function name {name:?}: use 1-64 of a-z, 0-9, '_' and '-'"
            )));
        }
        let adding = staged
            .as_ref()
            .map_or(0, |s| super::quotas::tree_bytes(&s.dir));
        {
            let (this, caller, name) = (self.clone(), caller.clone(), name.clone());
            blocking(move || this.check_storage(&caller, &name, adding)).await??;
        }
        let store = self.inner.store.clone();
        let tenant = caller.tenant.clone();
        let (previous, function_id, number) = {
            let (tenant, name) = (tenant.clone(), name.clone());
            blocking(move || -> Result<_> {
                let previous = match store.function(Some(&tenant), &name)? {
                    Some(f) => store.version(&f.id, from.unwrap_or(f.version))?,
                    None => None,
                };
                if let (Some(n), None) = (from, &previous) {
                    return Err(PlatformError::NotFound(format!(
                        "function {name:?} has no version {n}"
                    )));
                }
                let (function_id, number) = store.next_version(&tenant, &name)?;
                Ok((previous, function_id, number))
            })
            .await??
        };
        let this = self.clone();
        blocking(move || {
            let version = NewVersion {
                tenant: &tenant,
                function_id: &function_id,
                name: &name,
                number,
            };
            this.write_version(version, settings, manifest, staged, previous)
        })
        .await?
    }

    /// Moves the staged code into place (or keeps the previous version's), resolves the
    /// settings, proves the version loads, and stores it.
    fn write_version(
        &self,
        new: NewVersion<'_>,
        settings: Settings,
        manifest: Settings,
        staged: Option<Staged>,
        mut previous: Option<Version>,
    ) -> Result<(Function, Version)> {
        let config = &self.inner.config;
        let code_dir = config
            .code_dir
            .join(new.function_id)
            .join(new.number.to_string());
        let fresh_code = staged.is_some();
        let (code_path, manifest) = match staged {
            Some(staged) => {
                staged.place(&code_dir)?;
                (code_dir.clone(), manifest)
            }
            None => {
                let previous = previous.as_mut().ok_or_else(|| {
                    PlatformError::BadRequest("no code given and no earlier version to keep".into())
                })?;
                // Its tree may be only in its archive here (another node deployed it).
                self.local_code(previous)?;
                let path = PathBuf::from(&previous.code_dir);
                let manifest = Settings::from_code_dir(&path)?;
                (path, manifest)
            }
        };
        let cleanup = |e: PlatformError| {
            if fresh_code {
                let _ = std::fs::remove_dir_all(&code_dir);
            }
            e
        };
        let from_previous = previous
            .as_ref()
            .map(Settings::of_version)
            .unwrap_or_default();
        let merged = from_previous.overlay(manifest).overlay(settings);
        let mut version = merged
            .resolve(new.number, &code_path, &config.bounds, self.engines())
            .map_err(cleanup)?;
        super::destinations::check(self.inner.store.as_ref(), new.tenant, new.name, &version)
            .map_err(cleanup)?;
        super::secrets::fill(self.inner.store.as_ref(), new.tenant, &mut version)
            .map_err(|e| cleanup(e.into()))?;
        super::secrets::missing(&version).map_err(cleanup)?;
        if fresh_code {
            let key = super::code::code_key(new.function_id, new.number);
            self.archive_code(new.tenant, &key, &code_path)
                .map_err(cleanup)?;
            self.precompile(&version, &code_path);
        }
        let loaded = self
            .load(new.function_id, new.name, &version)
            .map_err(cleanup)?;
        let pool = &self.inner.pool;
        let function =
            match self
                .inner
                .store
                .add_version(new.tenant, new.function_id, new.name, &version)
            {
                Ok(function) => function,
                Err(e) => {
                    if let Some(lease) = loaded {
                        pool.discard(lease);
                    }
                    return Err(cleanup(e.into()));
                }
            };
        self.inner.catalog.invalidate();
        // Sandboxes of earlier versions are not kept for the calls to come; the one that just
        // loaded this version is, so its first call finds it warm.
        let drained = pool.drain(new.function_id);
        if let Some(lease) = loaded {
            pool.keep(lease, drained);
        }
        self.tell_blocking(Change::Function(new.function_id.to_string()));
        if let Err(e) = self.prune_code(new.function_id) {
            tracing::warn!(function = %new.name, error = %e, "old code trees could not be removed");
        }
        Ok((function, version))
    }

    /// Compiles new code once, in a sandbox of its function's isolation, so that its cold
    /// starts do not (see [`cloudfunc_sandbox::Engine::precompile`]). A failure costs only that: the function
    /// compiles its code at each cold start, as it would have anyway.
    pub(super) fn precompile(&self, version: &Version, code_dir: &Path) {
        let runtime = version.runtime;
        let done = self
            .engine(version.isolation)
            .map_err(|e| e.to_string())
            .and_then(|engine| {
                engine
                    .precompile(runtime, code_dir)
                    .map_err(|e| cloudfunc_sandbox::error_chain(&e))
            });
        if let Err(why) = done {
            tracing::warn!(code = %code_dir.display(), why, "deployed uncompiled");
        }
    }

    /// Proves that `version` loads (a missing handler or a syntax error is reported at
    /// deploy), in a sandbox from the pool that is then kept for its first call. At the
    /// pool's caps it proves it in a sandbox of its own, stopped at once.
    fn load(&self, function_id: &str, name: &str, version: &Version) -> Result<Option<Lease>> {
        let (key, request) = request_for(function_id, name, version);
        match self.inner.pool.load(&key, &request) {
            Ok(lease) => Ok(Some(lease)),
            Err(PoolError::Sandbox(e)) => Err(load_error(e)),
            Err(PoolError::Unavailable(why)) => Err(PlatformError::BadRequest(why)),
            Err(
                PoolError::Full { .. }
                | PoolError::Busy { .. }
                | PoolError::Stopping
                | PoolError::Stale
                | PoolError::CodeGone
                | PoolError::Deadline,
            ) => match Sandbox::create(self.engine(version.isolation)?, request.spec) {
                Ok(sandbox) => sandbox
                    .shutdown()
                    .map(|()| None)
                    .map_err(|e| PlatformError::Internal(e.into())),
                Err(e) => Err(load_error(e)),
            },
        }
    }

    /// Functions the caller sees.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<Function>> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        Ok(blocking(move || store.functions(scope.as_deref())).await??)
    }

    /// One function (by id or name) with its versions.
    pub async fn get(&self, caller: &Caller, key: &str) -> Result<(Function, Vec<Version>)> {
        let function = self.find(caller, key).await?;
        let (store, id) = (self.inner.store.clone(), function.id.clone());
        let versions = blocking(move || store.versions(&id)).await??;
        Ok((function, versions))
    }

    /// Activates or deactivates a function.
    pub async fn set_active(&self, caller: &Caller, key: &str, active: bool) -> Result<Function> {
        let function = self.find(caller, key).await?;
        let (store, id) = (self.inner.store.clone(), function.id.clone());
        blocking(move || store.set_active(&id, active)).await??;
        self.inner.catalog.invalidate();
        self.drain(&function.id).await;
        self.tell(Change::Function(function.id.clone())).await;
        if !active && function.active {
            let summary = format!("{} was deactivated by {}", function.name, caller.tenant);
            self.raise_function_event(
                &function,
                crate::alerts::Severity::Warning,
                "deactivated",
                summary,
            )
            .await;
        }
        Ok(Function { active, ..function })
    }

    /// Deletes a function, its versions and their code. Its finished tasks stay readable.
    pub async fn delete(&self, caller: &Caller, key: &str) -> Result<Function> {
        let function = self.find(caller, key).await?;
        let (this, id) = (self.clone(), function.id.clone());
        let code_root = self.inner.config.code_dir.join(&function.id);
        // Records of its calls so far go in first, so none is written after the deletion.
        let store = self.settled_store().await;
        blocking(move || -> Result<()> {
            store.delete_function(&id)?;
            // Before the code goes, so that no new call resolves to it.
            this.inner.catalog.invalidate();
            let _ = std::fs::remove_dir_all(&code_root);
            Ok(())
        })
        .await??;
        // After the deletion, so that no call can take a new sandbox for it meanwhile.
        self.drain(&function.id).await;
        self.tell(Change::Function(function.id.clone())).await;
        self.forget_anomalies(&function.id);
        match self.delete_rules_of(&function.tenant, &function.id).await {
            Ok(0) => {}
            Ok(rules) => {
                tracing::info!(function = %function.name, rules, "its alert rules went with it")
            }
            Err(e) => {
                tracing::warn!(function = %function.name, error = %e, "its alert rules could not be deleted")
            }
        }
        Ok(function)
    }
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_error)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io_error)?;
    for (name, content) in files {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            let _ = std::fs::remove_dir_all(dir);
            return Err(PlatformError::BadRequest(format!(
                "file name {name:?} must be a plain name like handler.py"
            )));
        }
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(io_error)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(io_error)?;
    }
    Ok(())
}

/// Why a version does not load, for the deployer.
fn load_error(e: SandboxError) -> PlatformError {
    match e {
        SandboxError::FunctionInit { error, logs } => PlatformError::Unprocessable(format!(
            "the function does not load: {}: {}{}",
            error.kind,
            error.message,
            if logs.text.is_empty() {
                String::new()
            } else {
                format!(" (output: {})", logs.text.trim())
            }
        )),
        SandboxError::InitCrashed { exit, .. } => PlatformError::Unprocessable(format!(
            "the runtime died while loading the function ({exit})"
        )),
        SandboxError::StartTimeout(t) => {
            PlatformError::Unprocessable(format!("the function did not load within {t:?}"))
        }
        e => PlatformError::Internal(e.into()),
    }
}
