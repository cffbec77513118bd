//! Where the platform's wall-clock time comes from: the system's, or (in tests) one that
//! moves only when told, so that a simulated day of calls takes seconds.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Wall-clock time, Unix milliseconds.
pub trait WallClock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now_ms(&self) -> i64;
    /// Signalled whenever the clock is moved by hand (`None`: it moves by itself). One
    /// waiter: a move while it is busy is kept for its next wait.
    fn moved(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWall;

impl WallClock for SystemWall {
    fn now_ms(&self) -> i64 {
        crate::model::now_ms()
    }
}

/// A clock that moves only when told.
#[derive(Debug)]
pub struct ManualWall {
    ms: AtomicI64,
    moved: Arc<Notify>,
}

impl ManualWall {
    /// A clock standing at `ms`.
    pub fn at(ms: i64) -> ManualWall {
        ManualWall {
            ms: AtomicI64::new(ms),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Moves it to `ms`.
    pub fn set(&self, ms: i64) {
        self.ms.store(ms, Ordering::SeqCst);
        self.moved.notify_one();
    }

    /// Moves it forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.ms.fetch_add(ms, Ordering::SeqCst);
        self.moved.notify_one();
    }
}

impl WallClock for ManualWall {
    fn now_ms(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }

    fn moved(&self) -> Option<Arc<Notify>> {
        Some(self.moved.clone())
    }
}
