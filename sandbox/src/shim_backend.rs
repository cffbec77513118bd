//! Backends that run each container from its own [`crate::shim`]: youki's libcontainer
//! in-process in the shim, or an OCI runtime's command line (runc, crun, runsc) driven by it.
//!
//! The host starts each shim from a sealed copy of its binary ([`crate::seal`]), hands it the
//! container's three pipes over the control channel, and keeps the channel for the sandbox's
//! life. If the host dies, the channel closes and the shim destroys its container.
//!
//! While a shim starts (about 1 ms: exec, dynamic linking), the host writes the bundle and,
//! for libcontainer, makes and limits the sandbox's cgroup ([`crate::placement`] on cgroup v1,
//! [`crate::born`] on v2); the two run on separate CPUs, and the launch message hands the shim
//! what it needs of both.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudfunc_bundles::write_bundle;
use cloudfunc_seccomp::Dialect;
use oci_spec::runtime::Spec;

use crate::backend::{Backend, BackendError, Container, ExitKind, Launch};
use crate::born::BornCgroup;
use crate::cgroup::DEFAULT_CGROUP_ROOT;
use crate::control::{Channel, Message};
use crate::placement::{self, Placement, Prepared};
use crate::seal::SealedBinary;
use crate::shim::{CliRuntime, ShimArgs, LIBCONTAINER_SPEC_DIR};

/// How long a shim may take to create and start a container.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shim may take to tear one down.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// Launches each container from its own shim.
#[derive(Debug)]
pub struct ShimBackend {
    name: &'static str,
    shim: SealedBinary,
    state_root: PathBuf,
    runtime: Option<CliRuntime>,
    dialect: Dialect,
}

impl ShimBackend {
    /// youki's libcontainer in the shim: containers' state under `state_root`.
    pub fn libcontainer(
        shim_binary: &Path,
        state_root: impl Into<PathBuf>,
    ) -> Result<Self, BackendError> {
        // See cloudfunc_seccomp::Dialect: youki reads masked comparisons the other way round.
        Self::with_runtime(
            "libcontainer",
            shim_binary,
            state_root,
            None,
            Dialect::ValueIsDatum,
        )
    }

    /// An OCI runtime's command line, driven by the shim (`create`, `start`, `delete`),
    /// reading seccomp sections in `dialect`.
    pub fn oci_cli(
        name: &'static str,
        shim_binary: &Path,
        state_root: impl Into<PathBuf>,
        runtime: CliRuntime,
        dialect: Dialect,
    ) -> Result<Self, BackendError> {
        if !runtime.binary.is_file() {
            return Err(BackendError::Runtime(format!(
                "{name} is not installed at {}",
                runtime.binary.display()
            )));
        }
        Self::with_runtime(name, shim_binary, state_root, Some(runtime), dialect)
    }

    fn with_runtime(
        name: &'static str,
        shim_binary: &Path,
        state_root: impl Into<PathBuf>,
        runtime: Option<CliRuntime>,
        dialect: Dialect,
    ) -> Result<Self, BackendError> {
        let shim = SealedBinary::new(shim_binary).map_err(|source| BackendError::Spawn {
            what: format!("the shim {}", shim_binary.display()),
            source,
        })?;
        Ok(Self {
            name,
            shim,
            state_root: state_root.into(),
            runtime,
            dialect,
        })
    }
}

impl Backend for ShimBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn seccomp_dialect(&self) -> Dialect {
        self.dialect
    }

    fn launch(&self, launch: Launch) -> Result<Box<dyn Container>, BackendError> {
        let (control, shim_end) = Channel::pair().map_err(BackendError::Io)?;
        let args = ShimArgs {
            id: launch.id.clone(),
            bundle: launch.bundle.clone(),
            state_root: self.state_root.clone(),
            runtime: self.runtime.clone(),
        };
        let mut child = Command::new(self.shim.exec_path())
            .args(args.to_args())
            .env_clear()
            .stdin(Stdio::from(shim_end))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| BackendError::Spawn {
                what: "the shim".into(),
                source,
            })?;
        let elsewhere = OffThisCpu::start(child.id());
        // The shim is starting; meanwhile, what it will need.
        let prepared = write_bundle(&launch.bundle, &launch.spec)
            .map_err(|e| BackendError::Runtime(format!("writing the bundle: {e}")))
            .and_then(|_| match self.runtime {
                None => place(&launch.spec, &launch.bundle).map_err(BackendError::Runtime),
                Some(_) => Ok(None),
            });
        let prepared = prepared.and_then(|p| match elsewhere.map(OffThisCpu::end) {
            Some(Err(e)) => Err(BackendError::Io(e)),
            _ => Ok(p),
        });
        let placement = match prepared {
            Ok(placement) => placement,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut fds: Vec<RawFd> = vec![
            launch.stdin.as_raw_fd(),
            launch.stdout.as_raw_fd(),
            launch.stderr.as_raw_fd(),
        ];
        let placed = placement.as_ref().map(|p| {
            let (placed, more) = p.to_send();
            fds.extend(more);
            placed
        });
        if let Err(e) = control.send_with_fds(&Message::Launch(placed), &fds) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BackendError::Io(e));
        }
        // Our copies must go, or the pipes would never report end-of-file.
        drop(placement);
        drop(launch);
        match control.recv(Some(START_TIMEOUT)) {
            Ok(Some((Message::Started(pid), _))) => Ok(Box::new(ShimContainer {
                child,
                control,
                pid,
                exit: None,
                destroy_sent: false,
                destroyed: None,
            })),
            Ok(Some((Message::Failed(why), _))) => {
                let _ = child.wait();
                Err(BackendError::Runtime(why))
            }
            other => {
                let _ = child.kill();
                let status = child.wait();
                Err(match other {
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        BackendError::Unresponsive(START_TIMEOUT)
                    }
                    _ => BackendError::Runtime(format!(
                        "the shim ended without starting the container ({status:?})"
                    )),
                })
            }
        }
    }

    fn sweep(&self, state_root: &Path) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(state_root) else {
            return removed;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                // A CLI runtime's leftover log or pid file.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            match &self.runtime {
                None => {
                    if let Ok(mut container) =
                        libcontainer::container::Container::load(path.clone())
                    {
                        let _ = container.delete(true);
                    }
                }
                Some(rt) => {
                    let _ = Command::new(&rt.binary)
                        .args(&rt.global_args)
                        .arg(format!("--root={}", state_root.display()))
                        .args(["delete", "--force", &id])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
            let _ = std::fs::remove_dir_all(&path);
            removed.push(id);
        }
        removed
    }
}

/// For a bundle at `bundle` with `spec`: the sandbox's cgroup made and limited (on cgroup v1
/// for the shim's thread to enter, on v2 for a launcher to be born in), and the spec
/// libcontainer is to see (without `resources`) written to `<bundle>/libcontainer/config.json`.
/// `None` where libcontainer places the container itself: for a relative cgroup path, for
/// limits cloudfunc does not apply, or where the preparation declines.
fn place(spec: &Spec, bundle: &Path) -> Result<Option<Prepared>, String> {
    let root = Path::new(DEFAULT_CGROUP_ROOT);
    let Some(linux) = spec.linux().as_ref() else {
        return Ok(None);
    };
    let Some(path) = linux
        .cgroups_path()
        .as_ref()
        .and_then(|p| p.to_str())
        .filter(|p| p.starts_with('/'))
    else {
        return Ok(None);
    };
    let resources = linux.resources().clone().unwrap_or_default();
    if !placement::handles(&resources) {
        return Ok(None);
    }
    // Where v1 hierarchies are mounted, the cgroup root is a tmpfs holding them.
    let prepared = if crate::memdirs::on_tmpfs(root) {
        Placement::prepare(root, path, &resources).map(|p| p.map(Prepared::Hierarchies))
    } else {
        BornCgroup::prepare(root, path, &resources).map(|c| c.map(Prepared::Born))
    };
    let Some(prepared) = prepared.map_err(|e| format!("creating the cgroup: {e}"))? else {
        return Ok(None);
    };
    let mut stripped = spec.clone();
    let mut stripped_linux = linux.clone();
    stripped_linux.set_resources(None);
    stripped.set_linux(Some(stripped_linux));
    if let Some(mut rootfs) = stripped.root().clone() {
        rootfs.set_path(bundle.join(rootfs.path()));
        stripped.set_root(Some(rootfs));
    }
    let dir = bundle.join(LIBCONTAINER_SPEC_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    stripped
        .save(dir.join("config.json"))
        .map_err(|e| format!("writing libcontainer's spec: {e}"))?;
    Ok(Some(prepared))
}

/// A just-started shim kept off the CPU the host thread runs on, so that it loads (about
/// 1 ms) while the host writes its bundle and cgroup instead of after: the scheduler would
/// otherwise run the two one after the other on one CPU with the other idle. Ended before the
/// launch message, so that the container inherits the affinity it would have had.
struct OffThisCpu {
    pid: nix::unistd::Pid,
    original: nix::sched::CpuSet,
}

impl OffThisCpu {
    /// `None` (and nothing changed) where there is no other CPU to use.
    fn start(pid: u32) -> Option<OffThisCpu> {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
        let original = sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        // SAFETY: sched_getcpu takes no arguments and only returns a number.
        let here = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
        let mut others = original;
        others.unset(here).ok()?;
        (0..CpuSet::count()).find(|&cpu| others.is_set(cpu).unwrap_or(false))?;
        sched_setaffinity(pid, &others).ok()?;
        Some(OffThisCpu { pid, original })
    }

    fn end(self) -> std::io::Result<()> {
        nix::sched::sched_setaffinity(self.pid, &self.original).map_err(std::io::Error::from)
    }
}

/// A container owned by a shim process.
#[derive(Debug)]
struct ShimContainer {
    child: Child,
    control: Channel,
    pid: i32,
    exit: Option<ExitKind>,
    /// `Destroy` has been sent.
    destroy_sent: bool,
    /// What `destroy` returned, once it has run.
    destroyed: Option<bool>,
}

impl ShimContainer {
    /// Reads control messages until `until` accepts one (returned) or the deadline passes
    /// (`None`).
    fn recv_until(
        &mut self,
        deadline: Instant,
        until: impl Fn(&Message) -> bool,
    ) -> Result<Option<Message>, BackendError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.control.recv(Some(left)) {
                Ok(Some((message, _))) => {
                    if let Message::Exited(kind) = message {
                        self.exit = Some(kind);
                    }
                    if until(&message) {
                        return Ok(Some(message));
                    }
                }
                Ok(None) => {
                    return Err(BackendError::Runtime("the shim exited unexpectedly".into()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(None),
                Err(e) => return Err(BackendError::Io(e)),
            }
        }
    }
}

impl Container for ShimContainer {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn kill(&mut self) -> Result<(), BackendError> {
        if self.exit.is_some() {
            return Ok(());
        }
        self.control.send(&Message::Kill).map_err(BackendError::Io)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitKind>, BackendError> {
        if self.exit.is_none() {
            self.recv_until(Instant::now() + timeout, |m| {
                matches!(m, Message::Exited(_))
            })?;
        }
        Ok(self.exit)
    }

    fn begin_destroy(&mut self) -> Result<(), BackendError> {
        if self.destroy_sent {
            return Ok(());
        }
        self.destroy_sent = true;
        self.control
            .send(&Message::Destroy)
            .map_err(BackendError::Io)
    }

    fn destroy(&mut self) -> Result<bool, BackendError> {
        if let Some(clean) = self.destroyed {
            return Ok(clean);
        }
        let result = self.begin_destroy().and_then(|()| {
            match self.recv_until(Instant::now() + DESTROY_TIMEOUT, |m| {
                matches!(m, Message::Destroyed(_))
            })? {
                Some(Message::Destroyed(clean)) => Ok(clean),
                _ => Err(BackendError::Unresponsive(DESTROY_TIMEOUT)),
            }
        });
        if result.is_err() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.destroyed = Some(*result.as_ref().unwrap_or(&false));
        result
    }
}

impl Drop for ShimContainer {
    fn drop(&mut self) {
        let _ = self.destroy();
    }
}
