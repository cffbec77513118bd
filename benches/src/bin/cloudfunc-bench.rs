//! `cloudfunc-bench`: cold starts side by side, in one run, on the same bundles.
//!
//! For each workload it runs, interleaved so that drift hits every runner alike: the bare
//! host command, cloudfunc's engine (libcontainer through the shim), `runc run` and `crun run`
//! of the very bundle cloudfunc would use. It prints a Markdown table of medians and ratios.
//!
//! With `--backends` it instead compares cloudfunc's own backends (libcontainer, runc, crun,
//! each driven by the shim): cold starts, warm-call latency and memory per idle sandbox.
//!
//! `--quiet-ms M` waits M milliseconds before every cold start, so that each one starts after
//! a quiet spell, as sporadic cold starts do, instead of right after another runtime's work.
//!
//! Usage: `cloudfunc-bench [--runs N] [--quiet-ms M] [--backends]` (as root).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use cloudfunc_benches::{
    bench_engine, bench_engine_with, idle_memory, median, run_cloudfunc, run_host, warm_calls,
    warm_throughput, Code, OciCli, Workload,
};
use cloudfunc_sandbox::BackendKind;

/// crun 1.8 refuses hybrid hosts because the cgroup2 mount lists a controller. In a private
/// mount namespace of this process only, a tmpfs over that mount makes the host look like
/// plain cgroup v1 to every runtime alike; the host's own mounts are untouched.
fn hide_hybrid_cgroup2() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let hybrid = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/cgroup/unified" && f[2] == "cgroup2"
    });
    if !hybrid {
        return Ok(false);
    }
    use nix::mount::{mount, MsFlags};
    cloudfunc_sandbox::shim::private_mounts().map_err(anyhow::Error::msg)?;
    mount(
        Some("tmpfs"),
        "/sys/fs/cgroup/unified",
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=755"),
    )?;
    Ok(true)
}

/// `0..n` in an order drawn from `seed` (a fixed sequence, so runs repeat).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for k in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bound = u64::try_from(k + 1).unwrap_or(u64::MAX);
        order.swap(k, usize::try_from(state % bound).unwrap_or(0));
    }
    order
}

/// Cold starts side by side with runc and crun, backends compared, or idle density.
#[derive(clap::Parser, Debug)]
#[command(
    name = "cloudfunc-bench",
    about = "Cold starts side by side with runc and crun, backends compared, or idle density"
)]
struct Args {
    /// Runs of each workload and runner.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// A quiet spell before each start, milliseconds (sporadic cold starts).
    #[arg(long, default_value_t = 0)]
    quiet_ms: u64,
    /// Compare cloudfunc's backends (libcontainer, runc, crun, runsc) instead.
    #[arg(long, conflicts_with = "density")]
    backends: bool,
    /// Keep this many idle sandboxes and report the host memory each costs, instead.
    #[arg(long)]
    density: Option<usize>,
}

fn main() -> Result<()> {
    let Args {
        runs,
        quiet_ms,
        backends,
        density: density_of,
    } = <Args as clap::Parser>::parse();
    let quiet = Duration::from_millis(quiet_ms);
    if let Some(n) = density_of {
        return report_density(n);
    }
    if backends {
        return compare_backends(runs);
    }
    // Before any thread exists: unshare needs a single-threaded process.
    let hidden = hide_hybrid_cgroup2()?;
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-bench-")
        .tempdir()?;
    let engine = bench_engine(dir.path())?;
    let code = Code::new(&engine)?;
    let clis: Vec<OciCli> = [BackendKind::Runc, BackendKind::Crun]
        .into_iter()
        .filter_map(OciCli::find)
        .collect();
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| w.available())
        .collect();

    let mut samples: BTreeMap<(usize, &'static str), Vec<Duration>> = BTreeMap::new();
    let mut failures: BTreeMap<(usize, &'static str), String> = BTreeMap::new();
    for i in 0..runs {
        for (w, workload) in workloads.iter().enumerate() {
            let mut record = |runner: &'static str, result: Result<Duration>| match result {
                Ok(d) => samples.entry((w, runner)).or_default().push(d),
                Err(e) => {
                    failures
                        .entry((w, runner))
                        .or_insert_with(|| format!("{e:#}"));
                }
            };
            // Shuffle the order: on cgroup v1 a cgroup migration right after another one is
            // cheap, and the first after a quiet spell waits for an RCU grace period, so a
            // fixed order (or a rotation, in which crun always followed runc) would favour
            // whoever follows a runtime that migrates.
            let runners = 2 + clis.len();
            for n in shuffled(runners, (i * workloads.len() + w) as u64) {
                std::thread::sleep(quiet);
                match n {
                    0 => record("host", run_host(*workload, &code)),
                    1 => record("cloudfunc", run_cloudfunc(&engine, *workload, &code)),
                    n => {
                        let cli = &clis[n - 2];
                        let id = format!("bench-{}-{i}", cli.name);
                        record(cli.name, cli.run(&engine, *workload, &code, &id));
                    }
                }
            }
        }
    }

    println!("Cold start, create -> first result -> teardown; median of {runs} runs, milliseconds, runners in shuffled order.");
    if !quiet.is_zero() {
        println!("(each cold start after {} ms of quiet)", quiet.as_millis());
    }
    if hidden {
        println!("(hybrid cgroup host: cgroup2 hidden in this process's mount namespace for every runtime alike)");
    }
    println!(
        "(runc's and crun's state under {}; cloudfunc's on its engine's tmpfs)",
        cloudfunc_benches::runtime_state_parent().display()
    );
    let mut header = vec!["workload", "bare host", "cloudfunc"];
    header.extend(clis.iter().map(|c| c.name));
    let ratios: Vec<String> = clis
        .iter()
        .map(|c| format!("cloudfunc / {}", c.name))
        .collect();
    header.extend(ratios.iter().map(String::as_str));
    println!("| {} |", header.join(" | "));
    println!(
        "|{}|",
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for (w, workload) in workloads.iter().enumerate() {
        let mut med = |runner: &'static str| {
            samples
                .get_mut(&(w, runner))
                .filter(|s| !s.is_empty())
                .map(|s| median(s))
        };
        let ours = med("cloudfunc");
        let mut row = vec![workload.name().to_string(), fmt(med("host")), fmt(ours)];
        let theirs: Vec<Option<Duration>> = clis.iter().map(|c| med(c.name)).collect();
        row.extend(theirs.iter().map(|d| fmt(*d)));
        for t in &theirs {
            row.push(match (ours, t) {
                (Some(o), Some(t)) => format!("{:.2}x", o.as_secs_f64() / t.as_secs_f64()),
                _ => "n/a".into(),
            });
        }
        println!("| {} |", row.join(" | "));
    }
    for ((w, runner), why) in &failures {
        println!("note: {runner} failed on {}: {why}", workloads[*w].name());
    }
    Ok(())
}

/// Many idle warm Python sandboxes at once, and what each costs the host.
fn report_density(n: usize) -> Result<()> {
    // Each sandbox holds a few descriptors in this process (its control socket and pipes).
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-bench-")
        .tempdir()?;
    let engine = bench_engine(dir.path())?;
    let code = Code::new(&engine)?;
    let d = cloudfunc_benches::density(&engine, &code, n)?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!("Density: Python hello sandboxes started one after another, each served a call, then all held idle at once.");
    println!("| wanted | started | answered a 2nd call | start all (s) | per sandbox: cgroup + shim MiB | per sandbox: host MemAvailable MiB |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
        d.wanted,
        d.started,
        d.answered,
        d.start_all.as_secs_f64(),
        mib(d.charged_per_sandbox),
        mib(d.host_per_sandbox)
    );
    if let Some(why) = d.stopped_by {
        println!("note: starting stopped early: {why}");
    }
    Ok(())
}

/// cloudfunc's backends side by side, each through the same engine and shim.
fn compare_backends(runs: usize) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-bench-")
        .tempdir()?;
    let kinds: Vec<BackendKind> = BackendKind::ALL
        .into_iter()
        .filter(|k| k.available())
        .collect();
    let engines = kinds
        .iter()
        .map(|k| bench_engine_with(&dir.path().join(k.name()), *k))
        .collect::<Result<Vec<_>>>()?;
    let code = Code::new(&engines[0])?;
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| w.available())
        .collect();
    let mut cold: BTreeMap<(usize, usize), Vec<Duration>> = BTreeMap::new();
    for i in 0..runs {
        for (w, workload) in workloads.iter().enumerate() {
            for k in 0..engines.len() {
                let k = (i + k) % engines.len();
                let d = run_cloudfunc(&engines[k], *workload, &code)
                    .with_context(|| format!("{} {}", kinds[k].name(), workload.name()))?;
                cold.entry((w, k)).or_default().push(d);
            }
        }
    }
    println!("cloudfunc's backends, each through the shim; cold start = create -> first result -> teardown, median of {runs}; warm = median and p99 of 200 calls in one Python sandbox; throughput = warm calls/s, one thread per sandbox, {THROUGHPUT_SANDBOXES} sandboxes for {THROUGHPUT_SECS} s; idle memory = cgroup charge + shim RSS per idle Python sandbox (10 up at once).");
    let mut header = vec!["backend".to_string()];
    header.extend(workloads.iter().map(|w| format!("cold {} ms", w.name())));
    header.extend(
        [
            "warm p50 ms",
            "warm p99 ms",
            "warm vs libcontainer",
            "calls/s",
            "idle MiB",
            "isolation",
        ]
        .map(String::from),
    );
    println!("| {} |", header.join(" | "));
    println!(
        "|{}|",
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    // Ratios are against the first row, libcontainer.
    let mut baseline = None;
    for (k, kind) in kinds.iter().enumerate() {
        let mut row = vec![kind.name().to_string()];
        for w in 0..workloads.len() {
            row.push(fmt(cold.get_mut(&(w, k)).map(|s| median(s))));
        }
        let warm = warm_calls(&engines[k], &code, 200)?;
        let p50 = warm[warm.len() / 2].as_secs_f64() * 1000.0;
        let base = *baseline.get_or_insert(p50);
        row.push(format!("{p50:.3}"));
        row.push(format!(
            "{:.3}",
            warm[warm.len() * 99 / 100].as_secs_f64() * 1000.0
        ));
        row.push(format!("{:.2}x", p50 / base));
        let rate = warm_throughput(
            &engines[k],
            &code,
            THROUGHPUT_SANDBOXES,
            Duration::from_secs(THROUGHPUT_SECS),
        )?;
        row.push(format!("{rate:.0}"));
        row.push(format!(
            "{:.1}",
            idle_memory(&engines[k], &code, 10)? as f64 / 1048576.0
        ));
        row.push(isolation_of(*kind).into());
        println!("| {} |", row.join(" | "));
    }
    Ok(())
}

/// Sandboxes (one calling thread each) in the throughput column: one per core here.
const THROUGHPUT_SANDBOXES: usize = 2;
/// How long the throughput column runs, per backend.
const THROUGHPUT_SECS: u64 = 3;

/// What stands between a function and the host, per backend.
fn isolation_of(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Runsc => {
            "gVisor: its own kernel (Sentry) in user space; the host sees only the Sentry's filtered calls"
        }
        _ => "namespaces, cgroups, seccomp, no capabilities; the host's kernel",
    }
}

fn fmt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "failed".into())
}

#[cfg(test)]
mod tests {
    use super::shuffled;

    #[test]
    fn every_runner_follows_every_other_over_a_run() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let order = shuffled(4, seed);
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3], "a permutation: {order:?}");
            seen.extend(order.windows(2).map(|w| (w[0], w[1])));
        }
        assert_eq!(seen.len(), 12, "each ordered pair of neighbours: {seen:?}");
    }
}
