//! Encryption at rest, end to end on a real server: plaintext canaries (payload, result,
//! error, log line, env value, secret, code, a chain's input) are found nowhere under the
//! data directory, WAL included, nor the secret in the server's log; a flipped byte in a
//! stored record is reported for that record; the master key rotates and the records move
//! to new data keys, and a restart serves the old data; a wrong or missing key stops the
//! start; secrets reach functions, changes apply at once (to calls waiting for a sandbox too),
//! and an unset one is named.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{deploy, get, post_json, request, wait_health, wait_running, wait_task, Server, BIN};
use serde_json::{json, Value};

/// A string found nowhere else.
fn canary(kind: &str) -> String {
    format!("{kind}-canary-{:016x}", rand::random::<u64>())
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The files under `dir` (every one, recursively) that hold `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

fn set_secret(s: &Server, tenant: &str, name: &str, value: &str) {
    let mut child = s
        .cli(tenant)
        .args(["secrets", "set", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A function that logs, fails on request, and reports hashes of its env value and secret.
fn vault_code(code_canary: &str, env_value: &str) -> (String, String) {
    let main = format!(
        "# {code_canary}\nimport hashlib, os\n\ndef h(s):\n    return hashlib.sha256(s.encode()).hexdigest()\n\n\
def handler(event):\n    print('log ' + event.get('log', ''))\n    if event.get('fail'):\n        raise ValueError('boom ' + event['fail'])\n    \
return {{'echo': event.get('echo'), 'env': h(os.environ.get('PLAIN_ENV', '')), 'secret': h(os.environ.get('API_KEY', ''))}}\n"
    );
    let manifest =
        format!("name = \"vault\"\nsecrets = [\"API_KEY\"]\n[env]\nPLAIN_ENV = \"{env_value}\"\n");
    (main, manifest)
}

fn canaries_are_nowhere_in_plaintext() {
    let s = Server::start("atrest-canary");
    let t = s.token("alice", false);
    let [code, env, secret, payload, result, log, error, chain_input, queued] = [
        "code", "env", "secret", "payload", "result", "log", "error", "chain", "queued",
    ]
    .map(canary);
    set_secret(&s, "alice", "API_KEY", &secret);
    let (main, manifest) = vault_code(&code, &env);
    let r = deploy(
        &s,
        &t,
        "vault",
        &[("main.py", &main), ("cloudfunc.toml", &manifest)],
    );
    assert_eq!(r.status, 201, "{r:?}");
    // The settings show the secret's name, never its value; the env value is the tenant's own.
    let shown = get(&s, "/api/functions/vault", &t);
    assert!(shown.body.to_string().contains("API_KEY"), "{shown:?}");
    assert!(!shown.body.to_string().contains(&secret));

    let r = post_json(
        &s,
        "/api/functions/vault/invoke",
        &t,
        &json!({"echo": result, "log": log, "p": payload}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["result"]["echo"], json!(result));
    assert_eq!(r.body["result"]["env"], json!(sha256(&env)));
    assert_eq!(
        r.body["result"]["secret"],
        json!(sha256(&secret)),
        "the secret reached the function"
    );
    let r = post_json(
        &s,
        "/api/functions/vault/invoke",
        &t,
        &json!({"fail": error}),
    );
    assert!(r.body.to_string().contains(&error), "{r:?}");
    let r = post_json(&s, "/api/functions/vault/run", &t, &json!({"echo": queued}));
    assert_eq!(r.status, 202, "{r:?}");
    let done = wait_task(
        &s,
        &t,
        r.body["task_id"].as_str().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(done["result"]["echo"], json!(queued), "{done}");
    let r = post_json(
        &s,
        "/api/chains",
        &t,
        &json!({"name": "c", "steps": ["vault"]}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = post_json(
        &s,
        "/api/chains/c/invoke",
        &t,
        &json!({"echo": chain_input}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    // Listed by name only.
    let listed = get(&s, "/api/secrets", &t);
    assert_eq!(listed.body["secrets"][0]["name"], "API_KEY", "{listed:?}");
    assert!(!listed.body.to_string().contains(&secret));

    // While the server runs (the WAL holds the latest writes) and after it stops.
    let data = s.dir.join("data");
    let all = [
        ("code", &code),
        ("env", &env),
        ("secret", &secret),
        ("payload", &payload),
        ("result", &result),
        ("log", &log),
        ("error", &error),
        ("chain input", &chain_input),
        ("queued payload", &queued),
    ];
    let wal = data.join("cloudfunc.db-wal");
    assert!(
        wal.exists() && std::fs::metadata(&wal).unwrap().len() > 0,
        "the WAL is scanned too"
    );
    for (what, c) in all {
        assert_eq!(
            files_holding(&data, c),
            Vec::<String>::new(),
            "the {what} canary in plaintext"
        );
    }
    let server_log = std::fs::read_to_string(s.dir.join("server.log")).unwrap();
    assert!(
        !server_log.contains(&secret),
        "the secret is in the server's log"
    );
    s.stop();
    for (what, c) in all {
        assert_eq!(
            files_holding(&data, c),
            Vec::<String>::new(),
            "the {what} canary in plaintext after the stop"
        );
    }
    // The code, extracted for the sandboxes, is under the state directory only; removed (as a
    // reboot empties /run), it is rebuilt from the sealed archive at the next start.
    let state_code = s.dir.join("state").join("code");
    assert!(!files_holding(&state_code, &code).is_empty());
    std::fs::remove_dir_all(&state_code).unwrap();
    let s2 = Server::start_in(&s.dir, "atrest-canary", 0, &[]);
    let r = post_json(
        &s2,
        "/api/functions/vault/invoke",
        &t,
        &json!({"echo": "again"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["result"]["secret"], json!(sha256(&secret)));
    s2.stop();
    s2.remove_files();
}

/// Flips one byte inside the stored payload of `task`, with the server stopped.
fn flip_payload(db: &Path, task: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut blob: Vec<u8> = conn
        .query_row("SELECT payload FROM tasks WHERE id = ?1", [task], |r| {
            r.get(0)
        })
        .unwrap();
    let i = blob.len() - 20;
    blob[i] ^= 0x01;
    conn.execute(
        "UPDATE tasks SET payload = ?2 WHERE id = ?1",
        rusqlite::params![task, blob],
    )
    .unwrap();
}

fn a_tampered_record_is_reported_for_that_record() {
    let s = Server::start("atrest-tamper");
    let t = s.token("bob", false);
    assert_eq!(
        deploy(&s, &t, "hello", &[("main.py", common::HELLO_PY)]).status,
        201
    );
    let ids: Vec<String> = (0..2)
        .map(|i| {
            let r = post_json(
                &s,
                "/api/functions/hello/run",
                &t,
                &json!({"name": format!("n{i}")}),
            );
            let id = r.body["task_id"].as_str().unwrap().to_string();
            wait_task(&s, &t, &id, Duration::from_secs(60));
            id
        })
        .collect();
    s.stop();
    flip_payload(&s.dir.join("data").join("cloudfunc.db"), &ids[0]);
    let s = Server::start_in(&s.dir, "atrest-tamper", 0, &[]);
    let r = get(&s, &format!("/api/tasks/{}", ids[0]), &t);
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.body["error"]["code"], "record_damaged", "{r:?}");
    let msg = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&ids[0]) && msg.contains("payload") && msg.contains("integrity"),
        "{msg}"
    );
    // The other record, and the function, are unaffected.
    let r = get(&s, &format!("/api/tasks/{}", ids[1]), &t);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["payload"]["name"], "n1");
    assert_eq!(
        post_json(&s, "/api/functions/hello/invoke", &t, &json!({})).status,
        200
    );
    s.stop();
    s.remove_files();
}

fn cli_json(s: &Server, args: &[&str]) -> Value {
    let out = s.cli("admin").arg("--json").args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn keys_rotate_and_records_move_to_new_data_keys() {
    let s = Server::start("atrest-rotate");
    let t = s.token("carol", false);
    assert_eq!(
        deploy(&s, &t, "hello", &[("main.py", common::HELLO_PY)]).status,
        201
    );
    let r = post_json(
        &s,
        "/api/functions/hello/run",
        &t,
        &json!({"name": "before"}),
    );
    let task = r.body["task_id"].as_str().unwrap().to_string();
    wait_task(&s, &t, &task, Duration::from_secs(60));
    let key_file = s.dir.join("data").join("master.key");
    let before = std::fs::read_to_string(&key_file).unwrap();
    let status = cli_json(&s, &["keys", "status"]);
    let master = status["master_key"].as_str().unwrap().to_string();
    let old_key = status["data_keys"][0]["id"].clone();
    assert_eq!(status["data_keys"][0]["tenant"], "carol", "{status}");

    // A tenant cannot touch the keys.
    let r = post_json(&s, "/api/system/keys/rotate", &t, &json!({}));
    assert_eq!(r.status, 403, "{r:?}");

    let rotated = cli_json(&s, &["keys", "rotate"]);
    assert_ne!(rotated["master_key"], json!(master), "{rotated}");
    assert_eq!(
        rotated["data_keys"][0]["id"], old_key,
        "the data key is the same, rewrapped"
    );
    assert_eq!(rotated["data_keys"][0]["master"], rotated["master_key"]);
    let after = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(before, after);
    assert_eq!(
        after.lines().filter(|l| l.starts_with("cfk1:")).count(),
        1,
        "the old key is gone"
    );
    s.stop();

    // The old data under the new master key, after a restart.
    let s = Server::start_in(&s.dir, "atrest-rotate", 0, &[]);
    assert_eq!(
        get(&s, &format!("/api/tasks/{task}"), &t).body["payload"]["name"],
        "before"
    );
    let done = cli_json(&s, &["keys", "reencrypt", "--tenant", "carol"]);
    assert!(done["records"].as_u64().unwrap() >= 3, "{done}");
    assert_eq!(done["retired_keys_removed"], 1, "{done}");
    let status = cli_json(&s, &["keys", "status"]);
    assert_eq!(status["data_keys"].as_array().unwrap().len(), 1, "{status}");
    assert_ne!(status["data_keys"][0]["id"], old_key);
    assert_eq!(
        get(&s, &format!("/api/tasks/{task}"), &t).body["payload"]["name"],
        "before"
    );
    assert_eq!(
        post_json(&s, "/api/functions/hello/invoke", &t, &json!({"name": "x"})).body["result"],
        "Hello x!"
    );
    s.stop();
    let s = Server::start_in(&s.dir, "atrest-rotate", 0, &[]);
    assert_eq!(
        get(&s, &format!("/api/tasks/{task}"), &t).body["payload"]["name"],
        "before"
    );
    s.stop();
    s.remove_files();
}

/// Starts a server on `dir` that must fail; returns what it said.
fn failed_start(dir: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--images-dir")
        .arg(dir.join("images"))
        .args(["--cgroup-parent", "cf-atrest-fail"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "it started: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
}

fn a_wrong_or_missing_key_stops_the_start() {
    let s = Server::start("atrest-wrong");
    let t = s.token("dave", false);
    assert_eq!(
        deploy(&s, &t, "hello", &[("main.py", common::HELLO_PY)]).status,
        201
    );
    s.stop();
    let key_file = s.dir.join("data").join("master.key");
    let good = std::fs::read(&key_file).unwrap();

    // Another key: a clear error, not garbage.
    let other = cloudfunc_server::atrest::MasterKey::generate().encode();
    std::fs::write(&key_file, format!("{other}\n")).unwrap();
    let said = failed_start(&s.dir, &[]);
    assert!(said.contains("wrong key file"), "{said}");
    // No key: refused, and no new key made in its place.
    std::fs::remove_file(&key_file).unwrap();
    let said = failed_start(&s.dir, &[]);
    assert!(
        said.contains("does not exist") && said.contains("master.key"),
        "{said}"
    );
    assert!(!key_file.exists());
    // A malformed key in the variable.
    let said = failed_start(&s.dir, &[("CLOUDFUNC_MASTER_KEY", "not-a-key")]);
    assert!(said.contains("not a master key"), "{said}");
    // The right key, given (as the variable would give it), serves the data.
    let line = String::from_utf8(good).unwrap();
    let key = line
        .lines()
        .find(|l| l.starts_with("cfk1:"))
        .unwrap()
        .to_string();
    let s = Server::start_in(&s.dir, "atrest-wrong", 0, &["--master-key", &key]);
    assert_eq!(
        post_json(&s, "/api/functions/hello/invoke", &t, &json!({})).status,
        200
    );
    s.stop();
    s.remove_files();
}

fn secrets_reach_functions_and_changes_apply() {
    let s = Server::start("atrest-secrets");
    let t = s.token("erin", false);
    let code = "import os\n\ndef handler(event):\n    return os.environ.get('TOKEN', 'unset')\n";
    let manifest = "name = \"sec\"\nsecrets = [\"TOKEN\"]\n";
    // Named but not set: refused at deploy, saying what to do.
    let r = deploy(
        &s,
        &t,
        "sec",
        &[("main.py", code), ("cloudfunc.toml", manifest)],
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("secrets set TOKEN"),
        "{r:?}"
    );
    set_secret(&s, "erin", "TOKEN", "one");
    assert_eq!(
        deploy(
            &s,
            &t,
            "sec",
            &[("main.py", code), ("cloudfunc.toml", manifest)]
        )
        .status,
        201
    );
    let call = || post_json(&s, "/api/functions/sec/invoke", &t, &json!({}));
    assert_eq!(call().body["result"], "one");
    // A new value applies to the next call (the warm sandbox with the old one is drained).
    set_secret(&s, "erin", "TOKEN", "two");
    assert_eq!(call().body["result"], "two");
    // Another tenant's secret of the same name is not seen, nor listed.
    set_secret(&s, "frank", "TOKEN", "franks");
    assert_eq!(call().body["result"], "two");
    let other = s.token("frank", false);
    let listed = get(&s, "/api/secrets", &other);
    assert_eq!(listed.body["secrets"].as_array().unwrap().len(), 1);
    // Bad names and values are refused with what to fix.
    for (name, body, want) in [
        ("1BAD", json!({"value": "x"}), "must be [A-Za-z_]"),
        ("OK", json!({"wrong": "x"}), "value"),
        ("OK", json!({"value": "a\u{0}b"}), "NUL"),
    ] {
        let r = request(
            "PUT",
            &format!("{}/api/secrets/{name}", s.url),
            Some(&t),
            Some(("application/json", serde_json::to_vec(&body).unwrap())),
        );
        assert_eq!(r.status, 400, "{name} {body}: {r:?}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(want),
            "{r:?}"
        );
    }
    // Deleted: the function's calls say which secret is missing.
    let out = s
        .cli("erin")
        .args(["secrets", "delete", "TOKEN"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let r = call();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("secret TOKEN"),
        "{r:?}"
    );
    let r = request(
        "DELETE",
        &format!("{}/api/secrets/TOKEN", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 404);
    s.stop();
    s.remove_files();
}

/// Tasks claimed while the function's one instance is busy wait for it; a secret deleted
/// meanwhile reaches none of them (they once started a sandbox with the value they had
/// looked up), and they end saying which secret is missing; a function deleted meanwhile
/// runs none of them.
fn a_deleted_secret_reaches_no_call_that_waited() {
    let s = Server::start("atrest-revoked");
    let t = s.token("gina", false);
    set_secret(&s, "gina", "TOKEN", "revoked");
    let code = "import os, time\n\ndef handler(event):\n    time.sleep(1)\n    return os.environ.get('TOKEN', 'unset')\n";
    let manifest = "secrets = [\"TOKEN\"]\nmax_instances = 1\n";
    let r = deploy(
        &s,
        &t,
        "held",
        &[("main.py", code), ("cloudfunc.toml", manifest)],
    );
    assert_eq!(r.status, 201, "{r:?}");
    // Three tasks: one runs, two wait for the one instance.
    let three_queued = || -> Vec<String> {
        let tasks = (0..3)
            .map(|_| {
                let r = post_json(&s, "/api/functions/held/run", &t, &json!({}));
                assert_eq!(r.status, 202, "{r:?}");
                r.body["task_id"].as_str().unwrap().to_string()
            })
            .collect();
        wait_health(
            &s,
            "one call running, two waiting",
            Duration::from_secs(30),
            |h| h["sandboxes_running"] == 1 && h["pool"]["waiting"] == 2,
        );
        tasks
    };
    let delete = |path: &str| {
        let r = request("DELETE", &format!("{}{path}", s.url), Some(&t), None);
        assert_eq!(r.status, 200, "{path}: {r:?}");
    };
    let tasks = three_queued();
    delete("/api/secrets/TOKEN");
    let ended: Vec<Value> = tasks
        .iter()
        .map(|id| wait_task(&s, &t, id, Duration::from_secs(30)))
        .collect();
    // The call under way had the value when it started.
    assert_eq!(ended[0]["result"], "revoked", "{}", ended[0]);
    for task in &ended[1..] {
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["error"]["kind"], "function_unavailable", "{task}");
        let why = task["error"]["message"].as_str().unwrap();
        assert!(why.contains("secret TOKEN"), "{why}");
    }
    // So for a function deleted while its tasks waited: they do not run.
    set_secret(&s, "gina", "TOKEN", "again");
    let tasks = three_queued();
    delete("/api/functions/held");
    for id in &tasks[1..] {
        let task = wait_task(&s, &t, id, Duration::from_secs(30));
        assert_eq!(task["error"]["kind"], "function_unavailable", "{task}");
        let why = task["error"]["message"].as_str().unwrap();
        assert!(why.contains("deleted"), "{why}");
    }
    s.stop();
    s.remove_files();
}

/// A task still queued when its function's secret is deleted is claimed later: it ends
/// saying which secret is missing, as a sync call does, rather than run without it.
fn a_task_claimed_after_its_secret_went_does_not_run() {
    // One queue worker: while the first task runs, the second stays in the queue.
    let s = Server::start_with("atrest-queued", &["--workers", "1"]);
    let t = s.token("hana", false);
    set_secret(&s, "hana", "TOKEN", "revoked");
    let code = "import os, time\n\ndef handler(event):\n    time.sleep(1)\n    return os.environ.get('TOKEN', 'unset')\n";
    let r = deploy(
        &s,
        &t,
        "queued",
        &[
            ("main.py", code),
            ("cloudfunc.toml", "secrets = [\"TOKEN\"]\n"),
        ],
    );
    assert_eq!(r.status, 201, "{r:?}");
    let tasks: Vec<String> = (0..2)
        .map(|_| {
            let r = post_json(&s, "/api/functions/queued/run", &t, &json!({}));
            assert_eq!(r.status, 202, "{r:?}");
            r.body["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    wait_running(&s, &t, &tasks[0], Duration::from_secs(30));
    let queued = get(&s, &format!("/api/tasks/{}", tasks[1]), &t).body;
    assert_eq!(queued["status"], "queued", "{queued}");
    let r = request(
        "DELETE",
        &format!("{}/api/secrets/TOKEN", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let first = wait_task(&s, &t, &tasks[0], Duration::from_secs(30));
    assert_eq!(first["result"], "revoked", "{first}");
    let second = wait_task(&s, &t, &tasks[1], Duration::from_secs(30));
    assert_eq!(second["status"], "failed", "{second}");
    assert_eq!(second["error"]["kind"], "function_unavailable", "{second}");
    let why = second["error"]["message"].as_str().unwrap();
    assert!(why.contains("secret TOKEN"), "{why}");
    s.stop();
    s.remove_files();
}

/// A data directory from before archives: its code tree in the data directory, no archive.
fn code_from_before_archives_is_archived_and_moved() {
    let s = Server::start("atrest-legacy");
    let t = s.token("gina", false);
    assert_eq!(
        deploy(&s, &t, "hello", &[("main.py", common::HELLO_PY)]).status,
        201
    );
    s.stop();
    let (data, state) = (s.dir.join("data"), s.dir.join("state"));
    let db = data.join("cloudfunc.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (id, dir): (String, String) = conn
        .query_row("SELECT function_id, code_dir FROM versions", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert!(dir.starts_with(state.to_str().unwrap()), "{dir}");
    let old = data.join("code").join(&id).join("1");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::rename(&dir, &old).unwrap();
    conn.execute("DELETE FROM code_archives", []).unwrap();
    conn.execute("UPDATE versions SET code_dir = ?1", [old.to_str().unwrap()])
        .unwrap();
    drop(conn);

    let s = Server::start_in(&s.dir, "atrest-legacy", 0, &[]);
    let r = post_json(
        &s,
        "/api/functions/hello/invoke",
        &t,
        &json!({"name": "old"}),
    );
    assert_eq!(r.body["result"], "Hello old!", "{r:?}");
    assert!(!old.exists(), "the plaintext tree left the data directory");
    assert!(state
        .join("code")
        .join(&id)
        .join("1")
        .join("main.py")
        .exists());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let archived: i64 = conn
        .query_row("SELECT COUNT(*) FROM code_archives", [], |r| r.get(0))
        .unwrap();
    assert_eq!(archived, 1);
    drop(conn);
    s.stop();
    s.remove_files();
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![
        (
            "canaries_are_nowhere_in_plaintext",
            canaries_are_nowhere_in_plaintext,
        ),
        (
            "a_tampered_record_is_reported_for_that_record",
            a_tampered_record_is_reported_for_that_record,
        ),
        (
            "keys_rotate_and_records_move_to_new_data_keys",
            keys_rotate_and_records_move_to_new_data_keys,
        ),
        (
            "a_wrong_or_missing_key_stops_the_start",
            a_wrong_or_missing_key_stops_the_start,
        ),
        (
            "secrets_reach_functions_and_changes_apply",
            secrets_reach_functions_and_changes_apply,
        ),
        (
            "a_deleted_secret_reaches_no_call_that_waited",
            a_deleted_secret_reaches_no_call_that_waited,
        ),
        (
            "a_task_claimed_after_its_secret_went_does_not_run",
            a_task_claimed_after_its_secret_went_does_not_run,
        ),
        (
            "code_from_before_archives_is_archived_and_moved",
            code_from_before_archives_is_archived_and_moved,
        ),
    ];
    common::run_tests(
        "encryption-at-rest tests",
        tests,
        common::sandboxes_missing(),
    );
}
