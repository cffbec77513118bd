//! What one point costs the detector, and how big its state is.

use cloudfunc_anomaly::{Config, Detector};
use criterion::{criterion_group, criterion_main, Criterion};

fn per_point(c: &mut Criterion) {
    let mut detector = Detector::new(Config::default());
    let mut t = 1_700_000_000i64;
    // A warmed-up detector on a noisy daily series.
    for i in 0..20_000 {
        t += 300;
        detector.update(
            t,
            (f64::from(i) / 288.0 * std::f64::consts::TAU).sin() + f64::from(i % 7) * 0.1,
        );
    }
    let mut i = 0u32;
    c.bench_function("detector update, one point", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            t += 300;
            detector.update(t, (f64::from(i) / 288.0 * std::f64::consts::TAU).sin())
        })
    });
    println!(
        "state of a warm detector: {} bytes stored (to_bytes), {} bytes as JSON",
        detector.to_bytes().len(),
        serde_json::to_vec(&detector).map_or(0, |j| j.len())
    );
}

criterion_group!(benches, per_point);
criterion_main!(benches);
