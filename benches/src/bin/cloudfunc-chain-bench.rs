//! `cloudfunc-chain-bench`: what a chain costs against the same functions called one by one,
//! on a real server with warm sandboxes, side by side in one run.
//!
//! 1. A 5-step chain of Python hello-style functions, invoked sync over HTTP by one client,
//!    against the same five functions called one after another over HTTP (each output the
//!    next input) and against one warm call: latency percentiles and the cost per step.
//! 2. A `map` over `--map-elements` elements at `--map-concurrency` in one chain run,
//!    against the same number of sync calls from as many HTTP clients.
//!
//! Usage (as root): `cloudfunc-chain-bench [--calls N] [--map-elements N] [--map-concurrency N]`.
//! The calls of section 1 are interleaved (chain, the five one by one, one call, repeat) so
//! that the machine's drift touches all three alike.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloudfunc_benches::server::spawn;
use cloudfunc_server::metrics::percentile;
use serde_json::{json, Value};

const HELLO: &str = "def handler(event):\n    name = event.get('name', 'World')\n    return {'name': name, 'greeting': 'Hello ' + name + '!', 'hops': event.get('hops', 0) + 1}\n";

/// Chaining against calls one by one, on a real server.
#[derive(clap::Parser, Debug)]
#[command(name = "cloudfunc-chain-bench")]
struct Args {
    /// Timed rounds of section 1 (each: one chain run, five single calls, one call).
    #[arg(long, default_value_t = 300)]
    calls: usize,
    /// Elements of the map.
    #[arg(long, default_value_t = 1000)]
    map_elements: usize,
    /// The map's concurrency, and the HTTP clients it is compared with.
    #[arg(long, default_value_t = 8)]
    map_concurrency: usize,
    /// Map runs (and HTTP rounds) to time; the median is reported.
    #[arg(long, default_value_t = 3)]
    map_rounds: usize,
}

struct Api {
    agent: ureq::Agent,
    url: String,
    token: String,
}

impl Api {
    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Value> {
        let mut r = self
            .agent
            .post(&format!("{}{path}", self.url))
            .header("authorization", &format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .send(body)?;
        let text = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()?;
        if !r.status().is_success() {
            bail!("{path}: {} {text}", r.status());
        }
        Ok(serde_json::from_str(&text)?)
    }

    fn json(&self, path: &str, body: &Value) -> Result<Value> {
        self.post(path, "application/json", &serde_json::to_vec(body)?)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cells(sorted: &[f64]) -> String {
    format!(
        "{:.2} | {:.2} | {:.2}",
        percentile(sorted, 50.0),
        percentile(sorted, 90.0),
        percentile(sorted, 99.0)
    )
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let concurrency = args.map_concurrency.to_string();
    let (_server, url, token) = spawn("cloudfunc-chain-bench", &["--concurrency", &concurrency])?;
    let api = Api {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent(),
        url: url.clone(),
        token,
    };
    let code = tempfile::tempdir()?;
    std::fs::write(code.path().join("main.py"), HELLO)?;
    let zip = cloudfunc_server::archive::zip_dir(code.path())?;
    let names: Vec<String> = (1..=5).map(|i| format!("hello_{i}")).collect();
    for name in &names {
        api.post(
            &format!("/api/functions/deploy?name={name}&max_instances={concurrency}"),
            "application/zip",
            &zip,
        )?;
    }
    api.json("/api/chains", &json!({"name": "five", "steps": names}))?;
    api.json(
        "/api/chains",
        &json!({"name": "fanout", "steps": [{"map": "hello_1", "concurrency": args.map_concurrency}]}),
    )?;
    let input = json!({"name": "Load"});

    let chain = || -> Result<(f64, f64)> {
        let started = Instant::now();
        let run = api.json("/api/chains/five/invoke", &input)?;
        let took = ms(started.elapsed());
        if run["status"] != "succeeded" || run["output"]["hops"] != 5 {
            bail!("the chain did not run as it should: {run}");
        }
        let inside: f64 = run["steps"]
            .as_array()
            .context("no steps")?
            .iter()
            .filter_map(|s| s["usage"]["duration_ms"].as_f64())
            .sum();
        Ok((took, inside))
    };
    let one_by_one = || -> Result<f64> {
        let started = Instant::now();
        let mut value = input.clone();
        for name in &names {
            let task = api.json(&format!("/api/functions/{name}/invoke"), &value)?;
            value = task["result"].clone();
        }
        if value["hops"] != 5 {
            bail!("the calls one by one did not chain: {value}");
        }
        Ok(ms(started.elapsed()))
    };
    let single = || -> Result<f64> {
        let started = Instant::now();
        let task = api.json("/api/functions/hello_1/invoke", &input)?;
        if task["status"] != "succeeded" {
            bail!("{task}");
        }
        Ok(ms(started.elapsed()))
    };
    for _ in 0..30 {
        chain()?;
        one_by_one()?;
        single()?;
    }
    let (mut chained, mut inside, mut separate, mut singles) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.calls {
        let (took, sandbox) = chain()?;
        chained.push(took);
        inside.push(sandbox);
        separate.push(one_by_one()?);
        singles.push(single()?);
    }
    for v in [&mut chained, &mut inside, &mut separate, &mut singles] {
        v.sort_by(f64::total_cmp);
    }
    let p50 = |v: &[f64]| percentile(v, 50.0);
    println!(
        "Chains on {url}, {} rounds, one client, warm sandboxes.",
        args.calls
    );
    println!();
    println!("| scenario | p50 ms | p90 ms | p99 ms | per step, p50 ms |");
    println!("|---|---|---|---|---|");
    println!(
        "| 5-step chain, sync over HTTP | {} | {:.3} |",
        cells(&chained),
        p50(&chained) / 5.0
    );
    println!(
        "| the same 5 functions called one by one over HTTP | {} | {:.3} |",
        cells(&separate),
        p50(&separate) / 5.0
    );
    println!("| one warm call over HTTP | {} | - |", cells(&singles));
    println!(
        "| (inside the sandboxes: the 5 steps' own durations) | {} | {:.3} |",
        cells(&inside),
        p50(&inside) / 5.0
    );
    println!();
    println!(
        "Per step, a chain costs {:.3} ms beyond its function's own run (p50s: (chain - inside) / 5); called one by one over HTTP, each costs {:.3} ms more (p50s: (one by one - inside) / 5).",
        (p50(&chained) - p50(&inside)) / 5.0,
        (p50(&separate) - p50(&inside)) / 5.0
    );

    // Section 2: a map against the same calls from as many HTTP clients.
    let n = args.map_elements;
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"name": format!("item{i}")}))
        .collect();
    let items = Value::Array(items);
    let map_run = || -> Result<f64> {
        let started = Instant::now();
        let run = api.json("/api/chains/fanout/invoke", &items)?;
        let took = started.elapsed().as_secs_f64();
        let out = run["output"].as_array().context("the map gave no list")?;
        if run["status"] != "succeeded"
            || out.len() != n
            || out[n - 1]["name"] != format!("item{}", n - 1)
        {
            bail!("the map did not run as it should: {}", run["status"]);
        }
        Ok(took)
    };
    let http_round = || -> Result<f64> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let started = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..args.map_concurrency)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                return Ok(());
                            }
                            let task = api.json("/api/functions/hello_1/invoke", &items[i])?;
                            if task["status"] != "succeeded" {
                                bail!("{task}");
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a client panicked"))??;
            }
            Ok(())
        })?;
        Ok(started.elapsed().as_secs_f64())
    };
    map_run()?;
    let (mut maps, mut rounds) = (Vec::new(), Vec::new());
    for _ in 0..args.map_rounds {
        maps.push(map_run()?);
        rounds.push(http_round()?);
    }
    maps.sort_by(f64::total_cmp);
    rounds.sort_by(f64::total_cmp);
    let (map_s, http_s) = (maps[maps.len() / 2], rounds[rounds.len() / 2]);
    println!();
    println!(
        "| scenario ({n} elements, median of {} rounds) | seconds | calls/s |",
        args.map_rounds
    );
    println!("|---|---|---|");
    println!(
        "| one chain run: map, concurrency {} | {map_s:.3} | {:.0} |",
        args.map_concurrency,
        n as f64 / map_s
    );
    println!(
        "| {n} sync calls from {} HTTP clients | {http_s:.3} | {:.0} |",
        args.map_concurrency,
        n as f64 / http_s
    );
    Ok(())
}
