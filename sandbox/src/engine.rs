//! The engine: one per host process, owning a state root, a cgroup parent and a backend.
//!
//! Creating an engine takes an exclusive lock on its state root, so two engines never share
//! one, and then sweeps what a crash left behind there: containers, bundle directories and
//! cgroups under its own parent, and nothing else.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudfunc_bundles::{
    build_spec, write_bundle, BundleConfig, GuestKernel, HostFeatures, Limits, Process,
};
use cloudfunc_images::{HostImage, PreparedImage, Runtime};
use cloudfunc_seccomp::{Dialect, Profile};
use oci_spec::runtime::LinuxSeccomp;

use crate::backend::{Backend, Container, Launch};
use crate::cgroup::{CgroupFs, CgroupVersion, DEFAULT_CGROUP_ROOT};
use crate::error::{Error, Result};
use crate::memdirs::MemoryDirs;
use crate::shim::CliRuntime;
use crate::shim_backend::ShimBackend;

/// Which seccomp filter sandboxes get.
#[derive(Debug, Clone, Default)]
pub enum SeccompPolicy {
    /// The embedded default profile.
    #[default]
    Default,
    /// A validated custom profile.
    Custom(Profile),
    /// No filter at all. Only for diagnosis: the engine prints a warning for every sandbox.
    DisabledUnsafe,
}

/// Which runtime starts the containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// youki's libcontainer, in the shim (the default: the fastest start).
    #[default]
    Libcontainer,
    /// `runc` (Debian's `/usr/sbin/runc`).
    Runc,
    /// `crun` (Debian's `/usr/bin/crun`), hybrid cgroup hosts handled.
    Crun,
    /// gVisor's `runsc` (Debian's `/usr/bin/runsc`): a user-space kernel between the function
    /// and the host's.
    Runsc,
}

impl BackendKind {
    /// Every kind.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Libcontainer,
        BackendKind::Runc,
        BackendKind::Crun,
        BackendKind::Runsc,
    ];

    /// Its name in records.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Libcontainer => "libcontainer",
            BackendKind::Runc => "runc",
            BackendKind::Crun => "crun",
            BackendKind::Runsc => "runsc",
        }
    }

    /// The runtime binary, for the CLI kinds.
    pub fn binary(self) -> Option<&'static str> {
        match self {
            BackendKind::Libcontainer => None,
            BackendKind::Runc => Some("/usr/sbin/runc"),
            BackendKind::Crun => Some("/usr/bin/crun"),
            BackendKind::Runsc => Some("/usr/bin/runsc"),
        }
    }

    /// Whether this host can use it.
    pub fn available(self) -> bool {
        self.binary().is_none_or(|b| Path::new(b).is_file())
    }

    /// The kernel its functions' calls reach.
    pub fn guest_kernel(self) -> GuestKernel {
        match self {
            BackendKind::Runsc => GuestKernel::Gvisor,
            _ => GuestKernel::Host,
        }
    }

    /// Flags its runtime needs before any subcommand.
    pub fn global_flags(self) -> &'static [&'static str] {
        match self {
            BackendKind::Runsc => &RUNSC_FLAGS,
            _ => &[],
        }
    }

    /// How its runtime reads a seccomp section.
    pub fn seccomp_dialect(self) -> Dialect {
        match self {
            BackendKind::Libcontainer => Dialect::ValueIsDatum,
            BackendKind::Runc | BackendKind::Crun => Dialect::ValueIsMask,
            BackendKind::Runsc => Dialect::Gvisor,
        }
    }

    fn cli_runtime(self, binary: Option<&Path>) -> CliRuntime {
        CliRuntime {
            binary: binary
                .map(Path::to_path_buf)
                .unwrap_or_else(|| self.binary().unwrap_or_default().into()),
            global_args: self.global_flags().iter().map(|f| f.to_string()).collect(),
            // crun 1.8 refuses hybrid hosts because the cgroup2 mount lists a controller.
            hide_cgroup2: self == BackendKind::Crun && hybrid_cgroup2(),
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?}: use libcontainer, runc, crun or runsc"))
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// runsc's flags: no network stack at all (the host's root namespace has none to give here
/// anyway), the ptrace platform (KVM hangs on these machines), and the bundle's seccomp filter
/// installed inside the sandbox too.
const RUNSC_FLAGS: [&str; 3] = ["--network=none", "--platform=ptrace", "--oci-seccomp"];

/// Whether cgroup2 is mounted beside v1 hierarchies (a "hybrid" host).
fn hybrid_cgroup2() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == "/sys/fs/cgroup/unified" && f[2] == "cgroup2"
        })
    })
}

/// Where an engine keeps its state and how it limits sandboxes.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bundles, container state and the lock (`/run/cloudfunc` by default).
    pub state_dir: PathBuf,
    /// Image skeletons (`/var/lib/cloudfunc/images` by default).
    pub images_dir: PathBuf,
    /// The cgroup parent: sandboxes live at `/<parent>/<id>` in every hierarchy.
    pub cgroup_parent: String,
    /// Where cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// The shim binary; found next to the current executable when `None`.
    pub shim_binary: Option<PathBuf>,
    /// The seccomp filter.
    pub seccomp: SeccompPolicy,
    /// Log bytes kept per invocation; the rest is counted and dropped.
    pub max_log_bytes: usize,
    /// Largest result a function may return.
    pub max_output_bytes: usize,
    /// How long a sandbox may take to start and load its handler.
    pub start_timeout: Duration,
    /// Which runtime starts the containers.
    pub backend: BackendKind,
    /// The runtime's binary, for the command-line backends, when not Debian's.
    pub runtime_binary: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            state_dir: "/run/cloudfunc".into(),
            images_dir: "/var/lib/cloudfunc/images".into(),
            cgroup_parent: "cloudfunc".into(),
            cgroup_root: DEFAULT_CGROUP_ROOT.into(),
            shim_binary: None,
            seccomp: SeccompPolicy::Default,
            max_log_bytes: 64 * 1024,
            max_output_bytes: 6 * 1024 * 1024,
            start_timeout: Duration::from_secs(30),
            backend: BackendKind::Libcontainer,
            runtime_binary: None,
        }
    }
}

impl EngineConfig {
    /// A configuration whose state and images live under `dir` and whose cgroup parent is
    /// `parent` (tests and benchmarks use one each, so they never sweep each other).
    pub fn under(dir: &Path, parent: &str) -> Self {
        EngineConfig {
            state_dir: dir.join("state"),
            images_dir: dir.join("images"),
            cgroup_parent: parent.into(),
            ..EngineConfig::default()
        }
    }
}

/// What the start-up sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Container ids whose state was deleted.
    pub containers: Vec<String>,
    /// Bundle directories removed.
    pub bundles: Vec<String>,
    /// Cgroups removed (their processes killed first).
    pub cgroups: Vec<String>,
}

impl SweepReport {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.bundles.is_empty() && self.cgroups.is_empty()
    }
}

/// Runs sandboxes. Cheap to clone; every clone shares one state root.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) cgroups: CgroupFs,
    pub(crate) image: PreparedImage,
    pub(crate) host: HostFeatures,
    pub(crate) seccomp: Option<LinuxSeccomp>,
    counter: AtomicU64,
    sweep: SweepReport,
    /// The tmpfs mounts of the state directories; dropped (unmounted) before the lock.
    memory: MemoryDirs,
    _lock: File,
}

impl Engine {
    /// An engine with the libcontainer backend.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let shim = match &config.shim_binary {
            Some(path) => path.clone(),
            None => locate_shim().ok_or(Error::ShimNotFound)?,
        };
        let state_root = config.state_dir.join("containers");
        let backend = match config.backend {
            BackendKind::Libcontainer => ShimBackend::libcontainer(&shim, &state_root)?,
            kind => ShimBackend::oci_cli(
                kind.name(),
                &shim,
                &state_root,
                kind.cli_runtime(config.runtime_binary.as_deref()),
                kind.seccomp_dialect(),
            )?,
        };
        Engine::with_backend(config, Box::new(backend))
    }

    /// An engine with any backend.
    pub fn with_backend(config: EngineConfig, backend: Box<dyn Backend>) -> Result<Engine> {
        if backend.requires_root() && !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        if config.cgroup_parent.is_empty()
            || !config
                .cgroup_parent
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::InvalidConfig(format!(
                "cgroup parent {:?} must be letters, digits, '-' or '_'",
                config.cgroup_parent
            )));
        }
        let ephemeral = [
            config.state_dir.join("containers"),
            config.state_dir.join("bundles"),
        ];
        for dir in &ephemeral {
            fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        let lock = lock_state(&config.state_dir)?;
        let cgroups = CgroupFs::detect(&config.cgroup_root).map_err(Error::Cgroup)?;
        let host = HostFeatures {
            cgroup_namespace: Path::new("/proc/self/ns/cgroup").exists(),
            swap_limit: cgroups.swap_limit_supported(),
        };
        let image = HostImage::new(&config.images_dir).prepare()?;
        let seccomp = match &config.seccomp {
            SeccompPolicy::Default => {
                Some(Profile::default_profile().to_oci(backend.seccomp_dialect())?)
            }
            SeccompPolicy::Custom(p) => {
                p.validate()?;
                Some(p.to_oci(backend.seccomp_dialect())?)
            }
            SeccompPolicy::DisabledUnsafe => None,
        };
        let sweep = sweep(&config, backend.as_ref(), &cgroups);
        // After the sweep, which sees what the disk held: from here on, in memory.
        let memory = if backend.requires_root() {
            MemoryDirs::ensure(&ephemeral)
        } else {
            MemoryDirs::default()
        };
        if cgroups.version() == CgroupVersion::V2 {
            // In a container with a cgroup namespace (Kubernetes, Docker on v2), the root
            // holds the container's processes, and no controller reaches a child of it.
            if backend.requires_root() {
                let root = &config.cgroup_root;
                let moved = crate::born::clear_namespace_root(root, "cloudfunc-host")
                    .map_err(Error::Cgroup)?;
                if moved > 0 {
                    eprintln!(
                        "cloudfunc: moved {moved} of this container's processes out of its \
                         root cgroup into cloudfunc-host, so that sandboxes can be limited"
                    );
                }
            }
            // On v2, libcontainer creates each missing component of a sandbox's cgroup path
            // with a plain mkdir: two sandboxes created at once both find the parent missing,
            // and the second fails. Made here once, it is never missing when they start.
            let parent = format!("/{}", config.cgroup_parent);
            cgroups.create(&parent).map_err(Error::Cgroup)?;
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                backend,
                cgroups,
                image,
                host,
                seccomp,
                counter: AtomicU64::new(0),
                sweep,
                memory,
                _lock: lock,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// The cgroup version sandboxes are limited with.
    pub fn cgroup_version(&self) -> crate::cgroup::CgroupVersion {
        self.inner.cgroups.version()
    }

    /// What the start-up sweep removed.
    pub fn sweep_report(&self) -> &SweepReport {
        &self.inner.sweep
    }

    /// The cgroup directories of a sandbox id (for tests and diagnostics).
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.inner.cgroups.dirs(&self.cgroup_path(id))
    }

    /// The bundle directory of a sandbox id.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.inner.config.state_dir.join("bundles").join(id)
    }

    /// A pre-started sandbox's own code directory (inside its bundle, so it goes with it):
    /// created empty, mounted read-only at `/code`, filled when the sandbox gets a function.
    pub(crate) fn cell_code_dir(&self, id: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.bundle_dir(id).join("code");
        fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(Error::io(&dir))?;
        Ok(dir)
    }

    /// The kernel this engine's functions run on.
    pub fn guest_kernel(&self) -> GuestKernel {
        self.inner.config.backend.guest_kernel()
    }

    /// libcontainer's state directory of a sandbox id.
    pub fn container_state_dir(&self, id: &str) -> PathBuf {
        self.inner.config.state_dir.join("containers").join(id)
    }

    pub(crate) fn cgroup_path(&self, id: &str) -> String {
        format!("/{}/{}", self.inner.config.cgroup_parent, id)
    }

    pub(crate) fn next_id(&self) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        format!("sb-{}-{n}", std::process::id())
    }

    fn bundle_config<'a>(
        &'a self,
        id: &'a str,
        process: Process,
        code_dir: Option<&'a Path>,
        limits: Limits,
        env: Vec<String>,
        seccomp: Option<LinuxSeccomp>,
    ) -> BundleConfig<'a> {
        BundleConfig {
            id,
            image: &self.inner.image,
            process,
            code_dir,
            limits,
            cgroup_path: self.cgroup_path(id),
            seccomp,
            env,
            host: self.inner.host,
            kernel: self.inner.config.backend.guest_kernel(),
        }
    }

    /// Writes the bundle `id` would run with into `dir`, written for the runtime of `target`
    /// (its seccomp dialect and kernel), so that another OCI runtime (runc, crun, runsc) can
    /// run exactly the same sandbox. The caller owns and removes `dir`; the cgroup path is the
    /// engine's, so one id runs at a time.
    pub fn export_bundle(
        &self,
        id: &str,
        process: Process,
        code_dir: Option<&Path>,
        limits: Limits,
        target: BackendKind,
        dir: &Path,
    ) -> Result<PathBuf> {
        let dialect = target.seccomp_dialect();
        let seccomp = match &self.inner.config.seccomp {
            SeccompPolicy::Default => Some(Profile::default_profile().to_oci(dialect)?),
            SeccompPolicy::Custom(p) => Some(p.to_oci(dialect)?),
            SeccompPolicy::DisabledUnsafe => None,
        };
        let mut config = self.bundle_config(id, process, code_dir, limits, Vec::new(), seccomp);
        config.kernel = target.guest_kernel();
        let spec = build_spec(&config)?;
        write_bundle(dir, &spec)?;
        Ok(dir.to_path_buf())
    }

    /// Writes the bundle for `process` and launches it with the three pipe ends given.
    pub(crate) fn launch(
        &self,
        id: &str,
        process: Process,
        code_dir: Option<&Path>,
        limits: Limits,
        env: Vec<String>,
        stdio: [std::os::fd::OwnedFd; 3],
    ) -> Result<Box<dyn Container>> {
        let inner = &self.inner;
        if inner.seccomp.is_none() {
            // Straight to stderr, whatever logging the program set up (or did not): running
            // without a filter must never be quiet.
            eprintln!("cloudfunc: WARNING: sandbox {id} runs WITHOUT a seccomp filter (seccomp disabled by configuration)");
        }
        let spec = build_spec(&self.bundle_config(
            id,
            process,
            code_dir,
            limits,
            env,
            inner.seccomp.clone(),
        ))?;
        let bundle = self.bundle_dir(id);
        let [stdin, stdout, stderr] = stdio;
        let launched = inner.backend.launch(Launch {
            id: id.to_string(),
            bundle: bundle.clone(),
            spec,
            stdin,
            stdout,
            stderr,
        });
        launched.map_err(|e| {
            let _ = fs::remove_dir_all(&bundle);
            let _ = inner.cgroups.remove_tree(&self.cgroup_path(id));
            Error::Backend(e)
        })
    }

    /// Removes a sandbox's bundle and, if the backend left it, its cgroup.
    pub(crate) fn cleanup(&self, id: &str) -> Result<()> {
        self.remove_bundle(id)?;
        self.remove_cgroup(id)
    }

    /// Removes a sandbox's bundle (and the code a stem cell keeps there).
    pub(crate) fn remove_bundle(&self, id: &str) -> Result<()> {
        let bundle = self.bundle_dir(id);
        match fs::remove_dir_all(&bundle) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&bundle)(e)),
        }
    }

    /// Removes a sandbox's cgroup in every hierarchy, if it is there.
    pub(crate) fn remove_cgroup(&self, id: &str) -> Result<()> {
        self.inner
            .cgroups
            .remove_tree(&self.cgroup_path(id))
            .map_err(Error::Cgroup)
    }

    /// Whether a runtime can be used on this host.
    pub fn runtime_available(&self, runtime: Runtime) -> bool {
        runtime.available()
    }
}

impl Engine {
    /// Gives back what the engine holds on the host: removes its parent cgroups, and any
    /// sandbox cgroup a teardown left under them (killing what runs there), and unmounts the
    /// tmpfs it put its state on. Only for when no sandbox of this engine is alive any more.
    /// Called when the last clone of the engine is dropped; a process that may end before
    /// that (an engine in a `static`, a server at the end of its stop) calls it itself.
    pub fn release(&self) {
        self.inner.release_cgroup_parent();
        self.inner.memory.release();
    }
}

impl Inner {
    /// With the last clone of the engine gone, none of its sandboxes is alive: a cgroup still
    /// under the parent is one a teardown gave up on (gVisor's processes can take longer to
    /// exit than a teardown waits, on a loaded host), and goes now, its processes killed.
    fn release_cgroup_parent(&self) {
        let parent = format!("/{}", self.config.cgroup_parent);
        // Each removal waits half a second for what it kills; a few more rounds, at most.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let left = children_of(&self.cgroups, &parent);
            if left.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            for name in left {
                let _ = self.cgroups.remove_tree(&format!("{parent}/{name}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        for dir in self.cgroups.dirs(&parent) {
            let _ = fs::remove_dir(dir);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.release_cgroup_parent();
    }
}

fn lock_state(state_dir: &Path) -> Result<File> {
    let path = state_dir.join("engine.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io(&path))?;
    // SAFETY: flock on a descriptor we own; it only takes an advisory lock.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(Error::Busy(state_dir.to_path_buf()));
    }
    Ok(file)
}

fn sweep(config: &EngineConfig, backend: &dyn Backend, cgroups: &CgroupFs) -> SweepReport {
    let mut report = SweepReport {
        containers: backend.sweep(&config.state_dir.join("containers")),
        ..SweepReport::default()
    };
    let bundles = config.state_dir.join("bundles");
    if let Ok(entries) = fs::read_dir(&bundles) {
        for entry in entries.flatten() {
            if fs::remove_dir_all(entry.path()).is_ok() {
                report
                    .bundles
                    .push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    report.cgroups = remove_children(cgroups, &format!("/{}", config.cgroup_parent));
    report
}

/// Removes every cgroup under the engine's parent (the parent is the engine's alone), killing
/// what runs in them; returns the names of those removed.
fn remove_children(cgroups: &CgroupFs, parent: &str) -> Vec<String> {
    children_of(cgroups, parent)
        .into_iter()
        .filter(|name| cgroups.remove_tree(&format!("{parent}/{name}")).is_ok())
        .collect()
}

/// The names of the cgroups under `parent`, in any hierarchy.
fn children_of(cgroups: &CgroupFs, parent: &str) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for dir in cgroups.dirs(parent) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                seen.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    seen
}

/// Finds `cloudfunc-shim`: `$CLOUDFUNC_SHIM`, next to the current executable, or one level up
/// (where cargo puts binaries relative to tests and benches).
pub fn locate_shim() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CLOUDFUNC_SHIM") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("cloudfunc-shim"),
        dir.parent()?.join("cloudfunc-shim"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}
