//! The warm pool: sandboxes kept between calls, and sandboxes started before any function
//! needs them.
//!
//! - A sandbox that served a call goes back idle for its function version, for that
//!   function's keep-warm period; each call resets the timer. It never serves another
//!   function, version or tenant: sandboxes are keyed by function id and version.
//! - Stem cells: per runtime and isolation level, a few sandboxes with the language runtime
//!   loaded and no function. A function with no idle sandbox takes one and binds it (its code,
//!   limits and environment), and [`Pool::tick`] starts a replacement.
//! - Per function: `min_instances` are kept up, `max_instances` run at once, and callers past
//!   that wait in a bounded queue; a sync caller finding it full is refused ([`PoolError::Busy`]).
//!   The queue is first come, first served: a sandbox given back goes straight to the caller
//!   at its head, and only that caller is woken.
//! - Globally: a cap on sandboxes and on the memory their limits commit. Past it, idle
//!   sandboxes (and stem cells) go first, least recently used first.
//! - Deactivating, deleting or redeploying drains a function: its idle sandboxes go at once,
//!   busy ones when their call ends.
//!
//! Every method but [`Pool::acquire_async`] blocks (sandboxes start and stop synchronously)
//! and is called from blocking threads; `acquire_async` lends to tasks on the async runtime
//! without a thread in the common cases. Time comes from a [`Clock`], so tests control it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudfunc_sandbox::{Error as SandboxError, Limits, Runtime, Sandbox, SandboxSpec, StemCell};
use serde::Serialize;

use crate::isolation::{Engines, Isolation};

/// Where time comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock(Mutex::new(Instant::now()))
    }
}

impl ManualClock {
    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Server-wide settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Sandboxes at once: idle, busy, starting and stem cells together.
    pub max_sandboxes: usize,
    /// Memory the sandboxes' limits may commit, together.
    pub max_memory_bytes: u64,
    /// Stem cells kept per runtime and isolation level (0: none).
    pub stem_cells: usize,
    /// Callers that may wait for one function's sandboxes before a sync call is refused.
    pub max_waiting: usize,
    /// How long a sync caller waits in that queue at most.
    pub max_wait: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_sandboxes: 1024,
            // Limits are ceilings, and an idle sandbox uses a few MiB of its 256: commit up to
            // four times the host's memory.
            max_memory_bytes: host_memory_bytes().saturating_mul(4),
            stem_cells: 1,
            max_waiting: 64,
            max_wait: Duration::from_secs(10),
        }
    }
}

fn host_memory_bytes() -> u64 {
    match crate::metrics::meminfo_bytes("MemTotal:") {
        0 => 4 << 30,
        n => n,
    }
}

/// A sandbox for one function version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub function_id: String,
    pub version: u32,
}

/// What a function asks of the pool.
#[derive(Debug, Clone)]
pub struct Request {
    pub isolation: Isolation,
    pub spec: SandboxSpec,
    pub keep_warm: Duration,
    pub min_instances: usize,
    pub max_instances: usize,
}

/// How the sandbox of a call came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Started for this call.
    Cold,
    /// A stem cell, bound for this call.
    Prewarmed,
    /// Kept from an earlier call.
    Warm,
}

impl Start {
    /// Its name in records.
    pub fn name(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Prewarmed => "prewarmed",
            Start::Warm => "warm",
        }
    }
}

/// Why no sandbox was handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The function is at its `max_instances` and its wait queue is full (or the wait ran out).
    #[error("function is at its concurrency limit ({max_instances} at once); retry later")]
    Busy {
        max_instances: usize,
        retry_after: Duration,
    },
    /// The machine is at its sandbox or memory cap with nothing idle to evict.
    #[error("the server is at its sandbox capacity; retry later")]
    Full { retry_after: Duration },
    /// The isolation level is not available here.
    #[error("{0}")]
    Unavailable(String),
    /// The sandbox did not start or the function did not load.
    #[error("the sandbox could not start")]
    Sandbox(#[source] SandboxError),
}

/// A sandbox lent to one call; give it back with [`Pool::release`].
#[derive(Debug)]
pub struct Lease {
    key: Key,
    generation: u64,
    memory: u64,
    keep_warm: Duration,
    /// The sandbox.
    pub sandbox: Sandbox,
    /// How it came to be.
    pub start: Start,
}

/// Counts for health and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolStats {
    /// Every sandbox the pool holds (idle, busy, starting, stem cells).
    pub sandboxes: usize,
    /// Bound to a function: idle plus busy.
    pub warm: usize,
    pub idle: usize,
    pub busy: usize,
    /// Stem cells ready.
    pub prewarmed: usize,
    /// Memory committed by the sandboxes' limits.
    pub memory_committed_bytes: u64,
    /// Callers waiting for a sandbox.
    pub waiting: usize,
    /// Calls served so far, by how their sandbox came to be.
    pub calls_cold: u64,
    pub calls_prewarmed: u64,
    pub calls_warm: u64,
    /// Idle sandboxes removed: expired, evicted, drained.
    pub expired: u64,
    pub evicted: u64,
    pub drained: u64,
    /// Sandboxes started (for a call or as stem cells), by backend.
    pub sandbox_starts: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Idle {
    sandbox: Sandbox,
    last_used: Instant,
    memory: u64,
    keep_warm: Duration,
}

/// A caller queued for a sandbox of one function version.
#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// Woken alone when its turn comes.
    wake: Wake,
}

/// How a queued caller is woken: a thread on its own condvar (waited on with the pool's
/// lock, like every condvar here), or a task through its own `Notify`.
#[derive(Debug)]
enum Wake {
    Thread(Arc<Condvar>),
    Task(Arc<tokio::sync::Notify>),
}

impl Wake {
    fn wake(&self) {
        match self {
            Wake::Thread(condvar) => condvar.notify_one(),
            // Kept as a permit should the task be between two waits.
            Wake::Task(notify) => notify.notify_one(),
        }
    }
}

/// What a queued caller is handed when its turn comes.
#[derive(Debug)]
enum Turn {
    /// The sandbox the call before gave back, still counted busy.
    Sandbox(Box<Idle>),
    /// The place a stopped sandbox left under `max_instances`: try again.
    Place,
}

#[derive(Debug, Default)]
struct FunctionState {
    idle: Vec<Idle>,
    /// Lent out or starting.
    busy: usize,
    /// Callers at `max_instances`, first come first.
    waiters: VecDeque<Waiter>,
    /// Callers waiting for room under the global caps.
    waiting_room: usize,
    /// What it asked last (for `min_instances`).
    request: Option<Request>,
}

#[derive(Debug)]
struct Stem {
    cell: StemCell,
    memory: u64,
}

#[derive(Debug, Default)]
struct State {
    functions: HashMap<Key, FunctionState>,
    stems: HashMap<(Runtime, Isolation), Vec<Stem>>,
    /// Per function id: bumped by a drain, so sandboxes lent before it are not kept.
    generations: HashMap<String, u64>,
    total: usize,
    memory: u64,
    stats: PoolStats,
    /// Shut down: nothing is kept any more.
    closed: bool,
    /// What queued callers were handed, by ticket, until they wake and take it.
    turns: HashMap<u64, Turn>,
    next_ticket: u64,
    /// Sandboxes being started off the callers' path (stem cells, `min_instances`), which a
    /// shutdown waits for.
    starting: usize,
}

/// The pool. Share it in an `Arc`.
#[derive(Debug)]
pub struct Pool {
    engines: Engines,
    config: PoolConfig,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Room freed under the caps, or a start under way ended.
    freed: Condvar,
    /// Sandboxes to stop, stopped off the callers' path.
    graveyard: Mutex<Vec<Sandbox>>,
}

/// How long a shutdown waits for sandboxes being started to be stopped again.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// Counts a start under way as ended when dropped, whichever way it ended.
struct Started<'a>(&'a Pool);

impl Drop for Started<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.starting -= 1;
        drop(state);
        self.0.freed.notify_all();
    }
}

/// Gives the caller first in `key`'s queue its turn: `idle`, a sandbox given back, or with
/// none, the place a stopped sandbox left. Wakes that caller alone. Returns `idle` when no
/// one is queued.
fn hand_over(state: &mut State, key: &Key, idle: Option<Idle>) -> Option<Idle> {
    let Some(f) = state.functions.get_mut(key) else {
        return idle;
    };
    let Some(waiter) = f.waiters.pop_front() else {
        return idle;
    };
    let turn = match idle {
        Some(idle) => {
            f.busy += 1;
            Turn::Sandbox(Box::new(idle))
        }
        None => Turn::Place,
    };
    state.turns.insert(waiter.ticket, turn);
    waiter.wake.wake();
    None
}

/// An idle sandbox of `key`, lent as warm, if there is one. Notes `request` as what the
/// function asks (for `min_instances`).
fn take_idle(state: &mut State, key: &Key, request: &Request, counted: bool) -> Option<Lease> {
    let f = state.functions.entry(key.clone()).or_default();
    f.request = Some(request.clone());
    let idle = f.idle.pop()?;
    f.busy += 1;
    Some(warm_lease(state, key, request, idle, counted))
}

/// The lease of an idle sandbox taken for a call (already counted busy).
fn warm_lease(state: &mut State, key: &Key, request: &Request, idle: Idle, counted: bool) -> Lease {
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

/// The answer to a caller whose function is at `max_instances` and whose queue is full, or
/// whose wait ran out.
fn busy(max_instances: usize) -> PoolError {
    PoolError::Busy {
        max_instances,
        retry_after: Duration::from_secs(1),
    }
}

/// Puts a caller at the back of `key`'s queue, to be woken by `wake`; returns its ticket.
fn enqueue(state: &mut State, key: &Key, wake: Wake) -> u64 {
    let ticket = state.next_ticket;
    state.next_ticket += 1;
    let f = state.functions.entry(key.clone()).or_default();
    f.waiters.push_back(Waiter { ticket, wake });
    ticket
}

/// A caller's place in a function's queue, and what bounds its wait.
struct Place<'a> {
    key: &'a Key,
    request: &'a Request,
    ticket: u64,
    max: usize,
    sync: bool,
    since: Instant,
    counted: bool,
}

/// What a queued caller does once woken.
enum Woken {
    /// Takes the sandbox handed to it.
    Take(Box<Lease>),
    /// Tries again from the start: a place was handed over, or one is free.
    Retry,
    /// Gives up: a sync caller past its wait.
    Refused(PoolError),
    /// Waits on.
    Wait,
}

/// A task's place in a function's queue while it waits. Dropped before its turn was taken,
/// it leaves the queue and passes on what it was handed: the sandbox is given back as after
/// a call, the place goes to the next caller.
struct QueuedTask<'a> {
    pool: &'a Pool,
    place: Place<'a>,
    /// It took its turn or left the queue itself.
    left: bool,
}

impl Drop for QueuedTask<'_> {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let Place {
            key,
            request,
            ticket,
            ..
        } = self.place;
        let mut state = self.pool.lock();
        if let Some(f) = state.functions.get_mut(key) {
            f.waiters.retain(|w| w.ticket != ticket);
        }
        let handed = match state.turns.remove(&ticket) {
            Some(Turn::Sandbox(idle)) => Some(warm_lease(&mut state, key, request, *idle, false)),
            Some(Turn::Place) => {
                hand_over(&mut state, key, None);
                None
            }
            None => None,
        };
        drop(state);
        // A sandbox handed over goes back as any call's does: to the next caller, or idle.
        match handed {
            Some(lease) => self.pool.release(lease),
            None => self.pool.freed.notify_all(),
        }
    }
}

/// Stops a stem cell no one will bind, saying so if it cannot.
fn stop_stem(cell: StemCell) {
    if let Err(e) = cell.shutdown() {
        eprintln!("cloudfunc: stopping a stem cell: {e}");
    }
}

/// The memory a stem cell commits: the default limits'.
fn stem_memory() -> u64 {
    Limits::default().memory_bytes
}

impl Pool {
    /// A pool over `engines`.
    pub fn new(engines: Engines, config: PoolConfig, clock: Arc<dyn Clock>) -> Pool {
        Pool {
            engines,
            config,
            clock,
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
            graveyard: Mutex::new(Vec::new()),
        }
    }

    /// The engines.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A sandbox for `key`: an idle one, else a bound stem cell, else a new one. `sync` callers
    /// are refused when the function's wait queue is full; others wait their turn.
    pub fn acquire(&self, key: &Key, request: &Request, sync: bool) -> Result<Lease, PoolError> {
        self.lend(key, request, sync, true)
    }

    /// Whether a sync caller waiting since `since` has waited its longest.
    fn out_of_time(&self, sync: bool, since: Instant) -> bool {
        sync && self.clock.now().duration_since(since) >= self.config.max_wait
    }

    /// What a queued caller does once woken, by its turn or after 100 ms: it takes the
    /// sandbox handed to it, or tries again for a place handed over or free (that no one
    /// handed over), or gives up (leaving the queue), or waits on.
    fn on_wake(&self, state: &mut State, place: &Place) -> Woken {
        match state.turns.remove(&place.ticket) {
            Some(Turn::Sandbox(idle)) => {
                let (key, request) = (place.key, place.request);
                return Woken::Take(Box::new(warm_lease(
                    state,
                    key,
                    request,
                    *idle,
                    place.counted,
                )));
            }
            Some(Turn::Place) => return Woken::Retry,
            None => {}
        }
        let gave_up = self.out_of_time(place.sync, place.since);
        let f = state.functions.entry(place.key.clone()).or_default();
        if !gave_up && f.busy >= place.max {
            return Woken::Wait;
        }
        f.waiters.retain(|w| w.ticket != place.ticket);
        match gave_up {
            true => Woken::Refused(busy(place.max)),
            false => Woken::Retry,
        }
    }

    /// [`Pool::acquire`] for a task on a tokio runtime. The common cases take no thread: an
    /// idle sandbox is lent at once, and at `max_instances` the task waits in the function's
    /// queue (the same queue, in the same order, as blocking callers) until a sandbox is
    /// handed to it. Starting a sandbox, binding a stem cell and waiting for room under the
    /// global caps happen on a blocking thread, through [`Pool::acquire`].
    ///
    /// Should the task be dropped while it waits, it leaves the queue, and a sandbox handed
    /// to it meanwhile goes to the next caller.
    pub async fn acquire_async(
        self: &Arc<Self>,
        key: &Key,
        request: &Request,
        sync: bool,
    ) -> Result<Lease, PoolError> {
        let max = request.max_instances.max(1);
        let waited_since = self.clock.now();
        let queued = {
            let mut state = self.lock();
            if let Some(lease) = take_idle(&mut state, key, request, true) {
                return Ok(lease);
            }
            let f = state.functions.entry(key.clone()).or_default();
            if f.busy >= max {
                if sync && f.waiters.len() >= self.config.max_waiting {
                    return Err(busy(max));
                }
                let notify = Arc::new(tokio::sync::Notify::new());
                let ticket = enqueue(&mut state, key, Wake::Task(notify.clone()));
                Some((ticket, notify))
            } else {
                None
            }
        };
        if let Some((ticket, notify)) = queued {
            let mut queued = QueuedTask {
                pool: self,
                place: Place {
                    key,
                    request,
                    ticket,
                    max,
                    sync,
                    since: waited_since,
                    counted: true,
                },
                left: false,
            };
            loop {
                // Woken when handed its turn; it looks again every 100 ms, as a thread does.
                let _ = tokio::time::timeout(Duration::from_millis(100), notify.notified()).await;
                let woken = self.on_wake(&mut self.lock(), &queued.place);
                queued.left = !matches!(woken, Woken::Wait);
                match woken {
                    Woken::Take(lease) => return Ok(*lease),
                    Woken::Refused(e) => return Err(e),
                    Woken::Retry => break,
                    Woken::Wait => {}
                }
            }
        }
        let (pool, key, request) = (self.clone(), key.clone(), request.clone());
        tokio::task::spawn_blocking(move || pool.acquire(&key, &request, sync))
            .await
            .unwrap_or_else(|e| Err(PoolError::Unavailable(format!("the start failed: {e}"))))
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
            if let Some(lease) = take_idle(&mut state, key, request, counted) {
                return Ok(lease);
            }
            let f = state.functions.entry(key.clone()).or_default();
            if f.busy < max {
                // A deploy's load is speculative: it takes only free room, evicting nothing.
                let room = if counted {
                    self.make_room(&mut state, memory, Some(key))
                } else {
                    self.fits(&state, memory)
                };
                if room {
                    let f = state.functions.entry(key.clone()).or_default();
                    f.busy += 1;
                    state.total += 1;
                    state.memory += memory;
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
                // Wait for room (an async task: it has nowhere else to go).
                state.functions.entry(key.clone()).or_default().waiting_room += 1;
                let (s, _) = self
                    .freed
                    .wait_timeout(state, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner());
                state = s;
                state.functions.entry(key.clone()).or_default().waiting_room -= 1;
                continue;
            }
            // A sync caller waits a bounded time in a bounded queue; a queued task waits on.
            if (sync && f.waiters.len() >= self.config.max_waiting)
                || self.out_of_time(sync, waited_since)
            {
                return Err(busy(max));
            }
            // Queue for this function's next sandbox given back.
            let wake = Arc::new(Condvar::new());
            let place = Place {
                key,
                request,
                ticket: enqueue(&mut state, key, Wake::Thread(wake.clone())),
                max,
                sync,
                since: waited_since,
                counted,
            };
            loop {
                let (s, _) = wake
                    .wait_timeout(state, Duration::from_millis(100))
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
            state.total -= 1;
            state.memory -= memory;
            self.bury(sandbox);
            hand_over(&mut state, &key, None);
        }
        drop(state);
        // Room freed, or an idle sandbox another function's caller may evict.
        self.freed.notify_all();
    }

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
                state.total -= 1;
                state.memory -= i.memory;
                state.stats.drained += 1;
                self.bury(i.sandbox);
            }
        }
        drop(state);
        self.freed.notify_all();
        generation
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
                state.total -= 1;
                state.memory -= i.memory;
                state.stats.expired += 1;
                self.bury(i.sandbox);
            }
            state.functions.retain(|_, f| {
                !f.idle.is_empty()
                    || f.busy > 0
                    || !f.waiters.is_empty()
                    || f.waiting_room > 0
                    || f.request.as_ref().is_some_and(|r| r.min_instances > 0)
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
    fn prestart(&self, key: &Key, request: &Request) {
        let Ok(engine) = self.engines.get(request.isolation) else {
            return;
        };
        let memory = request.spec.limits.memory_bytes;
        let generation = {
            let mut state = self.lock();
            if state.closed || !self.make_room(&mut state, memory, Some(key)) {
                return;
            }
            state.total += 1;
            state.memory += memory;
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
                eprintln!("cloudfunc: could not keep a sandbox of {key:?} warm: {e}");
                let mut state = self.lock();
                self.forget(&mut state, key, memory);
            }
        }
    }

    /// Starts stem cells up to the configured number per runtime and isolation level.
    pub fn refill_stems(&self) {
        for isolation in Isolation::ALL {
            let Ok(engine) = self.engines.get(isolation) else {
                continue;
            };
            for runtime in Runtime::ALL {
                if !runtime.available() {
                    continue;
                }
                loop {
                    {
                        let mut state = self.lock();
                        let have = state.stems.get(&(runtime, isolation)).map_or(0, Vec::len);
                        if state.closed
                            || have >= self.config.stem_cells
                            || !self.make_room(&mut state, stem_memory(), None)
                        {
                            break;
                        }
                        state.total += 1;
                        state.memory += stem_memory();
                        state.starting += 1;
                    }
                    let _started = Started(self);
                    match StemCell::start(engine, runtime, Limits::default()) {
                        Ok(cell) => {
                            let mut state = self.lock();
                            if state.closed {
                                // Shut down while it started: stop it, not keep it.
                                state.total -= 1;
                                state.memory -= stem_memory();
                                drop(state);
                                stop_stem(cell);
                                break;
                            }
                            *state
                                .stats
                                .sandbox_starts
                                .entry(engine.backend_name().to_string())
                                .or_default() += 1;
                            state
                                .stems
                                .entry((runtime, isolation))
                                .or_default()
                                .push(Stem {
                                    cell,
                                    memory: stem_memory(),
                                });
                        }
                        Err(e) => {
                            eprintln!("cloudfunc: could not pre-start a {runtime} sandbox ({isolation}): {e}");
                            let mut state = self.lock();
                            state.total -= 1;
                            state.memory -= stem_memory();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Takes a stem cell that fits `request`, handing its place to the caller's reservation.
    fn take_stem(&self, state: &mut State, request: &Request) -> Option<Stem> {
        let stems = state
            .stems
            .get_mut(&(request.spec.runtime, request.isolation))?;
        let i = stems.iter().position(|s| s.cell.fits(&request.spec))?;
        let stem = stems.swap_remove(i);
        state.total -= 1;
        state.memory -= stem.memory;
        Some(stem)
    }

    /// Frees room for one more sandbox of `memory` bytes by stopping idle sandboxes of other
    /// functions (least recently used first), then stem cells. False if that is not enough.
    fn make_room(&self, state: &mut State, memory: u64, for_key: Option<&Key>) -> bool {
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
                state.total -= 1;
                state.memory -= idle.memory;
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
                    state.total -= 1;
                    state.memory -= stem.memory;
                    state.stats.evicted += 1;
                    let _ = std::thread::spawn(move || stop_stem(stem.cell));
                }
                None => return false,
            }
        }
        true
    }

    /// Whether one more sandbox of `memory` bytes fits under the caps as things are.
    fn fits(&self, state: &State, memory: u64) -> bool {
        state.total < self.config.max_sandboxes
            && state.memory + memory <= self.config.max_memory_bytes
    }

    /// Undoes a reservation whose sandbox never came.
    fn forget(&self, state: &mut State, key: &Key, memory: u64) {
        if let Some(f) = state.functions.get_mut(key) {
            f.busy = f.busy.saturating_sub(1);
        }
        state.total -= 1;
        state.memory -= memory;
        hand_over(state, key, None);
        self.freed.notify_all();
    }

    /// Sets a sandbox aside to be stopped by [`Pool::bury_now`] (off the caller's path).
    fn bury(&self, sandbox: Sandbox) {
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
                eprintln!("cloudfunc: stopping a sandbox: {e}");
            }
        }
    }

    /// The counts.
    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        stats.sandboxes = state.total;
        stats.idle = state.functions.values().map(|f| f.idle.len()).sum();
        stats.busy = state.functions.values().map(|f| f.busy).sum();
        stats.waiting = state
            .functions
            .values()
            .map(|f| f.waiters.len() + f.waiting_room)
            .sum();
        stats.warm = stats.idle + stats.busy;
        stats.prewarmed = state.stems.values().map(Vec::len).sum();
        stats.memory_committed_bytes = state.memory;
        stats
    }

    /// How many idle sandboxes `key` has.
    pub fn idle_count(&self, key: &Key) -> usize {
        self.lock().functions.get(key).map_or(0, |f| f.idle.len())
    }

    /// Stops every idle sandbox and stem cell (at shutdown; busy ones stop when given back).
    pub fn shutdown(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            let mut idle = Vec::new();
            for f in state.functions.values_mut() {
                f.request = None;
                idle.append(&mut f.idle);
            }
            // Busy ones are still counted; they are stopped when given back.
            for i in idle {
                state.total -= 1;
                state.memory -= i.memory;
                self.bury(i.sandbox);
            }
            let stems = std::mem::take(&mut state.stems);
            for stem in stems.into_values().flatten() {
                state.total -= 1;
                state.memory -= stem.memory;
                stop_stem(stem.cell);
            }
        }
        self.bury_now();
        // A start under way sees `closed` when it ends and stops what it started.
        let state = self.lock();
        let _ = self
            .freed
            .wait_timeout_while(state, SHUTDOWN_WAIT, |s| s.starting > 0);
        self.bury_now();
    }

    /// Runs [`Pool::tick`] every `period` on a thread of its own, for the life of the process.
    pub fn start_housekeeping(self: &Arc<Self>, period: Duration) {
        let pool = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("cloudfunc-pool".into())
            .spawn(move || loop {
                match pool.upgrade() {
                    Some(p) => p.tick(),
                    None => return,
                }
                std::thread::sleep(period);
            })
            .expect("a thread starts");
    }
}
