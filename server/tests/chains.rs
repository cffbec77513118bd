//! Chains end to end: a real server, real sandboxes, real SQLite. Sequences, data passed on
//! exactly, parallel and map joins, choice, retry then catch, a step's and a run's timeout, a
//! function deleted under a chain, tenancy and validation at deploy, async runs at the task
//! status route. Durability (`kill -9`, a graceful stop) is in `chain_durability.rs`.

mod common;

use std::time::{Duration, Instant};

use common::browser::{self, artifacts, Browser};
use common::chains::{chain, chain_ok, deploy_ok, invoke, step_paths, wait_run, with_server};
use common::{get, post_json, request, trial, wait_health};
use libtest_mimic::Arguments;
use serde_json::{json, Value};

const ECHO: &str = "def handler(event):\n    return event\n";
const INC: &str = "def handler(event):\n    return {'n': event['n'] + 1, 'trail': event.get('trail', []) + [event['n']]}\n";
const DOUBLE: &str = "def handler(event):\n    return event * 2\n";
const FAIL: &str = "def handler(event):\n    raise ValueError('no good: ' + str(event))\n";
/// Fails on the first call in its sandbox, succeeds after (one sandbox: max_instances 1).
const FLAKY: &str = "calls = [0]\ndef handler(event):\n    calls[0] += 1\n    if calls[0] == 1:\n        raise RuntimeError('first call fails')\n    return {'attempt': calls[0]}\n";
const SLEEPY: &str = "import time\ndef handler(event):\n    time.sleep(event.get('sleep', 0.6) if isinstance(event, dict) else 0.6)\n    return event\n";

fn sequence_passes_data_exactly() {
    with_server("seq", |s, t| {
        deploy_ok(s, t, "inc", INC, "");
        deploy_ok(s, t, "echo", ECHO, "");
        chain_ok(
            s,
            t,
            json!({"name": "three", "steps": ["inc", "inc", "inc"]}),
        );
        let run = invoke(s, t, "three", json!({"n": 1}));
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], json!({"n": 4, "trail": [1, 2, 3]}));
        assert_eq!(step_paths(&run), ["/steps/0", "/steps/1", "/steps/2"]);
        // Every step is an ordinary task of its function, in its history, with the run's id.
        let run_id = run["run_id"].as_str().unwrap();
        for step in run["steps"].as_array().unwrap() {
            assert_eq!(step["status"], "succeeded");
            assert!(step["usage"]["duration_ms"].as_f64().unwrap() > 0.0);
            let task = get(
                s,
                &format!("/api/tasks/{}", step["task_id"].as_str().unwrap()),
                t,
            );
            assert_eq!(task.status, 200, "{task:?}");
            assert_eq!(task.body["chain_run"], run_id);
            assert_eq!(task.body["result"], step["output"]);
        }
        let history = get(s, "/api/functions/inc/tasks?limit=10", t);
        let in_run = history.body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|task| task["chain_run"] == run_id)
            .count();
        assert_eq!(in_run, 3);

        // Unchanged through three steps: nesting, unicode, big and small numbers, nulls.
        chain_ok(
            s,
            t,
            json!({"name": "echoes", "steps": ["echo", "echo", "echo"]}),
        );
        let data = json!({"a": [1, 2.5, -3e-7, 9007199254740991u64, null, true], "s": "héllo ☃ \u{1F600}", "o": {"x": {"y": []}}});
        let run = invoke(s, t, "echoes", data.clone());
        assert_eq!(run["output"], data);
        // The run reads the same afterwards, at every route that shows it.
        let again = get(s, &format!("/api/chains/runs/{run_id}"), t);
        assert_eq!(again.body["output"], json!({"n": 4, "trail": [1, 2, 3]}));
        let listed = get(s, "/api/chains/three/runs", t);
        assert_eq!(listed.body["runs"][0]["run_id"], run_id);
    });
}

fn parallel_map_and_choice() {
    with_server("par", |s, t| {
        deploy_ok(s, t, "echo", ECHO, "");
        deploy_ok(s, t, "double", DOUBLE, "&max_instances=8");
        chain_ok(
            s,
            t,
            json!({"name": "fan", "steps": [{"parallel": [["double"], ["double", "double"], ["echo"]]}]}),
        );
        let run = invoke(s, t, "fan", json!(3));
        assert_eq!(run["output"], json!([6, 12, 3]), "{run}");

        chain_ok(
            s,
            t,
            json!({"name": "squares", "steps": [{"map": "double", "items": "/xs", "concurrency": 4}]}),
        );
        let xs: Vec<i64> = (0..40).collect();
        let run = invoke(s, t, "squares", json!({"xs": xs}));
        let want: Vec<i64> = xs.iter().map(|x| x * 2).collect();
        assert_eq!(run["output"], json!(want), "results in element order");
        assert_eq!(run["steps"].as_array().unwrap().len(), 40);
        // Not an array where the map looks: a clear error at the step.
        let bad = invoke(s, t, "squares", json!({"xs": 5}));
        assert_eq!(bad["status"], "failed");
        assert_eq!(bad["error"]["kind"], "bad_input");
        assert_eq!(bad["error"]["step"], "/steps/0");

        chain_ok(
            s,
            t,
            json!({"name": "route", "steps": [{"choice": [
            {"pointer": "/size", "greater_than": 100, "then": [{"function": "double", "catch": "echo"}]},
            {"pointer": "/kind", "equals": "x", "then": ["echo"]}
        ], "default": [{"parallel": [["echo"], ["echo"]]}]}]}),
        );
        let big = invoke(s, t, "route", json!({"size": 500}));
        assert_eq!(step_paths(&big)[0], "/steps/0/choice/0/then/0");
        // double({"size":..}) raises (dict * 2), the catch hands the error on.
        assert_eq!(big["output"]["error"]["kind"], "raised", "{big}");
        let x = invoke(s, t, "route", json!({"size": 1, "kind": "x"}));
        assert_eq!(x["output"], json!({"size": 1, "kind": "x"}));
        assert_eq!(step_paths(&x), ["/steps/0/choice/1/then/0"]);
        let other = invoke(s, t, "route", json!({"size": 1}));
        assert_eq!(other["output"], json!([{"size": 1}, {"size": 1}]));
    });
}

fn retry_catch_and_timeouts() {
    with_server("retry", |s, t| {
        deploy_ok(s, t, "flaky", FLAKY, "&max_instances=1");
        deploy_ok(s, t, "fail", FAIL, "");
        deploy_ok(s, t, "echo", ECHO, "");
        deploy_ok(s, t, "sleepy", SLEEPY, "&timeout=1");
        chain_ok(
            s,
            t,
            json!({"name": "again", "steps": [{"function": "flaky", "retry": {"attempts": 3, "backoff_ms": 10, "on": ["raised"]}}]}),
        );
        let run = invoke(s, t, "again", json!({}));
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], json!({"attempt": 2}));
        assert_eq!(step_paths(&run), ["/steps/0", "/steps/0@2"]);
        assert_eq!(run["steps"][0]["error"]["kind"], "raised");

        chain_ok(
            s,
            t,
            json!({"name": "caught", "steps": [
                {"function": "fail", "retry": {"attempts": 2, "backoff_ms": 1}, "catch": ["echo"]},
                "echo"
            ]}),
        );
        let run = invoke(s, t, "caught", json!({"v": 1}));
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"]["error"]["kind"], "raised");
        assert_eq!(run["output"]["error"]["step"], "/steps/0@2");
        assert_eq!(run["output"]["error"]["error"]["type"], "ValueError");
        assert_eq!(run["output"]["input"], json!({"v": 1}));
        assert_eq!(
            step_paths(&run),
            ["/steps/0", "/steps/0@2", "/steps/0/catch/0", "/steps/1"]
        );

        // A step past its function's timeout fails the run there.
        chain_ok(
            s,
            t,
            json!({"name": "stuck", "steps": ["echo", "sleepy", "echo"]}),
        );
        let run = invoke(s, t, "stuck", json!({"sleep": 3}));
        assert_eq!(run["status"], "failed", "{run}");
        assert_eq!(run["error"]["kind"], "timeout");
        assert_eq!(run["error"]["step"], "/steps/1");
        assert_eq!(run["steps"][1]["status"], "timeout");
        assert_eq!(run["steps"].as_array().unwrap().len(), 2);

        // The whole run's timeout cuts the call under way short (it would have succeeded)
        // and the run tells which step it was.
        chain_ok(
            s,
            t,
            json!({"name": "bounded", "timeout_ms": 800, "steps": ["sleepy", "sleepy", "sleepy"]}),
        );
        let started = Instant::now();
        let run = invoke(s, t, "bounded", json!({"sleep": 0.5}));
        assert_eq!(run["status"], "timeout", "{run}");
        assert_eq!(run["error"]["kind"], "run_timeout");
        assert_eq!(run["error"]["step"], "/steps/1", "{run}");
        assert_eq!(step_paths(&run), ["/steps/0", "/steps/1"]);
        assert_eq!(run["steps"][1]["status"], "timeout", "{run}");
        assert_eq!(run["steps"][1]["error"]["kind"], "run_timeout");
        let cut = run["steps"][1]["task_id"].as_str().unwrap();
        let cut = get(s, &format!("/api/tasks/{cut}"), t);
        assert_eq!(cut.body["status"], "timeout", "{cut:?}");
        // A step still waiting for a sandbox at the deadline does not run at all.
        deploy_ok(s, t, "single", SLEEPY, "&max_instances=1");
        chain_ok(
            s,
            t,
            json!({"name": "crowded", "timeout_ms": 500, "steps": [{"parallel": [["single"], ["single"]]}]}),
        );
        let run = invoke(s, t, "crowded", json!({"sleep": 1}));
        assert_eq!(run["status"], "timeout", "{run}");
        let steps = run["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2, "{run}");
        assert!(steps.iter().all(|s| s["status"] == "timeout"), "{run}");
        let waited: Vec<_> = steps.iter().filter(|s| s["usage"].is_null()).collect();
        assert_eq!(waited.len(), 1, "{run}");
        let why = waited[0]["error"]["message"].as_str().unwrap();
        assert!(why.contains("did not run"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nor does the run wait past its deadline for a sandbox that a call outside it holds:
        // it ends while that call still runs.
        let holder = {
            let (url, t) = (s.url.clone(), t.to_string());
            std::thread::spawn(move || {
                request(
                    "POST",
                    &format!("{url}/api/functions/single/invoke"),
                    Some(&t),
                    Some(("application/json", br#"{"sleep": 5}"#.to_vec())),
                )
            })
        };
        wait_health(s, "the holder running", Duration::from_secs(30), |h| {
            h["sandboxes_running"] == 1
        });
        chain_ok(
            s,
            t,
            json!({"name": "outwaited", "timeout_ms": 500, "steps": ["single"]}),
        );
        let run = invoke(s, t, "outwaited", json!({"sleep": 0}));
        assert!(
            !holder.is_finished(),
            "the run waited for the holder: {run}"
        );
        assert_eq!(run["status"], "timeout", "{run}");
        assert_eq!(run["steps"][0]["status"], "timeout", "{run}");
        let why = run["steps"][0]["error"]["message"].as_str().unwrap();
        assert!(why.contains("did not run"), "{why}");
        assert_eq!(holder.join().unwrap().body["result"], json!({"sleep": 5}));
    });
}

fn deploy_checks_and_unavailable_functions() {
    with_server("checks", |s, t| {
        deploy_ok(s, t, "echo", ECHO, "");
        deploy_ok(s, t, "victim", ECHO, "");
        let other = s.token("globex", false);
        deploy_ok(s, &other, "theirs", ECHO, "");

        let refused = |def: Value, path: &str| {
            let r = chain(s, t, def.clone());
            assert_eq!(r.status, 400, "{def}: {r:?}");
            let message = r.body["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains(path), "{def}: {message} lacks {path}");
        };
        // Another tenant's function does not exist for this tenant.
        refused(
            json!({"name": "steal", "steps": ["echo", "theirs"]}),
            "/steps/1",
        );
        refused(json!({"name": "v", "steps": ["echo@9"]}), "/steps/0");
        refused(
            json!({"name": "p", "steps": [{"choice": [{"pointer": "no-slash", "equals": 1, "then": "echo"}]}]}),
            "/steps/0/choice/0/pointer",
        );
        let mut deep = json!("echo");
        for _ in 0..12 {
            deep = json!({"sequence": [deep]});
        }
        refused(
            json!({"name": "deep", "steps": [deep]}),
            "/steps/0/sequence/0",
        );
        chain_ok(s, t, json!({"name": "a", "steps": ["echo"]}));
        chain_ok(s, t, json!({"name": "b", "steps": [{"chain": "a"}]}));
        // Redeploying a so that it names b closes a cycle.
        refused(
            json!({"name": "a", "steps": [{"chain": "b"}]}),
            "/steps/0/chain",
        );
        refused(json!({"name": "Bad Name", "steps": ["echo"]}), "chain name");
        // The other tenant neither sees nor runs this tenant's chains.
        assert_eq!(
            post_json(s, "/api/chains/a/invoke", &other, &json!({})).status,
            404
        );
        assert_eq!(get(s, "/api/chains", &other).body["chains"], json!([]));
        // A chain naming a chain runs it inline.
        let run = invoke(s, t, "b", json!({"k": 1}));
        assert_eq!(run["output"], json!({"k": 1}));
        assert_eq!(step_paths(&run), ["/steps/0/sequence/0"]);
        // A chain named by another is deleted: the other cannot run as it stands (a conflict
        // with what is stored, not a bad request), and says what to do.
        let r = request("DELETE", &format!("{}/api/chains/a", s.url), Some(t), None);
        assert_eq!(r.status, 200, "{r:?}");
        for route in ["invoke", "run"] {
            let r = post_json(s, &format!("/api/chains/b/{route}"), t, &json!({}));
            assert_eq!(r.status, 409, "{route}: {r:?}");
            let why = r.body["error"]["message"].as_str().unwrap();
            assert!(
                why.contains("no chain \"a\"") && why.contains("redeploy"),
                "{why}"
            );
        }
        assert_eq!(
            get(s, "/api/chains/b/runs", t).body["runs"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        chain_ok(
            s,
            t,
            json!({"name": "doomed", "steps": ["echo", "victim", "echo"]}),
        );
        let r = request(
            "DELETE",
            &format!("{}/api/functions/victim", s.url),
            Some(t),
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
        let run = invoke(s, t, "doomed", json!({}));
        assert_eq!(run["status"], "failed");
        assert_eq!(run["error"]["kind"], "function_unavailable");
        assert_eq!(run["error"]["step"], "/steps/1");
        assert!(run["error"]["message"].as_str().unwrap().contains("victim"));

        let r = request(
            "DELETE",
            &format!("{}/api/chains/doomed", s.url),
            Some(t),
            None,
        );
        assert_eq!(r.status, 200);
        assert_eq!(get(s, "/api/chains/doomed", t).status, 404);
        // Its run stays readable.
        let id = run["run_id"].as_str().unwrap();
        assert_eq!(
            get(s, &format!("/api/tasks/{id}"), t).body["status"],
            "failed"
        );
    });
}

fn destinations_receive_async_results() {
    with_server("dest", |s, t| {
        deploy_ok(s, t, "sink", ECHO, "");
        deploy_ok(s, t, "echo", ECHO, "");
        chain_ok(s, t, json!({"name": "report", "steps": ["echo"]}));
        // A durable run requested again under the same Idempotency-Key is the same run;
        // the key sent with another input, or for a function's run, is refused.
        let queue = |path: &str, key: &str, body: Value| {
            common::request_with(
                "POST",
                &format!("{}{path}", s.url),
                Some(t),
                &[("idempotency-key", key)],
                Some(("application/json", serde_json::to_vec(&body).unwrap())),
            )
        };
        let first = queue("/api/chains/report/run", "nightly-1", json!({"d": 1}));
        assert_eq!(first.status, 202, "{first:?}");
        let run = first.body["run_id"].as_str().unwrap().to_string();
        let again = queue("/api/chains/report/run", "nightly-1", json!({"d": 1}));
        assert_eq!(again.body["run_id"], json!(run), "{again:?}");
        assert!(again
            .headers
            .iter()
            .any(|(k, v)| k == "idempotent-replayed" && v == "true"));
        assert_eq!(
            wait_run(s, t, &run, Duration::from_secs(30))["output"],
            json!({"d": 1})
        );
        let runs = get(s, "/api/chains/report/runs", t).body["runs"].clone();
        assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
        let other = queue("/api/chains/report/run", "nightly-1", json!({"d": 2}));
        assert_eq!(other.status, 422, "{other:?}");
        let crossed = queue("/api/functions/echo/run", "nightly-1", json!({"d": 1}));
        assert_eq!(crossed.status, 422, "{crossed:?}");
        // Destinations must exist, and not be the function itself.
        for (query, what) in [
            ("&on_success=nowhere", "nowhere"),
            ("&on_failure=chain:absent", "absent"),
            ("&on_success=src", "itself"),
        ] {
            let r = request(
                "POST",
                &format!("{}/api/functions/deploy?name=src{query}", s.url),
                Some(t),
                Some(("application/zip", common::zip(&[("main.py", INC)]))),
            );
            assert_eq!(r.status, 400, "{query}: {r:?}");
            assert!(
                r.body["error"]["message"].as_str().unwrap().contains(what),
                "{r:?}"
            );
        }
        deploy_ok(s, t, "src", INC, "&on_success=sink&on_failure=chain:report");

        let ok = post_json(s, "/api/functions/src/run", t, &json!({"n": 1}));
        assert_eq!(ok.status, 202);
        let ok_id = ok.body["task_id"].as_str().unwrap().to_string();
        let bad = post_json(s, "/api/functions/src/run", t, &json!({"no_n": 1}));
        let bad_id = bad.body["task_id"].as_str().unwrap().to_string();

        let deadline = Instant::now() + Duration::from_secs(30);
        let received = loop {
            let tasks = get(s, "/api/functions/sink/tasks", t).body["tasks"].clone();
            let hit = tasks
                .as_array()
                .unwrap()
                .iter()
                .find(|task| {
                    task["payload"]["source"]["task_id"] == ok_id.as_str()
                        && task["status"] == "succeeded"
                })
                .cloned();
            if let Some(hit) = hit {
                break hit;
            }
            assert!(Instant::now() < deadline, "{tasks}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(received["payload"]["result"], json!({"n": 2, "trail": [1]}));
        assert_eq!(received["payload"]["payload"], json!({"n": 1}));
        assert_eq!(received["payload"]["source"]["status"], "succeeded");

        let failed = loop {
            let runs = get(s, "/api/chains/report/runs", t).body["runs"].clone();
            let hit = runs
                .as_array()
                .unwrap()
                .iter()
                .find(|r| {
                    r["input"]["source"]["task_id"] == bad_id.as_str() && r["status"] == "succeeded"
                })
                .cloned();
            if let Some(hit) = hit {
                break hit;
            }
            assert!(Instant::now() < deadline, "{runs}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(failed["output"]["error"]["kind"], "raised");
        assert_eq!(failed["output"]["error"]["type"], "KeyError");
        // A sync call goes to no destination.
        let before = get(s, "/api/functions/sink/tasks", t).body["tasks"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(
            post_json(s, "/api/functions/src/invoke", t, &json!({"n": 5})).status,
            200
        );
        std::thread::sleep(Duration::from_millis(300));
        let after = get(s, "/api/functions/sink/tasks", t).body["tasks"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(before, after);
    });
}

fn the_cli_deploys_a_chain_file_and_runs_it() {
    with_server("cli", |s, t| {
        deploy_ok(s, t, "inc", INC, "");
        deploy_ok(s, t, "double", DOUBLE, "");
        let dir = s.dir.join("pipeline");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("chain.toml"),
            "name = \"pipeline\"\ntimeout_ms = 30000\nsteps = [\n  \"inc\",\n  { function = \"inc\", retry = { attempts = 2, on = [\"timeout\"] } },\n  { parallel = [[\"inc\"], [\"inc\", \"inc\"]] },\n]\n",
        )
        .unwrap();
        let cli = |args: &[&str]| {
            let out = s.cli("acme").args(args).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, text) = cli(&["chain", "deploy", dir.to_str().unwrap()]);
        assert!(ok && text.contains("deployed chain pipeline"), "{text}");
        let (ok, text) = cli(&["chain", "list"]);
        assert!(
            ok && text.contains("pipeline") && text.contains("3 steps"),
            "{text}"
        );
        let (ok, text) = cli(&[
            "--json",
            "chain",
            "invoke",
            "pipeline",
            "--data",
            "{\"n\": 0}",
        ]);
        assert!(ok, "{text}");
        let run: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(run["output"][1]["n"], 4, "{run}");
        assert_eq!(run["output"][1]["trail"], json!([0, 1, 2, 3]));
        let (ok, text) = cli(&["chain", "run", "pipeline", "--data", "{\"n\": 10}"]);
        assert!(ok, "{text}");
        let run_id = text.trim().to_string();
        assert!(run_id.starts_with("run_"), "{text}");
        wait_run(s, t, &run_id, Duration::from_secs(30));
        let (ok, text) = cli(&["status", &run_id]);
        assert!(
            ok && text.contains("succeeded") && text.contains("/steps/2/parallel/1/1"),
            "{text}"
        );
        let (ok, text) = cli(&["chain", "runs", "pipeline"]);
        assert!(ok && text.contains(&run_id), "{text}");
        // A JSON file by name, and a mistake reported with its step.
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"name": "bad", "steps": ["inc", {"map": "nope"}]}"#,
        )
        .unwrap();
        let (ok, text) = cli(&["chain", "deploy", bad.to_str().unwrap()]);
        assert!(
            !ok && text.contains("/steps/1") && text.contains("nope"),
            "{text}"
        );
        let (ok, text) = cli(&["chain", "delete", "pipeline"]);
        assert!(ok && text.contains("deleted"), "{text}");
    });
}

fn the_dashboard_shows_runs_and_their_steps() {
    with_server("dash", |s, t| {
        deploy_ok(s, t, "inc", INC, "");
        deploy_ok(s, t, "fail", FAIL, "");
        chain_ok(
            s,
            t,
            json!({"name": "shown", "steps": ["inc", {"parallel": [["inc"], ["inc"]]}]}),
        );
        chain_ok(s, t, json!({"name": "broken", "steps": ["inc", "fail"]}));
        invoke(s, t, "shown", json!({"n": 1}));
        invoke(s, t, "broken", json!({"n": 1}));
        let b = Browser::start();
        b.go(&format!("{}/?poll_ms=300", s.url));
        b.wait_for("login form", "!document.getElementById('login').hidden");
        b.type_into("#token", t);
        b.click("#login-form button");
        b.wait_for(
            "chains on the overview",
            "document.querySelectorAll('#chains tr.chain').length === 2",
        );
        b.js("location.hash = '#/chains/shown'; return null;");
        b.wait_for(
            "the run",
            "document.querySelectorAll('#chain-runs tr.chain-run').length === 1",
        );
        b.wait_for(
            "its three steps",
            "document.querySelectorAll('#chain-runs tr.chain-step').length === 3",
        );
        b.wait_for(
            "a parallel branch's step",
            "document.getElementById('chain-runs').textContent.includes('/steps/1/parallel/1/0')",
        );
        b.wait_for(
            "the definition",
            "document.getElementById('chain-definition').textContent.includes('parallel')",
        );
        // A run started now appears on the next refresh.
        let r = post_json(s, "/api/chains/shown/run", t, &json!({"n": 5}));
        assert_eq!(r.status, 202);
        b.wait_for("the async run", "[...document.querySelectorAll('#chain-runs tr.chain-run')].some((r) => r.textContent.includes('async') && r.textContent.includes('succeeded'))");
        b.screenshot(&artifacts().join("chain.png"));
        b.js("location.hash = '#/chains/broken'; return null;");
        b.wait_for("the failed step", "document.querySelector('#chain-runs tr.chain-run .status-failed') && document.getElementById('chain-runs').textContent.includes('raised at /steps/1')");
    });
}

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        (
            "a_sequence_passes_data_on_exactly",
            sequence_passes_data_exactly,
        ),
        ("parallel_map_and_choice", parallel_map_and_choice),
        ("retry_then_catch_and_timeouts", retry_catch_and_timeouts),
        (
            "deploy_checks_and_unavailable_functions",
            deploy_checks_and_unavailable_functions,
        ),
        (
            "destinations_receive_async_results",
            destinations_receive_async_results,
        ),
        (
            "the_cli_deploys_a_chain_file_and_runs_it",
            the_cli_deploys_a_chain_file_and_runs_it,
        ),
    ];
    let why = common::sandboxes_missing();
    if let Some(why) = &why {
        println!("SKIPPED {} chain tests: {why}", tests.len());
    }
    let mut trials: Vec<_> = tests
        .into_iter()
        .map(|(name, f)| trial(name, f, why.is_some()))
        .collect();
    let no_browser = why.clone().or_else(browser::missing);
    if let Some(missing) = &no_browser {
        println!("SKIPPED the_dashboard_shows_runs_and_their_steps: {missing}");
    }
    trials.push(trial(
        "the_dashboard_shows_runs_and_their_steps",
        the_dashboard_shows_runs_and_their_steps,
        no_browser.is_some(),
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    common::postgres::stop_shared();
    conclusion.exit();
}
