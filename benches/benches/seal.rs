//! Criterion: sealing one record for encryption at rest (XChaCha20-Poly1305 with a tenant's
//! data key, as the store seals a call's payload and result), from a warm call's small
//! record to a large body. Poly1305's code is chosen when the workspace is built
//! (`.cargo/config.toml`); to compare, run it once as configured and once with
//! `RUSTFLAGS=""` (AVX2 where the CPU has it).

use cloudfunc_atrest::{Keyring, MasterKey, Sealer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn seal(c: &mut Criterion) {
    let sealer = Sealer::new(Keyring::of(MasterKey::generate()), true);
    let (key, _) = sealer.make_key("bench");
    let mut group = c.benchmark_group("seal");
    for size in [20usize, 200, 2048, 8192, 65536, 1 << 20] {
        let record = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &record, |b, record| {
            b.iter(|| sealer.seal(&key, ("tasks", "task_0123456789abcdef"), record));
        });
    }
    group.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
