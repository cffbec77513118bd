//! One store test suite, run against both stores: the SQLite file and a real PostgreSQL
//! server (a cluster of its own, started by this test and removed after). Each test gets an
//! empty store; what it checks is what the platform relies on, whichever store holds it.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use cloudfunc_sandbox::Runtime;
use cloudfunc_server::alerts::{
    Channel, Notification, Severity, Status, Subscription, SubscriptionSpec,
};
use cloudfunc_server::atrest::KeySource;
use cloudfunc_server::model::{
    now_ms, Completion, ErrorKind, Function, Isolation, Mode, Task, TaskError, TaskStatus,
    TaskUsage, Version,
};
use cloudfunc_server::rollup::{bin, bucket_start, resolution_for, series, Call, Stats};
use cloudfunc_server::store::{Attempt, PgStore, SqliteStore, Store, StoreError, Write};
use common::postgres::Postgres;
use common::trial;
use libtest_mimic::Arguments;
use proptest::prelude::*;

/// Where one test's store lives.
struct Place {
    /// The SQLite file and the master key file (both stores keep the key in a file here).
    dir: tempfile::TempDir,
    /// The PostgreSQL database, for the PostgreSQL store.
    url: Option<String>,
}

impl Place {
    fn sqlite() -> Place {
        Place {
            dir: tempfile::tempdir().unwrap(),
            url: None,
        }
    }

    fn postgres(pg: &Postgres) -> Place {
        Place {
            dir: tempfile::tempdir().unwrap(),
            url: Some(pg.database()),
        }
    }

    fn key(&self) -> KeySource {
        KeySource::File(self.dir.path().join("master.key"))
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// The store (again, for a reopening).
    fn try_open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match &self.url {
            Some(url) => Arc::new(PgStore::open(url, None, self.key(), true, 8)?),
            None => Arc::new(SqliteStore::open_with(
                &self.db(),
                64 << 20,
                std::time::Duration::from_millis(500),
                self.key(),
                true,
            )?),
        })
    }

    fn open(&self) -> Arc<dyn Store> {
        self.try_open().unwrap()
    }

    /// Runs `sql` (with `?1`, `?2` as text parameters on both) on the database itself.
    fn raw(&self, sql: &str, params: &[&str]) {
        match &self.url {
            Some(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                let mut pg_sql = sql.to_string();
                for i in (1..=params.len()).rev() {
                    pg_sql = pg_sql.replace(&format!("?{i}"), &format!("${i}"));
                }
                let p: Vec<&(dyn postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|s| s as &(dyn postgres::types::ToSql + Sync))
                    .collect();
                c.execute(&pg_sql, &p).unwrap();
            }
            None => {
                let c = rusqlite::Connection::open(self.db()).unwrap();
                c.execute(sql, rusqlite::params_from_iter(params.iter()))
                    .unwrap();
            }
        }
    }

    /// A task's stored payload bytes.
    fn payload(&self, task_id: &str) -> Vec<u8> {
        match &self.url {
            Some(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.query_one("SELECT payload FROM tasks WHERE id = $1", &[&task_id])
                    .unwrap()
                    .get(0)
            }
            None => rusqlite::Connection::open(self.db())
                .unwrap()
                .query_row("SELECT payload FROM tasks WHERE id = ?1", [task_id], |r| {
                    r.get(0)
                })
                .unwrap(),
        }
    }

    /// Stores `bytes` as a task's payload, bypassing the store.
    fn set_payload(&self, task_id: &str, bytes: Vec<u8>) {
        match &self.url {
            Some(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.execute(
                    "UPDATE tasks SET payload = $2 WHERE id = $1",
                    &[&task_id, &bytes],
                )
                .unwrap();
            }
            None => {
                rusqlite::Connection::open(self.db())
                    .unwrap()
                    .execute(
                        "UPDATE tasks SET payload = ?2 WHERE id = ?1",
                        rusqlite::params![task_id, bytes],
                    )
                    .unwrap();
            }
        }
    }
}

fn version(n: u32) -> Version {
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

fn deploy(store: &dyn Store, tenant: &str, name: &str) -> Function {
    let (id, n) = store.next_version(tenant, name).unwrap();
    store.add_version(tenant, &id, name, &version(n)).unwrap()
}

fn task(tenant: &str, f: &Function, mode: Mode) -> Task {
    let mut task = Task::queued(f, f.version, mode, serde_json::json!({"x": 1}));
    task.tenant = tenant.into();
    task
}

/// `n` async tasks of alice's `f`, each created a millisecond after the one before.
fn in_order(f: &Function, n: i64) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let mut t = task("alice", f, Mode::Async);
            t.created_at = 1_000 + i;
            t
        })
        .collect()
}

/// The ids of up to `n` tasks `store` claims.
fn claimed_ids(store: &dyn Store, n: usize) -> Vec<String> {
    store
        .claim(n)
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect()
}

fn insert(store: &dyn Store, task: &Task) {
    store.write(&[Write::Insert(task.clone())]).unwrap();
}

fn versions_tenants_and_the_queue(place: &Place) {
    let store = place.open();
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
    store.set_active(&id, false).unwrap();
    assert!(!store.function(None, "hello").unwrap().unwrap().active);
    store.set_active(&id, true).unwrap();

    // Tenants see only their own; an admin sees all.
    assert!(store.function(Some("alice"), "hello").unwrap().is_some());
    assert!(store.function(Some("alice"), &id).unwrap().is_some());
    assert!(store.function(Some("bob"), "hello").unwrap().is_none());
    assert!(store.function(Some("bob"), &id).unwrap().is_none());
    assert!(store.function(None, &id).unwrap().is_some());
    assert_eq!(store.functions(Some("bob")).unwrap().len(), 0);
    deploy(store.as_ref(), "bob", "hello");
    let names: Vec<(String, String)> = store
        .functions(None)
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.tenant))
        .collect();
    assert_eq!(
        names,
        [
            ("hello".into(), "alice".into()),
            ("hello".into(), "bob".into())
        ]
    );

    let a = task("alice", &f, Mode::Async);
    let b = task("alice", &f, Mode::Async);
    insert(store.as_ref(), &a);
    insert(store.as_ref(), &b);
    assert_eq!(store.queue_depth().unwrap(), 2);
    let claimed = store.claim_next().unwrap().unwrap();
    assert_eq!(claimed.status, TaskStatus::Running);
    assert_eq!(claimed.attempts, 1);
    assert_eq!(claimed.payload, serde_json::json!({"x": 1}));
    assert_eq!(store.running().unwrap(), 1);
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

    // A deleted function takes its versions and code with it.
    store
        .put_code("alice", &format!("{id}/1"), b"PK zip")
        .unwrap();
    assert_eq!(store.delete_function(&id).unwrap().len(), 2);
    assert!(store.function(None, &id).unwrap().is_none());
    assert!(store.code(&format!("{id}/1")).unwrap().is_none());
}

fn the_oldest_due_task_is_claimed_first(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let tasks = in_order(&f, 4);
    for t in tasks.iter().rev() {
        insert(store.as_ref(), t);
    }
    // The oldest waits out a retry backoff; the younger ones pass it, oldest first.
    place.raw(
        "UPDATE tasks SET not_before = 9999999999999 WHERE id = ?1",
        &[&tasks[0].task_id],
    );
    let claimed = |n| claimed_ids(store.as_ref(), n);
    assert_eq!(claimed(1), [tasks[1].task_id.clone()]);
    assert_eq!(
        claimed(5),
        [tasks[2].task_id.clone(), tasks[3].task_id.clone()]
    );
    assert!(claimed(1).is_empty());
}

/// A task queued again behind younger ones already claimed (as when another node requeues a
/// dead node's task) is claimed within a second: on PostgreSQL a node's claims start past the
/// last task it claimed, and scan from the oldest again at least every second.
fn a_task_requeued_behind_the_claims_is_claimed_within_a_second(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let tasks = in_order(&f, 4);
    for t in &tasks {
        insert(store.as_ref(), t);
    }
    let claimed = |n| claimed_ids(store.as_ref(), n);
    let ids =
        |i: &[usize]| -> Vec<String> { i.iter().map(|&i| tasks[i].task_id.clone()).collect() };
    assert_eq!(claimed(2), ids(&[0, 1]));
    place.raw(
        "UPDATE tasks SET status = 'queued' WHERE id = ?1",
        &[&tasks[0].task_id],
    );
    let mut next = claimed(1);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    next.extend(claimed(1));
    next.sort();
    let mut want = ids(&[0, 2]);
    want.sort();
    assert_eq!(
        next, want,
        "the requeued task and the next one, one of them within a second"
    );
    assert_eq!(claimed(5), ids(&[3]));
}

/// Tasks claimed and never started, given back at a graceful stop, are queued again in their
/// old place, their attempt uncounted, and claimed next at once; a task that ended meanwhile
/// (or never was) is left as it is.
fn tasks_given_back_unstarted_keep_their_place(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let tasks = in_order(&f, 4);
    for t in &tasks {
        insert(store.as_ref(), t);
    }
    let ids =
        |i: &[usize]| -> Vec<String> { i.iter().map(|&i| tasks[i].task_id.clone()).collect() };
    assert_eq!(claimed_ids(store.as_ref(), 3), ids(&[0, 1, 2]));
    store
        .write(&[Write::Complete {
            task_id: tasks[1].task_id.clone(),
            tenant: "alice".into(),
            completion: failed(ErrorKind::Raised),
            at: now_ms(),
        }])
        .unwrap();
    let mut back = ids(&[2, 1, 0]);
    back.push("no-such-task".into());
    assert_eq!(store.give_back(&back).unwrap(), 2);
    assert_eq!(store.queue_depth().unwrap(), 3);
    assert_eq!(store.running().unwrap(), 0);
    for i in [0, 2] {
        let t = store.task(None, &tasks[i].task_id).unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Queued, "{t:?}");
        assert_eq!(t.attempts, 0, "its claim is not counted: {t:?}");
        assert_eq!(t.started_at, None, "{t:?}");
    }
    let ended = store.task(None, &tasks[1].task_id).unwrap().unwrap();
    assert_eq!(ended.status, TaskStatus::Failed, "left as it ended");
    assert!(
        store.give_back(&ids(&[0])).unwrap() == 0,
        "a queued task is not given back twice"
    );
    // The oldest first again, at once (no rescan wait on PostgreSQL), with one attempt.
    let again = store.claim(1).unwrap();
    assert_eq!(again[0].task_id, tasks[0].task_id);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(claimed_ids(store.as_ref(), 5), ids(&[2, 3]));
}

/// A claim with a byte budget stops before the task whose payload would take the claimed
/// payloads past it (as stored), in queue order: a small task behind one that does not fit
/// waits its turn; the first task is taken whatever its size.
fn a_claim_stops_at_its_payload_budget(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let mut t = in_order(&f, 5);
    for (task, size) in t.iter_mut().zip([3_000, 5_000, 10, 3_000, 10]) {
        task.payload = serde_json::json!("x".repeat(size));
        insert(store.as_ref(), task);
    }
    let ids = |i: &[usize]| -> Vec<String> { i.iter().map(|&i| t[i].task_id.clone()).collect() };
    let claim = |bytes: u64| -> Vec<String> {
        let tasks = store.write_and_claim_within(&[], 10, bytes).unwrap();
        tasks.into_iter().map(|t| t.task_id).collect()
    };
    assert_eq!(claim(7_000), ids(&[0]), "the second would pass 7,000 bytes");
    assert_eq!(claim(0), ids(&[1]), "the first is taken whatever its size");
    assert_eq!(claim(u64::MAX), ids(&[2, 3, 4]));
    let read = store.task(None, &t[1].task_id).unwrap().unwrap();
    assert_eq!(
        read.payload, t[1].payload,
        "a large payload reads back whole"
    );
}

fn failed(kind: ErrorKind) -> Completion {
    Completion {
        status: TaskStatus::Failed,
        result: None,
        error: Some(TaskError {
            kind,
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
    }
}

fn an_ended_task_reads_back_the_same_whichever_way_it_was_stored(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let ending = failed(ErrorKind::Raised);
    let mut started = task("alice", &f, Mode::Sync);
    started.status = TaskStatus::Running;
    started.attempts = 1;
    started.started_at = Some(started.created_at);
    let mut once = started.clone();
    once.task_id = format!("{}_once", started.task_id);
    let at = started.created_at + 2;

    insert(store.as_ref(), &started);
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
    assert_eq!(one_step.logs, "printed\n");
    assert_eq!(one_step.error.as_ref().unwrap().message, "no");
    assert_eq!(
        serde_json::to_value(Task {
            task_id: once.task_id.clone(),
            ..two_steps
        })
        .unwrap(),
        serde_json::to_value(&one_step).unwrap()
    );
    let calls = store.calls(None, Some(&f.id), 0, i64::MAX).unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], calls[1]);
    assert_eq!(
        calls[0],
        Call {
            outcome: "raised".into(),
            at,
            timed: true,
            cold: true,
            duration_ms: 1.5,
            init_ms: 0.25,
            cpu_ms: 0.75,
            peak_memory_bytes: 3 << 20,
        }
    );
    assert_eq!(store.recent_tasks(&f.id, 1).unwrap().len(), 1);
    assert_eq!(store.recent_tasks(&f.id, 5).unwrap().len(), 2);
}

fn chains_runs_and_steps_round_trip(place: &Place) {
    use cloudfunc_server::chains::{Chain, ChainRun, Failure, RunStatus, StepRecord};
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let chain = |def: serde_json::Value| Chain {
        id: cloudfunc_server::model::new_id("chain"),
        tenant: "alice".into(),
        name: "pipe".into(),
        definition: def,
        created_at: 1,
        updated_at: 2,
    };
    let first = store
        .put_chain(&chain(serde_json::json!({"steps": ["hello"]})))
        .unwrap();
    let again = store
        .put_chain(&chain(serde_json::json!({"steps": ["hello", "hello"]})))
        .unwrap();
    assert_eq!(
        (again.id.as_str(), again.created_at),
        (first.id.as_str(), 1)
    );
    assert_eq!(again.definition["steps"][1], "hello");
    assert!(store.chain(Some("bob"), "pipe").unwrap().is_none());
    assert_eq!(store.chains(Some("alice")).unwrap().len(), 1);
    assert_eq!(
        store.chain(Some("alice"), &first.id).unwrap().unwrap().name,
        "pipe"
    );

    let mut run = ChainRun {
        run_id: cloudfunc_server::model::new_id("run"),
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

    let mut t = task("alice", &f, Mode::Async);
    t.chain_run = Some(run.run_id.clone());
    insert(store.as_ref(), &t);
    assert_eq!(
        store.task(None, &t.task_id).unwrap().unwrap().chain_run,
        Some(run.run_id.clone())
    );

    run.status = RunStatus::Failed;
    run.finished_at = Some(20);
    run.error = Some(Failure::new("raised", "/steps/0", "no"));
    run.output = Some(serde_json::json!([1, 2]));
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
    assert_eq!(store.chain_runs(&first.id, 5).unwrap(), vec![run.clone()]);
    // Retention: an ended run goes with its steps once past its time; an open one stays.
    let open = ChainRun {
        run_id: cloudfunc_server::model::new_id("run"),
        status: RunStatus::Running,
        finished_at: None,
        steps: Vec::new(),
        ..run.clone()
    };
    store.save_run(&open).unwrap();
    assert_eq!(store.prune_runs(20).unwrap(), 0);
    assert_eq!(store.prune_runs(21).unwrap(), 1);
    assert!(store.chain_run(None, &run.run_id).unwrap().is_none());
    assert_eq!(store.unfinished_runs().unwrap(), vec![open]);
    assert!(store.delete_chain(&first.id).unwrap());
    assert!(store.chain(None, "pipe").unwrap().is_none());
}

/// An idempotency key goes to the first task that claims it; a later claim is told that
/// task; a key whose task was never stored passes to another only from that task; keys go
/// with their age.
fn idempotency_keys_go_to_the_first_claim(place: &Place) {
    let store = place.open();
    assert_eq!(
        store.claim_key("alice", "k1", "task_a", 10).unwrap(),
        ("task_a".to_string(), 10)
    );
    assert_eq!(
        store.claim_key("alice", "k1", "task_b", 20).unwrap(),
        ("task_a".to_string(), 10)
    );
    // Another tenant's key of the same name is another key.
    assert_eq!(
        store.claim_key("bob", "k1", "task_c", 20).unwrap(),
        ("task_c".to_string(), 20)
    );
    assert!(!store
        .take_over_key("alice", "k1", "task_x", "task_b", 30)
        .unwrap());
    assert!(store
        .take_over_key("alice", "k1", "task_a", "task_b", 30)
        .unwrap());
    assert_eq!(
        store.claim_key("alice", "k1", "task_d", 40).unwrap(),
        ("task_b".to_string(), 30)
    );
    assert_eq!(store.prune_keys(25).unwrap(), 1, "bob's, taken at 20");
    assert_eq!(
        store.claim_key("bob", "k1", "task_e", 50).unwrap(),
        ("task_e".to_string(), 50)
    );
}

/// Tenant data is sealed in the database, a flipped byte is reported for its record only,
/// and a queued task whose record is damaged is failed instead of stalling the queue.
fn damaged_records_are_reported_and_the_queue_goes_on(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let mut damaged = task("alice", &f, Mode::Async);
    damaged.payload = serde_json::json!({"canary": "payload-canary-5be1"});
    let healthy = task("alice", &f, Mode::Async);
    damaged.created_at = healthy.created_at - 1;
    insert(store.as_ref(), &damaged);
    insert(store.as_ref(), &healthy);
    let mut blob = place.payload(&damaged.task_id);
    assert!(
        !blob.windows(6).any(|w| w == b"canary"),
        "sealed in the database"
    );
    let last = blob.len() - 1;
    blob[last] ^= 0x80;
    place.set_payload(&damaged.task_id, blob);

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
    assert!(store.claim_next().unwrap().is_none());
    let calls = store.calls(None, None, 0, i64::MAX).unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].outcome, "sandbox_failure");
}

/// A damaged record among a claim's tasks takes no one else's share of the payloads' budget:
/// the claim goes on past it only within what the tasks it took left.
fn a_damaged_record_in_a_claim_leaves_the_budget_as_it_was(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let mut t = in_order(&f, 4);
    for (task, size) in t.iter_mut().zip([3_000, 10, 3_000, 3_000]) {
        task.payload = serde_json::json!("x".repeat(size));
        insert(store.as_ref(), task);
    }
    let mut blob = place.payload(&t[1].task_id);
    let last = blob.len() - 1;
    blob[last] ^= 0x80;
    place.set_payload(&t[1].task_id, blob);
    let claimed: Vec<String> = store
        .write_and_claim_within(&[], 10, 7_000)
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(
        claimed,
        vec![t[0].task_id.clone(), t[2].task_id.clone()],
        "the fourth would take the payloads past 7,000 bytes"
    );
    let failed = store.task(None, &t[1].task_id);
    assert!(matches!(failed, Err(StoreError::Damaged(_))), "{failed:?}");
    assert_eq!(claimed_ids(store.as_ref(), 10), vec![t[3].task_id.clone()]);
}

fn code_secrets_and_keys_survive_rotation_and_reencryption(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let path = format!("{}/1", f.id);
    store
        .put_code("alice", &path, b"PK\x03\x04 the archive")
        .unwrap();
    store.set_secret("alice", "TOKEN", "s3cr3t-value").unwrap();
    store.set_secret("bob", "TOKEN", "bobs").unwrap();
    let mut t = task("alice", &f, Mode::Async);
    t.payload = serde_json::json!({"p": "private"});
    insert(store.as_ref(), &t);
    assert_eq!(store.code_bytes("alice").unwrap(), 16);
    assert_eq!(store.secret_names("alice").unwrap()[0].name, "TOKEN");
    let want = ["TOKEN".to_string(), "MISSING".to_string()];
    let got = store.secrets("alice", &want).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got["TOKEN"], "s3cr3t-value");

    let before = store.master_key();
    let after = store.rotate_master_key().unwrap();
    assert_ne!(before, after);
    let report = store.reencrypt(Some("alice")).unwrap();
    assert!(report.records >= 4, "{report:?}");
    assert!(report.retired_keys_removed >= 1, "{report:?}");
    drop(store);

    // Reopened with the rotated key file: everything reads back.
    let store = place.open();
    assert_eq!(store.master_key(), after);
    assert_eq!(
        store.code(&path).unwrap().unwrap(),
        b"PK\x03\x04 the archive"
    );
    assert_eq!(store.secrets("bob", &want[..1]).unwrap()["TOKEN"], "bobs");
    assert_eq!(
        store.secrets("alice", &want[..1]).unwrap()["TOKEN"],
        "s3cr3t-value"
    );
    assert_eq!(
        store.task(None, &t.task_id).unwrap().unwrap().payload,
        serde_json::json!({"p": "private"})
    );
    let keys = store.data_keys().unwrap();
    assert_eq!(keys.iter().filter(|k| k.tenant == "alice").count(), 1);
    assert!(keys.iter().all(|k| k.master == after));
    assert!(store.delete_secret("alice", "TOKEN").unwrap());
    assert!(!store.delete_secret("alice", "TOKEN").unwrap());
}

fn the_outbox_delivers_each_notification_once_per_subscription(place: &Place) {
    let store = place.open();
    let sub = |id: &str, tenant: &str| Subscription {
        id: id.into(),
        tenant: tenant.into(),
        spec: SubscriptionSpec {
            channel: Channel::Email {
                address: format!("{id}@example.com"),
            },
            alerts: Default::default(),
            min_severity: Severity::Info,
        },
        secret: "whsec_x".into(),
        admin: false,
        created_at: 5,
    };
    let (a, b) = (sub("sub_a", "alice"), sub("sub_b", "bob"));
    store.put_subscription(&a).unwrap();
    store.put_subscription(&b).unwrap();
    assert_eq!(store.subscriptions(Some("alice")).unwrap(), vec![a.clone()]);
    let n = Notification {
        id: "n1".into(),
        tenant: "alice".into(),
        status: Status::Firing,
        severity: Severity::Warning,
        rule_id: None,
        rule: None,
        condition: "error_rate > 0.1".into(),
        summary: "errors".into(),
        items: Vec::new(),
        at: 100,
    };
    assert_eq!(store.enqueue(&n, &[a.clone(), b.clone()]).unwrap().len(), 2);
    // Enqueued again (a retried write): nothing doubles.
    store.enqueue(&n, std::slice::from_ref(&a)).unwrap();
    assert_eq!(store.deliveries(None, 10).unwrap().len(), 2);
    assert_eq!(store.oldest_queued_at().unwrap(), None);
    let due = store.due_deliveries(100, 10).unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].1, n);
    assert!(store.due_deliveries(99, 10).unwrap().is_empty());
    let (first, second) = (&due[0].0.id, &due[1].0.id);
    store
        .record_attempt(first, Attempt::Sent, None, 101)
        .unwrap();
    store
        .record_attempt(second, Attempt::Retry(200), Some("refused"), 101)
        .unwrap();
    let due = store.due_deliveries(150, 10).unwrap();
    assert!(due.is_empty());
    let due = store.due_deliveries(200, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].0.attempts, 1);
    assert_eq!(due[0].0.last_error.as_deref(), Some("refused"));
    // Unsubscribing ends what was still to be sent.
    let gone = due[0].2.id.clone();
    assert_eq!(
        store.delete_subscriptions(None, Some(&gone), None).unwrap(),
        1
    );
    assert!(store.due_deliveries(200, 10).unwrap().is_empty());
    let statuses: HashSet<String> = store
        .deliveries(None, 10)
        .unwrap()
        .into_iter()
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, HashSet::from(["sent".into(), "failed".into()]));
    // Retention: deliveries no longer pending go once past their time, with their
    // notification; one still pending keeps its own.
    let c = sub("sub_c", "alice");
    store.put_subscription(&c).unwrap();
    let later = Notification {
        id: "n2".into(),
        ..n.clone()
    };
    store.enqueue(&later, std::slice::from_ref(&c)).unwrap();
    assert_eq!(store.prune_notifications(100).unwrap(), 0);
    assert_eq!(store.prune_notifications(101).unwrap(), 2);
    let left = store.deliveries(None, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].status, "pending");
    let due = store.due_deliveries(100, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1, later);
}

fn anomaly_findings_and_state_round_trip(place: &Place) {
    use cloudfunc_server::anomalies::{Input, Key, Series, WatchConfig, Watcher};
    const T0: i64 = 1_700_438_400_000;
    let store = place.open();
    assert_eq!(store.anomaly_state().unwrap(), (None, vec![]));
    let mut w = Watcher::new(WatchConfig::default());
    let minutes = 400;
    for m in 0..minutes {
        let late = m >= minutes - 3;
        let inputs = [("t1", "f1"), ("t2", "f2")]
            .into_iter()
            .map(|(tenant, id)| Input {
                key: Key::function(id, Series::DurationP95),
                tenant: tenant.into(),
                function: format!("name-{id}"),
                value: if late {
                    500.0
                } else {
                    5.0 + (m % 3) as f64 * 0.1
                },
            })
            .collect();
        let minute = w.minute(T0 + m * 60_000, inputs);
        let events: Vec<_> = minute.events.iter().map(|(_, e)| e.clone()).collect();
        store.record_anomalies(&minute.scored, &events).unwrap();
    }
    let all = store.anomaly_events(None, None, 0, i64::MAX, 100).unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let t1 = store
        .anomaly_events(Some("t1"), None, 0, i64::MAX, 100)
        .unwrap();
    assert_eq!((t1.len(), t1[0].function_id.as_str()), (1, "f1"));
    assert_eq!(
        store
            .anomaly_scores(Some("t1"), "f1", 0, i64::MAX)
            .unwrap()
            .len(),
        400
    );
    assert!(store
        .anomaly_scores(Some("t2"), "f1", 0, i64::MAX)
        .unwrap()
        .is_empty());
    store
        .save_anomaly_state(T0 + 399 * 60_000, &w.save())
        .unwrap();
    let (through, saved) = store.anomaly_state().unwrap();
    assert_eq!(through, Some(T0 + 399 * 60_000));
    assert_eq!(saved, w.save());
    assert_eq!(store.prune_anomalies(T0 + 100 * 60_000).unwrap(), 200);
    assert_eq!(
        store.anomaly_events(None, None, 0, 1, 100).unwrap().len(),
        2
    );
}

/// Several claimers at once (threads here, nodes on PostgreSQL) take every task exactly once.
fn concurrent_claims_take_each_task_once(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let tasks: Vec<Write> = (0..400)
        .map(|_| Write::Insert(task("alice", &f, Mode::Async)))
        .collect();
    for chunk in tasks.chunks(100) {
        store.write(chunk).unwrap();
    }
    let claimers: Vec<_> = (0..6)
        .map(|i| {
            // On PostgreSQL each claimer is a store of its own, as each node is; SQLite is
            // one process's file, shared by its threads.
            let store = match place.url {
                Some(_) => place.open(),
                None => store.clone(),
            };
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                loop {
                    let got = store.claim(1 + i % 3).unwrap();
                    if got.is_empty() {
                        break;
                    }
                    mine.extend(got.into_iter().map(|t| t.task_id));
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.join().unwrap());
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 400);
    assert_eq!(distinct.len(), 400, "a task was claimed twice");
    assert_eq!(store.running().unwrap(), 400);
    assert_eq!(store.queue_depth().unwrap(), 0);
}

fn a_newer_schema_is_refused(place: &Place) {
    drop(place.open());
    place.raw(
        "INSERT INTO schema_version (version, applied_at) VALUES (999, 0)",
        &[],
    );
    match place.try_open() {
        Err(StoreError::NewerSchema { found: 999, .. }) => {}
        other => panic!("{:?}", other.map(|_| "opened")),
    }
}

const OUTCOMES: [&str; 4] = ["succeeded", "raised", "timeout", "throttled"];
const STEPS: [i64; 5] = [60_000, 300_000, 3_600_000, 7_200_000, 86_400_000];
const T0: i64 = 1_700_000_000_000;

/// One generated call: function, outcome, offset from T0, cold, duration, cpu, memory.
type Gen = (usize, usize, i64, bool, f64, f64, u64);

fn completion(outcome: &str, cold: bool, ms: f64, cpu: f64, mem: u64) -> Completion {
    let status = match outcome {
        "succeeded" => TaskStatus::Succeeded,
        "timeout" => TaskStatus::Timeout,
        _ => TaskStatus::Failed,
    };
    let error = (outcome != "succeeded").then(|| TaskError {
        kind: ErrorKind::parse(outcome).expect("a known kind"),
        error_type: String::new(),
        message: String::new(),
        traceback: String::new(),
    });
    let usage = (outcome != "throttled").then(|| TaskUsage {
        duration_ms: ms,
        init_duration_ms: if cold { ms / 3.0 } else { 0.0 },
        cpu_ms: cpu,
        peak_memory_bytes: mem,
        cold,
        ..TaskUsage::default()
    });
    Completion {
        status,
        result: None,
        error,
        logs: String::new(),
        logs_truncated: false,
        usage,
    }
}

/// A store holding `calls`, stored in batches of up to five as the recorder commits them,
/// half queued then ended and half stored once ended.
fn store_with(place: &Place, calls: &[Gen]) -> (Arc<dyn Store>, Vec<Function>) {
    let store = place.open();
    let functions: Vec<Function> = [("a", "one"), ("a", "two"), ("b", "one")]
        .iter()
        .map(|(tenant, name)| deploy(store.as_ref(), tenant, name))
        .collect();
    let mut batch = Vec::new();
    for (i, (f, outcome, offset, cold, ms, cpu, mem)) in calls.iter().enumerate() {
        let function = &functions[*f];
        let task = task(&function.tenant, function, Mode::Sync);
        let c = completion(OUTCOMES[*outcome], *cold, *ms, *cpu, *mem);
        if i % 2 == 0 {
            let task_id = task.task_id.clone();
            batch.push(Write::Insert(task));
            batch.push(Write::Complete {
                task_id,
                tenant: function.tenant.clone(),
                completion: c,
                at: T0 + offset,
            });
        } else {
            batch.push(Write::Finished {
                task: Box::new(task),
                completion: c,
                at: T0 + offset,
            });
        }
        if i % 5 == 4 || i + 1 == calls.len() {
            store.write(&batch).unwrap();
            batch.clear();
        }
    }
    (store, functions)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The rollups of `step` over `[since, until)` equal the raw calls grouped the same way.
fn check(
    store: &dyn Store,
    tenant: Option<&str>,
    fid: Option<&str>,
    since: i64,
    until: i64,
    step: i64,
) {
    let resolution = resolution_for(step).unwrap();
    let first = bucket_start(since, step);
    let rows: Vec<(i64, Stats)> = store
        .rollups(tenant, fid, resolution, first, until)
        .unwrap()
        .into_iter()
        .map(|r| (r.start, r.stats))
        .collect();
    let got = series(rows.iter().map(|(t, s)| (*t, s)), since, until, step);
    let raw_end = bucket_start(until - 1, resolution) + resolution;
    let raw = store.calls(tenant, fid, first, raw_end).unwrap();
    let singles: Vec<(i64, Stats)> = raw
        .iter()
        .map(|c| {
            let mut s = Stats::default();
            s.add(c);
            (c.at, s)
        })
        .collect();
    let want = series(singles.iter().map(|(t, s)| (*t, s)), since, until, step);
    assert_eq!(got.len(), want.len());
    for ((t, g), (_, w)) in got.iter().zip(&want) {
        let at = format!("step at {t} ({tenant:?} {fid:?} step {step})");
        assert_eq!(
            (g.count, g.timed, g.cold, &g.errors_by_kind, &g.bins),
            (w.count, w.timed, w.cold, &w.errors_by_kind, &w.bins),
            "{at}"
        );
        assert_eq!(
            (g.duration_max, g.cpu_max, g.memory_max),
            (w.duration_max, w.cpu_max, w.memory_max),
            "{at}"
        );
        for (a, b) in [
            (g.duration_sum, w.duration_sum),
            (g.init_sum, w.init_sum),
            (g.cpu_sum, w.cpu_sum),
            (g.memory_sum, w.memory_sum),
        ] {
            assert!(close(a, b), "{at}: {a} vs {b}");
        }
        let mut durations: Vec<f64> = raw
            .iter()
            .filter(|c| c.timed && bucket_start(c.at, step) == *t && c.at < raw_end)
            .map(|c| c.duration_ms)
            .collect();
        durations.sort_by(f64::total_cmp);
        if !durations.is_empty() {
            for p in [50.0, 95.0, 99.0] {
                let exact = cloudfunc_server::metrics::percentile(&durations, p);
                assert_eq!(bin(g.percentile(p)), bin(exact), "{at}: p{p}");
            }
        }
    }
}

fn call() -> impl Strategy<Value = Gen> {
    (
        0..3usize,
        0..OUTCOMES.len(),
        0..3 * 86_400_000i64,
        any::<bool>(),
        -3.0..6.5f64,
        0.0..1000.0f64,
        0..1u64 << 32,
    )
        .prop_map(|(f, o, at, cold, exp, cpu, mem)| (f, o, at, cold, 10f64.powf(exp), cpu, mem))
}

/// The rollups match the raw records for any calls, window and step (a property test, each
/// case in a store of its own).
fn rollups_match_raw_records(new_place: &dyn Fn() -> Place) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    let strategy = (
        prop::collection::vec(call(), 0..120),
        0..3 * 86_400_000i64,
        1..2 * 86_400_000i64,
        0..STEPS.len(),
    );
    runner
        .run(&strategy, |(calls, from, span, step)| {
            let place = new_place();
            let (store, functions) = store_with(&place, &calls);
            let step = STEPS[step];
            let (since, until) = (T0 + from, T0 + from + span);
            if (until - bucket_start(since, step)) / step > 3_000 {
                return Ok(());
            }
            let store = store.as_ref();
            check(store, None, None, since, until, step);
            check(store, Some("a"), None, since, until, step);
            check(store, Some("b"), None, since, until, step);
            check(store, None, Some(&functions[1].id), since, until, step);
            check(store, Some("b"), Some(&functions[1].id), since, until, step);
            Ok(())
        })
        .unwrap();
}

fn a_task_counts_once_and_survives_the_pruning_of_raw_records(place: &Place) {
    let (store, functions) = store_with(place, &[(0, 0, 0, true, 12.0, 3.0, 1 << 20)]);
    let f = &functions[0];
    let task = task(&f.tenant, f, Mode::Sync);
    insert(store.as_ref(), &task);
    let c = completion("raised", false, 2.0, 1.0, 10);
    for _ in 0..2 {
        // Storing the same ending again (a retried write) adds nothing.
        store
            .write(&[Write::Complete {
                task_id: task.task_id.clone(),
                tenant: task.tenant.clone(),
                completion: c.clone(),
                at: T0 + 10,
            }])
            .unwrap();
    }
    assert_eq!(store.prune(now_ms() + 1).unwrap(), 2);
    assert!(store.calls(None, None, 0, i64::MAX).unwrap().is_empty());
    for resolution in cloudfunc_server::rollup::RESOLUTIONS {
        let rows = store
            .rollups(Some("a"), None, resolution, 0, i64::MAX)
            .unwrap();
        let mut total = Stats::default();
        rows.iter().for_each(|r| total.merge(&r.stats));
        assert_eq!(
            (total.count, total.cold, total.errors()),
            (2, 1, 1),
            "{resolution}"
        );
        assert_eq!(total.duration_max, 12.0);
        assert_eq!(rows[0].function, "one");
    }
    assert_eq!(store.prune_rollups(60_000, T0 + 3_600_000).unwrap(), 2);
    assert!(store
        .rollups(None, None, 60_000, 0, i64::MAX)
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .rollups(None, None, 3_600_000, 0, i64::MAX)
            .unwrap()
            .len(),
        2
    );
}

/// Endings stored several to a batch: each task counts once in the rollups, whether the
/// batch ends it once, twice, or after an earlier batch already did; the last ending stays.
fn endings_in_one_batch_count_once(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let tasks: Vec<Task> = (0..4).map(|_| task("alice", &f, Mode::Async)).collect();
    store
        .write(&tasks.iter().cloned().map(Write::Insert).collect::<Vec<_>>())
        .unwrap();
    let end = |t: &Task, c: Completion| Write::Complete {
        task_id: t.task_id.clone(),
        tenant: t.tenant.clone(),
        completion: c,
        at: T0,
    };
    let ok = completion("succeeded", false, 1.0, 1.0, 1);
    let raised = completion("raised", false, 2.0, 1.0, 1);
    // Two open tasks in one batch.
    store
        .write(&[end(&tasks[0], ok.clone()), end(&tasks[1], ok.clone())])
        .unwrap();
    // One already ended beside one open, then one ended twice in a batch.
    store
        .write(&[end(&tasks[1], raised.clone()), end(&tasks[2], ok.clone())])
        .unwrap();
    store
        .write(&[end(&tasks[3], ok.clone()), end(&tasks[3], raised.clone())])
        .unwrap();
    let day = store
        .rollups(Some("alice"), None, 86_400_000, 0, i64::MAX)
        .unwrap();
    let mut total = Stats::default();
    day.iter().for_each(|r| total.merge(&r.stats));
    assert_eq!(total.count, 4, "{day:?}");
    for (t, status) in [
        (&tasks[0], TaskStatus::Succeeded),
        (&tasks[1], TaskStatus::Failed),
        (&tasks[2], TaskStatus::Succeeded),
        (&tasks[3], TaskStatus::Failed),
    ] {
        let read = store.task(None, &t.task_id).unwrap().unwrap();
        assert_eq!(read.status, status, "{}", t.task_id);
        assert_eq!(read.finished_at, Some(T0));
    }
}

/// A batch mixing submissions and endings means what it says in order: an ending after its
/// task's insert in the same batch ends it, and an ending before the insert of its task finds
/// nothing to end (the task stays queued), however the store groups the statements.
fn a_batch_of_inserts_and_endings_keeps_its_order(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let t: Vec<Task> = (0..5).map(|_| task("alice", &f, Mode::Async)).collect();
    store
        .write(&[Write::Insert(t[0].clone()), Write::Insert(t[1].clone())])
        .unwrap();
    let end = |t: &Task| Write::Complete {
        task_id: t.task_id.clone(),
        tenant: t.tenant.clone(),
        completion: completion("succeeded", false, 1.0, 1.0, 1),
        at: T0,
    };
    store
        .write(&[
            Write::Insert(t[2].clone()),
            end(&t[0]),
            Write::Insert(t[3].clone()),
            end(&t[1]),
            end(&t[2]),
        ])
        .unwrap();
    store
        .write(&[end(&t[4]), Write::Insert(t[4].clone())])
        .unwrap();
    let status = |t: &Task| store.task(None, &t.task_id).unwrap().unwrap().status;
    assert_eq!(
        t.iter().map(status).collect::<Vec<_>>(),
        [
            TaskStatus::Succeeded,
            TaskStatus::Succeeded,
            TaskStatus::Succeeded,
            TaskStatus::Queued,
            TaskStatus::Queued
        ]
    );
    assert_eq!(store.queue_depth().unwrap(), 2);
}

/// The queue's claim carries the ends of the tasks that ran before it: the writes come first
/// (an insert in the same batch can be claimed), and a write that fails takes the claim
/// with it (nothing claimed, nothing written).
fn a_claim_commits_with_the_writes_before_it(place: &Place) {
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let t = in_order(&f, 3);
    insert(store.as_ref(), &t[0]);
    let first = store.claim(1).unwrap();
    assert_eq!(first.len(), 1);
    let end = Write::Complete {
        task_id: t[0].task_id.clone(),
        tenant: "alice".into(),
        completion: completion("succeeded", false, 1.0, 1.0, 1),
        at: T0,
    };
    let claimed = store
        .write_and_claim(&[end, Write::Insert(t[1].clone())], 4)
        .unwrap();
    assert_eq!(
        claimed.iter().map(|t| &t.task_id).collect::<Vec<_>>(),
        [&t[1].task_id],
        "the insert before the claim is claimed"
    );
    let status = |t: &Task| store.task(None, &t.task_id).unwrap().unwrap().status;
    assert_eq!(status(&t[0]), TaskStatus::Succeeded);
    assert_eq!(status(&t[1]), TaskStatus::Running);

    // The same id again fails the batch: t[2]'s insert and the claim go with it.
    let refused = store.write_and_claim(
        &[Write::Insert(t[2].clone()), Write::Insert(t[1].clone())],
        4,
    );
    assert!(refused.is_err(), "{refused:?}");
    assert!(store.task(None, &t[2].task_id).unwrap().is_none());
    assert_eq!(status(&t[1]), TaskStatus::Running);
    // So does a statement failing behind one that succeeded (on PostgreSQL, sent together).
    let refused = store.write_and_claim(
        &[
            Write::Insert(t[2].clone()),
            Write::Finished {
                task: Box::new(t[1].clone()),
                completion: completion("succeeded", false, 1.0, 1.0, 1),
                at: T0,
            },
        ],
        4,
    );
    assert!(refused.is_err(), "{refused:?}");
    assert!(store.task(None, &t[2].task_id).unwrap().is_none());
    assert_eq!(status(&t[1]), TaskStatus::Running);
    // A limit of 0 writes and claims nothing.
    assert!(store
        .write_and_claim(&[Write::Insert(t[2].clone())], 0)
        .unwrap()
        .is_empty());
    assert_eq!(status(&t[2]), TaskStatus::Queued);
    assert_eq!(store.running().unwrap(), 1);
}

/// TLS to PostgreSQL: with the server's CA the store connects encrypted (the server says so);
/// without it, or to a name the certificate does not carry, the certificate is refused; and
/// the server here takes no plaintext over TCP, so the connections cannot have been plain.
fn tls_to_postgres_is_verified() {
    // The error and its causes, as `serve` prints them.
    let why = |e: StoreError| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    };
    let (pg, ca) = Postgres::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let key = || KeySource::File(dir.path().join("master.key"));
    let open = |url: &str, ca: Option<&std::path::Path>| PgStore::open(url, ca, key(), true, 2);

    let store = open(&pg.tcp_url("postgres", ""), Some(&ca)).unwrap();
    deploy(&store, "alice", "hello");
    let mut admin = ::postgres::Client::connect(&pg.url("postgres"), ::postgres::NoTls).unwrap();
    let encrypted: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'cloudfunc' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "no encrypted connection of the store");
    drop(store);

    // sslmode=require alone verifies against the public roots, which did not sign this one.
    let refused = why(open(&pg.tcp_url("postgres", "sslmode=require"), None).unwrap_err());
    assert!(refused.contains("certificate"), "{refused}");
    // The right CA, the wrong name: the certificate is for localhost.
    let url = pg
        .tcp_url("postgres", "")
        .replace("host=localhost", "host=127.0.0.1");
    let refused = why(open(&url, Some(&ca)).unwrap_err());
    assert!(refused.contains("certificate"), "{refused}");
    // Plaintext over TCP is refused by this server: what connected above was TLS.
    let plain = why(open(&pg.tcp_url("postgres", "sslmode=disable"), None).unwrap_err());
    assert!(plain.contains("pg_hba.conf"), "{plain}");
    // A CA file that is not one says so.
    std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
    let bad = open(
        &pg.tcp_url("postgres", ""),
        Some(&dir.path().join("bad.pem")),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("bad.pem"), "{bad}");
}

type Test = fn(&Place);

const TESTS: &[(&str, Test)] = &[
    (
        "a_claim_stops_at_its_payload_budget",
        a_claim_stops_at_its_payload_budget,
    ),
    (
        "tasks_given_back_unstarted_keep_their_place",
        tasks_given_back_unstarted_keep_their_place,
    ),
    (
        "versions_tenants_and_the_queue",
        versions_tenants_and_the_queue,
    ),
    (
        "the_oldest_due_task_is_claimed_first",
        the_oldest_due_task_is_claimed_first,
    ),
    (
        "a_task_requeued_behind_the_claims_is_claimed_within_a_second",
        a_task_requeued_behind_the_claims_is_claimed_within_a_second,
    ),
    (
        "an_ended_task_reads_back_the_same_whichever_way_it_was_stored",
        an_ended_task_reads_back_the_same_whichever_way_it_was_stored,
    ),
    (
        "chains_runs_and_steps_round_trip",
        chains_runs_and_steps_round_trip,
    ),
    (
        "idempotency_keys_go_to_the_first_claim",
        idempotency_keys_go_to_the_first_claim,
    ),
    (
        "damaged_records_are_reported_and_the_queue_goes_on",
        damaged_records_are_reported_and_the_queue_goes_on,
    ),
    (
        "a_damaged_record_in_a_claim_leaves_the_budget_as_it_was",
        a_damaged_record_in_a_claim_leaves_the_budget_as_it_was,
    ),
    (
        "code_secrets_and_keys_survive_rotation_and_reencryption",
        code_secrets_and_keys_survive_rotation_and_reencryption,
    ),
    (
        "the_outbox_delivers_each_notification_once_per_subscription",
        the_outbox_delivers_each_notification_once_per_subscription,
    ),
    (
        "anomaly_findings_and_state_round_trip",
        anomaly_findings_and_state_round_trip,
    ),
    (
        "concurrent_claims_take_each_task_once",
        concurrent_claims_take_each_task_once,
    ),
    ("a_newer_schema_is_refused", a_newer_schema_is_refused),
    (
        "endings_in_one_batch_count_once",
        endings_in_one_batch_count_once,
    ),
    (
        "a_batch_of_inserts_and_endings_keeps_its_order",
        a_batch_of_inserts_and_endings_keeps_its_order,
    ),
    (
        "a_claim_commits_with_the_writes_before_it",
        a_claim_commits_with_the_writes_before_it,
    ),
    (
        "a_task_counts_once_and_survives_the_pruning_of_raw_records",
        a_task_counts_once_and_survives_the_pruning_of_raw_records,
    ),
];

/// PostgreSQL restarting under the store: the connections the store holds break, and the
/// store is whole again without being reopened, nothing committed lost, no call failing for a
/// connection that broke while idle.
fn the_store_outlives_a_database_restart() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let connections = 3;
    let store = PgStore::open(
        &pg.database(),
        None,
        KeySource::File(dir.path().join("master.key")),
        true,
        connections,
    )
    .unwrap();
    let f = deploy(&store, "alice", "hello");
    let tasks = in_order(&f, 2);
    insert(&store, &tasks[0]);
    // Every connection of the pool open and idle.
    std::thread::scope(|s| {
        for _ in 0..connections {
            s.spawn(|| store.queue_depth().unwrap());
        }
    });
    pg.restart();
    let found = store.task(None, &tasks[0].task_id).unwrap();
    assert_eq!(found.unwrap().status, TaskStatus::Queued);
    insert(&store, &tasks[1]);
    assert_eq!(
        claimed_ids(&store, 5),
        [tasks[0].task_id.clone(), tasks[1].task_id.clone()]
    );
}

/// An ending that waits on another transaction ending the same task (another node's recovery
/// interrupting it) is stored once that one commits, and the task is counted once: by the
/// transaction that ended it first.
fn an_ending_behind_another_is_stored_and_counted_once(pg: &Postgres) {
    let place = Place::postgres(pg);
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let t = task("alice", &f, Mode::Async);
    insert(store.as_ref(), &t);
    assert_eq!(
        claimed_ids(store.as_ref(), 1),
        std::slice::from_ref(&t.task_id)
    );

    let mut other =
        postgres::Client::connect(place.url.as_deref().unwrap(), postgres::NoTls).unwrap();
    let mut first = other.transaction().unwrap();
    first
        .execute(
            "UPDATE tasks SET status = 'interrupted', error_kind = 'interrupted', finished_at = $2 WHERE id = $1",
            &[&t.task_id, &T0],
        )
        .unwrap();
    let writer = {
        let (store, id) = (store.clone(), t.task_id.clone());
        std::thread::spawn(move || {
            store.write(&[Write::Complete {
                task_id: id,
                tenant: "alice".into(),
                completion: completion("succeeded", false, 3.0, 1.0, 1),
                at: T0 + 1,
            }])
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!writer.is_finished(), "the ending waits for the row");
    first.commit().unwrap();
    writer.join().unwrap().unwrap();

    let read = store.task(None, &t.task_id).unwrap().unwrap();
    assert_eq!(
        (read.status, read.finished_at),
        (TaskStatus::Succeeded, Some(T0 + 1)),
        "the later ending takes the row"
    );
    let day = store
        .rollups(Some("alice"), None, 86_400_000, 0, i64::MAX)
        .unwrap();
    assert!(
        day.iter().all(|r| r.stats.count == 0),
        "counted by the transaction that ended it first (here none): {day:?}"
    );
}

/// A node that stopped heartbeating is listed (dead) for a day, then forgotten by the
/// others' checks, unless a task of its is still running.
fn a_node_silent_for_a_day_is_forgotten(pg: &Postgres) {
    use cloudfunc_server::store::NodeInfo;
    let place = Place::postgres(pg);
    let store = place.open();
    let cluster = store.cluster().expect("PostgreSQL is a cluster's store");
    let node = |id: &str| NodeInfo {
        id: id.into(),
        address: "http://10.0.0.9:8080".into(),
        started_at: T0,
        heartbeat_at: T0,
        version: "test".into(),
    };
    for id in ["gone", "yesterday"] {
        cluster.heartbeat(&node(id)).unwrap();
    }
    let mut sql =
        postgres::Client::connect(place.url.as_deref().unwrap(), postgres::NoTls).unwrap();
    let hours_ago = |h: i64| cloudfunc_server::model::now_ms() - h * 3_600_000;
    sql.execute(
        "UPDATE nodes SET heartbeat_at = $2 WHERE id = $1",
        &[&"gone", &hours_ago(25)],
    )
    .unwrap();
    sql.execute(
        "UPDATE nodes SET heartbeat_at = $2 WHERE id = $1",
        &[&"yesterday", &hours_ago(23)],
    )
    .unwrap();
    cluster.reap(15_000, &|_| false, &|_| 0).unwrap();
    let listed: Vec<String> = cluster.nodes().unwrap().into_iter().map(|n| n.id).collect();
    assert!(!listed.contains(&"gone".to_string()), "{listed:?}");
    assert!(listed.contains(&"yesterday".to_string()), "{listed:?}");
}

/// A queue batch reads the tasks it writes and claims by key: a connection keeps its
/// statements prepared, and plans made while the table was nearly empty (a new database,
/// before PostgreSQL analysed it) must not go on reading the whole table, by a scan of it or
/// of an index, a moment after it has grown.
fn queue_batches_never_scan_the_tasks_table(pg: &Postgres) {
    let place = Place::postgres(pg);
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    let end = |id: String| Write::Complete {
        task_id: id,
        tenant: "alice".into(),
        completion: completion("succeeded", false, 3.0, 1.0, 1),
        at: now_ms(),
    };
    // Planned while the table holds two tasks: one claimed, then ended as the other is.
    insert(store.as_ref(), &task("alice", &f, Mode::Async));
    insert(store.as_ref(), &task("alice", &f, Mode::Async));
    let first = claimed_ids(store.as_ref(), 1);
    let mut running: Vec<String> = store
        .write_and_claim(&first.into_iter().map(end).collect::<Vec<_>>(), 1)
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(running.len(), 1);
    let mut updates = 3;
    const GROWN: i64 = 3_000;
    let now = now_ms();
    let backlog: Vec<Write> = (0..GROWN)
        .map(|i| {
            let mut t = task("alice", &f, Mode::Async);
            t.created_at = now + i;
            Write::Insert(t)
        })
        .collect();
    store.write(&backlog).unwrap();
    // The store has PostgreSQL analyse the grown table (on a thread of its own).
    let mut db = postgres::Client::connect(place.url.as_deref().unwrap(), postgres::NoTls).unwrap();
    let analysed = |db: &mut postgres::Client| -> bool {
        db.query_one(
            "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'tasks'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for _ in 0..100 {
        if analysed(&mut db) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        analysed(&mut db),
        "the store analysed the grown tasks table"
    );
    for _ in 0..10 {
        let ends: Vec<Write> = running.drain(..).map(end).collect();
        running = store
            .write_and_claim(&ends, 8)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(running.len(), 8);
        updates += ends.len() + running.len();
    }
    // A closed connection reports what it read.
    drop(store);
    let updates = i64::try_from(updates).unwrap();
    let read = |db: &mut postgres::Client| -> (i64, i64) {
        let row = db
            .query_one(
                "SELECT n_tup_upd, seq_tup_read + COALESCE(idx_tup_fetch, 0)
                 FROM pg_stat_user_tables WHERE relname = 'tasks'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let mut seen = read(&mut db);
    for _ in 0..100 {
        if seen.0 >= updates {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = read(&mut db);
    }
    assert!(
        seen.0 >= updates,
        "the batches' updates are reported: {seen:?}"
    );
    assert!(
        seen.1 < GROWN,
        "no batch read the grown table whole: {} rows read",
        seen.1
    );
}

/// Queued and running tasks write nothing into the indexes of finished tasks (by end time,
/// and by function and end time): their one reader asks for a range of end times, and each
/// submission and claim wrote an entry there for nothing (migrations 3 and 4).
fn open_tasks_stay_out_of_the_finished_tasks_indexes(pg: &Postgres) {
    let place = Place::postgres(pg);
    let store = place.open();
    let f = deploy(store.as_ref(), "alice", "hello");
    const OPEN: usize = 5_000;
    let backlog: Vec<Write> = (0..OPEN)
        .map(|_| Write::Insert(task("alice", &f, Mode::Async)))
        .collect();
    store.write(&backlog).unwrap();
    assert_eq!(store.claim(OPEN / 2).unwrap().len(), OPEN / 2);
    let mut db = postgres::Client::connect(place.url.as_deref().unwrap(), postgres::NoTls).unwrap();
    let size = |db: &mut postgres::Client, index: &str| -> i64 {
        db.query_one("SELECT pg_relation_size($1::text::regclass)", &[&index])
            .unwrap()
            .get(0)
    };
    // An entry per task version would take well over 100 KiB here (the primary key, for
    // scale); an empty B-tree is its metapage and a root page.
    let pkey = size(&mut db, "tasks_pkey");
    assert!(
        pkey > 100 * 1024,
        "the primary key holds the tasks: {pkey} bytes"
    );
    for index in ["tasks_finished", "tasks_function"] {
        let bytes = size(&mut db, index);
        assert!(
            bytes <= 16 * 1024,
            "{index} holds open tasks: {bytes} bytes"
        );
    }
    // And the calls of a range still come from finished tasks, by function or not.
    let ended = store.claim(1).unwrap().remove(0);
    let at = now_ms();
    store
        .write(&[Write::Complete {
            task_id: ended.task_id.clone(),
            tenant: "alice".into(),
            completion: completion("succeeded", false, 3.0, 1.0, 1),
            at,
        }])
        .unwrap();
    for function in [Some(f.id.as_str()), None] {
        let calls = store.calls(None, function, at - 1, at + 1).unwrap();
        assert_eq!(calls.len(), 1, "the finished task's call, for {function:?}");
    }
}

/// A PostgreSQL test on the run's cluster.
type ClusterTest = fn(&Postgres);

/// PostgreSQL's own tests, each on the run's cluster (in a database of its own).
const ON_THE_CLUSTER: &[(&str, ClusterTest)] = &[
    (
        "an_ending_behind_another_is_stored_and_counted_once",
        an_ending_behind_another_is_stored_and_counted_once,
    ),
    (
        "queue_batches_never_scan_the_tasks_table",
        queue_batches_never_scan_the_tasks_table,
    ),
    (
        "a_node_silent_for_a_day_is_forgotten",
        a_node_silent_for_a_day_is_forgotten,
    ),
    (
        "open_tasks_stay_out_of_the_finished_tasks_indexes",
        open_tasks_stay_out_of_the_finished_tasks_indexes,
    ),
];

fn main() {
    let args = Arguments::from_args();
    let why = Postgres::unavailable();
    if let Some(why) = &why {
        // Each of TESTS, then the rollups' property test, ON_THE_CLUSTER, and the two that
        // start servers of their own.
        let n = TESTS.len() + 1 + ON_THE_CLUSTER.len() + 2;
        println!("SKIPPED {n} PostgreSQL store tests: {why}");
    }
    // One cluster for the whole run, each test in a database of its own; started only when
    // a PostgreSQL test is selected.
    let pg: Arc<std::sync::OnceLock<Postgres>> = Arc::new(std::sync::OnceLock::new());
    let mut trials = Vec::new();
    for (name, test) in TESTS {
        let test = *test;
        trials.push(trial(
            format!("sqlite::{name}"),
            move || test(&Place::sqlite()),
            false,
        ));
        let pg = pg.clone();
        trials.push(trial(
            format!("postgres::{name}"),
            move || test(&Place::postgres(pg.get_or_init(Postgres::start))),
            why.is_some(),
        ));
    }
    trials.push(trial(
        "sqlite::rollups_match_raw_records",
        || rollups_match_raw_records(&Place::sqlite),
        false,
    ));
    {
        let pg = pg.clone();
        trials.push(trial(
            "postgres::rollups_match_raw_records",
            move || {
                let pg = pg.get_or_init(Postgres::start);
                rollups_match_raw_records(&|| Place::postgres(pg))
            },
            why.is_some(),
        ));
    }
    for (name, test) in ON_THE_CLUSTER {
        let (test, pg) = (*test, pg.clone());
        trials.push(trial(
            format!("postgres::{name}"),
            move || test(pg.get_or_init(Postgres::start)),
            why.is_some(),
        ));
    }
    trials.push(trial(
        "postgres::tls_to_postgres_is_verified",
        tls_to_postgres_is_verified,
        why.is_some(),
    ));
    trials.push(trial(
        "postgres::the_store_outlives_a_database_restart",
        the_store_outlives_a_database_restart,
        why.is_some(),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    drop(pg);
    conclusion.exit();
}
