//! A real `cloudfunc serve` on a loopback port with a real SQLite file and real sandboxes.

#![allow(dead_code)]

pub mod browser;
pub mod chains;
pub mod postgres;
pub mod receiver;

use std::io::{BufRead, BufReader, Cursor, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server and what it was started with.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub port: u16,
    parent: String,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_cloudfunc");

impl Server {
    /// Starts a server in a fresh directory.
    pub fn start(tag: &str) -> Server {
        Server::start_with(tag, &[])
    }

    /// [`Server::start`] with more arguments to `serve`.
    pub fn start_with(tag: &str, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "cloudfunc-api-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Server::start_in(&dir, tag, 0, extra)
    }

    /// Starts (or restarts) a server on `dir`; port 0 picks a free one.
    pub fn start_in(dir: &Path, tag: &str, port: u16, extra: &[&str]) -> Server {
        let parent = format!("cf-api-{tag}-{}", std::process::id());
        // The server's own log (JSON lines, one per invocation among them) goes beside its data.
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--log-format", "json"])
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--images-dir")
            .arg(dir.join("images"))
            .arg("--cgroup-parent")
            .arg(&parent)
            .args(if extra.contains(&"--database") {
                Vec::new()
            } else {
                postgres::server_args(dir)
            })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("cloudfunc listening on ")
            .unwrap_or_else(|| {
                // Why it did not start is in its log: the last lines go in the failure.
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let status = child.try_wait();
                panic!(
                    "server said {line:?} (exit: {status:?}); its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        if postgres::wanted() {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            assert!(
                log.contains("records kept in PostgreSQL"),
                "the server was to keep its records in PostgreSQL"
            );
        }
        Server {
            child,
            url,
            dir: dir.to_path_buf(),
            port,
            parent,
        }
    }

    /// A token for `tenant` from the server's own secret.
    pub fn token(&self, tenant: &str, admin: bool) -> String {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--tenant")
            .arg(tenant)
            .arg("token");
        if admin {
            cmd.arg("--admin");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The CLI pointed at this server as `tenant`.
    pub fn cli(&self, tenant: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("CLOUDFUNC_URL", &self.url)
            .env("CLOUDFUNC_DATA_DIR", self.dir.join("data"))
            .env("CLOUDFUNC_TENANT", tenant);
        cmd
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Server {
    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and reaps it; for a server in a
    /// `static`, which is never dropped.
    pub fn stop(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}

impl Server {
    /// Removes the server's directory and cgroup parents (after `stop`).
    pub fn remove_files(&self) {
        self.unmount_state();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.remove_cgroup_parents();
    }

    /// Unmounts the tmpfs its engines put their state on, where a kill left them (after
    /// `stop`; a graceful stop unmounts them itself, and a restart takes them over).
    fn unmount_state(&self) {
        let Ok(dir) = self.dir.canonicalize() else {
            return;
        };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts
            .lines()
            .filter(|l| l.contains(" - tmpfs cloudfunc-state "))
        {
            if let Some(point) = line.split(' ').nth(4).map(Path::new) {
                if point.starts_with(&dir) {
                    let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
    }

    /// The server's cgroup parents (both isolation levels, every hierarchy) that exist now.
    pub fn cgroup_parents_left(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
        let places: Vec<PathBuf> = std::iter::once(root.to_path_buf())
            .chain(hierarchies.map(|h| h.path()))
            .collect();
        let mut left = Vec::new();
        for place in places {
            for parent in [self.parent.clone(), format!("{}-gvisor", self.parent)] {
                let dir = place.join(parent);
                if dir.is_dir() {
                    left.push(dir);
                }
            }
        }
        left
    }

    /// Removes the cgroup parents of both isolation levels, where they are empty.
    fn remove_cgroup_parents(&self) {
        for dir in self.cgroup_parents_left() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        // The engine sweeps at start; a fresh one on the same state cleans what a kill left.
        self.unmount_state();
        self.remove_cgroup_parents();
    }
}

/// One HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

/// Any request. `token` adds a bearer header; `body` is (content type, bytes).
pub fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    request_with(method, url, token, &[], body)
}

/// [`request`] with more headers.
pub fn request_with(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    let agent = agent();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = match body {
        Some((ct, bytes)) => agent.run(req.header("content-type", ct).body(bytes).unwrap()),
        None => agent.run(req.body(()).unwrap()),
    };
    let mut response = response.unwrap();
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        body,
        headers,
    }
}

pub fn get(s: &Server, path: &str, token: &str) -> Reply {
    request("GET", &format!("{}{path}", s.url), Some(token), None)
}

pub fn post_json(s: &Server, path: &str, token: &str, body: &Value) -> Reply {
    request(
        "POST",
        &format!("{}{path}", s.url),
        Some(token),
        Some(("application/json", serde_json::to_vec(body).unwrap())),
    )
}

/// A ZIP of (name, content) entries.
pub fn zip(files: &[(&str, &str)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, content) in files {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(content.as_bytes()).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A multipart body with text fields and files (field, filename, bytes).
pub fn multipart(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "cloudfunc-test-boundary-7d1a";
    let mut body = Vec::new();
    for (k, v) in fields {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
        )
        .unwrap();
    }
    for (field, filename, data) in files {
        write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Deploys a ZIP through the canonical route.
pub fn deploy(s: &Server, token: &str, name: &str, files: &[(&str, &str)]) -> Reply {
    request(
        "POST",
        &format!("{}/api/functions/deploy?name={name}", s.url),
        Some(token),
        Some(("application/zip", zip(files))),
    )
}

/// Polls a task until it is terminal.
pub fn wait_task(s: &Server, token: &str, task: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = get(s, &format!("/api/tasks/{task}"), token);
        assert_eq!(r.status, 200, "{r:?}");
        let status = r.body["status"].as_str().unwrap().to_string();
        if status != "queued" && status != "running" {
            return r.body;
        }
        assert!(Instant::now() < deadline, "task {task} still {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the server's health until `ready` holds of it (`what` says what it waits for).
pub fn wait_health(s: &Server, what: &str, within: Duration, ready: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let health = request("GET", &format!("{}/api/system/health", s.url), None, None).body;
        if ready(&health) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {health}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a queue worker has claimed `task`.
pub fn wait_running(s: &Server, token: &str, task: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let seen = get(s, &format!("/api/tasks/{task}"), token).body;
        if seen["status"] == "running" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {task} was never seen running: {seen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const HELLO_PY: &str =
    "def handler(event):\n    return f\"Hello {event.get('name', 'World')}!\"\n";

/// Why tests that start sandboxes cannot run here, if they cannot: not root, or no Python.
pub fn sandboxes_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        Some("not running as root (sandboxes need it)".to_string())
    } else if !Path::new("/usr/bin/python3").exists() {
        Some("/usr/bin/python3 is not installed".to_string())
    } else {
        None
    }
}

/// Runs `tests` (`what` they are, for the line saying why they are skipped where `skip`
/// says they cannot run here), then stops the shared PostgreSQL cluster if one was started,
/// and exits with the run's status.
pub fn run_tests(what: &str, tests: Vec<(&'static str, fn())>, skip: Option<String>) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    if let Some(why) = &skip {
        println!("SKIPPED {} {what}: {why}", tests.len());
    }
    let trials = tests
        .into_iter()
        .map(|(name, f)| trial(name, f, skip.is_some()))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    postgres::stop_shared();
    conclusion.exit()
}

/// A trial running `test`, a panic being its failure; ignored (reported as skipped) if `skip`.
pub fn trial(
    name: impl Into<String>,
    test: impl FnOnce() + Send + std::panic::UnwindSafe + 'static,
    skip: bool,
) -> libtest_mimic::Trial {
    libtest_mimic::Trial::test(name, move || {
        std::panic::catch_unwind(test).map_err(|e| {
            libtest_mimic::Failed::from(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            )
        })
    })
    .with_ignored_flag(skip)
}
