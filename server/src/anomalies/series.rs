//! The series watched: five per function, two for the whole system, each one point per
//! minute, taken from the minute rollups as each minute closes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollup::Stats;
use crate::store::Rollup;

/// One watched series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    /// A function's calls in the minute (0 when it had none).
    Invocations,
    /// The share of its calls that failed (minutes with calls only).
    ErrorRate,
    /// The 95th percentile of its calls' durations, ms (minutes with timed calls only).
    DurationP95,
    /// The share of its timed calls that were cold starts.
    ColdRatio,
    /// The highest peak memory of its calls, bytes.
    PeakMemory,
    /// Every function's calls in the minute, together.
    Calls,
    /// Tasks waiting in the queue as the minute closed.
    QueueDepth,
}

impl Series {
    /// A function's series.
    pub const FUNCTION: [Series; 5] = [
        Series::Invocations,
        Series::ErrorRate,
        Series::DurationP95,
        Series::ColdRatio,
        Series::PeakMemory,
    ];
    /// The system's series.
    pub const SYSTEM: [Series; 2] = [Series::Calls, Series::QueueDepth];

    /// Its name in the API and in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Series::Invocations => "invocations",
            Series::ErrorRate => "error_rate",
            Series::DurationP95 => "duration_p95",
            Series::ColdRatio => "cold_ratio",
            Series::PeakMemory => "peak_memory",
            Series::Calls => "calls",
            Series::QueueDepth => "queue_depth",
        }
    }

    /// The series named `name`.
    pub fn parse(name: &str) -> Option<Series> {
        Series::FUNCTION
            .into_iter()
            .chain(Series::SYSTEM)
            .find(|s| s.name() == name)
    }

    /// Whether a move from the usual level `usual` to `value` is big enough to matter to
    /// anyone, however rare: a share (error rate, cold starts) must move by 5 points, a
    /// duration by half its usual level, any other series by a tenth of it (at least 0.1).
    /// A series that never moved makes any move rare; a 6 % change in peak memory is still
    /// not an anomaly. A p95 taken from a few calls a minute is close to their slowest, so a
    /// busy host moves it by a quarter for minutes at a time (10.5 to 13.6 ms for two
    /// minutes, measured in CI): latency must move by more than the host's noise.
    pub fn is_material(self, usual: f64, value: f64) -> bool {
        let moved = (value - usual).abs();
        match self {
            Series::ErrorRate | Series::ColdRatio => moved >= 0.05,
            Series::DurationP95 => moved >= 0.5 * usual.abs().max(1.0),
            _ => moved >= 0.1 * usual.abs().max(1.0),
        }
    }

    /// Whether a minute without a point is a 0 (a count), rather than a minute with nothing
    /// to say (a rate or a duration of no calls).
    pub fn idle_is_zero(self) -> bool {
        matches!(self, Series::Invocations | Series::Calls)
    }
}

/// What one function did in one minute: its rows (one per outcome) merged.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionMinute {
    pub tenant: String,
    pub function: String,
    pub stats: Stats,
}

/// The minute rollup rows of one minute, by function id.
pub fn by_function(rows: &[Rollup]) -> BTreeMap<String, FunctionMinute> {
    let mut out: BTreeMap<String, FunctionMinute> = BTreeMap::new();
    for r in rows {
        let m = out
            .entry(r.function_id.clone())
            .or_insert_with(|| FunctionMinute {
                tenant: r.tenant.clone(),
                function: r.function.clone(),
                stats: Stats::default(),
            });
        m.stats.merge(&r.stats);
    }
    out
}

/// A function's points for a minute with these calls.
pub fn function_points(stats: &Stats) -> Vec<(Series, f64)> {
    let mut points = vec![(Series::Invocations, stats.count as f64)];
    if stats.count > 0 {
        points.push((
            Series::ErrorRate,
            stats.errors() as f64 / stats.count as f64,
        ));
    }
    if stats.timed > 0 {
        points.push((Series::DurationP95, stats.percentile(95.0)));
        points.push((Series::ColdRatio, stats.cold as f64 / stats.timed as f64));
        points.push((Series::PeakMemory, stats.memory_max as f64));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::Call;

    fn call(outcome: &str, timed: bool, cold: bool, ms: f64, memory: u64) -> Call {
        Call {
            outcome: outcome.into(),
            at: 0,
            timed,
            cold,
            duration_ms: ms,
            init_ms: 0.0,
            cpu_ms: 0.0,
            peak_memory_bytes: memory,
        }
    }

    #[test]
    fn a_minute_of_calls_becomes_its_points() {
        let mut ok = Stats::default();
        for i in 0..19 {
            ok.add(&call("succeeded", true, i == 0, 10.0, 1 << 20));
        }
        let mut failed = Stats::default();
        failed.add(&call("raised", true, false, 100.0, 2 << 20));
        failed.add(&call("throttled", false, false, 0.0, 0));
        let row = |outcome: &str, stats: Stats| Rollup {
            start: 0,
            tenant: "t".into(),
            function_id: "f1".into(),
            function: "f".into(),
            outcome: outcome.into(),
            stats,
        };
        let merged = by_function(&[row("succeeded", ok), row("failed", failed)]);
        let points: BTreeMap<Series, f64> =
            function_points(&merged["f1"].stats).into_iter().collect();
        assert_eq!(points[&Series::Invocations], 21.0);
        assert!((points[&Series::ErrorRate] - 2.0 / 21.0).abs() < 1e-12);
        assert!((points[&Series::ColdRatio] - 1.0 / 20.0).abs() < 1e-12);
        assert_eq!(points[&Series::PeakMemory], f64::from(2u32 << 20));
        // 20 timed calls, one slow: by nearest rank the 95th percentile is the 19th, 10 ms.
        assert!(
            (9.0..=10.0).contains(&points[&Series::DurationP95]),
            "{points:?}"
        );
        assert_eq!(
            function_points(&Stats::default()),
            vec![(Series::Invocations, 0.0)]
        );
    }

    #[test]
    fn small_moves_are_not_material() {
        assert!(!Series::PeakMemory.is_material(3_706_880.0, 3_461_120.0));
        assert!(Series::PeakMemory.is_material(3_706_880.0, 5e6));
        assert!(Series::DurationP95.is_material(3.5, 61.0));
        assert!(!Series::DurationP95.is_material(3.5, 3.7));
        assert!(!Series::DurationP95.is_material(10.5, 13.6));
        assert!(Series::DurationP95.is_material(10.5, 16.0));
        assert!(Series::DurationP95.is_material(10.5, 5.0));
        assert!(Series::ErrorRate.is_material(0.0, 0.5));
        assert!(!Series::ErrorRate.is_material(0.0, 0.01));
        assert!(Series::Invocations.is_material(2.0, 0.0));
        assert!(Series::QueueDepth.is_material(0.0, 3.0));
    }

    #[test]
    fn names_round_trip() {
        for s in Series::FUNCTION.into_iter().chain(Series::SYSTEM) {
            assert_eq!(Series::parse(s.name()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert_eq!(Series::parse("latency"), None);
    }
}
