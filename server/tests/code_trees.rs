//! The extracted code trees a server keeps in its state directory (a tmpfs on most hosts):
//! one for each function's current version, not one for every version ever deployed. An
//! older version called by number is rebuilt from its archive, and a call still running on
//! an older version keeps its tree until it ends.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{deploy, post_json, request, wait_health, Server};
use serde_json::{json, Value};

/// Version `n`'s code: it says which version it is, and sleeps when asked.
fn code(n: u32) -> String {
    format!(
        "import time\ndef handler(event):\n    time.sleep(event.get('sleep', 0))\n    return {n}\n"
    )
}

/// The version trees present for `function_id`, by number.
fn trees(s: &Server, function_id: &str) -> Vec<String> {
    let root: PathBuf = s.dir.join("state/code").join(function_id);
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn call(s: &Server, t: &str, key: &str, event: &Value) -> Value {
    let r = post_json(s, &format!("/api/functions/{key}/invoke"), t, event);
    assert_eq!(r.status, 200, "{key}: {r:?}");
    r.body
}

fn old_versions_leave_only_their_archives() {
    let dir = std::env::temp_dir().join(format!(
        "cloudfunc-api-trees-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let s = Server::start_in(&dir, "trees", 0, &[]);
    let t = s.token("ivy", false);
    let mut id = String::new();
    for n in 1..=3 {
        let r = deploy(&s, &t, "tree", &[("function.py", &code(n))]);
        assert_eq!(r.status, 201, "{r:?}");
        id = r.body["function_id"].as_str().unwrap().to_string();
    }
    assert_eq!(trees(&s, &id), ["3"], "one tree: the current version's");
    assert_eq!(call(&s, &t, "tree", &json!({}))["result"], 3);
    // Called by number, an older version is rebuilt from its archive.
    assert_eq!(call(&s, &t, "tree@1", &json!({}))["result"], 1);
    assert_eq!(trees(&s, &id), ["1", "3"]);

    // A call running on version 1 while version 4 is deployed keeps its tree until the
    // next deploy after it ended.
    let running = {
        let (url, t) = (s.url.clone(), t.clone());
        std::thread::spawn(move || {
            request(
                "POST",
                &format!("{url}/api/functions/tree@1/invoke"),
                Some(&t),
                Some(("application/json", br#"{"sleep": 2}"#.to_vec())),
            )
        })
    };
    wait_health(
        &s,
        "the call on version 1 running",
        Duration::from_secs(30),
        |h| h["sandboxes_running"] == 1,
    );
    assert_eq!(
        deploy(&s, &t, "tree", &[("function.py", &code(4))]).status,
        201
    );
    assert_eq!(trees(&s, &id), ["1", "4"], "version 1's call still runs");
    let ended = running.join().unwrap();
    assert_eq!(
        (ended.status, &ended.body["result"]),
        (200, &json!(1)),
        "{ended:?}"
    );

    // Settings alone make a version that runs the same tree: it stays.
    let r = request(
        "PUT",
        &format!("{}/api/functions/tree", s.url),
        Some(&t),
        Some(("application/json", br#"{"memory": 128}"#.to_vec())),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["version"], 5);
    assert_eq!(trees(&s, &id), ["4"]);
    assert_eq!(call(&s, &t, "tree", &json!({}))["result"], 4);

    // A restart extracts only the current version's tree; an old one comes back on a call.
    assert_eq!(call(&s, &t, "tree@2", &json!({}))["result"], 2);
    s.stop();
    std::fs::remove_dir_all(s.dir.join("state/code")).unwrap();
    let s = Server::start_in(&dir, "trees", 0, &[]);
    assert_eq!(trees(&s, &id), ["4"]);
    assert_eq!(call(&s, &t, "tree", &json!({}))["result"], 4);
    assert_eq!(call(&s, &t, "tree@2", &json!({}))["result"], 2);
    // Trees a stop left behind go at the next start.
    s.stop();
    let s = Server::start_in(&dir, "trees", 0, &[]);
    assert_eq!(trees(&s, &id), ["4"]);

    // A deleted function leaves no tree.
    let r = request(
        "DELETE",
        &format!("{}/api/functions/tree", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!Path::new(&s.dir.join("state/code").join(&id)).exists());
    s.stop();
    s.remove_files();
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![(
        "old_versions_leave_only_their_archives",
        old_versions_leave_only_their_archives,
    )];
    common::run_tests("code tree tests", tests, common::sandboxes_missing());
}
