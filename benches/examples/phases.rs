//! Where a Python cold start's time goes: medians of create (shim, libcontainer, runtime
//! start, handler load), one warm invoke, and shutdown, over 21 runs. `NOSECCOMP=1` runs
//! without the filter to measure its cost; `RUNS=N` takes N runs instead (the median is the
//! middle one). Run as root: `cargo run --release --example phases`.

use cloudfunc_benches::Code;
use cloudfunc_sandbox::{
    Engine, EngineConfig, InvokeOptions, Runtime, Sandbox, SandboxSpec, SeccompPolicy,
};
use std::time::Instant;
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::under(dir.path(), "phases");
    config.shim_binary = cloudfunc_sandbox::locate_shim();
    if std::env::var_os("NOSECCOMP").is_some() {
        config.seccomp = SeccompPolicy::DisabledUnsafe;
    }
    let engine = Engine::new(config).unwrap();
    let code = Code::new(&engine).unwrap();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(21);
    let mut rows = vec![];
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut s =
            Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, code.path())).unwrap();
        let t1 = Instant::now();
        s.invoke(&serde_json::json!({}), &InvokeOptions::default())
            .unwrap();
        let t2 = Instant::now();
        s.shutdown().unwrap();
        let t3 = Instant::now();
        rows.push((
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            (t3 - t2).as_secs_f64() * 1e3,
        ));
    }
    rows.sort_by(|a, b| (a.0 + a.1 + a.2).partial_cmp(&(b.0 + b.1 + b.2)).unwrap());
    let r = rows[runs / 2];
    println!(
        "median: create {:.1} invoke {:.2} shutdown {:.1} total {:.1}",
        r.0,
        r.1,
        r.2,
        r.0 + r.1 + r.2
    );
}
