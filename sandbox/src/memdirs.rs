//! The engine's short-lived state kept in memory: container state and bundles.
//!
//! Nothing in these directories outlives the machine's uptime (the containers they describe
//! do not), yet every cold start writes there: the bundle's specs, and libcontainer's
//! `state.json`, rewritten in place as the container goes from creating to created to
//! running. On a disk each rewrite truncates the file; on a filesystem mounted with `discard`
//! the truncation waits for the device to discard the freed block (0.3 ms each on the test
//! VM, twice per cold start). runc and crun rely on `/run` being a tmpfs for the same reason;
//! where the state directory is not on one, the engine mounts a private tmpfs on each
//! directory (as root), and unmounts it when the engine is dropped. A tmpfs left by an engine
//! that died (known by its source name, [`SOURCE`]) is taken over, so the start-up sweep still
//! sees what that engine left; a tmpfs someone else put there is used and left alone.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statfs::{statfs, TMPFS_MAGIC};

/// The source name of the engine's mounts, as `/proc/self/mountinfo` shows them.
const SOURCE: &str = "cloudfunc-state";

/// The most each mounted tmpfs may hold: a sandbox's state and bundle take about 20 KiB.
const SIZE: &str = "256m";

/// The directories this engine mounted a tmpfs on (or took one over); unmounted on
/// [`MemoryDirs::release`] or drop.
#[derive(Debug, Default)]
pub(crate) struct MemoryDirs {
    mounted: Mutex<Vec<PathBuf>>,
}

impl MemoryDirs {
    /// Puts each of `dirs` (existing) on a tmpfs where it is not on one, and takes over the
    /// engine's tmpfs where a previous engine left one. A directory that cannot be mounted on
    /// (no `CAP_SYS_ADMIN`) stays where it is, said on stderr: the engine works there, only
    /// slower to start sandboxes.
    pub(crate) fn ensure(dirs: &[PathBuf]) -> MemoryDirs {
        let mut mounted = Vec::new();
        let left = engine_mounts();
        for dir in dirs {
            let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
            if left.contains(&real) {
                mounted.push(dir.clone());
                continue;
            }
            if on_tmpfs(dir) {
                continue;
            }
            match mount_tmpfs(dir) {
                Ok(()) => mounted.push(dir.clone()),
                Err(e) => eprintln!(
                    "cloudfunc: WARNING: the engine's state stays on disk at {}: a tmpfs could not be mounted there ({e})",
                    dir.display()
                ),
            }
        }
        MemoryDirs {
            mounted: Mutex::new(mounted),
        }
    }

    /// The directories mounted by this engine.
    #[cfg(test)]
    pub(crate) fn mounted(&self) -> Vec<PathBuf> {
        self.mounted.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Unmounts the engine's tmpfs (once: a second call finds nothing to do).
    pub(crate) fn release(&self) {
        let taken = match self.mounted.lock() {
            Ok(mut mounted) => std::mem::take(&mut *mounted),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for dir in taken {
            if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
                eprintln!(
                    "cloudfunc: WARNING: unmounting the engine's tmpfs at {}: {e}",
                    dir.display()
                );
            }
        }
    }
}

impl Drop for MemoryDirs {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether `dir` is on a tmpfs.
pub(crate) fn on_tmpfs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

/// Mounts a tmpfs on `dir`, readable by root alone, with nothing executable or special on it,
/// and private, so that mounts under it reach no other mount namespace.
fn mount_tmpfs(dir: &Path) -> nix::Result<()> {
    let options = format!("mode=0700,size={SIZE}");
    mount(
        Some(SOURCE),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )?;
    if let Err(e) = mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

/// Where this mount namespace has the engine's tmpfs mounted.
fn engine_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (mine, theirs) = line.split_once(" - ")?;
            let mut theirs = theirs.split(' ');
            let (kind, source) = (theirs.next()?, theirs.next()?);
            let point = mine.split(' ').nth(4)?;
            (kind == "tmpfs" && source == SOURCE).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// A path as mountinfo writes it: space, tab, newline and backslash as three octal digits.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/tmp/a\\040b/c"), "/tmp/a b/c");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn a_directory_on_disk_goes_to_memory_and_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        if on_tmpfs(dir.path()) {
            eprintln!("SKIP: the temporary directory is on a tmpfs already");
            return;
        }
        let state = dir.path().join("containers");
        std::fs::create_dir(&state).unwrap();
        let memory = MemoryDirs::ensure(std::slice::from_ref(&state));
        assert!(on_tmpfs(&state));
        assert_eq!(memory.mounted(), vec![state.clone()]);
        std::fs::write(state.join("state.json"), "{}").unwrap();
        // The engine dies without unmounting: the next one takes the tmpfs over, files and all.
        std::mem::forget(memory);
        let next = MemoryDirs::ensure(std::slice::from_ref(&state));
        assert_eq!(next.mounted(), vec![state.clone()]);
        assert!(state.join("state.json").exists());
        drop(next);
        assert!(!on_tmpfs(&state));
        assert!(
            !state.join("state.json").exists(),
            "the tmpfs went with its files"
        );

        // Someone else's tmpfs is used as it is and left mounted.
        mount(
            Some("tmpfs"),
            &state,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        drop(MemoryDirs::ensure(std::slice::from_ref(&state)));
        assert!(on_tmpfs(&state));
        umount2(&state, MntFlags::MNT_DETACH).unwrap();
    }
}
