//! Resource limits of one sandbox.

use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;

/// What one sandbox may use. Enforced by cgroups (memory, CPU, pids), the size of its tmpfs
/// and its rlimits; the wall-clock timeout belongs to each invocation, not to the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory, page cache of `/tmp` included; swap is capped to the same figure, so nothing
    /// can escape into swap.
    pub memory_bytes: u64,
    /// CPU bandwidth in thousandths of a core (1000 = one core).
    pub cpu_millicores: u32,
    /// Processes and threads together.
    pub pids: u32,
    /// Size of the private `/tmp` (and of `/dev/shm`).
    pub tmp_bytes: u64,
    /// Open files per process.
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 * MIB,
            cpu_millicores: 1000,
            pids: 128,
            tmp_bytes: 64 * MIB,
            nofile: 1024,
        }
    }
}

impl Limits {
    /// The CFS period used for every quota.
    pub const CPU_PERIOD_US: u64 = 100_000;

    /// The CFS quota for [`Limits::CPU_PERIOD_US`].
    pub fn cpu_quota_us(&self) -> i64 {
        let quota = u64::from(self.cpu_millicores) * Self::CPU_PERIOD_US / 1000;
        i64::try_from(quota.max(1000)).unwrap_or(i64::MAX)
    }

    /// Memory in whole MiB, as handlers see it.
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes / MIB
    }

    /// Checks that the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_bytes < 16 * MIB {
            return Err(format!(
                "memory must be at least 16 MiB, got {} bytes",
                self.memory_bytes
            ));
        }
        if self.cpu_millicores < 10 {
            return Err("cpu must be at least 10 millicores".into());
        }
        if self.pids < 8 {
            return Err("pids must be at least 8".into());
        }
        if self.tmp_bytes < MIB {
            return Err("tmp must be at least 1 MiB".into());
        }
        if self.nofile < 64 {
            return Err("nofile must be at least 64".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_follows_millicores() {
        let half = Limits {
            cpu_millicores: 500,
            ..Limits::default()
        };
        assert_eq!(half.cpu_quota_us(), 50_000);
        let two = Limits {
            cpu_millicores: 2000,
            ..Limits::default()
        };
        assert_eq!(two.cpu_quota_us(), 200_000);
    }

    #[test]
    fn tiny_limits_are_refused() {
        assert!(Limits::default().validate().is_ok());
        assert!(Limits {
            memory_bytes: 1,
            ..Limits::default()
        }
        .validate()
        .is_err());
        assert!(Limits {
            pids: 1,
            ..Limits::default()
        }
        .validate()
        .is_err());
    }
}
