//! `GET /metrics` in the Prometheus text exposition format (version 0.0.4).
//!
//! Invocation counters and duration histograms are read from the all-time per-day rollups,
//! so they match the metrics API exactly and survive restarts; the pool's counters are the
//! process's own and restart at zero, as Prometheus expects of counters. Labels are tenant,
//! function name, outcome and backend only: their number stays bounded by what is deployed.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::pool::PoolStats;
use crate::rollup::{edges, Stats};
use crate::store::Rollup;

/// Histogram bounds in seconds; each is an edge of the rollup histogram, so the counts are
/// exact.
pub const BUCKETS_S: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// What the platform knows beyond the rollups; `None` for a tenant's scrape, which sees
/// only its own functions.
#[derive(Debug, Clone)]
pub struct System {
    pub pool: PoolStats,
    pub queue_depth: u64,
    pub tasks_running: u64,
    pub uptime_s: f64,
    pub resident_memory_bytes: u64,
    pub host_memory_total_bytes: u64,
    pub host_memory_available_bytes: u64,
    /// The store and the disk under it, as this node sees them.
    pub storage: Storage,
    /// This node's id where several share the store: the series of this process (its pool,
    /// memory, uptime) carry it as a `node` label; the queue's are the cluster's.
    pub node: Option<String>,
}

/// The store's figures in the exposition: what health's `storage` says, and how the
/// recorder's group commits go.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    /// Free bytes on the data directory's filesystem.
    pub free_bytes: u64,
    /// Below `--min-free-mb`: new work is refused.
    pub low: bool,
    pub database_bytes: u64,
    pub wal_bytes: u64,
    /// Task records queued to the recorder and not yet committed.
    pub records_pending: u64,
    /// Task records the store refused for now, kept in memory to try again.
    pub records_kept: u64,
    /// Task records given up on.
    pub records_lost: u64,
    /// The recorder's transactions.
    pub commits: u64,
    /// The writes they held.
    pub writes: u64,
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The index of the rollup edge equal to `seconds`.
fn edge_index(seconds: f64) -> usize {
    let ms = seconds * 1000.0;
    edges()
        .iter()
        .position(|e| (e - ms).abs() <= ms * 1e-9)
        .unwrap_or(usize::MAX)
}

/// Renders the exposition from all-time rollup rows (any resolution; per day is cheapest).
pub fn render(rows: &[Rollup], system: Option<&System>) -> String {
    // (tenant, function, outcome) -> stats; a name reused after a delete adds up.
    let mut series: BTreeMap<(String, String, String), Stats> = BTreeMap::new();
    for r in rows {
        series
            .entry((r.tenant.clone(), r.function.clone(), r.outcome.clone()))
            .or_default()
            .merge(&r.stats);
    }
    let mut out = String::new();
    family(
        &mut out,
        "cloudfunc_invocations_total",
        "counter",
        "Finished invocations by function and outcome (succeeded or the error kind).",
    );
    for ((tenant, function, outcome), s) in &series {
        let l = labels(&[
            ("tenant", tenant),
            ("function", function),
            ("outcome", outcome),
        ]);
        let _ = writeln!(out, "cloudfunc_invocations_total{l} {}", s.count);
    }
    family(
        &mut out,
        "cloudfunc_invocation_duration_seconds",
        "histogram",
        "Time in the function of invocations that reached a sandbox.",
    );
    for ((tenant, function, outcome), s) in &series {
        let base = [
            ("tenant", tenant.as_str()),
            ("function", function),
            ("outcome", outcome),
        ];
        for le in BUCKETS_S {
            let top = edge_index(le);
            let n: u64 = s.bins.range(..=top).map(|(_, n)| n).sum();
            let mut l = base.to_vec();
            let le = le.to_string();
            l.push(("le", &le));
            let _ = writeln!(
                out,
                "cloudfunc_invocation_duration_seconds_bucket{} {n}",
                labels(&l)
            );
        }
        let mut l = base.to_vec();
        l.push(("le", "+Inf"));
        let _ = writeln!(
            out,
            "cloudfunc_invocation_duration_seconds_bucket{} {}",
            labels(&l),
            s.timed
        );
        let l = labels(&base);
        let _ = writeln!(
            out,
            "cloudfunc_invocation_duration_seconds_sum{l} {}",
            s.duration_sum / 1000.0
        );
        let _ = writeln!(
            out,
            "cloudfunc_invocation_duration_seconds_count{l} {}",
            s.timed
        );
    }
    let mut cold: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for ((tenant, function, _), s) in &series {
        *cold.entry((tenant, function)).or_default() += s.cold;
    }
    family(
        &mut out,
        "cloudfunc_cold_starts_total",
        "counter",
        "Invocations that waited for a sandbox to start or be bound (cold or pre-warmed).",
    );
    for ((tenant, function), n) in cold {
        let l = labels(&[("tenant", tenant), ("function", function)]);
        let _ = writeln!(out, "cloudfunc_cold_starts_total{l} {n}");
    }
    if let Some(system) = system {
        render_system(&mut out, system);
    }
    out
}

/// The latest anomaly score of each watched series: (tenant, function, series, score), the
/// system's with an empty function.
pub fn render_anomalies(scores: &[(String, String, crate::anomalies::Series, f64)]) -> String {
    let mut out = String::new();
    let (system, functions): (Vec<_>, Vec<_>) = scores.iter().partition(|s| s.1.is_empty());
    family(
        &mut out,
        "cloudfunc_anomaly_score",
        "gauge",
        "The anomaly score (0 to 1) of a function's series in the last minute watched.",
    );
    for (tenant, function, series, score) in functions {
        let l = labels(&[
            ("tenant", tenant),
            ("function", function),
            ("series", series.name()),
        ]);
        let _ = writeln!(out, "cloudfunc_anomaly_score{l} {score}");
    }
    if !system.is_empty() {
        family(
            &mut out,
            "cloudfunc_system_anomaly_score",
            "gauge",
            "The anomaly score (0 to 1) of a system series in the last minute watched.",
        );
        for (_, _, series, score) in system {
            let l = labels(&[("series", series.name())]);
            let _ = writeln!(out, "cloudfunc_system_anomaly_score{l} {score}");
        }
    }
    out
}

fn render_system(out: &mut String, s: &System) {
    // The node's label, after any other.
    let node: Vec<(&str, &str)> = s.node.iter().map(|n| ("node", n.as_str())).collect();
    let of_node = |pairs: &[(&str, &str)]| -> String {
        let all: Vec<(&str, &str)> = pairs.iter().chain(&node).copied().collect();
        if all.is_empty() {
            String::new()
        } else {
            labels(&all)
        }
    };
    let gauge = |out: &mut String, name: &str, help: &str, value: String| {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name}{} {value}", of_node(&[]));
    };
    family(
        out,
        "cloudfunc_queue_depth",
        "gauge",
        "Async tasks waiting in the queue (of the whole cluster).",
    );
    let _ = writeln!(out, "cloudfunc_queue_depth {}", s.queue_depth);
    gauge(
        out,
        "cloudfunc_tasks_running",
        "Tasks running now: the cluster's async tasks and this node's sync calls.",
        s.tasks_running.to_string(),
    );
    family(
        out,
        "cloudfunc_pool_sandboxes",
        "gauge",
        "Sandboxes in the pool by state.",
    );
    for (state, n) in [
        ("idle", s.pool.idle),
        ("busy", s.pool.busy),
        ("prewarmed", s.pool.prewarmed),
    ] {
        let _ = writeln!(
            out,
            "cloudfunc_pool_sandboxes{} {n}",
            of_node(&[("state", state)])
        );
    }
    gauge(
        out,
        "cloudfunc_pool_waiting",
        "Callers waiting for a sandbox.",
        s.pool.waiting.to_string(),
    );
    gauge(
        out,
        "cloudfunc_pool_memory_committed_bytes",
        "Memory promised to the pool's sandboxes by their limits.",
        s.pool.memory_committed_bytes.to_string(),
    );
    family(
        out,
        "cloudfunc_pool_calls_total",
        "counter",
        "Calls served by how their sandbox came to be.",
    );
    for (start, n) in [
        ("cold", s.pool.calls_cold),
        ("prewarmed", s.pool.calls_prewarmed),
        ("warm", s.pool.calls_warm),
    ] {
        let _ = writeln!(
            out,
            "cloudfunc_pool_calls_total{} {n}",
            of_node(&[("start", start)])
        );
    }
    family(
        out,
        "cloudfunc_pool_removed_total",
        "counter",
        "Idle sandboxes removed, by reason.",
    );
    for (reason, n) in [
        ("expired", s.pool.expired),
        ("evicted", s.pool.evicted),
        ("drained", s.pool.drained),
    ] {
        let _ = writeln!(
            out,
            "cloudfunc_pool_removed_total{} {n}",
            of_node(&[("reason", reason)])
        );
    }
    family(
        out,
        "cloudfunc_sandbox_starts_total",
        "counter",
        "Sandboxes started, by backend.",
    );
    for (backend, n) in &s.pool.sandbox_starts {
        let _ = writeln!(
            out,
            "cloudfunc_sandbox_starts_total{} {n}",
            of_node(&[("backend", backend)])
        );
    }
    render_storage(out, &s.storage, &of_node(&[]));
    gauge(
        out,
        "cloudfunc_uptime_seconds",
        "Seconds since the server started.",
        s.uptime_s.to_string(),
    );
    gauge(
        out,
        "cloudfunc_process_resident_memory_bytes",
        "The server's own resident memory.",
        s.resident_memory_bytes.to_string(),
    );
    gauge(
        out,
        "cloudfunc_host_memory_total_bytes",
        "The host's memory.",
        s.host_memory_total_bytes.to_string(),
    );
    gauge(
        out,
        "cloudfunc_host_memory_available_bytes",
        "The host's available memory.",
        s.host_memory_available_bytes.to_string(),
    );
}

/// The store's series, each with the node's `labels` (or none).
fn render_storage(out: &mut String, s: &Storage, labels: &str) {
    let series = [
        (
            "cloudfunc_storage_free_bytes",
            "gauge",
            "Free bytes on the data directory's filesystem.",
            s.free_bytes,
        ),
        (
            "cloudfunc_storage_low",
            "gauge",
            "1 while free space is below --min-free-mb and new work is refused.",
            u64::from(s.low),
        ),
        (
            "cloudfunc_store_database_bytes",
            "gauge",
            "The database's size.",
            s.database_bytes,
        ),
        (
            "cloudfunc_store_wal_bytes",
            "gauge",
            "The database's write-ahead log (0 where there is none).",
            s.wal_bytes,
        ),
        (
            "cloudfunc_store_records_pending",
            "gauge",
            "Task records queued to be stored and not yet committed.",
            s.records_pending,
        ),
        (
            "cloudfunc_store_records_kept",
            "gauge",
            "Task records the store refused for now, kept in memory to try again (health is degraded meanwhile).",
            s.records_kept,
        ),
        (
            "cloudfunc_store_records_lost_total",
            "counter",
            "Task records given up on (each is in the log).",
            s.records_lost,
        ),
        (
            "cloudfunc_store_commits_total",
            "counter",
            "Transactions of the task recorder (group commits).",
            s.commits,
        ),
        (
            "cloudfunc_store_writes_total",
            "counter",
            "Task writes those transactions held.",
            s.writes,
        ),
    ];
    for (name, kind, help, value) in series {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::Call;

    fn row(tenant: &str, function: &str, outcome: &str, durations: &[f64]) -> Rollup {
        let mut stats = Stats::default();
        for ms in durations {
            stats.add(&Call {
                outcome: outcome.into(),
                at: 0,
                timed: true,
                cold: *ms > 100.0,
                duration_ms: *ms,
                init_ms: 0.0,
                cpu_ms: 0.0,
                peak_memory_bytes: 0,
            });
        }
        Rollup {
            start: 0,
            tenant: tenant.into(),
            function: function.into(),
            function_id: format!("fn_{function}"),
            outcome: outcome.into(),
            stats,
        }
    }

    #[test]
    fn buckets_are_cumulative_and_exact_at_their_bounds() {
        assert!(BUCKETS_S.iter().all(|b| edge_index(*b) != usize::MAX));
        let text = render(
            &[row("t", "f", "succeeded", &[0.5, 5.0, 5.0001, 250.0])],
            None,
        );
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} in {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_string()
        };
        let b = "cloudfunc_invocation_duration_seconds_bucket{tenant=\"t\",function=\"f\",outcome=\"succeeded\",le=";
        assert_eq!(line(&format!("{b}\"0.0005\"}}")), "1");
        assert_eq!(
            line(&format!("{b}\"0.005\"}}")),
            "2",
            "5 ms is within le=0.005"
        );
        assert_eq!(line(&format!("{b}\"0.25\"}}")), "4");
        assert_eq!(line(&format!("{b}\"+Inf\"}}")), "4");
        assert_eq!(
            line("cloudfunc_cold_starts_total{tenant=\"t\",function=\"f\"}"),
            "1"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&[row("t", "a\"b\\c", "succeeded", &[1.0])], None);
        assert!(text.contains("function=\"a\\\"b\\\\c\""), "{text}");
    }

    #[test]
    fn a_node_labels_its_own_series_and_not_the_queue() {
        let system = |node: Option<&str>| System {
            pool: PoolStats::default(),
            queue_depth: 7,
            tasks_running: 1,
            uptime_s: 2.0,
            resident_memory_bytes: 3,
            host_memory_total_bytes: 4,
            host_memory_available_bytes: 5,
            storage: Storage {
                records_kept: 2,
                commits: 9,
                low: true,
                ..Storage::default()
            },
            node: node.map(String::from),
        };
        let text = render(&[], Some(&system(Some("n1"))));
        assert!(text.contains("cloudfunc_queue_depth 7\n"), "{text}");
        assert!(
            text.contains("cloudfunc_uptime_seconds{node=\"n1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cloudfunc_pool_calls_total{start=\"warm\",node=\"n1\"} 0"),
            "{text}"
        );
        for line in [
            "cloudfunc_store_records_kept{node=\"n1\"} 2\n",
            "cloudfunc_store_commits_total{node=\"n1\"} 9\n",
            "cloudfunc_storage_low{node=\"n1\"} 1\n",
            "# TYPE cloudfunc_store_writes_total counter\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        let alone = render(&[], Some(&system(None)));
        assert!(alone.contains("cloudfunc_uptime_seconds 2\n"), "{alone}");
        assert!(!alone.contains("node="), "{alone}");
    }
}
