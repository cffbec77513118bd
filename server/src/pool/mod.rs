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

mod capacity;
mod clock;
mod housekeeping;
mod lend;
mod queue;
mod stems;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudfunc_sandbox::{Error as SandboxError, Runtime, Sandbox, SandboxSpec};
use serde::Serialize;

use crate::isolation::{Engines, Isolation};

pub use clock::{Clock, ManualClock, SystemClock};
use queue::{Turn, Waiter};
use stems::{stop_stem, Stem};

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
    /// The pool's count of drains ([`Pool::drains`]) read before the version this was made
    /// from was looked up, if the caller wants to hear of a drain since: one (of any
    /// function: drains are rare, and a second look is cheap) refuses the request with
    /// [`PoolError::Stale`], rather than start a sandbox with what was true before it.
    pub resolved_at: Option<u64>,
    /// When the caller stops waiting (by the pool's clock): a request still waiting for a
    /// sandbox then is refused with [`PoolError::Deadline`]. A chain run's timeout sets it.
    pub until: Option<Instant>,
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

/// How a caller of [`Pool::acquire_async`] waits while its function is at `max_instances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lend {
    /// A sync call: in a bounded line, for at most `max_wait`; refused past either.
    Sync,
    /// An async call (a step of an async chain run): as long as it takes.
    Task,
    /// A task the queue claimed: as long as it takes, unless the server starts to stop first
    /// ([`Pool::stop_lending_to_tasks`]); then it is refused, so that it can go back to the
    /// queue unstarted.
    Queued,
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
    /// The server is stopping and lends no more to queued tasks that have not started
    /// ([`Pool::stop_lending_to_tasks`]).
    #[error("the server is stopping; the task waits in the queue for the next start")]
    Stopping,
    /// The function was drained after the request was made ([`Request::resolved_at`]): look
    /// its version up again and ask anew.
    #[error("the function changed while the call waited for a sandbox")]
    Stale,
    /// The version's code tree was removed ([`Pool::retire_code`]) after the request was
    /// made: look the version up again, which extracts it anew.
    #[error("the function's code is not on this server and could not be restored")]
    CodeGone,
    /// The caller's deadline ([`Request::until`]) passed while it waited for a sandbox.
    #[error("the call's deadline passed while it waited for a sandbox; it did not run")]
    Deadline,
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

impl FunctionState {
    /// Whether a sandbox of it is idle, lent or starting, or a caller waits for one.
    fn in_use(&self) -> bool {
        !self.idle.is_empty() || self.busy > 0 || !self.waiters.is_empty() || self.waiting_room > 0
    }
}

#[derive(Debug, Default)]
struct State {
    functions: HashMap<Key, FunctionState>,
    stems: HashMap<(Runtime, Isolation), Vec<Stem>>,
    /// Per function id: bumped by a drain, so sandboxes lent before it are not kept.
    generations: HashMap<String, u64>,
    /// Sandboxes counted against the caps: idle, busy, starting and stem cells. Changed only
    /// through [`State::reserve`] and [`State::free`].
    total: usize,
    /// Memory their limits commit.
    memory: u64,
    stats: PoolStats,
    /// Shut down: nothing is kept any more.
    closed: bool,
    /// Stopping: a task the queue claimed ([`Lend::Queued`]) is lent only an idle sandbox,
    /// or one handed to it, and otherwise refused, so that it can go back to the queue
    /// unstarted.
    tasks_refused: bool,
    /// What queued callers were handed, by ticket, until they wake and take it.
    turns: HashMap<u64, Turn>,
    next_ticket: u64,
    /// Sandboxes being started off the callers' path (stem cells, `min_instances`), which a
    /// shutdown waits for.
    starting: usize,
}

impl State {
    /// Counts one more sandbox of `memory` bytes against the caps (it is starting, or
    /// about to be).
    fn reserve(&mut self, memory: u64) {
        self.total += 1;
        self.memory += memory;
    }

    /// Counts a sandbox of `memory` bytes no more (it stopped, or never came).
    fn free(&mut self, memory: u64) {
        self.total -= 1;
        self.memory -= memory;
    }
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
    /// Drains of any function so far ([`Pool::drains`]): read without the lock.
    drains: std::sync::atomic::AtomicU64,
}

/// How long a shutdown waits for sandboxes being started to be stopped again.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

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
            drains: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The engines.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// At the start of a graceful stop: from now on a task the queue claimed ([`Lend::Queued`])
    /// that waits for a sandbox, or comes for one, is refused ([`PoolError::Stopping`]) unless
    /// an idle sandbox is there or one is handed to it, so that tasks claimed but not started
    /// go back to the queue rather than wait for sandboxes (and hold the stop) or start new
    /// ones. Other callers are served as before.
    pub fn stop_lending_to_tasks(&self) {
        let mut state = self.lock();
        state.tasks_refused = true;
        // Every waiting task looks again; those not refused wait on.
        for waiter in state.functions.values().flat_map(|f| &f.waiters) {
            waiter.wake_task();
        }
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
                state.free(i.memory);
                self.bury(i.sandbox);
            }
            let stems = std::mem::take(&mut state.stems);
            for stem in stems.into_values().flatten() {
                state.free(stem.memory);
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
}
