//! Group commit: writes of tasks from many calls at once go to the store in one transaction.
//!
//! A caller hands its [`Write`] to the recorder's thread and waits until it is committed, so
//! what a caller is told is on disk. While one batch commits, the next ones queue; the thread
//! then takes everything queued (up to [`MAX_BATCH`]) into the next transaction. One caller
//! alone pays one commit, as before; many share each commit.

use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Result, Store, StoreError, Write};

/// The most writes in one transaction.
pub const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<()>>;

/// The handle callers write through. Cheap to clone; the thread ends when the last is dropped.
#[derive(Debug, Clone)]
pub struct Recorder {
    queue: mpsc::Sender<(Write, Reply)>,
}

impl Recorder {
    /// Starts the recorder's thread over `store`.
    pub fn start(store: Arc<dyn Store>) -> std::io::Result<Recorder> {
        let (queue, incoming) = mpsc::channel::<(Write, Reply)>();
        std::thread::Builder::new()
            .name("cloudfunc-recorder".into())
            .spawn(move || {
                while let Ok(first) = incoming.recv() {
                    let mut batch = vec![first];
                    batch.extend(incoming.try_iter().take(MAX_BATCH - 1));
                    commit(store.as_ref(), batch);
                }
            })?;
        Ok(Recorder { queue })
    }

    /// Stores `write`; returns once it is committed.
    pub async fn write(&self, write: Write) -> Result<()> {
        let (reply, committed) = oneshot::channel();
        self.queue.send((write, reply)).map_err(|_| gone())?;
        committed.await.map_err(|_| gone())?
    }

    /// [`Recorder::write`] for a thread outside the async runtime.
    pub fn write_blocking(&self, write: Write) -> Result<()> {
        let (reply, committed) = oneshot::channel();
        self.queue.send((write, reply)).map_err(|_| gone())?;
        committed.blocking_recv().map_err(|_| gone())?
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("the recorder has stopped".into())
}

/// Commits a batch in one transaction. Should it fail, each write is tried alone, so that one
/// bad write fails only its own caller.
fn commit(store: &dyn Store, batch: Vec<(Write, Reply)>) {
    let (writes, replies): (Vec<Write>, Vec<Reply>) = batch.into_iter().unzip();
    if writes.len() > 1 && store.write(&writes).is_ok() {
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
        return;
    }
    for (write, reply) in writes.into_iter().zip(replies) {
        let _ = reply.send(store.write(std::slice::from_ref(&write)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Completion, TaskStatus};
    use crate::store::tests::{task, version};
    use crate::store::SqliteStore;

    fn ending() -> Completion {
        Completion {
            status: TaskStatus::Succeeded,
            result: Some(serde_json::json!(1)),
            error: None,
            logs: String::new(),
            logs_truncated: false,
            usage: None,
        }
    }

    #[test]
    fn many_writers_share_commits_and_a_bad_write_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let (id, n) = store.next_version("a", "f").unwrap();
        let f = store.add_version("a", &id, "f", &version(n)).unwrap();
        let recorder = Recorder::start(store.clone()).unwrap();
        let duplicate = task("a", &f, "async");
        recorder
            .write_blocking(Write::Insert(duplicate.clone()))
            .unwrap();

        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (recorder, f, duplicate) = (recorder.clone(), f.clone(), duplicate.clone());
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for j in 0..50 {
                        if i == 0 && j == 25 {
                            // The same id again: refused, alone.
                            let again = recorder.write_blocking(Write::Insert(duplicate.clone()));
                            assert!(matches!(again, Err(StoreError::Sqlite(_))), "{again:?}");
                            continue;
                        }
                        let mut t = task("a", &f, "sync");
                        t.status = TaskStatus::Running;
                        recorder
                            .write_blocking(Write::Finished {
                                task: Box::new(t.clone()),
                                completion: ending(),
                                at: crate::model::now_ms(),
                            })
                            .unwrap();
                        ids.push(t.task_id);
                    }
                    ids
                })
            })
            .collect();
        let ids: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(ids.len(), 399);
        for id in &ids {
            let t = store.task(None, id).unwrap().unwrap();
            assert_eq!(t.status, TaskStatus::Succeeded);
        }
        let counted: u64 = store
            .rollups(None, None, 60_000, 0, i64::MAX)
            .unwrap()
            .iter()
            .map(|r| r.stats.count)
            .sum();
        assert_eq!(counted, 399, "each finished call counted once");
        assert_eq!(store.queue_depth().unwrap(), 1);
    }
}
