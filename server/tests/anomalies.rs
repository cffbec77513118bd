//! Anomaly detection end to end: a real server (in this process, so that its wall clock can
//! be moved by hand) runs real functions in real sandboxes through a simulated day, one
//! minute of calls at a time. A function whose latency jumps and one whose error rate climbs
//! get anomaly events within minutes; a steady one gets none all day. The events reach the
//! API, `/metrics`, the alert hook, an alert rule on anomaly scores (a webhook) and the
//! dashboard (in headless Chromium), and the detectors survive a restart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudfunc_server::anomalies::{Change, Event};
use cloudfunc_server::serve::{load_keys, run, ServeConfig};
use cloudfunc_server::wall::{ManualWall, WallClock};
use common::browser::{self, Browser};
use common::receiver::Receiver;
use common::{request, zip, Reply};
use serde_json::{json, Value};

const MINUTE: i64 = 60_000;
/// Minutes of calls in all: a simulated day.
const DAY: i64 = 1440;
/// The minute the latency of `jumpy` jumps, and the minute errors of `flaky` start: late in
/// the day, once their detectors have most of a day behind them (early in a series' life the
/// detector is less sure; see docs/anomaly.md).
const JUMP: i64 = 1380;
const CLIMB: i64 = 1395;
/// How soon after its start an anomaly must be reported, in minutes.
const WITHIN: i64 = 5;

/// Sleeps `ms` milliseconds, then fails if asked to.
const CODE: &str = "import time\n\ndef handler(event):\n    time.sleep(event.get('ms', 0) / 1000)\n    if event.get('fail'):\n        raise ValueError('asked to fail')\n    return 'ok'\n";

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![(
        "a_simulated_day_finds_the_jump_and_the_climb_and_nothing_in_the_steady",
        simulated_day,
    )];
    common::run_tests("anomaly tests", tests, common::sandboxes_missing());
}

/// A server running in this process on its own thread and runtime.
struct InProcess {
    url: String,
    data_dir: PathBuf,
    clock: Arc<ManualWall>,
    /// Every anomaly event the hook announced.
    events: Arc<Mutex<Vec<(Change, Event)>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(dir: &Path, clock: Arc<ManualWall>) -> InProcess {
        let mut config = ServeConfig::with_defaults(dir.join("data"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.state_dir = dir.join("state");
        config.images_dir = dir.join("images");
        config.cgroup_parent = format!("cf-anomalies-{}", std::process::id());
        // Alert rules on anomaly scores are evaluated often, and may call this machine.
        config.alert_interval_ms = 100;
        config.alert_allow_private_targets = true;
        let data_dir = config.data_dir.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let events = Arc::new(Mutex::new(Vec::new()));
        let (heard, time) = (events.clone(), clock.clone() as Arc<dyn WallClock>);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            let listening = |addr, platform: &cloudfunc_server::platform::Platform| {
                let mut rx = platform.subscribe_anomalies();
                tokio::spawn(async move {
                    while let Ok(e) = rx.recv().await {
                        heard.lock().unwrap().push(e);
                    }
                });
                addr_tx.send(addr).unwrap();
            };
            let stop = async {
                let _ = stopped.await;
            };
            rt.block_on(run(config, time, listening, stop)).unwrap();
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server started");
        InProcess {
            url: format!("http://{addr}"),
            data_dir,
            clock,
            events,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn token(&self, tenant: &str, admin: bool) -> String {
        load_keys(&self.data_dir, None)
            .unwrap()
            .mint(tenant, admin, 3600)
    }

    fn get(&self, path: &str, token: &str) -> Reply {
        request("GET", &format!("{}{path}", self.url), Some(token), None)
    }

    fn invoke(&self, token: &str, name: &str, body: &Value) -> Reply {
        request(
            "POST",
            &format!("{}/api/functions/{name}/invoke", self.url),
            Some(token),
            Some(("application/json", serde_json::to_vec(body).unwrap())),
        )
    }

    /// Moves the clock into `minute` (of the simulated day from `t0`), past its settling
    /// time, and waits until the minute before it has been watched.
    fn enter(&self, t0: i64, minute: i64, admin: &str) {
        self.clock.set(t0 + minute * MINUTE + 2_500);
        let watched = t0 + (minute - 1) * MINUTE;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.get("/api/system/anomalies?since=0", admin);
            assert_eq!(r.status, 200, "{r:?}");
            if r.body["watched_through"].as_i64() >= Some(watched) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "minute {minute} was never watched: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("the server stopped cleanly");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn post(s: &InProcess, token: &str, path: &str, body: &Value) -> Reply {
    request(
        "POST",
        &format!("{}{path}", s.url),
        Some(token),
        Some(("application/json", serde_json::to_vec(body).unwrap())),
    )
}

fn deploy(s: &InProcess, token: &str, name: &str) {
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy?name={name}", s.url),
        Some(token),
        Some(("application/zip", zip(&[("function.py", CODE)]))),
    );
    assert_eq!(r.status, 201, "{r:?}");
}

/// The scored minutes of a function's series whose score passed `above`, for messages.
fn high_scores(b: &Value, above: f64) -> String {
    let mut out = String::new();
    for (series, points) in b["points"].as_object().into_iter().flatten() {
        for p in points.as_array().into_iter().flatten() {
            if p[2].as_f64().unwrap_or(0.0) > above {
                out.push_str(&format!("{series} {p}\n"));
            }
        }
    }
    out
}

/// The highest score of any of a function's series.
fn highest(b: &Value) -> f64 {
    b["points"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(_, points)| points.as_array().into_iter().flatten())
        .filter_map(|p| p[2].as_f64())
        .fold(0.0, f64::max)
}

/// The events of a function over the whole simulated span.
fn events_of(s: &InProcess, token: &str, name: &str, t0: i64) -> Value {
    let r = s.get(
        &format!(
            "/api/functions/{name}/anomalies?since={}&until={}",
            t0 - MINUTE,
            t0 + 2 * DAY * MINUTE
        ),
        token,
    );
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

fn simulated_day() {
    let dir = tempfile::tempdir().unwrap();
    // The day simulated ended an hour ago, so that the dashboard's "last 24 hours" holds it.
    let now = cloudfunc_server::model::now_ms();
    let t0 = now - now.rem_euclid(MINUTE) - (DAY + 60) * MINUTE;
    let clock = Arc::new(ManualWall::at(t0 + 2_500));
    let mut s = InProcess::start(dir.path(), clock.clone());
    let (t, admin) = (s.token("acme", false), s.token("ops", true));
    for name in ["steady", "jumpy", "flaky"] {
        deploy(&s, &t, name);
    }
    // An alert rule of the kind anomaly, and a webhook to hear it.
    let hooks = Receiver::start();
    let rule = post(
        &s,
        &t,
        "/api/alerts/rules",
        &json!({"name": "jumpy unusual", "function": "jumpy", "metric": "anomaly_score", "op": "above", "threshold": 0.2}),
    );
    assert_eq!(rule.status, 201, "{rule:?}");
    let sub = post(
        &s,
        &t,
        "/api/notifications/subscribe",
        &json!({"channel": "webhook", "url": hooks.url("/hook")}),
    );
    assert_eq!(sub.status, 201, "{sub:?}");
    let started = Instant::now();
    for minute in 0..DAY {
        if minute > 0 {
            s.enter(t0, minute, &admin);
        }
        for _ in 0..2 {
            let r = s.invoke(&t, "steady", &json!({"ms": 10}));
            assert_eq!(r.status, 200, "{r:?}");
        }
        let ms = if minute >= JUMP { 100 } else { 10 };
        let r = s.invoke(&t, "jumpy", &json!({"ms": ms}));
        assert_eq!(r.status, 200, "{r:?}");
        // From CLIMB, its calls fail.
        let r = s.invoke(&t, "flaky", &json!({"ms": 3, "fail": minute >= CLIMB}));
        assert_eq!(r.status, 200, "{r:?}");
        if minute == 10 {
            // Too little data: the API says so instead of guessing.
            let b = events_of(&s, &t, "jumpy", t0);
            assert_eq!(b["status"], "learning", "{b}");
            assert!(
                b["message"].as_str().unwrap().contains("too little data"),
                "{b}"
            );
            assert!(b["events"].as_array().unwrap().is_empty());
        }
        if minute == JUMP + 2 {
            // The clock stands still a moment: the rule sees the onset's score and fires.
            let deadline = Instant::now() + Duration::from_secs(20);
            while !hooks.got("/hook").iter().any(|g| {
                serde_json::from_slice::<Value>(&g.body).is_ok_and(|b| {
                    b["type"] == "alert.firing"
                        && b["rule"] == "jumpy unusual"
                        && b["items"][0]["since"].as_i64() >= Some(t0 + JUMP * MINUTE)
                })
            }) {
                assert!(Instant::now() < deadline, "the anomaly rule never fired");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if minute == JUMP + WITHIN + 1 {
            let b = events_of(&s, &t, "jumpy", t0);
            let found = b["events"].as_array().unwrap().iter().find(|e| {
                e["series"] == "duration_p95"
                    && (t0 + JUMP * MINUTE..=t0 + (JUMP + WITHIN) * MINUTE)
                        .contains(&e["started"].as_i64().unwrap())
            });
            let event = found.unwrap_or_else(|| {
                panic!(
                    "no latency event within {WITHIN} minutes of the jump: {}; {}",
                    b["events"],
                    high_scores(&b, 0.1)
                )
            });
            assert!(event["peak_score"].as_f64().unwrap() >= b["threshold"].as_f64().unwrap());
            println!(
                "latency event: peak score {} (threshold {}); the steady function's highest score so far: {}",
                event["peak_score"],
                b["threshold"],
                highest(&events_of(&s, &t, "steady", t0))
            );
            let points = event["points"].as_array().unwrap();
            assert!(
                points.first().unwrap()["value"].as_f64().unwrap() < 50.0,
                "{event}"
            );
            assert!(
                points.last().unwrap()["value"].as_f64().unwrap() >= 60.0,
                "{event}"
            );
        }
        if minute == CLIMB + WITHIN + 1 {
            let b = events_of(&s, &t, "flaky", t0);
            let found = b["events"].as_array().unwrap().iter().any(|e| {
                e["series"] == "error_rate"
                    && (t0 + CLIMB * MINUTE..=t0 + (CLIMB + WITHIN) * MINUTE)
                        .contains(&e["started"].as_i64().unwrap())
            });
            assert!(
                found,
                "no error-rate event within {WITHIN} minutes of the climb: {}; {}",
                b["events"],
                high_scores(&b, 0.1)
            );
        }
    }
    s.enter(t0, DAY, &admin);
    println!("a simulated day of calls in {:?}", started.elapsed());
    println!(
        "steady's highest: {}",
        high_scores(&events_of(&s, &t, "steady", t0), 0.12)
    );

    // The steady function: watched all day, never anomalous.
    let b = events_of(&s, &t, "steady", t0);
    assert_eq!(b["status"], "watching", "{b}");
    let events: Vec<String> = b["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let values: Vec<String> = e["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| format!("{}@{:.3}", p["value"], p["score"].as_f64().unwrap_or(0.0)))
                .collect();
            format!(
                "{} from {}: {}",
                e["series"],
                e["started"],
                values.join(" ")
            )
        })
        .collect();
    assert!(
        events.is_empty(),
        "a steady function had anomalies: {events:#?}"
    );
    let scored = b["points"]["duration_p95"].as_array().unwrap().len();
    assert!(
        scored + 2 >= usize::try_from(DAY).unwrap(),
        "{scored} minutes scored"
    );

    // The alert hook heard the openings.
    let heard = s.events.lock().unwrap().clone();
    let opened = |function: &str, series: &str| {
        heard.iter().any(|(c, e)| {
            *c == Change::Opened && e.function == function && e.series.name() == series
        })
    };
    assert!(opened("jumpy", "duration_p95") && opened("flaky", "error_rate"));
    assert!(!heard.iter().any(|(_, e)| e.function == "steady"));

    // Every anomaly of the tenant, none of the system's series for it; an admin sees those.
    let all = s.get(&format!("/api/system/anomalies?since={t0}&until={now}"), &t);
    assert_eq!(all.status, 200);
    let functions: Vec<&str> = all.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["function"].as_str().unwrap())
        .collect();
    assert!(
        functions.contains(&"jumpy") && functions.contains(&"flaky"),
        "{all:?}"
    );
    assert!(all.body["series"].is_null());
    let ops = s.get(
        &format!("/api/system/anomalies?since={t0}&until={now}"),
        &admin,
    );
    let series: Vec<&str> = ops.body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["series"].as_str().unwrap())
        .collect();
    assert!(series.contains(&"calls"), "{ops:?}");
    // Another tenant sees none of them.
    let other = s.token("globex", false);
    let none = s.get(
        &format!("/api/system/anomalies?since={t0}&until={now}"),
        &other,
    );
    assert_eq!(none.body["events"], json!([]));
    assert_eq!(s.get("/api/functions/jumpy/anomalies", &other).status, 404);

    // The latest scores in /metrics.
    let m = request("GET", &format!("{}/metrics", s.url), Some(&t), None);
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains(
            "cloudfunc_anomaly_score{tenant=\"acme\",function=\"steady\",series=\"duration_p95\"}"
        ),
        "{text}"
    );

    if browser::missing().is_none() {
        dashboard(&s, &t);
    } else {
        println!("(the dashboard part needs chromium, chromium-driver and libjs-chart.js; not checked here)");
    }

    // A restart: the detectors come back as they were, and the minutes while the server was
    // stopped are watched on its return.
    let before = events_of(&s, &t, "steady", t0)["series"].clone();
    s.stop();
    clock.set(t0 + (DAY + 30) * MINUTE + 2_500);
    let s = InProcess::start(dir.path(), clock.clone());
    s.enter(t0, DAY + 31, &admin);
    let after = events_of(&s, &t, "steady", t0);
    let seen = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["series"] == "invocations")
            .unwrap()["points_seen"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        seen(&after["series"]),
        seen(&before) + 31,
        "the detector carried on, through the 31 minutes missed: {after}"
    );
    assert_eq!(after["status"], "watching");
}

/// The dashboard lists the events and marks them on the charts.
fn dashboard(s: &InProcess, token: &str) {
    let b = Browser::start();
    b.go(&format!("{}/?poll_ms=500", s.url));
    b.wait_for("login form", "!document.getElementById('login').hidden");
    b.type_into("#token", token);
    b.click("#login-form button");
    b.wait_for("overview", "document.getElementById('anomalies') !== null");
    b.js("const r = document.getElementById('range'); r.value = '24h'; r.dispatchEvent(new Event('change')); return null;");
    b.wait_for(
        "the anomaly list",
        "[...document.querySelectorAll('#anomalies tr.anomaly a')].some((a) => a.textContent === 'jumpy')",
    );
    b.go(&format!("{}/?poll_ms=500#/functions/jumpy", s.url));
    b.js("const r = document.getElementById('range'); r.value = '24h'; r.dispatchEvent(new Event('change')); return null;");
    b.wait_for(
        "the function's anomaly list",
        "document.querySelectorAll('#fn-anomalies tr.anomaly').length > 0",
    );
    b.wait_for(
        "a marker on the latency chart",
        "window.cloudfunc.anomalyMarks('fn-latency') > 0",
    );
    b.screenshot(&browser::artifacts().join("anomalies.png"));
}
