//! Putting a libcontainer sandbox into its cgroups on cgroup v1 without the kernel's global
//! cgroup lock.
//!
//! Writing a pid to `cgroup.procs` takes the kernel's `cgroup_threadgroup_rwsem` for writing,
//! and on a host whose cgroups are not mounted with `favordynmods` the first such write after
//! a quiet spell waits for an RCU grace period: 5–17 ms measured on the 2-core VM, in every
//! cold start, whatever the runtime. A thread that moves only itself (`0` written to a v1
//! `tasks` file) does not take that lock.
//!
//! So on v1 a libcontainer sandbox is placed by cloudfunc itself. The host creates the
//! sandbox's cgroup in every hierarchy it is in and applies the bundle's limits while the
//! sandbox's shim is still starting (the two overlap on separate CPUs), then hands the shim
//! the `tasks` files it needs, open. The shim moves its own single thread in, lets libcontainer
//! clone the container's processes (born in the cgroup, with the cgroup namespace rooted at
//! it), and moves itself back out before the container starts. libcontainer is shown the spec
//! without `resources`, in a mount namespace without the cgroup hierarchies, so it does no
//! cgroup work of its own. [`handles`] decides when that is safe: limits cloudfunc does not
//! apply are left to libcontainer, as before. The price: what the shim allocates during the
//! create (about 60 KB) is charged to the sandbox's memory cgroup.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources};

use crate::born::BornCgroup;
use crate::cgroup::{annotate, open_write, read, set_v1_cpu, set_v1_memory, write};
use crate::control::{Placed, MAX_FDS};

/// One v1 hierarchy as `/proc/self/cgroup` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The controllers, comma-separated as the kernel lists them (`cpu,cpuacct`).
    pub controllers: String,
    /// This process's cgroup in that hierarchy.
    pub path: String,
}

/// The v1 hierarchies with controllers in a `/proc/<pid>/cgroup` text: not the unified one
/// (`0::`), not named ones without controllers (`name=systemd`).
pub fn parse_memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let real: Vec<&str> = controllers
                .split(',')
                .filter(|c| !c.is_empty() && !c.starts_with("name="))
                .collect();
            (!real.is_empty()).then(|| Membership {
                controllers: real.join(","),
                path: path.to_string(),
            })
        })
        .collect()
}

/// The cgroup file line for one device rule (`c 1:3 rwm`, `a *:* rwm`).
pub fn device_rule(rule: &LinuxDeviceCgroup) -> String {
    let number = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
    let typ = rule.typ();
    format!(
        "{} {}:{} {}",
        typ.as_ref().map_or("a", |t| t.as_str()),
        number(rule.major()),
        number(rule.minor()),
        rule.access().as_deref().unwrap_or("rwm"),
    )
}

/// Whether the shim can apply all of `resources` itself: memory limit and swap, CPU quota and
/// period, pids and devices. Anything else (shares, cpusets, block I/O, hugepages...) is left
/// to libcontainer.
pub fn handles(resources: &LinuxResources) -> bool {
    let memory = resources.memory().as_ref().is_none_or(|m| {
        m.reservation().is_none()
            && m.kernel().is_none()
            && m.kernel_tcp().is_none()
            && m.swappiness().is_none()
            && m.disable_oom_killer().is_none()
            && m.use_hierarchy().is_none()
    });
    let cpu = resources.cpu().as_ref().is_none_or(|c| {
        c.shares().is_none()
            && c.burst().is_none()
            && c.realtime_runtime().is_none()
            && c.realtime_period().is_none()
            && c.cpus().is_none()
            && c.mems().is_none()
            && c.idle().is_none()
    });
    memory
        && cpu
        && resources.block_io().is_none()
        && resources.hugepage_limits().is_none()
        && resources.network().is_none()
        && resources.rdma().is_none()
        && resources.unified().is_none()
}

/// A sandbox's cgroup, created and limited, with the `tasks` files to move a thread in and
/// back out.
#[derive(Debug)]
pub struct Placement {
    /// Per hierarchy: the sandbox's `tasks` and the preparing thread's own.
    tasks: Vec<(File, File)>,
    /// The sandbox's `pids.max` and what to write there, once the shim is out (it would
    /// count otherwise).
    pids: Option<(File, String)>,
}

impl Placement {
    /// Creates the cgroup at absolute `path` in every v1 hierarchy the calling thread is in
    /// (mounted under `root`), applies `resources` but the pids limit, and opens the `tasks`
    /// files (the calling thread's own as the way back: a process it starts is in its cgroups).
    /// `None`, having changed nothing, where this process cannot see its own cgroups under
    /// `root` (a container that shows the host's cgroup paths over a mount of its own: it
    /// could not move back), where a limit asks for a controller it is not in (for
    /// libcontainer to refuse, as it does), or where there are too many hierarchies to hand
    /// over in one control message.
    pub fn prepare(
        root: &Path,
        path: &str,
        resources: &LinuxResources,
    ) -> io::Result<Option<Placement>> {
        let own = fs::read_to_string("/proc/thread-self/cgroup")?;
        Placement::prepare_in(&own, root, path, resources)
    }

    /// [`Placement::prepare`] for a process whose `/proc/<pid>/cgroup` reads `own`.
    pub fn prepare_in(
        own: &str,
        root: &Path,
        path: &str,
        resources: &LinuxResources,
    ) -> io::Result<Option<Placement>> {
        let memberships = parse_memberships(own);
        let joined: Vec<&str> = memberships
            .iter()
            .flat_map(|m| m.controllers.split(','))
            .collect();
        let needed = [
            ("memory", resources.memory().is_some()),
            ("cpu", resources.cpu().is_some()),
            ("pids", resources.pids().is_some()),
            ("devices", resources.devices().is_some()),
        ];
        if needed
            .iter()
            .any(|(c, asked)| *asked && !joined.contains(c))
        {
            return Ok(None);
        }
        let mut homes = Vec::new();
        for membership in memberships {
            let Some(hierarchy) = hierarchy_dir(root, &membership.controllers) else {
                return Ok(None);
            };
            let home = hierarchy
                .join(membership.path.trim_start_matches('/'))
                .join("tasks");
            let Ok(home) = open_write(&home) else {
                return Ok(None);
            };
            homes.push((hierarchy, membership.controllers, home));
        }
        if homes.is_empty() || 3 + 2 * homes.len() + 1 > MAX_FDS {
            return Ok(None);
        }
        let rel = path.trim_start_matches('/');
        let mut placement = Placement {
            tasks: Vec::new(),
            pids: None,
        };
        for (hierarchy, controllers, home) in homes {
            let controllers: Vec<&str> = controllers.split(',').collect();
            let dir = create(&hierarchy, rel, controllers.contains(&"cpuset"))?;
            for controller in &controllers {
                match *controller {
                    "memory" => limit_memory(&dir, resources)?,
                    "cpu" => limit_cpu(&dir, resources)?,
                    "devices" => limit_devices(&dir, resources)?,
                    "pids" => {
                        if let Some(pids) = resources.pids() {
                            let file = open_write(&dir.join("pids.max"))?;
                            placement.pids = Some((file, pids_value(pids.limit())));
                        }
                    }
                    _ => {}
                }
            }
            placement
                .tasks
                .push((open_write(&dir.join("tasks"))?, home));
        }
        Ok(Some(placement))
    }

    /// What the shim is sent: the message's part and the descriptors, in the order
    /// [`Placement::received`] takes them.
    pub fn to_send(&self) -> (Placed, Vec<RawFd>) {
        let mut fds: Vec<RawFd> = self
            .tasks
            .iter()
            .flat_map(|(sandbox, home)| [sandbox.as_raw_fd(), home.as_raw_fd()])
            .collect();
        fds.extend(self.pids.as_ref().map(|(file, _)| file.as_raw_fd()));
        let placed = Placed::Hierarchies {
            hierarchies: self.tasks.len(),
            pids: self.pids.as_ref().map(|(_, value)| value.clone()),
        };
        (placed, fds)
    }

    /// The placement the host prepared, from what the shim received.
    pub fn received(placed: &Placed, fds: Vec<OwnedFd>) -> Result<Placement, String> {
        let &Placed::Hierarchies { hierarchies, .. } = placed else {
            return Err(format!("{placed:?} is not a v1 placement"));
        };
        let expected = 2 * hierarchies + usize::from(placed.pids().is_some());
        if fds.len() != expected || hierarchies == 0 {
            return Err(format!(
                "a placement of {hierarchies} hierarchies came with {} descriptors",
                fds.len()
            ));
        }
        let mut files = fds.into_iter().map(File::from);
        let mut tasks = Vec::with_capacity(hierarchies);
        for _ in 0..hierarchies {
            let (Some(sandbox), Some(home)) = (files.next(), files.next()) else {
                unreachable!("the count was checked");
            };
            tasks.push((sandbox, home));
        }
        let pids = placed
            .pids()
            .and_then(|value| Some((files.next()?, value.to_string())));
        Ok(Placement { tasks, pids })
    }

    /// Moves the calling thread into the sandbox's cgroup in every hierarchy.
    pub fn enter(&self) -> io::Result<()> {
        self.tasks
            .iter()
            .try_for_each(|(sandbox, _)| move_self(sandbox))
    }

    /// Moves the calling thread back where it was.
    pub fn leave(&self) -> io::Result<()> {
        self.tasks.iter().try_for_each(|(_, home)| move_self(home))
    }

    /// Applies the pids limit (after [`Placement::leave`]).
    pub fn limit_pids(&self) -> io::Result<()> {
        write_pids(self.pids.as_ref())
    }
}

/// A sandbox's cgroup as the host made it: on cgroup v1 for the shim's thread to enter, on v2
/// for a launcher to be born in ([`crate::born`]).
#[derive(Debug)]
pub enum Prepared {
    Hierarchies(Placement),
    Born(BornCgroup),
}

impl Prepared {
    /// What the shim is sent: the message's part and the descriptors.
    pub fn to_send(&self) -> (Placed, Vec<RawFd>) {
        match self {
            Prepared::Hierarchies(placement) => placement.to_send(),
            Prepared::Born(cgroup) => cgroup.to_send(),
        }
    }

    /// The cgroup the host prepared, from what the shim received.
    pub fn received(placed: &Placed, fds: Vec<OwnedFd>) -> Result<Prepared, String> {
        match placed {
            Placed::Hierarchies { .. } => {
                Placement::received(placed, fds).map(Prepared::Hierarchies)
            }
            Placed::Born { .. } => BornCgroup::received(placed, fds).map(Prepared::Born),
        }
    }
}

/// Writes a pids limit's value to its open `pids.max`, if there is one.
pub(crate) fn write_pids(pids: Option<&(File, String)>) -> io::Result<()> {
    match pids {
        Some((file, value)) => file.write_at(value.as_bytes(), 0).map(|_| ()),
        None => Ok(()),
    }
}

/// The directory of the hierarchy holding `controllers`: `cpu,cpuacct`, or a link named
/// after one of them.
fn hierarchy_dir(root: &Path, controllers: &str) -> Option<PathBuf> {
    std::iter::once(controllers)
        .chain(controllers.split(','))
        .map(|name| root.join(name))
        .find(|dir| dir.is_dir())
}

/// Creates `rel` under `hierarchy` level by level; a cpuset level gets its parent's CPUs and
/// memory nodes, without which no task may join it.
fn create(hierarchy: &Path, rel: &str, cpuset: bool) -> io::Result<PathBuf> {
    let mut dir = hierarchy.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        let parent = dir.clone();
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(annotate(&dir, e)),
        }
        if cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if read(&dir, file)?.trim().is_empty() {
                    write(&dir.join(file), read(&parent, file)?.trim())?;
                }
            }
        }
    }
    Ok(dir)
}

fn limit_memory(dir: &Path, resources: &LinuxResources) -> io::Result<()> {
    match resources.memory() {
        Some(memory) => set_v1_memory(dir, memory.limit(), memory.swap()),
        None => Ok(()),
    }
}

fn limit_cpu(dir: &Path, resources: &LinuxResources) -> io::Result<()> {
    match resources.cpu() {
        Some(cpu) => set_v1_cpu(dir, cpu.quota(), cpu.period()),
        None => Ok(()),
    }
}

fn limit_devices(dir: &Path, resources: &LinuxResources) -> io::Result<()> {
    for rule in resources.devices().iter().flatten() {
        let file = if rule.allow() {
            "devices.allow"
        } else {
            "devices.deny"
        };
        write(&dir.join(file), &device_rule(rule))?;
    }
    Ok(())
}

/// `pids.max` for an OCI pids limit: zero or less means none.
pub(crate) fn pids_value(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_string()
    }
}

fn move_self(tasks: &File) -> io::Result<()> {
    // `0` is the calling thread; the kernel moves it without locking every thread group.
    tasks.write_at(b"0", 0).map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
        LinuxResourcesBuilder,
    };

    #[test]
    fn memberships_keep_the_hierarchies_with_controllers() {
        let text = "12:pids:/user.slice/u\n11:cpu,cpuacct:/user.slice\n\
                    1:name=systemd:/user.slice/u\n0::/user.slice/u\n3:memory:/\n";
        let found = parse_memberships(text);
        assert_eq!(
            found,
            vec![
                Membership {
                    controllers: "pids".into(),
                    path: "/user.slice/u".into()
                },
                Membership {
                    controllers: "cpu,cpuacct".into(),
                    path: "/user.slice".into()
                },
                Membership {
                    controllers: "memory".into(),
                    path: "/".into()
                },
            ]
        );
    }

    #[test]
    fn nothing_is_created_where_the_process_cannot_see_its_own_cgroups() {
        // A tree with this process's hierarchies but none of its cgroups (no `tasks` files).
        let root = tempfile::tempdir().unwrap();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        for membership in parse_memberships(&own) {
            fs::create_dir_all(root.path().join(&membership.controllers)).unwrap();
        }
        let found = Placement::prepare(root.path(), "/parent/sb", &LinuxResources::default());
        assert!(found.unwrap().is_none());
        for membership in parse_memberships(&own) {
            assert!(!root
                .path()
                .join(&membership.controllers)
                .join("parent")
                .exists());
        }
    }

    /// Limits as a cloudfunc bundle sets them: 128 MiB, swap as given, half a core.
    pub(crate) fn bundle_limits(swap: Option<i64>) -> LinuxResources {
        let mut memory = LinuxMemoryBuilder::default().limit(1 << 27);
        if let Some(swap) = swap {
            memory = memory.swap(swap);
        }
        LinuxResourcesBuilder::default()
            .memory(memory.build().unwrap())
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(50_000)
                    .period(100_000u64)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    /// A fake cgroup directory with its `tasks` file (the kernel makes it in a real one).
    fn fake_cgroup(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("tasks"), "").unwrap();
    }

    /// A fake hierarchy tree under `root` for `own`, with this process's `tasks` files.
    fn fake_tree(root: &Path, own: &str) {
        for membership in parse_memberships(own) {
            fake_cgroup(
                &root
                    .join(&membership.controllers)
                    .join(&membership.path[1..]),
            );
        }
    }

    #[test]
    fn limits_are_written_and_the_sandbox_is_created_in_every_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let own = "3:memory:/host\n2:cpu,cpuacct:/\n1:name=systemd:/\n";
        fake_tree(root.path(), own);
        // In a real hierarchy the kernel makes these; here the sandbox's must exist first.
        for dir in ["memory/parent/sb", "cpu,cpuacct/parent/sb"] {
            fake_cgroup(&root.path().join(dir));
        }
        let resources = bundle_limits(None);
        let placement = Placement::prepare_in(own, root.path(), "/parent/sb", &resources)
            .unwrap()
            .expect("placed");
        assert_eq!(placement.tasks.len(), 2);
        let read = |p: &str| fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("memory/parent/sb/memory.limit_in_bytes"), "134217728");
        assert_eq!(read("cpu,cpuacct/parent/sb/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu,cpuacct/parent/sb/cpu.cfs_period_us"), "100000");
        placement.enter().unwrap();
        assert_eq!(read("memory/parent/sb/tasks"), "0");
        placement.leave().unwrap();
        assert_eq!(read("memory/host/tasks"), "0");
        assert!(!root.path().join("name=systemd").exists());
    }

    #[test]
    fn a_placement_crosses_the_control_channel() {
        use crate::control::{Channel, Message};
        let root = tempfile::tempdir().unwrap();
        let own = "4:pids:/host\n3:memory:/host\n";
        fake_tree(root.path(), own);
        for dir in ["memory/parent/sb", "pids/parent/sb"] {
            fake_cgroup(&root.path().join(dir));
        }
        fs::write(root.path().join("pids/parent/sb/pids.max"), "").unwrap();
        let mut resources = bundle_limits(None);
        resources.set_cpu(None);
        resources.set_pids(Some(
            oci_spec::runtime::LinuxPidsBuilder::default()
                .limit(64)
                .build()
                .unwrap(),
        ));
        let placement = Placement::prepare_in(own, root.path(), "/parent/sb", &resources)
            .unwrap()
            .expect("placed");
        let (host, shim) = Channel::pair().unwrap();
        let shim = Channel::from_fd(shim);
        let (placed, fds) = placement.to_send();
        assert!(matches!(placed, Placed::Hierarchies { hierarchies: 2, .. }));
        assert_eq!(placed.pids(), Some("64"));
        host.send_with_fds(&Message::Launch(Some(placed)), &fds)
            .unwrap();
        drop(placement);
        let (message, fds) = shim.recv(None).unwrap().unwrap();
        let Message::Launch(Some(placed)) = message else {
            panic!("{message:?}");
        };
        // A count that does not match is refused, and so is a v2 placement.
        let pids = placed.pids().map(str::to_string);
        for wrong in [
            Placed::Hierarchies {
                hierarchies: 3,
                pids: pids.clone(),
            },
            Placed::Born { pids },
        ] {
            let dup: Vec<OwnedFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
            assert!(Placement::received(&wrong, dup).is_err());
        }
        let received = Placement::received(&placed, fds).unwrap();
        let read = |p: &str| fs::read_to_string(root.path().join(p)).unwrap();
        received.enter().unwrap();
        assert_eq!(read("memory/parent/sb/tasks"), "0");
        assert_eq!(read("pids/parent/sb/tasks"), "0");
        received.leave().unwrap();
        assert_eq!(read("memory/host/tasks"), "0");
        assert_eq!(read("pids/host/tasks"), "0");
        received.limit_pids().unwrap();
        assert_eq!(read("pids/parent/sb/pids.max"), "64");
    }

    #[test]
    fn a_limit_without_its_controller_is_left_to_libcontainer() {
        let root = tempfile::tempdir().unwrap();
        let own = "3:memory:/\n";
        fake_tree(root.path(), own);
        let resources = LinuxResourcesBuilder::default()
            .cpu(LinuxCpuBuilder::default().quota(50_000).build().unwrap())
            .build()
            .unwrap();
        let found = Placement::prepare_in(own, root.path(), "/parent/sb", &resources).unwrap();
        assert!(found.is_none());
        assert!(!root.path().join("memory/parent").exists());
    }

    #[test]
    fn device_rules_read_as_the_kernel_expects() {
        let deny_all = LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .unwrap();
        assert_eq!(device_rule(&deny_all), "a *:* rwm");
        let null = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(1)
            .minor(3)
            .build()
            .unwrap();
        assert_eq!(device_rule(&null), "c 1:3 rwm");
    }

    #[test]
    fn only_the_limits_the_shim_applies_are_taken_from_libcontainer() {
        let ours = bundle_limits(Some(1 << 27));
        assert!(handles(&ours));
        let shares = LinuxResourcesBuilder::default()
            .cpu(LinuxCpuBuilder::default().shares(512u64).build().unwrap())
            .build()
            .unwrap();
        assert!(!handles(&shares));
        let reservation = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .reservation(1 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert!(!handles(&reservation));
        assert_eq!(pids_value(0), "max");
        assert_eq!(pids_value(32), "32");
    }
}
