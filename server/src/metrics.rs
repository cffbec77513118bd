//! Summaries of finished calls, and the host's load and memory.

use serde_json::{json, Value};

use crate::model::{Function, TaskStatus};
use crate::store::CallRow;

/// The `p`th percentile (nearest rank) of sorted values; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // p is within [0, 100], so the rank is within [0, len - 1]: nothing to truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Counts, error rate, duration percentiles, CPU and memory of `calls`.
pub fn summarise(function: Option<&Function>, calls: &[CallRow], since: i64, until: i64) -> Value {
    let n = calls.len();
    let errors = calls
        .iter()
        .filter(|c| c.status != TaskStatus::Succeeded)
        .count();
    let mut by_kind = std::collections::BTreeMap::<String, u64>::new();
    for c in calls.iter().filter(|c| c.status != TaskStatus::Succeeded) {
        *by_kind
            .entry(
                c.error_kind
                    .clone()
                    .unwrap_or_else(|| c.status.as_str().to_string()),
            )
            .or_default() += 1;
    }
    let mut durations: Vec<f64> = calls.iter().map(|c| c.duration_ms).collect();
    durations.sort_by(f64::total_cmp);
    let avg = |f: &dyn Fn(&CallRow) -> f64| {
        if n == 0 {
            0.0
        } else {
            calls.iter().map(f).sum::<f64>() / n as f64
        }
    };
    let max = |f: &dyn Fn(&CallRow) -> f64| calls.iter().map(f).fold(0.0, f64::max);
    json!({
        "function": function.map(|f| json!({"id": f.id, "name": f.name, "version": f.version})),
        "since": since,
        "until": until,
        "invocations": n,
        "succeeded": n - errors,
        "errors": errors,
        "error_rate": if n == 0 { 0.0 } else { errors as f64 / n as f64 },
        "errors_by_kind": by_kind,
        "cold_starts": calls.iter().filter(|c| c.cold).count(),
        "duration_ms": {
            "avg": avg(&|c| c.duration_ms),
            "p50": percentile(&durations, 50.0),
            "p95": percentile(&durations, 95.0),
            "p99": percentile(&durations, 99.0),
            "max": durations.last().copied().unwrap_or(0.0),
        },
        "cpu_ms": {"avg": avg(&|c| c.cpu_ms), "max": max(&|c| c.cpu_ms)},
        "peak_memory_bytes": {"avg": avg(&|c| c.peak_memory_bytes as f64), "max": max(&|c| c.peak_memory_bytes as f64)},
    })
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

/// One `/proc/meminfo` figure in bytes (0 if it cannot be read).
pub fn meminfo_bytes(key: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: TaskStatus, ms: f64) -> CallRow {
        CallRow {
            status,
            error_kind: None,
            finished_at: 0,
            duration_ms: ms,
            cpu_ms: ms / 2.0,
            peak_memory_bytes: 100,
            cold: false,
        }
    }

    #[test]
    fn percentiles_and_error_rate() {
        let mut calls: Vec<CallRow> = (1..=100)
            .map(|i| row(TaskStatus::Succeeded, i as f64))
            .collect();
        calls[0].status = TaskStatus::Timeout;
        let s = summarise(None, &calls, 0, 1);
        assert_eq!(s["invocations"], 100);
        assert_eq!(s["errors"], 1);
        assert_eq!(s["errors_by_kind"]["timeout"], 1);
        assert_eq!(s["duration_ms"]["p50"], 51.0);
        assert_eq!(s["duration_ms"]["p99"], 99.0);
        assert_eq!(s["duration_ms"]["max"], 100.0);
        let empty = summarise(None, &[], 0, 1);
        assert_eq!(empty["error_rate"], 0.0);
    }
}
