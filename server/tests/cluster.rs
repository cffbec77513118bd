//! Three `cloudfunc serve` nodes on one machine sharing one PostgreSQL database (a cluster the
//! test starts and removes): each with its own port, data and state directories, the same
//! JWT secret and master key. What one node changes the others see at once; async tasks
//! submitted to all three run exactly once between them; a node killed in the middle of a
//! backlog loses nothing: what it was running ends `interrupted` once its lease lapses, and
//! the others drain the rest. A database outage is a 503 the node recovers from.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::*;
use libtest_mimic::Arguments;
use serde_json::{json, Value};

/// A node's lease: short, so a dead node's tasks are ended within the test.
const LEASE_S: &str = "2";

/// The nodes of one test: each in a directory of its own under `root`.
struct Nodes {
    tag: String,
    /// The master key every node is given, as `cloudfunc keys generate` made it.
    master_key: String,
    root: PathBuf,
    url: String,
    nodes: Vec<Server>,
}

impl Nodes {
    /// Starts `n` nodes on a fresh database with one generated master key; the first makes
    /// the JWT secret, the others are given copies (as a deployment hands them out).
    fn start(pg: &Postgres, tag: &str, n: usize, extra: &[&str]) -> Nodes {
        let root = std::env::temp_dir().join(format!(
            "cloudfunc-cluster-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let url = pg.database();
        let generated = std::process::Command::new(BIN)
            .args(["keys", "generate"])
            .output()
            .unwrap();
        assert!(generated.status.success());
        let master_key = String::from_utf8(generated.stdout)
            .unwrap()
            .trim()
            .to_string();
        assert!(master_key.starts_with("cfk1:"), "{master_key}");
        let mut nodes = Nodes {
            master_key,
            tag: tag.to_string(),
            root,
            url,
            nodes: Vec::new(),
        };
        for _ in 0..n {
            nodes.add(extra);
        }
        nodes
    }

    /// Starts one more node.
    fn add(&mut self, extra: &[&str]) {
        let i = self.nodes.len();
        let dir = self.dir(i);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        if i > 0 {
            std::fs::copy(
                self.dir(0).join("data/jwt.secret"),
                dir.join("data/jwt.secret"),
            )
            .unwrap();
        }
        let server = self.launch(i, extra);
        self.nodes.push(server);
    }

    fn dir(&self, i: usize) -> PathBuf {
        self.root.join(format!("node{i}"))
    }

    fn launch(&self, i: usize, extra: &[&str]) -> Server {
        let id = format!("node{i}");
        let mut args = vec![
            "--database",
            &self.url,
            "--node-id",
            &id,
            "--node-lease-s",
            LEASE_S,
            "--master-key",
            &self.master_key,
        ];
        args.extend_from_slice(extra);
        // Each node's sandboxes under a cgroup parent of its own.
        Server::start_in(&self.dir(i), &format!("{}{i}", self.tag), 0, &args)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for s in &self.nodes {
            s.stop();
            s.remove_files();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const V1: &str = "def handler(e):\n    return 'v1'\n";
const V2: &str = "def handler(e):\n    return 'v2'\n";

fn invoke(s: &Server, token: &str, name: &str) -> Reply {
    post_json(
        s,
        &format!("/api/functions/{name}/invoke"),
        token,
        &json!({}),
    )
}

fn changes_on_one_node_are_seen_by_the_others(pg: &Postgres) {
    let cluster = Nodes::start(pg, "coherence", 3, &[]);
    let [a, b, c] = &cluster.nodes[..] else {
        unreachable!()
    };
    let t = a.token("team", false);
    assert_eq!(deploy(a, &t, "hello", &[("function.py", V1)]).status, 201);
    // Deployed through A, run through B and C: each node fetches the code from the store.
    for s in [b, c] {
        let r = invoke(s, &t, "hello");
        assert_eq!(
            (r.status, &r.body["result"]),
            (200, &json!("v1")),
            "{}",
            r.body
        );
    }
    let fid = invoke(b, &t, "hello").body["function_id"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| {
            get(b, "/api/functions/hello", &t).body["id"]
                .as_str()
                .unwrap()
                .to_string()
        });
    assert!(
        cluster
            .dir(1)
            .join("state/code")
            .join(&fid)
            .join("1")
            .is_dir(),
        "B runs its own copy of the code"
    );
    // A new version deployed on A: B's very next call runs it (B held v1, warm).
    assert_eq!(deploy(a, &t, "hello", &[("function.py", V2)]).status, 201);
    let r = invoke(b, &t, "hello");
    assert_eq!(r.body["result"], "v2", "{}", r.body);
    // Deactivated on C: refused on A at once; activated again, served again.
    let r = post_json(c, "/api/functions/hello/deactivate", &t, &json!({}));
    assert!(r.status < 300, "{}", r.body);
    let r = invoke(a, &t, "hello");
    assert!(
        r.status >= 400,
        "a deactivated function ran on another node: {}",
        r.body
    );
    let r = post_json(c, "/api/functions/hello/activate", &t, &json!({}));
    assert!(r.status < 300, "{}", r.body);
    assert_eq!(invoke(a, &t, "hello").body["result"], "v2");
    // A secret set on A reaches B's calls; changed on C, B's next call (its sandbox warm
    // with the old value) has the new one; deleted on A, B refuses to run without it.
    let set = |s: &Server, value: &str| {
        let r = request(
            "PUT",
            &format!("{}/api/secrets/TOKEN", s.url),
            Some(&t),
            Some((
                "application/json",
                json!({ "value": value }).to_string().into_bytes(),
            )),
        );
        assert_eq!(r.status, 200, "{r:?}");
    };
    set(a, "one");
    let uses = "import os\ndef handler(e):\n    return os.environ['TOKEN']\n";
    let r = deploy(
        a,
        &t,
        "uses",
        &[
            ("function.py", uses),
            ("cloudfunc.toml", "secrets = [\"TOKEN\"]\n"),
        ],
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(invoke(b, &t, "uses").body["result"], "one");
    set(c, "two");
    assert_eq!(invoke(b, &t, "uses").body["result"], "two");
    let r = request(
        "DELETE",
        &format!("{}/api/secrets/TOKEN", a.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = invoke(b, &t, "uses");
    assert_eq!(r.status, 400, "{}", r.body);
    let why = r.body["error"]["message"].as_str().unwrap();
    assert!(why.contains("secret TOKEN"), "{why}");
    // A chain deployed on A runs on C.
    let r = post_json(
        a,
        "/api/chains",
        &t,
        &json!({"name": "twice", "steps": ["hello", "hello"]}),
    );
    assert!(r.status < 300, "{r:?}");
    let r = post_json(c, "/api/chains/twice/invoke", &t, &json!({}));
    assert_eq!(r.body["status"], "succeeded", "{}", r.body);
    assert_eq!(r.body["output"], "v2", "{}", r.body);
    // Every node sees the three.
    let admin = a.token("ops", true);
    let health = get(b, "/api/system/health", &admin).body;
    let nodes: Vec<(&str, bool)> = health["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n["alive"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        nodes,
        [("node0", true), ("node1", true), ("node2", true)],
        "{health}"
    );
    assert_eq!(health["cluster"]["node"], "node1");
}

const SLEEPER: &str = "import time\ndef handler(e):\n    time.sleep(e['s'])\n    return e['n']\n";

/// The task ids each node's log says it ran.
fn ran(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("server.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "invocation")
        .filter_map(|v| v["task_id"].as_str().map(String::from))
        .collect()
}

fn tasks_run_once_and_a_killed_node_loses_none(pg: &Postgres) {
    let mut cluster = Nodes::start(pg, "backlog", 3, &["--workers", "2"]);
    let t = cluster.nodes[0].token("team", false);
    assert_eq!(
        deploy(
            &cluster.nodes[0],
            &t,
            "sleeper",
            &[("function.py", SLEEPER)]
        )
        .status,
        201
    );
    // A backlog submitted to all three nodes in turn.
    let submit = |s: &Server, n: usize, secs: f64| -> String {
        let r = post_json(
            s,
            "/api/functions/sleeper/run",
            &t,
            &json!({"n": n, "s": secs}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        r.body["task_id"].as_str().unwrap().to_string()
    };
    let mut tasks: Vec<String> = (0..90)
        .map(|n| submit(&cluster.nodes[n % 3], n, 0.15))
        .collect();
    // Once the third node runs some of them, it dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ran(&cluster.dir(2)).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the third node never ran a task; its log ends: {}",
            std::fs::read_to_string(cluster.dir(2).join("server.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.nodes[2].kill9();
    let killed = cluster.nodes.remove(2);
    // More, to the survivors, while the dead node's lease runs.
    tasks.extend((90..100).map(|n| submit(&cluster.nodes[n % 2], n, 0.05)));
    let mut ended: HashMap<String, Value> = HashMap::new();
    for id in &tasks {
        let done = wait_task(&cluster.nodes[0], &t, id, Duration::from_secs(120));
        assert_eq!(done["attempts"], 1, "run more than once: {done}");
        ended.insert(id.clone(), done);
    }
    let mut db = ::postgres::Client::connect(&cluster.url, ::postgres::NoTls).unwrap();
    let interrupted: HashSet<&String> = ended
        .iter()
        .filter(|(_, d)| d["status"] != "succeeded")
        .map(|(id, d)| {
            let node: Option<String> = db
                .query_one("SELECT node FROM tasks WHERE id = $1", &[id])
                .unwrap()
                .get(0);
            let warnings: Vec<String> = (0..3)
                .flat_map(|i| {
                    std::fs::read_to_string(cluster.root.join(format!("node{i}/server.log")))
                        .unwrap_or_default()
                        .lines()
                        .filter(|l| !l.contains("\"INFO\""))
                        .map(|l| format!("node{i}: {l}"))
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(
                d["error"]["kind"],
                "interrupted",
                "{d} on {node:?}; warnings:\n{}",
                warnings.join("\n")
            );
            id
        })
        .collect();
    // Those interrupted were the dead node's, at most one per worker of it.
    assert!(interrupted.len() <= 2, "{interrupted:?}");
    for id in &interrupted {
        let node: Option<String> = db
            .query_one("SELECT node FROM tasks WHERE id = $1", &[id])
            .unwrap()
            .get(0);
        assert_eq!(
            node.as_deref(),
            Some("node2"),
            "{id} was not the dead node's"
        );
    }
    // Every task that succeeded ran on exactly one node, and every node took part.
    let mut runs: HashMap<String, usize> = HashMap::new();
    let mut per_node = Vec::new();
    for dir in [cluster.dir(0), cluster.dir(1), killed.dir.clone()] {
        let ids = ran(&dir);
        per_node.push(ids.len());
        for id in ids {
            *runs.entry(id).or_default() += 1;
        }
    }
    for (id, d) in &ended {
        if d["status"] == "succeeded" {
            assert_eq!(runs.get(id), Some(&1), "{id} ran {:?} times", runs.get(id));
            assert_eq!(d["result"], d["payload"]["n"]);
        }
    }
    assert!(
        per_node.iter().all(|n| *n > 0),
        "a node ran nothing: {per_node:?}"
    );
    println!(
        "{} tasks: ran per node {per_node:?}, {} interrupted on the killed node",
        ended.len(),
        interrupted.len()
    );
    drop(killed);
}

/// A node that cannot start after it has opened the database (here: a copy of the program
/// with no shim beside it) exits saying why, closing its connections, rather than panicking
/// on the way out.
fn a_node_that_cannot_start_says_why(pg: &Postgres) {
    let dir = std::env::temp_dir().join(format!(
        "cloudfunc-cluster-nostart-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let lone = dir.join("cloudfunc");
    std::fs::copy(BIN, &lone).unwrap();
    let out = std::process::Command::new(&lone)
        .env_remove("CLOUDFUNC_SHIM")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            &pg.database(),
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--images-dir")
        .arg(dir.join("images"))
        .args([
            "--cgroup-parent",
            &format!("cf-nostart-{}", std::process::id()),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("cannot find the cloudfunc-shim"),
        "{stderr}"
    );
}

/// A node stopped gracefully while it holds claimed tasks waiting for the function's one
/// instance gives them back to the queue at once, and another node runs them: each task runs
/// once, the one that had started on the stopping node, the others on the node still up.
fn a_stopping_node_hands_its_unstarted_tasks_to_the_others(pg: &Postgres) {
    let mut cluster = Nodes::start(pg, "handover", 1, &["--workers", "4"]);
    let t = cluster.nodes[0].token("team", false);
    let r = request(
        "POST",
        &format!(
            "{}/api/functions/deploy?name=sleeper&max_instances=1",
            cluster.nodes[0].url
        ),
        Some(&t),
        Some(("application/zip", zip(&[("function.py", SLEEPER)]))),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let submit = |n: usize, secs: f64| -> String {
        let r = post_json(
            &cluster.nodes[0],
            "/api/functions/sleeper/run",
            &t,
            &json!({"n": n, "s": secs}),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        r.body["task_id"].as_str().unwrap().to_string()
    };
    let mut tasks = vec![submit(0, 1.5)];
    let first = &cluster.nodes[0];
    wait_health(
        first,
        "the first task in its sandbox",
        Duration::from_secs(20),
        |h| h["sandboxes_running"] == 1,
    );
    tasks.extend((1..4).map(|n| submit(n, 0.0)));
    wait_health(
        first,
        "three tasks waiting for the instance",
        Duration::from_secs(20),
        |h| h["pool"]["waiting"] == 3,
    );
    // All four claimed by the one node: the first running, three waiting for its instance.
    cluster.add(&["--workers", "4"]);
    cluster.nodes[0].stop();
    let mut ran_on = HashMap::new();
    for id in &tasks {
        let done = wait_task(&cluster.nodes[1], &t, id, Duration::from_secs(30));
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempts"], 1, "run once: {done}");
    }
    for node in 0..2 {
        for id in ran(&cluster.dir(node)) {
            assert!(ran_on.insert(id.clone(), node).is_none(), "{id} ran twice");
        }
    }
    assert_eq!(ran_on.get(&tasks[0]), Some(&0), "{ran_on:?}");
    for id in &tasks[1..] {
        assert_eq!(
            ran_on.get(id),
            Some(&1),
            "given back, run by the other node: {ran_on:?}"
        );
    }
}

/// PostgreSQL going away under a node: a request that needs it is told to come back (503,
/// `Retry-After`, a JSON body saying so), not that the server broke; a loaded function's sync
/// calls go on; once the database is back the node serves again without a restart, and what
/// it acknowledged is all there.
fn a_database_outage_is_503_and_loses_nothing(_: &Postgres) {
    // A database of its own to stop: the shared one serves the other tests meanwhile.
    let pg = Postgres::start();
    let cluster = Nodes::start(&pg, "outage", 1, &[]);
    let node = &cluster.nodes[0];
    let t = node.token("team", false);
    assert_eq!(
        deploy(node, &t, "hello", &[("function.py", V1)]).status,
        201
    );
    let submit = || post_json(node, "/api/functions/hello/run", &t, &json!({}));
    let before = submit();
    assert_eq!(before.status, 202, "{}", before.body);
    let before = before.body["task_id"].as_str().unwrap().to_string();
    let done = wait_task(node, &t, &before, Duration::from_secs(30));
    assert_eq!(done["status"], "succeeded", "{done}");

    pg.stop_for_now();
    for r in [
        submit(),
        get(node, &format!("/api/tasks/{before}"), &t),
        get(node, "/api/functions/", &t),
    ] {
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "unavailable", "{}", r.body);
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("retry-after") && v == "1"),
            "{:?}",
            r.headers
        );
    }
    let r = invoke(node, &t, "hello");
    assert_eq!(
        (r.status, &r.body["result"]),
        (200, &json!("v1")),
        "{}",
        r.body
    );

    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let r = submit();
        if r.status == 202 {
            break r.body["task_id"].as_str().unwrap().to_string();
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(Instant::now() < deadline, "still refused: {}", r.body);
        std::thread::sleep(Duration::from_millis(200));
    };
    for id in [&before, &after] {
        let done = wait_task(node, &t, id, Duration::from_secs(30));
        assert_eq!(done["status"], "succeeded", "{done}");
    }
}

/// A test of a running cluster.
type Test = fn(&Postgres);

fn main() {
    let args = Arguments::from_args();
    let tests: Vec<(&str, Test)> = vec![
        (
            "changes_on_one_node_are_seen_by_the_others",
            changes_on_one_node_are_seen_by_the_others,
        ),
        (
            "tasks_run_once_and_a_killed_node_loses_none",
            tasks_run_once_and_a_killed_node_loses_none,
        ),
        (
            "a_node_that_cannot_start_says_why",
            a_node_that_cannot_start_says_why,
        ),
        (
            "a_stopping_node_hands_its_unstarted_tasks_to_the_others",
            a_stopping_node_hands_its_unstarted_tasks_to_the_others,
        ),
        (
            "a_database_outage_is_503_and_loses_nothing",
            a_database_outage_is_503_and_loses_nothing,
        ),
    ];
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root (sandboxes)".to_string())
    } else if !Path::new("/usr/bin/python3").exists() {
        Some("/usr/bin/python3 is not installed".to_string())
    } else {
        Postgres::unavailable()
    };
    if let Some(why) = &why {
        println!("SKIPPED {} cluster tests: {why}", tests.len());
    }
    let pg = std::sync::Arc::new(std::sync::OnceLock::new());
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let pg = pg.clone();
            trial(
                name,
                move || f(pg.get_or_init(Postgres::start)),
                why.is_some(),
            )
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(pg);
    conclusion.exit();
}
