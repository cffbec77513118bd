//! Each function's queue of callers at its `max_instances`: first come, first served. A
//! sandbox given back goes straight to the caller at the head, and only that caller is woken;
//! threads wait on a condvar of their own, tasks on a `Notify`.

use std::sync::{Arc, Condvar};
use std::time::{Duration, Instant};

use super::lend::{take_idle, warm_lease};
use super::{Idle, Key, Lease, Lend, Pool, PoolError, Request, State};

/// A caller queued for a sandbox of one function version.
#[derive(Debug)]
pub(super) struct Waiter {
    ticket: u64,
    /// Woken alone when its turn comes.
    wake: Wake,
}

/// How a queued caller is woken: a thread on its own condvar (waited on with the pool's
/// lock, like every condvar here), or a task through its own `Notify`.
#[derive(Debug)]
pub(super) enum Wake {
    Thread(Arc<Condvar>),
    Task(Arc<tokio::sync::Notify>),
}

impl Waiter {
    /// Wakes the waiter if it is a task, to look at the pool again.
    pub(super) fn wake_task(&self) {
        if let Wake::Task(notify) = &self.wake {
            notify.notify_one();
        }
    }
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
pub(super) enum Turn {
    /// The sandbox the call before gave back, still counted busy.
    Sandbox(Box<Idle>),
    /// The place a stopped sandbox left under `max_instances`: try again.
    Place,
}

/// Gives the caller first in `key`'s queue its turn: `idle`, a sandbox given back, or with
/// none, the place a stopped sandbox left. Wakes that caller alone. Returns `idle` when no
/// one is queued.
pub(super) fn hand_over(state: &mut State, key: &Key, idle: Option<Idle>) -> Option<Idle> {
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

/// The answer to a caller whose function is at `max_instances` and whose queue is full, or
/// whose wait ran out.
pub(super) fn busy(max_instances: usize) -> PoolError {
    PoolError::Busy {
        max_instances,
        retry_after: Duration::from_secs(1),
    }
}

/// Puts a caller at the back of `key`'s queue, to be woken by `wake`; returns its ticket.
pub(super) fn enqueue(state: &mut State, key: &Key, wake: Wake) -> u64 {
    let ticket = state.next_ticket;
    state.next_ticket += 1;
    let f = state.functions.entry(key.clone()).or_default();
    f.waiters.push_back(Waiter { ticket, wake });
    ticket
}

/// Whether a caller who waits as `lend` says is refused a sandbox it would wait for or start:
/// a task the queue claimed, once the server stops ([`Pool::stop_lending_to_tasks`]).
fn refused(state: &State, lend: Lend) -> bool {
    lend == Lend::Queued && state.tasks_refused
}

/// A caller's place in a function's queue, and what bounds its wait.
pub(super) struct Place<'a> {
    pub(super) key: &'a Key,
    pub(super) request: &'a Request,
    pub(super) ticket: u64,
    pub(super) max: usize,
    pub(super) lend: Lend,
    pub(super) since: Instant,
    pub(super) counted: bool,
}

/// What a queued caller does once woken.
pub(super) enum Woken {
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
pub(super) struct QueuedTask<'a> {
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

impl Pool {
    /// How long a queued caller waits before it looks again: 100 ms, or less to its deadline.
    pub(super) fn wait_step(&self, request: &Request) -> Duration {
        let step = Duration::from_millis(100);
        request.until.map_or(step, |until| {
            step.min(until.saturating_duration_since(self.clock.now()))
        })
    }

    /// Why a caller waiting since `since` waits no longer, if it has waited its longest: to
    /// its own deadline ([`Request::until`]), or (a sync caller) the pool's `max_wait`.
    pub(super) fn out_of_time(
        &self,
        request: &Request,
        sync: bool,
        since: Instant,
        max: usize,
    ) -> Option<PoolError> {
        let now = self.clock.now();
        if request.until.is_some_and(|until| now >= until) {
            Some(PoolError::Deadline)
        } else if sync && now.duration_since(since) >= self.config.max_wait {
            Some(busy(max))
        } else {
            None
        }
    }

    /// What a queued caller does once woken, by its turn or after 100 ms: it takes the
    /// sandbox handed to it, or tries again for a place handed over or free (that no one
    /// handed over), or gives up (leaving the queue), or waits on.
    pub(super) fn on_wake(&self, state: &mut State, place: &Place) -> Woken {
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
            Some(Turn::Place) if refused(state, place.lend) => {
                // The place goes on to the next caller, as the caller's own leaving would.
                hand_over(state, place.key, None);
                return Woken::Refused(PoolError::Stopping);
            }
            Some(Turn::Place) => return Woken::Retry,
            None => {}
        }
        let refused = refused(state, place.lend);
        let sync = place.lend == Lend::Sync;
        let out = self.out_of_time(place.request, sync, place.since, place.max);
        let f = state.functions.entry(place.key.clone()).or_default();
        if !refused && out.is_none() && f.busy >= place.max {
            return Woken::Wait;
        }
        f.waiters.retain(|w| w.ticket != place.ticket);
        match (refused, out) {
            (true, _) => Woken::Refused(PoolError::Stopping),
            (false, Some(e)) => Woken::Refused(e),
            (false, None) => Woken::Retry,
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
        lend: Lend,
    ) -> Result<Lease, PoolError> {
        let sync = lend == Lend::Sync;
        let max = request.max_instances.max(1);
        let waited_since = self.clock.now();
        let queued = {
            let mut state = self.lock();
            if self.stale(request) {
                return Err(PoolError::Stale);
            }
            if let Some(lease) = take_idle(&mut state, key, request, true) {
                return Ok(lease);
            }
            if refused(&state, lend) {
                return Err(PoolError::Stopping);
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
                    lend,
                    since: waited_since,
                    counted: true,
                },
                left: false,
            };
            loop {
                // Woken when handed its turn; it looks again every 100 ms, as a thread does
                // (and at its deadline, if that is sooner).
                let _ = tokio::time::timeout(self.wait_step(request), notify.notified()).await;
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
}
