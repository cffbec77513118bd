//! `cloudfunc-load`: HTTP load on a real server: synchronous invokes of a Python hello and
//! asynchronous submissions, from many client threads, bounded in time and count. Prints
//! requests per second and latency percentiles.
//!
//! Usage (as root): `cloudfunc-load [--clients N] [--seconds S] [--first-calls N]
//! [--only sync|async] [--wrk] [--floor] [--queue-workers N] [--url URL --token T]`.
//! After the async submits it times how fast the queue workers (`--queue-workers`, by default
//! the server's default `--workers`) run the backlog they left.
//! `--wrk` also runs the sync load through `wrk` (when it is installed), against the same
//! server in the same run: a client that costs the shared cores less than these threads.
//! `--floor` sends the same sync requests to `cloudfunc-floor`'s two floors (warp answering
//! with a fixed body; warp passing each body to a warm sandbox, as many as the server ended
//! with, and nothing of the platform) and prints the server's CPU per warm call as a multiple
//! of each.
//! Without `--url` it starts `cloudfunc serve` from next to itself on a free loopback port, in
//! a temporary directory, and stops it afterwards.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloudfunc_benches::server::{spawn, Spawned};
use cloudfunc_sandbox::cgroup::{CgroupFs, DEFAULT_CGROUP_ROOT};
use cloudfunc_server::metrics::percentile;

/// How HTTPS servers are verified (`--ca-cert`), set once at start.
static TLS: std::sync::OnceLock<ureq::tls::TlsConfig> = std::sync::OnceLock::new();

fn tls() -> ureq::tls::TlsConfig {
    TLS.get().cloned().unwrap_or_default()
}

struct Outcome {
    ok: u64,
    errors: u64,
    /// Milliseconds, sorted.
    latencies: Vec<f64>,
    elapsed: Duration,
}

fn run(url: &str, token: &str, clients: usize, seconds: u64, max_requests: u64) -> Outcome {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let counts = Arc::new(Mutex::new((0u64, 0u64)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let per_client = max_requests / clients as u64 + 1;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, token, latencies, counts) = (
                url.to_string(),
                token.to_string(),
                latencies.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || {
                // Timeouts per phase, not global: with a global one, ureq resolves the
                // address on a new thread for every request, which the timings would count.
                let agent = ureq::Agent::config_builder()
                    .tls_config(tls())
                    .http_status_as_error(false)
                    .timeout_connect(Some(Duration::from_secs(5)))
                    .timeout_recv_response(Some(Duration::from_secs(60)))
                    .build()
                    .new_agent();
                let mut mine = Vec::new();
                let (mut ok, mut err) = (0, 0);
                for _ in 0..per_client {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    let r = agent
                        .post(&url)
                        .header("authorization", &format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .send(r#"{"name":"Load"}"#.as_bytes());
                    let good = matches!(&r, Ok(resp) if resp.status().is_success());
                    if let Ok(mut resp) = r {
                        let _ = resp.body_mut().read_to_string();
                    }
                    mine.push(t.elapsed());
                    if good {
                        ok += 1;
                    } else {
                        err += 1;
                    }
                }
                latencies.lock().unwrap().extend(mine);
                let mut c = counts.lock().unwrap();
                c.0 += ok;
                c.1 += err;
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed();
    let latencies = Arc::try_unwrap(latencies)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default();
    let mut latencies: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    let (ok, errors) = *counts.lock().unwrap();
    Outcome {
        ok,
        errors,
        latencies,
        elapsed,
    }
}

/// The same sync load from `wrk` (a C client, lighter than the threads above), as the
/// requests, errors, req/s and latency cells of a row; `None` when wrk is not installed.
/// Each request must have run the function: the function's own metrics, read before and
/// after, must count at least as many new calls as wrk got answers, and no new errors.
fn wrk_row(
    agent: &ureq::Agent,
    url: &str,
    token: &str,
    path: &str,
    clients: usize,
    seconds: u64,
) -> Result<Option<String>> {
    if Command::new("wrk").arg("--version").output().is_err() {
        return Ok(None);
    }
    let calls = || function_calls(agent, url, token);
    let script = tempfile::Builder::new().suffix(".lua").tempfile()?;
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{{\"name\":\"Load\"}}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        ),
    )?;
    let before = calls()?;
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{clients}"), &format!("-d{seconds}s")])
        .args(["--latency", "-s"])
        .arg(script.path())
        .arg(format!("{url}{path}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let report = parse_wrk(&text).with_context(|| format!("reading wrk's report: {text}"))?;
    let after = calls()?;
    if after.0 - before.0 < report.requests || after.1 != before.1 {
        bail!(
            "wrk got {} answers, but the function counted {} new calls and {} new errors",
            report.requests,
            after.0 - before.0,
            after.1 - before.1
        );
    }
    Ok(Some(format!(
        "{} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2}",
        report.requests,
        report.errors,
        report.per_second,
        report.p50,
        report.p90,
        report.p99,
        report.max
    )))
}

/// The load function's calls and errors so far, from its own metrics.
fn function_calls(agent: &ureq::Agent, url: &str, token: &str) -> Result<(u64, u64)> {
    let body = get_json(
        agent,
        &format!("{url}/api/functions/hello_load/metrics"),
        token,
    )?;
    let count = |k: &str| {
        body[k]
            .as_u64()
            .with_context(|| format!("no {k} in {body}"))
    };
    Ok((count("invocations")?, count("errors")?))
}

fn get_json(agent: &ureq::Agent, url: &str, token: &str) -> Result<serde_json::Value> {
    Ok(agent
        .get(url)
        .header("authorization", &format!("Bearer {token}"))
        .call()?
        .body_mut()
        .read_json()?)
}

/// How fast the queue workers run the backlog the async submits left, with no submits
/// coming in: the function's own count of new calls over `window`, as the cells of a row
/// (the rate is a lower bound, marked `>=`, if the queue ran dry meanwhile).
fn backlog_row(agent: &ureq::Agent, url: &str, token: &str, window: Duration) -> Result<String> {
    let depth = || -> Result<u64> {
        get_json(agent, &format!("{url}/api/system/health"), token)?["queue_depth"]
            .as_u64()
            .context("no queue_depth in the health report")
    };
    let (before, queued) = (function_calls(agent, url, token)?, depth()?);
    let started = Instant::now();
    std::thread::sleep(window);
    let after = function_calls(agent, url, token)?;
    let elapsed = started.elapsed().as_secs_f64();
    let dry = if depth()? == 0 { ">=" } else { "" };
    Ok(format!(
        "queued tasks run, submits stopped ({queued} queued) | {} | {} | {dry}{:.0} | - | - | - | - | -",
        after.0 - before.0,
        after.1 - before.1,
        (after.0 - before.0) as f64 / elapsed
    ))
}

/// What one `wrk --latency` run printed.
#[derive(Debug, PartialEq)]
struct WrkReport {
    requests: u64,
    /// Non-2xx answers and socket errors.
    errors: u64,
    per_second: f64,
    /// Latencies in ms.
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn parse_wrk(text: &str) -> Result<WrkReport> {
    let after = |label: &str| -> Result<&str> {
        let at = text.find(label).with_context(|| format!("no {label:?}"))?;
        Ok(text[at + label.len()..].trim_start())
    };
    let first_word = |label: &str| -> Result<&str> {
        after(label)?
            .split_whitespace()
            .next()
            .with_context(|| format!("nothing after {label:?}"))
    };
    let numbers = |rest: &str| -> u64 {
        rest.lines()
            .next()
            .unwrap_or("")
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .context("no request count")?
        .parse()?;
    let errors = after("Non-2xx or 3xx responses:").map(numbers).unwrap_or(0)
        + after("Socket errors:").map(numbers).unwrap_or(0);
    // "Latency   avg   stdev   max   +/- stdev", the first line that starts so.
    let max = after("Latency")?
        .split_whitespace()
        .nth(2)
        .context("no latency maximum")?;
    Ok(WrkReport {
        requests,
        errors,
        per_second: first_word("Requests/sec:")?.parse()?,
        p50: wrk_ms(first_word(" 50%")?)?,
        p90: wrk_ms(first_word(" 90%")?)?,
        p99: wrk_ms(first_word(" 99%")?)?,
        max: wrk_ms(max)?,
    })
}

/// A wrk duration ("850.00us", "1.23ms", "1.20s", "2.00m") in ms.
fn wrk_ms(cell: &str) -> Result<f64> {
    let split = cell
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {cell:?}"))?;
    let (n, unit) = cell.split_at(split);
    let n: f64 = n.parse()?;
    Ok(n * match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => bail!("unknown unit {other:?} in {cell:?}"),
    })
}

/// Sync load from `clients` threads for `seconds`, and a row every 10 s of what the server
/// holds: what a leak of memory, descriptors, WAL, sandboxes or cgroups would show.
fn run_soak(
    agent: &ureq::Agent,
    server: &Spawned,
    url: &str,
    token: &str,
    clients: usize,
    seconds: u64,
) -> Result<()> {
    let pid = server.child.id();
    let wal = server.dir.path().join("data/cloudfunc.db-wal");
    let cgroups = CgroupFs::detect(Path::new(DEFAULT_CGROUP_ROOT))?;
    let parent = format!("/{}", server.parent);
    let sandbox_cgroups = || -> usize {
        cgroups
            .dirs(&parent)
            .first()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .count()
            })
            .unwrap_or(0)
    };
    let load = {
        let (url, token) = (
            format!("{url}/api/functions/hello_load/invoke"),
            token.to_string(),
        );
        std::thread::spawn(move || run(&url, &token, clients, seconds, u64::MAX))
    };
    println!("Soak on {url}: {clients} clients, {seconds} s of sync calls.");
    println!("| s | calls | calls/s | errors | RSS MiB | fds | WAL MiB | DB MiB | sandboxes | sandbox cgroups | records kept |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    let mut last = (0u64, 0.0f64);
    while !load.is_finished() {
        std::thread::sleep(Duration::from_secs(10).min(Duration::from_secs(seconds.max(1))));
        let h = get_json(agent, &format!("{url}/api/system/health"), token)?;
        let (calls, errors) = function_calls(agent, url, token)?;
        let now = started.elapsed().as_secs_f64();
        let rate = (calls - last.0) as f64 / (now - last.1).max(0.001);
        last = (calls, now);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss =
            cloudfunc_server::metrics::proc_field(&status, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let mib = |b: u64| b as f64 / 1048576.0;
        let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        println!(
            "| {now:.0} | {calls} | {rate:.0} | {errors} | {rss:.1} | {fds} | {:.1} | {:.1} | {} | {} | {} |",
            mib(wal_bytes),
            mib(h["storage"]["database_bytes"].as_u64().unwrap_or(0)),
            h["pool"]["sandboxes"],
            sandbox_cgroups(),
            h["storage"]["records_kept"],
        );
    }
    let r = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load threads panicked"))?;
    println!(
        "\n{} calls, {} errors, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        r.ok + r.errors,
        r.errors,
        r.ok as f64 / r.elapsed.as_secs_f64(),
        percentile(&r.latencies, 50.0),
        percentile(&r.latencies, 99.0)
    );
    Ok(())
}

/// `cloudfunc-floor`, started from next to this program, stopped when dropped (SIGTERM: the
/// exchange floor then stops its sandboxes).
struct Floor(std::process::Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The sync load against a floor (`cloudfunc-floor`; the HTTP floor where `sandboxes` is 0,
/// the exchange floor through that many warm sandboxes otherwise): the cells of its row
/// (requests to CPU per request) and its CPU per request in µs.
fn floor_row(
    clients: usize,
    seconds: u64,
    bound: u64,
    sandboxes: usize,
) -> Result<(String, Option<f64>)> {
    use std::io::BufRead;
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .join("cloudfunc-floor");
    let mut floor = Floor(
        Command::new(&bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--sandboxes",
                &sandboxes.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?,
    );
    let mut line = String::new();
    std::io::BufReader::new(floor.0.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("floor listening on ")
        .context("the floor did not start")?
        .to_string();
    let pid = floor.0.id();
    let before = cpu_seconds(pid);
    let r = run(
        &format!("{url}/api/functions/hello_load/invoke"),
        "floor",
        clients,
        seconds,
        bound,
    );
    let cpu = cpu_per_request(before, cpu_seconds(pid), &r);
    let row = outcome_cells(&r, cpu);
    Ok((row, cpu))
}

/// A process's CPU µs per answered request, from its CPU seconds before and after a load.
fn cpu_per_request(before: Option<f64>, after: Option<f64>, r: &Outcome) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if r.ok > 0 => Some((b - a) * 1e6 / r.ok as f64),
        _ => None,
    }
}

/// A load's cells from requests to CPU µs per request.
fn outcome_cells(r: &Outcome, cpu: Option<f64>) -> String {
    format!(
        "{} | {} | {:.0} | {} | {}",
        r.ok + r.errors,
        r.errors,
        r.ok as f64 / r.elapsed.as_secs_f64(),
        latency_cells(&r.latencies),
        cpu.map_or("-".into(), |c| format!("{c:.0}"))
    )
}

/// The CPU time (user and system, all its threads) process `pid` has used so far, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces, in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / per_second as f64)
}

/// The p50, p90, p99 and max cells of a table row, from latencies in ms, sorted.
fn latency_cells(sorted: &[f64]) -> String {
    format!(
        "{:.2} | {:.2} | {:.2} | {:.2}",
        percentile(sorted, 50.0),
        percentile(sorted, 90.0),
        percentile(sorted, 99.0),
        sorted.last().copied().unwrap_or(0.0)
    )
}

/// HTTP load on a real `cloudfunc serve`: sync invokes and async submissions.
#[derive(clap::Parser, Debug)]
#[command(
    name = "cloudfunc-load",
    about = "HTTP load on a real cloudfunc serve: sync invokes, async submissions and the queue backlog"
)]
struct Args {
    /// Client threads.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of each load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// First calls of freshly deployed functions to time.
    #[arg(long, default_value_t = 15)]
    first_calls: usize,
    /// Only the sync or only the async load.
    #[arg(long, value_parser = ["sync", "async"])]
    only: Option<String>,
    /// Also run the sync load through wrk, against the same server in the same run.
    #[arg(long)]
    wrk: bool,
    /// Also send the same sync requests, from the same clients, to the HTTP floor
    /// (`cloudfunc-floor`: warp answering with a fixed body) and to the exchange floor (warp
    /// passing each body to a warm sandbox, nothing of the platform), and print the server's
    /// CPU per warm call as a multiple of each.
    #[arg(long)]
    floor: bool,
    /// The spawned server's queue workers.
    #[arg(long, default_value_t = cloudfunc_server::config::defaults::WORKERS)]
    queue_workers: usize,
    /// A running server instead of a spawned one (with --token).
    #[arg(long, requires = "token")]
    url: Option<String>,
    /// A token for --url.
    #[arg(long, requires = "url")]
    token: Option<String>,
    /// Trust this CA certificate (PEM) for an https:// --url.
    #[arg(long, requires = "url")]
    ca_cert: Option<std::path::PathBuf>,
    /// Instead of the scenarios: sync load for this many seconds, reporting every 10 s the
    /// server's memory, descriptors, WAL, sandboxes and cgroups (a spawned server only).
    #[arg(long, conflicts_with_all = ["url", "only"])]
    soak: Option<u64>,
}

fn main() -> Result<()> {
    let Args {
        clients,
        seconds,
        first_calls,
        only,
        wrk: with_wrk,
        floor: with_floor,
        queue_workers,
        url,
        token,
        ca_cert,
        soak,
    } = <Args as clap::Parser>::parse();
    let _ = TLS.set(cloudfunc_server::cli::client::tls_config(
        ca_cert.as_deref(),
    )?);
    let mut spawned = None;
    let (url, token) = match (url, token) {
        (Some(u), Some(t)) => (u, t),
        (None, None) => {
            let workers = queue_workers.to_string();
            let (s, u, t) = spawn(
                "cloudfunc-load",
                &["--workers", &workers, "--concurrency", "4"],
            )?;
            spawned = Some(s);
            (u, t)
        }
        _ => unreachable!("clap requires --url and --token together"),
    };
    let zip = cloudfunc_server::archive::zip_dir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/hello_fn")
            .as_path(),
    )?;
    let agent = ureq::Agent::config_builder()
        .tls_config(tls())
        .http_status_as_error(false)
        .build()
        .new_agent();
    let deploy = |name: &str| -> Result<()> {
        let mut r = agent
            .post(&format!("{url}/api/functions/deploy?name={name}"))
            .header("authorization", &format!("Bearer {token}"))
            .header("content-type", "application/zip")
            .send(&zip[..])?;
        if !r.status().is_success() {
            bail!(
                "deploy failed: {}",
                r.body_mut().read_to_string().unwrap_or_default()
            );
        }
        Ok(())
    };
    deploy("hello_load")?;
    if let (Some(seconds), Some(server)) = (soak, spawned.as_ref()) {
        return run_soak(&agent, server, &url, &token, clients, seconds);
    }
    // A bound on memory (latencies are kept), far above what one host can serve.
    let bound = 50_000 * seconds;
    println!("Load on {url}: {clients} clients, {seconds} s per scenario (each bounded to {bound} requests).");
    println!("| scenario | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let server_pid = spawned.as_ref().map(|s| s.child.id());
    if first_calls > 0 {
        // First calls, one at a time, before the load below (whose queued async tasks would
        // still be running). Before each, a pause long enough for the pool to have a stem cell
        // ready again (it refills within half a second).
        let pause = || std::thread::sleep(Duration::from_secs(1));
        let first_call = |key: &str, start: &str| -> Result<f64> {
            let started = Instant::now();
            let mut r = agent
                .post(&format!("{url}/api/functions/{key}/invoke"))
                .header("authorization", &format!("Bearer {token}"))
                .header("content-type", "application/json")
                .send("{}")?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let body = r.body_mut().read_to_string()?;
            if !body.contains(&format!("\"start\":\"{start}\"")) {
                bail!("{key}'s first call did not start {start}: {body}");
            }
            Ok(ms)
        };
        let mut kept = Vec::new();
        let mut bound = Vec::new();
        for i in 0..first_calls {
            // The deploy proves the code loads in a sandbox and keeps it: the call finds it warm.
            let name = format!("hello_first_{i}");
            deploy(&name)?;
            pause();
            kept.push(first_call(&name, "warm")?);
            // Version 1 after version 2's deploy drained it: the call binds a stem cell.
            let name = format!("hello_stem_{i}");
            deploy(&name)?;
            pause();
            deploy(&name)?;
            pause();
            bound.push(first_call(&format!("{name}@1"), "prewarmed")?);
        }
        for (scenario, mut latencies) in [
            ("first call after deploy (the deploy's sandbox)", kept),
            ("first call binding a stem cell (older version)", bound),
        ] {
            latencies.sort_by(f64::total_cmp);
            println!(
                "| {scenario}, one at a time | {} | 0 | - | {} | - |",
                latencies.len(),
                latency_cells(&latencies)
            );
        }
    }
    for (kind, name, path) in [
        (
            "sync",
            "sync invoke, python hello",
            "/api/functions/hello_load/invoke",
        ),
        (
            "async",
            "async submit (202)",
            "/api/functions/hello_load/run",
        ),
    ] {
        if only.as_deref().is_some_and(|o| o != kind) {
            continue;
        }
        let cpu_before = server_pid.and_then(cpu_seconds);
        let r = run(&format!("{url}{path}"), &token, clients, seconds, bound);
        let server_cpu = cpu_per_request(cpu_before, server_pid.and_then(cpu_seconds), &r);
        println!("| {name} | {} |", outcome_cells(&r, server_cpu));
        if with_floor && kind == "sync" {
            // As many warm sandboxes as the server ended the load with.
            let sandboxes = get_json(&agent, &format!("{url}/api/system/health"), &token)
                .ok()
                .and_then(|h| h["pool"]["sandboxes"].as_u64())
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(clients)
                .max(1);
            let (row, floor_cpu) = floor_row(clients, seconds, bound, 0)?;
            println!("| HTTP floor: warp, a fixed reply (same requests) | {row} |");
            let (row, exchange_cpu) = floor_row(clients, seconds, bound, sandboxes)?;
            println!(
                "| exchange floor: warp and {sandboxes} warm sandboxes, no platform (same requests) | {row} |"
            );
            for (name, floor) in [("HTTP floor", floor_cpu), ("exchange floor", exchange_cpu)] {
                if let (Some(server), Some(floor)) = (server_cpu, floor) {
                    println!(
                        "| server CPU per warm call / the {name}'s | {:.1}x ({server:.0} / {floor:.0} µs) | | | | | | | |",
                        server / floor
                    );
                }
            }
        }
        if kind == "async" {
            let window = Duration::from_secs(seconds.clamp(1, 10));
            println!("| {} |", backlog_row(&agent, &url, &token, window)?);
        }
        if with_wrk && kind == "sync" {
            match wrk_row(&agent, &url, &token, path, clients, seconds)? {
                Some(row) => println!("| {name} (wrk) | {row} | - |"),
                None => println!("| {name} (wrk) | skipped: wrk is not installed | | | | | | | |"),
            }
        }
    }
    drop(spawned);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrk_report_is_read_whole() {
        let text = "Running 20s test @ http://127.0.0.1:18080/api/functions/hello_load/invoke
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.39ms    2.43ms 147.51ms   99.10%
    Req/Sec     6.12k   694.92     7.75k    69.00%
  Latency Distribution
     50%  850.00us
     75%    1.59ms
     90%    2.02ms
     99%    1.20s
  243647 requests in 20.00s, 145.16MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  12179.66
Transfer/sec:      7.26MB
";
        assert_eq!(
            parse_wrk(text).unwrap(),
            WrkReport {
                requests: 243_647,
                errors: 7,
                per_second: 12_179.66,
                p50: 0.85,
                p90: 2.02,
                p99: 1200.0,
                max: 147.51,
            }
        );
        // Without error lines, there were none; without the distribution, it is no report.
        let clean = text.replace(
            "  Socket errors: connect 0, read 2, write 0, timeout 1\n",
            "",
        );
        let clean = clean.replace("  Non-2xx or 3xx responses: 4\n", "");
        assert_eq!(parse_wrk(&clean).unwrap().errors, 0);
        assert!(parse_wrk(&text.replace("     99%    1.20s\n", "")).is_err());
        assert!(wrk_ms("3.0parsecs").is_err());
    }
}
