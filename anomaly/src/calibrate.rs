//! From an expert's raw measure to how rare it is in that expert's own history: the share of
//! the recent past (a decaying histogram of the measure) that was at least as high. A value
//! above everything seen gets a tail beyond that share, falling with how far above it is.
//! Each expert is calibrated against itself this way, so a series' usual noise is learnt,
//! never tuned.

use serde::{Deserialize, Serialize};

/// Bins of the histogram.
const BINS: usize = 48;

/// A decaying histogram of `ln(1 + raw)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibrator {
    /// Counts per bin, scaled by `weight` (so decay costs nothing per point).
    counts: Vec<f64>,
    /// The histogram's upper edge; bins are `hi / BINS` wide.
    hi: f64,
    /// What one new point adds now (it grows by `1 / (1 - 1/horizon)` per point).
    weight: f64,
    /// The sum of `counts`.
    total: f64,
    /// The highest value in the remembered past (decays towards the histogram's tail).
    max: f64,
    decay: f64,
    seen: u64,
    warmup: u64,
}

/// How fast the tail beyond the remembered maximum falls, in bins of the histogram: a value
/// `TAIL_BINS` bins beyond it is a quarter as likely as the maximum itself.
const TAIL_BINS: f64 = 4.0;

impl Calibrator {
    /// Remembers about the last `horizon` measures; says nothing for `warmup` measures.
    pub fn new(horizon: f64, warmup: u64) -> Calibrator {
        Calibrator {
            counts: vec![0.0; BINS],
            hi: 0.0,
            weight: 1.0,
            total: 0.0,
            max: 0.0,
            decay: 1.0 / (1.0 - 1.0 / horizon.max(2.0)),
            seen: 0,
            warmup,
        }
    }

    fn bin(&self, y: f64) -> usize {
        if self.hi <= 0.0 {
            return 0;
        }
        // Within range by the caller's check; the cast is of a small non-negative number.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let b = ((y / self.hi) * BINS as f64) as usize;
        b.min(BINS - 1)
    }

    /// The share of the remembered past at least as high as `y` (interpolated within its
    /// bin), and below the past's maximum, the tail beyond it.
    fn tail(&self, y: f64) -> f64 {
        if self.total <= 0.0 {
            return 1.0;
        }
        let floor = self.weight / (self.total + self.weight);
        if y > self.max {
            // Beyond everything remembered: the floor, and less the further beyond, on the
            // scale of the past's own spread near its top.
            // A polynomial tail, not an exponential one: a measure far out is very rare, but
            // never so rare that every such point ties at the smallest probability.
            let width = (self.hi / BINS as f64).max(1e-9);
            let beyond = 1.0 + (y - self.max) / (TAIL_BINS * width);
            return floor / (beyond * beyond);
        }
        if self.hi <= 0.0 {
            // Everything so far was 0, and so is this.
            return 1.0;
        }
        let b = self.bin(y);
        let width = self.hi / BINS as f64;
        let within = 1.0 - ((y - b as f64 * width) / width).clamp(0.0, 1.0);
        let above: f64 = self.counts[b + 1..].iter().sum::<f64>() + within * self.counts[b];
        ((above + self.weight) / (self.total + self.weight)).clamp(floor, 1.0)
    }

    /// Adds a raw measure; returns its tail probability against the past before it (1 in the
    /// warm-up).
    pub fn update(&mut self, raw: f64) -> f64 {
        let y = raw.max(0.0).ln_1p();
        let p = if self.seen < self.warmup {
            1.0
        } else {
            self.tail(y)
        };
        self.learn(y);
        p
    }

    fn learn(&mut self, y: f64) {
        self.seen += 1;
        if y > self.hi {
            self.rebin(y * 1.25);
        }
        let b = self.bin(y);
        self.counts[b] += self.weight;
        self.total += self.weight;
        self.max = self.max.max(y);

        self.weight *= self.decay;
        // The maximum fades: it is the highest value still carrying weight.
        if self.seen % 64 == 0 {
            let live = self
                .counts
                .iter()
                .rposition(|c| *c > self.weight * 1e-3)
                .unwrap_or(0);
            let top = (live + 1) as f64 * self.hi / BINS as f64;
            self.max = self.max.min(top);
        }
        if self.weight > 1e100 {
            let w = self.weight;
            self.counts.iter_mut().for_each(|c| *c /= w);
            self.total /= w;
            self.weight = 1.0;
        }
    }

    /// Widens the histogram to `hi`, moving each bin's count to where its middle falls.
    fn rebin(&mut self, hi: f64) {
        let old = std::mem::replace(&mut self.counts, vec![0.0; BINS]);
        let old_hi = self.hi;
        self.hi = hi;
        for (i, c) in old.into_iter().enumerate() {
            if c > 0.0 {
                let middle = (i as f64 + 0.5) * old_hi / BINS as f64;
                let b = self.bin(middle);
                self.counts[b] += c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_values_are_common_and_new_heights_are_rare() {
        let mut c = Calibrator::new(1000.0, 50);
        let mut ps = Vec::new();
        for i in 0..2000 {
            ps.push(c.update(f64::from(i % 10)));
        }
        assert!(ps[..50].iter().all(|p| *p == 1.0));
        // 9 is the top tenth of what was seen.
        assert!((0.05..0.3).contains(&c.update(9.0)), "{}", c.update(9.0));
        assert!(c.update(0.0) > 0.9);
        let beyond = c.update(30.0);
        let far_beyond = c.update(300.0);
        assert!(
            beyond < 2e-3 && far_beyond < beyond,
            "{beyond} {far_beyond}"
        );
    }
}
