//! The REST API and the CLI against a real server process: loopback port, SQLite file, real
//! sandboxes. Needs root and python3; without them every test is reported as ignored with one
//! line saying why.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use libtest_mimic::Arguments;
use serde_json::{json, Value};

static SERVER: OnceLock<Server> = OnceLock::new();

const RUNSC: &str = "/usr/bin/runsc";

fn shared() -> &'static Server {
    SERVER.get_or_init(|| Server::start("shared"))
}

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        ("seed003_quick_start_with_the_cli", seed003_quick_start),
        ("cli_deploys_a_file_and_a_zip", cli_files_and_zips),
        (
            "cli_runs_a_function_locally_beside_others",
            cli_runs_a_function_locally_beside_others,
        ),
        ("canonical_lifecycle", canonical_lifecycle),
        ("async_run_and_status_routes", async_run),
        ("versions_and_updates", versions),
        ("seed002_routes", seed002),
        ("seed004_routes", seed004),
        ("bad_input_is_refused_and_damages_nothing", bad_input),
        ("tenant_matrix_on_every_route", tenant_matrix),
        ("outcomes_are_recorded", outcomes),
        ("kill_9_loses_no_task", kill9),
        ("every_documented_route_is_mounted", openapi),
        ("head_options_and_encoded_bodies", http_methods_and_codings),
        ("weak_secret_refuses_to_start", weak_secret),
        ("isolation_is_per_function", isolation),
        ("missing_gvisor_is_refused_at_deploy", missing_gvisor),
        ("warm_pool_over_http", warm_pool),
        ("deploy_compiles_python_once", deploy_compiles),
        ("pool_caps_from_the_command_line", pool_caps),
        (
            "sync_records_are_read_at_once_and_kept_at_shutdown",
            sync_records,
        ),
        (
            "queued_tasks_of_a_deactivated_or_deleted_function_do_not_run",
            queued_after_a_change,
        ),
        (
            "a_graceful_stop_finishes_running_tasks_and_leaves_nothing",
            graceful_stop,
        ),
        (
            "a_sigterm_while_starting_stops_gracefully",
            sigterm_while_starting,
        ),
        (
            "the_queue_claims_no_more_payload_than_its_memory_allows",
            queue_memory,
        ),
    ];
    let mut why = common::sandboxes_missing();
    if common::postgres::wanted() && why.is_none() {
        why = common::postgres::Postgres::unavailable();
    }
    if let Some(why) = &why {
        println!("SKIPPED {} api tests: {why}", tests.len());
    }
    let no_runsc = (why.is_none() && !std::path::Path::new(RUNSC).is_file())
        .then(|| format!("{RUNSC} is not installed"));
    if let Some(no_runsc) = &no_runsc {
        println!("SKIPPED 1 api test (isolation_is_per_function): {no_runsc}");
    }
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let skip = why.is_some() || (name == "isolation_is_per_function" && no_runsc.is_some());
            trial(name, f, skip)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(server) = SERVER.get() {
        server.stop();
        server.remove_files();
    }
    common::postgres::stop_shared();
    conclusion.exit();
}

fn seed003_quick_start() {
    let s = shared();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello_fn");
    let out = s
        .cli("seed003")
        .arg("deploy")
        .arg(&examples)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deployed hello_fn version 1"));
    let out = s
        .cli("seed003")
        .args(["invoke", "hello_fn", "--data", r#"{"name":"Alice"}"#])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("result: Hello Alice!"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = s
        .cli("seed003")
        .args(["invoke", "hello_fn", "--data", "{}"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("result: Hello World!"));
    for name in ["Bob", "Charlie", "Diana"] {
        let out = s
            .cli("seed003")
            .args([
                "--json",
                "invoke",
                "hello_fn",
                "--data",
                &format!(r#"{{"name":"{name}"}}"#),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["result"], json!(format!("Hello {name}!")));
    }
    let out = s
        .cli("seed003")
        .args(["--json", "invoke", "hello_fn", "--async"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let task = v["task_id"].as_str().unwrap();
    let token = s.token("seed003", false);
    assert_eq!(
        wait_task(s, &token, task, Duration::from_secs(30))["result"],
        json!("Hello World!")
    );
    let out = s.cli("seed003").args(["status", task]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    let out = s.cli("seed003").arg("list").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello_fn"));
    let out = s
        .cli("seed003")
        .args(["metrics", "hello_fn"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("invocations 6"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = s
        .cli("seed003")
        .args(["deactivate", "hello_fn"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("inactive"));
    let out = s
        .cli("seed003")
        .args(["invoke", "hello_fn"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("deactivated"));
    assert!(s
        .cli("seed003")
        .args(["activate", "hello_fn"])
        .status()
        .unwrap()
        .success());
    assert!(s
        .cli("seed003")
        .args(["delete", "hello_fn"])
        .status()
        .unwrap()
        .success());
    let out = s
        .cli("seed003")
        .args(["invoke", "hello_fn"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no function"));
}

/// `cloudfunc run DIR` beside a server and beside another run: each takes a state directory
/// of its own (the server's engine holds the default one), and leaves nothing behind.
fn cli_runs_a_function_locally_beside_others() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("function.py"),
        "import time\ndef handler(event):\n    time.sleep(1)\n    return event['n'] * 2\n",
    )
    .unwrap();
    // The events from a file (@FILE) and from standard input (-).
    let event = dir.path().join("event.json");
    std::fs::write(&event, r#"{"n": 0}"#).unwrap();
    let run = |data: &str| {
        std::process::Command::new(BIN)
            .arg("run")
            .arg(dir.path())
            .args(["--data", data])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut from_stdin = run("-");
    {
        use std::io::Write;
        let mut stdin = from_stdin.stdin.take().unwrap();
        stdin.write_all(br#"{"n": 1}"#).unwrap();
    }
    let runs = vec![run(&format!("@{}", event.display())), from_stdin];
    let mut pids = Vec::new();
    for (n, run) in runs.into_iter().enumerate() {
        pids.push(run.id());
        let out = run.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            record["invocation"]["outcome"]["result"],
            json!(n * 2),
            "{record}"
        );
    }
    for pid in pids {
        let state = format!("/run/cloudfunc-run-{pid}");
        assert!(!std::path::Path::new(&state).exists(), "{state} was left");
    }
    let out = run("@/nonexistent/event.json").wait_with_output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--data @/nonexistent/event.json"), "{said}");
}

fn cli_files_and_zips() {
    let s = shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("handler.py");
    std::fs::write(&file, SEED004_HANDLER).unwrap();
    let out = s
        .cli("clifiles")
        .arg("deploy")
        .arg(&file)
        .args(["--name", "payload", "--handler", "handler.handle"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s
        .cli("clifiles")
        .args(["--json", "invoke", "payload", "--data", r#""{\"a\": 1}""#])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"]["status"], "processed_as_json", "{v}");
    let out = s
        .cli("clifiles")
        .args(["logs", "payload"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Default handler received"));
    let task = v["task_id"].as_str().unwrap();
    let out = s.cli("clifiles").args(["logs", task]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Default handler received"));
    let archive = dir.path().join("adder.zip");
    std::fs::write(
        &archive,
        zip(&[("function.py", "def handler(e):\n    return e['a'] + 1\n")]),
    )
    .unwrap();
    let out = s
        .cli("clifiles")
        .arg("deploy")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deployed adder version 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s
        .cli("clifiles")
        .args(["--json", "invoke", "adder", "--data", r#"{"a": 41}"#])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], 42);
    let out = s
        .cli("clifiles")
        .args(["versions", "payload"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("v1  python  container  handler handler.handle"));
    // Without --name, a directory's manifest names the function; else the directory's whole
    // name does, made valid (`my.func` is `my_func`, not `my`).
    for (dir_name, manifest, deployed) in [
        (
            "anything",
            Some("name = \"from-manifest\"\n"),
            "from-manifest",
        ),
        ("my.func", None, "my_func"),
    ] {
        let code = dir.path().join(dir_name);
        std::fs::create_dir(&code).unwrap();
        std::fs::write(code.join("function.py"), HELLO_PY).unwrap();
        if let Some(m) = manifest {
            std::fs::write(code.join("cloudfunc.toml"), m).unwrap();
        }
        let out = s.cli("clifiles").arg("deploy").arg(&code).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("deployed {deployed} version 1")),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A client mistake is reported, not a crash.
    let out = s
        .cli("clifiles")
        .args(["invoke", "payload", "--data", "{not json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data must be JSON"));
}

fn canonical_lifecycle() {
    let s = shared();
    let t = s.token("canon", false);
    // Multipart deploy with settings as form fields and the zip as a file.
    let (ct, body) = multipart(
        &[
            ("name", "greeter"),
            ("runtime", "python"),
            ("timeout", "5"),
            ("memory", "128"),
        ],
        &[("file", "code.zip", &zip(&[("function.py", HELLO_PY)]))],
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        (r.body["name"].as_str(), r.body["version"].as_u64()),
        (Some("greeter"), Some(1))
    );
    let id = r.body["id"].as_str().unwrap().to_string();
    for path in ["/api/functions/", "/api/functions"] {
        let r = get(s, path, &t);
        assert_eq!(r.status, 200);
        assert_eq!(r.body["functions"][0]["name"], "greeter");
        assert_eq!(r.body["functions"][0]["status"], "active");
    }
    let r = get(s, &format!("/api/functions/{id}"), &t);
    assert_eq!(r.body["settings"]["timeout_ms"], 5000);
    assert_eq!(r.body["settings"]["memory_mb"], 128);
    let r = post_json(
        s,
        "/api/functions/greeter/invoke",
        &t,
        &json!({"name": "Ann"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["result"], "Hello Ann!");
    assert_eq!(r.body["status"], "succeeded");
    // The deploy loaded it in a sandbox, kept for this first call.
    assert_eq!(r.body["usage"]["start"], "warm", "{r:?}");
    assert!(r.body["usage"]["peak_memory_bytes"].as_u64().unwrap() > 0);
    // What it cost in CPU, counted exactly: a sample at the kernel's ticks reads 0 for most
    // calls this short.
    assert!(r.body["usage"]["cpu_ms"].as_f64().unwrap() > 0.0, "{r:?}");
    // Deactivate: runs are refused up front, not accepted and lost.
    assert_eq!(
        request(
            "PUT",
            &format!("{}/api/functions/{id}/deactivate", s.url),
            Some(&t),
            None
        )
        .status,
        200
    );
    let r = post_json(s, "/api/functions/greeter/run", &t, &json!({}));
    assert_eq!(r.status, 409);
    assert_eq!(r.body["error"]["code"], "function_inactive");
    assert_eq!(
        request(
            "PUT",
            &format!("{}/api/functions/{id}/activate", s.url),
            Some(&t),
            None
        )
        .status,
        200
    );
    let r = get(s, "/api/functions/greeter/metrics?range=1h", &t);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["invocations"], 1);
    assert_eq!(
        get(s, "/api/functions/greeter/metrics?range=banana", &t).status,
        400
    );
    let r = get(s, "/api/system/metrics", &t);
    assert!(r.body["invocations"].as_u64().unwrap() >= 1);
    let r = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
    assert!(r.body["host"]["memory_total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/api/functions/greeter", s.url),
            Some(&t),
            None
        )
        .status,
        200
    );
    assert_eq!(get(s, &format!("/api/functions/{id}"), &t).status, 404);
    assert!(
        !s.dir.join("state/code").join(&id).exists(),
        "code removed with the function"
    );
}

fn async_run() {
    let s = shared();
    let t = s.token("asyncer", false);
    assert_eq!(
        deploy(
            s,
            &t,
            "adder",
            &[(
                "function.py",
                "def handler(e):\n    return e['a'] + e['b']\n"
            )]
        )
        .status,
        201
    );
    let r = post_json(s, "/api/functions/adder/run", &t, &json!({"a": 2, "b": 3}));
    assert_eq!(r.status, 202, "{r:?}");
    let task = r.body["task_id"].as_str().unwrap().to_string();
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "location" && v.ends_with(&task)));
    let done = wait_task(s, &t, &task, Duration::from_secs(30));
    assert_eq!(done["result"], 5);
    assert_eq!(done["mode"], "async");
    // Seed 000's own status path gives the same record.
    let r = get(s, &format!("/api/functions/{task}/status"), &t);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["result"], 5);
    // No body is an empty payload; a non-JSON body is refused.
    let r = request(
        "POST",
        &format!("{}/api/functions/adder/run", s.url),
        Some(&t),
        Some(("application/json", b"{not json".to_vec())),
    );
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("JSON"));
    let r = post_json(s, "/api/functions/missing/run", &t, &json!({}));
    assert_eq!(r.status, 404);

    // Sent again with the same Idempotency-Key (its first reply lost), a submission gets
    // the task the first made, and the function runs once.
    let submit = |token: &str, key: &str, body: &Value| {
        request_with(
            "POST",
            &format!("{}/api/functions/adder/run", s.url),
            Some(token),
            &[("idempotency-key", key)],
            Some(("application/json", serde_json::to_vec(body).unwrap())),
        )
    };
    let replayed = |r: &Reply| {
        r.headers
            .iter()
            .any(|(k, v)| k == "idempotent-replayed" && v == "true")
    };
    let first = submit(&t, "order-17", &json!({"a": 10, "b": 1}));
    assert_eq!(first.status, 202, "{first:?}");
    assert!(!replayed(&first));
    let id = first.body["task_id"].as_str().unwrap().to_string();
    wait_task(s, &t, &id, Duration::from_secs(30));
    let again = submit(&t, "order-17", &json!({"a": 10, "b": 1}));
    assert_eq!(
        (again.status, &again.body["task_id"]),
        (202, &json!(id)),
        "{again:?}"
    );
    assert!(replayed(&again), "{again:?}");
    assert_eq!(again.body["status"], "succeeded");
    let ran = get(s, "/api/functions/adder/tasks?limit=100", &t).body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|task| task["payload"] == json!({"a": 10, "b": 1}))
        .count();
    assert_eq!(ran, 1, "the function ran once");
    // The same key for another payload is refused; another tenant's keys are its own.
    let other = submit(&t, "order-17", &json!({"a": 11, "b": 1}));
    assert_eq!(other.status, 422, "{other:?}");
    let theirs = s.token("idem-other", false);
    assert_eq!(
        deploy(
            s,
            &theirs,
            "adder",
            &[("function.py", "def handler(e):\n    return e['a'] + 1\n")]
        )
        .status,
        201
    );
    let r = submit(&theirs, "order-17", &json!({"a": 10, "b": 1}));
    assert_eq!(r.status, 202, "{r:?}");
    assert_ne!(r.body["task_id"], json!(id));
    // Sent at once, four times: one task, and each reply names it.
    let ids: std::collections::HashSet<String> = std::thread::scope(|scope| {
        let sends: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| submit(&t, "burst-1", &json!({"a": 1, "b": 2}))))
            .collect();
        sends
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 202, "{r:?}");
                r.body["task_id"].as_str().unwrap().to_string()
            })
            .collect()
    });
    assert_eq!(ids.len(), 1, "{ids:?}");
    // The same from the command line: a retried --async prints the same task.
    let queued_by_cli = || {
        let out = s
            .cli("asyncer")
            .args(["invoke", "adder", "--async", "--idempotency-key", "cli-1"])
            .args(["--data", r#"{"a": 2, "b": 2}"#])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = queued_by_cli();
    assert!(printed.starts_with("queued task task_"), "{printed}");
    assert_eq!(queued_by_cli(), printed);
    let long = "k".repeat(256);
    assert_eq!(submit(&t, &long, &json!({"a": 1})).status, 400);
}

fn versions() {
    let s = shared();
    let t = s.token("versioner", false);
    assert_eq!(
        deploy(
            s,
            &t,
            "ver",
            &[("function.py", "def handler(e):\n    return 'one'\n")]
        )
        .body["version"],
        1
    );
    assert_eq!(
        deploy(
            s,
            &t,
            "ver",
            &[("function.py", "def handler(e):\n    return 'two'\n")]
        )
        .body["version"],
        2
    );
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke", &t, &json!({})).body["result"],
        "two"
    );
    assert_eq!(
        post_json(s, "/api/functions/ver@1/invoke", &t, &json!({})).body["result"],
        "one"
    );
    // Percent-encoded, as the CLI and encodeURIComponent send it.
    assert_eq!(
        post_json(s, "/api/functions/ver%401/invoke", &t, &json!({})).body["result"],
        "one"
    );
    assert_eq!(
        post_json(s, "/api/functions/ver%FF/invoke", &t, &json!({})).status,
        400
    );
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke?version=1", &t, &json!({})).body["result"],
        "one"
    );
    assert_eq!(
        post_json(s, "/api/functions/ver@9/invoke", &t, &json!({})).status,
        404
    );
    // Settings only: a new version with the same code.
    let r = request(
        "PUT",
        &format!("{}/api/functions/ver", s.url),
        Some(&t),
        Some((
            "application/json",
            br#"{"memory": 64, "env": {"A": "b"}}"#.to_vec(),
        )),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["version"], 3);
    // Settings as an array are refused (serde would read them by position: the third, the
    // handler), and no version is made.
    let r = request(
        "PUT",
        &format!("{}/api/functions/ver", s.url),
        Some(&t),
        Some(("application/json", br#"[null, null, "x.y"]"#.to_vec())),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let why = r.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("must be a JSON object"), "{why}");
    let r = get(s, "/api/functions/ver/versions", &t);
    let versions = r.body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 3);
    assert_eq!(versions[2]["memory_mb"], 64);
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke", &t, &json!({})).body["result"],
        "two"
    );
    // New code through PUT as a ZIP.
    let r = request(
        "PUT",
        &format!("{}/api/functions/ver", s.url),
        Some(&t),
        Some((
            "application/zip",
            zip(&[("function.py", "def handler(e):\n    return 'four'\n")]),
        )),
    );
    assert_eq!(r.body["version"], 4, "{r:?}");
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke", &t, &json!({})).body["result"],
        "four"
    );
    // Rolled back to version 1: its code again (its tree rebuilt from the archive), as
    // version 5, with its settings (not version 3's memory).
    let r = post_json(s, "/api/functions/ver/rollback", &t, &json!({"version": 1}));
    assert_eq!((r.status, &r.body["version"]), (200, &json!(5)), "{r:?}");
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke", &t, &json!({})).body["result"],
        "one"
    );
    let r = get(s, "/api/functions/ver/versions", &t);
    assert_eq!(r.body["versions"][4]["memory_mb"], 256, "{r:?}");
    for (body, status) in [
        (json!({"version": 9}), 404),
        (json!({"version": "one"}), 400),
        (json!({}), 400),
    ] {
        let r = post_json(s, "/api/functions/ver/rollback", &t, &body);
        assert_eq!(r.status, status, "{body}: {r:?}");
    }
    let out = s
        .cli("versioner")
        .args(["rollback", "ver", "4"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ver version 6 runs version 4's code"),
        "{out:?}"
    );
    assert_eq!(
        post_json(s, "/api/functions/ver/invoke", &t, &json!({})).body["result"],
        "four"
    );
    // Calls resolve functions from memory: a deletion must reach them at once.
    let r = request(
        "DELETE",
        &format!("{}/api/functions/ver", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    for key in ["ver", "ver@6"] {
        let r = post_json(s, &format!("/api/functions/{key}/invoke"), &t, &json!({}));
        assert_eq!(r.status, 404, "{key}: {r:?}");
    }
}

fn seed002() {
    let s = shared();
    let t = s.token("seed002", false);
    let r = post_json(
        s,
        "/functions",
        &t,
        &json!({"name": "square", "language": "python", "timeout": 5, "code": "def handler(event):\n    return event['x'] ** 2\n"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        (r.body["version"].as_u64(), r.body["status"].as_str()),
        (Some(1), Some("deployed"))
    );
    let r = get(s, &format!("/functions/{id}"), &t);
    assert_eq!(r.body["name"], "square");
    let r = post_json(
        s,
        &format!("/execute/{id}"),
        &t,
        &json!({"input": {"x": 7}, "parameters": {}}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["output"], 49);
    let r = post_json(
        s,
        &format!("/execute/{id}"),
        &t,
        &json!({"input": {}, "parameters": {}}),
    );
    assert_eq!(r.body["error"]["kind"], "raised");
    assert_eq!(r.body["error"]["type"], "KeyError");
    let r = request(
        "PUT",
        &format!("{}/functions/{id}", s.url),
        Some(&t),
        Some((
            "application/json",
            serde_json::to_vec(
                &json!({"code": "def handler(event):\n    return event['x'] * 3\n"}),
            )
            .unwrap(),
        )),
    );
    assert_eq!(r.body["version"], 2);
    assert_eq!(
        post_json(
            s,
            &format!("/execute/{id}"),
            &t,
            &json!({"input": {"x": 7}})
        )
        .body["output"],
        21
    );
    assert_eq!(
        post_json(
            s,
            &format!("/execute/{id}"),
            &t,
            &json!({"input": {"x": 7}, "parameters": {"version": 1}})
        )
        .body["output"],
        49
    );
    let js = post_json(
        s,
        "/functions",
        &t,
        &json!({"name": "jsq", "language": "javascript", "timeout": 5, "code": "exports.handler = (e) => e.x * e.x;\n"}),
    );
    if std::path::Path::new("/usr/bin/node").exists() {
        assert_eq!(js.status, 201, "{js:?}");
        assert_eq!(
            post_json(s, "/execute/jsq", &t, &json!({"input": {"x": 5}})).body["output"],
            25
        );
    }
    let r = get(s, &format!("/metrics/functions/{id}"), &t);
    assert_eq!(r.status, 200);
    assert!(r.body["invocations"].as_u64().unwrap() >= 4);
    assert_eq!(r.body["errors"], 1);
    assert_eq!(get(s, "/metrics/system", &t).status, 200);
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/functions/{id}", s.url),
            Some(&t),
            None
        )
        .status,
        200
    );
    assert_eq!(get(s, &format!("/functions/{id}"), &t).status, 404);
}

const SEED004_HANDLER: &str = r#"from typing import Any
import json


def handle(payload: str) -> Any:
    print(f"Default handler received: '{payload}'")
    try:
        data = json.loads(payload)
        return {"handler": "default", "processed_data": data, "status": "processed_as_json"}
    except json.JSONDecodeError:
        return {"handler": "default", "original_data": payload, "status": "processed_as_string"}
"#;

fn seed004() {
    let s = shared();
    let t = s.token("seed004", false);
    let (ct, body) = multipart(
        &[("function_name", "handle")],
        &[("python_file", "handler.py", SEED004_HANDLER.as_bytes())],
    );
    let r = request(
        "POST",
        &format!("{}/functions", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let r = post_json(
        s,
        &format!("/functions/{id}/execute"),
        &t,
        &json!({"payload": "{\"key\": \"some value\"}"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body["result"],
        json!({"handler": "default", "processed_data": {"key": "some value"}, "status": "processed_as_json"})
    );
    assert!(r.body["logs"]
        .as_str()
        .unwrap()
        .contains("Default handler received"));
    let r = post_json(
        s,
        &format!("/functions/{id}/execute"),
        &t,
        &json!({"payload": "plain text"}),
    );
    assert_eq!(r.body["result"]["status"], "processed_as_string");
    let r = post_json(
        s,
        &format!("/functions/{id}/execute"),
        &t,
        &json!({"payload": 42}),
    );
    assert_eq!(r.status, 400, "the payload must be a string");
    let r = get(s, "/functions", &t);
    assert!(r.body["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == id.as_str()));
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/functions/{id}", s.url),
            Some(&t),
            None
        )
        .status,
        200
    );
}

fn bad_input() {
    let s = shared();
    let t = s.token("badinput", false);
    assert_eq!(
        deploy(
            s,
            &t,
            "keeper",
            &[("function.py", "def handler(e):\n    return 'kept'\n")]
        )
        .status,
        201
    );
    let raw = |name: &str, bytes: Vec<u8>| {
        request(
            "POST",
            &format!("{}/api/functions/deploy?name={name}", s.url),
            Some(&t),
            Some(("application/zip", bytes)),
        )
    };
    // Traversal, absolute, symlink, corrupt, bomb.
    let traversal = raw("keeper", zip(&[("../../evil.py", "x")]));
    assert_eq!(traversal.status, 400, "{traversal:?}");
    assert!(traversal.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unsafe path"));
    assert_eq!(raw("keeper", zip(&[("/etc/evil.py", "x")])).status, 400);
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.add_symlink(
        "function.py",
        "/etc/shadow",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    let r = raw("keeper", w.finish().unwrap().into_inner());
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("symlink"));
    assert_eq!(
        raw("keeper", b"PK\x03\x04 this is not a zip".to_vec()).status,
        400
    );
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "function.py",
        zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated),
    )
    .unwrap();
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..80 {
        std::io::Write::write_all(&mut w, &zeros).unwrap();
    }
    let bomb = w.finish().unwrap().into_inner();
    assert!(bomb.len() < 1 << 20);
    let r = raw("keeper", bomb);
    assert_eq!(r.status, 400, "{r:?}");
    // Over the body limit: refused from the headers alone, before any of the body is sent.
    {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        write!(tcp, "POST /api/functions/deploy?name=keeper HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nContent-Type: application/zip\r\nContent-Length: {}\r\n\r\n", 33u64 << 20).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 64];
        let n = tcp.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
    // Invalid name, unknown runtime, missing handler, syntax error.
    assert_eq!(
        raw("Bad..Name", zip(&[("function.py", HELLO_PY)])).status,
        400
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy?name=x&runtime=cobol", s.url),
        Some(&t),
        Some(("application/zip", zip(&[("function.py", HELLO_PY)]))),
    );
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown runtime"));
    let r = raw(
        "keeper",
        zip(&[("function.py", "def something_else(e):\n    return 1\n")]),
    );
    assert_eq!(r.status, 422, "{r:?}");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("handler"));
    assert_eq!(
        raw(
            "keeper",
            zip(&[("function.py", "def handler(e)\n  return 1\n")])
        )
        .status,
        422
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some(("text/plain", b"hello".to_vec())),
    );
    assert_eq!(r.status, 415);
    // Nothing stored was damaged: still version 1, still answering.
    let r = get(s, "/api/functions/keeper", &t);
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["versions"].as_array().unwrap().len(), 1);
    assert_eq!(
        post_json(s, "/api/functions/keeper/invoke", &t, &json!({})).body["result"],
        "kept"
    );
    assert!(!s.dir.join("evil.py").exists() && !std::path::Path::new("/etc/evil.py").exists());
    // A value of the wrong type is refused naming the field or query parameter it is in.
    let r = request(
        "PUT",
        &format!("{}/api/functions/keeper", s.url),
        Some(&t),
        Some(("application/json", br#"{"memory": "lots"}"#.to_vec())),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let why = r.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("memory: invalid type"), "{why}");
    let r = get(s, "/api/functions/keeper/metrics?since=yesterday", &t);
    assert_eq!(r.status, 400, "{r:?}");
    let why = r.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("query parameter since"), "{why}");
    // Seed 000's execute takes an object with the payload, not the payload alone.
    let r = post_json(s, "/functions/keeper/execute", &t, &json!(["text"]));
    assert_eq!(r.status, 400, "{r:?}");
    let why = r.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("{\"payload\": \"<string>\"}"), "{why}");
    // Unknown routes and methods answer in the same JSON shape.
    let r = get(s, "/api/nope", &t);
    assert_eq!(r.status, 404);
    assert!(r.body["error"]["code"].is_string());
}

fn tenant_matrix() {
    let s = shared();
    let owner = s.token("owner", false);
    let other = s.token("intruder", false);
    let admin = s.token("root", true);
    let r = deploy(s, &owner, "private", &[("function.py", HELLO_PY)]);
    let id = r.body["id"].as_str().unwrap().to_string();
    let task = post_json(s, "/api/functions/private/invoke", &owner, &json!({})).body["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let expired = {
        let out = std::process::Command::new(BIN)
            .arg("--data-dir")
            .arg(s.dir.join("data"))
            .args(["--tenant", "owner", "token", "--ttl", "-10"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let none_alg = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(br#"{"alg":"none","typ":"JWT"}"#),
            e.encode(br#"{"sub":"owner","exp":9999999999}"#)
        )
    };
    let forged = {
        let mut t = owner.clone();
        t.pop();
        t.push(if owner.ends_with('A') { 'B' } else { 'A' });
        t
    };
    let routes: Vec<(&str, String)> = vec![
        ("GET", format!("/api/functions/{id}")),
        ("GET", "/api/functions/private".into()),
        ("GET", format!("/api/functions/{id}/versions")),
        ("GET", format!("/api/functions/{id}/metrics")),
        ("GET", format!("/api/functions/{id}/tasks")),
        ("POST", format!("/api/functions/{id}/invoke")),
        ("POST", format!("/api/functions/{id}/run")),
        ("GET", format!("/api/tasks/{task}")),
        ("GET", format!("/api/functions/{task}/status")),
        ("GET", format!("/functions/{id}")),
        ("POST", format!("/execute/{id}")),
        ("GET", format!("/metrics/functions/{id}")),
        ("PUT", format!("/api/functions/{id}/deactivate")),
        ("PUT", format!("/api/functions/{id}/activate")),
        ("PUT", format!("/api/functions/{id}")),
        ("PUT", format!("/functions/{id}")),
    ];
    for (method, path) in &routes {
        let url = format!("{}{path}", s.url);
        let sends_json = method == &"POST" || (method == &"PUT" && !path.ends_with("activate"));
        let body = sends_json.then(|| ("application/json", b"{}".to_vec()));
        assert_eq!(
            request(method, &url, Some(&other), body.clone()).status,
            404,
            "other tenant: {method} {path}"
        );
        for (what, token) in [
            ("no token", None),
            ("expired", Some(expired.as_str())),
            ("alg none", Some(none_alg.as_str())),
            ("forged", Some(forged.as_str())),
            ("garbage", Some("abc")),
        ] {
            let r = request(method, &url, token, body.clone());
            assert_eq!(r.status, 401, "{what}: {method} {path}: {r:?}");
            assert_eq!(r.body["error"]["code"], "unauthorized");
        }
        let r = request(method, &url, Some(&owner), body.clone());
        assert!(r.status < 300, "owner: {method} {path}: {r:?}");
        let r = request(method, &url, Some(&admin), body);
        assert!(r.status < 300, "admin: {method} {path}: {r:?}");
    }
    // Lists: each tenant sees only its own; the admin sees all.
    assert!(!get(s, "/api/functions/", &other).body["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == id.as_str()));
    assert!(get(s, "/api/functions/", &admin).body["functions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == id.as_str()));
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/api/functions/{id}", s.url),
            Some(&other),
            None
        )
        .status,
        404
    );
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/api/functions/{id}", s.url),
            None,
            None
        )
        .status,
        401
    );
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/api/functions/{id}", s.url),
            Some(&owner),
            None
        )
        .status,
        200
    );
    // The other tenant can use the same name independently.
    assert_eq!(
        deploy(s, &other, "private", &[("function.py", HELLO_PY)]).status,
        201
    );
}

fn outcomes() {
    let s = shared();
    let t = s.token("outcomes", false);
    let cases = [
        ("boom", "def handler(e):\n    raise RuntimeError('kaput')\n", "failed", Some("raised")),
        ("spin", "def handler(e):\n    while True:\n        pass\n", "timeout", Some("timeout")),
        ("hog", "def handler(e):\n    a = []\n    while True:\n        a.append(bytearray(b'x' * (1 << 20)))\n", "out_of_memory", Some("out_of_memory")),
        ("die", "import os\ndef handler(e):\n    os._exit(9)\n", "crashed", Some("crashed")),
    ];
    for (name, code, status, kind) in cases {
        let r = request(
            "POST",
            &format!(
                "{}/api/functions/deploy?name={name}&timeout=1&memory=64",
                s.url
            ),
            Some(&t),
            Some(("application/zip", zip(&[("function.py", code)]))),
        );
        assert_eq!(r.status, 201, "{name}: {r:?}");
        let r = post_json(s, &format!("/api/functions/{name}/invoke"), &t, &json!({}));
        assert_eq!(r.body["status"], status, "{name}: {r:?}");
        assert_eq!(r.body["error"]["kind"].as_str(), kind, "{name}");
    }
    let r = post_json(s, "/api/functions/boom/invoke", &t, &json!({}));
    assert!(r.body["error"]["traceback"]
        .as_str()
        .unwrap()
        .contains("kaput"));
    let m = get(s, "/api/functions/spin/metrics", &t).body;
    assert_eq!(m["errors_by_kind"]["timeout"], 1);
}

fn kill9() {
    let dir = std::env::temp_dir().join(format!("cloudfunc-api-kill9-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = Server::start_in(&dir, "kill9", 0, &["--workers", "1", "--concurrency", "1"]);
    let t = s.token("crashy", false);
    let slow = "import time\ndef handler(e):\n    time.sleep(1.5)\n    return e['n']\n";
    assert_eq!(deploy(&s, &t, "slow", &[("function.py", slow)]).status, 201);
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy?name=retry&max_retries=2", s.url),
        Some(&t),
        Some(("application/zip", zip(&[("function.py", slow)]))),
    );
    assert_eq!(r.status, 201);
    let mut tasks = Vec::new();
    let first = post_json(&s, "/api/functions/slow/run", &t, &json!({"n": 0})).body["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Wait until the first one runs, then queue more behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get(&s, &format!("/api/tasks/{first}"), &t).body["status"] != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the first task never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in 1..4 {
        tasks.push(
            post_json(&s, "/api/functions/slow/run", &t, &json!({"n": n})).body["task_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    s.kill9();
    let s = Server::start_in(&dir, "kill9", 0, &["--workers", "2"]);
    let t = s.token("crashy", false);
    let interrupted = wait_task(&s, &t, &first, Duration::from_secs(5));
    assert_eq!(interrupted["status"], "failed");
    assert_eq!(interrupted["error"]["kind"], "interrupted");
    for (i, task) in tasks.iter().enumerate() {
        let done = wait_task(&s, &t, task, Duration::from_secs(60));
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["result"], i + 1);
        assert_eq!(done["attempts"], 1, "exactly once");
    }
    // A function that opts into retries is run again after a crash.
    let mut s = s;
    let retried = post_json(&s, "/api/functions/retry/run", &t, &json!({"n": 42})).body["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get(&s, &format!("/api/tasks/{retried}"), &t).body["status"] != "running" {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill9();
    let s = Server::start_in(&dir, "kill9", 0, &[]);
    let t = s.token("crashy", false);
    let done = wait_task(&s, &t, &retried, Duration::from_secs(60));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

fn openapi() {
    let s = shared();
    let r = request("GET", &format!("{}/api/openapi.json", s.url), None, None);
    assert_eq!(r.status, 200);
    let paths = r.body["paths"].as_object().unwrap();
    assert!(paths.len() >= 25, "{}", paths.len());
    // Every documented operation is mounted: asked with its method, it answers something
    // other than "no such route" or "method not allowed".
    let t = s.token("openapi", false);
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "no_such_fn")
                .replace("{task_id}", "task_none");
            let r = request(
                &method.to_uppercase(),
                &format!("{}{concrete}", s.url),
                Some(&t),
                None,
            );
            assert_ne!(
                r.body["error"]["code"], "no_route",
                "{method} {path}: {r:?}"
            );
            assert_ne!(r.status, 405, "{method} {path}: {r:?}");
        }
    }
    // And what is not documented is not there.
    let r = request("GET", &format!("{}/api/nothing", s.url), Some(&t), None);
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("no_route"))
    );
    let r = request(
        "DELETE",
        &format!("{}/api/system/health", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 405, "{r:?}");
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "allow" && v == "GET, HEAD, OPTIONS"),
        "{r:?}"
    );
}

/// HEAD is answered as GET without a body, OPTIONS with what a path takes, a body sent
/// compressed is refused with a 415 that says so, before it is read, and a byte order mark
/// before JSON is ignored.
fn http_methods_and_codings() {
    let s = shared();
    let t = s.token("methods", false);
    assert_eq!(
        deploy(
            s,
            &t,
            "echo",
            &[("function.py", "def handler(e):\n    return e\n")]
        )
        .status,
        201
    );
    let health = request("HEAD", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body, Value::String(String::new()), "{health:?}");
    assert!(
        health
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/json"),
        "{health:?}"
    );
    let listed = request("HEAD", &format!("{}/api/functions", s.url), Some(&t), None);
    assert_eq!(listed.status, 200, "{listed:?}");
    let anonymous = request("HEAD", &format!("{}/api/functions", s.url), None, None);
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let head_of_post = request(
        "HEAD",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        None,
    );
    assert_ne!(head_of_post.status, 405, "{head_of_post:?}");

    let options = request(
        "OPTIONS",
        &format!("{}/api/functions/echo/run", s.url),
        None,
        None,
    );
    assert_eq!(options.status, 204, "{options:?}");
    assert!(
        options
            .headers
            .iter()
            .any(|(k, v)| k == "allow" && v == "POST, OPTIONS"),
        "{options:?}"
    );
    let nowhere = request("OPTIONS", &format!("{}/api/nothing", s.url), None, None);
    assert_eq!(nowhere.status, 404, "{nowhere:?}");

    let before = get(s, "/api/functions/echo/tasks", &t);
    let gzipped = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .run(
            ureq::http::Request::builder()
                .method("POST")
                .uri(format!("{}/api/functions/echo/run", s.url))
                .header("authorization", format!("Bearer {t}"))
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])
                .unwrap(),
        )
        .unwrap();
    assert_eq!(gzipped.status().as_u16(), 415);
    let text = gzipped.into_body().read_to_string().unwrap();
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "unsupported_media_type", "{text}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("gzip"),
        "{text}"
    );
    let after = get(s, "/api/functions/echo/tasks", &t);
    assert_eq!(before.body, after.body, "a refused body ran nothing");

    // A byte order mark before the JSON (some clients write one) is not part of the payload.
    let marked = request(
        "POST",
        &format!("{}/api/functions/echo/run", s.url),
        Some(&t),
        Some(("application/json", b"\xef\xbb\xbf{\"a\": 1}".to_vec())),
    );
    assert_eq!(marked.status, 202, "{marked:?}");
}

fn weak_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            "password",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("secret"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A function that reports which kernel it sees.
const KERNEL_PY: &str = "def handler(event):\n    return open('/proc/version').read()\n";

fn isolation() {
    let s = shared();
    let t = s.token("iso", false);
    let health = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(
        health.body["isolation"]["default"], "container",
        "{health:?}"
    );
    assert_eq!(
        health.body["isolation"]["container"]["backend"],
        "libcontainer"
    );
    assert_eq!(health.body["isolation"]["gvisor"]["available"], true);
    assert_eq!(health.body["isolation"]["gvisor"]["backend"], "runsc");

    // One function per level, the gVisor one chosen by a multipart field.
    let (ct, body) = multipart(
        &[("name", "kernel-gvisor"), ("isolation", "gvisor")],
        &[("file", "code.zip", &zip(&[("function.py", KERNEL_PY)]))],
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["isolation"], "gvisor");
    let r = deploy(s, &t, "kernel-container", &[("function.py", KERNEL_PY)]);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["isolation"], "container", "the server's default");

    let host_version = std::fs::read_to_string("/proc/version").unwrap();
    let g = post_json(s, "/api/functions/kernel-gvisor/invoke", &t, &json!({}));
    assert_eq!(g.status, 200, "{g:?}");
    assert_eq!(g.body["usage"]["isolation"], "gvisor");
    assert_eq!(g.body["usage"]["backend"], "runsc");
    let inside = g.body["result"].as_str().unwrap();
    assert!(
        inside.starts_with("Linux version 4.4.0 #1 SMP Sun Jan 10"),
        "gVisor's kernel: {inside}"
    );
    let c = post_json(s, "/api/functions/kernel-container/invoke", &t, &json!({}));
    assert_eq!(c.body["usage"]["isolation"], "container");
    assert_eq!(c.body["usage"]["backend"], "libcontainer");
    assert_eq!(c.body["result"].as_str().unwrap(), host_version);

    // The setting shows on the function, carries over to the next version, and an async run
    // records it too.
    let f = get(s, "/api/functions/kernel-gvisor", &t);
    assert_eq!(f.body["settings"]["isolation"], "gvisor");
    let r = request(
        "PUT",
        &format!("{}/functions/kernel-gvisor", s.url),
        Some(&t),
        Some(("application/json", br#"{"timeout": 20}"#.to_vec())),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body["isolation"], "gvisor",
        "kept from the previous version"
    );
    let q = post_json(s, "/api/functions/kernel-gvisor/run", &t, &json!({}));
    assert_eq!(q.status, 202);
    let done = wait_task(
        s,
        &t,
        q.body["task_id"].as_str().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["usage"]["isolation"], "gvisor");
    assert_eq!(done["version"], 2);

    // Seed 002's JSON body, and a redeploy that switches level.
    let r = post_json(
        s,
        "/functions",
        &t,
        &json!({"name": "kernel-002", "language": "python", "code": KERNEL_PY, "isolation": "gvisor"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["isolation"], "gvisor");
    let r = request(
        "PUT",
        &format!("{}/functions/kernel-002", s.url),
        Some(&t),
        Some((
            "application/json",
            br#"{"isolation": "container"}"#.to_vec(),
        )),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let c = post_json(s, "/api/functions/kernel-002/invoke", &t, &json!({}));
    assert_eq!(c.body["usage"]["isolation"], "container");

    // A level that does not exist: refused, nothing stored.
    let before = get(s, "/api/functions/", &t).body["count"].clone();
    let (ct, body) = multipart(
        &[("name", "kernel-vm"), ("isolation", "vm")],
        &[("file", "code.zip", &zip(&[("function.py", KERNEL_PY)]))],
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"container\"") && msg.contains("\"gvisor\""),
        "{msg}"
    );
    assert_eq!(get(s, "/api/functions/", &t).body["count"], before);

    // The CLI sets and shows it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("function.py"), KERNEL_PY).unwrap();
    let out = s
        .cli("iso")
        .args(["deploy", "--name", "kernel-cli", "--isolation", "gvisor"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("gvisor isolation"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s
        .cli("iso")
        .args(["versions", "kernel-cli"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("gvisor"));
    let out = s
        .cli("iso")
        .args(["invoke", "kernel-cli"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("4.4.0"));
}

fn missing_gvisor() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-nogv-")
        .tempdir()
        .unwrap();
    // gVisor as the default, without runsc: the server refuses to start, and says why.
    let out = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--isolation",
            "gvisor",
            "--runsc",
            "/nonexistent/runsc",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("default isolation is gvisor") && err.contains("/nonexistent/runsc"),
        "{err}"
    );

    // Container by default: it starts, and a gVisor deploy is refused at once.
    let s = Server::start_in(dir.path(), "nogv", 0, &["--runsc", "/nonexistent/runsc"]);
    let t = s.token("nogv", false);
    let health = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(health.body["isolation"]["gvisor"]["available"], false);
    assert!(health.body["isolation"]["gvisor"]["reason"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/runsc"));
    let (ct, body) = multipart(
        &[("name", "wants-gvisor"), ("isolation", "gvisor")],
        &[("file", "code.zip", &zip(&[("function.py", KERNEL_PY)]))],
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("gVisor isolation is not available on this server")
            && msg.contains("/nonexistent/runsc"),
        "{msg}"
    );
    assert_eq!(
        get(&s, "/api/functions/", &t).body["count"],
        0,
        "nothing stored"
    );
    let r = deploy(&s, &t, "container-ok", &[("function.py", KERNEL_PY)]);
    assert_eq!(r.status, 201, "{r:?}");
    let c = post_json(&s, "/api/functions/container-ok/invoke", &t, &json!({}));
    assert_eq!(c.body["status"], "succeeded", "{c:?}");
    s.stop();
    s.remove_files();
}

/// Records every compile during its own import of `pkg.mod`.
const AUDITED_PY: &str = "import sys\ncompiled = []\nsys.addaudithook(lambda event, args: compiled.append(args[1]) if event == 'compile' else None)\nimport pkg.mod\ndef handler(event):\n    return {'compiled': compiled, 'value': pkg.mod.VALUE}\n";

fn deploy_compiles() {
    let s = shared();
    let t = s.token("compiles", false);
    for (version, value) in [(1, "1"), (2, "2")] {
        let module = format!("VALUE = {value}\n");
        let r = deploy(
            s,
            &t,
            "compiled",
            &[
                ("function.py", AUDITED_PY),
                ("pkg/__init__.py", ""),
                ("pkg/mod.py", &module),
            ],
        );
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.body["id"].as_str().unwrap();
        // Each version's code directory holds its compiled modules.
        let code = s.dir.join("state/code").join(id).join(version.to_string());
        let cached = |dir: &str| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(code.join(dir))
                .map(|d| {
                    d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        };
        assert_eq!(cached("__pycache__").len(), 1, "{code:?}");
        assert!(cached("__pycache__")[0].starts_with("function."));
        assert_eq!(cached("pkg/__pycache__").len(), 2, "{code:?}");
        // Its sandboxes, warm or fresh (cold, or a stem cell bound now, whichever the pool
        // has), import them without compiling.
        for fresh in [false, true] {
            let r = post_json(s, "/api/functions/compiled/invoke", &t, &json!({}));
            assert_eq!(r.status, 200, "{r:?}");
            let start = r.body["usage"]["start"].as_str().unwrap_or_default();
            if fresh {
                assert!(["cold", "prewarmed"].contains(&start), "{r:?}");
            } else {
                assert_eq!(start, "warm", "{r:?}");
            }
            assert_eq!(r.body["result"]["compiled"], json!([]), "{r:?}");
            assert_eq!(r.body["result"]["value"], version, "{r:?}");
            // Drop the warm sandbox: the second call starts in a fresh one.
            for action in ["deactivate", "activate"] {
                let url = format!("{}/api/functions/{id}/{action}", s.url);
                assert_eq!(request("PUT", &url, Some(&t), None).status, 200);
            }
        }
    }
}

fn warm_pool() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-pool-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(dir.path(), "pool", 0, &["--max-waiting", "0"]);
    let t = s.token("pool", false);
    let slow =
        "import time\ndef handler(event):\n    time.sleep(event.get('s', 0))\n    return 'done'\n";
    let (ct, body) = multipart(
        &[
            ("name", "slow"),
            ("max_instances", "1"),
            ("keep_warm", "60"),
        ],
        &[("file", "code.zip", &zip(&[("function.py", slow)]))],
    );
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy", s.url),
        Some(&t),
        Some((&ct, body)),
    );
    assert_eq!(r.status, 201, "{r:?}");
    // The sandbox that proved the deploy loads serves the first call, warm.
    let first = post_json(&s, "/api/functions/slow/invoke", &t, &json!({}));
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["usage"]["start"], "warm", "{first:?}");
    assert_eq!(first.body["usage"]["cold"], false);
    assert_eq!(first.body["usage"]["init_duration_ms"], 0.0);
    // Once a newer version is deployed, the older one's sandboxes are gone: a call of it
    // takes a stem cell (or starts cold) and says so.
    let r = request(
        "PUT",
        &format!("{}/api/functions/slow", s.url),
        Some(&t),
        Some(("application/json", br#"{"memory": 128}"#.to_vec())),
    );
    assert_eq!(r.body["version"], 2, "{r:?}");
    let older = post_json(&s, "/api/functions/slow@1/invoke", &t, &json!({}));
    assert_eq!(older.status, 200, "{older:?}");
    let start = older.body["usage"]["start"].as_str().unwrap().to_string();
    assert!(start == "prewarmed" || start == "cold", "{older:?}");
    assert_eq!(older.body["usage"]["cold"], true);
    assert!(older.body["usage"]["init_duration_ms"].as_f64().unwrap() > 0.0);

    // One call at a time: a second sync call while one runs gets 429 and Retry-After.
    let url = s.url.clone();
    let t2 = t.clone();
    let running = std::thread::spawn(move || {
        request(
            "POST",
            &format!("{url}/api/functions/slow/invoke"),
            Some(&t2),
            Some(("application/json", br#"{"s": 2}"#.to_vec())),
        )
    });
    std::thread::sleep(Duration::from_millis(700));
    let refused = post_json(&s, "/api/functions/slow/invoke", &t, &json!({}));
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body["error"]["code"], "too_busy");
    let retry = refused
        .headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .map(|(_, v)| v.clone());
    assert_eq!(retry.as_deref(), Some("1"), "{refused:?}");
    assert_eq!(running.join().unwrap().status, 200);
    // An async run waits its turn instead.
    let q = post_json(&s, "/api/functions/slow/run", &t, &json!({}));
    assert_eq!(
        wait_task(
            &s,
            &t,
            q.body["task_id"].as_str().unwrap(),
            Duration::from_secs(30)
        )["status"],
        "succeeded"
    );

    // A caller that hangs up mid-call: the call still ends and is recorded, and its sandbox
    // serves the next call warm (at one instance and no queue, a lost one would refuse it).
    let calls = || get(&s, "/api/functions/slow/metrics", &t).body["invocations"].as_u64();
    let before = calls().unwrap();
    {
        use std::io::Write;
        let addr = s.url.trim_start_matches("http://").to_string();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let body = br#"{"s": 1}"#;
        write!(
            tcp,
            "POST /api/functions/slow/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        tcp.write_all(body).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls() != Some(before + 1) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(calls(), Some(before + 1), "the abandoned call is recorded");
    let next = post_json(&s, "/api/functions/slow/invoke", &t, &json!({}));
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.body["usage"]["start"], "warm", "{next:?}");

    let health = request("GET", &format!("{}/api/system/health", s.url), None, None);
    let pool = &health.body["pool"];
    assert_eq!(pool["warm"], 2, "one sandbox of each version: {health:?}");
    assert!(pool["calls_warm"].as_u64().unwrap() >= 2, "{health:?}");
    assert!(health.body["warm_ratio"].as_f64().unwrap() > 0.0);

    // Deleting the function drains its warm sandbox.
    let r = request(
        "DELETE",
        &format!("{}/api/functions/slow", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200);
    let health = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(health.body["pool"]["warm"], 0, "{health:?}");
    assert!(
        health.body["pool"]["drained"].as_u64().unwrap() >= 1,
        "{health:?}"
    );
    s.stop();
    // Nothing of the server's sandboxes is left: no bundle, no container state.
    let bundles = std::fs::read_dir(dir.path().join("state/bundles"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(bundles, 0, "every sandbox was stopped at shutdown");
    s.remove_files();
}

/// `--max-sandboxes` and `--pool-memory-mb` reach the pool: at either cap, a call of a third
/// function evicts the least recently used idle sandbox, whose function then starts cold.
fn pool_caps() {
    let hello = "def handler(event):\n    return 'hi'\n";
    for (tag, flags, memory) in [
        ("count", ["--max-sandboxes", "2"], 128),
        // 300 MiB holds two 128 MiB sandboxes, not three.
        ("memory", ["--pool-memory-mb", "300"], 128),
    ] {
        let dir = tempfile::Builder::new()
            .prefix("cloudfunc-api-caps-")
            .tempdir()
            .unwrap();
        let mut args = vec!["--stem-cells", "0"];
        args.extend(flags);
        let s = Server::start_in(dir.path(), &format!("caps-{tag}"), 0, &args);
        let t = s.token("caps", false);
        for name in ["a", "b", "c"] {
            let r = request(
                "POST",
                &format!("{}/api/functions/deploy?name={name}&memory={memory}", s.url),
                Some(&t),
                Some(("application/zip", zip(&[("function.py", hello)]))),
            );
            assert_eq!(r.status, 201, "{tag}: {r:?}");
        }
        let start = |name: &str| {
            let r = post_json(&s, &format!("/api/functions/{name}/invoke"), &t, &json!({}));
            assert_eq!(r.status, 200, "{tag}: {r:?}");
            assert_eq!(r.body["result"], "hi");
            r.body["usage"]["start"].as_str().unwrap().to_string()
        };
        let pool = || {
            request("GET", &format!("{}/api/system/health", s.url), None, None).body["pool"].clone()
        };
        // Each deploy keeps the sandbox that loaded its function while there is room, and
        // evicts nothing for it: a and b were kept, c was checked in a sandbox of its own.
        let p = pool();
        assert_eq!(
            (p["sandboxes"].as_u64(), p["evicted"].as_u64()),
            (Some(2), Some(0)),
            "{tag}: {p}"
        );
        assert_eq!(start("b"), "warm", "{tag}");
        assert_eq!(start("a"), "warm", "{tag}");
        // c needs room: b was used least recently, so b goes and a stays warm.
        assert_eq!(start("c"), "cold", "{tag}");
        let p = pool();
        assert_eq!(p["evicted"], 1, "{tag}: {p}");
        assert_eq!(p["sandboxes"], 2, "{tag}: {p}");
        assert_eq!(start("a"), "warm", "{tag}");
        assert_eq!(start("b"), "cold", "{tag}: b was evicted");
        let p = pool();
        assert!(p["sandboxes"].as_u64().unwrap() <= 2, "{tag}: {p}");
        if tag == "memory" {
            assert!(
                p["memory_committed_bytes"].as_u64().unwrap() <= 300 << 20,
                "{tag}: {p}"
            );
        }
        s.stop();
        s.remove_files();
    }
}

/// A sync call's record is written behind its reply: a read right after the reply still
/// finds it, and a graceful stop right after a burst keeps every one.
fn sync_records() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-records-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(dir.path(), "records", 0, &[]);
    let t = s.token("records", false);
    let echo = "def handler(event):\n    return event['n']\n";
    assert_eq!(deploy(&s, &t, "echo", &[("function.py", echo)]).status, 201);
    let call = |s: &Server, n: u64| -> String {
        let r = post_json(s, "/api/functions/echo/invoke", &t, &json!({ "n": n }));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["result"], n);
        r.body["task_id"].as_str().unwrap().to_string()
    };
    std::thread::scope(|scope| {
        for client in 0..4u64 {
            let (s, call, t) = (&s, &call, &t);
            scope.spawn(move || {
                for i in 0..25 {
                    let n = client * 100 + i;
                    let id = call(s, n);
                    let r = get(s, &format!("/api/tasks/{id}"), t);
                    assert_eq!(r.status, 200, "task {id} read right after its reply: {r:?}");
                    assert_eq!(r.body["status"], "succeeded");
                    assert_eq!(r.body["result"], n);
                }
            });
        }
    });
    let m = get(&s, "/api/functions/echo/metrics", &t);
    assert_eq!(m.body["invocations"], 100, "{m:?}");

    // The disk is held up (another process holds the write lock), so the burst's records are
    // all still queued when the stop comes: the server must write them before it exits.
    let blocker = rusqlite::Connection::open(dir.path().join("data/cloudfunc.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let burst: Vec<String> = (0..50).map(|n| call(&s, n)).collect();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        blocker.execute_batch("ROLLBACK").unwrap();
    });
    s.stop();
    release.join().unwrap();
    let s = Server::start_in(dir.path(), "records", 0, &[]);
    let t = s.token("records", false);
    for (n, id) in burst.iter().enumerate() {
        let r = get(&s, &format!("/api/tasks/{id}"), &t);
        assert_eq!(r.status, 200, "task {id} kept through the stop: {r:?}");
        assert_eq!(r.body["result"], n);
    }
    let m = get(&s, "/api/functions/echo/metrics", &t);
    assert_eq!(m.body["invocations"], 150, "{m:?}");
    s.stop();
    s.remove_files();
}

/// Sleeps `s` seconds and returns them.
const SLEEPER: &str = "import time\ndef handler(e):\n    time.sleep(e['s'])\n    return e['s']\n";

/// A server in a fresh directory (returned with it) whose queue has one worker, so that a
/// sleeping task keeps the ones behind it queued.
fn one_queue_worker(tag: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("cloudfunc-api-{tag}-"))
        .tempdir()
        .unwrap();
    let s = Server::start_in(dir.path(), tag, 0, &["--workers", "1"]);
    (dir, s)
}

/// A task still queued when its function is deactivated or deleted ends failed, unrun, with
/// kind `function_unavailable`; the worker goes on to the next one. One queue worker, held
/// by a sleeping task, keeps the two tasks queued meanwhile.
fn queued_after_a_change() {
    let (_dir, s) = one_queue_worker("queued");
    let t = s.token("queuer", false);
    let marker = "def handler(e):\n    return 'ran'\n";
    for (name, code) in [
        ("sleeper", SLEEPER),
        ("turned_off", marker),
        ("gone", marker),
    ] {
        let r = deploy(&s, &t, name, &[("function.py", code)]);
        assert_eq!(r.status, 201, "{r:?}");
    }
    let run = |name: &str, body: serde_json::Value| -> String {
        let r = post_json(&s, &format!("/api/functions/{name}/run"), &t, &body);
        assert_eq!(r.status, 202, "{r:?}");
        r.body["task_id"].as_str().unwrap().to_string()
    };
    let sleeping = run("sleeper", json!({"s": 2}));
    wait_running(&s, &t, &sleeping, Duration::from_secs(20));
    let off = run("turned_off", json!({}));
    let gone = run("gone", json!({}));
    let r = request(
        "PUT",
        &format!("{}/api/functions/turned_off/deactivate", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = request(
        "DELETE",
        &format!("{}/api/functions/gone", s.url),
        Some(&t),
        None,
    );
    assert!(r.status == 200 || r.status == 204, "{r:?}");
    // Both were still queued behind the sleeper.
    assert_eq!(
        get(&s, &format!("/api/tasks/{off}"), &t).body["status"],
        "queued"
    );

    assert_eq!(
        wait_task(&s, &t, &sleeping, Duration::from_secs(30))["result"],
        2
    );
    for (task, why) in [(&off, "deactivated"), (&gone, "deleted")] {
        let done = wait_task(&s, &t, task, Duration::from_secs(30));
        assert_eq!(done["status"], "failed", "{done}");
        assert_eq!(done["error"]["kind"], "function_unavailable", "{done}");
        assert!(
            done["error"]["message"].as_str().unwrap().contains(why),
            "{done}"
        );
        assert!(done["result"].is_null(), "it ran: {done}");
    }
    // The worker goes on: the same function, active again, runs its next task.
    let r = request(
        "PUT",
        &format!("{}/api/functions/turned_off/activate", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let again = run("turned_off", json!({}));
    assert_eq!(
        wait_task(&s, &t, &again, Duration::from_secs(30))["result"],
        "ran"
    );
    s.stop();
    s.remove_files();
}

/// Deploys `SLEEPER` as `sleeper`, one instance at a time, so that a sleeping task keeps
/// the ones behind it waiting.
fn deploy_sleeper(s: &Server, token: &str) {
    let r = request(
        "POST",
        &format!(
            "{}/api/functions/deploy?name=sleeper&max_instances=1",
            s.url
        ),
        Some(token),
        Some(("application/zip", zip(&[("function.py", SLEEPER)]))),
    );
    assert_eq!(r.status, 201, "{r:?}");
}

/// SIGTERM while queue workers hold tasks: the task running finishes and is stored; the
/// tasks claimed behind it, waiting for the function's one instance, go back to the queue
/// unstarted (their claim uncounted) and run after a restart; the task no worker claimed
/// stays queued; and no cgroup of the server is left.
fn graceful_stop() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-grace-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(dir.path(), "grace", 0, &["--workers", "3"]);
    let t = s.token("stopper", false);
    deploy_sleeper(&s, &t);
    let run = |s: &Server, seconds: f64| -> String {
        let r = post_json(s, "/api/functions/sleeper/run", &t, &json!({"s": seconds}));
        assert_eq!(r.status, 202, "{r:?}");
        r.body["task_id"].as_str().unwrap().to_string()
    };
    let running = run(&s, 1.5);
    wait_health(
        &s,
        "the first task in its sandbox",
        Duration::from_secs(20),
        |h| h["sandboxes_running"] == 1,
    );
    let claimed: Vec<String> = (0..2).map(|_| run(&s, 0.0)).collect();
    wait_health(
        &s,
        "two tasks waiting for the instance",
        Duration::from_secs(20),
        |h| h["pool"]["waiting"] == 2,
    );
    let queued = run(&s, 0.0);
    s.stop();
    let left = s.cgroup_parents_left();
    assert!(left.is_empty(), "left behind: {left:?}");

    let restarted = cloudfunc_server::model::now_ms();
    let s = Server::start_in(dir.path(), "grace", 0, &["--workers", "1"]);
    let done = get(&s, &format!("/api/tasks/{running}"), &t).body;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], 1.5);
    for id in claimed.iter().chain([&queued]) {
        let later = wait_task(&s, &t, id, Duration::from_secs(30));
        assert_eq!(later["status"], "succeeded", "{later}");
        assert_eq!(later["attempts"], 1, "run once, after the restart: {later}");
        let started = later["started_at"].as_i64().unwrap();
        assert!(started >= restarted, "it ran after the restart: {later}");
    }
    s.stop();
    assert!(s.cgroup_parents_left().is_empty());
    s.remove_files();
}

/// The queue holds no more claimed payloads than `--queue-memory-mb` allows (past one
/// task's): with 8 slots free and the function's one instance busy, tasks of 400 KB each are
/// claimed only while they fit in 1 MiB, the rest stay queued, and all of them run in the
/// end.
fn queue_memory() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-qmem-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(
        dir.path(),
        "qmem",
        0,
        &["--workers", "8", "--queue-memory-mb", "1"],
    );
    let t = s.token("hoarder", false);
    deploy_sleeper(&s, &t);
    let run = |payload: &Value| -> String {
        let r = post_json(&s, "/api/functions/sleeper/run", &t, payload);
        assert_eq!(r.status, 202, "{r:?}");
        r.body["task_id"].as_str().unwrap().to_string()
    };
    let long = run(&json!({"s": 4.0}));
    wait_health(
        &s,
        "the first task in its sandbox",
        Duration::from_secs(20),
        |h| h["sandboxes_running"] == 1,
    );
    let pad = "x".repeat(400_000);
    let big: Vec<String> = (0..6)
        .map(|_| run(&json!({"s": 0.0, "pad": pad})))
        .collect();
    // Two fit in 1 MiB; a third is taken as the first of the next claim (what was left was
    // not nothing); then nothing is left and the rest stay queued.
    wait_health(
        &s,
        "three large tasks claimed, waiting for the instance",
        Duration::from_secs(20),
        |h| h["pool"]["waiting"] == 3 && h["queue_depth"] == 3,
    );
    std::thread::sleep(Duration::from_millis(1_000));
    let health = request("GET", &format!("{}/api/system/health", s.url), None, None).body;
    assert_eq!(
        (&health["pool"]["waiting"], &health["queue_depth"]),
        (&json!(3), &json!(3)),
        "no more claimed while the budget is spent: {health}"
    );
    for id in big.iter().chain([&long]) {
        let done = wait_task(&s, &t, id, Duration::from_secs(60));
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    s.stop();
    s.remove_files();
}

/// A SIGTERM that comes while the server is still starting stops it gracefully once it
/// serves (exit status 0, its engines' tmpfs unmounted), instead of killing it mid-start.
fn sigterm_while_starting() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-api-early-")
        .tempdir()
        .unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", "127.0.0.1:0", "--cgroup-parent"])
        .arg(format!("cf-api-early-{}", std::process::id()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // The engine's lock file appears once `serve` has begun, well before it listens.
    let lock = dir.path().join("state").join("engine.lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not stop within a minute of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
    assert!(status.success(), "{status:?}; its log:\n{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = dir.path().canonicalize().unwrap();
    let left: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|point| std::path::Path::new(point).starts_with(&root))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
}
