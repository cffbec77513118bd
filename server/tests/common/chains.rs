//! What the chain tests share: deploying a function, a chain, running one and waiting for it.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{get, post_json, request, Server};

pub fn deploy_ok(s: &Server, t: &str, name: &str, code: &str, query: &str) {
    let r = request(
        "POST",
        &format!("{}/api/functions/deploy?name={name}{query}", s.url),
        Some(t),
        Some(("application/zip", super::zip(&[("main.py", code)]))),
    );
    assert!(r.status == 201 || r.status == 200, "deploy {name}: {r:?}");
}

pub fn chain(s: &Server, t: &str, def: Value) -> super::Reply {
    post_json(s, "/api/chains", t, &def)
}

pub fn chain_ok(s: &Server, t: &str, def: Value) {
    let r = chain(s, t, def.clone());
    assert_eq!(r.status, 201, "{def}: {r:?}");
}

pub fn invoke(s: &Server, t: &str, name: &str, input: Value) -> Value {
    let r = post_json(s, &format!("/api/chains/{name}/invoke"), t, &input);
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

pub fn wait_run(s: &Server, t: &str, run: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = get(s, &format!("/api/functions/{run}/status"), t);
        if r.status == 200 && !matches!(r.body["status"].as_str(), Some("queued" | "running")) {
            return r.body;
        }
        assert!(Instant::now() < deadline, "run {run} did not end: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn step_paths(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect()
}

pub fn with_server(tag: &str, test: impl FnOnce(&Server, &str)) {
    let s = Server::start(tag);
    let t = s.token("acme", false);
    test(&s, &t);
    s.stop();
    s.remove_files();
}
