//! OCI bundles for cloudfunc sandboxes.
//!
//! [`BundleConfig`] says what one sandbox is (its image, its process, the function's code, its
//! limits, its cgroup and its seccomp filter); [`build_spec`] turns that into an OCI runtime
//! `Spec`, and [`write_bundle`] writes it as `config.json` into a bundle directory. Nothing
//! here needs root: the result is the same whichever runtime (libcontainer, runc, crun, runsc)
//! later runs it, and the golden tests pin it.

pub mod limits;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cloudfunc_images::{PreparedImage, Runtime};
use oci_spec::runtime::{LinuxSeccomp, Spec};
use serde_json::{json, Value};

pub use limits::Limits;

/// The uid and gid functions run as (`nobody`; named `sandbox` in the image's `/etc/passwd`).
pub const SANDBOX_UID: u32 = 65534;

/// Where the function's code is mounted, read-only.
pub const CODE_DIR: &str = "/code";

/// Paths masked as runc masks them by default.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths made read-only as runc does by default.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices (major, minor) a sandbox may use: null, zero, full, random, urandom, tty.
pub const ALLOWED_DEVICES: &[(i64, i64)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0)];

/// What the sandbox's init process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Process {
    /// A language bootstrap that serves invocations.
    Bootstrap(Runtime),
    /// A plain command (benchmarks and raw checks).
    Command(Vec<String>),
}

/// Facts about the host that change the spec; detected by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFeatures {
    /// The kernel has cgroup namespaces.
    pub cgroup_namespace: bool,
    /// Swap can be limited (v1 `memory.memsw.*` or v2 `memory.swap.max`).
    pub swap_limit: bool,
}

/// Which kernel the function's system calls reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GuestKernel {
    /// The host's own (libcontainer, runc, crun).
    #[default]
    Host,
    /// gVisor's Sentry, a user-space kernel in its own host processes (runsc).
    Gvisor,
}

impl GuestKernel {
    /// The host cgroup's pids limit for a function allowed `pids` processes and threads.
    pub fn host_pids(self, pids: u32) -> u32 {
        match self {
            GuestKernel::Host => pids,
            GuestKernel::Gvisor => pids
                .saturating_mul(GVISOR_HOST_TASKS_PER_TASK)
                .saturating_add(GVISOR_SENTRY_TASKS),
        }
    }
}

/// Host tasks a gVisor sandbox may use per task of the function. Under the ptrace platform the
/// Sentry runs each guest address space in a stub process and traces it from its own threads:
/// a fork bomb stopped at 47 guest processes held 288 host tasks (Python) and 442 (Node).
pub const GVISOR_HOST_TASKS_PER_TASK: u32 = 16;

/// Host tasks a gVisor sandbox needs for itself (the Sentry's and the gofer's threads).
pub const GVISOR_SENTRY_TASKS: u32 = 256;

/// Everything one bundle is made of.
#[derive(Debug, Clone)]
pub struct BundleConfig<'a> {
    /// The container id (also the hostname's suffix in logs).
    pub id: &'a str,
    /// The root filesystem and its host mounts.
    pub image: &'a PreparedImage,
    /// What runs as init.
    pub process: Process,
    /// The function's code, mounted read-only at [`CODE_DIR`].
    pub code_dir: Option<&'a Path>,
    /// Resource limits.
    pub limits: Limits,
    /// Absolute cgroup path (`/<parent>/<id>`).
    pub cgroup_path: String,
    /// The seccomp section; `None` only when the caller deliberately runs without a filter.
    pub seccomp: Option<LinuxSeccomp>,
    /// Extra environment (`KEY=value`), after the sandbox's own.
    pub env: Vec<String>,
    /// Host facts.
    pub host: HostFeatures,
    /// The kernel the function runs on.
    pub kernel: GuestKernel,
}

/// Errors from building or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The limits are unusable.
    #[error("invalid limits: {0}")]
    Limits(String),
    /// The cgroup path is relative (libcontainer would put it under `:youki:` at the root).
    #[error("the cgroup path {0:?} must be absolute")]
    RelativeCgroup(String),
    /// An environment entry is not `KEY=value`.
    #[error("environment entry {0:?} is not KEY=value")]
    BadEnv(String),
    /// The generated spec is not a valid OCI spec (a bug here).
    #[error("the generated spec is invalid")]
    Spec(#[source] serde_json::Error),
    /// The bundle directory could not be written.
    #[error("cannot write the bundle at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Builds the OCI runtime spec for one sandbox.
pub fn build_spec(config: &BundleConfig<'_>) -> Result<Spec> {
    config.limits.validate().map_err(Error::Limits)?;
    if !config.cgroup_path.starts_with('/') {
        return Err(Error::RelativeCgroup(config.cgroup_path.clone()));
    }
    if let Some(bad) = config
        .env
        .iter()
        .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
    {
        return Err(Error::BadEnv(bad.clone()));
    }
    let limits = &config.limits;

    let mut env = vec![
        "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
        "HOME=/tmp".into(),
        "TMPDIR=/tmp".into(),
        "LANG=C.UTF-8".into(),
    ];
    let args = match &config.process {
        Process::Bootstrap(runtime) => {
            env.extend(runtime.env());
            runtime.process_args()
        }
        Process::Command(args) => args.clone(),
    };
    env.extend(config.env.iter().cloned());

    let tmp_size = format!("size={}", limits.tmp_bytes);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", tmp_size]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", tmp_size]}),
    ];
    let bind = |source: &Path, destination: &Path| {
        json!({"destination": destination, "type": "bind", "source": source,
               "options": ["bind", "ro", "nosuid", "nodev"]})
    };
    for mount in &config.image.mounts {
        mounts.push(bind(&mount.source, &mount.destination));
    }
    if let Some(code) = config.code_dir {
        mounts.push(bind(code, Path::new(CODE_DIR)));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "mount"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "network"}),
    ];
    if config.host.cgroup_namespace {
        namespaces.push(json!({"type": "cgroup"}));
    }

    let memory = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
    let mut memory_section = json!({"limit": memory});
    if config.host.swap_limit {
        // OCI's swap is memory plus swap: equal to the limit means no swap at all.
        memory_section["swap"] = json!(memory);
    }
    let mut devices = vec![json!({"allow": false, "access": "rwm"})];
    for (major, minor) in ALLOWED_DEVICES {
        devices.push(
            json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}),
        );
    }

    // On gVisor the host cgroup holds the Sentry, whose own threads count too, so the
    // function's limit is enforced inside, by gVisor's kernel, as RLIMIT_NPROC (the host kernel
    // counts that per user across every sandbox, so it is no use there), and the host cgroup
    // keeps a proportionate backstop.
    let mut rlimits = vec![
        json!({"type": "RLIMIT_NOFILE", "soft": limits.nofile, "hard": limits.nofile}),
        json!({"type": "RLIMIT_CORE", "soft": 0, "hard": 0}),
    ];
    if config.kernel == GuestKernel::Gvisor {
        rlimits.push(json!({"type": "RLIMIT_NPROC", "soft": limits.pids, "hard": limits.pids}));
    }
    let host_pids = config.kernel.host_pids(limits.pids);
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": config.cgroup_path,
        "resources": {
            "memory": memory_section,
            "cpu": {"quota": limits.cpu_quota_us(), "period": Limits::CPU_PERIOD_US},
            "pids": {"limit": host_pids},
            "devices": devices,
        },
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    if let Some(seccomp) = &config.seccomp {
        linux["seccomp"] = serde_json::to_value(seccomp).map_err(Error::Spec)?;
    }

    let no_caps: Vec<String> = Vec::new();
    let spec = json!({
        "ociVersion": "1.0.2",
        "root": {"path": config.image.rootfs, "readonly": true},
        "hostname": "cloudfunc",
        "mounts": mounts,
        "process": {
            "terminal": false,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID, "additionalGids": []},
            "args": args,
            "env": env,
            "cwd": if config.code_dir.is_some() { CODE_DIR } else { "/tmp" },
            "capabilities": {
                "bounding": no_caps, "effective": no_caps, "inheritable": no_caps,
                "permitted": no_caps, "ambient": no_caps,
            },
            "rlimits": rlimits,
            "noNewPrivileges": true,
        },
        "linux": linux,
    });
    serde_json::from_value(spec).map_err(Error::Spec)
}

/// Writes `config.json` for `spec` into `dir` (created, mode 0700) and returns its path.
pub fn write_bundle(dir: &Path, spec: &Spec) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let path = dir.join("config.json");
    let text = serde_json::to_vec_pretty(spec).map_err(Error::Spec)?;
    fs::write(&path, text).map_err(io(&path))?;
    Ok(path)
}

/// The spec as a JSON value (for golden tests and debugging).
pub fn to_json(spec: &Spec) -> Value {
    serde_json::to_value(spec).expect("a Spec serialises")
}
