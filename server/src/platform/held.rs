//! The queue's memory: the payloads its claimed tasks hold, from when they are claimed until
//! they have run (waiting for an instance, or running), counted against `--queue-memory-mb`.
//! The claimer asks the store for no more than what is left ([`Held::left`]: a claim stops
//! at the first task whose payload does not fit, taking at least one), and claims nothing
//! while nothing is left ([`Held::room`]). So the queue holds at most its budget and one
//! task's payload, where 64 slots of 32 MiB bodies could otherwise hold 2 GiB.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::chains::engine::json_size;
use crate::model::Task;

/// The payload bytes the queue's claimed tasks hold in memory (from when they are claimed
/// until they have run), against its budget.
#[derive(Debug)]
pub(super) struct Held {
    budget: u64,
    bytes: AtomicU64,
    /// Told when a task's payload is let go.
    freed: tokio::sync::Notify,
}

/// A claimed task's payload, counted in [`Held`] until dropped.
pub(super) struct Payload {
    held: Arc<Held>,
    bytes: u64,
}

impl Held {
    /// Nothing held yet, of `budget` bytes.
    pub fn new(budget: u64) -> Held {
        Held {
            budget,
            bytes: AtomicU64::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// What is left of the budget.
    pub fn left(&self) -> u64 {
        self.budget
            .saturating_sub(self.bytes.load(Ordering::SeqCst))
    }

    /// Waits until some of the budget is left.
    pub async fn room(&self) {
        loop {
            // Listening before the look, so that a payload let go between the two is heard.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.left() > 0 {
                return;
            }
            freed.await;
        }
    }

    /// Counts `task`'s payload (its size as JSON, as the store keeps it) until the returned
    /// guard is dropped.
    pub fn take(self: &Arc<Self>, task: &Task) -> Payload {
        let bytes = u64::try_from(json_size(&task.payload)).unwrap_or(u64::MAX);
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        Payload {
            held: self.clone(),
            bytes,
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        self.held.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        self.held.freed.notify_waiters();
    }
}
