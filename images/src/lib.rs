//! Runtime images for cloudfunc sandboxes.
//!
//! An image is a root filesystem plus the host paths bind-mounted into it, read-only. The
//! [`host`] image costs no disk: a skeleton of empty mount points and a few generated files,
//! with the host's `/usr` mounted over it, so every Python or Node the host has is available
//! without copying it. The [`runtime`] module says how each language starts inside an image.

pub mod host;
pub mod runtime;

pub use host::HostImage;
pub use runtime::Runtime;

use std::path::PathBuf;

/// A root filesystem ready to be named in an OCI bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// Absolute path of the root filesystem (shared by every sandbox of this image; it is
    /// mounted read-only, so it must never be written through a sandbox).
    pub rootfs: PathBuf,
    /// Host paths to bind-mount read-only into it.
    pub mounts: Vec<BindMount>,
}

/// A read-only bind mount of a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Path on the host.
    pub source: PathBuf,
    /// Path inside the sandbox.
    pub destination: PathBuf,
}

/// Errors from preparing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the image could not be written or read.
    #[error("cannot prepare the image at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The host lacks what the image needs.
    #[error("the host has no {0}, which the host image needs")]
    HostMissing(PathBuf),
    /// The host's Python could not compile the Python bootstrap.
    #[error("{python} cannot compile the Python bootstrap: {detail}")]
    Compile { python: PathBuf, detail: String },
    /// An unknown runtime name.
    #[error("unknown runtime {0:?}: use \"python\" or \"node\"")]
    UnknownRuntime(String),
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
