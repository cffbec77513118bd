//! Shared helpers for the real-container tests: requirements, engines and function code.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use cloudfunc_sandbox::{
    BackendKind, Engine, EngineConfig, Invocation, InvokeOptions, Limits, Outcome, Runtime,
    Sandbox, SandboxSpec,
};
use serde_json::Value;

/// What a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Root and usable cgroups (every container test).
    Containers,
    /// The runtime's interpreter on the host.
    Runtime(Runtime),
    /// The backend's runtime binary.
    Backend(BackendKind),
}

/// Why a requirement is missing, or `None` when it is met.
pub fn missing(need: Need) -> Option<String> {
    static CONTAINERS: OnceLock<Option<String>> = OnceLock::new();
    match need {
        Need::Containers => CONTAINERS
            .get_or_init(|| {
                if !nix::unistd::geteuid().is_root() {
                    return Some("not running as root".into());
                }
                if let Err(e) =
                    cloudfunc_sandbox::cgroup::CgroupFs::detect(Path::new("/sys/fs/cgroup"))
                {
                    return Some(format!("no usable cgroup hierarchy ({e})"));
                }
                None
            })
            .clone(),
        Need::Runtime(r) if !r.available() => Some(format!("{} is not installed", r.interpreter())),
        Need::Runtime(_) => None,
        Need::Backend(b) if !b.available() => Some(format!(
            "{} is not installed",
            b.binary().unwrap_or_default()
        )),
        Need::Backend(_) => None,
    }
}

/// What a test of `runtime`'s functions needs.
pub fn needs(runtime: Runtime) -> Vec<Need> {
    vec![Need::Containers, Need::Runtime(runtime)]
}

type Shared = OnceLock<(tempfile::TempDir, Engine)>;
static ENGINES: [Shared; BackendKind::ALL.len()] =
    [const { OnceLock::new() }; BackendKind::ALL.len()];

thread_local! {
    /// The backend the current trial runs on: the harness sets it before each trial (every
    /// trial runs on one thread), so one test body serves every backend.
    static BACKEND: std::cell::Cell<BackendKind> = const { std::cell::Cell::new(BackendKind::Libcontainer) };
}

/// Whether the current trial's functions run on gVisor's kernel rather than the host's.
pub fn on_gvisor() -> bool {
    backend() == BackendKind::Runsc
}

/// Makes the current thread's tests use `kind`.
pub fn set_backend(kind: BackendKind) {
    BACKEND.with(|b| b.set(kind));
}

/// The backend of the current trial.
pub fn backend() -> BackendKind {
    BACKEND.with(|b| b.get())
}

fn slot(kind: BackendKind) -> &'static Shared {
    &ENGINES[BackendKind::ALL.iter().position(|k| *k == kind).unwrap()]
}

/// Releases every engine's cgroup parent and temporary directory once all tests are done.
pub fn release() {
    for kind in BackendKind::ALL {
        if let Some((dir, engine)) = slot(kind).get() {
            engine.release();
            // A static is never dropped, so its temporary directory is removed here.
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
}

/// The engine of the current trial's backend, with its own state and cgroup parent.
pub fn engine() -> &'static Engine {
    let kind = backend();
    &slot(kind)
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("cloudfunc-test-")
                .tempdir()
                .unwrap();
            let mut config = EngineConfig::under(
                dir.path(),
                &format!("cloudfunc-test-{}-{}", kind.name(), std::process::id()),
            );
            config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
            config.max_output_bytes = 1024 * 1024;
            config.max_log_bytes = 16 * 1024;
            config.backend = kind;
            let engine = Engine::new(config).expect("engine starts");
            (dir, engine)
        })
        .1
}

/// A directory with one code file, readable by the sandbox user.
pub fn code(file: &str, source: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-code-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join(file);
    fs::write(&path, source).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

/// The conventional file name of a runtime's handler module.
pub fn module_file(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python => "function.py",
        Runtime::Node => "index.js",
    }
}

/// A started sandbox plus the directory its code lives in.
pub struct Fixture {
    pub sandbox: Sandbox,
    _code: tempfile::TempDir,
}

impl Fixture {
    pub fn call(&mut self, event: Value) -> Invocation {
        self.call_with(event, Duration::from_secs(20))
    }

    pub fn call_with(&mut self, event: Value, timeout: Duration) -> Invocation {
        let options = InvokeOptions {
            timeout,
            request_id: "req-1".into(),
        };
        self.sandbox.invoke(&event, &options).expect("invoke")
    }
}

/// Starts a sandbox for `source` in the runtime's conventional module.
pub fn start(runtime: Runtime, source: &str) -> Fixture {
    start_with(runtime, module_file(runtime), source, Limits::default())
}

/// As [`start`], with a file name and limits.
pub fn start_with(runtime: Runtime, file: &str, source: &str, limits: Limits) -> Fixture {
    let dir = code(file, source);
    let mut spec = SandboxSpec::new(runtime, dir.path());
    spec.limits = limits;
    spec.function_name = "test-fn".into();
    spec.function_version = "1".into();
    let sandbox = Sandbox::create(engine(), spec).expect("sandbox starts");
    Fixture {
        sandbox,
        _code: dir,
    }
}

/// The result of a call that must have succeeded.
pub fn result(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Succeeded { result } => result.clone(),
        other => panic!("expected success, got {other:?}"),
    }
}

/// Whether a pid exists on the host.
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}
