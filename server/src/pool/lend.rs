//! Lending sandboxes to calls and taking them back: an idle one if there is one, else a
//! bound stem cell, else a new sandbox, under the function's `max_instances` and the pool's
//! caps.

use std::sync::{Arc, Condvar};
use std::time::Duration;

use cloudfunc_sandbox::Sandbox;

use super::queue::{busy, enqueue, hand_over, Place, Wake, Woken};
use super::{Idle, Key, Lease, Lend, Pool, PoolError, Request, Start, State};

/// An idle sandbox of `key`, lent as warm, if there is one. Notes `request` as what the
/// function asks (for `min_instances`).
pub(super) fn take_idle(
    state: &mut State,
    key: &Key,
    request: &Request,
    counted: bool,
) -> Option<Lease> {
    let f = state.functions.entry(key.clone()).or_default();
    f.request = Some(request.clone());
    let idle = f.idle.pop()?;
    f.busy += 1;
    Some(warm_lease(state, key, request, idle, counted))
}

/// The lease of an idle sandbox taken for a call (already counted busy).
pub(super) fn warm_lease(
    state: &mut State,
    key: &Key,
    request: &Request,
    idle: Idle,
    counted: bool,
) -> Lease {
    if counted {
        state.stats.calls_warm += 1;
    }
    Lease {
        key: key.clone(),
        generation: *state.generations.get(&key.function_id).unwrap_or(&0),
        memory: idle.memory,
        keep_warm: request.keep_warm,
        sandbox: idle.sandbox,
        start: Start::Warm,
    }
}

impl Pool {
    /// How many drains there have been: read it before looking a version up, and put it in
    /// the [`Request`] made from it.
    pub fn drains(&self) -> u64 {
        self.drains.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether a function was drained since `request` was made ([`Request::resolved_at`]).
    pub(super) fn stale(&self, request: &Request) -> bool {
        request.resolved_at.is_some_and(|at| at != self.drains())
    }

    /// A sandbox for `key`: an idle one, else a bound stem cell, else a new one. `sync` callers
    /// are refused when the function's wait queue is full; others wait their turn.
    pub fn acquire(&self, key: &Key, request: &Request, sync: bool) -> Result<Lease, PoolError> {
        self.lend(key, request, sync, true)
    }

    /// A sandbox with `key`'s version loaded, for a deploy to prove that the version loads
    /// before it is stored: a bound stem cell when one fits, else a new sandbox. It counts
    /// as no call. Hand it to [`Pool::keep`] once the version is stored, to serve its first
    /// call warm, or to [`Pool::discard`]. Where it does not fit under the caps without
    /// evicting anything, it is refused at once (as [`PoolError::Full`]).
    pub fn load(&self, key: &Key, request: &Request) -> Result<Lease, PoolError> {
        self.lend(key, request, true, false)
    }

    /// Keeps a sandbox from [`Pool::load`] idle for its version, although the deploy drained
    /// its function (to retire the older versions) after the sandbox was lent. `drained` is
    /// what that drain returned: after any later drain, the sandbox is stopped instead.
    pub fn keep(&self, mut lease: Lease, drained: u64) {
        lease.generation = drained;
        self.release(lease);
    }

    /// Stops a lent sandbox instead of keeping it.
    pub fn discard(&self, mut lease: Lease) {
        lease.keep_warm = Duration::ZERO;
        self.release(lease);
    }

    fn lend(
        &self,
        key: &Key,
        request: &Request,
        sync: bool,
        counted: bool,
    ) -> Result<Lease, PoolError> {
        let engine = self
            .engines
            .get(request.isolation)
            .map_err(PoolError::Unavailable)?
            .clone();
        let memory = request.spec.limits.memory_bytes;
        let max = request.max_instances.max(1);
        let waited_since = self.clock.now();
        let mut state = self.lock();
        loop {
            // Read each time round: a drain while this caller waited concerns only the
            // sandboxes lent before it.
            let generation = *state.generations.get(&key.function_id).unwrap_or(&0);
            if self.stale(request) {
                return Err(PoolError::Stale);
            }
            if let Some(lease) = take_idle(&mut state, key, request, counted) {
                return Ok(lease);
            }
            let f = state.functions.entry(key.clone()).or_default();
            if f.busy < max {
                // Checked under the lock that retiring code takes: a tree retired before this
                // start is missed here, one retired after it waits for this sandbox to end.
                if counted && !request.spec.code_dir.is_dir() {
                    return Err(PoolError::CodeGone);
                }
                // A deploy's load is speculative: it takes only free room, evicting nothing.
                let room = if counted {
                    self.make_room(&mut state, memory, Some(key))
                } else {
                    self.fits(&state, memory)
                };
                if room {
                    let f = state.functions.entry(key.clone()).or_default();
                    f.busy += 1;
                    state.reserve(memory);
                    let stem = self.take_stem(&mut state, request);
                    drop(state);
                    let started = match stem {
                        Some(stem) => stem
                            .cell
                            .bind(request.spec.clone())
                            .map(|s| (s, Start::Prewarmed)),
                        None => {
                            Sandbox::create(&engine, request.spec.clone()).map(|s| (s, Start::Cold))
                        }
                    };
                    let mut state = self.lock();
                    return match started {
                        Ok((sandbox, start)) => {
                            match start {
                                Start::Cold => {
                                    if counted {
                                        state.stats.calls_cold += 1;
                                    }
                                    *state
                                        .stats
                                        .sandbox_starts
                                        .entry(engine.backend_name().to_string())
                                        .or_default() += 1;
                                }
                                _ if counted => state.stats.calls_prewarmed += 1,
                                _ => {}
                            }
                            Ok(Lease {
                                key: key.clone(),
                                generation,
                                memory,
                                keep_warm: request.keep_warm,
                                sandbox,
                                start,
                            })
                        }
                        Err(e) => {
                            self.forget(&mut state, key, memory);
                            Err(PoolError::Sandbox(e))
                        }
                    };
                }
                if sync {
                    return Err(PoolError::Full {
                        retry_after: Duration::from_secs(1),
                    });
                }
                if let Some(e) = self.out_of_time(request, sync, waited_since, max) {
                    return Err(e);
                }
                // Wait for room (an async task: it has nowhere else to go).
                state.functions.entry(key.clone()).or_default().waiting_room += 1;
                let (s, _) = self
                    .freed
                    .wait_timeout(state, self.wait_step(request))
                    .unwrap_or_else(|e| e.into_inner());
                state = s;
                state.functions.entry(key.clone()).or_default().waiting_room -= 1;
                continue;
            }
            // A sync caller waits a bounded time in a bounded queue; a queued task waits on.
            if sync && f.waiters.len() >= self.config.max_waiting {
                return Err(busy(max));
            }
            if let Some(e) = self.out_of_time(request, sync, waited_since, max) {
                return Err(e);
            }
            // Queue for this function's next sandbox given back.
            let wake = Arc::new(Condvar::new());
            let place = Place {
                key,
                request,
                ticket: enqueue(&mut state, key, Wake::Thread(wake.clone())),
                max,
                lend: if sync { Lend::Sync } else { Lend::Task },
                since: waited_since,
                counted,
            };
            loop {
                let (s, _) = wake
                    .wait_timeout(state, self.wait_step(request))
                    .unwrap_or_else(|e| e.into_inner());
                state = s;
                match self.on_wake(&mut state, &place) {
                    Woken::Take(lease) => return Ok(*lease),
                    Woken::Refused(e) => return Err(e),
                    Woken::Retry => break,
                    Woken::Wait => {}
                }
            }
        }
    }

    /// Gives a sandbox back after its call: idle again if it can serve another call and its
    /// function was not drained meanwhile; stopped otherwise.
    pub fn release(&self, lease: Lease) {
        let Lease {
            key,
            generation,
            memory,
            keep_warm,
            sandbox,
            ..
        } = lease;
        let mut state = self.lock();
        let current = *state.generations.get(&key.function_id).unwrap_or(&0) == generation;
        let now = self.clock.now();
        let closed = state.closed;
        let f = state.functions.entry(key.clone()).or_default();
        f.busy = f.busy.saturating_sub(1);
        if sandbox.is_alive() && current && !keep_warm.is_zero() && !closed {
            let idle = Idle {
                sandbox,
                last_used: now,
                memory,
                keep_warm,
            };
            match hand_over(&mut state, &key, Some(idle)) {
                // Straight to the next caller: nothing was freed, no one else need wake.
                None => return,
                Some(idle) => state.functions.entry(key).or_default().idle.push(idle),
            }
        } else {
            if !current {
                state.stats.drained += 1;
            }
            state.free(memory);
            self.bury(sandbox);
            hand_over(&mut state, &key, None);
        }
        drop(state);
        // Room freed, or an idle sandbox another function's caller may evict.
        self.freed.notify_all();
    }
}
