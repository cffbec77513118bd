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

    /// The sandbox's process arguments.
    ///
    /// Python moves its channels itself (`os.dup2`). Node cannot, so a shell does it before
    /// `exec`ing node: requests on fd 3, replies on fd 4, stdout joined to the log pipe.
    pub fn process_args(self) -> Vec<String> {
        let bootstrap = format!("{BOOTSTRAP_DIR}/{}", self.bootstrap().0);
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
