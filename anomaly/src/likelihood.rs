//! From a raw anomaly measure to how unlikely its recent values are, given its own history
//! (the "anomaly likelihood" of Numenta's detectors, in spirit): the mean of the last few raw
//! values is compared with the long-run distribution of the raw values, and the tail
//! probability of that difference is the result. Every expert's measure is calibrated this
//! way against itself, so a series' usual noise is learnt, not tuned.

use serde::{Deserialize, Serialize};

use crate::stats::{normal_tail, Ewm};

/// The calibration of one raw measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Likelihood {
    long: Ewm,
    short: Ewm,
    warmup: u64,
}

impl Likelihood {
    /// Long-run statistics over about `long` points, recent values over about `short`;
    /// nothing is reported before `warmup` points.
    pub fn new(long: f64, short: f64, warmup: u64) -> Likelihood {
        Likelihood {
            long: Ewm::new(long),
            short: Ewm::new(short),
            warmup,
        }
    }

    /// Adds the raw measure `x`; returns the probability (upper tail) that recent values so
    /// high come from the long-run distribution: 1 when they are ordinary, near 0 when not.
    pub fn update(&mut self, x: f64) -> f64 {
        self.short.add(x);
        // Compared with the history before this point, then learnt.
        let p = if self.long.count() < self.warmup {
            1.0
        } else {
            let std = self.long.std().max(1e-6 * self.long.mean().abs()).max(1e-12);
            normal_tail((self.short.mean() - self.long.mean()) / std)
        };
        self.long.add(x);
        p
    }
}
