//! Run functions in limited OCI sandboxes.
//!
//! An [`Engine`] owns a state root and launches containers through youki's libcontainer
//! (one small single-threaded shim process per container, so it is safe to use from a
//! multi-threaded program). A [`Sandbox`] is one started container whose language bootstrap
//! has loaded a function; [`Sandbox::invoke`] runs it once with a JSON event and returns an
//! [`Invocation`]: a typed [`Outcome`], the captured [`Logs`] and the [`Usage`] read from the
//! sandbox's cgroup.
//!
//! Every sandbox gets its own pid, mount, ipc, uts, network and (where the kernel has it)
//! cgroup namespace, a read-only root with a private size-capped `/tmp`, no capabilities,
//! `no_new_privileges`, a seccomp filter, memory (no swap), CPU and pids limits, and runs as
//! an unprivileged user. A call that passes its timeout has every process of its sandbox
//! killed.
//!
//! ```no_run
//! use cloudfunc_sandbox::{Engine, EngineConfig, InvokeOptions, Runtime, Sandbox, SandboxSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::new(EngineConfig::default())?; // needs root
//! let spec = SandboxSpec::new(Runtime::Python, "/srv/functions/hello_fn");
//! let mut sandbox = Sandbox::create(&engine, spec)?;
//! let call = sandbox.invoke(&serde_json::json!({"name": "Alice"}), &InvokeOptions::default())?;
//! println!("{:?} in {:?} (cold: {})", call.outcome, call.usage.duration, call.usage.cold);
//! sandbox.shutdown()?;
//! # Ok(())
//! # }
//! ```

pub mod backend;
mod born;
pub mod cgroup;
mod channel;
mod command;
pub mod control;
mod engine;
mod error;
#[cfg(feature = "fake")]
pub mod fake;
mod memdirs;
pub mod outcome;
pub mod placement;
mod precompile;
pub mod protocol;
mod sandbox;
pub mod seal;
pub mod shim;
pub mod shim_backend;

pub use cloudfunc_bundles::{Limits, Process};
pub use cloudfunc_images::Runtime;
pub use cloudfunc_seccomp::{Dialect as SeccompDialect, Profile as SeccompProfile};
pub use command::CommandOutput;
pub use engine::{locate_shim, BackendKind, Engine, EngineConfig, SeccompPolicy, SweepReport};
pub use error::{error_chain, Error, Result};
pub use outcome::{ExitKind, FunctionError, Invocation, Logs, Outcome, Usage};
pub use precompile::Precompiled;
pub use sandbox::{Exchanged, InvokeOptions, Sandbox, SandboxSpec, StemCell};

/// The README's library example, compiled with this crate's doc tests so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExample;
