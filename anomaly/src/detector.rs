//! The detector: each expert's raw surprise, calibrated against that expert's own history,
//! the two rarest combined into the point's score, and a reported anomaly inhibiting the
//! points that follow it.

use serde::{Deserialize, Serialize};

use crate::calibrate::Calibrator;
use crate::experts::{Context, Rarity, Seasonal, Shift};

/// The detector's settings: one configuration for every series, never tuned per series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Points before any score is given (each expert's calibration needs a history).
    pub warmup: u64,
    /// About how many points the value histogram and the calibrations remember.
    pub memory: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            warmup: 300,
            memory: 3000.0,
        }
    }
}

/// The recent mean of [`Shift`], in points.
const SHIFT_SHORT: f64 = 6.0;
/// The long-run mean and spread of [`Shift`], in points.
const SHIFT_LONG: f64 = 400.0;
/// How many of its own points each hour of [`Seasonal`] remembers.
const SEASONAL_HORIZON: f64 = 120.0;
/// How fast the inhibition after a reported anomaly fades, per point.
const INHIBITION_DECAY: f64 = 0.998;
/// What share of its score a point keeps when it does not exceed the recent high-water mark.
const INHIBITED_SHARE: f64 = 0.3;
/// The experts.
const EXPERTS: usize = 4;
/// The first byte of [`Detector::to_bytes`]: the layout of the state. A detector whose
/// experts change gets a new one, and state of another layout is refused, not misread.
const STATE_LAYOUT: u8 = 1;

/// Why saved state could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state was saved by a detector of another layout (or is not a detector's state).
    #[error("detector state of layout {found}, this detector reads layout {STATE_LAYOUT}")]
    Layout {
        /// The layout byte found.
        found: u8,
    },
    /// The state is damaged.
    #[error("damaged detector state: {0}")]
    Damaged(String),
}

/// The detector of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detector {
    config: Config,
    seen: u64,
    rarity: Rarity,
    shift: Shift,
    seasonal: Seasonal,
    context: Context,
    calibrators: Vec<Calibrator>,
    /// The recent scores' high-water mark, decaying: a point that does not exceed it keeps
    /// only part of its score, so an anomaly is reported at its onset and not again at each
    /// point that follows.
    recent: f64,
}

impl Detector {
    /// A detector that knows nothing yet.
    pub fn new(config: Config) -> Detector {
        let calibrators = (0..EXPERTS)
            .map(|_| Calibrator::new(config.memory, config.warmup))
            .collect();
        Detector {
            seen: 0,
            rarity: Rarity::new(config.memory),
            shift: Shift::new(SHIFT_SHORT, SHIFT_LONG),
            seasonal: Seasonal::new(SEASONAL_HORIZON),
            context: Context::new(),
            calibrators,
            recent: 0.0,
            config,
        }
    }

    /// Points taken so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Whether the detector has seen enough points to score them.
    pub fn is_warm(&self) -> bool {
        self.seen > self.config.warmup
    }

    /// The state, compact, for storing: restore it with [`Detector::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![STATE_LAYOUT];
        // Serialising plain numbers and vectors into a vector cannot fail.
        bytes.extend(postcard::to_stdvec(self).unwrap_or_default());
        bytes
    }

    /// A detector from state saved by [`Detector::to_bytes`], carrying on where it left off.
    pub fn from_bytes(bytes: &[u8]) -> Result<Detector, StateError> {
        match bytes.split_first() {
            Some((&STATE_LAYOUT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| StateError::Damaged(e.to_string()))
            }
            Some((&found, _)) => Err(StateError::Layout { found }),
            None => Err(StateError::Damaged("empty".into())),
        }
    }

    /// Takes the point (`time` in Unix seconds, `value`) and returns its anomaly score in
    /// [0, 1]: 0 during the warm-up; higher the rarer the point. A value that is not finite
    /// is not learnt and scores 0.
    pub fn update(&mut self, time: i64, value: f64) -> f64 {
        self.update_scores(time, value).reported
    }

    /// [`Detector::update`], with the point's score before inhibition too.
    pub fn update_scores(&mut self, time: i64, value: f64) -> Scores {
        if !value.is_finite() {
            return Scores::default();
        }
        self.seen += 1;
        let raws = [
            self.rarity.update(value),
            self.shift.update(value),
            self.seasonal.update(time, value),
            self.context.update(value),
        ];
        // Each expert's rarity as -log10 of its calibrated tail probability.
        let mut surprise = [0.0; EXPERTS];
        for ((s, raw), calibrator) in surprise.iter_mut().zip(raws).zip(&mut self.calibrators) {
            *s = -calibrator.update(raw).max(1e-300).log10();
        }
        if !self.is_warm() {
            return Scores::default();
        }
        // Two experts agreeing count for more than one alone; one alone can still carry it.
        surprise.sort_by(|a, b| b.total_cmp(a));
        let score = score_of(surprise[0] + surprise[1]);
        let reported = if score > self.recent {
            score
        } else {
            score * INHIBITED_SHARE
        };
        self.recent = (self.recent * INHIBITION_DECAY).max(score);
        Scores {
            reported,
            uninhibited: score,
        }
    }
}

/// A point's scores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    /// The anomaly score: high at an anomaly's onset, inhibited at the points that follow.
    pub reported: f64,
    /// The score before inhibition: stays high while the series stays unusual.
    pub uninhibited: f64,
}

/// A surprise (`-log10` of a probability) as a score in [0, 1], so that the order of very
/// small probabilities survives (`1 - p` would round them all to 1).
fn score_of(surprise: f64) -> f64 {
    let s = surprise.max(0.0);
    s / (s + 20.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daily pattern with noise, one point every five minutes from `start`.
    fn daily(start: i64, points: u32, seed: u64) -> Vec<(i64, f64)> {
        let mut rng = seed;
        (0..points)
            .map(|i| {
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                #[allow(clippy::cast_precision_loss)]
                let noise = (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let phase = f64::from(i % 288) / 288.0 * std::f64::consts::TAU;
                (
                    start + i64::from(i) * 300,
                    100.0 + 20.0 * phase.sin() + 4.0 * noise,
                )
            })
            .collect()
    }

    #[test]
    fn the_warm_up_scores_nothing_and_scores_stay_in_range() {
        let mut d = Detector::new(Config::default());
        for (i, (t, v)) in daily(1_700_000_000, 3000, 1).into_iter().enumerate() {
            let s = d.update(t, v);
            if i < 300 {
                assert_eq!(s, 0.0);
            }
            assert!((0.0..=1.0).contains(&s), "{s}");
        }
        assert!(d.is_warm());
        assert_eq!(d.seen(), 3000);
        assert_eq!(d.update(0, f64::NAN), 0.0);
        assert_eq!(d.seen(), 3000, "a value that is not a number is not learnt");
    }

    #[test]
    fn a_level_shift_scores_far_above_the_usual_noise() {
        let mut d = Detector::new(Config::default());
        let points = daily(1_700_000_000, 4000, 2);
        let mut usual = 0.0f64;
        for (i, (t, v)) in points.iter().enumerate() {
            let s = d.update(*t, *v);
            if i > 3000 {
                usual = usual.max(s);
            }
        }
        let (t, _) = points[points.len() - 1];
        let jumped: Vec<f64> = (1..=6).map(|k| d.update(t + 300 * k, 400.0)).collect();
        let peak = jumped.iter().copied().fold(0.0, f64::max);
        assert!(
            peak > 0.25 && peak > 2.0 * usual,
            "peak {peak}, usual {usual}"
        );
        // Reported at its onset; the points that follow are inhibited.
        assert!(jumped[0] >= jumped[5], "{jumped:?}");
    }

    #[test]
    fn restored_state_carries_on_exactly() {
        let points = daily(1_700_000_000, 5000, 3);
        let mut whole = Detector::new(Config::default());
        let mut first = Detector::new(Config::default());
        let expected: Vec<f64> = points.iter().map(|(t, v)| whole.update(*t, *v)).collect();
        for (t, v) in &points[..2500] {
            first.update(*t, *v);
        }
        let bytes = first.to_bytes();
        assert!(bytes.len() <= 64 * 1024, "state of {} bytes", bytes.len());
        let mut restored = Detector::from_bytes(&bytes).expect("the state restores");
        assert_eq!(restored, first);
        let carried: Vec<f64> = points[2500..]
            .iter()
            .map(|(t, v)| restored.update(*t, *v))
            .collect();
        assert_eq!(carried, expected[2500..]);
    }

    #[test]
    fn foreign_or_damaged_state_is_refused() {
        let bytes = Detector::new(Config::default()).to_bytes();
        let mut other = bytes.clone();
        other[0] = 99;
        assert!(matches!(
            Detector::from_bytes(&other),
            Err(StateError::Layout { found: 99 })
        ));
        assert!(matches!(
            Detector::from_bytes(&bytes[..bytes.len() / 2]),
            Err(StateError::Damaged(_))
        ));
        assert!(matches!(
            Detector::from_bytes(&[]),
            Err(StateError::Damaged(_))
        ));
    }
}
