//! Housekeeping, off the callers' path: expiring idle sandboxes past their keep-warm
//! period, keeping `min_instances` up, refilling stem cells, and draining a function's
//! sandboxes when it changes.

use std::sync::Arc;
use std::time::Duration;

use cloudfunc_sandbox::Sandbox;

use super::{Key, Lease, Pool, Request, Start};

/// Counts a start under way as ended when dropped, whichever way it ended.
pub(super) struct Started<'a>(pub(super) &'a Pool);

impl Drop for Started<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.starting -= 1;
        drop(state);
        self.0.freed.notify_all();
    }
}

impl Pool {
    /// Removes every idle sandbox of a function; busy ones are stopped when given back.
    /// Returns the function's new generation (see [`Pool::keep`]).
    pub fn drain(&self, function_id: &str) -> u64 {
        let mut state = self.lock();
        let generation = state
            .generations
            .entry(function_id.to_string())
            .or_default();
        *generation += 1;
        let generation = *generation;
        // Under the lock, before any caller could see the drained state without it.
        self.drains
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let keys: Vec<Key> = state
            .functions
            .keys()
            .filter(|k| k.function_id == function_id)
            .cloned()
            .collect();
        for key in keys {
            let idle = match state.functions.get_mut(&key) {
                Some(f) => {
                    f.request = None;
                    std::mem::take(&mut f.idle)
                }
                None => continue,
            };
            for i in idle {
                state.free(i.memory);
                state.stats.drained += 1;
                self.bury(i.sandbox);
            }
        }
        drop(state);
        self.freed.notify_all();
        generation
    }

    /// Moves each of `trees` (a code tree of `function_id` with the versions that run it,
    /// `None` for any) to a place of its own under `to`, unless a sandbox of one of those
    /// versions is idle, lent or starting, or a caller waits for one; then runs `moved`,
    /// still under the lock. A sandbox that starts later for one of those versions finds its
    /// code gone ([`super::PoolError::CodeGone`]). Returns where the trees went.
    pub fn retire_code(
        &self,
        function_id: &str,
        trees: &[(std::path::PathBuf, Option<Vec<u32>>)],
        to: &std::path::Path,
        moved: impl FnOnce(),
    ) -> std::io::Result<Vec<std::path::PathBuf>> {
        let state = self.lock();
        let in_use = |versions: &Option<Vec<u32>>| {
            state.functions.iter().any(|(key, f)| {
                key.function_id == function_id
                    && versions.as_ref().is_none_or(|v| v.contains(&key.version))
                    && f.in_use()
            })
        };
        let free: Vec<&std::path::PathBuf> = trees
            .iter()
            .filter(|(_, versions)| !in_use(versions))
            .map(|(dir, _)| dir)
            .collect();
        if free.is_empty() {
            return Ok(Vec::new());
        }
        std::fs::create_dir_all(to)?;
        let mut gone = Vec::new();
        for (i, dir) in free.into_iter().enumerate() {
            let place = to.join(i.to_string());
            match std::fs::rename(dir, &place) {
                Ok(()) => gone.push(place),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "a code tree could not be retired")
                }
            }
        }
        if !gone.is_empty() {
            moved();
        }
        drop(state);
        Ok(gone)
    }

    /// Housekeeping, every second or so: expires idle sandboxes past their keep-warm period
    /// (keeping each function's `min_instances`), starts `min_instances`, refills the stem
    /// cells, and stops what was set aside.
    pub fn tick(&self) {
        let now = self.clock.now();
        let mut wanted_min: Vec<(Key, Request)> = Vec::new();
        {
            let mut state = self.lock();
            let mut expired = Vec::new();
            for (key, f) in state.functions.iter_mut() {
                let min = f.request.as_ref().map_or(0, |r| r.min_instances);
                // Oldest first; the most recently used stay.
                f.idle.sort_by_key(|i| i.last_used);
                let mut keep = f.idle.len() + f.busy;
                let mut i = 0;
                while i < f.idle.len() {
                    let idle = &f.idle[i];
                    if keep > min && now.duration_since(idle.last_used) >= idle.keep_warm {
                        expired.push(f.idle.remove(i));
                        keep -= 1;
                    } else {
                        i += 1;
                    }
                }
                if let Some(r) = &f.request {
                    for _ in (f.idle.len() + f.busy)..r.min_instances {
                        wanted_min.push((key.clone(), r.clone()));
                    }
                }
            }
            for i in expired {
                state.free(i.memory);
                state.stats.expired += 1;
                self.bury(i.sandbox);
            }
            state.functions.retain(|_, f| {
                f.in_use() || f.request.as_ref().is_some_and(|r| r.min_instances > 0)
            });
        }
        self.bury_now();
        for (key, request) in wanted_min {
            self.prestart(&key, &request);
        }
        self.refill_stems();
        self.bury_now();
    }

    /// Starts one sandbox for `key` straight into idle (for `min_instances`).
    pub(super) fn prestart(&self, key: &Key, request: &Request) {
        let Ok(engine) = self.engines.get(request.isolation) else {
            return;
        };
        let memory = request.spec.limits.memory_bytes;
        let generation = {
            let mut state = self.lock();
            if state.closed || !self.make_room(&mut state, memory, Some(key)) {
                return;
            }
            state.reserve(memory);
            state.starting += 1;
            state.functions.entry(key.clone()).or_default().busy += 1;
            *state.generations.get(&key.function_id).unwrap_or(&0)
        };
        let _started = Started(self);
        match Sandbox::create(engine, request.spec.clone()) {
            Ok(sandbox) => self.release(Lease {
                key: key.clone(),
                generation,
                memory,
                keep_warm: request.keep_warm,
                sandbox,
                start: Start::Cold,
            }),
            Err(e) => {
                tracing::warn!(function_id = %key.function_id, version = key.version, error = %cloudfunc_sandbox::error_chain(&e), "could not keep a sandbox warm");
                let mut state = self.lock();
                self.forget(&mut state, key, memory);
            }
        }
    }

    /// Runs [`Pool::tick`] every `period` on a thread of its own, for the life of the process.
    pub fn start_housekeeping(self: &Arc<Self>, period: Duration) {
        let pool = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("cloudfunc-pool".into())
            .spawn(move || loop {
                match pool.upgrade() {
                    // After a shutdown the thread goes: holding the pool past the process's
                    // last other reference would keep its engines (and their cgroup
                    // parents) from being released.
                    Some(p) if p.lock().closed => return,
                    Some(p) => p.tick(),
                    None => return,
                }
                std::thread::sleep(period);
            })
            .expect("a thread starts");
    }
}
