//! Backends: what actually starts a bundle as a container.
//!
//! The sandbox logic (framing, timeouts, usage, outcomes) is the same whatever runs the
//! container; a [`Backend`] only launches a bundle with three pipes as its stdio and hands back
//! a [`Container`] that can be killed, waited for and destroyed.
//! [`crate::shim_backend::ShimBackend`] implements it for libcontainer and for OCI runtime
//! command lines (runc, crun); others (a VM, a remote node) plug in behind the same trait.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use cloudfunc_seccomp::Dialect;
use oci_spec::runtime::Spec;

pub use crate::control::ExitKind;

/// What to launch.
#[derive(Debug)]
pub struct Launch {
    /// Container id (unique under the engine's state root).
    pub id: String,
    /// The bundle directory, where the backend writes `spec` as `config.json` (as early or late
    /// as suits it: the shim backends overlap it with starting their helper).
    pub bundle: PathBuf,
    /// The container's OCI spec.
    pub spec: Spec,
    /// The container's stdin (requests).
    pub stdin: OwnedFd,
    /// The container's stdout (replies).
    pub stdout: OwnedFd,
    /// The container's stderr (logs).
    pub stderr: OwnedFd,
}

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The helper process or runtime could not be started.
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The runtime refused or failed to create the container.
    #[error("the container runtime failed: {0}")]
    Runtime(String),
    /// The runtime stopped answering.
    #[error("the container runtime did not answer within {0:?}")]
    Unresponsive(Duration),
    /// Talking to the runtime failed.
    #[error("lost contact with the container runtime")]
    Io(#[source] std::io::Error),
}

/// Starts containers.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A short name for records and logs (`libcontainer`, `runsc`, ...).
    fn name(&self) -> &'static str;
    /// How this backend reads masked seccomp comparisons.
    fn seccomp_dialect(&self) -> Dialect;
    /// Whether it needs root: every backend that makes namespaces and cgroups does.
    fn requires_root(&self) -> bool {
        true
    }
    /// Creates and starts the container; returns once its init runs.
    fn launch(&self, launch: Launch) -> Result<Box<dyn Container>, BackendError>;
    /// Removes what a crashed process left under `state_root` (containers only; cgroups and
    /// bundles are the engine's).
    fn sweep(&self, state_root: &std::path::Path) -> Vec<String>;
}

/// A running (or exited, not yet destroyed) container.
pub trait Container: Send + std::fmt::Debug {
    /// The init process's pid on the host.
    fn pid(&self) -> i32;
    /// Sends SIGKILL to every process in the container.
    fn kill(&mut self) -> Result<(), BackendError>;
    /// Waits up to `timeout` for init to exit; `None` if it is still running.
    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitKind>, BackendError>;
    /// Asks for [`Container::destroy`] to begin without waiting for it, so that the caller
    /// can clean up its own side meanwhile. By default it does nothing: `destroy` does all.
    fn begin_destroy(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Kills what is left and deletes the container and its state, and its cgroup if it can;
    /// `Ok(true)` when the cgroup is known to be gone too (the engine removes it otherwise).
    fn destroy(&mut self) -> Result<bool, BackendError>;
}
