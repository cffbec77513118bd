//! `cloudfunc-load`: HTTP load on a real server: synchronous invokes of a Python hello and
//! asynchronous submissions, from many client threads, bounded in time and count. Prints
//! requests per second and latency percentiles.
//!
//! Usage (as root): `cloudfunc-load [--clients N] [--seconds S] [--first-calls N]
//! [--only sync|async] [--url URL --token T]`.
//! Without `--url` it starts `cloudfunc serve` from next to itself on a free loopback port, in
//! a temporary directory, and stops it afterwards.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloudfunc_sandbox::cgroup::{CgroupFs, DEFAULT_CGROUP_ROOT};
use cloudfunc_server::metrics::percentile;

struct Spawned {
    child: Child,
    /// Removed when dropped, after the server is gone.
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    /// Stops the server as an operator would (SIGTERM: it settles its records, stops its
    /// sandboxes and removes its cgroups); only one that hangs is killed, and then what it
    /// leaves behind is removed here.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("cloudfunc-load: the server did not stop within 30 s; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
            // The shims tear their containers down when the server goes; the parents stay.
            std::thread::sleep(Duration::from_millis(500));
            let parent = format!("/cloudfunc-load-{}", std::process::id());
            if let Ok(cgroups) = CgroupFs::detect(Path::new(DEFAULT_CGROUP_ROOT)) {
                for name in [parent.clone(), format!("{parent}-gvisor")] {
                    for dir in cgroups.dirs(&name) {
                        let _ = std::fs::remove_dir(dir);
                    }
                }
            }
        }
    }
}

fn spawn_server() -> Result<(Spawned, String, String)> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("no directory")?.join("cloudfunc");
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-load-")
        .tempdir()?;
    let mut child = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--concurrency",
            "4",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .args([
            "--cgroup-parent",
            &format!("cloudfunc-load-{}", std::process::id()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("cloudfunc listening on ")
        .context("the server did not start")?
        .to_string();
    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--tenant", "load", "token"])
        .output()?;
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    Ok((Spawned { child, _dir: dir }, url, token))
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

fn main() -> Result<()> {
    let (mut clients, mut seconds, mut url, mut token) = (8usize, 10u64, None, None);
    let mut first_calls = 15usize;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--clients" => clients = args.next().context("--clients N")?.parse()?,
            "--seconds" => seconds = args.next().context("--seconds S")?.parse()?,
            "--url" => url = args.next(),
            "--token" => token = args.next(),
            "--first-calls" => first_calls = args.next().context("--first-calls N")?.parse()?,
            "--only" => match args.next().as_deref() {
                Some(kind @ ("sync" | "async")) => only = Some(kind.to_string()),
                _ => bail!("--only takes sync or async"),
            },
            other => bail!("unknown argument {other}; usage: cloudfunc-load [--clients N] [--seconds S] [--first-calls N] [--only sync|async] [--url URL --token T]"),
        }
    }
    let mut spawned = None;
    let (url, token) = match (url, token) {
        (Some(u), Some(t)) => (u, t),
        (None, None) => {
            let (s, u, t) = spawn_server()?;
            spawned = Some(s);
            (u, t)
        }
        _ => bail!("--url and --token go together"),
    };
    let zip = cloudfunc_server::archive::zip_dir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/hello_fn")
            .as_path(),
    )?;
    let agent = ureq::Agent::config_builder()
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
    // A bound on memory (latencies are kept), far above what one host can serve.
    let bound = 50_000 * seconds;
    println!("Load on {url}: {clients} clients, {seconds} s per scenario (each bounded to {bound} requests).");
    println!("| scenario | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|");
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
                "| {scenario}, one at a time | {} | 0 | - | {} |",
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
        let r = run(&format!("{url}{path}"), &token, clients, seconds, bound);
        println!(
            "| {name} | {} | {} | {:.0} | {} |",
            r.ok + r.errors,
            r.errors,
            r.ok as f64 / r.elapsed.as_secs_f64(),
            latency_cells(&r.latencies)
        );
    }
    drop(spawned);
    Ok(())
}
