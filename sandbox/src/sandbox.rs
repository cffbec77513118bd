//! One sandbox: a started container whose bootstrap has loaded a function and serves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudfunc_bundles::{Limits, Process};
use cloudfunc_images::Runtime;
use serde_json::{json, Value};

use crate::backend::Container;
use crate::cgroup::{CgroupSnapshot, SandboxCgroup, UsageReader};
use crate::channel::{pipe, Exchange, Pipes};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::outcome::{Invocation, Outcome, Usage};
use crate::protocol::{
    encode, parse_reply, parse_reply_flagged, FrameError, ProtocolError, Reply, ReplyFailure,
};

/// A function to run: its code, runtime and limits.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The language runtime.
    pub runtime: Runtime,
    /// The directory holding the function's code (mounted read-only at `/code`).
    pub code_dir: PathBuf,
    /// `module.function`, `function`, or `None` to find it by convention.
    pub handler: Option<String>,
    /// Resource limits.
    pub limits: Limits,
    /// Environment variables the function sees.
    pub env: BTreeMap<String, String>,
    /// The function's name, as handlers see it in their context.
    pub function_name: String,
    /// The function's version, likewise.
    pub function_version: String,
}

impl SandboxSpec {
    /// A spec with default limits and no environment.
    pub fn new(runtime: Runtime, code_dir: impl Into<PathBuf>) -> Self {
        SandboxSpec {
            runtime,
            code_dir: code_dir.into(),
            handler: None,
            limits: Limits::default(),
            env: BTreeMap::new(),
            function_name: String::new(),
            function_version: String::new(),
        }
    }
}

/// Per-call settings.
#[derive(Debug, Clone)]
pub struct InvokeOptions {
    /// Wall-clock limit; past it every process of the sandbox is killed.
    pub timeout: Duration,
    /// An id the function sees as `context.request_id`.
    pub request_id: String,
}

impl Default for InvokeOptions {
    fn default() -> Self {
        InvokeOptions {
            timeout: Duration::from_secs(30),
            request_id: String::new(),
        }
    }
}

/// A running sandbox with a function loaded. Dropping it tears it down (use
/// [`Sandbox::shutdown`] to see teardown errors).
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    engine: Engine,
    container: Option<Box<dyn Container>>,
    pipes: Pipes,
    cgroup: Box<dyn UsageReader>,
    spec: SandboxSpec,
    handler: String,
    runtime_version: String,
    init_duration: Duration,
    calls: u64,
    alive: bool,
    /// The cgroup's counters as the last call ended (its peak was reset right after): where
    /// the next call's usage starts, so a warm call reads the counters once, not twice.
    counters: Option<CgroupSnapshot>,
}

fn validate(spec: &SandboxSpec) -> Result<()> {
    spec.limits.validate().map_err(Error::InvalidSpec)?;
    if !spec.code_dir.is_absolute() || !spec.code_dir.is_dir() {
        return Err(Error::InvalidSpec(format!(
            "the code directory {} must be an existing absolute path",
            spec.code_dir.display()
        )));
    }
    for key in spec.env.keys() {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::InvalidSpec(format!(
                "environment variable name {key:?} is not [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
    }
    Ok(())
}

/// A call's request, borrowing its event rather than copying it into a new JSON value.
#[derive(serde::Serialize)]
struct CallFrame<'a> {
    event: &'a Value,
    context: CallContext<'a>,
}

/// What the handler's context object is made of.
#[derive(serde::Serialize)]
struct CallContext<'a> {
    request_id: &'a str,
    function_name: &'a str,
    function_version: &'a str,
    memory_limit_mb: u64,
    deadline_ms: u64,
}

impl Sandbox {
    /// Starts a sandbox for `spec` and waits until its handler is loaded.
    pub fn create(engine: &Engine, spec: SandboxSpec) -> Result<Sandbox> {
        validate(&spec)?;
        let started = Instant::now();
        let id = engine.next_id();
        let env = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let code_dir = spec.code_dir.clone();
        let mut sandbox = Sandbox::launch(engine, id, &code_dir, env, spec)?;
        sandbox.initialise(started, None)?;
        Ok(sandbox)
    }

    /// Starts the container with the bootstrap of `spec.runtime` and `code_dir` at `/code`;
    /// the bootstrap then waits for its init.
    fn launch(
        engine: &Engine,
        id: String,
        code_dir: &Path,
        env: Vec<String>,
        spec: SandboxSpec,
    ) -> Result<Sandbox> {
        let (req_r, req_w) = pipe().map_err(Error::Pipe)?;
        let (res_r, res_w) = pipe().map_err(Error::Pipe)?;
        let (log_r, log_w) = pipe().map_err(Error::Pipe)?;
        let container = engine.launch(
            &id,
            Process::Bootstrap(spec.runtime),
            Some(code_dir),
            spec.limits,
            env,
            [req_r, res_w, log_w],
        )?;
        let config = engine.config();
        let pipes = Pipes::new(
            req_w,
            res_r,
            log_r,
            config.max_log_bytes,
            config.max_output_bytes + 4096,
        )
        .map_err(Error::Pipe)?;
        let cgroup: SandboxCgroup = engine.inner.cgroups.sandbox(&engine.cgroup_path(&id));
        Ok(Sandbox {
            id,
            engine: engine.clone(),
            container: Some(container),
            pipes,
            cgroup: Box::new(cgroup),
            spec,
            handler: String::new(),
            runtime_version: String::new(),
            init_duration: Duration::ZERO,
            calls: 0,
            alive: true,
            counters: None,
        })
    }

    /// Sends the init (with the function's environment, for a sandbox started before it knew
    /// its function) and waits for the handler to load. On failure the sandbox is torn down.
    fn initialise(
        &mut self,
        started: Instant,
        env: Option<&BTreeMap<String, String>>,
    ) -> Result<()> {
        let config = self.engine.config().clone();
        let mut init = json!({
            "handler": self.spec.handler,
            "max_output_bytes": config.max_output_bytes,
        });
        if let Some(env) = env {
            init["env"] = json!(env);
        }
        let deadline = started + config.start_timeout;
        let exchanged = self
            .pipes
            .exchange(&encode(&init), deadline)
            .map_err(Error::Pipe)?;
        let failure = match exchanged {
            Exchange::Reply(body) => match parse_reply(&body) {
                Ok(Reply::Ready { handler, runtime }) => {
                    self.handler = handler;
                    self.runtime_version = runtime;
                    self.init_duration = started.elapsed();
                    // Whatever loading the module printed belongs to the first call's logs.
                    return Ok(());
                }
                Ok(Reply::Failed {
                    kind: ReplyFailure::InitFailed,
                    error,
                }) => {
                    self.pipes.drain_logs(Duration::from_millis(100));
                    Error::FunctionInit {
                        error,
                        logs: self.pipes.capture.take(),
                    }
                }
                Ok(other) => Error::InitCrashed {
                    exit: format!("unexpected reply while loading: {other:?}"),
                    logs: self.pipes.capture.take(),
                },
                Err(e) => Error::InitCrashed {
                    exit: e.to_string(),
                    logs: self.pipes.capture.take(),
                },
            },
            Exchange::Closed => {
                self.pipes.drain_logs(Duration::from_millis(200));
                let exit = self.exit_status();
                Error::InitCrashed {
                    exit,
                    logs: self.pipes.capture.take(),
                }
            }
            Exchange::TimedOut => Error::StartTimeout(config.start_timeout),
            Exchange::TooLarge(e) => Error::InitCrashed {
                exit: e.to_string(),
                logs: self.pipes.capture.take(),
            },
        };
        let _ = self.teardown();
        Err(failure)
    }

    /// The runtime that runs it (`libcontainer`, `runc`, `crun`, `runsc`).
    pub fn backend_name(&self) -> &'static str {
        self.engine.backend_name()
    }

    /// The sandbox's id (also its container id and cgroup name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The handler the bootstrap resolved (`function.handler`, `index.handler`, ...).
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The runtime's version inside the sandbox.
    pub fn runtime_version(&self) -> &str {
        &self.runtime_version
    }

    /// How long the sandbox took to start and load its handler.
    pub fn init_duration(&self) -> Duration {
        self.init_duration
    }

    /// Whether the sandbox can serve another call.
    pub fn is_alive(&self) -> bool {
        self.alive
    }

    /// The pid of the sandbox's init on the host.
    pub fn pid(&self) -> Option<i32> {
        self.container.as_ref().map(|c| c.pid())
    }

    /// Runs the function once with `event`.
    pub fn invoke(&mut self, event: &Value, options: &InvokeOptions) -> Result<Invocation> {
        let (frame, before) = self.begin(event, options)?;
        let start = Instant::now();
        let exchanged = self.pipes.exchange(&frame, start + options.timeout);
        Ok(self.finish(Exchanged::new(before, start, options, exchanged)))
    }

    /// [`Sandbox::invoke`] for a task on a tokio runtime: the task waits for the reply in the
    /// runtime's reactor instead of holding a thread. What it returns becomes the
    /// invocation through [`Sandbox::finish`], which returns at once when the function
    /// answered and the sandbox serves on ([`Exchanged::finishes_at_once`]); otherwise it
    /// kills the sandbox and waits for it, so call it where blocking is allowed.
    pub async fn invoke_async(
        &mut self,
        event: &Value,
        options: &InvokeOptions,
    ) -> Result<Exchanged> {
        let (frame, before) = self.begin(event, options)?;
        let start = Instant::now();
        let exchanged = self
            .pipes
            .exchange_async(&frame, start + options.timeout)
            .await;
        Ok(Exchanged::new(before, start, options, exchanged))
    }

    /// What a call needs before its exchange: the request frame and the counters it starts
    /// from.
    fn begin(
        &mut self,
        event: &Value,
        options: &InvokeOptions,
    ) -> Result<(Vec<u8>, CgroupSnapshot)> {
        if !self.alive {
            return Err(Error::SandboxGone);
        }
        let before = match self.counters.take() {
            Some(counters) => counters,
            None => {
                let before = self.cgroup.snapshot().unwrap_or_default();
                self.cgroup.reset_peak();
                before
            }
        };
        let deadline_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(options.timeout)
            .as_millis();
        let frame = encode(&CallFrame {
            event,
            context: CallContext {
                request_id: &options.request_id,
                function_name: &self.spec.function_name,
                function_version: &self.spec.function_version,
                memory_limit_mb: self.spec.limits.memory_mib(),
                deadline_ms: u64::try_from(deadline_ms).unwrap_or(u64::MAX),
            },
        });
        Ok((frame, before))
    }

    /// Turns an exchange into the call's invocation: its outcome, logs and usage. Blocks
    /// (kills the sandbox and waits for it) unless [`Exchanged::finishes_at_once`].
    pub fn finish(&mut self, call: Exchanged) -> Invocation {
        let Exchanged {
            before,
            duration,
            timeout,
            ended,
        } = call;
        let outcome = match ended {
            Ended::Failed(e) => {
                self.alive = false;
                Outcome::SandboxFailure {
                    message: format!("sandbox I/O failed: {e}"),
                }
            }
            Ended::Replied(Ok((reply, true))) => {
                // The call left work the bootstrap could not end: no more calls here, and
                // nothing of it keeps running meanwhile (init's death ends the namespace).
                let outcome = self.outcome_of(reply);
                self.kill_keeping_logs();
                outcome
            }
            Ended::Replied(Ok((reply, false))) => self.outcome_of(reply),
            Ended::Replied(Err(e)) => self.broke_protocol(&format!("a malformed reply ({})", e.0)),
            Ended::TooLarge(e) => {
                // The stream is out of step now; the sandbox cannot be trusted with another call.
                self.kill();
                Outcome::OutputTooLarge {
                    limit_bytes: self.engine.config().max_output_bytes,
                    message: e.to_string(),
                }
            }
            Ended::TimedOut => {
                self.kill_keeping_logs();
                Outcome::Timeout {
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                }
            }
            Ended::Closed => {
                self.pipes.drain_logs(Duration::from_millis(200));
                let exit = self.exit_status();
                self.alive = false;
                let after = self.cgroup.snapshot().unwrap_or_default();
                if after.oom_kills > before.oom_kills {
                    Outcome::OutOfMemory {
                        limit_bytes: self.spec.limits.memory_bytes,
                    }
                } else {
                    Outcome::Crashed { exit }
                }
            }
        };
        let after = self.cgroup.snapshot();
        if self.alive && after.is_ok() {
            self.cgroup.reset_peak();
            self.counters = after.as_ref().ok().copied();
        }
        let after = after.unwrap_or(before);
        let mut usage = usage(
            &before,
            &after,
            duration,
            self.calls == 0,
            self.init_duration,
        );
        usage.peak_memory_scope = self.cgroup.peak_scope();
        self.calls += 1;
        Invocation {
            outcome,
            logs: self.pipes.capture.take(),
            usage,
        }
    }

    fn outcome_of(&mut self, reply: Reply) -> Outcome {
        match reply {
            Reply::Result(result) => Outcome::Succeeded { result },
            Reply::Failed { kind, error } => match kind {
                ReplyFailure::Raised => Outcome::Raised { error },
                ReplyFailure::NotSerializable => Outcome::OutputNotSerializable { error },
                ReplyFailure::TooLarge => Outcome::OutputTooLarge {
                    limit_bytes: self.engine.config().max_output_bytes,
                    message: error.message,
                },
                ReplyFailure::InitFailed => self.broke_protocol("a load failure mid-call"),
            },
            Reply::Ready { .. } => self.broke_protocol("a ready message for a call"),
        }
    }

    /// A call answered against the protocol. The reply channel is open in the function's
    /// process (the bootstrap runs there), so what comes down it is the function's to forge:
    /// as far as the host can tell this is the function's doing, like a crash, and no failure
    /// of the sandbox's (which a hostile function could otherwise report at will, raising the
    /// platform's alerts). The stream is out of step: the sandbox is stopped.
    fn broke_protocol(&mut self, why: &str) -> Outcome {
        self.kill_keeping_logs();
        Outcome::Crashed {
            exit: format!("stopped for breaking the reply protocol: {why}"),
        }
    }

    /// Kills the sandbox mid-call, then takes in what the call printed before it died.
    fn kill_keeping_logs(&mut self) {
        self.kill();
        self.pipes.drain_logs(Duration::from_millis(100));
    }

    /// Kills every process in the sandbox and waits for init to exit.
    fn kill(&mut self) {
        self.alive = false;
        if let Some(container) = self.container.as_mut() {
            let _ = container.kill();
            let _ = container.wait_exit(Duration::from_secs(5));
        }
    }

    fn exit_status(&mut self) -> String {
        match self
            .container
            .as_mut()
            .map(|c| c.wait_exit(Duration::from_secs(5)))
        {
            Some(Ok(Some(kind))) => kind.to_string(),
            Some(Ok(None)) => {
                // The reply channel closed but init lives on: make sure nothing does.
                self.kill();
                "the runtime closed its reply channel".into()
            }
            Some(Err(e)) => format!("unknown ({e})"),
            None => "unknown".into(),
        }
    }

    fn teardown(&mut self) -> Result<()> {
        self.alive = false;
        self.pipes.close_requests();
        let Some(mut container) = self.container.take() else {
            return self.engine.cleanup(&self.id);
        };
        // The backend kills and deletes the container while the bundle goes here: nothing
        // reads the bundle once the container has started.
        let begun = container.begin_destroy();
        let bundle = self.engine.remove_bundle(&self.id);
        let destroyed = begun.and(container.destroy()).map_err(Error::Backend);
        let cgroup = match destroyed {
            Ok(true) => Ok(()),
            _ => self.engine.remove_cgroup(&self.id),
        };
        destroyed.map(|_| ()).and(bundle).and(cgroup)
    }

    /// Stops the sandbox and removes everything it had: processes, cgroup, state, bundle.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.container.is_some() {
            let _ = self.teardown();
        }
    }
}

fn usage(
    before: &CgroupSnapshot,
    after: &CgroupSnapshot,
    duration: Duration,
    cold: bool,
    init: Duration,
) -> Usage {
    Usage {
        duration,
        init_duration: if cold { init } else { Duration::ZERO },
        cpu_time: Duration::from_nanos(after.cpu_total_ns.saturating_sub(before.cpu_total_ns)),
        cpu_user: Duration::from_nanos(after.cpu_user_ns.saturating_sub(before.cpu_user_ns)),
        cpu_system: Duration::from_nanos(after.cpu_system_ns.saturating_sub(before.cpu_system_ns)),
        peak_memory_bytes: after.memory_peak_bytes,
        peak_memory_scope: crate::cgroup::PeakScope::Call,
        cold,
    }
}

/// A call whose exchange has ended, for [`Sandbox::finish`] to make an [`Invocation`] of
/// (see [`Sandbox::invoke_async`]).
#[derive(Debug)]
pub struct Exchanged {
    before: CgroupSnapshot,
    duration: Duration,
    timeout: Duration,
    ended: Ended,
}

/// How a call's exchange ended, its reply parsed.
#[derive(Debug)]
enum Ended {
    Failed(std::io::Error),
    /// The reply, and whether the call left work behind that the bootstrap could not end.
    Replied(std::result::Result<(Reply, bool), ProtocolError>),
    TooLarge(FrameError),
    TimedOut,
    Closed,
}

impl Exchanged {
    fn new(
        before: CgroupSnapshot,
        start: Instant,
        options: &InvokeOptions,
        exchanged: std::io::Result<Exchange>,
    ) -> Exchanged {
        let duration = start.elapsed();
        let ended = match exchanged {
            Err(e) => Ended::Failed(e),
            Ok(Exchange::Reply(body)) => Ended::Replied(parse_reply_flagged(&body)),
            Ok(Exchange::TooLarge(e)) => Ended::TooLarge(e),
            Ok(Exchange::TimedOut) => Ended::TimedOut,
            Ok(Exchange::Closed) => Ended::Closed,
        };
        Exchanged {
            before,
            duration,
            timeout: options.timeout,
            ended,
        }
    }

    /// Whether [`Sandbox::finish`] returns at once: the function answered (a result or an
    /// error of its own) and the sandbox serves on. Every other end kills the sandbox.
    pub fn finishes_at_once(&self) -> bool {
        matches!(
            &self.ended,
            Ended::Replied(Ok((
                Reply::Result(_)
                    | Reply::Failed {
                        kind: ReplyFailure::Raised
                            | ReplyFailure::NotSerializable
                            | ReplyFailure::TooLarge,
                        ..
                    },
                false
            )))
        )
    }
}

/// A sandbox started ahead of need for a runtime, not yet given a function ("stem cell"): the
/// container is up and the language runtime loaded, waiting for its init. Its `/code` is its
/// own empty directory, mounted read-only. [`StemCell::bind`] copies a function's code there,
/// sets its limits and loads it; from then on the sandbox serves that function only.
#[derive(Debug)]
pub struct StemCell {
    sandbox: Sandbox,
    code_dir: PathBuf,
    limits: cloudfunc_bundles::Limits,
}

impl StemCell {
    /// Starts a stem cell for `runtime` with `limits` (those a function cannot change later on
    /// this engine's kernel: its tmpfs size, its open files, and under gVisor its pids).
    pub fn start(
        engine: &Engine,
        runtime: Runtime,
        limits: cloudfunc_bundles::Limits,
    ) -> Result<StemCell> {
        limits.validate().map_err(Error::InvalidSpec)?;
        let id = engine.next_id();
        let code_dir = engine.cell_code_dir(&id)?;
        let mut spec = SandboxSpec::new(runtime, &code_dir);
        spec.limits = limits;
        let sandbox = match Sandbox::launch(engine, id.clone(), &code_dir, Vec::new(), spec) {
            Ok(s) => s,
            Err(e) => {
                let _ = engine.cleanup(&id);
                return Err(e);
            }
        };
        Ok(StemCell {
            sandbox,
            code_dir,
            limits,
        })
    }

    /// The runtime it was started with.
    pub fn runtime(&self) -> Runtime {
        self.sandbox.spec.runtime
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.sandbox.id
    }

    /// Whether `spec` can be served by this cell: same runtime, and the limits fixed at start
    /// are the same.
    pub fn fits(&self, spec: &SandboxSpec) -> bool {
        let (a, b) = (&self.limits, &spec.limits);
        let pids_fixed =
            self.sandbox.engine.guest_kernel() == cloudfunc_bundles::GuestKernel::Gvisor;
        spec.runtime == self.runtime()
            && a.tmp_bytes == b.tmp_bytes
            && a.nofile == b.nofile
            && (!pids_fixed || a.pids == b.pids)
    }

    /// Gives the cell its function: copies the code, applies the limits, sends the init with
    /// the environment, and waits for the handler to load. The sandbox's init duration is this
    /// bind's.
    pub fn bind(self, spec: SandboxSpec) -> Result<Sandbox> {
        let started = Instant::now();
        validate(&spec)?;
        if !self.fits(&spec) {
            return Err(Error::InvalidSpec(format!(
                "a pre-started {} sandbox cannot take this function (runtime or fixed limits differ)",
                self.runtime()
            )));
        }
        let StemCell {
            mut sandbox,
            code_dir,
            limits,
        } = self;
        copy_code(&spec.code_dir, &code_dir).map_err(Error::io(&spec.code_dir))?;
        if spec.limits != limits {
            let l = &spec.limits;
            let engine = &sandbox.engine;
            engine
                .inner
                .cgroups
                .sandbox(&engine.cgroup_path(&sandbox.id))
                .set_limits(
                    l.memory_bytes,
                    l.cpu_quota_us(),
                    cloudfunc_bundles::Limits::CPU_PERIOD_US,
                    engine.guest_kernel().host_pids(l.pids),
                )
                .map_err(Error::Cgroup)?;
        }
        let env = spec.env.clone();
        sandbox.spec = spec;
        sandbox.initialise(started, Some(&env))?;
        Ok(sandbox)
    }

    /// Stops the cell and removes everything it had.
    pub fn shutdown(self) -> Result<()> {
        self.sandbox.shutdown()
    }
}

/// Copies a code tree: directories 0755, files 0644 (0755 if executable), owned by us, so the
/// function can read but never change them. Symbolic links are not followed or copied.
fn copy_code(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            std::fs::create_dir_all(&target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
            copy_code(&entry.path(), &target)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode();
            std::fs::copy(entry.path(), &target)?;
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}
