//! Rollups: what the calls of one function cost per minute, hour and day, kept as mergeable
//! sums, maxima and a fixed duration histogram so that any range and step can be answered
//! from a few rows, and percentiles come from the histogram rather than from raw records.
//!
//! The store adds every finished call to its three rollups in the transaction that records
//! it; this module holds the arithmetic, free of SQL, so it can be checked against raw calls.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One minute, one hour, one day, in milliseconds: the resolutions rollups are kept at.
pub const RESOLUTIONS: [i64; 3] = [60_000, 3_600_000, 86_400_000];

/// Mantissas of the histogram's bin edges within each decade. They include 1, 2.5 and 5, so
/// the usual Prometheus bucket bounds are edges; neighbours are at most 1.2× apart.
const MANTISSAS: [f64; 18] = [
    1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.2, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0,
];
/// Edges run from 1 µs (10^-3 ms) to 9000 s.
const FIRST_DECADE: i32 = -3;
const DECADES: i32 = 10;

/// The histogram's bin edges in milliseconds, ascending.
pub fn edges() -> &'static [f64] {
    static EDGES: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    EDGES.get_or_init(|| {
        (FIRST_DECADE..FIRST_DECADE + DECADES)
            .flat_map(|k| {
                MANTISSAS
                    .iter()
                    .map(move |m| format!("{m}e{k}").parse::<f64>().unwrap_or(f64::MAX))
            })
            .collect()
    })
}

/// The bin of a duration: bin `i` holds values in `(edges[i-1], edges[i]]`, bin 0 everything
/// up to the first edge and the last bin everything above the last edge (upper bounds are
/// inclusive, as Prometheus's `le` is).
pub fn bin(ms: f64) -> usize {
    edges().partition_point(|e| *e < ms)
}

/// The lower and upper bounds of bin `i` (`None` above for the last, open bin).
pub fn bin_bounds(i: usize) -> (f64, Option<f64>) {
    let e = edges();
    let lo = if i == 0 {
        0.0
    } else {
        e[(i - 1).min(e.len() - 1)]
    };
    (lo, e.get(i).copied())
}

/// One finished call, as rollups see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `succeeded`, or the kind of error (`raised`, `timeout`, `throttled`, ...).
    pub outcome: String,
    /// When it finished, Unix milliseconds.
    pub at: i64,
    /// Whether it ran in a sandbox and so has a duration, CPU time and memory.
    pub timed: bool,
    pub cold: bool,
    pub duration_ms: f64,
    pub init_ms: f64,
    pub cpu_ms: f64,
    pub peak_memory_bytes: u64,
}

/// Mergeable figures of a set of calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub count: u64,
    /// Calls with usage (those that reached a sandbox).
    pub timed: u64,
    pub cold: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub duration_sum: f64,
    pub duration_max: f64,
    pub init_sum: f64,
    pub cpu_sum: f64,
    pub cpu_max: f64,
    pub memory_sum: f64,
    pub memory_max: u64,
    /// Calls per duration bin (see [`bin`]); timed calls only.
    pub bins: BTreeMap<usize, u64>,
}

impl Stats {
    /// Adds one call.
    pub fn add(&mut self, call: &Call) {
        self.count += 1;
        if call.outcome != "succeeded" {
            *self.errors_by_kind.entry(call.outcome.clone()).or_default() += 1;
        }
        if !call.timed {
            return;
        }
        self.timed += 1;
        self.cold += u64::from(call.cold);
        self.duration_sum += call.duration_ms;
        self.duration_max = self.duration_max.max(call.duration_ms);
        self.init_sum += call.init_ms;
        self.cpu_sum += call.cpu_ms;
        self.cpu_max = self.cpu_max.max(call.cpu_ms);
        self.memory_sum += call.peak_memory_bytes as f64;
        self.memory_max = self.memory_max.max(call.peak_memory_bytes);
        *self.bins.entry(bin(call.duration_ms)).or_default() += 1;
    }

    /// Adds everything in `other`.
    pub fn merge(&mut self, other: &Stats) {
        self.count += other.count;
        self.timed += other.timed;
        self.cold += other.cold;
        for (k, n) in &other.errors_by_kind {
            *self.errors_by_kind.entry(k.clone()).or_default() += n;
        }
        self.duration_sum += other.duration_sum;
        self.duration_max = self.duration_max.max(other.duration_max);
        self.init_sum += other.init_sum;
        self.cpu_sum += other.cpu_sum;
        self.cpu_max = self.cpu_max.max(other.cpu_max);
        self.memory_sum += other.memory_sum;
        self.memory_max = self.memory_max.max(other.memory_max);
        for (b, n) in &other.bins {
            *self.bins.entry(*b).or_default() += n;
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors_by_kind.values().sum()
    }

    /// The bin holding the `p`th percentile (nearest rank over timed calls).
    pub fn percentile_bin(&self, p: f64) -> Option<usize> {
        let rank = nearest_rank(self.timed, p)?;
        let mut seen = 0;
        self.bins.iter().find_map(|(b, n)| {
            seen += n;
            (seen > rank).then_some(*b)
        })
    }

    /// The `p`th percentile of durations, interpolated within its bin: off from the exact
    /// nearest-rank value by less than the bin's width (at most 20 %). 0 without calls.
    pub fn percentile(&self, p: f64) -> f64 {
        let Some(rank) = nearest_rank(self.timed, p) else {
            return 0.0;
        };
        let mut before = 0;
        for (b, n) in &self.bins {
            if before + n > rank {
                let (lo, hi) = bin_bounds(*b);
                let hi = hi.unwrap_or(self.duration_max).min(self.duration_max);
                let within = (rank - before + 1) as f64;
                return (lo + (hi - lo) * within / *n as f64).min(self.duration_max);
            }
            before += n;
        }
        self.duration_max
    }

    fn avg(&self, sum: f64) -> f64 {
        if self.timed == 0 {
            0.0
        } else {
            sum / self.timed as f64
        }
    }

    /// The summary the metrics routes return.
    pub fn summary(&self) -> Value {
        let errors = self.errors();
        json!({
            "invocations": self.count,
            "succeeded": self.count - errors,
            "errors": errors,
            "error_rate": if self.count == 0 { 0.0 } else { errors as f64 / self.count as f64 },
            "errors_by_kind": self.errors_by_kind,
            "cold_starts": self.cold,
            "warm_starts": self.timed - self.cold,
            "duration_ms": {
                "avg": self.avg(self.duration_sum),
                "p50": self.percentile(50.0),
                "p95": self.percentile(95.0),
                "p99": self.percentile(99.0),
                "max": self.duration_max,
            },
            "init_duration_ms": {"avg_cold": if self.cold == 0 { 0.0 } else { self.init_sum / self.cold as f64 }},
            "cpu_ms": {"avg": self.avg(self.cpu_sum), "max": self.cpu_max},
            "peak_memory_bytes": {"avg": self.avg(self.memory_sum), "max": self.memory_max},
        })
    }
}

/// The 0-based nearest rank of the `p`th percentile among `n` values.
pub fn nearest_rank(n: u64, p: f64) -> Option<u64> {
    if n == 0 {
        return None;
    }
    // p is clamped to [0, 100], so the rank is within [0, n - 1]: nothing to truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64).round() as u64;
    Some(rank.min(n - 1))
}

/// The start of the bucket of `resolution` (or step) that holds `at`.
pub fn bucket_start(at: i64, width: i64) -> i64 {
    at.div_euclid(width) * width
}

/// The resolution to read for a step: the coarsest one that divides it.
pub fn resolution_for(step_ms: i64) -> Option<i64> {
    RESOLUTIONS.iter().rev().copied().find(|r| step_ms % r == 0)
}

/// Stats per step from rows `(start, stats)` of a resolution dividing `step`, for the steps
/// covering `[since, until)`: `since` is aligned down to a step, empty steps are zero.
pub fn series<'a>(
    rows: impl IntoIterator<Item = (i64, &'a Stats)>,
    since: i64,
    until: i64,
    step: i64,
) -> Vec<(i64, Stats)> {
    let first = bucket_start(since, step);
    let mut out: Vec<(i64, Stats)> = (0..)
        .map(|i| first + i * step)
        .take_while(|t| *t < until)
        .map(|t| (t, Stats::default()))
        .collect();
    for (start, stats) in rows {
        let index = (bucket_start(start, step) - first) / step;
        if let Some((_, s)) = usize::try_from(index).ok().and_then(|i| out.get_mut(i)) {
            s.merge(stats);
        }
    }
    out
}

/// Series as columns ready to plot: one array per figure, aligned with `t`.
pub fn columns(series: &[(i64, Stats)]) -> Value {
    let col =
        |f: &dyn Fn(&Stats) -> Value| Value::Array(series.iter().map(|(_, s)| f(s)).collect());
    json!({
        "t": series.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        "invocations": col(&|s| json!(s.count)),
        "errors": col(&|s| json!(s.errors())),
        "error_rate": col(&|s| json!(if s.count == 0 { 0.0 } else { s.errors() as f64 / s.count as f64 })),
        "cold": col(&|s| json!(s.cold)),
        "warm": col(&|s| json!(s.timed - s.cold)),
        "duration_avg_ms": col(&|s| json!(s.avg(s.duration_sum))),
        "duration_p50_ms": col(&|s| json!(s.percentile(50.0))),
        "duration_p95_ms": col(&|s| json!(s.percentile(95.0))),
        "duration_p99_ms": col(&|s| json!(s.percentile(99.0))),
        "duration_max_ms": col(&|s| json!(s.duration_max)),
        "cpu_avg_ms": col(&|s| json!(s.avg(s.cpu_sum))),
        "cpu_max_ms": col(&|s| json!(s.cpu_max)),
        "memory_avg_bytes": col(&|s| json!(s.avg(s.memory_sum))),
        "memory_max_bytes": col(&|s| json!(s.memory_max)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(outcome: &str, at: i64, ms: f64) -> Call {
        Call {
            outcome: outcome.into(),
            at,
            timed: true,
            cold: false,
            duration_ms: ms,
            init_ms: 0.0,
            cpu_ms: ms / 2.0,
            peak_memory_bytes: 100,
        }
    }

    #[test]
    fn bins_are_upper_inclusive_and_cover_prometheus_bounds() {
        let e = edges();
        assert_eq!(e.len(), 10 * 18);
        assert!(e
            .windows(2)
            .all(|w| w[1] > w[0] && w[1] / w[0] <= 1.2 + 1e-9));
        for le_s in [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ] {
            let ms: f64 = le_s * 1000.0;
            assert!(e.iter().any(|x| (x - ms).abs() <= ms * 1e-12), "{le_s}");
        }
        assert_eq!(bin(0.0), 0);
        assert_eq!(bin(0.001), 0);
        assert_eq!(bin(0.0010001), 1);
        assert_eq!(bin(5.0), bin(4.6));
        assert_eq!(bin(5.0) + 1, bin(5.0001));
        assert_eq!(bin(1e9), e.len());
        assert_eq!(bin_bounds(e.len()), (9e6, None));
    }

    #[test]
    fn percentiles_land_in_the_exact_values_bin() {
        let mut s = Stats::default();
        for i in 1..=100 {
            s.add(&call("succeeded", 0, f64::from(i)));
        }
        assert_eq!(s.percentile_bin(50.0), Some(bin(51.0)));
        let p50 = s.percentile(50.0);
        assert!((50.0..=60.0).contains(&p50), "{p50}");
        assert_eq!(s.percentile(100.0), 100.0);
        assert_eq!(Stats::default().percentile(50.0), 0.0);
    }

    #[test]
    fn untimed_calls_count_but_have_no_duration() {
        let mut s = Stats::default();
        s.add(&Call {
            timed: false,
            ..call("throttled", 0, 0.0)
        });
        s.add(&call("succeeded", 0, 3.0));
        let j = s.summary();
        assert_eq!(j["invocations"], 2);
        assert_eq!(j["errors_by_kind"]["throttled"], 1);
        assert_eq!(j["duration_ms"]["avg"], 3.0);
    }

    #[test]
    fn series_align_to_the_step_and_fill_gaps() {
        let mut a = Stats::default();
        a.add(&call("succeeded", 0, 1.0));
        let s = series(
            [(60_000, &a), (180_000, &a), (240_000, &a)],
            61_000,
            300_000,
            120_000,
        );
        assert_eq!(
            s.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [0, 120_000, 240_000]
        );
        assert_eq!(
            s.iter().map(|(_, x)| x.count).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert_eq!(resolution_for(120_000), Some(60_000));
        assert_eq!(resolution_for(7_200_000), Some(3_600_000));
        assert_eq!(resolution_for(172_800_000), Some(86_400_000));
        assert_eq!(resolution_for(90_000), None);
    }
}
