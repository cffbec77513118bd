//! Faults, for real: a data directory on a small tmpfs filled to the last byte, clients that
//! send too slowly or not at all, and many starts and stops. Each checks that nothing
//! acknowledged is lost, nothing is left stuck, and nothing is left behind.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SLEEPER: &str =
    "import time\ndef handler(e):\n    time.sleep(e.get('s', 0))\n    return e.get('s', 0)\n";

/// A tmpfs of `mib` MiB mounted at `dir` until dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={mib}m,mode=0700").as_str()),
        )
        .unwrap();
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Fills the filesystem of `dir` with a file, leaving about `leave` bytes free (0: none at
/// all). Returns the file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        let stat = nix::sys::statvfs::statvfs(dir).unwrap();
        let free = stat.blocks_available() * stat.fragment_size();
        if free <= leave {
            break;
        }
        let n = usize::try_from((free - leave).min(chunk.len() as u64)).unwrap();
        match f.write_all(&chunk[..n.max(1)]) {
            Ok(()) => {}
            Err(_) => break,
        }
    }
    let _ = f.sync_all();
    path
}

fn health(s: &Server) -> Value {
    request("GET", &format!("{}/api/system/health", s.url), None, None).body
}

/// Polls health until `cond` holds.
fn until_health(s: &Server, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(s);
        if cond(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "never {what}: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn invoke(s: &Server, t: &str, name: &str, event: Value) -> Reply {
    post_json(s, &format!("/api/functions/{name}/invoke"), t, &event)
}

/// With the data directory's disk below the floor, new work is refused up front (507) and the
/// queue waits; with no floor and not one byte free, calls still answer, their records are
/// kept and read from memory, a running task's end is kept rather than left `running`, and
/// once space is freed every record is on disk: after a restart, all are there.
fn disk_full() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-faults-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, 48);
    let s = Server::start_in(dir.path(), "diskfull", 0, &["--min-free-mb", "16"]);
    let t = s.token("disk", false);
    assert_eq!(
        deploy(&s, &t, "sleeper", &[("function.py", SLEEPER)]).status,
        201
    );
    assert_eq!(invoke(&s, &t, "sleeper", json!({})).status, 200);

    // Below the floor: refused up front, nothing done.
    let filler = fill(&data, 8 << 20);
    let h = until_health(&s, "low", |h| h["storage"]["low"] == true);
    assert_eq!(h["status"], "degraded", "{h}");
    let r = invoke(&s, &t, "sleeper", json!({}));
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (507, Some("insufficient_storage")),
        "{r:?}"
    );
    let r = post_json(&s, "/api/functions/sleeper/run", &t, &json!({}));
    assert_eq!(r.status, 507, "{r:?}");
    let r = deploy(&s, &t, "other", &[("function.py", SLEEPER)]);
    assert_eq!(r.status, 507, "{r:?}");
    std::fs::remove_file(&filler).unwrap();
    until_health(&s, "room again", |h| h["status"] == "ok");
    assert_eq!(invoke(&s, &t, "sleeper", json!({})).status, 200);
    s.stop();

    // No floor at all, and the disk full to the last byte while work is under way.
    let s = Server::start_in(dir.path(), "diskfull", 0, &["--min-free-mb", "0"]);
    let r = post_json(&s, "/api/functions/sleeper/run", &t, &json!({"s": 2.0}));
    assert_eq!(r.status, 202, "{r:?}");
    let running = r.body["task_id"].as_str().unwrap().to_string();
    wait_running(&s, &t, &running, Duration::from_secs(20));
    let filler = fill(&data, 0);
    let mut answered = Vec::new();
    for i in 0..20 {
        let r = invoke(&s, &t, "sleeper", json!({"i": i}));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["status"], "succeeded", "{r:?}");
        answered.push(r.body["task_id"].as_str().unwrap().to_string());
    }
    let r = deploy(&s, &t, "another", &[("function.py", SLEEPER)]);
    assert_eq!(r.status, 507, "a deploy on a full disk: {r:?}");
    let h = until_health(&s, "keeping records", |h| {
        h["storage"]["records_kept"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(h["status"], "degraded", "{h}");
    // Prometheus says so too, to an admin.
    let admin = s.token("ops", true);
    let kept = metric(&s, &admin, "cloudfunc_store_records_kept");
    assert!(kept > 0.0, "records kept: {kept}");
    // Every answered call reads back, from memory for now.
    for id in &answered {
        let r = get(&s, &format!("/api/tasks/{id}"), &t);
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (200, Some("succeeded")),
            "{id}: {r:?}"
        );
    }
    // The task that was running ends, though its end cannot be written yet.
    let ended = wait_task(&s, &t, &running, Duration::from_secs(30));
    assert_eq!(ended["status"], "succeeded", "{ended}");

    std::fs::remove_file(&filler).unwrap();
    let h = until_health(&s, "stored everything", |h| {
        h["storage"]["records_kept"] == 0 && h["status"] == "ok"
    });
    assert_eq!(h["storage"]["records_lost"], 0, "{h}");
    assert_eq!(metric(&s, &admin, "cloudfunc_store_records_kept"), 0.0);
    assert_eq!(
        metric(&s, &admin, "cloudfunc_store_records_lost_total"),
        0.0
    );
    let (commits, writes) = (
        metric(&s, &admin, "cloudfunc_store_commits_total"),
        metric(&s, &admin, "cloudfunc_store_writes_total"),
    );
    assert!(
        commits >= 1.0 && writes >= answered.len() as f64,
        "{commits} commits of {writes} writes"
    );
    s.stop();

    // On disk for real: a fresh start reads them all back, the async task not `running`.
    let s = Server::start_in(dir.path(), "diskfull", 0, &[]);
    for id in answered.iter().chain([&running]) {
        let r = get(&s, &format!("/api/tasks/{id}"), &t);
        assert_eq!(
            (r.status, r.body["status"].as_str()),
            (200, Some("succeeded")),
            "{id}: {r:?}"
        );
    }
    let h = health(&s);
    assert_eq!(h["tasks_running"], 0, "{h}");
    s.stop();
    drop(_tmpfs);
    s.remove_files();
}

/// Reads from `stream` until it is closed (0 bytes or an error) or `within` passes; returns
/// what was read and whether it was closed.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

/// Headers sent a byte at a time, a body announced and never sent, a connection left idle,
/// and one connection too many: each is cut off at its limit, and the server serves on.
fn slow_clients() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-slow-")
        .tempdir()
        .unwrap();
    let s = Server::start_in(
        dir.path(),
        "slow",
        0,
        &[
            "--header-timeout-s",
            "1",
            "--body-idle-timeout-s",
            "1",
            "--keep-alive-s",
            "2",
            "--max-connections-per-client",
            "4",
        ],
    );
    let t = s.token("slow", false);
    let addr = format!("127.0.0.1:{}", s.port);

    // Slowloris: a header byte every 200 ms is never done; cut off at about 1 s.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /api/system/health HTTP/1.1\r\n")
        .unwrap();
    let started = Instant::now();
    let mut cut = false;
    for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let (_, closed) = read_until_closed(&mut slow, Duration::from_millis(1));
        if closed {
            cut = true;
            break;
        }
    }
    assert!(cut, "a header trickle was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // A body announced and never sent: 408, then the connection ends.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /api/functions/none/invoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    .unwrap();
    let (reply, _) = read_until_closed(&mut stalled, Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");

    // An idle keep-alive connection is closed after its idle limit.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /api/system/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (reply, closed) = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(closed, "an idle connection was kept past its limit");

    // Four connections from this address are the cap: a fifth is closed at once.
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(&addr).unwrap();
    let _ = extra.write_all(b"GET /api/system/health HTTP/1.1\r\nHost: x\r\n\r\n");
    let (reply, closed) = read_until_closed(&mut extra, Duration::from_secs(5));
    assert!(closed && reply.is_empty(), "{reply:?}");
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let r = request("GET", &format!("{}/api/system/health", s.url), None, None);
    assert_eq!(r.status, 200, "{r:?}");
    s.stop();
    s.remove_files();
}

/// Many starts and stops with sandboxes of both isolation levels alive at the stop: no
/// cgroup, container state or bundle is left, and the WAL is emptied.
fn stops_leave_nothing() {
    let gvisor = Path::new("/usr/bin/runsc").exists();
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-stops-")
        .tempdir()
        .unwrap();
    let rounds = 6;
    for round in 0..rounds {
        let s = Server::start_in(dir.path(), "stops", 0, &[]);
        let t = s.token("stops", false);
        if round == 0 {
            assert_eq!(
                deploy(&s, &t, "plain", &[("function.py", HELLO_PY)]).status,
                201
            );
            if gvisor {
                let r = request(
                    "POST",
                    &format!("{}/api/functions/deploy?name=boxed&isolation=gvisor", s.url),
                    Some(&t),
                    Some(("application/zip", zip(&[("function.py", HELLO_PY)]))),
                );
                assert_eq!(r.status, 201, "{r:?}");
            }
        }
        assert_eq!(invoke(&s, &t, "plain", json!({"name": "x"})).status, 200);
        if gvisor {
            assert_eq!(invoke(&s, &t, "boxed", json!({"name": "x"})).status, 200);
        }
        s.stop();
        let left = s.cgroup_parents_left();
        assert!(left.is_empty(), "round {round}: left behind: {left:?}");
        for sub in [
            "state/containers",
            "state/bundles",
            "state/gvisor/containers",
            "state/gvisor/bundles",
        ] {
            let entries: Vec<_> = std::fs::read_dir(dir.path().join(sub))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(entries.is_empty(), "round {round}: {sub} holds {entries:?}");
        }
        let wal = dir.path().join("data/cloudfunc.db-wal");
        let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(
            wal_bytes, 0,
            "round {round}: the WAL was not emptied at the stop"
        );
    }
    if !gvisor {
        println!("SKIPPED the gVisor half of stops_leave_nothing: /usr/bin/runsc is not installed");
    }
    std::fs::remove_dir_all(dir.path()).ok();
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![
        ("a_full_disk_loses_nothing_acknowledged", disk_full),
        ("slow_clients_are_cut_off", slow_clients),
        ("stops_leave_nothing_behind", stops_leave_nothing),
    ];
    common::run_tests("fault tests", tests, common::sandboxes_missing());
}

/// The value of the series `name` (without labels, or with this node's) in `/metrics`.
fn metric(s: &Server, token: &str, name: &str) -> f64 {
    let r = request("GET", &format!("{}/metrics", s.url), Some(token), None);
    let text = r.body.as_str().unwrap_or_default().to_string();
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics: {text}"))
}
