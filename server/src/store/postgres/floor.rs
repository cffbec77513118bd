//! Where a node's next claim starts looking for queued tasks.
//!
//! A claimed task leaves the partial index of queued tasks only when PostgreSQL vacuums: until
//! then its entry stays at the front of that index, and a claim that scans from the oldest
//! entry walks over every task claimed since the last vacuum (with a backlog of 128,000 the
//! claim's own time grew from 330 to 470 µs within 30 s). So a node's claim starts just past
//! the last task it claimed. Tasks can become queued behind that point only when a node's
//! tasks are requeued after it stopped (their old `created_at`, perhaps a backoff), when
//! another node's claim is rolled back, or by a clock stepped back; so the scan starts from the
//! oldest entry again whenever a claim finds fewer tasks than it asked for, after this node
//! requeues, and at least every [`RESCAN_EVERY`]: such a task waits at most that long behind
//! younger ones.

use std::time::{Duration, Instant};

/// The longest a claim starts past the oldest entry.
pub const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// Where the next claim starts.
#[derive(Debug)]
pub(super) struct Floor {
    /// The key (`created_at`, `id`) of the last task claimed, if the next claim starts past it.
    past: Option<(i64, String)>,
    /// When a claim last scanned from the oldest entry.
    rescanned: Instant,
}

impl Default for Floor {
    fn default() -> Floor {
        Floor {
            past: None,
            rescanned: Instant::now(),
        }
    }
}

impl Floor {
    /// The key the next claim starts past: the last one claimed, or one below every key when
    /// it scans from the oldest entry.
    pub fn start(&mut self) -> (i64, String) {
        match &self.past {
            Some(past) if self.rescanned.elapsed() < RESCAN_EVERY => past.clone(),
            _ => {
                self.past = None;
                self.rescanned = Instant::now();
                (i64::MIN, String::new())
            }
        }
    }

    /// Takes in what a claim of `wanted` got: the keys of the tasks it took (damaged ones
    /// too); fewer than it wanted and the next claim scans from the oldest entry. No claim
    /// (`wanted` 0) leaves the floor where it is.
    pub fn claimed(&mut self, keys: impl Iterator<Item = (i64, String)>, wanted: usize) {
        if wanted == 0 {
            return;
        }
        let mut got = 0;
        let mut last = None;
        for key in keys {
            got += 1;
            if last.as_ref().is_none_or(|l| &key > l) {
                last = Some(key);
            }
        }
        self.past = if got < wanted { None } else { last };
    }

    /// The next claim scans from the oldest entry (tasks were requeued).
    pub fn reset(&mut self) {
        self.past = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(at: i64, id: &str) -> (i64, String) {
        (at, id.to_string())
    }

    #[test]
    fn a_full_claim_moves_the_floor_to_its_last_key_and_a_short_one_clears_it() {
        let mut f = Floor::default();
        assert_eq!(f.start(), key(i64::MIN, ""));
        f.claimed([key(5, "b"), key(7, "a"), key(5, "c")].into_iter(), 3);
        assert_eq!(f.start(), key(7, "a"));
        f.claimed([key(9, "x")].into_iter(), 2);
        assert_eq!(f.start(), key(i64::MIN, ""), "fewer than wanted: rescan");
        f.claimed([key(9, "x")].into_iter(), 1);
        f.claimed(std::iter::empty(), 0);
        assert_eq!(f.start(), key(9, "x"), "no claim leaves it");
        f.reset();
        assert_eq!(f.start(), key(i64::MIN, ""), "after a requeue: rescan");
    }

    #[test]
    fn the_floor_lapses_after_the_rescan_period() {
        let mut f = Floor::default();
        f.start();
        f.claimed([key(3, "a")].into_iter(), 1);
        assert_eq!(f.start(), key(3, "a"));
        f.rescanned -= RESCAN_EVERY;
        assert_eq!(f.start(), key(i64::MIN, ""));
        f.claimed([key(4, "b")].into_iter(), 1);
        assert_eq!(f.start(), key(4, "b"), "the rescan restarted the period");
    }
}
