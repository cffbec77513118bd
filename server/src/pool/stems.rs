//! Stem cells: per runtime and isolation level, sandboxes with the language runtime loaded
//! and no function yet, bound to the first function that needs a sandbox and finds none idle.

use cloudfunc_sandbox::{Limits, Runtime, StemCell};

use super::housekeeping::Started;
use super::{Pool, Request, State};
use crate::isolation::Isolation;

/// A stem cell and the memory it commits.
#[derive(Debug)]
pub(super) struct Stem {
    pub(super) cell: StemCell,
    pub(super) memory: u64,
}

/// Stops a stem cell no one will bind, saying so if it cannot.
pub(super) fn stop_stem(cell: StemCell) {
    if let Err(e) = cell.shutdown() {
        tracing::warn!(error = %cloudfunc_sandbox::error_chain(&e), "stopping a stem cell failed");
    }
}

/// The memory a stem cell commits: the default limits'.
pub(super) fn stem_memory() -> u64 {
    Limits::default().memory_bytes
}

impl Pool {
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
                        state.reserve(stem_memory());
                        state.starting += 1;
                    }
                    let _started = Started(self);
                    match StemCell::start(engine, runtime, Limits::default()) {
                        Ok(cell) => {
                            let mut state = self.lock();
                            if state.closed {
                                // Shut down while it started: stop it, not keep it.
                                state.free(stem_memory());
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
                            tracing::warn!(%runtime, %isolation, error = %cloudfunc_sandbox::error_chain(&e), "could not pre-start a sandbox");
                            let mut state = self.lock();
                            state.free(stem_memory());
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Takes a stem cell that fits `request`, handing its place to the caller's reservation.
    pub(super) fn take_stem(&self, state: &mut State, request: &Request) -> Option<Stem> {
        let stems = state
            .stems
            .get_mut(&(request.spec.runtime, request.isolation))?;
        let i = stems.iter().position(|s| s.cell.fits(&request.spec))?;
        let stem = stems.swap_remove(i);
        state.free(stem.memory);
        Some(stem)
    }
}
