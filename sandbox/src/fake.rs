//! A backend that runs no container: an in-process stand-in for the language bootstrap,
//! speaking the real protocol over the real pipes, with cgroup counter files in a directory
//! the test owns. It needs no root, no kernel features and no runtime binary, so the layers
//! above the sandbox (a pool, a platform) can be unit-tested in milliseconds. Compiled with
//! the `fake` feature only; nothing in a production build can reach it.
//!
//! The stand-in loads any code. A `fake.json` in the code directory changes how loading goes:
//! `{"init": "fail" | "crash" | "hang", "init_ms": 5}`. Each call echoes its event as its
//! result, unless the event is an object with a `"fake"` object, whose keys say what the call
//! does, in this order: `print` (a string written to the logs), `cpu_ms` and `memory_bytes`
//! (added to the cgroup's counters), `sleep_ms`, then one of `crash` (exit code 3 without a
//! reply), `oom` (counted as an OOM kill, then killed by signal 9), `raise` (an error with
//! that message), `remember` (a string kept by this sandbox; the result is what it kept
//! before, sorted: the state a warm sandbox carries from call to call) or `result`
//! (returned instead of the event).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let engine = cloudfunc_sandbox::fake::engine(dir.path(), "pool-test")?;
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cloudfunc_seccomp::Dialect;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

use crate::backend::{Backend, BackendError, Container, ExitKind, Launch};
use crate::engine::{Engine, EngineConfig};
use crate::error::Result;

/// How long the stand-in waits between looks at whether it was killed.
const TICK: Duration = Duration::from_millis(5);

/// Pretend pids, so that each fake container has its own.
static NEXT_PID: AtomicI32 = AtomicI32::new(1_000_000);

/// An engine over a [`FakeBackend`], everything under `dir`: state, images and a cgroup root
/// laid out as a cgroup v2 hierarchy. Needs no root.
pub fn engine(dir: &Path, cgroup_parent: &str) -> Result<Engine> {
    let cgroup_root = dir.join("cgroup");
    std::fs::create_dir_all(&cgroup_root).map_err(crate::Error::io(&cgroup_root))?;
    let controllers = cgroup_root.join("cgroup.controllers");
    std::fs::write(&controllers, "cpu memory pids\n").map_err(crate::Error::io(&controllers))?;
    let config = EngineConfig {
        cgroup_root: cgroup_root.clone(),
        ..EngineConfig::under(dir, cgroup_parent)
    };
    Engine::with_backend(config, Box::new(FakeBackend { cgroup_root }))
}

/// Starts in-process stand-ins instead of containers.
#[derive(Debug)]
pub struct FakeBackend {
    /// Where the containers' cgroup directories (their counter files) are made.
    pub cgroup_root: PathBuf,
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn seccomp_dialect(&self) -> Dialect {
        Dialect::ValueIsMask
    }

    fn requires_root(&self) -> bool {
        false
    }

    fn launch(&self, launch: Launch) -> std::result::Result<Box<dyn Container>, BackendError> {
        let code_dir = launch
            .spec
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/code"))
            .and_then(|m| m.source().clone());
        let cgroup = launch
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| {
                self.cgroup_root
                    .join(p.to_string_lossy().trim_start_matches('/'))
            })
            .ok_or_else(|| BackendError::Runtime("the bundle has no cgroups path".into()))?;
        let counters = Counters::create(&cgroup).map_err(BackendError::Io)?;
        let killed = Arc::new(AtomicBool::new(false));
        let runtime = Runtime {
            stdin: File::from(launch.stdin),
            stdout: File::from(launch.stdout),
            stderr: File::from(launch.stderr),
            code_dir,
            counters,
            killed: killed.clone(),
            memory: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("fake-{}", launch.id))
            .spawn(move || runtime.run())
            .map_err(|source| BackendError::Spawn {
                what: "the fake runtime's thread".into(),
                source,
            })?;
        Ok(Box::new(FakeContainer {
            pid: NEXT_PID.fetch_add(1, Ordering::Relaxed),
            killed,
            thread: Some(thread),
            exit: None,
            cgroup,
        }))
    }

    fn sweep(&self, _state_root: &Path) -> Vec<String> {
        Vec::new()
    }
}

/// A stand-in's thread, as a container.
#[derive(Debug)]
struct FakeContainer {
    pid: i32,
    killed: Arc<AtomicBool>,
    thread: Option<JoinHandle<ExitKind>>,
    exit: Option<ExitKind>,
    cgroup: PathBuf,
}

impl Container for FakeContainer {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn kill(&mut self) -> std::result::Result<(), BackendError> {
        self.killed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<Option<ExitKind>, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exit {
                return Ok(Some(exit));
            }
            match self.thread.take() {
                Some(t) if t.is_finished() => {
                    self.exit = Some(t.join().unwrap_or(ExitKind::Signal(6)));
                }
                Some(t) => {
                    self.thread = Some(t);
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => return Ok(self.exit),
            }
        }
    }

    fn destroy(&mut self) -> std::result::Result<bool, BackendError> {
        self.kill()?;
        self.wait_exit(Duration::from_secs(5))?;
        match std::fs::remove_dir_all(&self.cgroup) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(BackendError::Io(e)),
        }
    }
}

/// The counter files of a fake cgroup, in cgroup v2's format.
#[derive(Debug)]
struct Counters {
    dir: PathBuf,
    cpu_us: u64,
    peak: u64,
    oom_kills: u64,
}

impl Counters {
    fn create(dir: &Path) -> std::io::Result<Counters> {
        std::fs::create_dir_all(dir)?;
        for (file, text) in [
            ("memory.max", "max\n"),
            ("cpu.max", "max 100000\n"),
            ("pids.max", "max\n"),
        ] {
            std::fs::write(dir.join(file), text)?;
        }
        let counters = Counters {
            dir: dir.to_path_buf(),
            cpu_us: 0,
            peak: 1 << 20,
            oom_kills: 0,
        };
        counters.write()?;
        Ok(counters)
    }

    fn write(&self) -> std::io::Result<()> {
        let (user, system) = (self.cpu_us * 3 / 4, self.cpu_us - self.cpu_us * 3 / 4);
        let stat = format!(
            "usage_usec {}\nuser_usec {user}\nsystem_usec {system}\n",
            self.cpu_us
        );
        std::fs::write(self.dir.join("cpu.stat"), stat)?;
        std::fs::write(self.dir.join("memory.peak"), format!("{}\n", self.peak))?;
        std::fs::write(
            self.dir.join("memory.events"),
            format!("oom {0}\noom_kill {0}\n", self.oom_kills),
        )
    }
}

/// The stand-in for a language bootstrap.
struct Runtime {
    stdin: File,
    stdout: File,
    stderr: File,
    code_dir: Option<PathBuf>,
    counters: Counters,
    killed: Arc<AtomicBool>,
    /// What `remember` calls kept.
    memory: Vec<String>,
}

/// Why the stand-in stops.
enum Stop {
    Killed,
    Exit(i32),
}

impl Runtime {
    fn run(mut self) -> ExitKind {
        match self.serve() {
            Stop::Killed => ExitKind::Signal(9),
            Stop::Exit(code) => ExitKind::Code(code),
        }
    }

    fn serve(&mut self) -> Stop {
        // The init frame, or EOF for a one-shot command (its requests are closed at once).
        let init = match self.read_frame() {
            Ok(Some(init)) => init,
            Ok(None) => return Stop::Exit(0),
            Err(stop) => return stop,
        };
        let behaviour: Value = self
            .code_dir
            .as_ref()
            .and_then(|d| std::fs::read(d.join("fake.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if let Some(ms) = behaviour["init_ms"].as_u64() {
            if let Err(stop) = self.sleep(Duration::from_millis(ms)) {
                return stop;
            }
        }
        match behaviour["init"].as_str() {
            Some("fail") => {
                self.reply(&json!({"ok": false, "kind": "init_failed",
                    "error": {"type": "ImportError", "message": "the fake module does not load", "traceback": "fake.json"}}));
                return Stop::Exit(1);
            }
            Some("crash") => return Stop::Exit(2),
            Some("hang") => loop {
                if let Err(stop) = self.sleep(Duration::from_secs(1)) {
                    return stop;
                }
            },
            _ => {}
        }
        let handler = init["handler"]
            .as_str()
            .unwrap_or("function.handler")
            .to_string();
        self.reply(&json!({"ok": true, "ready": true, "handler": handler, "runtime": "fake 1"}));
        loop {
            let call = match self.read_frame() {
                Ok(Some(call)) => call,
                Ok(None) => return Stop::Exit(0),
                Err(stop) => return stop,
            };
            let started = Instant::now();
            let event = &call["event"];
            let script = &event["fake"];
            if let Some(text) = script["print"].as_str() {
                let _ = self.stderr.write_all(text.as_bytes());
            }
            self.counters.cpu_us += script["cpu_ms"].as_u64().unwrap_or(0) * 1000;
            self.counters.peak = self
                .counters
                .peak
                .max(script["memory_bytes"].as_u64().unwrap_or(0));
            if let Some(ms) = script["sleep_ms"].as_u64() {
                if let Err(stop) = self.sleep(Duration::from_millis(ms)) {
                    return stop;
                }
            }
            self.counters.cpu_us += u64::try_from(started.elapsed().as_micros()).unwrap_or(0);
            let _ = self.counters.write();
            if script["crash"].as_bool() == Some(true) {
                return Stop::Exit(3);
            }
            if script["oom"].as_bool() == Some(true) {
                self.counters.oom_kills += 1;
                let _ = self.counters.write();
                return Stop::Killed;
            }
            let reply = match (&script["raise"], &script["remember"], &script["result"]) {
                (Value::String(message), _, _) => json!({"ok": false, "kind": "raised",
                    "error": {"type": "FakeError", "message": message, "traceback": "fake"}}),
                (_, Value::String(item), _) => {
                    let mut seen = self.memory.clone();
                    seen.sort();
                    self.memory.push(item.clone());
                    json!({"ok": true, "result": seen})
                }
                (_, _, Value::Null) => json!({"ok": true, "result": event}),
                (_, _, result) => json!({"ok": true, "result": result}),
            };
            self.reply(&reply);
        }
    }

    /// Sleeps for `d`, or until killed.
    fn sleep(&self, d: Duration) -> std::result::Result<(), Stop> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.killed.load(Ordering::SeqCst) {
                return Err(Stop::Killed);
            }
            std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
        }
        Ok(())
    }

    /// The next frame; `None` at EOF.
    fn read_frame(&mut self) -> std::result::Result<Option<Value>, Stop> {
        let mut header = [0u8; crate::protocol::HEADER_LEN];
        if !self.read_exact(&mut header)? {
            return Ok(None);
        }
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        if !self.read_exact(&mut body)? {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// Fills `buf` from stdin, looking at the kill flag between reads; false at EOF.
    fn read_exact(&mut self, buf: &mut [u8]) -> std::result::Result<bool, Stop> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.killed.load(Ordering::SeqCst) {
                return Err(Stop::Killed);
            }
            let timeout = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.stdin.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Ok(false),
            }
            match self.stdin.read(&mut buf[filled..]) {
                Ok(0) => return Ok(false),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn reply(&mut self, value: &Value) {
        let _ = self.stdout.write_all(&crate::protocol::encode(value));
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("code_dir", &self.code_dir)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InvokeOptions, Limits, Outcome, Runtime as Lang, Sandbox, SandboxSpec, StemCell};

    fn code(dir: &Path, fake: Option<&str>) -> PathBuf {
        let code = dir.join("code");
        std::fs::create_dir_all(&code).unwrap();
        std::fs::write(code.join("function.py"), "def handler(e): return e\n").unwrap();
        if let Some(f) = fake {
            std::fs::write(code.join("fake.json"), f).unwrap();
        }
        code
    }

    fn call(sandbox: &mut Sandbox, event: Value, timeout_ms: u64) -> crate::Invocation {
        let options = InvokeOptions {
            timeout: Duration::from_millis(timeout_ms),
            request_id: "r".into(),
        };
        sandbox.invoke(&event, &options).unwrap()
    }

    #[test]
    fn calls_run_through_the_real_protocol_and_every_ending_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), "fake-test").unwrap();
        let spec = SandboxSpec::new(Lang::Python, code(dir.path(), None));
        let mut sandbox = Sandbox::create(&engine, spec.clone()).unwrap();
        let echo = call(&mut sandbox, json!({"a": 1}), 1000);
        assert_eq!(
            echo.outcome,
            Outcome::Succeeded {
                result: json!({"a": 1})
            }
        );
        assert!(echo.usage.cold);
        let printed = call(
            &mut sandbox,
            json!({"fake": {"print": "hello\n", "cpu_ms": 7, "result": 2}}),
            1000,
        );
        assert_eq!(printed.logs.text, "hello\n");
        assert!(printed.usage.cpu_time >= Duration::from_millis(7));
        assert!(matches!(
            call(&mut sandbox, json!({"fake": {"raise": "no"}}), 1000).outcome,
            Outcome::Raised { .. }
        ));
        let slow = call(&mut sandbox, json!({"fake": {"sleep_ms": 5000}}), 50);
        assert!(matches!(slow.outcome, Outcome::Timeout { .. }), "{slow:?}");
        assert!(!sandbox.is_alive());
        sandbox.shutdown().unwrap();

        let mut crash = Sandbox::create(&engine, spec.clone()).unwrap();
        let crashed = call(&mut crash, json!({"fake": {"crash": true}}), 1000);
        assert!(
            matches!(crashed.outcome, Outcome::Crashed { .. }),
            "{crashed:?}"
        );
        crash.shutdown().unwrap();
        let mut oom = Sandbox::create(&engine, spec.clone()).unwrap();
        let killed = call(&mut oom, json!({"fake": {"oom": true}}), 1000);
        assert!(
            matches!(killed.outcome, Outcome::OutOfMemory { .. }),
            "{killed:?}"
        );
        oom.shutdown().unwrap();

        // Nothing is left under the cgroup parent once the sandboxes are gone.
        let parent = dir.path().join("cgroup/fake-test");
        let left: Vec<_> = std::fs::read_dir(&parent).into_iter().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn loading_can_fail_and_stem_cells_bind() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), "fake-stem").unwrap();
        let failing = SandboxSpec::new(Lang::Python, code(dir.path(), Some(r#"{"init": "fail"}"#)));
        assert!(matches!(
            Sandbox::create(&engine, failing),
            Err(crate::Error::FunctionInit { .. })
        ));
        let good = dir.path().join("good");
        std::fs::create_dir_all(&good).unwrap();
        std::fs::write(good.join("function.py"), "").unwrap();
        let cell = StemCell::start(&engine, Lang::Python, Limits::default()).unwrap();
        let mut sandbox = cell.bind(SandboxSpec::new(Lang::Python, &good)).unwrap();
        assert_eq!(
            call(&mut sandbox, json!(5), 1000).outcome,
            Outcome::Succeeded { result: json!(5) }
        );
        sandbox.shutdown().unwrap();
        // A one-shot command ends at once, as the compiler's run does.
        assert!(engine.precompile(Lang::Python, &good).is_ok());
    }
}
