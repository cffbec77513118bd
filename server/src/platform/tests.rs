//! The platform's logic on the in-process fake backend and a real SQLite file: deploys,
//! calls, the queue, deletion and tenancy, without root, in milliseconds. The same paths run
//! on real sandboxes in `tests/api.rs`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::isolation::Isolation;
use crate::model::{ErrorKind, Mode, TaskStatus};
use crate::pool::{ManualClock, PoolConfig};
use crate::store::{KeyStore, SqliteStore};

struct Fixture {
    platform: Platform,
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

/// A platform on the fake backend in `dir`, over `store`.
fn platform_on(
    dir: &std::path::Path,
    store: Arc<dyn crate::store::Store>,
    pool: PoolConfig,
) -> Platform {
    let engine = cloudfunc_sandbox::fake::engine(dir, "platform-test").unwrap();
    let engines = Engines::from_parts(
        engine,
        Err("gVisor is not part of these tests".into()),
        Isolation::Container,
    );
    let pool = Arc::new(Pool::new(engines, pool, Arc::new(ManualClock::default())));
    Platform::new(store, pool, PlatformConfig::new(dir)).unwrap()
}

fn fixture(pool: PoolConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap());
    let platform = platform_on(dir.path(), store.clone(), pool);
    Fixture {
        platform,
        store,
        _dir: dir,
    }
}

fn quiet() -> PoolConfig {
    PoolConfig {
        stem_cells: 0,
        ..PoolConfig::default()
    }
}

fn alice() -> Caller {
    Caller {
        tenant: "alice".into(),
        admin: false,
    }
}

fn named(name: &str) -> Settings {
    Settings {
        name: Some(name.into()),
        ..Settings::default()
    }
}

fn python(extra: &[(&str, &str)]) -> Code {
    let mut files = vec![(
        "function.py".to_string(),
        b"def handler(e): return e\n".to_vec(),
    )];
    for (name, text) in extra {
        files.push((name.to_string(), text.as_bytes().to_vec()));
    }
    Code::Files(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_is_loaded_before_it_is_stored_and_serves_its_first_call_warm() {
    let f = fixture(quiet());
    let (function, v1) = f
        .platform
        .deploy(&alice(), named("echo"), python(&[]))
        .await
        .unwrap();
    assert_eq!(
        (function.version, v1.runtime),
        (1, cloudfunc_sandbox::Runtime::Python)
    );
    let task = f
        .platform
        .invoke(&alice(), "echo", None, json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Succeeded);
    assert_eq!(task.result, Some(json!({"n": 1})));
    assert_eq!(task.mode, Mode::Sync);
    let usage = task.usage.unwrap();
    assert!(!usage.cold, "the deploy's sandbox was kept: {usage:?}");
    assert_eq!(usage.backend, "fake");

    // The next version keeps the settings it does not change.
    let settings = Settings {
        memory: Some(64),
        ..named("echo")
    };
    f.platform
        .deploy(&alice(), settings, python(&[]))
        .await
        .unwrap();
    let (_, v3) = f
        .platform
        .deploy(&alice(), named("echo"), Code::Unchanged)
        .await
        .unwrap();
    assert_eq!((v3.version, v3.memory_mb), (3, 64));

    // The call's record is read back after the reply, though written behind it.
    let stored = f.platform.task(&alice(), &task.task_id).await.unwrap();
    assert_eq!(stored.result, Some(json!({"n": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_does_not_deploy_stores_nothing() {
    let f = fixture(quiet());
    let failing = python(&[("fake.json", r#"{"init": "fail"}"#)]);
    let refused = f.platform.deploy(&alice(), named("bad"), failing).await;
    assert!(
        matches!(&refused, Err(PlatformError::Unprocessable(m)) if m.contains("does not load")),
        "{refused:?}"
    );
    let too_big = Settings {
        memory: Some(1 << 20),
        ..named("big")
    };
    let refused = f.platform.deploy(&alice(), too_big, python(&[])).await;
    assert!(
        matches!(refused, Err(PlatformError::BadRequest(_))),
        "{refused:?}"
    );
    let nameless = f
        .platform
        .deploy(&alice(), Settings::default(), python(&[]))
        .await;
    assert!(matches!(nameless, Err(PlatformError::BadRequest(_))));
    assert!(f.platform.list(&alice()).await.unwrap().is_empty());
    let code = f._dir.path().join("code");
    let left: Vec<_> = std::fs::read_dir(&code)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "code left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_of_a_call_is_recorded_as_what_it_was() {
    let f = fixture(quiet());
    let settings = Settings {
        timeout_ms: Some(100),
        ..named("f")
    };
    f.platform
        .deploy(&alice(), settings, python(&[]))
        .await
        .unwrap();
    let call = |event: Value| {
        let platform = f.platform.clone();
        async move { platform.invoke(&alice(), "f", None, event).await.unwrap() }
    };
    let raised = call(json!({"fake": {"raise": "nope"}})).await;
    assert_eq!(raised.status, TaskStatus::Failed);
    assert_eq!(raised.error.unwrap().kind, ErrorKind::Raised);
    let slow = call(json!({"fake": {"sleep_ms": 5000}})).await;
    assert_eq!(slow.status, TaskStatus::Timeout);
    let crashed = call(json!({"fake": {"crash": true}})).await;
    assert_eq!(crashed.status, TaskStatus::Crashed);
    let oom = call(json!({"fake": {"oom": true}})).await;
    assert_eq!(oom.status, TaskStatus::OutOfMemory);
    let fine = call(json!(7)).await;
    assert_eq!(
        (fine.status, fine.usage.unwrap().cold),
        (TaskStatus::Succeeded, true)
    );
    let metrics = f
        .platform
        .metrics(&alice(), Some("f"), 0, now() + 1, None)
        .await
        .unwrap();
    assert_eq!(metrics["invocations"], 5);
    assert_eq!(metrics["errors_by_kind"]["timeout"], 1);
}

fn now() -> i64 {
    crate::model::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_at_its_limit_refuses_sync_calls_and_records_them() {
    let f = fixture(PoolConfig {
        max_waiting: 0,
        ..quiet()
    });
    let settings = Settings {
        max_instances: Some(1),
        ..named("one")
    };
    f.platform
        .deploy(&alice(), settings, python(&[]))
        .await
        .unwrap();
    let slow = {
        let platform = f.platform.clone();
        tokio::spawn(async move {
            platform
                .invoke(&alice(), "one", None, json!({"fake": {"sleep_ms": 300}}))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = f.platform.invoke(&alice(), "one", None, json!(1)).await;
    assert!(
        matches!(refused, Err(PlatformError::TooBusy { .. })),
        "{refused:?}"
    );
    assert_eq!(slow.await.unwrap().unwrap().status, TaskStatus::Succeeded);
    let metrics = f
        .platform
        .metrics(&alice(), Some("one"), 0, now() + 1, None)
        .await
        .unwrap();
    assert_eq!(metrics["errors_by_kind"]["throttled"], 1, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tasks_run_once_and_a_deactivated_function_fails_its_queue() {
    let f = fixture(quiet());
    f.platform
        .deploy(&alice(), named("q"), python(&[]))
        .await
        .unwrap();
    let first = f
        .platform
        .submit(&alice(), "q", None, json!({"i": 1}))
        .await
        .unwrap();
    assert_eq!(first.status, TaskStatus::Queued);
    assert_eq!(
        f.store.queue_depth().unwrap(),
        1,
        "on disk before it returns"
    );
    let recovered = f.platform.start_queue(2, u64::MAX).await.unwrap();
    assert!(recovered.interrupted.is_empty());
    let done = wait(&f.platform, &first.task_id).await;
    assert_eq!((done.status, done.attempts), (TaskStatus::Succeeded, 1));
    assert_eq!(done.result, Some(json!({"i": 1})));

    // Deactivated: new runs are refused up front.
    f.platform.set_active(&alice(), "q", false).await.unwrap();
    let refused = f.platform.submit(&alice(), "q", None, json!(2)).await;
    assert!(matches!(refused, Err(PlatformError::Inactive(_))));
    f.platform.shutdown().await;
}

async fn wait(platform: &Platform, task_id: &str) -> crate::model::Task {
    for _ in 0..500 {
        let task = platform.task(&alice(), task_id).await.unwrap();
        if task.status.is_terminal() {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("task {task_id} never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_and_a_deleted_function_keeps_its_records() {
    let f = fixture(quiet());
    f.platform
        .deploy(&alice(), named("mine"), python(&[]))
        .await
        .unwrap();
    let bob = Caller {
        tenant: "bob".into(),
        admin: false,
    };
    let admin = Caller {
        tenant: "root".into(),
        admin: true,
    };
    assert!(matches!(
        f.platform.invoke(&bob, "mine", None, json!(1)).await,
        Err(PlatformError::NotFound(_))
    ));
    let task = f
        .platform
        .invoke(&alice(), "mine", None, json!(1))
        .await
        .unwrap();
    assert!(f.platform.task(&bob, &task.task_id).await.is_err());
    assert!(f.platform.task(&admin, &task.task_id).await.is_ok());
    assert_eq!(f.platform.list(&admin).await.unwrap().len(), 1);

    f.platform.delete(&alice(), "mine").await.unwrap();
    assert!(matches!(
        f.platform.invoke(&alice(), "mine", None, json!(1)).await,
        Err(PlatformError::NotFound(_))
    ));
    let kept = f.platform.task(&alice(), &task.task_id).await.unwrap();
    assert_eq!(kept.status, TaskStatus::Succeeded);
    // Its sandboxes went with it.
    assert_eq!(f.platform.inner.pool.stats().warm, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_s_manifest_names_the_function_when_the_deploy_does_not() {
    let f = fixture(quiet());
    let code = python(&[("cloudfunc.toml", "name = \"from-manifest\"\nmemory = 64\n")]);
    let (function, version) = f
        .platform
        .deploy(&alice(), Settings::default(), code)
        .await
        .unwrap();
    assert_eq!(
        (function.name.as_str(), version.memory_mb),
        ("from-manifest", 64)
    );
    // An explicit setting wins over the manifest's.
    let code = python(&[("cloudfunc.toml", "name = \"from-manifest\"\nmemory = 64\n")]);
    let settings = Settings {
        memory: Some(32),
        ..named("explicit")
    };
    let (function, version) = f.platform.deploy(&alice(), settings, code).await.unwrap();
    assert_eq!(
        (function.name.as_str(), version.memory_mb),
        ("explicit", 32)
    );
}

/// Figures that were slow to read (a deep queue counted on PostgreSQL) are reused longer, so
/// that a balancer checking health often costs the store a bounded share of its time.
#[test]
fn slow_health_figures_are_reused_longer() {
    use super::monitor::{health_figures_reused_for as reuse, HEALTH_FIGURES_AT_MOST};
    let ms = Duration::from_millis;
    assert_eq!(reuse(Duration::ZERO), super::monitor::HEALTH_FIGURES_FOR);
    assert_eq!(reuse(ms(1)), super::monitor::HEALTH_FIGURES_FOR);
    assert_eq!(reuse(ms(15)), ms(750));
    assert_eq!(reuse(ms(200)), HEALTH_FIGURES_AT_MOST);
    for took in [0, 3, 15, 60, 99] {
        assert!(ms(took).as_secs_f64() / reuse(ms(took)).as_secs_f64() <= 0.02);
    }
}

/// Health takes no token, so a crowd of callers must not each read the store: callers at once
/// share one read, and the figures are read again only once they are older than their reuse
/// (`HEALTH_FIGURES_FOR` at least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reads_the_store_once_for_callers_at_once() {
    use crate::store::flaky::Flaky;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky {
        inner: SqliteStore::open(&dir.path().join("db")).unwrap(),
        full: false.into(),
        depth_reads: 0.into(),
    });
    let platform = platform_on(dir.path(), store.clone(), quiet());
    let crowd: Vec<_> = (0..32)
        .map(|_| {
            let p = platform.clone();
            tokio::spawn(async move { p.health().await.unwrap()["queue_depth"].as_u64() })
        })
        .collect();
    for c in crowd {
        assert_eq!(c.await.unwrap(), Some(0));
    }
    let reads = store.depth_reads.load(Ordering::SeqCst);
    assert!(
        reads <= 2,
        "32 callers at once read the store {reads} times"
    );
    // However long the read took on a loaded machine, past its reuse it is read again.
    let reuse = platform
        .inner
        .health_figures
        .lock()
        .await
        .unwrap()
        .reused_for();
    assert!(reuse >= super::monitor::HEALTH_FIGURES_FOR);
    tokio::time::sleep(reuse + Duration::from_millis(50)).await;
    platform.health().await.unwrap();
    assert_eq!(
        store.depth_reads.load(Ordering::SeqCst),
        reads + 1,
        "older figures are read again"
    );
}

/// A key taken by a submission whose task was never stored (its server stopped between the
/// two) passes, once that submission is surely lost, to the next submission with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_task_was_never_stored_passes_on() {
    let f = fixture(quiet());
    f.platform
        .deploy(&alice(), named("echo"), python(&[]))
        .await
        .unwrap();
    let long_ago = crate::model::now_ms() - 60_000;
    f.store
        .claim_key("alice", "lost-1", "task_never_stored", long_ago)
        .unwrap();
    let (task, replayed) = f
        .platform
        .submit_once(&alice(), "echo", None, json!({"n": 1}), "lost-1")
        .await
        .unwrap();
    assert!(!replayed);
    assert_ne!(task.task_id, "task_never_stored");
    let (again, replayed) = f
        .platform
        .submit_once(&alice(), "echo", None, json!({"n": 1}), "lost-1")
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(again.task_id, task.task_id);
    let refused = f
        .platform
        .submit_once(&alice(), "echo", None, json!({"n": 1}), "bad key")
        .await;
    assert!(
        matches!(refused, Err(PlatformError::BadRequest(_))),
        "{refused:?}"
    );
}
