//! Monitoring end to end on a real server: metrics series from the rollups, the Prometheus
//! exposition read by the Prometheus project's own Python parser, task logs, the invocation
//! log line, and the dashboard driven in headless Chromium through chromedriver.

mod common;

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::browser::{self, artifacts, Browser};
use common::*;
use libtest_mimic::Arguments;
use serde_json::{json, Value};

static SERVER: OnceLock<Server> = OnceLock::new();

fn shared() -> &'static Server {
    SERVER.get_or_init(|| Server::start("monitor"))
}

const PYTHON: &str = "/usr/bin/python3";

/// Prints a line, fails when asked to, returns a greeting.
const LOGGY_PY: &str = "def handler(event):\n    print('handling', event.get('n'))\n    if event.get('fail'):\n        raise ValueError('asked to fail')\n    return {'n': event.get('n')}\n";

fn no_prometheus_parser() -> Option<String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "python3-prometheus-client is not installed".to_string())
}

/// A test: its name, its body, and why it must be skipped here (if it must).
type Check = (&'static str, fn(), Option<String>);

fn main() {
    let args = Arguments::from_args();
    let why = common::sandboxes_missing();
    let tests: Vec<Check> = vec![
        ("metrics_series_come_from_the_rollups", series, why.clone()),
        ("task_logs_and_the_invocation_log_line", logs, why.clone()),
        ("health_reports_host_and_process", health, why.clone()),
        (
            "runtime_threads_as_configured",
            runtime_threads,
            why.clone(),
        ),
        (
            "prometheus_exposition_parses_and_matches_the_store",
            prometheus,
            why.clone().or_else(no_prometheus_parser),
        ),
        (
            "dashboard_in_headless_chromium",
            dashboard,
            why.clone().or_else(browser::missing),
        ),
    ];
    for (name, _, skip) in &tests {
        if let Some(skip) = skip {
            println!("SKIPPED {name}: {skip}");
        }
    }
    let trials = tests
        .into_iter()
        .map(|(name, f, skip)| trial(name, f, skip.is_some()))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(server) = SERVER.get() {
        server.stop();
        server.remove_files();
    }
    common::postgres::stop_shared();
    conclusion.exit();
}

/// Deploys LOGGY_PY as `name` for a fresh tenant and runs it: `ok` successes, `failures`
/// failures. Returns the token and the finished tasks.
fn busy_tenant(
    s: &Server,
    tenant: &str,
    name: &str,
    ok: u32,
    failures: u32,
) -> (String, Vec<Value>) {
    let t = s.token(tenant, false);
    let r = deploy(s, &t, name, &[("function.py", LOGGY_PY)]);
    assert_eq!(r.status, 201, "{r:?}");
    let mut tasks = Vec::new();
    for i in 0..ok + failures {
        let body = json!({"n": i, "fail": i >= ok});
        let r = post_json(s, &format!("/api/functions/{name}/invoke"), &t, &body);
        assert_eq!(r.status, 200, "{r:?}");
        tasks.push(r.body);
    }
    (t, tasks)
}

fn series() {
    let s = shared();
    let (t, tasks) = busy_tenant(s, "series", "counted", 4, 2);
    let m = get(s, "/api/functions/counted/metrics?range=1h&step=1m", &t);
    assert_eq!(m.status, 200, "{m:?}");
    let b = &m.body;
    assert_eq!(b["invocations"], 6);
    assert_eq!(b["errors"], 2);
    assert_eq!(b["errors_by_kind"]["raised"], 2);
    assert_eq!(b["step_ms"], 60_000);
    assert_eq!(b["resolution_ms"], 60_000);
    let col = |name: &str| -> Vec<f64> {
        b["series"][name]
            .as_array()
            .unwrap_or_else(|| panic!("no series {name}: {b}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let t_col = col("t");
    assert!((60..=61).contains(&t_col.len()), "{} points", t_col.len());
    assert!(t_col.windows(2).all(|w| w[1] - w[0] == 60_000.0));
    assert_eq!(col("invocations").iter().sum::<f64>(), 6.0);
    assert_eq!(col("errors").iter().sum::<f64>(), 2.0);
    assert_eq!(
        col("cold").iter().sum::<f64>() + col("warm").iter().sum::<f64>(),
        6.0
    );
    // The slowest call bounds the series' maxima and the summary's.
    let slowest = tasks
        .iter()
        .map(|t| t["usage"]["duration_ms"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(b["duration_ms"]["max"].as_f64().unwrap(), slowest);
    assert_eq!(
        col("duration_max_ms").iter().copied().fold(0.0, f64::max),
        slowest
    );
    let p50 = b["duration_ms"]["p50"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= slowest, "p50 {p50}");

    // Hourly and daily steps read the coarser rollups and count the same calls.
    for (step, resolution) in [("1h", 3_600_000), ("2h", 3_600_000), ("1d", 86_400_000)] {
        let r = get(
            s,
            &format!("/api/functions/counted/metrics?range=7d&step={step}"),
            &t,
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["resolution_ms"], resolution);
        assert_eq!(r.body["invocations"], 6, "step {step}");
    }
    // The system view of this tenant is the same six calls; other tenants see none of them.
    assert_eq!(
        get(s, "/api/system/metrics?range=1h", &t).body["invocations"],
        6
    );
    let other = s.token("series-other", false);
    assert_eq!(
        get(s, "/api/system/metrics?range=1h", &other).body["invocations"],
        0
    );
    assert_eq!(get(s, "/api/functions/counted/metrics", &other).status, 404);

    for (query, needle) in [
        ("step=30s", "whole number of minutes"),
        ("step=0m", "step"),
        ("step=1x", "must end in"),
        ("range=60d&step=1m", "points"),
    ] {
        let r = get(s, &format!("/api/functions/counted/metrics?{query}"), &t);
        assert_eq!(r.status, 400, "{query}: {r:?}");
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{query}: {message}");
    }
}

fn logs() {
    let s = shared();
    let (t, tasks) = busy_tenant(s, "logs", "printer", 1, 1);
    for (task, n) in tasks.iter().zip(0..) {
        let id = task["task_id"].as_str().unwrap();
        let r = get(s, &format!("/api/tasks/{id}/logs"), &t);
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body["logs"]
                .as_str()
                .unwrap()
                .contains(&format!("handling {n}")),
            "{r:?}"
        );
        assert_eq!(r.body["logs_truncated"], false);
        let other = s.token("logs-other", false);
        assert_eq!(get(s, &format!("/api/tasks/{id}/logs"), &other).status, 404);
    }
    // One summary line per invocation in the server's log, Lambda's REPORT in JSON.
    let id = tasks[0]["task_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains(id) && l.contains("\"cloudfunc::invocation\""))
        {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no invocation line for {id}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(line["message"], "invocation");
    assert_eq!(line["function"], "printer");
    let duration = line["duration_ms"].as_f64().unwrap();
    assert_eq!(
        line["billed_duration_ms"].as_f64().unwrap(),
        duration.ceil()
    );
    assert!(line["max_memory_used_mb"].as_f64().unwrap() > 1.0, "{line}");
    assert!(line["memory_size_mb"].as_u64().unwrap() > 0);
    assert!(line["init_duration_ms"].as_f64().is_some());
}

fn health() {
    let s = shared();
    let first = request("GET", &format!("{}/api/system/health", s.url), None, None);
    std::thread::sleep(Duration::from_millis(300));
    let r = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(r.status, 200);
    let busy = r.body["host"]["cpu_busy_percent"].as_f64();
    assert!(
        busy.is_some_and(|b| (0.0..=100.0).contains(&b)),
        "{first:?} then {r:?}"
    );
    assert!(r.body["host"]["memory_available_bytes"].as_u64().unwrap() > 0);
    let rss = r.body["process"]["resident_memory_bytes"].as_u64().unwrap();
    assert!(rss > 1 << 20, "{rss}");
    assert!(r.body["process"]["threads"].as_u64().unwrap() >= 2);
    // By default the async runtime takes half the CPUs, at least one.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        r.body["process"]["runtime_threads"].as_u64(),
        Some(u64::try_from((cpus / 2).max(1)).unwrap())
    );
}

/// `--threads` sets the async runtime's threads.
fn runtime_threads() {
    let s = Server::start_with("threads", &["--threads", "3"]);
    let r = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["process"]["runtime_threads"], 3);
    s.stop();
    s.remove_files();
}

/// The exposition as `[(name, labels, value)]`, parsed by prometheus_client.
fn parse_exposition(text: &str) -> Vec<(String, Value, f64)> {
    let script = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families\nout = []\nfor fam in text_string_to_metric_families(sys.stdin.read()):\n    for s in fam.samples:\n        out.append([s.name, s.labels, s.value])\nprint(json.dumps(out))\n";
    let mut child = Command::new(PYTHON)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    samples
}

fn sample(samples: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| *v)
}

fn prometheus() {
    let s = shared();
    let (t, tasks) = busy_tenant(s, "prom", "scraped", 3, 2);
    let r = get(s, "/metrics", &t);
    assert_eq!(r.status, 200);
    let ct = r
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.body.as_str().unwrap().to_string();
    let samples = parse_exposition(&text);
    let f = [("tenant", "prom"), ("function", "scraped")];
    let with = |outcome: &'static str| {
        let mut l = f.to_vec();
        l.push(("outcome", outcome));
        l
    };

    // The counters and histograms equal what the store says about the same calls.
    let m = get(s, "/api/functions/scraped/metrics?since=0", &t).body;
    let count = |o| sample(&samples, "cloudfunc_invocations_total", &with(o));
    assert_eq!(count("succeeded"), Some(3.0));
    assert_eq!(count("raised"), Some(2.0));
    assert_eq!(m["invocations"].as_f64(), Some(5.0));
    let hist_count = sample(
        &samples,
        "cloudfunc_invocation_duration_seconds_count",
        &with("succeeded"),
    )
    .unwrap();
    assert_eq!(hist_count, 3.0);
    let inf = sample(
        &samples,
        "cloudfunc_invocation_duration_seconds_bucket",
        &[
            ("function", "scraped"),
            ("outcome", "succeeded"),
            ("le", "+Inf"),
        ],
    );
    assert_eq!(inf, Some(3.0));
    let sum: f64 = ["succeeded", "raised"]
        .iter()
        .map(|o| {
            sample(
                &samples,
                "cloudfunc_invocation_duration_seconds_sum",
                &with(o),
            )
            .unwrap()
        })
        .sum();
    let raw: f64 = tasks
        .iter()
        .map(|t| t["usage"]["duration_ms"].as_f64().unwrap() / 1000.0)
        .sum();
    assert!(
        (sum - raw).abs() < 1e-9,
        "histogram sum {sum} vs tasks {raw}"
    );
    // Buckets are cumulative and each call lands in the bucket its duration says.
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(n, l, _)| {
            n == "cloudfunc_invocation_duration_seconds_bucket"
                && l["function"] == "scraped"
                && l["outcome"] == "succeeded"
        })
        .map(|(_, l, v)| (l["le"].as_str().unwrap().parse::<f64>().unwrap(), *v))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    let succeeded: Vec<f64> = tasks
        .iter()
        .filter(|t| t["status"] == "succeeded")
        .map(|t| t["usage"]["duration_ms"].as_f64().unwrap() / 1000.0)
        .collect();
    for (le, n) in &buckets {
        let want = succeeded.iter().filter(|d| **d <= *le).count() as f64;
        assert_eq!(*n, want, "le={le}");
    }
    let cold = sample(&samples, "cloudfunc_cold_starts_total", &f).unwrap();
    assert_eq!(Some(cold), m["cold_starts"].as_f64());

    // No task ids in labels: every label is one of the few bounded ones.
    for (name, labels, _) in &samples {
        for key in labels.as_object().unwrap().keys() {
            assert!(
                ["tenant", "function", "outcome", "le", "state", "start", "reason", "backend"]
                    .contains(&key.as_str()),
                "{name} has label {key}"
            );
        }
    }
    // A tenant sees only its own functions and no system gauges; an admin sees the system.
    assert!(sample(&samples, "cloudfunc_queue_depth", &[]).is_none());
    assert!(!text.contains("tenant=\"series\""));
    let admin = s.token("root", true);
    let all = parse_exposition(get(s, "/metrics", &admin).body.as_str().unwrap());
    assert_eq!(
        sample(&all, "cloudfunc_invocations_total", &with("succeeded")),
        Some(3.0)
    );
    assert!(sample(&all, "cloudfunc_queue_depth", &[]).is_some());
    assert!(sample(&all, "cloudfunc_pool_sandboxes", &[("state", "idle")]).is_some());
    let starts: f64 = all
        .iter()
        .filter(|(n, _, _)| n == "cloudfunc_sandbox_starts_total")
        .map(|(_, _, v)| v)
        .sum();
    assert!(starts >= 1.0, "no sandbox starts counted");
    assert!(sample(&all, "cloudfunc_process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert_eq!(
        request("GET", &format!("{}/metrics", s.url), None, None).status,
        401
    );
}

fn dashboard() {
    let s = shared();
    let (t, _) = busy_tenant(s, "dash", "charted", 2, 1);
    let b = Browser::start();
    b.go(&format!("{}/?poll_ms=500", s.url));
    // Signed out: the page asks for a token and shows nothing else.
    b.wait_for("login form", "!document.getElementById('login').hidden");
    b.type_into("#token", "not-a-token");
    b.click("#login-form button");
    b.wait_for(
        "refusal",
        "document.getElementById('login-error').textContent.includes('refused')",
    );
    b.js("document.getElementById('token').value = ''; return null;");
    b.type_into("#token", &t);
    b.click("#login-form button");

    // The overview's charts hold the three calls, then the next two as they happen.
    let total = "(window.cloudfunc.chartTotal('sys-calls', 0) + window.cloudfunc.chartTotal('sys-calls', 1))";
    b.wait_for("calls in the overview chart", &format!("{total} === 3"));
    b.wait_for(
        "errors in the overview chart",
        "window.cloudfunc.chartTotal('sys-calls', 1) === 1",
    );
    b.wait_for(
        "functions table",
        "document.querySelector('#functions a').textContent === 'charted'",
    );
    for n in 0..2 {
        let r = post_json(
            s,
            "/api/functions/charted/invoke",
            &t,
            &json!({"n": 10 + n}),
        );
        assert_eq!(r.status, 200);
    }
    b.wait_for("live update of the overview", &format!("{total} === 5"));
    b.wait_for(
        "summary tile",
        "document.getElementById('tile-invocations').textContent === '5'",
    );
    b.wait_for(
        "latency chart",
        "window.cloudfunc.chartTotal('sys-latency', 0) > 0",
    );
    // On a shared store, the node tile counts the nodes (this one alone here); on SQLite a
    // node is alone and there is no tile.
    let nodes = if common::postgres::wanted() {
        "document.getElementById('tile-nodes').textContent === '1 of 1'"
    } else {
        "document.getElementById('tile-nodes') === null"
    };
    b.wait_for("the nodes tile", nodes);
    // An alert rule on the errors so far: listed, then firing on the function (rules are
    // evaluated every 15 s by default).
    let r = post_json(
        s,
        "/api/alerts/rules",
        &t,
        &json!({"name": "charted errors", "metric": "error_rate", "op": "above", "threshold": 0.1}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    b.wait_for(
        "the alert rule firing on the overview",
        "[...document.querySelectorAll('#alerts tr.alert-rule')].some((r) => r.textContent.includes('charted errors') && r.textContent.includes('firing') && r.textContent.includes('charted'))",
    );
    b.screenshot(&artifacts().join("overview.png"));

    // The function's page: its charts, its invocations with status, logs on demand.
    b.click("#functions a");
    b.wait_for(
        "function page",
        "document.querySelectorAll('#invocations tr.invocation').length === 5",
    );
    b.wait_for("function chart", "(window.cloudfunc.chartTotal('fn-calls', 0) + window.cloudfunc.chartTotal('fn-calls', 1)) === 5");
    b.wait_for(
        "a failed row",
        "[...document.querySelectorAll('#invocations .status-failed')].length === 1",
    );
    b.click("#invocations tr.invocation button");
    b.wait_for("logs shown", "document.querySelector('pre.logs') && document.querySelector('pre.logs').textContent.includes('handling 11')");
    let r = post_json(s, "/api/functions/charted/invoke", &t, &json!({"n": 42}));
    assert_eq!(r.status, 200);
    b.wait_for(
        "live update of the invocation list",
        "document.querySelectorAll('#invocations tr.invocation').length === 6",
    );
    b.wait_for("new row on top", "document.querySelector('#invocations tr.invocation code').textContent === window.cloudfunc.state.last.tasks[0].task_id");
    b.wait_for(
        "versions",
        "document.querySelectorAll('#versions tr').length === 2",
    );

    // Deactivate from the page; the API agrees.
    b.click("#fn-toggle");
    b.wait_for(
        "deactivated",
        "document.getElementById('fn-status').textContent === 'inactive'",
    );
    assert_eq!(get(s, "/api/functions/charted", &t).body["active"], false);
    b.screenshot(&artifacts().join("function.png"));
    b.click("#fn-toggle");
    b.wait_for(
        "activated",
        "document.getElementById('fn-status').textContent === 'active'",
    );
}
