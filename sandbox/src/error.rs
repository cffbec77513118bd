//! The sandbox library's errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::BackendError;
use crate::outcome::{FunctionError, Logs};

/// Everything that can stop the library from giving an [`crate::Invocation`].
///
/// A function's own failures (it raised, timed out, ran out of memory) are not errors: they
/// are [`crate::Outcome`]s. These are failures to have a sandbox at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sandboxes need root (namespaces, cgroups, mounts).
    #[error("cloudfunc sandboxes need root")]
    NotRoot,
    /// Another engine holds the state root.
    #[error("another cloudfunc engine is using the state directory {0}")]
    Busy(PathBuf),
    /// The configuration is unusable.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The sandbox's settings are unusable.
    #[error("invalid sandbox settings: {0}")]
    InvalidSpec(String),
    /// The shim binary was not found.
    #[error("cannot find the cloudfunc-shim binary: set CLOUDFUNC_SHIM or install it next to this program")]
    ShimNotFound,
    /// A file operation failed.
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A pipe or poll failed.
    #[error("sandbox I/O failed")]
    Pipe(#[source] std::io::Error),
    /// The cgroup hierarchy could not be read.
    #[error("cannot read the cgroup hierarchy")]
    Cgroup(#[source] std::io::Error),
    /// The image could not be prepared.
    #[error(transparent)]
    Image(#[from] cloudfunc_images::Error),
    /// The bundle could not be built.
    #[error(transparent)]
    Bundle(#[from] cloudfunc_bundles::Error),
    /// The seccomp profile is invalid.
    #[error(transparent)]
    Seccomp(#[from] cloudfunc_seccomp::Error),
    /// The backend could not start the container.
    #[error("the sandbox could not be started")]
    Backend(#[from] BackendError),
    /// The function's code could not be loaded (syntax error, missing handler, import error).
    #[error("the function could not be loaded: {}: {}", error.kind, error.message)]
    FunctionInit { error: FunctionError, logs: Logs },
    /// The runtime died while loading the function.
    #[error("the runtime died while loading the function ({exit})")]
    InitCrashed { exit: String, logs: Logs },
    /// The runtime did not load the function in time.
    #[error("the function did not load within {0:?}")]
    StartTimeout(Duration),
    /// The function's code could not be compiled ahead of its calls.
    #[error("the function's code could not be compiled ahead: {0}")]
    Precompile(String),
    /// The sandbox ended earlier (timeout, crash, OOM) and serves no more calls.
    #[error("this sandbox has ended and serves no more invocations")]
    SandboxGone,
}

impl Error {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its sources, on one line (`outer: cause: root cause`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
