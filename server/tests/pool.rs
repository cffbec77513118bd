//! The warm pool, with time under the test's control, twice: on the in-process fake backend
//! (no root, milliseconds: the pool's own logic) and on real libcontainer sandboxes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloudfunc_sandbox::{Engine, EngineConfig, InvokeOptions, Limits, Runtime, SandboxSpec};
use cloudfunc_server::isolation::{Engines, Isolation};
use cloudfunc_server::pool::{
    Clock, Key, Lend, ManualClock, Pool, PoolConfig, PoolError, Request, Start,
};
use libtest_mimic::Arguments;
use serde_json::{json, Value};

struct Fixture {
    pool: Arc<Pool>,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

/// Which sandboxes a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// `cloudfunc_sandbox::fake`: the pool's logic alone.
    Fake,
    /// Real containers through libcontainer (root).
    Libcontainer,
}

thread_local! {
    /// The kind of the scenario running on this thread.
    static KIND: std::cell::Cell<Kind> = const { std::cell::Cell::new(Kind::Fake) };
}

fn fixture(tag: &str, config: PoolConfig) -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-pool-")
        .tempdir()
        .unwrap();
    let parent = format!("cf-pool-{tag}-{}", std::process::id());
    let container = match KIND.get() {
        Kind::Fake => cloudfunc_sandbox::fake::engine(dir.path(), &parent).expect("engine starts"),
        Kind::Libcontainer => {
            let mut engine = EngineConfig::under(dir.path(), &parent);
            engine.shim_binary = Some(shim());
            Engine::new(engine).expect("engine starts")
        }
    };
    let engines = Engines::from_parts(
        container,
        Err("not in this test".into()),
        Isolation::Container,
    );
    let clock = Arc::new(ManualClock::default());
    let pool = Arc::new(Pool::new(engines, config, clock.clone()));
    Fixture { pool, clock, dir }
}

fn shim() -> std::path::PathBuf {
    // The server's tests are built beside the sandbox crate's shim.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("cloudfunc-shim")
}

/// A function that writes a marker into /tmp and reports what markers it saw there (the fake
/// backend keeps the same state in memory, from the event's `fake.remember`).
const MARKER_PY: &str = "import os\ndef handler(event):\n    seen = sorted(f[7:] for f in os.listdir('/tmp') if f.startswith('marker-'))\n    open('/tmp/marker-' + event['me'], 'w').close()\n    return seen\n";

/// The event that leaves marker `me` behind, on either kind of sandbox.
fn me(me: &str) -> Value {
    json!({"me": me, "fake": {"remember": me}})
}

fn function(f: &Fixture, name: &str, version: u32, source: &str) -> (Key, Request) {
    let code = f.dir.path().join(format!("code-{name}-{version}"));
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("function.py"), source).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&code, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = SandboxSpec::new(Runtime::Python, &code);
    spec.limits = Limits {
        memory_bytes: 64 << 20,
        ..Limits::default()
    };
    (
        Key {
            function_id: name.into(),
            version,
        },
        Request {
            isolation: Isolation::Container,
            spec,
            keep_warm: Duration::from_secs(60),
            min_instances: 0,
            max_instances: 2,
            resolved_at: None,
            until: None,
        },
    )
}

fn call(pool: &Pool, key: &Key, request: &Request, event: Value) -> (Value, Start) {
    let mut lease = pool.acquire(key, request, true).expect("a sandbox");
    let start = lease.start;
    let call = lease
        .sandbox
        .invoke(&event, &InvokeOptions::default())
        .unwrap();
    pool.release(lease);
    match call.outcome {
        cloudfunc_sandbox::Outcome::Succeeded { result } => (result, start),
        other => panic!("call failed: {other:?}"),
    }
}

fn keep_warm_expiry_and_reset() {
    let f = fixture(
        "expiry",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, req) = function(&f, "fa", 1, MARKER_PY);
    assert_eq!(call(&f.pool, &key, &req, me("1")).1, Start::Cold);
    f.clock.advance(Duration::from_secs(50));
    f.pool.tick();
    // Within 60 s: still there, and this call resets the timer.
    assert_eq!(call(&f.pool, &key, &req, me("2")).1, Start::Warm);
    f.clock.advance(Duration::from_secs(50));
    f.pool.tick();
    assert_eq!(
        f.pool.idle_count(&key),
        1,
        "100 s after the first call, 50 after the last"
    );
    f.clock.advance(Duration::from_secs(11));
    f.pool.tick();
    assert_eq!(f.pool.idle_count(&key), 0, "61 s idle: torn down");
    let stats = f.pool.stats();
    assert_eq!((stats.sandboxes, stats.expired), (0, 1), "{stats:?}");
    assert_eq!(call(&f.pool, &key, &req, me("3")).1, Start::Cold);
    f.pool.shutdown();
}

fn stem_cells_refill_and_bind() {
    let f = fixture(
        "stem",
        PoolConfig {
            stem_cells: 1,
            ..PoolConfig::default()
        },
    );
    f.pool.tick();
    assert_eq!(
        f.pool.stats().prewarmed,
        1 + usize::from(Runtime::Node.available())
    );
    let (key, req) = function(&f, "fb", 1, MARKER_PY);
    let (seen, start) = call(&f.pool, &key, &req, me("b"));
    assert_eq!(start, Start::Prewarmed);
    assert_eq!(seen, json!([]));
    assert_eq!(
        f.pool.stats().prewarmed,
        usize::from(Runtime::Node.available()),
        "one taken"
    );
    f.pool.tick();
    assert_eq!(
        f.pool.stats().prewarmed,
        1 + usize::from(Runtime::Node.available()),
        "refilled"
    );
    assert_eq!(call(&f.pool, &key, &req, me("b2")).1, Start::Warm);
    f.pool.shutdown();
    assert_eq!(f.pool.stats().sandboxes, 0);
}

fn never_shared_across_functions_or_versions() {
    let f = fixture(
        "share",
        PoolConfig {
            stem_cells: 1,
            ..PoolConfig::default()
        },
    );
    f.pool.tick();
    let (a1, ra1) = function(&f, "fa", 1, MARKER_PY);
    let (a2, ra2) = function(&f, "fa", 2, MARKER_PY);
    let (b1, rb1) = function(&f, "fb", 1, MARKER_PY);
    assert_eq!(call(&f.pool, &a1, &ra1, me("a1")).0, json!([]));
    // The same version sees its own marker: it is the same warm sandbox.
    assert_eq!(call(&f.pool, &a1, &ra1, me("a1b")).0, json!(["a1"]));
    // Another version and another function never do.
    assert_eq!(call(&f.pool, &a2, &ra2, me("a2")).0, json!([]));
    assert_eq!(call(&f.pool, &b1, &rb1, me("b1")).0, json!([]));
    f.pool.shutdown();
}

fn concurrency_cap_refuses_sync_calls() {
    let f = fixture(
        "cap",
        PoolConfig {
            stem_cells: 0,
            max_waiting: 0,
            ..PoolConfig::default()
        },
    );
    let (key, mut req) = function(&f, "fc", 1, MARKER_PY);
    req.max_instances = 1;
    let held = f.pool.acquire(&key, &req, true).unwrap();
    match f.pool.acquire(&key, &req, true) {
        Err(PoolError::Busy {
            max_instances: 1,
            retry_after,
        }) => assert!(retry_after >= Duration::from_secs(1)),
        other => panic!("expected Busy, got {other:?}"),
    }
    // An async caller waits instead, and gets the sandbox once it is given back.
    let pool = f.pool.clone();
    let (k2, r2) = (key.clone(), req.clone());
    let waiter = std::thread::spawn(move || {
        pool.acquire(&k2, &r2, false).map(|l| {
            let s = l.start;
            pool.release(l);
            s
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "an async caller waits");
    f.pool.release(held);
    assert_eq!(waiter.join().unwrap().unwrap(), Start::Warm);
    f.pool.shutdown();
}

/// A caller with a deadline (a chain run's timeout) waits for a sandbox no longer than it,
/// on the thread path and the async path, and leaves the queue: the sandbox given back
/// then stays idle for the next call.
fn a_deadline_ends_the_wait_for_a_sandbox() {
    let f = fixture(
        "deadline",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, mut req) = function(&f, "fl", 1, MARKER_PY);
    req.max_instances = 1;
    req.until = Some(f.clock.now() + Duration::from_secs(5));
    let held = f.pool.acquire(&key, &req, false).unwrap();
    let pool = f.pool.clone();
    let (k2, r2) = (key.clone(), req.clone());
    let thread = std::thread::spawn(move || pool.acquire(&k2, &r2, false).map(|_| ()));
    let pool = f.pool.clone();
    let (k3, r3) = (key.clone(), req.clone());
    let task = std::thread::spawn(move || {
        runtime()
            .block_on(pool.acquire_async(&k3, &r3, Lend::Task))
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!thread.is_finished() && !task.is_finished(), "both wait");
    f.clock.advance(Duration::from_secs(6));
    for (path, waiter) in [("thread", thread), ("async", task)] {
        let got = waiter.join().unwrap();
        assert!(matches!(got, Err(PoolError::Deadline)), "{path}: {got:?}");
    }
    f.pool.release(held);
    assert_eq!(f.pool.idle_count(&key), 1, "no one left waiting took it");
    f.pool.shutdown();
}

/// A version's code tree is retired only while no sandbox of the version is lent or idle;
/// a start after it finds the code gone, and its caller is told so.
fn retired_code_is_kept_while_in_use() {
    let f = fixture(
        "retire",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, req) = function(&f, "fr", 1, MARKER_PY);
    let tree = req.spec.code_dir.clone();
    let trees = [(tree.clone(), Some(vec![1]))];
    let to = f.dir.path().join("retired");
    let moved = std::cell::Cell::new(0);
    let retire = || {
        f.pool
            .retire_code("fr", &trees, &to, || moved.set(moved.get() + 1))
            .unwrap()
    };
    let lent = f.pool.acquire(&key, &req, true).unwrap();
    assert!(retire().is_empty() && tree.is_dir(), "lent");
    f.pool.release(lent);
    assert!(retire().is_empty() && tree.is_dir(), "idle");
    f.pool.drain("fr");
    assert_eq!(retire().len(), 1);
    assert!(!tree.exists() && moved.get() == 1);
    let gone = f.pool.acquire(&key, &req, true);
    assert!(matches!(gone, Err(PoolError::CodeGone)), "{gone:?}");
    f.pool.shutdown();
}

/// Callers past `max_instances` are served in the order they came, each with the sandbox the
/// call before gave back (no new one starts); a sync caller past its wait is refused and
/// leaves the queue.
fn queued_callers_take_turns_in_order() {
    let f = fixture(
        "turns",
        PoolConfig {
            stem_cells: 0,
            max_waiting: 8,
            ..PoolConfig::default()
        },
    );
    let (key, mut req) = function(&f, "ft", 1, MARKER_PY);
    req.max_instances = 1;
    let held = f.pool.acquire(&key, &req, true).unwrap();
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..4 {
        let (pool, key, req, served) = (f.pool.clone(), key.clone(), req.clone(), served.clone());
        waiters.push(std::thread::spawn(move || {
            let lease = pool.acquire(&key, &req, true).expect("its turn comes");
            served.lock().unwrap().push((i, lease.start));
            pool.release(lease);
        }));
        // The next caller comes only once this one is queued.
        wait_until(|| f.pool.stats().waiting == i + 1);
    }
    f.pool.release(held);
    for w in waiters {
        w.join().unwrap();
    }
    let served = served.lock().unwrap().clone();
    assert_eq!(
        served,
        (0..4).map(|i| (i, Start::Warm)).collect::<Vec<_>>(),
        "first come, first served, each warm"
    );
    let stats = f.pool.stats();
    assert_eq!((stats.sandboxes, stats.calls_cold), (1, 1), "{stats:?}");
    assert_eq!(stats.waiting, 0);

    // A sync caller waits at most `max_wait` (on the pool's clock), then is refused.
    let held = f.pool.acquire(&key, &req, true).unwrap();
    let (pool, k, r) = (f.pool.clone(), key.clone(), req.clone());
    let refused = std::thread::spawn(move || pool.acquire(&k, &r, true).map(|_| ()));
    wait_until(|| f.pool.stats().waiting == 1);
    f.clock.advance(PoolConfig::default().max_wait);
    assert!(matches!(
        refused.join().unwrap(),
        Err(PoolError::Busy {
            max_instances: 1,
            ..
        })
    ));
    assert_eq!(
        f.pool.stats().waiting,
        0,
        "the refused caller left the queue"
    );
    f.pool.release(held);
    assert_eq!(f.pool.idle_count(&key), 1, "given back with no one queued");

    // A drain while a caller is queued: the sandbox given back is stopped, and the queued
    // caller starts a fresh one in its place.
    let held = f.pool.acquire(&key, &req, true).unwrap();
    let (pool, k, r) = (f.pool.clone(), key.clone(), req.clone());
    let queued = std::thread::spawn(move || {
        let lease = pool.acquire(&k, &r, false).unwrap();
        let start = lease.start;
        pool.release(lease);
        start
    });
    wait_until(|| f.pool.stats().waiting == 1);
    f.pool.drain(&key.function_id);
    f.pool.release(held);
    assert_eq!(queued.join().unwrap(), Start::Cold);
    f.pool.shutdown();
}

/// Tasks on a tokio runtime (`acquire_async`) queue in the same line as blocking callers,
/// in order; a full queue refuses them, their wait ends on the pool's clock, and a task
/// dropped after it was handed a sandbox passes the sandbox on rather than losing it.
fn async_tasks_queue_beside_threads() {
    let f = fixture(
        "tasks",
        PoolConfig {
            stem_cells: 0,
            max_waiting: 3,
            ..PoolConfig::default()
        },
    );
    let (key, req) = one_instance(&f, "fa");
    let rt = runtime();
    let held = f.pool.acquire(&key, &req, true).unwrap();
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for i in 0..3 {
        let (pool, key, req, served) = (f.pool.clone(), key.clone(), req.clone(), served.clone());
        if i == 1 {
            threads.push(std::thread::spawn(move || {
                let lease = pool.acquire(&key, &req, true).expect("its turn comes");
                served.lock().unwrap().push((i, lease.start));
                pool.release(lease);
            }));
        } else {
            tasks.push(rt.spawn(async move {
                let lease = pool
                    .acquire_async(&key, &req, Lend::Sync)
                    .await
                    .expect("its turn");
                served.lock().unwrap().push((i, lease.start));
                pool.release(lease);
            }));
        }
        wait_until(|| f.pool.stats().waiting == i + 1);
    }
    // The queue is full: a fourth sync caller is refused at once.
    let refused = rt.block_on(f.pool.acquire_async(&key, &req, Lend::Sync));
    assert!(
        matches!(refused, Err(PoolError::Busy { .. })),
        "{refused:?}"
    );
    f.pool.release(held);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        served.lock().unwrap().clone(),
        (0..3).map(|i| (i, Start::Warm)).collect::<Vec<_>>(),
        "first come, first served, threads and tasks alike"
    );

    // A sync task waits at most `max_wait` on the pool's clock.
    let held = f.pool.acquire(&key, &req, true).unwrap();
    let (pool, k, r) = (f.pool.clone(), key.clone(), req.clone());
    let late = rt.spawn(async move { pool.acquire_async(&k, &r, Lend::Sync).await.map(|_| ()) });
    wait_until(|| f.pool.stats().waiting == 1);
    f.clock.advance(PoolConfig::default().max_wait);
    let late = rt.block_on(late).unwrap();
    assert!(matches!(late, Err(PoolError::Busy { .. })), "{late:?}");
    assert_eq!(f.pool.stats().waiting, 0, "the refused task left the queue");

    // A task handed the sandbox but dropped before it ran again (its runtime went away):
    // the sandbox goes back idle, not lost as busy.
    let idle_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pool, k, r) = (f.pool.clone(), key.clone(), req.clone());
    let dropped =
        idle_rt.spawn(async move { pool.acquire_async(&k, &r, Lend::Sync).await.map(|_| ()) });
    idle_rt.block_on(async {
        while f.pool.stats().waiting == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    f.pool.release(held);
    drop(dropped);
    drop(idle_rt);
    let stats = f.pool.stats();
    assert_eq!(
        (stats.waiting, stats.busy, stats.idle),
        (0, 0, 1),
        "{stats:?}"
    );
    let (_, start) = call(&f.pool, &key, &req, me("after"));
    assert_eq!(start, Start::Warm);
    assert_eq!(f.pool.stats().sandboxes, 1);
    f.pool.shutdown();
}

/// From the start of a stop, a queued task is lent only an idle sandbox: one waiting for its
/// turn, or one that would need a sandbox started, is refused at once (so the queue can give
/// it back unstarted), and its place in line passes on; sync calls are served as before.
fn a_stop_lends_queued_tasks_only_idle_sandboxes() {
    let f = fixture(
        "stopping",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, req) = one_instance(&f, "fs");
    let rt = runtime();
    let held = f.pool.acquire(&key, &req, true).unwrap();
    // In line: a task the queue claimed, an async call (a chain's step), a sync call.
    let mut line = Vec::new();
    for (i, lend) in [Lend::Queued, Lend::Task, Lend::Sync]
        .into_iter()
        .enumerate()
    {
        let (pool, k, r) = (f.pool.clone(), key.clone(), req.clone());
        line.push(rt.spawn(async move {
            let lease = pool.acquire_async(&k, &r, lend).await?;
            let start = lease.start;
            pool.release(lease);
            Ok::<_, PoolError>(start)
        }));
        wait_until(|| f.pool.stats().waiting == i + 1);
    }

    f.pool.stop_lending_to_tasks();
    let mut line = line
        .into_iter()
        .map(|waiting| rt.block_on(waiting).unwrap());
    let queued = line.next().unwrap();
    assert!(matches!(queued, Err(PoolError::Stopping)), "{queued:?}");
    assert_eq!(f.pool.stats().waiting, 2, "the queue's task left the line");
    f.pool.release(held);
    for (who, served) in ["the async call", "the sync call"].iter().zip(line) {
        assert!(matches!(served, Ok(Start::Warm)), "{who}: {served:?}");
    }

    // An idle sandbox is still lent to a task; with none idle, a task is refused at once
    // rather than wait or start one.
    let lease = rt
        .block_on(f.pool.acquire_async(&key, &req, Lend::Queued))
        .expect("the idle sandbox");
    assert_eq!(lease.start, Start::Warm);
    let refused = rt.block_on(f.pool.acquire_async(&key, &req, Lend::Queued));
    assert!(matches!(refused, Err(PoolError::Stopping)), "{refused:?}");
    let (other, other_req) = function(&f, "fs2", 1, MARKER_PY);
    let refused = rt.block_on(f.pool.acquire_async(&other, &other_req, Lend::Queued));
    assert!(matches!(refused, Err(PoolError::Stopping)), "{refused:?}");
    assert_eq!(f.pool.stats().sandboxes, 1, "nothing started for a task");
    f.pool.release(lease);
    let (_, start) = call(&f.pool, &other, &other_req, me("sync"));
    assert_eq!(
        start,
        Start::Cold,
        "a sync call still gets a sandbox started"
    );
    f.pool.shutdown();
}

/// A function whose calls run one at a time (`max_instances` 1).
fn one_instance(f: &Fixture, name: &str) -> (Key, Request) {
    let (key, mut req) = function(f, name, 1, MARKER_PY);
    req.max_instances = 1;
    (key, req)
}

/// The tokio runtime a test's async callers run on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `cond` for up to ten seconds.
fn wait_until(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn lru_eviction_under_the_cap() {
    let f = fixture(
        "lru",
        PoolConfig {
            stem_cells: 0,
            max_sandboxes: 2,
            ..PoolConfig::default()
        },
    );
    let (a, ra) = function(&f, "fa", 1, MARKER_PY);
    let (b, rb) = function(&f, "fb", 1, MARKER_PY);
    let (c, rc) = function(&f, "fc", 1, MARKER_PY);
    call(&f.pool, &a, &ra, me("a"));
    f.clock.advance(Duration::from_secs(1));
    call(&f.pool, &b, &rb, me("b"));
    f.clock.advance(Duration::from_secs(1));
    // A third function at the cap of two: the least recently used (a) goes.
    call(&f.pool, &c, &rc, me("c"));
    f.pool.bury_now();
    assert_eq!(f.pool.idle_count(&a), 0);
    assert_eq!(f.pool.idle_count(&b), 1);
    assert_eq!(f.pool.idle_count(&c), 1);
    let stats = f.pool.stats();
    assert_eq!((stats.sandboxes, stats.evicted), (2, 1), "{stats:?}");
    f.pool.shutdown();
}

fn drain_removes_warm_sandboxes() {
    let f = fixture(
        "drain",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, req) = function(&f, "fd", 1, MARKER_PY);
    call(&f.pool, &key, &req, me("1"));
    let busy = f.pool.acquire(&key, &req, true).unwrap();
    let busy_id = busy.sandbox.id().to_string();
    call(&f.pool, &key, &req, me("2"));
    f.pool.drain("fd");
    assert_eq!(f.pool.idle_count(&key), 0);
    // The one busy during the drain is not kept when its call ends.
    f.pool.release(busy);
    assert_eq!(f.pool.idle_count(&key), 0);
    f.pool.bury_now();
    assert_eq!(f.pool.stats().sandboxes, 0);
    let engine_dir = f.dir.path().join("state/bundles").join(&busy_id);
    assert!(!engine_dir.exists(), "stopped, bundle removed");
    // A request made before a drain (from a version looked up before it) is refused, so
    // that its caller looks the version up again; one made after it is served.
    let mut before = req.clone();
    before.resolved_at = Some(f.pool.drains());
    f.pool.drain("fd");
    assert!(matches!(
        f.pool.acquire(&key, &before, true),
        Err(PoolError::Stale)
    ));
    let runtime = runtime();
    let stale = runtime.block_on(f.pool.acquire_async(&key, &before, Lend::Task));
    assert!(matches!(stale, Err(PoolError::Stale)), "{stale:?}");
    let mut after = req.clone();
    after.resolved_at = Some(f.pool.drains());
    assert_eq!(call(&f.pool, &key, &after, me("3")).1, Start::Cold);
}

fn min_instances_are_kept() {
    let f = fixture(
        "min",
        PoolConfig {
            stem_cells: 0,
            ..PoolConfig::default()
        },
    );
    let (key, mut req) = function(&f, "fm", 1, MARKER_PY);
    req.min_instances = 2;
    call(&f.pool, &key, &req, me("1"));
    f.pool.tick();
    assert_eq!(f.pool.idle_count(&key), 2, "started up to min_instances");
    f.clock.advance(Duration::from_secs(3600));
    f.pool.tick();
    assert_eq!(
        f.pool.idle_count(&key),
        2,
        "never expired below min_instances"
    );
    f.pool.shutdown();
    assert_eq!(f.pool.stats().sandboxes, 0);
}

/// A deploy's load: a stem cell bound and kept for the version's first call (counted as no
/// call), refused rather than evicting at the cap, and not kept past a later drain.
fn deploy_load_is_kept_for_the_first_call() {
    let f = fixture(
        "load",
        PoolConfig {
            stem_cells: 1,
            ..PoolConfig::default()
        },
    );
    f.pool.refill_stems();
    let (a, ra) = function(&f, "la", 1, MARKER_PY);
    let loaded = f.pool.load(&a, &ra).expect("loads");
    assert_eq!(loaded.start, Start::Prewarmed, "it bound the stem cell");
    // The deploy stores the version, then drains the function's older versions.
    let drained = f.pool.drain("la");
    f.pool.keep(loaded, drained);
    let stats = f.pool.stats();
    assert_eq!(
        (stats.idle, stats.calls_prewarmed, stats.calls_warm),
        (1, 0, 0),
        "kept, and no call counted: {stats:?}"
    );
    let (seen, start) = call(&f.pool, &a, &ra, me("a"));
    assert_eq!((seen, start), (json!([]), Start::Warm));

    // Kept under an older drain: a later drain (a delete) wins, and it is stopped.
    let (b, rb) = function(&f, "lb", 1, MARKER_PY);
    let loaded = f.pool.load(&b, &rb).expect("loads");
    let drained = f.pool.drain("lb");
    f.pool.drain("lb");
    f.pool.keep(loaded, drained);
    assert_eq!(f.pool.idle_count(&b), 0);

    // Discarded when the deploy fails after all.
    let loaded = f.pool.load(&b, &rb).expect("loads");
    f.pool.discard(loaded);
    assert_eq!(f.pool.idle_count(&b), 0);
    f.pool.bury_now();

    f.pool.shutdown();
    assert_eq!(f.pool.stats().sandboxes, 0);

    // At the cap, a load evicts nothing and is refused; a call would evict.
    let f = fixture(
        "load-cap",
        PoolConfig {
            stem_cells: 0,
            max_sandboxes: 1,
            ..PoolConfig::default()
        },
    );
    let (c, rc) = function(&f, "lc", 1, MARKER_PY);
    call(&f.pool, &c, &rc, me("c"));
    let (d, rd) = function(&f, "ld", 1, MARKER_PY);
    assert!(matches!(f.pool.load(&d, &rd), Err(PoolError::Full { .. })));
    let stats = f.pool.stats();
    assert_eq!((stats.idle, stats.evicted), (1, 0), "{stats:?}");
    f.pool.shutdown();
}

/// A shutdown that comes while a stem cell is starting stops that cell too, before it returns
/// (the process exits right after it).
fn shutdown_stops_stem_cells_still_starting() {
    let f = fixture(
        "late-stem",
        PoolConfig {
            stem_cells: 1,
            ..PoolConfig::default()
        },
    );
    let pool = f.pool.clone();
    let refill = std::thread::spawn(move || pool.refill_stems());
    // A start takes tens of milliseconds: this one is under way when the shutdown comes.
    std::thread::sleep(Duration::from_millis(5));
    f.pool.shutdown();
    let containers = f.dir.path().join("state").join("containers");
    let left: Vec<_> = std::fs::read_dir(&containers)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<std::ffi::OsString>::new(), "containers left");
    refill.join().unwrap();
    let stats = f.pool.stats();
    assert_eq!((stats.sandboxes, stats.prewarmed), (0, 0), "{stats:?}");
}

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        (
            "keep_warm_expiry_and_timer_reset",
            keep_warm_expiry_and_reset,
        ),
        ("stem_cells_refill_and_bind", stem_cells_refill_and_bind),
        (
            "never_shared_across_functions_or_versions",
            never_shared_across_functions_or_versions,
        ),
        (
            "concurrency_cap_refuses_sync_calls",
            concurrency_cap_refuses_sync_calls,
        ),
        (
            "a_deadline_ends_the_wait_for_a_sandbox",
            a_deadline_ends_the_wait_for_a_sandbox,
        ),
        (
            "retired_code_is_kept_while_in_use",
            retired_code_is_kept_while_in_use,
        ),
        (
            "queued_callers_take_turns_in_order",
            queued_callers_take_turns_in_order,
        ),
        (
            "async_tasks_queue_beside_threads",
            async_tasks_queue_beside_threads,
        ),
        ("lru_eviction_under_the_cap", lru_eviction_under_the_cap),
        ("drain_removes_warm_sandboxes", drain_removes_warm_sandboxes),
        ("min_instances_are_kept", min_instances_are_kept),
        (
            "deploy_load_is_kept_for_the_first_call",
            deploy_load_is_kept_for_the_first_call,
        ),
        (
            "shutdown_stops_stem_cells_still_starting",
            shutdown_stops_stem_cells_still_starting,
        ),
        (
            "a_stop_lends_queued_tasks_only_idle_sandboxes",
            a_stop_lends_queued_tasks_only_idle_sandboxes,
        ),
    ];
    let real_missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_string())
    } else if !Runtime::Python.available() {
        Some("/usr/bin/python3 is not installed".to_string())
    } else {
        None
    };
    if let Some(why) = &real_missing {
        println!("SKIPPED {} libcontainer pool tests: {why}", tests.len());
    }
    let mut trials = Vec::new();
    for (kind, skip) in [
        (Kind::Fake, false),
        (Kind::Libcontainer, real_missing.is_some()),
    ] {
        for (name, test) in &tests {
            let test = *test;
            let name = format!("{}::{name}", format!("{kind:?}").to_lowercase());
            let run = move || {
                KIND.set(kind);
                test()
            };
            trials.push(common::trial(name, run, skip));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
