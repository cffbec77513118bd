//! Statistics of a young tasks table, kept current by the store.
//!
//! PostgreSQL plans from its statistics of a table, which autovacuum first gathers up to a
//! minute after the table has changed. Until then a queue batch's statements, planned as if
//! the tasks table held a handful of rows, read every open task (by a scan of the table or of
//! an index) instead of the few they write: each batch slower as a new database's backlog
//! grows. So the store analyses the table itself as its first tasks arrive, at each
//! fourfold of the tasks this node has added, up to [`LAST`]; past that autovacuum keeps up
//! (it analyses again once a tenth of the table has changed). Analysing also has PostgreSQL
//! plan the connections' prepared statements again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::pool::Pool;

/// The tasks added after which the table is analysed first.
const FIRST: u64 = 1_000;

/// The last count analysed at.
const LAST: u64 = 256_000;

/// The tasks this node has added, and the count at which it analyses next.
#[derive(Debug)]
pub(super) struct Growth {
    added: AtomicU64,
    next: AtomicU64,
}

impl Default for Growth {
    fn default() -> Self {
        Growth {
            added: AtomicU64::new(0),
            next: AtomicU64::new(FIRST),
        }
    }
}

impl Growth {
    /// Counts `n` tasks committed; where that reaches the next count, analyses the tasks
    /// table on a thread of its own (on a connection of `pool`), so that no write waits.
    pub(super) fn added(&self, n: usize, pool: &Arc<Pool>) {
        if n == 0 {
            return;
        }
        let added = self.added.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let next = self.next.load(Ordering::Relaxed);
        if added < next || next > LAST {
            return;
        }
        // One thread wins each count.
        if self
            .next
            .compare_exchange(next, next * 4, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let pool = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("cloudfunc-analyse".into())
            .spawn(move || {
                let analysed = pool.get().and_then(|mut c| c.batch("ANALYZE tasks"));
                if let Err(e) = analysed {
                    tracing::warn!(error = %e, "the tasks table could not be analysed; autovacuum will");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the tasks table could not be analysed; autovacuum will");
        }
    }
}
