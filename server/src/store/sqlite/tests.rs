//! The SQLite store against a real database file in a temporary directory.

use super::*;
use crate::model::Isolation;
use crate::model::TaskUsage;
use crate::store::StoreError;
use cloudfunc_sandbox::Runtime;
use rows::ended_call;

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
fn versions_tenants_and_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db")).unwrap();
    let (id, v) = store.next_version("alice", "hello").unwrap();
    assert_eq!(v, 1);
    store
        .add_version("alice", &id, "hello", &version(1))
        .unwrap();
    let (id2, v2) = store.next_version("alice", "hello").unwrap();
    assert_eq!((id2.as_str(), v2), (id.as_str(), 2));
    let f = store
        .add_version("alice", &id, "hello", &version(2))
        .unwrap();
    assert_eq!(f.version, 2);
    assert!(matches!(
        store.add_version("alice", &id, "hello", &version(2)),
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.versions(&id).unwrap().len(), 2);
    assert_eq!(store.version(&id, 1).unwrap().unwrap().code_dir, "/code/1");

    // Tenants see only their own; an admin sees all.
    assert!(store.function(Some("alice"), "hello").unwrap().is_some());
    assert!(store.function(Some("alice"), &id).unwrap().is_some());
    assert!(store.function(Some("bob"), "hello").unwrap().is_none());
    assert!(store.function(Some("bob"), &id).unwrap().is_none());
    assert!(store.function(None, &id).unwrap().is_some());
    assert_eq!(store.functions(Some("bob")).unwrap().len(), 0);

    let a = task("alice", &f, Mode::Async);
    let b = task("alice", &f, Mode::Async);
    insert(&store, &a);
    insert(&store, &b);
    assert_eq!(store.queue_depth().unwrap(), 2);
    let claimed = store.claim_next().unwrap().unwrap();
    assert_eq!(claimed.status, TaskStatus::Running);
    assert_eq!(claimed.attempts, 1);
    assert!(store.task(Some("bob"), &claimed.task_id).unwrap().is_none());

    // A crash now: the running one is interrupted, the queued one stays queued.
    let report = store.recover(&|_| false, &|_| 0).unwrap();
    assert_eq!(report.interrupted, vec![claimed.task_id.clone()]);
    let t = store
        .task(Some("alice"), &claimed.task_id)
        .unwrap()
        .unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.error.unwrap().kind, ErrorKind::Interrupted);
    assert_eq!(store.queue_depth().unwrap(), 1);

    let other = store.claim_next().unwrap().unwrap();
    assert_ne!(other.task_id, claimed.task_id);
    let report = store.recover(&|_| true, &|_| 60_000).unwrap();
    assert_eq!(report.requeued, vec![other.task_id.clone()]);
    assert!(
        store.claim_next().unwrap().is_none(),
        "backoff holds it back"
    );
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
    let claim = plan(CLAIM, &[&0, &1]);
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

#[test]
fn an_ended_task_reads_back_the_same_whichever_way_it_was_stored() {
    let (_dir, store, f) = alice_hello();
    let ending = Completion {
        status: TaskStatus::Failed,
        result: None,
        error: Some(TaskError {
            kind: ErrorKind::Raised,
            error_type: "ValueError".into(),
            message: "no".into(),
            traceback: "line 1".into(),
        }),
        logs: "printed\n".into(),
        logs_truncated: true,
        usage: Some(TaskUsage {
            duration_ms: 1.5,
            init_duration_ms: 0.25,
            cpu_ms: 0.75,
            peak_memory_bytes: 3 << 20,
            cold: true,
            ..TaskUsage::default()
        }),
    };
    let mut started = task("alice", &f, Mode::Sync);
    started.status = TaskStatus::Running;
    started.attempts = 1;
    started.started_at = Some(started.created_at);
    let mut once = started.clone();
    once.task_id = format!("{}_once", started.task_id);
    let at = started.created_at + 2;

    insert(&store, &started);
    store
        .write(&[Write::Complete {
            task_id: started.task_id.clone(),
            tenant: started.tenant.clone(),
            completion: ending.clone(),
            at,
        }])
        .unwrap();
    store
        .write(&[Write::Finished {
            task: Box::new(once.clone()),
            completion: ending.clone(),
            at,
        }])
        .unwrap();

    let two_steps = store.task(None, &started.task_id).unwrap().unwrap();
    let one_step = store.task(None, &once.task_id).unwrap().unwrap();
    assert_eq!(one_step.finished_at, Some(at));
    assert_eq!(
        serde_json::to_value(Task {
            task_id: once.task_id.clone(),
            ..two_steps
        })
        .unwrap(),
        serde_json::to_value(&one_step).unwrap()
    );
    assert_eq!(one_step.attempts, 1);
    let calls = store.calls(None, Some(&f.id), 0, i64::MAX).unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], calls[1]);
    assert_eq!(calls[0], ended_call(&ending, at));
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

#[test]
fn chains_runs_and_steps_round_trip_and_unfinished_runs_are_found() {
    use crate::chains::{Chain, ChainRun, Failure, RunStatus, StepRecord};
    let (dir, store, f) = alice_hello();
    let chain = |def: serde_json::Value| Chain {
        id: crate::model::new_id("chain"),
        tenant: "alice".into(),
        name: "pipe".into(),
        definition: def,
        created_at: 1,
        updated_at: 2,
    };
    let first = store
        .put_chain(&chain(serde_json::json!({"steps": ["hello"]})))
        .unwrap();
    // A redeploy by name keeps the id and the creation time, and takes the new definition.
    let again = store
        .put_chain(&chain(serde_json::json!({"steps": ["hello", "hello"]})))
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.created_at),
        (first.id.as_str(), 1)
    );
    assert_eq!(again.definition["steps"][1], "hello");
    assert!(store.chain(Some("bob"), "pipe").unwrap().is_none());
    assert_eq!(
        store.chain(Some("alice"), &first.id).unwrap().unwrap().name,
        "pipe"
    );

    let mut run = ChainRun {
        run_id: crate::model::new_id("run"),
        tenant: "alice".into(),
        chain_id: first.id.clone(),
        chain: "pipe".into(),
        mode: Mode::Async,
        status: RunStatus::Queued,
        input: serde_json::json!({"x": 1}),
        output: None,
        error: None,
        definition: again.definition.clone(),
        deadline_at: None,
        created_at: 10,
        started_at: None,
        finished_at: None,
        steps: Vec::new(),
    };
    store.save_run(&run).unwrap();
    let step = StepRecord {
        path: "/steps/0".into(),
        function: "hello".into(),
        task_id: Some("task_1".into()),
        status: TaskStatus::Running,
        output: None,
        error: None,
        usage: None,
        started_at: 11,
        finished_at: None,
        attempts: 1,
        seq: 0,
    };
    store.save_step(&run.tenant, &run.run_id, &step).unwrap();
    let open = store.unfinished_runs().unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].steps, vec![step.clone()]);
    assert_eq!(open[0].definition, run.definition);

    // Its task carries the run's id.
    let mut t = task("alice", &f, Mode::Async);
    t.chain_run = Some(run.run_id.clone());
    insert(&store, &t);
    assert_eq!(
        store.task(None, &t.task_id).unwrap().unwrap().chain_run,
        Some(run.run_id.clone())
    );

    run.status = RunStatus::Failed;
    run.finished_at = Some(20);
    run.error = Some(Failure::new("raised", "/steps/0", "no"));
    run.steps = vec![StepRecord {
        status: TaskStatus::Failed,
        finished_at: Some(19),
        ..step
    }];
    store.save_run(&run).unwrap();
    assert!(store.unfinished_runs().unwrap().is_empty());
    let read = store
        .chain_run(Some("alice"), &run.run_id)
        .unwrap()
        .unwrap();
    assert_eq!(read, run);
    assert!(store.chain_run(Some("bob"), &run.run_id).unwrap().is_none());
    assert_eq!(store.chain_runs(&first.id, 5).unwrap(), vec![run]);
    assert!(store.delete_chain(&first.id).unwrap());
    assert!(store.chain(None, "pipe").unwrap().is_none());
    drop(dir);
}

/// Tenant data is sealed on disk, a flipped byte is reported for its record only, and a
/// queued task whose record is damaged is failed (saying why) instead of stalling the queue.
#[test]
fn sealed_records_are_reported_when_damaged_and_the_queue_goes_on() {
    let (dir, store, f) = alice_hello();
    let mut damaged = task("alice", &f, Mode::Async);
    damaged.payload = serde_json::json!({"canary": "payload-canary-5be1"});
    let healthy = task("alice", &f, Mode::Async);
    // The damaged one is the older: the claim meets it first.
    damaged.created_at = healthy.created_at - 1;
    insert(&store, &damaged);
    insert(&store, &healthy);
    store.close().unwrap();
    let raw = rusqlite::Connection::open(dir.path().join("db")).unwrap();
    let mut blob: Vec<u8> = raw
        .query_row(
            "SELECT payload FROM tasks WHERE id = ?1",
            [&damaged.task_id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!blob.windows(6).any(|w| w == b"canary"), "sealed on disk");
    let last = blob.len() - 1;
    blob[last] ^= 0x80;
    raw.execute(
        "UPDATE tasks SET payload = ?2 WHERE id = ?1",
        rusqlite::params![damaged.task_id, blob],
    )
    .unwrap();

    match store.task(None, &damaged.task_id) {
        Err(StoreError::Damaged(why)) => {
            assert!(
                why.contains(&damaged.task_id) && why.contains("payload"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    let claimed = store.claim_next().unwrap().unwrap();
    assert_eq!(
        claimed.task_id, healthy.task_id,
        "the damaged task is skipped"
    );
    let failed: (String, String) = raw
        .query_row(
            "SELECT status, error_kind FROM tasks WHERE id = ?1",
            [&damaged.task_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        failed,
        ("failed".to_string(), "sandbox_failure".to_string())
    );
    assert!(store.claim_next().unwrap().is_none());
}
