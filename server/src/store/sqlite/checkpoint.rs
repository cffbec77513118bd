//! The WAL's checkpointer: a thread of its own copies the WAL back into the database, off the
//! writers' path, and keeps the WAL bounded.
//!
//! A PASSIVE checkpoint copies what it can without waiting for anyone, but it never lets the
//! WAL start over while readers and the writer keep coming: under sustained load the WAL
//! grew by about 10 MB/s and was cut back only when the load stopped. A TRUNCATE checkpoint
//! from a connection of its own did not help: it waits for the writer's lock, which a busy
//! writer takes again at once (3 truncations in 3 s while the WAL passed 50 MB); run on the
//! writer's connection it still waited seconds for a gap between back-to-back reads. So when
//! the WAL passes its limit, the checkpointer takes the store's reader and then its writer
//! (reads and writes wait on their mutexes meanwhile) and restarts the WAL on the writer's
//! connection, with no reader to wait for: about 25 ms here for 1 MiB, once per limit's
//! worth of writes. Both mutexes are fair (FIFO hand-off), so back-to-back reads and commits
//! cannot starve the checkpointer; it waits for the reads queued before it, which are
//! indexed lookups. `journal_size_limit` then keeps the file at the limit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::FairMutex;
use std::time::Duration;

use rusqlite::Connection;

/// What the checkpointer did, for health and tests.
#[derive(Debug, Default)]
pub struct CheckpointStats {
    /// WAL restarts forced by its size.
    pub truncations: AtomicU64,
}

/// A thread that checkpoints the WAL every so often until dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Checkpoints through `conn` every `every`, and restarts the WAL at `wal` through the
    /// store's `writer` (with its `reader` held too) once it is over `limit` bytes.
    pub(super) fn start(
        conn: Connection,
        reader: Arc<FairMutex<Connection>>,
        writer: Arc<FairMutex<Connection>>,
        wal: PathBuf,
        every: Duration,
        limit: u64,
        stats: Arc<CheckpointStats>,
    ) -> Checkpointer {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cloudfunc-checkpoint".into())
            .spawn(move || loop {
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                let checkpoint = |conn: &Connection, mode: &str| {
                    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                        r.get::<_, i64>(0)
                    })
                };
                if size > limit {
                    // In this order, as nothing in the store takes the reader while it holds
                    // the writer.
                    let _reads = reader.lock();
                    let writer = writer.lock();
                    match checkpoint(&writer, "RESTART") {
                        Ok(0) => {
                            stats.truncations.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(wal_bytes = size, "WAL over its limit: restarted");
                        }
                        // A reader held it off past the busy timeout: the next round tries.
                        Ok(_) => tracing::debug!(wal_bytes = size, "WAL restart held off"),
                        Err(e) => tracing::warn!(error = %e, "a WAL restart failed"),
                    }
                } else if let Err(e) = checkpoint(&conn, "PASSIVE") {
                    tracing::warn!(error = %e, "a WAL checkpoint failed");
                }
                match stopped.recv_timeout(every) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            })
            .ok();
        Checkpointer {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
