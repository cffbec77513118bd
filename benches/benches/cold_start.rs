//! Criterion: cloudfunc cold starts (create -> first result -> teardown) through the engine,
//! for `/bin/true`, a Python hello and a Node hello. Needs root; prints why and measures
//! nothing otherwise. The side-by-side comparison with runc and crun is `cloudfunc-bench`.

use std::time::Duration;

use cloudfunc_benches::{bench_engine, run_cloudfunc, Code, Workload};
use criterion::{criterion_group, criterion_main, Criterion};

fn cold_start(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED cold_start benchmarks: they need root");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = bench_engine(dir.path()).expect("engine");
    let code = Code::new(&engine).expect("code");
    let mut group = c.benchmark_group("cold_start");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    for workload in Workload::ALL {
        if !workload.available() {
            eprintln!("SKIPPED cold_start/{}: not installed", workload.name());
            continue;
        }
        group.bench_function(
            workload.name().replace(['/', ' '], "_").trim_matches('_'),
            |b| b.iter(|| run_cloudfunc(&engine, workload, &code).expect("cold start")),
        );
    }
    group.finish();
}

criterion_group!(benches, cold_start);
criterion_main!(benches);
