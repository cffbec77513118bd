//! Putting a libcontainer sandbox into its cgroup on cgroup v2: its processes are born there.
//!
//! On v2 no thread moves alone between domain cgroups, so [`crate::placement`]'s way round
//! the kernel's global cgroup lock does not apply, and libcontainer writes the container's pid
//! to `cgroup.procs`. That write takes `cgroup_threadgroup_rwsem` for writing, which on a host
//! whose cgroup2 is not mounted with `favordynmods` waits for an RCU grace period after a
//! quiet spell: 17–33 ms measured on a 16-core v2 host, in every such cold start. A process
//! cloned with `clone3`'s `CLONE_INTO_CGROUP` (Linux 5.7) starts in the cgroup without it, as
//! crun's do.
//!
//! So the host creates the sandbox's cgroup, enables the controllers its limits need in the
//! levels above, and applies the bundle's limits but pids (memory, swap, CPU, and the device
//! program, built by libcgroups as libcontainer builds it) while the shim is still starting. It hands the
//! shim the cgroup's directory and its `pids.max`, open. The shim clones a launcher into the
//! cgroup. The launcher runs libcontainer's create with the hierarchy out of sight (as on v1:
//! libcontainer is shown the spec without `resources`), writes the pids limit, starts the
//! container, reports init's pid and exits; the shim, a child subreaper, adopts init. Where
//! `clone3` is refused (older kernels, seccomp filters that refuse it) the launcher is forked
//! and joins the cgroup by `cgroup.procs`, which is correct but pays the wait.
//!
//! The prices: what the launcher allocates (about what the shim's thread does on v1) is
//! charged to the sandbox's memory cgroup, and until the launcher has exited (within a
//! millisecond of the report) it counts against the sandbox's pids limit, one process fewer
//! for the function, never one more.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

use crate::cgroup::{annotate, open_write, write};
use crate::control::Placed;

/// A sandbox's v2 cgroup, created and limited, open for a launcher to be born in.
#[derive(Debug)]
pub struct BornCgroup {
    /// The cgroup's directory.
    dir: File,
    /// The sandbox's `pids.max` and what to write there once the container is created.
    pids: Option<(File, String)>,
}

impl BornCgroup {
    /// Creates the cgroup at absolute `path` under the v2 mount `root`, enabling in each level
    /// above it the controllers `resources` needs, and applies `resources` but the pids limit
    /// (only those [`crate::placement::handles`]). `None` where `root` is not a cgroup2 mount,
    /// a limit asks for a controller the hierarchy does not offer (for libcontainer to refuse,
    /// as it does), or the kernel refuses the device program: nothing is made in the first
    /// two cases, and in the last libcontainer takes over the cgroup made.
    pub fn prepare(
        root: &Path,
        path: &str,
        resources: &LinuxResources,
    ) -> io::Result<Option<BornCgroup>> {
        let Ok(offered) = fs::read_to_string(root.join("cgroup.controllers")) else {
            return Ok(None);
        };
        let needed: Vec<&str> = [
            ("memory", resources.memory().is_some()),
            ("cpu", resources.cpu().is_some()),
            ("pids", resources.pids().is_some()),
        ]
        .into_iter()
        .filter_map(|(name, asked)| asked.then_some(name))
        .collect();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if needed.iter().any(|c| !offered.contains(c)) {
            return Ok(None);
        }
        let rel = path.trim_start_matches('/');
        let Some(dir) = create(root, rel, &needed)? else {
            return Ok(None);
        };
        limit_memory(&dir, resources)?;
        limit_cpu(&dir, resources)?;
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir)
            .map_err(|e| annotate(&dir, e))?;
        if !limit_devices(&handle, resources)? {
            return Ok(None);
        }
        let pids = match resources.pids() {
            Some(pids) => Some((
                open_write(&dir.join("pids.max"))?,
                crate::placement::pids_value(pids.limit()),
            )),
            None => None,
        };
        Ok(Some(BornCgroup { dir: handle, pids }))
    }

    /// What the shim is sent: the message's part and the descriptors, in the order
    /// [`BornCgroup::received`] takes them.
    pub fn to_send(&self) -> (Placed, Vec<RawFd>) {
        let mut fds = vec![self.dir.as_raw_fd()];
        fds.extend(self.pids.as_ref().map(|(file, _)| file.as_raw_fd()));
        let placed = Placed::Born {
            pids: self.pids.as_ref().map(|(_, value)| value.clone()),
        };
        (placed, fds)
    }

    /// The cgroup the host prepared, from what the shim received.
    pub fn received(placed: &Placed, fds: Vec<OwnedFd>) -> Result<BornCgroup, String> {
        let Placed::Born { pids } = placed else {
            return Err(format!("{placed:?} is not a v2 placement"));
        };
        if fds.len() != 1 + usize::from(pids.is_some()) {
            return Err(format!(
                "a v2 placement came with {} descriptors",
                fds.len()
            ));
        }
        let mut files = fds.into_iter().map(File::from);
        let dir = files.next().expect("the count was checked");
        let pids = pids
            .as_ref()
            .and_then(|value| Some((files.next()?, value.clone())));
        Ok(BornCgroup { dir, pids })
    }

    /// Applies the pids limit.
    pub fn limit_pids(&self) -> io::Result<()> {
        crate::placement::write_pids(self.pids.as_ref())
    }

    /// Runs `launch` in a launcher process born in the cgroup, and returns the pid it
    /// reports (the container's init, which becomes this process's child when the launcher
    /// exits) and the launcher's own, for [`reap_launcher`]. The caller must be
    /// single-threaded: the launcher is a fork of it and runs Rust code.
    pub fn launch(
        &self,
        launch: impl FnOnce() -> Result<Pid, String>,
    ) -> Result<(Pid, Pid), String> {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes who adopts our orphans.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(format!(
                "PR_SET_CHILD_SUBREAPER: {}",
                io::Error::last_os_error()
            ));
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("the launcher's pipe: {e}"))?;
        let (launcher, born) = fork_into(&self.dir).map_err(|e| format!("the launcher: {e}"))?;
        if launcher.as_raw() == 0 {
            drop(read);
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if !born {
                    join(&self.dir)?;
                }
                launch()
            }));
            let line = match report {
                Ok(Ok(pid)) => format!("{pid}\n"),
                Ok(Err(why)) => format!("!{}\n", why.replace('\n', " ")),
                Err(_) => "!the launcher panicked\n".to_string(),
            };
            let _ = File::from(write).write_all(line.as_bytes());
            // SAFETY: _exit ends this forked process without running the shim's destructors.
            unsafe { libc::_exit(0) }
        }
        drop(write);
        let mut line = Vec::new();
        let mut pipe = File::from(read);
        let mut chunk = [0u8; 64];
        // One line, not end-of-file: the launcher's exit (its mount namespace's teardown) is
        // left off the start's path.
        while !line.ends_with(b"\n") {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => line.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    reap_launcher(launcher);
                    return Err(format!("reading the launcher: {e}"));
                }
            }
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        match line.strip_prefix('!') {
            Some(why) => {
                reap_launcher(launcher);
                Err(why.to_string())
            }
            None => match line.parse() {
                Ok(pid) => Ok((Pid::from_raw(pid), launcher)),
                Err(_) => {
                    reap_launcher(launcher);
                    Err(format!("the launcher ended reporting {line:?}"))
                }
            },
        }
    }
}

/// Makes the v2 hierarchy under `root` able to hand controllers down, where this process sees
/// a container's cgroup as the root (a cgroup namespace: that root is not the host's, so it has
/// a `cgroup.type`). The kernel refuses to enable controllers for the children of a cgroup
/// other than the host's root while it holds processes, and a container's processes, this
/// server among them, are in its root. They move into a leaf of their own, `leaf`, as a
/// container engine run inside a container does. Returns how many moved; the host's own root
/// is left as it is.
pub fn clear_namespace_root(root: &Path, leaf: &str) -> io::Result<usize> {
    if !root.join("cgroup.type").exists() {
        return Ok(0);
    }
    let home = root.join(leaf);
    let mut moved = 0;
    // Processes forked meanwhile land in the root too: until none is left, a few rounds.
    for _ in 0..16 {
        let procs = crate::cgroup::read(root, "cgroup.procs")?;
        let pids: Vec<&str> = procs.split_whitespace().collect();
        if pids.is_empty() {
            return Ok(moved);
        }
        match fs::create_dir(&home) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(annotate(&home, e)),
        }
        let target = open_write(&home.join("cgroup.procs"))?;
        for pid in pids {
            match target.write_at(pid.as_bytes(), 0) {
                Ok(_) => moved += 1,
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(annotate(&home, e)),
            }
        }
    }
    Err(io::Error::other(format!(
        "{} keeps gaining processes",
        root.display()
    )))
}

/// Waits for the launcher to be gone (it exits right after its report).
pub fn reap_launcher(launcher: Pid) {
    while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(launcher, None) {}
}

/// The `clone3` arguments this module uses (the kernel's `struct clone_args`, version 2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks this process with the child born in the cgroup `dir`, as `fork` returns (the child's
/// pid, or 0 in the child), with whether it was born there: where the kernel or a seccomp
/// filter refuses `clone3` into a cgroup, a plain fork, whose child must [`join`] it.
fn fork_into(dir: &File) -> io::Result<(Pid, bool)> {
    let fd = u64::try_from(dir.as_raw_fd()).map_err(io::Error::other)?;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD.unsigned_abs().into(),
        cgroup: fd,
        ..CloneArgs::default()
    };
    // SAFETY: without CLONE_VM the child gets a copy of this (single-threaded) process and
    // returns here on its own copy of the stack, as from fork.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid >= 0 {
        let pid = i32::try_from(pid).map_err(io::Error::other)?;
        return Ok((Pid::from_raw(pid), true));
    }
    let refused = io::Error::last_os_error();
    match refused.raw_os_error() {
        Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EPERM) => {}
        _ => return Err(refused),
    }
    // SAFETY: the caller is single-threaded, so the child inherits no lock another thread
    // holds.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        pid => Ok((Pid::from_raw(pid), false)),
    }
}

/// Moves the calling process into the cgroup `dir` the slow way (`cgroup.procs`).
fn join(dir: &File) -> Result<(), String> {
    let procs = c"cgroup.procs";
    // SAFETY: openat on a directory we hold, with a constant NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            procs.as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "opening cgroup.procs: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let procs = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    procs
        .write_at(b"0", 0)
        .map(|_| ())
        .map_err(|e| format!("joining the cgroup: {e}"))
}

/// `memory.max` and `memory.swap.max` for an OCI limit and memory-plus-swap figure (-1: none).
fn limit_memory(dir: &Path, resources: &LinuxResources) -> io::Result<()> {
    let Some(memory) = resources.memory() else {
        return Ok(());
    };
    let value = |bytes: i64| match bytes {
        b if b < 0 => "max".to_string(),
        b => b.to_string(),
    };
    if let Some(limit) = memory.limit() {
        write(&dir.join("memory.max"), &value(limit))?;
    }
    if let Some(swap) = memory.swap() {
        // v2 limits swap alone: what the OCI figure allows beyond the memory limit.
        let alone = match (swap, memory.limit()) {
            (s, _) if s < 0 => -1,
            (s, Some(limit)) if limit >= 0 => s.saturating_sub(limit).max(0),
            (s, _) => s,
        };
        write(&dir.join("memory.swap.max"), &value(alone))?;
    }
    Ok(())
}

/// `cpu.max` for an OCI quota and period.
fn limit_cpu(dir: &Path, resources: &LinuxResources) -> io::Result<()> {
    let Some(cpu) = resources.cpu() else {
        return Ok(());
    };
    if cpu.quota().is_none() && cpu.period().is_none() {
        return Ok(());
    }
    let quota = match cpu.quota() {
        Some(q) if q > 0 => q.to_string(),
        _ => "max".to_string(),
    };
    let period = cpu.period().unwrap_or(100_000);
    write(&dir.join("cpu.max"), &format!("{quota} {period}"))
}

/// Attaches to the cgroup `dir` a device program allowing what the bundle's rules allow (as
/// [`crate::placement`] writes them on v1: the rules as given). libcgroups' own
/// `Devices::apply` is not used: it first sets this whole process's `RLIMIT_MEMLOCK`, hard
/// limit included, to 128 MiB, which every runtime the host starts afterwards would inherit
/// (crun then fails to raise it). Since Linux 5.11 a program's memory is charged to its
/// cgroup instead; `false` where loading it is refused (an older kernel, wanting the
/// rlimit), for libcontainer to do it in its own process.
fn limit_devices(dir: &File, resources: &LinuxResources) -> io::Result<bool> {
    use libcgroups::v2::devices::{bpf::prog, emulator::Emulator, program::Program};
    let Some(rules) = resources.devices() else {
        return Ok(true);
    };
    let mut emulator = Emulator::with_default_allow(false);
    emulator.add_rules(rules);
    let program =
        Program::from_rules(&emulator.rules, emulator.default_allow).map_err(io::Error::other)?;
    let Ok(fd) = prog::load("Apache\0", program.bytecodes()) else {
        return Ok(false);
    };
    // SAFETY: the descriptor was just returned by the kernel and nothing else owns it.
    let program = unsafe { OwnedFd::from_raw_fd(fd) };
    prog::attach(program.as_raw_fd(), dir.as_raw_fd())
        .map(|()| true)
        .map_err(|e| io::Error::other(format!("attaching the device program: {e}")))
}

/// Creates `rel` under `root` level by level, enabling `controllers` in the
/// `cgroup.subtree_control` of every level above the last where one is missing. `None` where a
/// level refuses (one with processes of its own, under a service manager's tree, say): what
/// libcontainer then makes of it, it reports.
fn create(root: &Path, rel: &str, controllers: &[&str]) -> io::Result<Option<PathBuf>> {
    let mut dir = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if enable(&dir, controllers).is_err() {
            return Ok(None);
        }
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(annotate(&dir, e)),
        }
    }
    Ok(Some(dir))
}

/// Enables in `dir`'s children those of `controllers` that are not yet.
fn enable(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file).map_err(|e| annotate(&file, e))?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&file, &missing.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder};

    /// Limits as a cloudfunc bundle sets them: 128 MiB and no swap, half a core.
    fn bundle_limits() -> LinuxResources {
        crate::placement::tests::bundle_limits(Some(1 << 27))
    }

    #[test]
    fn limits_are_written_as_v2_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        limit_memory(dir.path(), &bundle_limits()).unwrap();
        limit_cpu(dir.path(), &bundle_limits()).unwrap();
        let read = |f: &str| fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "134217728");
        assert_eq!(
            read("memory.swap.max"),
            "0",
            "memory plus swap equal to memory"
        );
        assert_eq!(read("cpu.max"), "50000 100000");
        let unlimited = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(-1)
                    .swap(-1)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .period(50_000u64)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        limit_memory(dir.path(), &unlimited).unwrap();
        limit_cpu(dir.path(), &unlimited).unwrap();
        assert_eq!(read("memory.max"), "max");
        assert_eq!(read("memory.swap.max"), "max");
        assert_eq!(read("cpu.max"), "max 50000");
    }

    #[test]
    fn only_missing_controllers_are_enabled_on_the_way_down() {
        // A fake hierarchy: the kernel makes these files in a real one.
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.subtree_control"),
            "cpu memory pids",
        )
        .unwrap();
        fs::create_dir(root.path().join("parent")).unwrap();
        fs::write(root.path().join("parent/cgroup.subtree_control"), "memory").unwrap();
        let dir = create(root.path(), "parent/sb", &["memory", "cpu"])
            .unwrap()
            .unwrap();
        assert_eq!(dir, root.path().join("parent/sb"));
        assert!(dir.is_dir());
        let read = |f: &str| fs::read_to_string(root.path().join(f)).unwrap();
        assert_eq!(
            read("cgroup.subtree_control"),
            "cpu memory pids",
            "left alone"
        );
        assert_eq!(read("parent/cgroup.subtree_control"), "+cpu");
    }

    #[test]
    fn a_level_that_refuses_its_controllers_leaves_the_cgroup_to_libcontainer() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        // Where the kernel would refuse the write (EBUSY), this refuses it too: a directory.
        fs::create_dir(root.path().join("cgroup.subtree_control")).unwrap();
        let found = BornCgroup::prepare(root.path(), "/parent/sb", &bundle_limits()).unwrap();
        assert!(found.is_none());
        assert!(!root.path().join("parent").exists());
    }

    #[test]
    fn a_placement_is_refused_in_the_wrong_shape() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let two = vec![r, w];
        let born = Placed::Born { pids: None };
        assert!(BornCgroup::received(&born, two).is_err());
        let (r, _w) = nix::unistd::pipe().unwrap();
        let v1 = Placed::Hierarchies {
            hierarchies: 1,
            pids: None,
        };
        assert!(BornCgroup::received(&v1, vec![r]).is_err());
    }

    #[test]
    fn a_process_is_born_in_the_cgroup_it_is_cloned_into() {
        // Any cgroup2 mount will do: the hybrid hosts' has no controllers, which this needs not.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let Some(mount) = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        }) else {
            eprintln!(
                "SKIPPED a_process_is_born_in_the_cgroup_it_is_cloned_into: no cgroup2 mount"
            );
            return;
        };
        let name = format!("cf-born-test-{}", std::process::id());
        let dir = mount.join(&name);
        if let Err(e) = fs::create_dir(&dir) {
            eprintln!("SKIPPED a_process_is_born_in_the_cgroup_it_is_cloned_into: {e}");
            return;
        }
        let handle = File::open(&dir).unwrap();
        let (child, born) = fork_into(&handle).unwrap();
        if child.as_raw() == 0 {
            // The test process has threads: only async-signal-safe calls here.
            // SAFETY: pause and _exit are async-signal-safe.
            unsafe {
                libc::pause();
                libc::_exit(0)
            }
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        let _ = fs::remove_dir(&dir);
        assert!(born, "clone3 into a cgroup was refused (Linux 5.7 has it)");
        assert_eq!(procs.trim(), child.to_string());
    }
}
