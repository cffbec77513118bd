//! Isolation levels a function can ask for, and the engine that provides each.
//!
//! `container`: an OCI container on the host's kernel (libcontainer by default; runc or crun
//! if the server is told so). `gvisor`: the same bundle under gVisor's `runsc`, whose
//! user-space kernel stands between the function and the host's. Each level has its own
//! engine, state root and cgroup parent, so neither ever sweeps the other's sandboxes.

use std::fmt;
use std::str::FromStr;

use cloudfunc_sandbox::{error_chain, BackendKind, Engine, EngineConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How strongly a function is isolated from the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Namespaces, cgroups, seccomp and no capabilities, on the host's kernel.
    #[default]
    Container,
    /// All of that, with gVisor's kernel in between.
    Gvisor,
}

impl Isolation {
    /// Every level.
    pub const ALL: [Isolation; 2] = [Isolation::Container, Isolation::Gvisor];

    /// Its name in settings and records.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Gvisor => "gvisor",
        }
    }
}

impl FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Isolation::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("unknown isolation {s:?}: use \"container\" or \"gvisor\""))
    }
}

impl<'de> Deserialize<'de> for Isolation {
    /// By name, with [`FromStr`]'s message for an unknown one.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine of each isolation level; a level whose engine could not start keeps the reason.
#[derive(Debug, Clone)]
pub struct Engines {
    container: Engine,
    gvisor: Result<Engine, String>,
    default: Isolation,
}

impl Engines {
    /// Starts the container engine on `backend` from `base`, and the gVisor engine beside it
    /// with the `runsc` at `runsc` (state under `<state_dir>/gvisor`, cgroups under
    /// `<parent>-gvisor`). A missing `runsc` only makes gVisor unavailable, unless it is the
    /// default.
    pub fn start(
        base: &EngineConfig,
        backend: BackendKind,
        runsc: &std::path::Path,
        default: Isolation,
    ) -> anyhow::Result<Engines> {
        use anyhow::Context;
        if backend == BackendKind::Runsc {
            anyhow::bail!("runsc is the gvisor isolation level, not a container runtime: use libcontainer, runc or crun");
        }
        let container = Engine::new(EngineConfig {
            backend,
            ..base.clone()
        })
        .with_context(|| format!("starting the container engine ({backend})"))?;
        let gvisor = Engine::new(EngineConfig {
            backend: BackendKind::Runsc,
            state_dir: base.state_dir.join("gvisor"),
            cgroup_parent: format!("{}-gvisor", base.cgroup_parent),
            runtime_binary: Some(runsc.to_path_buf()),
            ..base.clone()
        })
        .map_err(|e| {
            format!(
                "gVisor isolation is not available on this server: {}",
                error_chain(&e)
            )
        });
        if let (Isolation::Gvisor, Err(why)) = (default, &gvisor) {
            anyhow::bail!("the default isolation is gvisor, but {why}");
        }
        Ok(Engines {
            container,
            gvisor,
            default,
        })
    }

    /// Engines built by the caller (tests).
    pub fn from_parts(
        container: Engine,
        gvisor: Result<Engine, String>,
        default: Isolation,
    ) -> Engines {
        Engines {
            container,
            gvisor,
            default,
        }
    }

    /// The level functions get when they do not ask for one.
    pub fn default_isolation(&self) -> Isolation {
        self.default
    }

    /// The engine of `level`, or why there is none.
    pub fn get(&self, level: Isolation) -> Result<&Engine, String> {
        match level {
            Isolation::Container => Ok(&self.container),
            Isolation::Gvisor => self.gvisor.as_ref().map_err(Clone::clone),
        }
    }

    /// Gives back what both engines hold on the host ([`Engine::release`]: cgroup parents,
    /// any sandbox cgroup a teardown gave up on, the tmpfs of their state): at the end of a
    /// stop, when no sandbox is alive any more. An engine does it too when its last clone
    /// goes, but a process can end before that.
    pub fn release(&self) {
        self.container.release();
        if let Ok(gvisor) = &self.gvisor {
            gvisor.release();
        }
    }

    /// What each level runs on, for the health report.
    pub fn describe(&self) -> Value {
        let level = |engine: Result<&Engine, String>| match engine {
            Ok(e) => json!({"available": true, "backend": e.backend_name()}),
            Err(why) => json!({"available": false, "reason": why}),
        };
        json!({
            "default": self.default,
            "container": level(self.get(Isolation::Container)),
            "gvisor": level(self.get(Isolation::Gvisor)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for level in Isolation::ALL {
            assert_eq!(level.name().parse::<Isolation>().unwrap(), level);
            assert_eq!(serde_json::to_value(level).unwrap(), json!(level.name()));
        }
        let err = "vm".parse::<Isolation>().unwrap_err();
        assert!(err.contains("container") && err.contains("gvisor"), "{err}");
    }
}
