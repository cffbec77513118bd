//! The experts: each turns a point into a raw measure of one kind of surprise, which
//! [`crate::calibrate`] then judges against that expert's own history.
//!
//! - [`Rarity`]: how rarely the series has taken this value (a value never seen, or seen
//!   seldom, like a new maximum or a new level).
//! - [`Shift`]: how far the last few points' mean has moved from the long-run mean, in units
//!   of the long-run spread (a level shift, a ramp).
//! - [`Seasonal`]: how far the value is from what this hour of the week, or of the day,
//!   usually holds (a daily or weekly pattern broken).

use serde::{Deserialize, Serialize};

use crate::stats::Ewm;

/// Bins of a value histogram.
const VALUE_BINS: usize = 64;

/// How rarely the series has taken a value: a decaying histogram of values over the range
/// seen so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rarity {
    counts: Vec<f64>,
    lo: f64,
    hi: f64,
    weight: f64,
    total: f64,
    decay: f64,
}

impl Rarity {
    /// Remembers about the last `horizon` values.
    pub fn new(horizon: f64) -> Rarity {
        Rarity {
            counts: vec![0.0; VALUE_BINS],
            lo: f64::NAN,
            hi: f64::NAN,
            weight: 1.0,
            total: 0.0,
            decay: 1.0 / (1.0 - 1.0 / horizon.max(2.0)),
        }
    }

    fn bin(&self, x: f64) -> usize {
        let span = self.hi - self.lo;
        if span <= 0.0 || !span.is_finite() {
            return 0;
        }
        // Clamped to the histogram: the cast is of a small non-negative number.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let b = (((x - self.lo) / span) * VALUE_BINS as f64).max(0.0) as usize;
        b.min(VALUE_BINS - 1)
    }

    /// The raw surprise of `x`, then learns it.
    pub fn update(&mut self, x: f64) -> f64 {
        if self.lo.is_nan() {
            self.lo = x;
            self.hi = x;
        }
        let span = (self.hi - self.lo).max(1e-9 * x.abs().max(1.0));
        // Beyond the range: as rare as an empty bin, and more so the further out.
        let outside = if x > self.hi {
            (x - self.hi) / span
        } else if x < self.lo {
            (self.lo - x) / span
        } else {
            0.0
        };
        let raw = if self.total <= 0.0 {
            0.0
        } else if outside > 0.0 {
            ((self.total + self.weight) / self.weight).ln() + 10.0 * outside
        } else {
            let b = self.bin(x);
            let near = self.counts[b]
                + 0.5
                    * (b.checked_sub(1).map_or(0.0, |i| self.counts[i])
                        + self.counts.get(b + 1).copied().unwrap_or(0.0));
            ((self.total + self.weight) / (near + self.weight)).ln()
        };
        self.learn(x);
        raw
    }

    fn learn(&mut self, x: f64) {
        if x > self.hi || x < self.lo {
            let span = self.hi - self.lo;
            let (lo, hi) = (self.lo.min(x - 0.05 * span), self.hi.max(x + 0.05 * span));
            self.rebin(lo, hi);
        }
        let b = self.bin(x);
        self.counts[b] += self.weight;
        self.total += self.weight;
        self.weight *= self.decay;
        if self.weight > 1e100 {
            let w = self.weight;
            self.counts.iter_mut().for_each(|c| *c /= w);
            self.total /= w;
            self.weight = 1.0;
        }
    }

    fn rebin(&mut self, lo: f64, hi: f64) {
        let old = std::mem::replace(&mut self.counts, vec![0.0; VALUE_BINS]);
        let (old_lo, old_span) = (self.lo, self.hi - self.lo);
        self.lo = lo;
        self.hi = hi;
        for (i, c) in old.into_iter().enumerate() {
            if c > 0.0 {
                let middle = old_lo + (i as f64 + 0.5) * old_span / VALUE_BINS as f64;
                let b = self.bin(middle);
                self.counts[b] += c;
            }
        }
    }
}

/// How far the recent mean has moved from the long-run mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shift {
    short: Ewm,
    long: Ewm,
}

impl Shift {
    /// Recent over about `short` points, long-run over about `long`.
    pub fn new(short: f64, long: f64) -> Shift {
        Shift {
            short: Ewm::new(short),
            long: Ewm::new(long),
        }
    }

    /// The raw surprise of `x`, then learns it.
    pub fn update(&mut self, x: f64) -> f64 {
        self.short.add(x);
        let spread = self.long.std() + 1e-9 * (1.0 + self.long.mean().abs());
        let raw = if self.long.count() == 0 {
            0.0
        } else {
            (self.short.mean() - self.long.mean()).abs() / spread
        };
        self.long.add(x);
        raw
    }
}

/// Hours in a week.
const WEEK_HOURS: usize = 168;

/// How far a value is from what its hour of the week (or, until that hour is known, of the
/// day) usually holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seasonal {
    week: Vec<Ewm>,
    day: Vec<Ewm>,
    overall: Ewm,
}

impl Seasonal {
    /// Each hour's statistics over about `horizon` of its own points.
    pub fn new(horizon: f64) -> Seasonal {
        Seasonal {
            week: vec![Ewm::new(horizon); WEEK_HOURS],
            day: vec![Ewm::new(horizon); 24],
            overall: Ewm::new(horizon * 24.0),
        }
    }

    /// The raw surprise of `x` at `time` (Unix seconds), then learns it.
    pub fn update(&mut self, time: i64, x: f64) -> f64 {
        let hours = time.div_euclid(3600);
        // 1970-01-01 was a Thursday: shifted so that hour 0 of the week is Monday's first.
        let (w, d) = (
            usize::try_from((hours + 72).rem_euclid(WEEK_HOURS as i64)).unwrap_or(0),
            usize::try_from(hours.rem_euclid(24)).unwrap_or(0),
        );
        let floor = 0.05 * self.overall.std() + 1e-9 * (1.0 + self.overall.mean().abs());
        let judge = |e: &Ewm| (x - e.mean()).abs() / (e.std() + floor);
        let raw = if self.week[w].count() >= 3 {
            judge(&self.week[w])
        } else if self.day[d].count() >= 3 {
            judge(&self.day[d])
        } else {
            0.0
        };
        self.week[w].add(x);
        self.day[d].add(x);
        self.overall.add(x);
        raw
    }
}

/// Entries of the context memory.
const CONTEXT_SLOTS: usize = 4096;
/// Levels values are quantised to.
const CONTEXT_LEVELS: i64 = 24;
/// Longest run of symbols remembered as one context.
const CONTEXT_ORDER: usize = 4;

/// How new the series' recent shape is: values become levels, runs of one level become
/// symbols (the level and the rough length of the run before it), and the last few symbols
/// form contexts. A memory of contexts seen says what share of the current ones are new:
/// a pattern never seen before (a spike sooner than usual, a plateau at a new height, a day
/// without its usual rise) makes new contexts; a repeating pattern, however irregular each
/// value, makes none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Fingerprints of contexts seen (0: empty), in sets of two, newest first.
    memory: Vec<u32>,
    /// The last symbols, newest last.
    symbols: Vec<u32>,
    level: Option<i64>,
    run: u64,
    lo: f64,
    hi: f64,
}

impl Context {
    /// An empty memory.
    pub fn new() -> Context {
        Context {
            memory: vec![0; CONTEXT_SLOTS],
            symbols: Vec::with_capacity(CONTEXT_ORDER),
            level: None,
            run: 0,
            lo: f64::NAN,
            hi: f64::NAN,
        }
    }

    fn level_of(&self, x: f64) -> i64 {
        let span = self.hi - self.lo;
        if span <= 0.0 || !span.is_finite() {
            return 0;
        }
        // A small number: the value's place in the range, in levels.
        #[allow(clippy::cast_possible_truncation)]
        let level = (((x - self.lo) / span) * CONTEXT_LEVELS as f64).floor() as i64;
        level.clamp(0, CONTEXT_LEVELS - 1)
    }

    /// The raw surprise of `x` (the share of new contexts it completes), then learns it.
    pub fn update(&mut self, x: f64) -> f64 {
        if self.lo.is_nan() {
            self.lo = x;
            self.hi = x;
        }
        if x < self.lo || x > self.hi {
            // The range grows by a margin, so that it settles rather than moving with each
            // new extreme.
            let span = (self.hi - self.lo).max(1e-9 * x.abs().max(1.0));
            self.lo = self.lo.min(x - 0.1 * span);
            self.hi = self.hi.max(x + 0.1 * span);
        }
        let level = self.level_of(x);
        if self.level == Some(level) {
            self.run += 1;
            return 0.0;
        }
        // A new run: its symbol is the new level and how long the last run lasted.
        let duration = 64 - self.run.max(1).leading_zeros();
        let symbol = u32::try_from(level).unwrap_or(0) * 64 + duration;
        self.level = Some(level);
        self.run = 1;
        if self.symbols.len() == CONTEXT_ORDER {
            self.symbols.remove(0);
        }
        self.symbols.push(symbol);
        let mut new = 0.0;
        let mut all = 0.0;
        for order in 1..=self.symbols.len() {
            let context = &self.symbols[self.symbols.len() - order..];
            let fingerprint = fingerprint(context);
            let weight = order as f64;
            all += weight;
            if !self.remember(fingerprint) {
                new += weight;
            }
        }
        new / all
    }
}

impl Context {
    /// Whether the context was in memory; it is now, as the newest of its set. The memory is
    /// two-way: a context has two slots to be in, the older of which a new one takes, so two
    /// contexts that keep coming back do not keep evicting each other.
    fn remember(&mut self, fingerprint: u32) -> bool {
        let set = (fingerprint as usize) % (CONTEXT_SLOTS / 2) * 2;
        let (newest, older) = (self.memory[set], self.memory[set + 1]);
        if newest == fingerprint {
            return true;
        }
        self.memory[set + 1] = newest;
        self.memory[set] = fingerprint;
        older == fingerprint
    }
}

impl Default for Context {
    fn default() -> Self {
        Context::new()
    }
}

/// A 32-bit fingerprint of a sequence of symbols (never 0, the empty slot's mark).
fn fingerprint(symbols: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ symbols.len() as u64;
    for s in symbols {
        h ^= u64::from(*s);
        h = h.wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    // The high half, folded: well mixed; 0 is kept for empty slots.
    #[allow(clippy::cast_possible_truncation)]
    let f = ((h >> 32) ^ h) as u32;
    f.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarity_finds_values_never_or_seldom_seen() {
        let mut r = Rarity::new(1000.0);
        for i in 0..2000 {
            r.update(f64::from(i % 10));
        }
        let usual = r.update(5.0);
        let beyond = r.update(30.0);
        let further = r.update(300.0);
        assert!(
            beyond > 2.0 * usual && further > beyond,
            "{usual} {beyond} {further}"
        );
    }

    #[test]
    fn shift_finds_a_level_change_and_forgets_it_once_it_is_the_norm() {
        let mut s = Shift::new(6.0, 400.0);
        for i in 0..1000 {
            s.update(10.0 + f64::from(i % 3));
        }
        let before = s.update(11.0);
        let at: f64 = (0..6).map(|_| s.update(30.0)).fold(0.0, f64::max);
        for i in 0..3000 {
            s.update(30.0 + f64::from(fastrand(i) % 3));
        }
        let after = s.update(31.0);
        assert!(
            at > 5.0 && before < 1.0 && after < 1.0,
            "{before} {at} {after}"
        );
    }

    /// A small deterministic stand-in for noise.
    fn fastrand(seed: u32) -> u32 {
        seed.wrapping_mul(1_103_515_245).wrapping_add(12_345) >> 16
    }

    #[test]
    fn seasonal_finds_a_broken_daily_pattern() {
        let mut s = Seasonal::new(30.0);
        let start = 1_700_000_000 - 1_700_000_000 % 86_400;
        let value = |hour: i64| if (9..17).contains(&hour) { 100.0 } else { 10.0 };
        let mut usual = 0.0f64;
        for day in 0..30 {
            for hour in 0..24 {
                let t = start + day * 86_400 + hour * 3600;
                let raw = s.update(t, value(hour) + (day % 3) as f64);
                if day > 20 {
                    usual = usual.max(raw);
                }
            }
        }
        // Day 30, noon: the usual daytime high is missing.
        let broken = s.update(start + 30 * 86_400 + 12 * 3600, 10.0);
        assert!(broken > 5.0 * usual, "{broken} vs {usual}");
    }

    #[test]
    fn context_learns_a_repeating_shape_and_marks_a_new_one() {
        let mut c = Context::new();
        // A saw tooth: rise over 10 points, fall at once, again and again.
        let tooth = |i: u32| f64::from(i % 10);
        for i in 0..2000 {
            c.update(tooth(i));
        }
        // Almost nothing new (a context may now and then lose its slot to another).
        let known: f64 = (2000..2100).map(|i| c.update(tooth(i))).sum::<f64>() / 100.0;
        assert!(known < 0.05, "{known}");
        // A tooth cut short: the fall comes after 4 points instead of 10.
        let new: f64 = [0.0, 1.0, 2.0, 3.0, 0.0, 1.0]
            .into_iter()
            .map(|x| c.update(x))
            .sum();
        assert!(new / 6.0 > 10.0 * known, "{new} vs {known}");
    }

    #[test]
    fn fingerprints_never_mark_an_empty_slot() {
        assert!((0..10_000u32).all(|i| fingerprint(&[i, i / 7]) != 0));
        assert_ne!(fingerprint(&[1, 2]), fingerprint(&[2, 1]));
    }
}
