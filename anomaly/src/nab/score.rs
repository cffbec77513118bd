//! NAB's scorer, ported: each labelled window rewards its earliest detection on a scaled
//! sigmoid, detections outside windows cost by their distance past the last window, the
//! first 15 % of each file (at most 750 rows) is a probation where nothing counts, one
//! threshold is chosen for the whole corpus by sweeping every score, and the total is
//! normalised so that the null detector scores 0 and the perfect one 100.

use std::collections::HashMap;

/// A profile's weights (NAB's cost matrices).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// What a detected window is worth, at its best.
    pub tp: f64,
    /// What a missed window costs.
    pub fn_: f64,
    /// What a detection outside every window costs, at its worst.
    pub fp: f64,
}

impl Profile {
    /// NAB's three profiles, by name.
    pub const ALL: [(&'static str, Profile); 3] = [
        (
            "standard",
            Profile {
                tp: 1.0,
                fn_: 1.0,
                fp: 0.11,
            },
        ),
        (
            "reward_low_FP_rate",
            Profile {
                tp: 1.0,
                fn_: 1.0,
                fp: 0.22,
            },
        ),
        (
            "reward_low_FN_rate",
            Profile {
                tp: 1.0,
                fn_: 2.0,
                fp: 0.11,
            },
        ),
    ];
}

/// One data file's scores: a row per point, in order, and its labelled windows as row
/// indices (first and last row inside, inclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct FileScores {
    /// Its name (NAB's `category/file.csv`).
    pub name: String,
    /// The detector's score of each row.
    pub scores: Vec<f64>,
    /// The windows, as (first, last) row indices, in order.
    pub windows: Vec<(usize, usize)>,
}

/// NAB's sigmoid of a position relative to a window: about 1 at a window's start, 0 at its
/// end, falling to -1 past it.
pub fn scaled_sigmoid(position: f64) -> f64 {
    if position > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * position).exp()) - 1.0
    }
}

/// Rows not scored at the start of a file of `rows` rows.
pub fn probation(rows: usize) -> usize {
    let fifteen_percent = (0.15 * rows as f64).floor();
    // Both are whole numbers in range: the cast is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rows = fifteen_percent.min(0.15 * 5000.0) as usize;
    rows
}

/// A row as the sweep sees it: its score, what detecting it is worth, and its window.
#[derive(Debug, Clone, Copy)]
struct Row {
    score: f64,
    worth: f64,
    /// Index of its window in the corpus, `None` outside every window.
    window: Option<usize>,
}

/// The rows of `file` outside its probation, with what each is worth under `profile`;
/// windows are numbered from `first_window`.
fn rows(file: &FileScores, profile: Profile, first_window: usize) -> Vec<Row> {
    let max_tp = scaled_sigmoid(-1.0);
    let probation = probation(file.scores.len());
    let mut out = Vec::with_capacity(file.scores.len());
    let mut windows = file.windows.iter().enumerate().peekable();
    let mut current: Option<(usize, usize, usize)> = None; // (number, left, right)
    let mut previous: Option<(usize, f64)> = None; // (right, width)
    for (i, &score) in file.scores.iter().enumerate() {
        if current.is_none() {
            if let Some(&(n, &(left, right))) = windows.peek() {
                if left == i {
                    current = Some((n, left, right));
                    windows.next();
                }
            }
        }
        let (worth, window) = match current {
            Some((n, left, right)) => {
                let width = (right - left + 1) as f64;
                let position = -((right as f64) - (i as f64) + 1.0) / width;
                (
                    scaled_sigmoid(position) * profile.tp / max_tp,
                    Some(first_window + n),
                )
            }
            None => {
                let unweighted = match previous {
                    None => -1.0,
                    Some((right, width)) => {
                        scaled_sigmoid((right as f64 - i as f64).abs() / (width - 1.0))
                    }
                };
                (unweighted * profile.fp, None)
            }
        };
        if i >= probation {
            out.push(Row {
                score,
                worth,
                window,
            });
        }
        if let Some((_, left, right)) = current {
            if i == right {
                previous = Some((right, (right - left + 1) as f64));
                current = None;
            }
        }
    }
    out
}

/// The corpus's score at its best threshold, under one profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sweep {
    /// The threshold: scores at or above it are detections.
    pub threshold: f64,
    /// The raw score there.
    pub raw: f64,
    /// What the null detector scores (every window missed).
    pub null: f64,
    /// What a perfect detector scores (every window at its start, nothing else).
    pub perfect: f64,
    /// 100 × (raw − null) / (perfect − null).
    pub normalized: f64,
    /// True and false positives there (rows).
    pub true_positives: u64,
    pub false_positives: u64,
}

/// Sweeps every threshold over the whole corpus and returns the best, as NAB does: one
/// threshold for all files.
pub fn sweep(files: &[FileScores], profile: Profile) -> Sweep {
    let mut all = Vec::new();
    let mut windows = 0;
    let mut scored_windows = Vec::new();
    for f in files {
        let rows = rows(f, profile, windows);
        for r in &rows {
            if let Some(w) = r.window {
                scored_windows.push(w);
            }
        }
        windows += f.windows.len();
        all.extend(rows);
    }
    scored_windows.sort_unstable();
    scored_windows.dedup();
    // Windows whose rows all fell in the probation count for nothing, as in NAB.
    let mut best_by_window: HashMap<usize, f64> =
        scored_windows.iter().map(|w| (*w, -profile.fn_)).collect();
    let counted = best_by_window.len() as f64;
    let null = -profile.fn_ * counted;
    let perfect = profile.tp * counted;
    all.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut tp_total: f64 = best_by_window.values().sum();
    let mut fp_total = 0.0;
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best = Sweep {
        threshold: f64::INFINITY,
        raw: tp_total,
        null,
        perfect,
        normalized: 0.0,
        true_positives: 0,
        false_positives: 0,
    };
    let mut i = 0;
    while i < all.len() {
        let threshold = all[i].score;
        while i < all.len() && all[i].score == threshold {
            let r = all[i];
            match r.window {
                None => {
                    fp += 1;
                    fp_total += r.worth;
                }
                Some(w) => {
                    tp += 1;
                    let best_here = best_by_window.get_mut(&w).expect("every window is known");
                    if r.worth > *best_here {
                        tp_total += r.worth - *best_here;
                        *best_here = r.worth;
                    }
                }
            }
            i += 1;
        }
        let raw = tp_total + fp_total;
        if raw > best.raw {
            best = Sweep {
                threshold,
                raw,
                true_positives: tp,
                false_positives: fp,
                ..best
            };
        }
    }
    best.normalized = if perfect > null {
        100.0 * (best.raw - null) / (perfect - null)
    } else {
        0.0
    };
    best
}

/// How one file fares at a given threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDetail {
    /// Its raw score (its windows and false positives).
    pub raw: f64,
    /// Windows detected, of how many counted.
    pub detected: usize,
    pub windows: usize,
    /// Detections outside every window.
    pub false_positives: usize,
    /// For each counted window, the row of its first detection (None: missed).
    pub first_detections: Vec<Option<usize>>,
}

/// Each file's part of the corpus's score at `threshold`.
pub fn details(files: &[FileScores], profile: Profile, threshold: f64) -> Vec<FileDetail> {
    files
        .iter()
        .map(|f| {
            let probation = probation(f.scores.len());
            let rows = rows(f, profile, 0);
            let mut best: HashMap<usize, f64> = rows
                .iter()
                .filter_map(|r| r.window)
                .map(|w| (w, -profile.fn_))
                .collect();
            let windows = best.len();
            let mut first: HashMap<usize, usize> = HashMap::new();
            let mut fp_total = 0.0;
            let mut false_positives = 0;
            for (i, r) in rows.iter().enumerate() {
                if r.score < threshold {
                    continue;
                }
                match r.window {
                    None => {
                        false_positives += 1;
                        fp_total += r.worth;
                    }
                    Some(w) => {
                        first.entry(w).or_insert(i + probation);
                        let b = best.get_mut(&w).expect("known window");
                        *b = b.max(r.worth);
                    }
                }
            }
            let mut counted: Vec<usize> = best.keys().copied().collect();
            counted.sort_unstable();
            FileDetail {
                raw: best.values().sum::<f64>() + fp_total,
                detected: first.len(),
                windows,
                false_positives,
                first_detections: counted.iter().map(|w| first.get(w).copied()).collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANDARD: Profile = Profile::ALL[0].1;

    fn file(scores: Vec<f64>, windows: Vec<(usize, usize)>) -> FileScores {
        FileScores {
            name: "t".into(),
            scores,
            windows,
        }
    }

    #[test]
    fn the_sigmoid_rewards_early_and_punishes_late() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298).abs() < 1e-6);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!((scaled_sigmoid(1.0) + 0.986_614_298).abs() < 1e-6);
        assert_eq!(scaled_sigmoid(3.5), -1.0);
        assert_eq!(probation(100), 15);
        assert_eq!(probation(100_000), 750);
    }

    #[test]
    fn a_detection_at_a_window_s_start_is_perfect_and_nothing_is_null() {
        // 100 rows: probation is the first 15; one window at rows 40..=49.
        let mut scores = vec![0.0; 100];
        scores[40] = 1.0;
        let s = sweep(&[file(scores, vec![(40, 49)])], STANDARD);
        assert!((s.raw - 1.0).abs() < 1e-9, "{s:?}");
        assert!((s.normalized - 100.0).abs() < 1e-9);
        assert_eq!((s.true_positives, s.false_positives), (1, 0));
        let none = sweep(&[file(vec![0.0; 100], vec![(40, 49)])], STANDARD);
        assert_eq!(none.normalized, 0.0);
        assert_eq!(none.raw, -1.0);
    }

    #[test]
    fn hand_computed_cases() {
        // A detection in the middle of a 10-row window (rows 40..=49), at row 45: position
        // -(49 - 45 + 1) / 10 = -0.5, worth (2 / (1 + e^-2.5) - 1) / scaled_sigmoid(-1).
        let tp = (2.0 / (1.0 + (-2.5f64).exp()) - 1.0) / scaled_sigmoid(-1.0);
        // A false positive before any window costs the whole fp weight; one 5 rows past the
        // window's end costs fp × (2 / (1 + e^(5 × 5/9)) - 1).
        let late = 2.0 / (1.0 + (25.0f64 / 9.0).exp()) - 1.0;
        let mut scores = vec![0.0; 100];
        scores[45] = 0.9;
        scores[20] = 0.8;
        scores[54] = 0.7;
        let files = [file(scores, vec![(40, 49)])];
        // The best threshold takes the window alone: the other two only cost.
        let s = sweep(&files, STANDARD);
        assert_eq!(s.threshold, 0.9);
        assert!((s.raw - tp).abs() < 1e-9, "{} vs {tp}", s.raw);
        // When false positives cost nothing, the sweep goes down to flagging every row, and
        // the window's first row makes it perfect.
        let mut scores = vec![0.0; 100];
        scores[45] = 0.9;
        scores[54] = 0.95;
        let s = sweep(
            &[file(scores, vec![(40, 49)])],
            Profile {
                fp: 0.0,
                ..STANDARD
            },
        );
        assert!((s.raw - 1.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.threshold, 0.0);
        let with_cost = Profile {
            fp: 0.5,
            ..STANDARD
        };
        let mut scores = vec![0.0; 100];
        scores[45] = 0.6;
        scores[54] = 0.95;
        let s = sweep(&[file(scores, vec![(40, 49)])], with_cost);
        // At 0.95 alone: -1 (window missed) + 0.5 × late; at 0.6: tp + 0.5 × late.
        assert!((s.raw - (tp + 0.5 * late)).abs() < 1e-9, "{s:?}");
        // Detections in the probation count for nothing, and a window inside it is not
        // counted at all.
        let mut scores = vec![0.0; 100];
        scores[5] = 1.0;
        let early = sweep(&[file(scores, vec![(2, 8), (60, 69)])], STANDARD);
        assert_eq!(early.null, -1.0);
        assert_eq!(early.raw, -1.0);
    }

    #[test]
    fn only_a_window_s_earliest_detection_counts() {
        let mut scores = vec![0.0; 100];
        for s in scores.iter_mut().skip(40).take(10) {
            *s = 1.0;
        }
        let s = sweep(&[file(scores, vec![(40, 49)])], STANDARD);
        assert!((s.raw - 1.0).abs() < 1e-9);
        assert_eq!(s.true_positives, 10);
    }
}
