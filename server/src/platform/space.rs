//! The data directory's free space. Below the floor (`--min-free-mb`) the platform takes no
//! new work that would need the disk (deploys, calls, async runs; queue workers claim nothing)
//! and answers 507, so a full disk turns into refusals up front rather than calls that ran
//! and could not be recorded. The floor is checked every second, and at once after a write
//! the disk refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// How often the free space is read.
const EVERY: Duration = Duration::from_secs(1);

/// The data directory's space, as last read.
#[derive(Debug)]
pub struct Space {
    dir: PathBuf,
    floor: u64,
    free: AtomicU64,
    total: AtomicU64,
    low: AtomicBool,
}

/// What health reports of it.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceReport {
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub min_free_bytes: u64,
    /// Below the floor: new work is refused.
    pub low: bool,
}

impl Space {
    /// Watches the filesystem of `dir`, with `floor` bytes the least kept free (0: never
    /// refuse).
    pub fn new(dir: &Path, floor: u64) -> Space {
        let space = Space {
            dir: dir.to_path_buf(),
            floor,
            free: AtomicU64::new(u64::MAX),
            total: AtomicU64::new(0),
            low: AtomicBool::new(false),
        };
        space.check();
        space
    }

    /// Reads the free space now; returns whether it is below the floor.
    pub fn check(&self) -> bool {
        match nix::sys::statvfs::statvfs(&self.dir) {
            // statvfs's field types differ between platforms; u64 holds them all.
            #[allow(clippy::useless_conversion)]
            Ok(s) => {
                let unit = u64::from(s.fragment_size());
                let free = u64::from(s.blocks_available()).saturating_mul(unit);
                let total = u64::from(s.blocks()).saturating_mul(unit);
                self.free.store(free, Ordering::Relaxed);
                self.total.store(total, Ordering::Relaxed);
                let low = free < self.floor;
                let was = self.low.swap(low, Ordering::Relaxed);
                if low != was {
                    if low {
                        tracing::warn!(
                            free,
                            floor = self.floor,
                            "the data directory's disk is nearly full: new work is refused (507)"
                        );
                    } else {
                        tracing::info!(free, "the data directory's disk has room again");
                    }
                }
                low
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the data directory's free space");
                self.low.load(Ordering::Relaxed)
            }
        }
    }

    /// Whether the free space was below the floor at the last reading.
    pub fn low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// The last reading.
    pub fn report(&self) -> SpaceReport {
        SpaceReport {
            free_bytes: self.free.load(Ordering::Relaxed),
            total_bytes: self.total.load(Ordering::Relaxed),
            min_free_bytes: self.floor,
            low: self.low(),
        }
    }

    /// Reads the free space every second, on a blocking thread, while `self` lives.
    pub fn watch(self: &Arc<Self>) {
        let space = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let Some(s) = space.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || s.check()).await;
            }
        });
    }
}

/// Whether an I/O error means the disk is full (or a quota spent).
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_above_the_free_space_is_low_and_zero_never_is() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!Space::new(dir.path(), 0).low());
        let full = Space::new(dir.path(), u64::MAX);
        assert!(full.low());
        let report = full.report();
        assert!(report.low && report.free_bytes > 0 && report.total_bytes >= report.free_bytes);
        assert!(is_full(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_full(&std::io::Error::from_raw_os_error(libc::EACCES)));
    }
}
