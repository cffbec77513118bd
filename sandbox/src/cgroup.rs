//! Reading what a sandbox's cgroup says it used, on cgroup v1 and v2.
//!
//! The runtimes (or, for libcontainer on v1, the host and the shim: see [`crate::placement`])
//! create the cgroups; this module finds them (from a root passed in, `/sys/fs/cgroup` by default), reads
//! CPU time, peak memory and OOM kills, and removes them, with what a crash left under our own
//! parent. The parsers are pure functions over the files' text so that they are tested without
//! a kernel.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where cgroup hierarchies are mounted on a normal host.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup version of the hierarchy that holds the memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Separate hierarchies per controller (also "hybrid" hosts).
    V1,
    /// The unified hierarchy.
    V2,
}

/// What a call's peak memory covers: the call alone (v1, whose high-water mark is reset
/// before each call, and v2 on kernels whose `memory.peak` can be reset: 6.12 and later), or
/// the sandbox's whole life so far (v2 on older kernels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeakScope {
    #[default]
    Call,
    Sandbox,
}

/// The controllers' locations on this host.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    version: CgroupVersion,
    /// v2: the unified root. v1: the memory, cpuacct, pids and cpu (quota) hierarchies.
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    quota: PathBuf,
}

/// One moment of a cgroup's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupSnapshot {
    /// All CPU time, nanoseconds (exact; the user/system split is tick-sampled on v1).
    pub cpu_total_ns: u64,
    /// User CPU time, nanoseconds.
    pub cpu_user_ns: u64,
    /// System CPU time, nanoseconds.
    pub cpu_system_ns: u64,
    /// Highest memory use the kernel has recorded (since the last reset on v1).
    pub memory_peak_bytes: u64,
    /// Processes the OOM killer has killed in the cgroup.
    pub oom_kills: u64,
}

/// Reads a sandbox's counters. A trait so that the sandbox logic can be tested with a fake.
pub trait UsageReader: Send + Sync + std::fmt::Debug {
    /// Current counters.
    fn snapshot(&self) -> io::Result<CgroupSnapshot>;
    /// Starts a new peak-memory measurement, where the kernel allows it.
    fn reset_peak(&self);
    /// What the peak in the snapshots covers.
    fn peak_scope(&self) -> PeakScope {
        PeakScope::Call
    }
}

impl CgroupFs {
    /// Finds the hierarchies under `root`.
    pub fn detect(root: &Path) -> io::Result<CgroupFs> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(CgroupFs {
                version: CgroupVersion::V2,
                memory: root.to_path_buf(),
                cpu: root.to_path_buf(),
                pids: root.to_path_buf(),
                quota: root.to_path_buf(),
            });
        }
        let find = |names: &[&str]| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.is_dir())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no {} cgroup hierarchy under {}", names[0], root.display()),
                    )
                })
        };
        Ok(CgroupFs {
            version: CgroupVersion::V1,
            memory: find(&["memory"])?,
            cpu: find(&["cpuacct", "cpu,cpuacct", "cpuacct,cpu"])?,
            pids: find(&["pids"])?,
            // Where the quota files live: the cpu hierarchy, which is usually cpuacct's too.
            quota: find(&["cpu", "cpu,cpuacct", "cpuacct,cpu", "cpuacct"])?,
        })
    }

    /// The version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Whether swap can be limited here (else a bundle must not ask for it).
    pub fn swap_limit_supported(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => self.memory.join("memory.memsw.limit_in_bytes").exists(),
            // The root has no memory.swap.max; a cgroup below it with the memory controller
            // has one when the kernel accounts swap. Look two levels down (init.scope,
            // system.slice/*, or our own parent).
            CgroupVersion::V2 => has_file_below(&self.memory, "memory.swap.max", 2),
        }
    }

    /// The reader for the cgroup at absolute `path` (as in the bundle's `cgroupsPath`).
    pub fn sandbox(&self, path: &str) -> SandboxCgroup {
        let rel = path.trim_start_matches('/');
        SandboxCgroup {
            version: self.version,
            memory: self.memory.join(rel),
            cpu: self.cpu.join(rel),
            pids: self.pids.join(rel),
            quota: self.quota.join(rel),
            counters: Arc::default(),
        }
    }

    /// Every hierarchy directory of the cgroup at absolute `path`: on v1, its directory in
    /// every hierarchy mounted under the root, as the runtimes create it in each.
    pub fn dirs(&self, path: &str) -> Vec<PathBuf> {
        let rel = path.trim_start_matches('/');
        let mut dirs = vec![self.memory.join(rel)];
        let mut add = |dir: PathBuf| {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        };
        add(self.cpu.join(rel));
        add(self.pids.join(rel));
        if self.version == CgroupVersion::V1 {
            let root = self.memory.parent().unwrap_or(Path::new("/"));
            let mut mounted: Vec<PathBuf> = fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                // Symbolic links (`cpu` -> `cpu,cpuacct`) name a hierarchy listed already.
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path().join(rel))
                .collect();
            mounted.sort();
            mounted.into_iter().for_each(add);
        }
        dirs
    }

    /// Creates the cgroup at absolute `path` (and what is above it) where it is missing, in
    /// every hierarchy; one that exists already, or that another creator makes meanwhile, is
    /// fine.
    pub fn create(&self, path: &str) -> io::Result<()> {
        for dir in self.dirs(path) {
            match fs::create_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Kills every process under the cgroup at absolute `path` and removes it with all its
    /// children. Only for our own parent: the caller passes `/<parent>/<id>` paths.
    pub fn remove_tree(&self, path: &str) -> io::Result<()> {
        for dir in self.dirs(path) {
            // Usually it is empty (its processes reaped, no children): one rmdir each.
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => remove_dir_tree(&dir)?,
            }
        }
        Ok(())
    }
}

fn has_file_below(dir: &Path, name: &str, depth: u32) -> bool {
    if depth == 0 {
        return false;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .any(|e| e.path().join(name).exists() || has_file_below(&e.path(), name, depth - 1))
}

fn remove_dir_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dir_tree(&entry.path())?;
        }
    }
    for _ in 0..50 {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    fs::remove_dir(dir)
}

/// One sandbox's cgroup.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    version: CgroupVersion,
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    quota: PathBuf,
    /// The counter files, opened at the first snapshot and kept: a warm call reads them
    /// again from offset 0 instead of walking the paths and opening them each time.
    counters: Arc<Mutex<Option<Counters>>>,
}

/// A sandbox's counter files, open. v1: `cpuacct.usage` and `cpuacct.usage_all` (or, before
/// Linux 4.11, `cpuacct.usage_user` and `cpuacct.usage_sys`), `memory.max_usage_in_bytes`
/// (also written, to reset the peak) and `memory.oom_control`. v2: `cpu.stat`, `memory.peak`
/// (or `memory.current`) and `memory.events`.
#[derive(Debug)]
struct Counters {
    /// The CPU time: v2's one file, or v1's total then its split (one file or two).
    cpu: Vec<fs::File>,
    peak: fs::File,
    oom: fs::File,
    /// Whether the peak file can be reset (v1 always; v2 where `memory.peak` takes writes,
    /// each resetting what later reads through the same open file report): cleared by the
    /// first write the kernel refuses.
    peak_resets: std::sync::atomic::AtomicBool,
    /// Whether a v1 reset must truncate the peak file first: a plain file (a test's fixture) with
    /// a figure in it. The kernel's files report no size and ignore truncation, which cost a
    /// system call on every warm call.
    peak_truncates: bool,
}

impl Counters {
    fn open(cg: &SandboxCgroup) -> io::Result<Counters> {
        let open = |dir: &Path, file: &str, write: bool| {
            let path = dir.join(file);
            fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let (cpu, peak, oom, peak_resets) = match cg.version {
            CgroupVersion::V1 => {
                // The total from `cpuacct.usage`, the kernel's exact count. Current kernels
                // sample the user and system split at their ticks, in every file that shows
                // it (on 6.18, 9.94 ms of Python read 8 ms in `usage_all`), so the split's
                // sum is not the total: a warm call shorter than a tick would read 0 or a
                // whole tick (4 ms at 250 Hz). The split comes from one read of `usage_all`
                // where it exists, instead of two: each read of a counter is a system call
                // on every warm call.
                let total = open(&cg.cpu, "cpuacct.usage", false)?;
                let cpu = match open(&cg.cpu, "cpuacct.usage_all", false) {
                    Ok(all) => vec![total, all],
                    Err(_) => vec![
                        total,
                        open(&cg.cpu, "cpuacct.usage_user", false)?,
                        open(&cg.cpu, "cpuacct.usage_sys", false)?,
                    ],
                };
                (
                    cpu,
                    open(&cg.memory, "memory.max_usage_in_bytes", true)?,
                    open(&cg.memory, "memory.oom_control", false)?,
                    true,
                )
            }
            CgroupVersion::V2 => {
                // Before 6.12 the kernel's memory.peak takes no writes: the file may not open
                // for writing, or (as root) open and refuse the write.
                let (peak, resets) = match open(&cg.memory, "memory.peak", true) {
                    Ok(file) => (file, true),
                    Err(_) => (
                        open(&cg.memory, "memory.peak", false)
                            .or_else(|_| open(&cg.memory, "memory.current", false))?,
                        false,
                    ),
                };
                (
                    vec![open(&cg.cpu, "cpu.stat", false)?],
                    peak,
                    open(&cg.memory, "memory.events", false)?,
                    resets,
                )
            }
        };
        // Only v1's reset writes over the figure (v2's resets through its open file).
        let peak_truncates =
            cg.version == CgroupVersion::V1 && peak.metadata().is_ok_and(|m| m.len() > 0);
        Ok(Counters {
            cpu,
            peak,
            oom,
            peak_resets: std::sync::atomic::AtomicBool::new(peak_resets),
            peak_truncates,
        })
    }

    fn snapshot(&self, version: CgroupVersion) -> io::Result<CgroupSnapshot> {
        let (total, user, system) = match (version, self.cpu.as_slice()) {
            (CgroupVersion::V1, [total, all]) => {
                let (user, system) = with_text(all, per_cpu_times)?;
                (with_text(total, parse_u64)?, user, system)
            }
            (CgroupVersion::V1, [total, user, system]) => (
                with_text(total, parse_u64)?,
                with_text(user, parse_u64)?,
                with_text(system, parse_u64)?,
            ),
            (_, files) => with_text(&files[0], |stat| {
                let usec = |key| keyed(stat, key).saturating_mul(1000);
                (usec("usage_usec"), usec("user_usec"), usec("system_usec"))
            })?,
        };
        Ok(CgroupSnapshot {
            cpu_total_ns: total,
            cpu_user_ns: user,
            cpu_system_ns: system,
            memory_peak_bytes: with_text(&self.peak, parse_u64)?,
            // v1's `memory.oom_control` and v2's `memory.events` both count `oom_kill`.
            oom_kills: with_text(&self.oom, |text| keyed(text, "oom_kill"))?,
        })
    }
}

/// Runs `f` on the whole text of a counter file, read from the start (the kernel writes it
/// anew at each read), without copying it where it fits in a page.
fn with_text<T>(file: &fs::File, f: impl FnOnce(&str) -> T) -> io::Result<T> {
    let mut buf = [0u8; 4096];
    let n = file.read_at(&mut buf, 0)?;
    if n < buf.len() {
        return Ok(f(&String::from_utf8_lossy(&buf[..n])));
    }
    // A long file (`cpuacct.usage_all` on a host with many CPUs): read on to its end.
    let mut text = buf.to_vec();
    loop {
        let n = file.read_at(&mut buf, text.len() as u64)?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    Ok(f(&String::from_utf8_lossy(&text)))
}

/// The user and system nanoseconds in `cpuacct.usage_all`: a heading, then one line per CPU,
/// `cpu user system`.
fn per_cpu_times(text: &str) -> (u64, u64) {
    let (mut user, mut system) = (0u64, 0u64);
    for line in text.lines().skip(1) {
        let mut fields = line.split_ascii_whitespace().skip(1).map(parse_u64);
        user = user.saturating_add(fields.next().unwrap_or(0));
        system = system.saturating_add(fields.next().unwrap_or(0));
    }
    (user, system)
}

impl SandboxCgroup {
    /// Whether the cgroup exists (it is gone once its sandbox is deleted).
    pub fn exists(&self) -> bool {
        self.memory.is_dir()
    }

    /// Changes the memory limit (swap capped to the same figure where the bundle capped it),
    /// the CPU quota and the pids limit of a running sandbox.
    pub fn set_limits(
        &self,
        memory_bytes: u64,
        cpu_quota_us: i64,
        cpu_period_us: u64,
        pids: u32,
    ) -> io::Result<()> {
        match self.version {
            CgroupVersion::V1 => {
                let memory = i64::try_from(memory_bytes).unwrap_or(i64::MAX);
                let swap = self.memory.join("memory.memsw.limit_in_bytes").exists();
                set_v1_memory(&self.memory, Some(memory), swap.then_some(memory))?;
                set_v1_cpu(&self.quota, Some(cpu_quota_us), Some(cpu_period_us))?;
            }
            CgroupVersion::V2 => {
                write(&self.memory.join("memory.max"), &memory_bytes.to_string())?;
                write(
                    &self.cpu.join("cpu.max"),
                    &format!("{cpu_quota_us} {cpu_period_us}"),
                )?;
            }
        }
        write(&self.pids.join("pids.max"), &pids.to_string())
    }
}

/// Sets a v1 memory cgroup's limit and its memory-plus-swap limit (OCI figures: -1 is none).
/// Memory plus swap may never be below memory: it is raised first, or lowered last.
pub(crate) fn set_v1_memory(dir: &Path, limit: Option<i64>, memsw: Option<i64>) -> io::Result<()> {
    let memsw_file = dir.join("memory.memsw.limit_in_bytes");
    let Some(limit) = limit else {
        return memsw.map_or(Ok(()), |m| write(&memsw_file, &m.to_string()));
    };
    let raising = memsw.is_some() && {
        let current = parse_u64(&read(dir, "memory.limit_in_bytes")?);
        u64::try_from(limit).unwrap_or(u64::MAX) > current
    };
    if let (true, Some(m)) = (raising, memsw) {
        write(&memsw_file, &m.to_string())?;
    }
    write(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
    match memsw {
        Some(m) if !raising => write(&memsw_file, &m.to_string()),
        _ => Ok(()),
    }
}

/// Sets a v1 cpu cgroup's CFS period, then its quota (which is checked against the period).
pub(crate) fn set_v1_cpu(dir: &Path, quota: Option<i64>, period: Option<u64>) -> io::Result<()> {
    if let Some(period) = period {
        write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
    }
    match quota {
        Some(quota) => write(&dir.join("cpu.cfs_quota_us"), &quota.to_string()),
        None => Ok(()),
    }
}

/// Reads `dir/file`; an error names the file.
pub(crate) fn read(dir: &Path, file: &str) -> io::Result<String> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|e| annotate(&path, e))
}

/// Writes `value` to the file at `path`; an error names the file.
pub(crate) fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| annotate(path, e))
}

/// Opens the file at `path` for writing (a cgroup file: nothing is created or truncated); an
/// error names the file.
pub(crate) fn open_write(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| annotate(path, e))
}

/// `e`, saying which file it happened to.
pub(crate) fn annotate(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl SandboxCgroup {
    /// Runs `f` on the open counter files, opening them first if need be.
    fn with_counters<T>(&self, f: impl FnOnce(&Counters) -> io::Result<T>) -> io::Result<T> {
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counters.is_none() {
            *counters = Some(Counters::open(self)?);
        }
        f(counters.as_ref().expect("opened above"))
    }
}

impl UsageReader for SandboxCgroup {
    fn snapshot(&self) -> io::Result<CgroupSnapshot> {
        self.with_counters(|c| c.snapshot(self.version))
    }

    fn reset_peak(&self) {
        match self.version {
            CgroupVersion::V1 => {
                // Writing 0 restarts the high-water mark.
                let _ = self.with_counters(|c| {
                    let peak = &c.peak;
                    if c.peak_truncates {
                        peak.set_len(0)?;
                    }
                    peak.write_at(b"0", 0).map(|_| ())
                });
            }
            CgroupVersion::V2 => {
                // Any write restarts the peak that reads through this open file report (the
                // kernel keeps one per file); where it cannot, the peak is the sandbox's.
                let _ = self.with_counters(|c| {
                    use std::sync::atomic::Ordering;
                    if c.peak_resets.load(Ordering::Relaxed)
                        && c.peak.write_at(b"reset\n", 0).is_err()
                    {
                        c.peak_resets.store(false, Ordering::Relaxed);
                    }
                    Ok(())
                });
            }
        }
    }

    fn peak_scope(&self) -> PeakScope {
        let resets = self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_none_or(|c| c.peak_resets.load(std::sync::atomic::Ordering::Relaxed));
        if resets {
            PeakScope::Call
        } else {
            PeakScope::Sandbox
        }
    }
}

/// Parses a single-number cgroup file.
pub fn parse_u64(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// Reads `key value` from a flat-keyed cgroup file (`cpu.stat`, `memory.events`,
/// `memory.oom_control`); a missing key reads as 0.
pub fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| parse_u64(v))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(keyed(stat, "user_usec"), 1000);
        assert_eq!(keyed(stat, "system_usec"), 500);
        assert_eq!(keyed(stat, "missing"), 0);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(oom, "oom_kill"), 3);
        assert_eq!(parse_u64("12345\n"), 12345);
    }

    fn write(dir: &Path, file: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn v2_layout_reads_unified_files() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cgroup.controllers", "cpu memory pids\n");
        let dir = root.path().join("cloudfunc/sb1");
        write(
            &dir,
            "cpu.stat",
            "usage_usec 30\nuser_usec 20\nsystem_usec 10\n",
        );
        write(&dir, "memory.peak", "4096\n");
        write(
            &dir,
            "memory.events",
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
        );
        write(&dir, "memory.swap.max", "0\n");
        let fs_ = CgroupFs::detect(root.path()).unwrap();
        assert_eq!(fs_.version(), CgroupVersion::V2);
        assert!(fs_.swap_limit_supported());
        let snap = fs_.sandbox("/cloudfunc/sb1").snapshot().unwrap();
        assert_eq!(
            snap,
            CgroupSnapshot {
                cpu_total_ns: 30_000,
                cpu_user_ns: 20_000,
                cpu_system_ns: 10_000,
                memory_peak_bytes: 4096,
                oom_kills: 1
            }
        );
    }

    /// A v1 layout under `root` with sandbox `sb1`'s memory files (a peak of 8192, `oom_kills`
    /// OOM kills); its memory and cpuacct directories.
    fn v1_sandbox(root: &Path, oom_kills: u64) -> (PathBuf, PathBuf) {
        let mem = root.join("memory/cloudfunc/sb1");
        let cpu = root.join("cpuacct/cloudfunc/sb1");
        fs::create_dir_all(root.join("pids")).unwrap();
        fs::create_dir_all(&cpu).unwrap();
        write(&mem, "memory.max_usage_in_bytes", "8192\n");
        write(
            &mem,
            "memory.oom_control",
            &format!("oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n"),
        );
        (mem, cpu)
    }

    #[test]
    fn v1_layout_reads_per_controller_files() {
        let root = tempfile::tempdir().unwrap();
        let (mem, cpu) = v1_sandbox(root.path(), 0);
        write(&cpu, "cpuacct.usage", "1000\n");
        write(&cpu, "cpuacct.usage_user", "700\n");
        write(&cpu, "cpuacct.usage_sys", "300\n");
        let fs_ = CgroupFs::detect(root.path()).unwrap();
        assert_eq!(fs_.version(), CgroupVersion::V1);
        assert!(!fs_.swap_limit_supported());
        let cg = fs_.sandbox("/cloudfunc/sb1");
        assert!(cg.exists());
        let snap = cg.snapshot().unwrap();
        assert_eq!(snap.cpu_total_ns, 1000);
        assert_eq!(snap.cpu_user_ns, 700);
        assert_eq!(snap.memory_peak_bytes, 8192);
        cg.reset_peak();
        assert_eq!(
            fs::read_to_string(mem.join("memory.max_usage_in_bytes")).unwrap(),
            "0"
        );
    }

    #[test]
    fn v1_reads_every_cpus_time_from_one_file_however_long() {
        let root = tempfile::tempdir().unwrap();
        let (_, cpu) = v1_sandbox(root.path(), 2);
        // 300 CPUs: longer than one page of text. The total is `cpuacct.usage`'s (exact, where
        // the split is sampled), and the older split files disagree, to show they are not
        // read when `usage_all` is there.
        let mut all = String::from("cpu user system\n");
        for i in 0..300u64 {
            all.push_str(&format!("{i} {} {}\n", 1_000_000_000 + i, 7 * i));
        }
        assert!(all.len() > 4096);
        write(&cpu, "cpuacct.usage_all", &all);
        write(&cpu, "cpuacct.usage", "299000000777\n");
        write(&cpu, "cpuacct.usage_user", "1\n");
        write(&cpu, "cpuacct.usage_sys", "1\n");
        let fs_ = CgroupFs::detect(root.path()).unwrap();
        let snap = fs_.sandbox("/cloudfunc/sb1").snapshot().unwrap();
        let user = 300 * 1_000_000_000 + (0..300).sum::<u64>();
        let system = 7 * (0..300).sum::<u64>();
        assert_eq!(
            snap,
            CgroupSnapshot {
                cpu_total_ns: 299_000_000_777,
                cpu_user_ns: user,
                cpu_system_ns: system,
                memory_peak_bytes: 8192,
                oom_kills: 2
            }
        );
    }

    #[test]
    fn v1_dirs_cover_every_mounted_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        for h in [
            "memory",
            "cpu,cpuacct",
            "pids",
            "freezer",
            "net_cls,net_prio",
        ] {
            fs::create_dir_all(root.path().join(h)).unwrap();
        }
        for (link, target) in [("cpuacct", "cpu,cpuacct"), ("net_cls", "net_cls,net_prio")] {
            std::os::unix::fs::symlink(target, root.path().join(link)).unwrap();
        }
        let fs_ = CgroupFs::detect(root.path()).unwrap();
        let rel = |h: &str| root.path().join(h).join("cf/sb1");
        assert_eq!(
            fs_.dirs("/cf/sb1"),
            vec![
                rel("memory"),
                rel("cpuacct"),
                rel("pids"),
                rel("cpu,cpuacct"),
                rel("freezer"),
                rel("net_cls,net_prio"),
            ]
        );
    }

    #[test]
    fn missing_hierarchy_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        assert!(CgroupFs::detect(root.path()).is_err());
    }
}
