//! Criterion: the warm pool in-process, without HTTP or the store: a warm call (take the idle
//! sandbox, invoke, give it back) and a first call that binds a stem cell to a new function
//! version. Needs root; prints why and measures nothing otherwise. The HTTP paths are
//! `cloudfunc-load`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudfunc_benches::{bench_engine, Code};
use cloudfunc_sandbox::{InvokeOptions, Runtime, SandboxSpec};
use cloudfunc_server::isolation::{Engines, Isolation};
use cloudfunc_server::pool::{Key, Pool, PoolConfig, Request, Start, SystemClock};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

fn request(code: &Code) -> Request {
    Request {
        isolation: Isolation::Container,
        spec: SandboxSpec::new(Runtime::Python, code.path()),
        keep_warm: Duration::from_secs(600),
        min_instances: 0,
        max_instances: 1,
        resolved_at: None,
        until: None,
    }
}

/// One call through the pool; panics unless it started as `expected` and succeeded.
fn call(pool: &Pool, key: &Key, request: &Request, expected: Start) {
    let mut lease = pool.acquire(key, request, true).expect("a sandbox");
    assert_eq!(lease.start, expected);
    let call = lease
        .sandbox
        .invoke(&json!({"name": "bench"}), &InvokeOptions::default())
        .expect("invoke");
    assert!(call.outcome.is_success(), "{:?}", call.outcome);
    pool.release(lease);
}

fn warm_pool(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED warm_pool benchmarks: they need root");
        return;
    }
    if !Runtime::Python.available() {
        eprintln!("SKIPPED warm_pool benchmarks: python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = bench_engine(dir.path()).expect("engine");
    let code = Code::new(&engine).expect("code");
    let engines = Engines::from_parts(engine, Err("not benchmarked".into()), Isolation::Container);
    let config = PoolConfig {
        stem_cells: 1,
        ..PoolConfig::default()
    };
    let pool = Arc::new(Pool::new(engines, config, Arc::new(SystemClock)));
    let request = request(&code);
    let mut group = c.benchmark_group("warm_pool");

    let warm = Key {
        function_id: "warm".into(),
        version: 1,
    };
    pool.refill_stems();
    call(&pool, &warm, &request, Start::Prewarmed);
    group.bench_function("warm_call_python", |b| {
        b.iter(|| call(&pool, &warm, &request, Start::Warm))
    });

    // Each sample: a stem cell is ready (started, and the last one torn down, outside the
    // timing), a version never seen takes it, binds its code and limits, and answers.
    let mut version = 0;
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("first_call_with_stem_cell_python", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                pool.refill_stems();
                // Let the new cell settle, as one waiting in the pool would have.
                std::thread::sleep(Duration::from_millis(50));
                version += 1;
                let key = Key {
                    function_id: "first".into(),
                    version,
                };
                let started = Instant::now();
                call(&pool, &key, &request, Start::Prewarmed);
                total += started.elapsed();
                pool.drain("first");
                pool.bury_now();
            }
            total
        })
    });
    group.finish();
    pool.shutdown();
}

criterion_group!(benches, warm_pool);
criterion_main!(benches);
