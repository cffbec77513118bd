//! Writes behind that the store refused for a reason that may pass (a full disk, an I/O
//! error, a lock held too long): kept in memory, in order, and tried again every second until
//! they are stored, so an acknowledged call is not lost to a moment without space. Reads see
//! them meanwhile ([`Retry::find`]). What is kept is bounded ([`MAX_KEPT`]): past it the
//! oldest goes, and is counted lost and logged; so is what is still kept when the process
//! stops.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::{Store, Write};

/// The most writes kept for another try (about 10 KB each at most, logs included).
pub const MAX_KEPT: usize = 50_000;

/// How often kept writes are tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The writes kept for another try.
#[derive(Debug, Default)]
pub struct Retry {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    writes: VecDeque<Write>,
    /// The writes being tried again now (found by reads too).
    trying: Vec<Write>,
    /// Writes given up on: pushed out by newer ones, or refused for good.
    lost: u64,
}

impl Retry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `write` for another try.
    pub fn keep(&self, write: Write) {
        let mut state = self.lock();
        state.writes.push_back(write);
        if state.writes.len() > MAX_KEPT {
            if let Some(oldest) = state.writes.pop_front() {
                state.lost += 1;
                lost(&oldest, "too many records wait for the store");
            }
        }
    }

    /// Gives up on `write`, refused for good.
    pub fn give_up_on(&self, write: &Write, why: &str) {
        self.lock().lost += 1;
        lost(write, why);
    }

    /// Writes kept now.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.writes.len() + state.trying.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes given up on so far.
    pub fn lost(&self) -> u64 {
        self.lock().lost
    }

    /// The newest kept write of task `task_id`.
    pub fn find(&self, task_id: &str) -> Option<Write> {
        let state = self.lock();
        state
            .trying
            .iter()
            .chain(state.writes.iter())
            .rev()
            .find(|w| w.task_id() == task_id)
            .cloned()
    }

    /// Tries every kept write again, in one transaction; should that fail for a reason that
    /// will not pass, each is tried alone and the ones refused for good are given up.
    /// Returns how many are still kept.
    pub fn attempt(&self, store: &dyn Store) -> usize {
        let writes: Vec<Write> = {
            let mut state = self.lock();
            if state.writes.is_empty() {
                return 0;
            }
            let writes: Vec<Write> = state.writes.drain(..).collect();
            state.trying = writes.clone();
            writes
        };
        let (kept, refused) = match store.write(&writes) {
            Ok(()) => (Vec::new(), 0),
            Err(e) if e.is_retryable() => (writes, 0),
            Err(_) => {
                // One of them is bad: store the others alone, give up on it.
                let mut kept = Vec::new();
                let mut refused = 0;
                for write in writes {
                    match store.write(std::slice::from_ref(&write)) {
                        Ok(()) => {}
                        Err(e) if e.is_retryable() => kept.push(write),
                        Err(e) => {
                            refused += 1;
                            lost(&write, &e.to_string());
                        }
                    }
                }
                (kept, refused)
            }
        };
        let mut state = self.lock();
        let tried = state.trying.len();
        state.trying.clear();
        state.lost += refused;
        let still = kept.len();
        // What is still kept goes before what arrived while this ran.
        for write in kept.into_iter().rev() {
            state.writes.push_front(write);
        }
        if still < tried {
            tracing::info!(
                stored = tried - still - usize::try_from(refused).unwrap_or(0),
                refused,
                still_kept = state.writes.len(),
                "records the store refused before are stored now"
            );
        }
        while state.writes.len() > MAX_KEPT {
            if let Some(oldest) = state.writes.pop_front() {
                state.lost += 1;
                lost(&oldest, "too many records wait for the store");
            }
        }
        state.writes.len()
    }

    /// Gives up on everything still kept (the process is stopping); returns how many.
    pub fn give_up(&self) -> usize {
        let mut state = self.lock();
        let writes: Vec<Write> = state.writes.drain(..).collect();
        state.lost += writes.len() as u64;
        for w in &writes {
            lost(w, "the server stopped while the store still refused it");
        }
        writes.len()
    }
}

/// Says in the log which record is lost, and why: the task's id, function and ending, so an
/// operator can tell its caller.
fn lost(write: &Write, why: &str) {
    let (function, status) = match write {
        Write::Insert(task) => (task.function.as_str(), task.status.as_str()),
        Write::Finished {
            task, completion, ..
        } => (task.function.as_str(), completion.status.as_str()),
        Write::Complete { completion, .. } => ("", completion.status.as_str()),
    };
    tracing::error!(
        task_id = write.task_id(),
        function,
        status,
        why,
        "a task's record is lost"
    );
}
