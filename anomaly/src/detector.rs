//! The detector.

use serde::{Deserialize, Serialize};

use crate::likelihood::Likelihood;
use crate::stats::Ewm;

/// The detector's settings: one configuration for every series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Points before any score is given.
    pub warmup: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { warmup: 300 }
    }
}

/// The detector of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detector {
    config: Config,
    n: u64,
    level: Ewm,
    spread: Ewm,
    short: Ewm,
    long: Ewm,
    spike: Likelihood,
    shift: Likelihood,
}

impl Detector {
    /// A detector that knows nothing yet.
    pub fn new(config: Config) -> Detector {
        let warmup = config.warmup;
        Detector {
            config,
            n: 0,
            level: Ewm::new(10.0),
            spread: Ewm::new(200.0),
            short: Ewm::new(6.0),
            long: Ewm::new(300.0),
            spike: Likelihood::new(2000.0, 3.0, warmup),
            shift: Likelihood::new(2000.0, 3.0, warmup),
        }
    }

    /// Takes the point (`time` in Unix seconds, `value`) and returns its anomaly score.
    pub fn update(&mut self, _time: i64, value: f64) -> f64 {
        self.n += 1;
        let eps = 1e-9 + 1e-6 * self.long.mean().abs();
        let residual = (value - self.level.mean()).abs();
        let spike_raw = residual / (self.spread.mean() + eps);
        self.spread.add(residual);
        self.level.add(value);
        self.short.add(value);
        let shift_raw = (self.short.mean() - self.long.mean()).abs() / (self.long.std() + eps);
        self.long.add(value);
        if self.n < 30 {
            return 0.0;
        }
        let p = self
            .spike
            .update(spike_raw.ln_1p())
            .min(self.shift.update(shift_raw.ln_1p()));
        if self.n < self.config.warmup {
            return 0.0;
        }
        score_of(p)
    }
}

/// A tail probability as a score in [0, 1]: its negative log, scaled, so that the order of
/// very small probabilities survives (1 - p would round them all to 1).
fn score_of(p: f64) -> f64 {
    (-p.max(1e-300).log10() / 30.0).clamp(0.0, 1.0)
}
