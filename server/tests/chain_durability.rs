//! Chain runs across a crash and a stop: a `kill -9` in the middle of a long async run
//! (steps that ended are not run again; the one cut short runs again or ends `interrupted`),
//! and a graceful stop that lets a waiting step finish.

mod common;

use std::time::{Duration, Instant};

use common::chains::{chain_ok, deploy_ok, step_paths, wait_run};
use common::{get, post_json, wait_health, Server};
use serde_json::{json, Value};

const SLOW_INC: &str =
    "import time\ndef handler(event):\n    time.sleep(0.5)\n    return event + 1\n";

fn async_runs_survive_kill_9() {
    let dir = std::env::temp_dir().join(format!("cloudfunc-chains-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = Server::start_in(&dir, "chkill", 0, &[]);
    let t = s.token("acme", false);
    deploy_ok(&s, &t, "slow_inc", SLOW_INC, "");
    let step = json!({"function": "slow_inc", "retry": {"attempts": 2, "on": ["interrupted"]}});
    chain_ok(&s, &t, json!({"name": "long", "steps": vec![step; 8]}));
    let r = post_json(&s, "/api/chains/long/run", &t, &json!(0));
    assert_eq!(r.status, 202, "{r:?}");
    let run_id = r.body["run_id"].as_str().unwrap().to_string();
    // Until three steps have ended, then the crash.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let run = get(&s, &format!("/api/chains/runs/{run_id}"), &t).body;
        let done = run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .count();
        if done >= 3 {
            break run;
        }
        assert!(Instant::now() < deadline, "{run}");
        std::thread::sleep(Duration::from_millis(30));
    };
    s.kill9();
    let s = Server::start_in(&dir, "chkill", 0, &[]);
    let run = wait_run(&s, &t, &run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!(8));
    // Steps that had ended are the same calls, not run again.
    for old in before["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
    {
        let now = run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["path"] == old["path"])
            .unwrap();
        assert_eq!(now["task_id"], old["task_id"], "{}", old["path"]);
    }
    // Exactly one succeeded call per step of the chain, across both processes.
    let succeeded: Vec<&Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .collect();
    assert_eq!(succeeded.len(), 8, "{run}");
    let history = get(&s, "/api/functions/slow_inc/tasks?limit=100", &t);
    let ran = history.body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|task| task["chain_run"] == run_id.as_str() && task["status"] == "succeeded")
        .count();
    assert_eq!(ran, 8, "no step ran twice");
    // A step cut by the crash, if there was one, is reported and retried.
    for step in run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] != "succeeded")
    {
        assert_eq!(step["error"]["kind"], "interrupted", "{step}");
    }

    // A graceful stop lets the running step finish and leaves the rest to the next start:
    // nothing is interrupted, nothing runs twice.
    let plain = json!({"name": "long_plain", "steps": vec!["slow_inc"; 6]});
    chain_ok(&s, &t, plain);
    let r = post_json(&s, "/api/chains/long_plain/run", &t, &json!(100));
    let run_id = r.body["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = |s: &Server| {
        get(s, &format!("/api/chains/runs/{run_id}"), &t).body["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .count()
    };
    while done(&s) < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(30));
    }
    s.stop();
    drop(s);
    let s = Server::start_in(&dir, "chkill", 0, &[]);
    let run = wait_run(&s, &t, &run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!(106));
    let want: Vec<String> = (0..6).map(|i| format!("/steps/{i}")).collect();
    assert_eq!(step_paths(&run), want, "{run}");

    // Without a step retry, a function's max_retries decides, as for a queued task: the step
    // cut by the crash runs again, once, as its second attempt.
    deploy_ok(&s, &t, "slow_again", SLOW_INC, "&max_retries=1");
    chain_ok(
        &s,
        &t,
        json!({"name": "long_again", "steps": vec!["slow_again"; 6]}),
    );
    let r = post_json(&s, "/api/chains/long_again/run", &t, &json!(0));
    let run_id = r.body["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = s;
    loop {
        let run = get(&s, &format!("/api/chains/runs/{run_id}"), &t).body;
        let steps = run["steps"].as_array().unwrap();
        // Killed while the third step runs.
        if steps.len() == 3 && steps[2]["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "{run}");
        std::thread::sleep(Duration::from_millis(10));
    }
    s.kill9();
    let s = Server::start_in(&dir, "chkill", 0, &[]);
    let run = wait_run(&s, &t, &run_id, Duration::from_secs(90));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!(6));
    assert_eq!(run["steps"][2]["attempts"], 2, "{run}");
    assert_eq!(run["steps"][1]["attempts"], 1, "{run}");
    s.stop();
    s.remove_files();
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A graceful stop while an async run's parallel step waits for its function's one instance:
/// the step waits on within the stop's grace (the queue's own tasks are given back to the
/// queue at a stop; a run's steps are not), and the run ends as it would have, each step
/// run once.
fn a_stop_lets_an_async_step_wait_for_its_instance() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-chains-stop-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(dir.path(), "chstop", 0, &[]);
    let t = s.token("stopper", false);
    deploy_ok(&s, &t, "one_slow", SLOW_INC, "&max_instances=1");
    chain_ok(
        &s,
        &t,
        json!({"name": "both", "steps": [{"parallel": [["one_slow"], ["one_slow"]]}]}),
    );
    let r = post_json(&s, "/api/chains/both/run", &t, &json!(1));
    assert_eq!(r.status, 202, "{r:?}");
    let run_id = r.body["run_id"].as_str().unwrap().to_string();
    wait_health(
        &s,
        "one branch running, one waiting",
        Duration::from_secs(30),
        |h| h["sandboxes_running"] == 1 && h["pool"]["waiting"] == 1,
    );
    s.stop();
    drop(s);
    let s = Server::start_in(dir.path(), "chstop", 0, &[]);
    let run = wait_run(&s, &t, &run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!([2, 2]), "{run}");
    for step in run["steps"].as_array().unwrap() {
        assert_eq!(step["attempts"], 1, "{run}");
    }
    s.stop();
    s.remove_files();
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![
        ("async_runs_survive_kill_9", async_runs_survive_kill_9),
        (
            "a_stop_lets_an_async_step_wait_for_its_instance",
            a_stop_lets_an_async_step_wait_for_its_instance,
        ),
    ];
    common::run_tests("chain durability tests", tests, common::sandboxes_missing());
}
