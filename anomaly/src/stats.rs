//! Running statistics that forget: exponentially weighted mean and variance, with a warm-up
//! in which they weigh every point equally (so the first points are not dominated by the
//! initial state).

use serde::{Deserialize, Serialize};

/// An exponentially weighted mean and variance with horizon `1 / alpha` points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ewm {
    alpha: f64,
    n: u64,
    mean: f64,
    var: f64,
}

impl Ewm {
    /// Statistics over about the last `horizon` points.
    pub fn new(horizon: f64) -> Ewm {
        Ewm {
            alpha: 1.0 / horizon.max(1.0),
            n: 0,
            mean: 0.0,
            var: 0.0,
        }
    }

    /// Adds `x`.
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        let a = self.alpha.max(1.0 / self.n as f64);
        let d = x - self.mean;
        self.mean += a * d;
        // West's weighted update: the variance around the moving mean.
        self.var = (1.0 - a) * (self.var + a * d * d);
    }

    /// Points seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The mean.
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The variance.
    pub fn var(&self) -> f64 {
        self.var
    }

    /// The standard deviation.
    pub fn std(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_and_variance_follow_the_data() {
        let mut e = Ewm::new(1000.0);
        for i in 0..100 {
            e.add(f64::from(i % 2));
        }
        assert!((e.mean() - 0.5).abs() < 0.01, "{e:?}");
        assert!((e.var() - 0.25).abs() < 0.02, "{e:?}");
        let mut short = Ewm::new(10.0);
        for _ in 0..200 {
            short.add(5.0);
        }
        assert!((short.mean() - 5.0).abs() < 1e-9 && short.var() < 1e-9);
    }
}
