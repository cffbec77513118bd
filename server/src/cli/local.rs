//! `cloudfunc run DIR`: runs a function locally in one sandbox, with no server, and prints
//! each call's record as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use cloudfunc_sandbox::{
    BackendKind, Engine, EngineConfig, InvokeOptions, Limits, Runtime, Sandbox, SandboxSpec,
};
use serde_json::{json, Value};

use super::{Cli, Command};
use crate::config::defaults;
use crate::platform::guess_runtime;

/// What `run` takes.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The function's directory.
    pub dir: PathBuf,
    /// The event, as JSON; @FILE reads it from a file, - from standard input.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// python or node (default: guessed from the file names).
    #[arg(long)]
    pub runtime: Option<Runtime>,
    /// module.function (default: the runtime's conventions).
    #[arg(long)]
    pub handler: Option<String>,
    /// Seconds.
    #[arg(long, default_value_t = defaults::TIMEOUT_MS as f64 / 1000.0)]
    pub timeout: f64,
    /// MiB.
    #[arg(long, default_value_t = defaults::MEMORY_MB)]
    pub memory: u64,
    /// Millicores.
    #[arg(long, default_value_t = defaults::CPU_MILLICORES)]
    pub cpu: u32,
    /// Environment variables.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Invoke this many times in the same sandbox (the first is cold, the rest warm).
    #[arg(long, default_value_t = 1)]
    pub times: u32,
    /// The runtime: libcontainer, runc, crun, or runsc (gVisor).
    #[arg(long, default_value = "libcontainer")]
    pub backend: BackendKind,
    /// Container state (default: a directory of its own beside the server's, removed after,
    /// so that it runs beside a server and beside other runs).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Image skeletons.
    #[arg(long, env = "CLOUDFUNC_IMAGES_DIR", default_value = defaults::IMAGES_DIR)]
    pub images_dir: PathBuf,
}

/// Runs it; `Ok(false)` when a call did not succeed.
pub fn run(cli: &Cli) -> Result<bool> {
    let Command::Run(args) = &cli.command else {
        bail!("not run");
    };
    let Some(state_dir) = &args.state_dir else {
        // A server's engine holds its state directory, and so would another run's.
        let own = PathBuf::from(format!(
            "{}-run-{}",
            defaults::STATE_DIR,
            std::process::id()
        ));
        let ran = run_in(args, &own);
        let _ = std::fs::remove_dir_all(&own);
        return ran;
    };
    run_in(args, state_dir)
}

/// [`run`] with its engine's state in `state_dir`; the engine is gone when it returns.
fn run_in(args: &RunArgs, state_dir: &std::path::Path) -> Result<bool> {
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("no function directory {}", args.dir.display()))?;
    let event: Value = super::data_arg(&args.data)?;
    let runtime = match args.runtime {
        Some(runtime) => runtime,
        None => guess_runtime(&dir).with_context(|| {
            format!(
                "cannot tell the runtime of {}: pass --runtime python|node",
                dir.display()
            )
        })?,
    };
    if !args.timeout.is_finite() || args.timeout <= 0.0 {
        bail!("--timeout must be a positive number of seconds");
    }
    let mut vars = BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))?;
        vars.insert(k.to_string(), v.to_string());
    }
    let config = EngineConfig {
        state_dir: state_dir.to_path_buf(),
        images_dir: args.images_dir.clone(),
        cgroup_parent: format!("cloudfunc-run-{}", std::process::id()),
        backend: args.backend,
        ..EngineConfig::default()
    };
    let engine = Engine::new(config).context("starting the sandbox engine")?;
    let mut spec = SandboxSpec::new(runtime, &dir);
    spec.handler = args.handler.clone();
    spec.env = vars;
    spec.function_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    spec.limits = Limits {
        memory_bytes: args.memory * 1024 * 1024,
        cpu_millicores: args.cpu,
        ..Limits::default()
    };
    let mut sandbox = Sandbox::create(&engine, spec)?;
    let options = InvokeOptions {
        timeout: Duration::from_secs_f64(args.timeout),
        request_id: String::new(),
    };
    let mut all_ok = true;
    for _ in 0..args.times {
        let call = sandbox.invoke(&event, &options)?;
        all_ok &= call.outcome.is_success();
        super::say(
            json!({"backend": engine.backend_name(), "handler": sandbox.handler(), "invocation": call}),
        )?;
        if !sandbox.is_alive() {
            break;
        }
    }
    sandbox.shutdown()?;
    Ok(all_ok)
}
