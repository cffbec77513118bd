//! The shim: a small single-threaded process that owns one container for its whole life.
//!
//! libcontainer clones the calling process and runs Rust code in the clone, which is unsafe
//! in a multi-threaded caller (a lock held by another thread at clone time is never
//! released). So the host never calls libcontainer itself: it starts one shim per sandbox,
//! and the shim creates the container, starts it, reaps its init, and deletes it when told to
//! or when the host goes away (its control channel closes).
//!
//! The shim drives the container through a [`Driver`]: youki's libcontainer in-process, or an
//! OCI runtime's command line (`runc`, `crun`, `runsc`) with `create` then `start`. Either way
//! the container's init ends up as the shim's child (a direct clone, or reparented to the shim
//! as a child subreaper), so the shim reaps it with its exit status, and the cgroup stays until
//! `delete`, after the host has read its OOM counter.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::born::reap_launcher;
use crate::cgroup::{CgroupFs, DEFAULT_CGROUP_ROOT};
use crate::control::{Channel, ExitKind, Message};
use crate::error::error_chain;
use crate::placement::{Placement, Prepared};

/// Where in a bundle the host writes the spec libcontainer sees when the host has placed the
/// sandbox in its cgroups: the bundle's, without `resources`.
pub const LIBCONTAINER_SPEC_DIR: &str = "libcontainer";

/// An OCI runtime driven through its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliRuntime {
    /// The runtime binary.
    pub binary: PathBuf,
    /// Global flags before the subcommand (e.g. runsc's `--network=none`).
    pub global_args: Vec<String>,
    /// Hide the host's cgroup2 mount (hybrid hosts) in a private mount namespace, for crun.
    pub hide_cgroup2: bool,
}

/// The shim's arguments.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// The runtime's state root.
    pub state_root: PathBuf,
    /// `None`: libcontainer in-process.
    pub runtime: Option<CliRuntime>,
}

impl ShimArgs {
    /// The command line for these arguments.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--bundle".into(),
            self.bundle.clone().into(),
            "--root".into(),
            self.state_root.clone().into(),
        ];
        if let Some(rt) = &self.runtime {
            args.push("--runtime".into());
            args.push(rt.binary.clone().into());
            for a in &rt.global_args {
                args.push("--runtime-arg".into());
                args.push(a.into());
            }
            if rt.hide_cgroup2 {
                args.push("--hide-cgroup2".into());
                args.push("yes".into());
            }
        }
        args
    }

    /// Parses the command line (without the program name).
    pub fn parse(mut args: impl Iterator<Item = OsString>) -> Result<ShimArgs, String> {
        let (mut id, mut bundle, mut root, mut runtime) = (None, None, None, None::<CliRuntime>);
        let mut global_args = Vec::new();
        let mut hide = false;
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{flag:?} needs a value"))?;
            match flag.to_str() {
                Some("--id") => id = value.into_string().ok(),
                Some("--bundle") => bundle = Some(PathBuf::from(value)),
                Some("--root") => root = Some(PathBuf::from(value)),
                Some("--runtime") => {
                    runtime = Some(CliRuntime {
                        binary: value.into(),
                        global_args: Vec::new(),
                        hide_cgroup2: false,
                    })
                }
                Some("--runtime-arg") => global_args.push(
                    value
                        .into_string()
                        .map_err(|_| "a runtime argument is not UTF-8")?,
                ),
                Some("--hide-cgroup2") => hide = value == "yes",
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        if let Some(rt) = runtime.as_mut() {
            rt.global_args = global_args;
            rt.hide_cgroup2 = hide;
        }
        // Absolute: after its create the shim returns to its mount namespace with setns,
        // which also moves its working directory to that namespace's root.
        let absolute = |path: PathBuf| {
            std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(ShimArgs {
            id: id.ok_or("--id is required")?,
            bundle: absolute(bundle.ok_or("--bundle is required")?)?,
            state_root: absolute(root.ok_or("--root is required")?)?,
            runtime,
        })
    }
}

/// What actually creates, kills and deletes the container.
trait Driver {
    /// Creates and starts the container with these stdio descriptors; returns init's pid,
    /// which must be a child of this process.
    fn start(&mut self, stdio: [OwnedFd; 3]) -> Result<Pid, String>;
    /// Once the host has been told the container started: what could wait until then.
    fn started(&mut self) {}
    /// Kills the container (init, and with it its pid namespace).
    fn kill(&mut self, pid: Pid) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    /// Deletes the container's state and cgroup. `stopped`: its init has been reaped and
    /// every other process of it killed. Returns whether the cgroup is known to be gone.
    fn delete(&mut self, stopped: bool) -> bool;
}

/// Runs the shim with its control channel on stdin. Returns the process exit code.
pub fn run(args: ShimArgs) -> i32 {
    // SAFETY: fd 0 is the control socket the host handed us; nothing else owns it.
    let control = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(0) });
    let (placed, fds) = match control.recv(Some(std::time::Duration::from_secs(30))) {
        Ok(Some((Message::Launch(placed), fds))) if fds.len() >= 3 => (placed, fds),
        other => {
            let _ = control.send(&Message::Failed(format!(
                "expected launch with at least 3 descriptors, got {other:?}"
            )));
            return 2;
        }
    };
    let mut fds = fds.into_iter();
    let stdio = [
        fds.next().unwrap(),
        fds.next().unwrap(),
        fds.next().unwrap(),
    ];
    let placement = match (placed, &args.runtime) {
        (None, _) if fds.len() == 0 => Ok(None),
        (Some(placed), None) => Prepared::received(&placed, fds.collect()).map(Some),
        (placed, _) => Err(format!(
            "a launch for this runtime cannot be placed as {placed:?} with {} more descriptors",
            fds.len()
        )),
    };
    let placement = match placement {
        Ok(placement) => placement,
        Err(why) => {
            let _ = control.send(&Message::Failed(why));
            return 2;
        }
    };
    let mut driver: Box<dyn Driver> = match &args.runtime {
        None => Box::new(Libcontainer {
            args: args.clone(),
            container: None,
            placement,
            lingering: None,
            launcher: None,
        }),
        Some(rt) => Box::new(Cli {
            args: args.clone(),
            runtime: rt.clone(),
        }),
    };
    let pid = match driver.start(stdio) {
        Ok(pid) => pid,
        Err(why) => {
            let _ = driver.delete(false);
            let _ = control.send(&Message::Failed(why));
            return 1;
        }
    };
    if control.send(&Message::Started(pid.as_raw())).is_err() {
        let _ = teardown(driver.as_mut(), pid, true);
        return 1;
    }
    driver.started();
    serve(&control, driver.as_mut(), pid)
}

/// youki's libcontainer, in this process.
struct Libcontainer {
    args: ShimArgs,
    container: Option<Container>,
    /// The sandbox's cgroup, if the host made it; libcontainer makes it otherwise.
    placement: Option<Prepared>,
    /// The private mount namespace the container was created from, kept open until the host
    /// knows the container started ([`HiddenCgroups::leave`]).
    lingering: Option<std::fs::File>,
    /// The launcher that created the container in its v2 cgroup, until it is reaped.
    launcher: Option<Pid>,
}

impl Driver for Libcontainer {
    fn start(&mut self, [stdin, stdout, stderr]: [OwnedFd; 3]) -> Result<Pid, String> {
        let args = &self.args;
        let builder = ContainerBuilder::new(args.id.clone(), SyscallType::default())
            .with_root_path(&args.state_root)
            .map_err(|e| format!("state root: {e}"))?
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr)
            .validate_id()
            .map_err(|e| format!("container id: {e}"))?;
        let build = |bundle: &Path| {
            builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating the container: {}", error_chain(&e)))
        };
        let container = match self.placement.take() {
            Some(Prepared::Hierarchies(placement)) => {
                let (container, namespace) = OwnCgroups {
                    bundle: args.bundle.join(LIBCONTAINER_SPEC_DIR),
                    placement,
                }
                .build(build)?;
                self.lingering = Some(namespace);
                container
            }
            Some(Prepared::Born(cgroup)) => {
                let bundle = args.bundle.join(LIBCONTAINER_SPEC_DIR);
                let launched = cgroup.launch(|| {
                    // The launcher's own mount namespace goes when it exits.
                    let _hidden = HiddenCgroups::enter(Path::new(DEFAULT_CGROUP_ROOT))?;
                    let mut container = build(&bundle)?;
                    cgroup
                        .limit_pids()
                        .map_err(|e| format!("limiting pids: {e}"))?;
                    start(&mut container)
                });
                // What the launcher made, for `delete`, whether or not it started.
                self.container = Container::load(args.state_root.join(&args.id)).ok();
                let (pid, launcher) = launched?;
                self.launcher = Some(launcher);
                return match self.container {
                    Some(_) => Ok(pid),
                    None => Err("the launcher's container left no state".to_string()),
                };
            }
            None => build(&args.bundle)?,
        };
        start(self.container.insert(container))
    }

    fn started(&mut self) {
        self.lingering = None;
        if let Some(launcher) = self.launcher.take() {
            reap_launcher(launcher);
        }
    }

    fn delete(&mut self, stopped: bool) -> bool {
        let Some(container) = self.container.as_mut() else {
            return false;
        };
        if stopped && remove_stopped(container).is_ok() {
            return true;
        }
        let _ = container.delete(true);
        false
    }
}

/// Starts a created container; returns its init's pid.
fn start(container: &mut Container) -> Result<Pid, String> {
    container
        .start()
        .map_err(|e| format!("starting the container: {}", error_chain(&e)))?;
    container
        .pid()
        .ok_or_else(|| "the container has no init pid".to_string())
}

/// The host's cgroup placement on v1 (see [`crate::placement`]): the bundle's spec without
/// `resources`, for libcontainer, and the sandbox's cgroup made and limited.
struct OwnCgroups {
    /// Where the spec libcontainer reads is (`<bundle>/libcontainer`).
    bundle: PathBuf,
    placement: Placement,
}

impl OwnCgroups {
    /// Runs `build` (libcontainer's create) with this thread in the sandbox's cgroup and the
    /// hierarchies out of libcontainer's sight, then returns and applies the pids limit.
    /// Returns the container and the private mount namespace it was built in, open
    /// ([`HiddenCgroups::leave`]).
    fn build(
        self,
        build: impl FnOnce(&Path) -> Result<Container, String>,
    ) -> Result<(Container, std::fs::File), String> {
        let hidden = HiddenCgroups::enter(Path::new(DEFAULT_CGROUP_ROOT))?;
        let built = self
            .placement
            .enter()
            .map_err(|e| format!("joining the cgroup: {e}"))
            .and_then(|()| build(&self.bundle));
        let left = self
            .placement
            .leave()
            .map_err(|e| format!("leaving the cgroup: {e}"));
        let back = hidden.leave();
        let container = built?;
        left?;
        let namespace = back?;
        self.placement
            .limit_pids()
            .map_err(|e| format!("limiting pids: {e}"))?;
        Ok((container, namespace))
    }
}

/// A private mount namespace for this process in which `root` is an empty tmpfs, until
/// [`HiddenCgroups::leave`] returns to the namespace it came from.
struct HiddenCgroups {
    home: std::fs::File,
    /// The private namespace itself.
    private: std::fs::File,
}

impl HiddenCgroups {
    fn enter(root: &Path) -> Result<HiddenCgroups, String> {
        use nix::mount::{mount, umount2, MntFlags, MsFlags};
        let home = std::fs::File::open("/proc/self/ns/mnt")
            .map_err(|e| format!("opening the mount namespace: {e}"))?;
        private_mounts()?;
        let private = std::fs::File::open("/proc/self/ns/mnt")
            .map_err(|e| format!("opening the private mount namespace: {e}"))?;
        umount2(root, MntFlags::MNT_DETACH)
            .map_err(|e| format!("hiding {}: {e}", root.display()))?;
        mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )
        .map_err(|e| format!("covering {}: {e}", root.display()))?;
        Ok(HiddenCgroups { home, private })
    }

    /// Returns to the namespace this process came from, and hands back the private one, still
    /// open. When the last reference to a mount namespace goes, the kernel unmounts its tree
    /// and waits for an RCU grace period, which took up to 3 ms on the test VM: dropped once
    /// the host knows the container started, that wait is off the cold start's path.
    fn leave(self) -> Result<std::fs::File, String> {
        nix::sched::setns(&self.home, nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("returning to the mount namespace: {e}"))?;
        Ok(self.private)
    }
}

/// Moves this process (single-threaded: `unshare` refuses otherwise) into a mount namespace of
/// its own whose changes reach no other.
pub fn private_mounts() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare: {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))
}

/// Deletes a container whose processes are all gone: its cgroup and its state directory.
/// libcontainer's `delete` does the same and more, but re-reads the mount table and its own
/// cgroup file for each v1 hierarchy on the way (about 600 system calls, 3.5 ms of every
/// teardown). Fails, for libcontainer to do it, where the container has what only
/// libcontainer knows how to undo (hooks, Intel RDT).
fn remove_stopped(container: &Container) -> Result<(), String> {
    let config = container.spec().map_err(|e| e.to_string())?;
    if config.hooks.is_some() || container.intel_rdt_dir().is_some() {
        return Err("hooks or Intel RDT".into());
    }
    let path = config
        .cgroup_path
        .to_str()
        .filter(|p| p.starts_with('/'))
        .ok_or("not an absolute cgroup path")?;
    CgroupFs::detect(std::path::Path::new(DEFAULT_CGROUP_ROOT))
        .and_then(|cgroups| cgroups.remove_tree(path))
        .map_err(|e| e.to_string())?;
    std::fs::remove_dir_all(&container.root).map_err(|e| e.to_string())
}

/// An OCI runtime's command line: `create`, then `start`, then `delete -f`.
struct Cli {
    args: ShimArgs,
    runtime: CliRuntime,
}

impl Cli {
    fn command(&self) -> Command {
        // `--flag=value`: the one form that runc, crun and runsc all parse.
        let mut cmd = Command::new(&self.runtime.binary);
        cmd.args(&self.runtime.global_args);
        cmd.arg(format!("--root={}", self.args.state_root.display()));
        cmd.arg(format!("--log={}", self.log_path().display()));
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.args.state_root.join(format!("{}.log", self.args.id))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    fn hide_cgroup2() -> Result<(), String> {
        use nix::mount::{mount, MsFlags};
        private_mounts()?;
        mount(
            Some("tmpfs"),
            "/sys/fs/cgroup/unified",
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=755"),
        )
        .map_err(|e| format!("hiding the cgroup2 mount: {e}"))
    }
}

impl Driver for Cli {
    fn start(&mut self, [stdin, stdout, stderr]: [OwnedFd; 3]) -> Result<Pid, String> {
        std::fs::create_dir_all(&self.args.state_root).map_err(|e| format!("state root: {e}"))?;
        if self.runtime.hide_cgroup2 {
            Self::hide_cgroup2()?;
        }
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes who adopts our orphans.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(format!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            ));
        }
        let name = self.runtime.binary.display().to_string();
        let pid_file = self.args.state_root.join(format!("{}.pid", self.args.id));
        let status = self
            .command()
            .args(["create", "--bundle"])
            .arg(&self.args.bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&self.args.id)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .status()
            .map_err(|e| format!("running {name}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "{name} create failed ({status}): {}",
                self.log_tail()
            ));
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{name} wrote no pid file: {e}"))?
            .trim()
            .parse()
            .map_err(|_| format!("{name} wrote a bad pid file"))?;
        let status = self
            .command()
            .arg("start")
            .arg(&self.args.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("running {name}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "{name} start failed ({status}): {}",
                self.log_tail()
            ));
        }
        Ok(Pid::from_raw(pid))
    }

    fn delete(&mut self, _stopped: bool) -> bool {
        let _ = self
            .command()
            .args(["delete", "--force"])
            .arg(&self.args.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(self.log_path());
        let _ = std::fs::remove_file(self.args.state_root.join(format!("{}.pid", self.args.id)));
        false
    }
}

fn serve(control: &Channel, driver: &mut dyn Driver, pid: Pid) -> i32 {
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = control.send(&Message::Failed(format!("pidfd_open: {e}")));
            let _ = teardown(driver, pid, true);
            return 1;
        }
    };
    let mut alive = true;
    loop {
        let (control_ready, init_ready) = {
            let mut fds = [
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = if alive {
                PollTimeout::NONE
            } else {
                PollTimeout::MAX
            };
            match poll(&mut fds[..if alive { 2 } else { 1 }], timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), alive && ready(&fds[1]))
        };
        if init_ready {
            alive = false;
            let status = reap(pid);
            // With init gone the sandbox is over; its helpers (runsc's gofer) go too, before
            // the host hears of the exit, so nothing of the sandbox outlives that message.
            kill_children();
            if let Some(status) = status {
                let _ = control.send(&Message::Exited(status));
            }
        }
        if control_ready {
            match control.recv(None) {
                Ok(Some((Message::Kill, _))) => {
                    if alive {
                        driver.kill(pid);
                    }
                }
                Ok(Some((Message::Destroy, _))) => {
                    let clean = teardown(driver, pid, alive);
                    let _ = control.send(&Message::Destroyed(clean));
                    return 0;
                }
                Ok(Some(_)) => {}
                // The host is gone, or its end broke: nobody will ever use this sandbox.
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = teardown(driver, pid, alive);
    0
}

/// Kills and deletes the container; returns whether its cgroup is known to be gone.
fn teardown(driver: &mut dyn Driver, pid: Pid, alive: bool) -> bool {
    let reaped = !alive || {
        driver.kill(pid);
        waitpid(pid, None).is_ok()
    };
    kill_children();
    driver.delete(reaped)
}

/// Kills and reaps every remaining child of the shim: after the container's init, only
/// helpers a runtime left to us as subreaper can be there.
fn kill_children() {
    for child in children() {
        let _ = kill(child, Signal::SIGKILL);
    }
    while let Ok(status) = waitpid(None, None) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// The shim's children (it is single-threaded, so its one task's `children` list is all).
fn children() -> Vec<Pid> {
    let path = format!("/proc/self/task/{}/children", std::process::id());
    if let Ok(text) = std::fs::read_to_string(path) {
        return text
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(Pid::from_raw)
            .collect();
    }
    // Kernels without CONFIG_PROC_CHILDREN: look for our pid as a parent.
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The parent is the second field after the command, which ends at the last ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if parent == Some(me.as_str()) {
            found.push(Pid::from_raw(pid));
        }
    }
    found
}

fn reap(pid: Pid) -> Option<ExitKind> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitKind::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(ExitKind::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_micros(100)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(raw).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_given_relative_are_made_absolute() {
        let args = [
            "--id",
            "sb-1",
            "--bundle",
            "bundles/sb-1",
            "--root",
            "/run/x",
        ];
        let parsed = ShimArgs::parse(args.into_iter().map(OsString::from)).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(parsed.bundle, cwd.join("bundles/sb-1"));
        assert_eq!(parsed.state_root, PathBuf::from("/run/x"));
        assert_eq!(
            parsed.to_args()[3],
            cwd.join("bundles/sb-1").into_os_string()
        );
    }
}
