//! Summaries of finished calls, and the host's load and memory.

use serde_json::{json, Value};

use crate::model::Function;
use crate::rollup::{self, Stats};
use crate::store::Rollup;

/// The `p`th percentile (nearest rank) of sorted values; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    rollup::nearest_rank(sorted.len() as u64, p)
        .and_then(|rank| sorted.get(usize::try_from(rank).ok()?))
        .copied()
        .unwrap_or(0.0)
}

/// Steps offered when a request names none: the first that gives at most 360 points wins.
const DEFAULT_STEPS: [i64; 7] = [
    60_000,
    300_000,
    900_000,
    3_600_000,
    21_600_000,
    86_400_000,
    604_800_000,
];

/// Most points one series may have.
pub const MAX_POINTS: i64 = 5_000;

/// The step for a range when none is asked for.
pub fn default_step(since: i64, until: i64) -> i64 {
    let span = until - since;
    DEFAULT_STEPS
        .iter()
        .copied()
        .find(|s| span / s <= 360)
        .unwrap_or(DEFAULT_STEPS[DEFAULT_STEPS.len() - 1])
}

/// The summary of a range and its series per step, from rollup rows of a resolution that
/// divides `step`.
pub fn report(
    function: Option<&Function>,
    rows: &[Rollup],
    since: i64,
    until: i64,
    step: i64,
    resolution: i64,
) -> Value {
    let series = rollup::series(rows.iter().map(|r| (r.start, &r.stats)), since, until, step);
    let mut total = Stats::default();
    for (_, s) in &series {
        total.merge(s);
    }
    let mut body = total.summary();
    body["function"] =
        json!(function.map(|f| json!({"id": f.id, "name": f.name, "version": f.version})));
    body["since"] = json!(series.first().map_or(since, |(t, _)| *t));
    body["until"] = json!(until);
    body["step_ms"] = json!(step);
    body["resolution_ms"] = json!(resolution);
    body["series"] = rollup::columns(&series);
    body
}

/// The host's load averages, memory and CPU count, from /proc.
pub fn host() -> Value {
    let load: Vec<f64> = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load": load,
        "memory_total_bytes": meminfo_bytes("MemTotal:"),
        "memory_available_bytes": meminfo_bytes("MemAvailable:"),
    })
}

/// The number of a `Key:   123 kB` line of a procfs file's text (`/proc/meminfo`,
/// `/proc/<pid>/status`), without its unit.
pub fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    })
}

/// One `/proc/meminfo` figure in bytes (0 if it cannot be read).
pub fn meminfo_bytes(key: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    proc_field(&meminfo, key).unwrap_or(0) * 1024
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`'s first line.
pub fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Percent of CPU time busy between two `/proc/stat` samples.
pub fn cpu_busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total == 0.0 {
        0.0
    } else {
        100.0 * busy / total
    }
}

/// The server process's own memory and threads, from `/proc/self/status`.
pub fn process() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| proc_field(&status, key);
    json!({
        "pid": std::process::id(),
        "resident_memory_bytes": field("VmRSS:").unwrap_or(0) * 1024,
        "peak_resident_memory_bytes": field("VmHWM:").unwrap_or(0) * 1024,
        "threads": field("Threads:").unwrap_or(0),
        "runtime_threads": tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_busy_from_proc_stat() {
        let a = cpu_jiffies("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, (200, 1000));
        let b = cpu_jiffies("cpu  150 0 150 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(cpu_busy_percent(a, b), 50.0);
        assert_eq!(cpu_busy_percent(a, a), 0.0);
        assert!(cpu_jiffies("intr 1 2").is_none());
    }

    #[test]
    fn default_steps_keep_series_short() {
        assert_eq!(default_step(0, 3_600_000), 60_000);
        assert_eq!(default_step(0, 86_400_000), 300_000);
        assert_eq!(default_step(0, 7 * 86_400_000), 3_600_000);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }
}
