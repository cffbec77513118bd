//! Group commit: writes of tasks from many calls at once go to the store in one transaction.
//!
//! A caller hands its [`Write`] to the recorder's thread. While one batch commits, the next
//! ones queue; the thread then takes everything queued (up to [`MAX_BATCH`]) into the next
//! transaction. One caller alone pays one commit; many share each commit. A batch of writes
//! behind alone waits up to [`LINGER`] for others to share its commit.
//!
//! [`Recorder::write`] returns once the write is committed, so what a caller is told is on
//! disk. [`Recorder::write_behind`] returns once the write is queued, for a record whose
//! caller need not wait for the disk (a finished sync call: its caller has the result); it
//! waits for the commit only while more than [`BEHIND_LIMIT`] writes are queued. Readers
//! call [`Recorder::settle`] first, so a read sees every write queued before it.
//!
//! A write behind that the store refuses for a reason that may pass (a full disk) is kept
//! and tried again every second ([`Retry`]); reads find it there meanwhile.
//!
//! The queue claims through the recorder too ([`Recorder::claim`]): the claim is committed in
//! the transaction of the writes queued before it, so the end of a task that ran, queued
//! before its worker slot was given back, is durable no later than the claim that reuses the
//! slot. A node that dies leaves at most one task `running` per worker slot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::retry::{Retry, RETRY_EVERY};
use super::{Result, Store, StoreError, Write};
use crate::logging::Sparse;
use crate::model::Task;

/// The most writes in one transaction.
pub const MAX_BATCH: usize = 512;

/// The most writes queued behind their callers before [`Recorder::write_behind`] waits for
/// its commit, so a slow disk slows callers down instead of filling memory.
pub const BEHIND_LIMIT: usize = 4 * MAX_BATCH;

/// How long a batch of writes behind waits for more before it commits. Each commit writes
/// every page it touched to the WAL again (a task's row, its indexes, its rollups): one call
/// per commit cost about 120 µs of the recorder's CPU under load, mostly in `pwrite`. No one
/// waits on these writes, and a read settles the recorder first, which ends the wait at once.
pub const LINGER: Duration = Duration::from_millis(5);

/// What the recorder's thread is handed.
enum Message {
    /// A write, and who waits for its commit (no one for a write behind).
    Write(Box<Write>, Option<oneshot::Sender<Result<()>>>),
    /// Answered once everything queued before it is committed (or has failed).
    Settle(oneshot::Sender<()>),
    /// Queued tasks to claim once everything queued before is committed: as many as the
    /// limit says, asked on the recorder's thread just before the transaction.
    Claim(ClaimLimit, oneshot::Sender<Result<Vec<Task>>>),
}

/// How many tasks a claim takes, decided as late as can be: worker slots given back while the
/// claim waited for its turn are filled by it too (each slot's end was queued before the
/// slot was given back, so it is in the claim's transaction: [`take_claims`]).
pub type ClaimLimit = Box<dyn FnOnce() -> Want + Send>;

/// What a claim takes: up to `tasks` of the oldest queued tasks (at least one), stopping
/// before the one whose payload would take theirs past `bytes` (the first is taken whatever
/// its size: see [`Store::write_and_claim_within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub tasks: usize,
    pub bytes: u64,
}

impl Want {
    /// Up to `tasks` tasks, whatever their payloads.
    pub fn tasks(tasks: usize) -> Want {
        Want {
            tasks,
            bytes: u64::MAX,
        }
    }
}

/// Takes the claims out of `batch`, deciding each one's limit, and then the messages queued
/// meanwhile into `batch`: whatever a limit counted was given back after its end was queued,
/// so the end is in the batch. Again while that brings claims in.
fn take_claims(
    batch: &mut Vec<Message>,
    incoming: &mpsc::Receiver<Message>,
) -> Vec<(Want, oneshot::Sender<Result<Vec<Task>>>)> {
    let mut claims = Vec::new();
    let mut undecided: Vec<Message> = Vec::new();
    let mut rest = Vec::with_capacity(batch.len());
    for m in batch.drain(..) {
        match m {
            Message::Claim(..) => undecided.push(m),
            other => rest.push(other),
        }
    }
    while !undecided.is_empty() {
        for m in undecided.drain(..) {
            if let Message::Claim(limit, reply) = m {
                let want = limit();
                let tasks = want.tasks.max(1);
                claims.push((Want { tasks, ..want }, reply));
            }
        }
        for m in incoming.try_iter() {
            match m {
                Message::Claim(..) => undecided.push(m),
                other => rest.push(other),
            }
        }
    }
    *batch = rest;
    claims
}

impl Message {
    /// Whether someone waits for this message's commit.
    fn awaited(&self) -> bool {
        !matches!(self, Message::Write(_, None))
    }
}

/// The batch that starts with `first`: everything queued already and, while no one waits on
/// the batch, what arrives within [`LINGER`]; at most [`MAX_BATCH`] writes.
///
/// While it lingers the thread sleeps through the arrivals of writes behind (waking for each
/// one cost a futex wake-up and a context switch per call); a message someone waits for
/// unparks it, and `wakes` counts its returns from sleeping.
fn gather(first: Message, incoming: &mpsc::Receiver<Message>, wakes: &AtomicU64) -> Vec<Message> {
    let mut batch = vec![first];
    let until = Instant::now() + LINGER;
    let mut seen = 0;
    loop {
        batch.extend(incoming.try_iter().take(MAX_BATCH - batch.len()));
        if batch.len() >= MAX_BATCH || batch[seen..].iter().any(Message::awaited) {
            return batch;
        }
        seen = batch.len();
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return batch;
        }
        std::thread::park_timeout(left);
        wakes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The handle callers write through. Cheap to clone; the thread ends when the last is dropped.
#[derive(Debug, Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Message>,
    /// Writes queued and not yet committed.
    pending: Arc<AtomicUsize>,
    /// Batches committed so far.
    commits: Arc<AtomicU64>,
    /// Writes those batches held.
    written: Arc<AtomicU64>,
    /// Times the thread woke from waiting for messages.
    wakes: Arc<AtomicU64>,
    /// The recorder's thread, unparked for a message someone waits for.
    thread: std::thread::Thread,
    /// Writes behind the store refused for now.
    retry: Arc<Retry>,
    store: Arc<dyn Store>,
}

impl Recorder {
    /// Starts the recorder's thread over `store`.
    pub fn start(store: Arc<dyn Store>) -> std::io::Result<Recorder> {
        let (queue, incoming) = mpsc::channel::<Message>();
        let pending = Arc::new(AtomicUsize::new(0));
        let counted = pending.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let committed = commits.clone();
        let written = Arc::new(AtomicU64::new(0));
        let wrote = written.clone();
        let wakes = Arc::new(AtomicU64::new(0));
        let woken = wakes.clone();
        let retry = Arc::new(Retry::default());
        let (kept, recording) = (retry.clone(), store.clone());
        let thread = std::thread::Builder::new()
            .name("cloudfunc-recorder".into())
            .spawn(move || {
                let mut last_try = Instant::now();
                loop {
                    let next = if retry.is_empty() {
                        incoming
                            .recv()
                            .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                    } else {
                        incoming.recv_timeout(RETRY_EVERY)
                    };
                    match next {
                        Ok(first) => {
                            wakes.fetch_add(1, Ordering::Relaxed);
                            let mut batch = gather(first, &incoming, &wakes);
                            let claims = take_claims(&mut batch, &incoming);
                            commit(
                                store.as_ref(),
                                batch,
                                claims,
                                (&counted, &commits, &wrote),
                                &retry,
                            );
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if !retry.is_empty() && last_try.elapsed() >= RETRY_EVERY {
                        retry.attempt(store.as_ref());
                        last_try = Instant::now();
                    }
                }
            })?
            .thread()
            .clone();
        Ok(Recorder {
            queue,
            pending,
            commits: committed,
            written,
            wakes: woken,
            thread,
            retry: kept,
            store: recording,
        })
    }

    /// Writes behind that the store refused for now, kept for another try.
    pub fn kept(&self) -> &Retry {
        &self.retry
    }

    /// At a stop, once settled: tries the kept writes a last time and gives up on the rest
    /// (each is logged); returns how many were given up.
    pub async fn close(&self) -> usize {
        self.settle().await;
        let (retry, store) = (self.retry.clone(), self.store.clone());
        tokio::task::spawn_blocking(move || {
            retry.attempt(store.as_ref());
            retry.give_up()
        })
        .await
        .unwrap_or(0)
    }

    /// How many batches have been committed (or tried) so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// How many writes the committed batches held: with [`Recorder::commits`], how many
    /// writes share a commit.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes queued and not yet committed.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// How many times the thread woke from waiting for messages.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    fn send(&self, write: Write, reply: Option<oneshot::Sender<Result<()>>>) -> Result<()> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let message = Message::Write(Box::new(write), reply);
        let awaited = message.awaited();
        self.queue.send(message).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            gone()
        })?;
        if awaited {
            self.thread.unpark();
        }
        Ok(())
    }

    /// Stores `write`; returns once it is committed.
    pub async fn write(&self, write: Write) -> Result<()> {
        let (reply, committed) = oneshot::channel();
        self.send(write, Some(reply))?;
        committed.await.map_err(|_| gone())?
    }

    /// [`Recorder::write`] for a thread outside the async runtime.
    pub fn write_blocking(&self, write: Write) -> Result<()> {
        let (reply, committed) = oneshot::channel();
        self.send(write, Some(reply))?;
        committed.blocking_recv().map_err(|_| gone())?
    }

    /// Stores `write` without waiting for the disk, unless too many writes are queued already;
    /// a write the store then refuses for now is kept and tried again ([`Recorder::kept`]),
    /// one refused for good is logged as lost.
    pub async fn write_behind(&self, write: Write) -> Result<()> {
        if self.pending.load(Ordering::SeqCst) >= BEHIND_LIMIT {
            return self.write(write).await;
        }
        self.send(write, None)
    }

    /// Claims up to `limit` (at least one) of the oldest runnable queued tasks, in the
    /// transaction that commits every write queued before this call (where that transaction
    /// fails, the writes are tried as usual and the claim alone after them).
    pub async fn claim(&self, limit: usize) -> Result<Vec<Task>> {
        self.claim_with(Box::new(move || Want::tasks(limit))).await
    }

    /// [`Recorder::claim`] of as many tasks as `limit` says when the recorder's thread comes
    /// to the claim (at least one).
    pub async fn claim_with(&self, limit: ClaimLimit) -> Result<Vec<Task>> {
        let (reply, claimed) = oneshot::channel();
        self.queue
            .send(Message::Claim(limit, reply))
            .map_err(|_| gone())?;
        self.thread.unpark();
        claimed.await.map_err(|_| gone())?
    }

    /// Returns once every write queued before this call is committed (or has failed).
    pub async fn settle(&self) {
        if self.pending.load(Ordering::SeqCst) == 0 {
            return;
        }
        let (reply, settled) = oneshot::channel();
        if self.queue.send(Message::Settle(reply)).is_ok() {
            self.thread.unpark();
            let _ = settled.await;
        }
    }
}

fn gone() -> StoreError {
    StoreError::Unavailable("the recorder has stopped".into())
}

/// Commits the writes of a batch in one transaction, with the batch's claim if it has one,
/// then answers its settles. Should the transaction fail, each write is tried alone, so that
/// one bad write fails only its own, and the claim after them. A write behind the store
/// refuses for now is kept in `retry`. The commit is counted before its writes leave
/// `pending`: whoever sees nothing pending sees the commit counted.
fn commit(
    store: &dyn Store,
    batch: Vec<Message>,
    claims: Vec<(Want, oneshot::Sender<Result<Vec<Task>>>)>,
    (pending, commits, written): (&AtomicUsize, &AtomicU64, &AtomicU64),
    retry: &Retry,
) {
    let mut writes = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut settles = Vec::new();
    for message in batch {
        match message {
            Message::Write(write, reply) => {
                writes.push(*write);
                replies.push(reply);
            }
            Message::Settle(reply) => settles.push(reply),
            // Taken out before (take_claims).
            Message::Claim(..) => unreachable!("claims are taken out of the batch first"),
        }
    }
    // The first claim shares the writes' transaction; one without writes has no other try.
    let mut claimed = None;
    let together = match claims.first() {
        Some(&(want, _)) => {
            let tried = store.write_and_claim_within(&writes, want.tasks, want.bytes);
            let ok = tried.is_ok();
            if ok || writes.is_empty() {
                claimed = Some(tried);
            }
            ok
        }
        None => writes.len() > 1 && store.write(&writes).is_ok(),
    };
    let results: Vec<Result<()>> = if together {
        writes.iter().map(|_| Ok(())).collect()
    } else {
        writes
            .iter()
            .map(|write| store.write(std::slice::from_ref(write)))
            .collect()
    };
    commits.fetch_add(1, Ordering::Relaxed);
    written.fetch_add(writes.len() as u64, Ordering::Relaxed);
    pending.fetch_sub(writes.len(), Ordering::SeqCst);
    for ((write, reply), result) in writes.into_iter().zip(replies).zip(results) {
        match (reply, result) {
            (Some(reply), result) => {
                let _ = reply.send(result);
            }
            (None, Ok(())) => {}
            (None, Err(e)) if e.is_retryable() => {
                static REFUSED: Sparse = Sparse::new(10_000);
                if let Some(records) = REFUSED.due() {
                    tracing::warn!(records, task_id = write.task_id(), error = %e, "the store refused tasks' records for now; kept to try again (said at most every 10 s)");
                }
                retry.keep(write);
            }
            (None, Err(e)) => retry.give_up_on(&write, &e.to_string()),
        }
    }
    for (want, reply) in claims {
        let tasks = claimed
            .take()
            .unwrap_or_else(|| store.write_and_claim_within(&[], want.tasks, want.bytes));
        let _ = reply.send(tasks);
    }
    for reply in settles {
        let _ = reply.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Completion, Mode, TaskStatus};
    use crate::store::sqlite::tests::{task, version};
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
        let duplicate = task("a", &f, Mode::Async);
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
                        let (id, write) = finished(&f);
                        recorder.write_blocking(write).unwrap();
                        ids.push(id);
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

    fn finished(f: &crate::model::Function) -> (String, Write) {
        let mut t = task("a", f, Mode::Sync);
        t.status = TaskStatus::Running;
        let id = t.task_id.clone();
        let write = Write::Finished {
            task: Box::new(t),
            completion: ending(),
            at: crate::model::now_ms(),
        };
        (id, write)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_commits_the_writes_queued_before_it_and_a_bad_one_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let (id, n) = store.next_version("a", "f").unwrap();
        let f = store.add_version("a", &id, "f", &version(n)).unwrap();
        let recorder = Recorder::start(store.clone()).unwrap();
        let queued: Vec<_> = (0..3)
            .map(|i| {
                let mut t = task("a", &f, Mode::Async);
                t.created_at = 1_000 + i;
                t
            })
            .collect();
        for t in &queued {
            recorder.write(Write::Insert(t.clone())).await.unwrap();
        }
        let ran = recorder.claim(1).await.unwrap().remove(0);
        assert_eq!(ran.task_id, queued[0].task_id);
        // Its end behind (lingering), then the claim that reuses its slot: the end is on
        // disk once the claim returns.
        let end = Write::Complete {
            task_id: ran.task_id.clone(),
            tenant: "a".into(),
            completion: ending(),
            at: crate::model::now_ms(),
        };
        recorder.write_behind(end).await.unwrap();
        let next = recorder.claim(1).await.unwrap();
        assert_eq!(next[0].task_id, queued[1].task_id);
        let ended = store.task(None, &ran.task_id).unwrap().unwrap();
        assert_eq!(ended.status, TaskStatus::Succeeded);

        // A write that can never be stored (the same id again), queued before a claim: it is
        // given up alone, and the claim still takes the last task.
        recorder
            .write_behind(Write::Insert(queued[0].clone()))
            .await
            .unwrap();
        let last = recorder.claim(5).await.unwrap();
        assert_eq!(
            last.iter().map(|t| &t.task_id).collect::<Vec<_>>(),
            [&queued[2].task_id]
        );
        assert_eq!(recorder.kept().lost(), 1);
        assert!(recorder.claim(5).await.unwrap().is_empty());
    }

    #[test]
    fn a_claims_limit_is_decided_late_and_takes_in_what_was_queued_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let (id, n) = store.next_version("a", "f").unwrap();
        let f = store.add_version("a", &id, "f", &version(n)).unwrap();
        let (queue, incoming) = mpsc::channel();
        let (reply, _claimed) = oneshot::channel();
        // As a task does: its end queued, then its slot given back, which the limit counts.
        let late = queue.clone();
        let (_, end) = finished(&f);
        let limit: ClaimLimit = Box::new(move || {
            late.send(Message::Write(Box::new(end), None)).unwrap();
            Want::tasks(2)
        });
        let mut batch = vec![Message::Claim(limit, reply)];
        let claims = take_claims(&mut batch, &incoming);
        assert_eq!(
            claims.iter().map(|(n, _)| n.tasks).collect::<Vec<_>>(),
            [2],
            "decided on the recorder's thread"
        );
        assert!(
            matches!(batch.as_slice(), [Message::Write(..)]),
            "the end queued before the slot came free is in the claim's batch"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_behind_a_moment_apart_share_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
        let (id, n) = store.next_version("a", "f").unwrap();
        let f = store.add_version("a", &id, "f", &version(n)).unwrap();
        let recorder = Recorder::start(store.clone()).unwrap();
        // Further apart than one commit takes, closer than the linger: without it, each
        // write would be a commit of its own.
        let mut ids = Vec::new();
        for _ in 0..20 {
            let (id, write) = finished(&f);
            ids.push(id);
            recorder.write_behind(write).await.unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        // The thread slept through the writes that joined a lingering batch: it woke to
        // start each batch and at the end of its linger, not for every write.
        let (commits, wakes) = (recorder.commits(), recorder.wakes());
        assert!(
            wakes <= 2 * commits + 2,
            "the recorder woke {wakes} times for 20 writes in {commits} commits"
        );
        recorder.settle().await;
        let commits = recorder.commits();
        assert!(
            (1..10).contains(&commits),
            "{commits} commits for 20 writes"
        );
        for id in &ids {
            assert!(store.task(None, id).unwrap().is_some(), "{id}");
        }
        // A write someone waits for does not linger: it is on disk when it returns.
        let (last, write) = finished(&f);
        recorder.write(write).await.unwrap();
        assert!(store.task(None, &last).unwrap().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_behind_are_read_after_a_settle_and_wait_once_too_many_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let (id, n) = store.next_version("a", "f").unwrap();
        let f = store.add_version("a", &id, "f", &version(n)).unwrap();
        let recorder = Recorder::start(store.clone()).unwrap();
        // Nothing queued: a settle returns at once.
        recorder.settle().await;

        // Another connection holds the write lock, so the recorder's commits wait behind it.
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut ids = Vec::new();
        for _ in 0..BEHIND_LIMIT {
            let (id, write) = finished(&f);
            ids.push(id);
            // Returns without the disk: the commit cannot have happened.
            recorder.write_behind(write).await.unwrap();
        }
        assert!(store.task(None, &ids[0]).unwrap().is_none());
        // One more than the limit waits for its own commit.
        let (last, write) = finished(&f);
        let waiting = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.write_behind(write).await })
        };
        let settled = {
            let recorder = recorder.clone();
            tokio::spawn(async move { recorder.settle().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a write past the limit waits");
        assert!(
            !settled.is_finished(),
            "a settle waits for the queued writes"
        );

        blocker.execute_batch("ROLLBACK").unwrap();
        waiting.await.unwrap().unwrap();
        settled.await.unwrap();
        ids.push(last);
        recorder.settle().await;
        for id in &ids {
            let t = store.task(None, id).unwrap();
            assert_eq!(t.map(|t| t.status), Some(TaskStatus::Succeeded), "{id}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_behind_the_disk_refuses_are_kept_read_and_stored_once_it_has_room() {
        use crate::store::flaky::Flaky;
        let dir = tempfile::tempdir().unwrap();
        let inner = SqliteStore::open(&dir.path().join("db")).unwrap();
        let (id, n) = inner.next_version("a", "f").unwrap();
        let f = inner.add_version("a", &id, "f", &version(n)).unwrap();
        let store = Arc::new(Flaky {
            inner,
            full: false.into(),
            depth_reads: 0.into(),
        });
        let recorder = Recorder::start(store.clone()).unwrap();
        store.set_full(true);
        let mut ids = Vec::new();
        for _ in 0..5 {
            let (id, write) = finished(&f);
            recorder.write_behind(write).await.unwrap();
            ids.push(id);
        }
        // An awaited write is refused at once: its caller is told.
        let (_, write) = finished(&f);
        assert!(matches!(recorder.write(write).await, Err(StoreError::Full)));
        recorder.settle().await;
        assert_eq!(recorder.kept().len(), 5);
        assert!(store.task(None, &ids[0]).unwrap().is_none());
        assert!(matches!(
            recorder.kept().find(&ids[0]),
            Some(Write::Finished { .. })
        ));
        // Room again: the next round stores them.
        store.set_full(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !recorder.kept().is_empty() {
            assert!(Instant::now() < deadline, "kept writes were never stored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for id in &ids {
            assert!(store.task(None, id).unwrap().is_some(), "{id}");
        }
        assert_eq!(recorder.kept().lost(), 0);

        // Still refused at the stop: given up, each counted (and logged).
        store.set_full(true);
        let (_, write) = finished(&f);
        recorder.write_behind(write).await.unwrap();
        assert_eq!(recorder.close().await, 1);
        assert_eq!(recorder.kept().lost(), 1);
    }
}
