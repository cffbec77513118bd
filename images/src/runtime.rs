//! How each language runtime starts inside a sandbox.
//!
//! Every runtime starts a bootstrap program that lives in the image, loads the user's handler
//! from `/code` and then serves invocations one after another over the sandbox's stdio, so one
//! sandbox can serve many calls. The bootstraps share one framing (see the `sandbox` crate).

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Where the bootstraps live inside the image.
pub const BOOTSTRAP_DIR: &str = "/cloudfunc";

/// The Python bootstrap's source.
pub const PYTHON_BOOTSTRAP: &str = include_str!("../bootstrap/python.py");
/// The Node.js bootstrap's source.
pub const NODE_BOOTSTRAP: &str = include_str!("../bootstrap/node.js");

/// A language runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// CPython 3 (the host's `/usr/bin/python3`).
    Python,
    /// Node.js (the host's `/usr/bin/node`).
    Node,
}

impl Runtime {
    /// Every runtime.
    pub const ALL: [Runtime; 2] = [Runtime::Python, Runtime::Node];

    /// The canonical name (`python`, `node`).
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Node => "node",
        }
    }

    /// The interpreter on the host (and, through the `/usr` mount, in the sandbox).
    pub fn interpreter(self) -> &'static str {
        match self {
            Runtime::Python => "/usr/bin/python3",
            Runtime::Node => "/usr/bin/node",
        }
    }

    /// The bootstrap's file name under [`BOOTSTRAP_DIR`] and its source.
    pub fn bootstrap(self) -> (&'static str, &'static str) {
        match self {
            Runtime::Python => ("bootstrap.py", PYTHON_BOOTSTRAP),
            Runtime::Node => ("bootstrap.js", NODE_BOOTSTRAP),
        }
    }

    /// The file the interpreter runs, under [`BOOTSTRAP_DIR`]: for Python the bootstrap
    /// compiled when the image is written ([`compile_python_bootstrap`]), so that no cold start
    /// compiles its 300 lines again (1.6 ms of every Python start here).
    pub fn entry(self) -> &'static str {
        match self {
            Runtime::Python => "bootstrap.pyc",
            Runtime::Node => "bootstrap.js",
        }
    }

    /// The sandbox's process arguments.
    ///
    /// Python moves its channels itself (`os.dup2`). Node cannot, so a shell does it before
    /// `exec`ing node: requests on fd 3, replies on fd 4, stdout joined to the log pipe.
    pub fn process_args(self) -> Vec<String> {
        let bootstrap = format!("{BOOTSTRAP_DIR}/{}", self.entry());
        match self {
            // -I: ignore the environment and user site; -S: no site import (faster start);
            // -B: never write .pyc into the read-only code; -u: logs appear as printed.
            Runtime::Python => ["/usr/bin/python3", "-I", "-S", "-B", "-u", &bootstrap]
                .map(String::from)
                .to_vec(),
            Runtime::Node => vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("exec /usr/bin/node {bootstrap} 3<&0 4>&1 </dev/null >&2"),
            ],
        }
    }

    /// Environment the runtime needs besides the sandbox's common one.
    pub fn env(self) -> Vec<String> {
        match self {
            Runtime::Python => vec!["PYTHONDONTWRITEBYTECODE=1".into()],
            // io_uring is denied by the seccomp profile; tell libuv not to try it.
            Runtime::Node => vec!["UV_USE_IO_URING=0".into()],
        }
    }

    /// Whether the interpreter exists on this host.
    pub fn available(self) -> bool {
        std::path::Path::new(self.interpreter()).exists()
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Runtime {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Ok(Runtime::Python),
            "node" | "nodejs" | "javascript" | "js" => Ok(Runtime::Node),
            _ => Err(Error::UnknownRuntime(s.to_string())),
        }
    }
}

impl serde::Serialize for Runtime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Runtime {
    /// By name, with [`FromStr`]'s aliases and its message for an unknown one.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Compiles the Python bootstrap at `source` into `compiled` with `python`, the interpreter
/// that will run it (a `.pyc` only runs on the Python version that wrote it). Tracebacks name
/// the source as `/cloudfunc/bootstrap.py`, where the image keeps it.
pub fn compile_python_bootstrap(
    python: &std::path::Path,
    source: &std::path::Path,
    compiled: &std::path::Path,
) -> crate::Result<()> {
    const COMPILE: &str = "import py_compile, sys\n\
        py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,\n\
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n";
    let output = std::process::Command::new(python)
        .args(["-I", "-S", "-c", COMPILE])
        .arg(source)
        .arg(compiled)
        .arg(format!("{BOOTSTRAP_DIR}/{}", Runtime::Python.bootstrap().0))
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(crate::io_err(python))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Compile {
        python: python.to_path_buf(),
        detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for runtime in Runtime::ALL {
            assert_eq!(runtime.name().parse::<Runtime>().unwrap(), runtime);
        }
        assert_eq!("JavaScript".parse::<Runtime>().unwrap(), Runtime::Node);
        assert!(matches!(
            "ruby".parse::<Runtime>(),
            Err(Error::UnknownRuntime(_))
        ));
    }

    #[test]
    fn node_channels_are_moved_before_exec() {
        let args = Runtime::Node.process_args();
        assert_eq!(args[0], "/bin/sh");
        assert!(args[2].starts_with("exec /usr/bin/node /cloudfunc/bootstrap.js"));
        assert!(args[2].ends_with("3<&0 4>&1 </dev/null >&2"));
    }
}
