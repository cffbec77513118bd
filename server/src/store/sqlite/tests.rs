//! What is particular to the SQLite store, against a real database file in a temporary
//! directory: its query plans and its WAL. What both stores must do is the suite in
//! `tests/stores.rs`, run against each.

use super::claims::CLAIM;
use super::*;
use crate::model::{Completion, Isolation, TaskStatus};
use cloudfunc_sandbox::Runtime;

pub(crate) fn version(n: u32) -> Version {
    Version {
        version: n,
        runtime: Runtime::Python,
        handler: None,
        timeout_ms: 1000,
        memory_mb: 128,
        cpu_millicores: 1000,
        env: Default::default(),
        secrets: Vec::new(),
        secret_env: Default::default(),
        max_retries: 0,
        isolation: Isolation::Container,
        keep_warm_s: 60,
        min_instances: 0,
        max_instances: 8,
        on_success: None,
        on_failure: None,
        code_dir: format!("/code/{n}"),
        created_at: now_ms(),
    }
}

/// Stores a new task.
pub(crate) fn insert(store: &SqliteStore, task: &Task) {
    store.write(&[Write::Insert(task.clone())]).unwrap();
}

/// A store in a temporary directory holding alice's `hello` at version 1.
pub(crate) fn alice_hello() -> (tempfile::TempDir, SqliteStore, Function) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let (id, n) = store.next_version("alice", "hello").unwrap();
    let f = store
        .add_version("alice", &id, "hello", &version(n))
        .unwrap();
    (dir, store, f)
}

pub(crate) fn task(tenant: &str, f: &Function, mode: Mode) -> Task {
    let mut task = Task::queued(f, f.version, mode, serde_json::json!({"x": 1}));
    task.tenant = tenant.into();
    task
}

#[test]
fn the_oldest_due_task_is_claimed_first_and_the_backlog_is_never_sorted() {
    let (_dir, store, f) = alice_hello();
    let tasks: Vec<Task> = (0..3)
        .map(|i| {
            let mut t = task("alice", &f, Mode::Async);
            t.created_at = 1_000 + i;
            t
        })
        .collect();
    for t in tasks.iter().rev() {
        insert(&store, t);
    }
    // The oldest waits out a retry backoff; the younger ones pass it, oldest first.
    store
        .conn()
        .execute(
            "UPDATE tasks SET not_before = ?2 WHERE id = ?1",
            params![tasks[0].task_id, now_ms() + 60_000],
        )
        .unwrap();
    let claimed = |store: &SqliteStore| store.claim_next().unwrap().map(|t| t.task_id);
    assert_eq!(claimed(&store).as_ref(), Some(&tasks[1].task_id));
    assert_eq!(claimed(&store).as_ref(), Some(&tasks[2].task_id));
    assert_eq!(claimed(&store), None);

    // A claim reads the queue in index order: its cost does not grow with the backlog,
    // and the index holds queued tasks only. Counting running tasks reads no ended ones.
    let conn = store.conn();
    let plan = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps: Vec<String> = stmt
            .query_map(args, |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        steps.join("; ")
    };
    let claim = plan(CLAIM, &[&0]);
    assert!(
        claim.contains("INDEX tasks_queued") && !claim.contains("TEMP B-TREE"),
        "the claim sorts the queue: {claim}"
    );
    let recent = plan(&format!("SELECT id FROM tasks {RECENT}"), &[&"f", &5]);
    assert!(
        recent.contains("INDEX tasks_recent") && !recent.contains("TEMP B-TREE"),
        "a function's recent tasks are sorted: {recent}"
    );
    let running = plan(RUNNING, &[]);
    assert!(
        running.contains("INDEX tasks_running"),
        "counting running tasks scans them all: {running}"
    );
}

/// Sustained writes while a reader keeps reading: the WAL stays near its limit, where
/// PASSIVE checkpoints alone let it grow for as long as the load lasted.
#[test]
fn the_wal_stays_bounded_under_sustained_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let limit = 1 << 20;
    let store = Arc::new(
        SqliteStore::open_with(
            &path,
            limit,
            Duration::from_millis(20),
            crate::atrest::KeySource::Ephemeral,
            true,
        )
        .unwrap(),
    );
    let (id, n) = store.next_version("a", "f").unwrap();
    let f = store.add_version("a", &id, "f", &version(n)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers that always hold a recent snapshot, as the API's reads do under load.
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop, f) = (store.clone(), stop.clone(), f.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = store.recent_tasks(&f.id, 50).unwrap();
                }
            })
        })
        .collect();
    let wal = wal_path(&path);
    let mut largest = 0;
    let started = std::time::Instant::now();
    let mut written = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let batch: Vec<Write> = (0..50)
            .map(|_| {
                let mut t = task("a", &f, Mode::Sync);
                t.status = TaskStatus::Running;
                Write::Finished {
                    task: Box::new(t),
                    completion: Completion {
                        status: TaskStatus::Succeeded,
                        result: Some(serde_json::json!("x".repeat(200))),
                        error: None,
                        logs: "l".repeat(500),
                        logs_truncated: false,
                        usage: None,
                    },
                    at: now_ms(),
                }
            })
            .collect();
        store.write(&batch).unwrap();
        written += batch.len();
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(written > 5_000, "only {written} writes");
    assert!(store.wal_truncations() > 0, "the WAL was never cut back");
    // Between two checkpoint rounds the WAL grows by what 20 ms of writes add; a few limits'
    // worth is the bound, whatever the duration.
    assert!(
        largest < 8 * limit,
        "the WAL reached {largest} bytes with a limit of {limit} ({written} writes, {} truncations)",
        store.wal_truncations()
    );
    drop(store);
}

/// A claim is planned once per connection, however its size and time change: re-planning it
/// at each claim cost the recorder a parse and a plan per batch.
#[test]
fn the_claim_is_planned_once() {
    let (_dir, store, f) = alice_hello();
    for _ in 0..10 {
        insert(&store, &task("alice", &f, Mode::Async));
    }
    for limit in [1, 3, 2, 4] {
        assert_eq!(store.write_and_claim(&[], limit).unwrap().len(), limit);
    }
    assert!(store.write_and_claim(&[], 5).unwrap().is_empty());
    let conn = store.conn();
    let stmt = conn.prepare_cached(CLAIM).unwrap();
    assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
}
