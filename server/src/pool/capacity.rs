//! The pool's global caps (sandboxes, and the memory their limits commit): room is made by
//! stopping idle sandboxes of other functions, least recently used first, then stem cells.
//! Sandboxes to stop are set aside and stopped off the callers' path.

use cloudfunc_sandbox::Sandbox;

use super::queue::hand_over;
use super::stems::stop_stem;
use super::{Key, Pool, State};

impl Pool {
    /// Frees room for one more sandbox of `memory` bytes by stopping idle sandboxes of other
    /// functions (least recently used first), then stem cells. False if that is not enough.
    pub(super) fn make_room(&self, state: &mut State, memory: u64, for_key: Option<&Key>) -> bool {
        while !self.fits(state, memory) {
            let oldest = state
                .functions
                .iter()
                .filter(|(k, _)| Some(*k) != for_key)
                .flat_map(|(k, f)| {
                    f.idle
                        .iter()
                        .enumerate()
                        .map(move |(i, idle)| (idle.last_used, k.clone(), i))
                })
                .min_by_key(|(t, _, _)| *t);
            if let Some((_, key, i)) = oldest {
                let f = state
                    .functions
                    .get_mut(&key)
                    .expect("the key was just seen");
                let idle = f.idle.remove(i);
                state.free(idle.memory);
                state.stats.evicted += 1;
                self.bury(idle.sandbox);
                continue;
            }
            // Stem cells only make room for real work, never for other stem cells.
            let stem = for_key.and_then(|_| {
                state
                    .stems
                    .values_mut()
                    .find(|v| !v.is_empty())
                    .and_then(Vec::pop)
            });
            match stem {
                Some(stem) => {
                    state.free(stem.memory);
                    state.stats.evicted += 1;
                    let _ = std::thread::spawn(move || stop_stem(stem.cell));
                }
                None => return false,
            }
        }
        true
    }

    /// Whether one more sandbox of `memory` bytes fits under the caps as things are.
    pub(super) fn fits(&self, state: &State, memory: u64) -> bool {
        state.total < self.config.max_sandboxes
            && state.memory + memory <= self.config.max_memory_bytes
    }

    /// Undoes a reservation whose sandbox never came.
    pub(super) fn forget(&self, state: &mut State, key: &Key, memory: u64) {
        if let Some(f) = state.functions.get_mut(key) {
            f.busy = f.busy.saturating_sub(1);
        }
        state.free(memory);
        hand_over(state, key, None);
        self.freed.notify_all();
    }

    /// Sets a sandbox aside to be stopped by [`Pool::bury_now`] (off the caller's path).
    pub(super) fn bury(&self, sandbox: Sandbox) {
        self.graveyard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sandbox);
    }

    /// Stops every sandbox set aside.
    pub fn bury_now(&self) {
        let dead = std::mem::take(&mut *self.graveyard.lock().unwrap_or_else(|e| e.into_inner()));
        for sandbox in dead {
            if let Err(e) = sandbox.shutdown() {
                tracing::warn!(error = %cloudfunc_sandbox::error_chain(&e), "stopping a sandbox failed");
            }
        }
    }
}
