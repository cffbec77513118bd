//! Shared pieces of cloudfunc's benchmarks: the workloads, and one runner per way of starting
//! them (the bare host, cloudfunc's own engine, and OCI runtime CLIs on the same bundle).
//!
//! Every runner does the same whole cold start: create, send the init and one event, read the
//! reply, tear down. Nothing is reused between runs.

pub mod server;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cloudfunc_sandbox::protocol::{encode, parse_reply, FrameReader, Reply};
use cloudfunc_sandbox::{
    BackendKind, Engine, EngineConfig, InvokeOptions, Limits, Process, Runtime, Sandbox,
    SandboxSpec,
};
use serde_json::{json, Value};

/// What runs in the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `/bin/true`: the cost of the container alone.
    True,
    /// A hello function in a language runtime.
    Hello(Runtime),
}

impl Workload {
    /// Every workload, cheapest first.
    pub const ALL: [Workload; 3] = [
        Workload::True,
        Workload::Hello(Runtime::Python),
        Workload::Hello(Runtime::Node),
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Workload::True => "/bin/true",
            Workload::Hello(Runtime::Python) => "python hello",
            Workload::Hello(Runtime::Node) => "node hello",
        }
    }

    /// The bundle's process.
    pub fn process(self) -> Process {
        match self {
            Workload::True => Process::Command(vec!["/bin/true".into()]),
            Workload::Hello(runtime) => Process::Bootstrap(runtime),
        }
    }

    /// Whether the host can run it.
    pub fn available(self) -> bool {
        match self {
            Workload::True => Path::new("/bin/true").exists(),
            Workload::Hello(r) => r.available(),
        }
    }
}

/// The hello functions' code, written once per benchmark run.
#[derive(Debug)]
pub struct Code {
    dir: tempfile::TempDir,
}

impl Code {
    /// Writes `function.py` and `index.js` into a fresh directory readable by the sandbox user,
    /// and compiles them in `engine` as a deploy does.
    pub fn new(engine: &Engine) -> Result<Code> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("cloudfunc-bench-code-")
            .tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for (file, source) in [
            (
                "function.py",
                "def handler(event):\n    return f\"Hello {event.get('name', 'World')}!\"\n",
            ),
            (
                "index.js",
                "exports.handler = async (event) => `Hello ${event.name || 'World'}!`;\n",
            ),
        ] {
            std::fs::write(dir.path().join(file), source)?;
            std::fs::set_permissions(
                dir.path().join(file),
                std::fs::Permissions::from_mode(0o644),
            )?;
        }
        for runtime in Runtime::ALL {
            engine.precompile(runtime, dir.path())?;
        }
        Ok(Code { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The event every hello call gets, and what it must answer.
pub fn event() -> (Value, Value) {
    (json!({"name": "Bench"}), json!("Hello Bench!"))
}

/// An engine for benchmarks, with its own state and cgroup parent.
pub fn bench_engine(dir: &Path) -> Result<Engine> {
    bench_engine_with(dir, cloudfunc_sandbox::BackendKind::Libcontainer)
}

/// As [`bench_engine`], on a given backend.
pub fn bench_engine_with(dir: &Path, backend: cloudfunc_sandbox::BackendKind) -> Result<Engine> {
    let mut config = EngineConfig::under(
        dir,
        &format!("cloudfunc-bench-{}-{}", backend.name(), std::process::id()),
    );
    config.shim_binary = cloudfunc_sandbox::locate_shim();
    config.backend = backend;
    Engine::new(config).with_context(|| {
        format!(
            "starting the {} engine (benchmarks need root)",
            backend.name()
        )
    })
}

/// Warm-call latencies (sorted) of `calls` invokes in one Python hello sandbox.
pub fn warm_calls(engine: &Engine, code: &Code, calls: usize) -> Result<Vec<Duration>> {
    let mut sandbox = Sandbox::create(engine, SandboxSpec::new(Runtime::Python, code.path()))?;
    let (event, _) = event();
    sandbox.invoke(&event, &InvokeOptions::default())?;
    let mut out = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let call = sandbox.invoke(&event, &InvokeOptions::default())?;
        out.push(t.elapsed());
        if !call.outcome.is_success() {
            bail!("warm call failed: {:?}", call.outcome);
        }
    }
    sandbox.shutdown()?;
    out.sort();
    Ok(out)
}

/// Warm calls per second with `sandboxes` Python hello sandboxes, each called in a loop by
/// its own thread for `period`.
pub fn warm_throughput(
    engine: &Engine,
    code: &Code,
    sandboxes: usize,
    period: Duration,
) -> Result<f64> {
    let (event, _) = event();
    let mut started = Vec::new();
    for _ in 0..sandboxes.max(1) {
        let mut s = Sandbox::create(engine, SandboxSpec::new(Runtime::Python, code.path()))?;
        s.invoke(&event, &InvokeOptions::default())?;
        started.push(s);
    }
    let begin = Instant::now();
    let workers: Vec<_> = started
        .into_iter()
        .map(|mut s| {
            let event = event.clone();
            std::thread::spawn(move || -> Result<u64> {
                let mut n = 0u64;
                while begin.elapsed() < period {
                    let call = s.invoke(&event, &InvokeOptions::default())?;
                    if !call.outcome.is_success() {
                        bail!("warm call failed: {:?}", call.outcome);
                    }
                    n += 1;
                }
                s.shutdown()?;
                Ok(n)
            })
        })
        .collect();
    let mut calls = 0;
    for w in workers {
        calls += w
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(calls as f64 / begin.elapsed().as_secs_f64())
}

/// What holding many idle warm sandboxes costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Density {
    /// Sandboxes asked for and started (each served one call).
    pub wanted: usize,
    pub started: usize,
    /// Of those, how many answered a second call after all were up.
    pub answered: usize,
    /// Wall time to start them all, one after another.
    pub start_all: Duration,
    /// Charged to each sandbox's cgroup plus its shim's resident memory, on average.
    pub charged_per_sandbox: u64,
    /// The fall in the host's MemAvailable while they were up, per sandbox.
    pub host_per_sandbox: u64,
    /// Why starting stopped early, if it did.
    pub stopped_by: Option<String>,
}

/// Starts `n` Python hello sandboxes, each serving one call, keeps them all up and idle,
/// measures what they cost, checks that each still answers, then stops them.
pub fn density(engine: &Engine, code: &Code, n: usize) -> Result<Density> {
    let (event, _) = event();
    let available = || kib_field("/proc/meminfo", "MemAvailable:") * 1024;
    let before = available();
    let mut sandboxes = Vec::new();
    let mut stopped_by = None;
    let begin = Instant::now();
    for _ in 0..n {
        let started = Sandbox::create(engine, SandboxSpec::new(Runtime::Python, code.path()))
            .and_then(|mut s| s.invoke(&event, &InvokeOptions::default()).map(|_| s));
        match started {
            Ok(s) => sandboxes.push(s),
            Err(e) => {
                stopped_by = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let start_all = begin.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = available();
    let mut charged = 0u64;
    for s in &sandboxes {
        let dir = &engine.cgroup_dirs(s.id())[0];
        let cgroup = ["memory.usage_in_bytes", "memory.current"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let shim = s.pid().and_then(parent_pid).map(rss_bytes).unwrap_or(0);
        charged += cgroup + shim;
    }
    let mut answered = 0;
    for s in &mut sandboxes {
        if s.invoke(&event, &InvokeOptions::default()).is_ok() {
            answered += 1;
        }
    }
    let started = sandboxes.len();
    for s in sandboxes {
        s.shutdown()?;
    }
    let per = |total: u64| total / started.max(1) as u64;
    Ok(Density {
        wanted: n,
        started,
        answered,
        start_all,
        charged_per_sandbox: per(charged),
        host_per_sandbox: per(before.saturating_sub(after)),
        stopped_by,
    })
}

/// Host memory per idle Python hello sandbox, in bytes: what its cgroup is charged, plus the
/// resident memory of the shim that owns it, averaged over `n` sandboxes up at once.
pub fn idle_memory(engine: &Engine, code: &Code, n: usize) -> Result<u64> {
    Ok(density(engine, code, n)?.charged_per_sandbox)
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

fn rss_bytes(pid: i32) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:") * 1024
}

/// The number of a `Key:   123 kB` line of a procfs file (0 if there is none).
fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| cloudfunc_server::metrics::proc_field(&text, key))
        .unwrap_or(0)
}

/// One cold start through cloudfunc's engine.
pub fn run_cloudfunc(engine: &Engine, workload: Workload, code: &Code) -> Result<Duration> {
    let start = Instant::now();
    match workload {
        Workload::True => {
            let out =
                engine.run_command(&["/bin/true"], Limits::default(), Duration::from_secs(30))?;
            if out.exit != Some(cloudfunc_sandbox::ExitKind::Code(0)) {
                bail!("/bin/true ended with {:?}", out.exit);
            }
        }
        Workload::Hello(runtime) => {
            let mut sandbox = Sandbox::create(engine, SandboxSpec::new(runtime, code.path()))?;
            let (event, expected) = event();
            let call = sandbox.invoke(&event, &InvokeOptions::default())?;
            if call.outcome != (cloudfunc_sandbox::Outcome::Succeeded { result: expected }) {
                bail!("unexpected outcome {:?}", call.outcome);
            }
            sandbox.shutdown()?;
        }
    }
    Ok(start.elapsed())
}

/// One cold start of the same program on the bare host, without any isolation.
pub fn run_host(workload: Workload, code: &Code) -> Result<Duration> {
    let start = Instant::now();
    match workload {
        Workload::True => {
            let status = Command::new("/bin/true").status()?;
            if !status.success() {
                bail!("/bin/true failed");
            }
        }
        Workload::Hello(runtime) => {
            let image = std::env::temp_dir().join("cloudfunc-bench-bootstrap");
            std::fs::create_dir_all(&image)?;
            let (name, source) = runtime.bootstrap();
            let path = image.join(name);
            let entry = image.join(runtime.entry());
            if std::fs::read_to_string(&path).ok().as_deref() != Some(source) || !entry.exists() {
                std::fs::write(&path, source)?;
                if runtime == Runtime::Python {
                    let python = std::path::Path::new(runtime.interpreter());
                    cloudfunc_images::runtime::compile_python_bootstrap(python, &path, &entry)?;
                }
            }
            let inside = format!(
                "{}/{}",
                cloudfunc_images::runtime::BOOTSTRAP_DIR,
                runtime.entry()
            );
            let mut args = runtime.process_args();
            for arg in &mut args {
                *arg = arg.replace(&inside, &entry.to_string_lossy());
            }
            let child = Command::new(&args[0])
                .args(&args[1..])
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("CLOUDFUNC_CODE_DIR", code.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            converse(child)?;
        }
    }
    Ok(start.elapsed())
}

/// An OCI runtime CLI (runc, crun, runsc) running the same bundle as cloudfunc.
#[derive(Debug)]
pub struct OciCli {
    /// The runtime's name in tables.
    pub name: &'static str,
    kind: BackendKind,
    binary: PathBuf,
    root: tempfile::TempDir,
}

/// Where the runtimes' state goes: on a tmpfs, as their default (`/run/runc`, `/run/crun`) is
/// on a standard host and as cloudfunc's engine keeps its own, so that none of them pays for
/// a disk the others do not. `/dev/shm` where it is a tmpfs, else the temporary directory.
pub fn runtime_state_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let tmpfs = nix::sys::statfs::statfs(shm)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if tmpfs {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl OciCli {
    /// The command line of `kind`'s runtime, if it is installed.
    pub fn find(kind: BackendKind) -> Option<OciCli> {
        let binary = PathBuf::from(kind.binary()?);
        if !binary.exists() {
            return None;
        }
        let name = kind.name();
        let root = tempfile::Builder::new()
            .prefix(&format!("cloudfunc-bench-{name}-"))
            .tempdir_in(runtime_state_parent())
            .ok()?;
        Some(OciCli {
            name,
            kind,
            binary,
            root,
        })
    }

    /// One cold start: `<runtime> run` of a freshly written bundle, then its removal.
    pub fn run(
        &self,
        engine: &Engine,
        workload: Workload,
        code: &Code,
        id: &str,
    ) -> Result<Duration> {
        let bundle = tempfile::Builder::new()
            .prefix("cloudfunc-bench-bundle-")
            .tempdir()?;
        let code_dir = matches!(workload, Workload::Hello(_)).then(|| code.path());
        engine.export_bundle(
            id,
            workload.process(),
            code_dir,
            Limits::default(),
            self.kind,
            bundle.path(),
        )?;
        let start = Instant::now();
        let child = Command::new(&self.binary)
            .args(self.kind.global_flags())
            .arg("--root")
            .arg(self.root.path())
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        match workload {
            Workload::True => {
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!(
                        "{} run failed: {}",
                        self.name,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            Workload::Hello(_) => converse(child).with_context(|| format!("{} run", self.name))?,
        }
        Ok(start.elapsed())
    }
}

/// Speaks the bootstrap protocol over a child's stdio: init, one event, end of input.
fn converse(mut child: Child) -> Result<()> {
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let (event, expected) = event();
    stdin.write_all(&encode(&json!({"handler": null})))?;
    stdin.write_all(&encode(&json!({"event": event, "context": {}})))?;
    match read_reply(&mut stdout)? {
        Reply::Ready { .. } => {}
        other => bail!("expected ready, got {other:?}"),
    }
    match read_reply(&mut stdout)? {
        Reply::Result(v) if v == expected => {}
        other => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("expected {expected}, got {other:?} {err}")
        }
    }
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("the runtime exited with {status}");
    }
    Ok(())
}

fn read_reply(from: &mut impl Read) -> Result<Reply> {
    let mut reader = FrameReader::new(1 << 20);
    let mut byte = vec![0u8; 1 << 16];
    loop {
        let want = reader.wanted().min(byte.len());
        let n = from.read(&mut byte[..want])?;
        if n == 0 {
            bail!("the sandbox closed its output");
        }
        if let Some(body) = reader.feed(&byte[..n])? {
            return Ok(parse_reply(&body)?);
        }
    }
}

/// The median of some durations.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
