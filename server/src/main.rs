//! `cloudfunc`: the platform's binary. For now it runs one function in a sandbox from a
//! directory of code and prints the invocation record; the REST server, storage and queue
//! are built on the same engine.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cloudfunc_sandbox::{
    Engine, EngineConfig, InvokeOptions, Limits, Runtime, Sandbox, SandboxSpec,
};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "cloudfunc",
    version,
    about = "Run Python and JavaScript functions in isolated, limited sandboxes"
)]
struct Cli {
    /// Where the engine keeps bundles, container state and its lock.
    #[arg(
        long,
        env = "CLOUDFUNC_STATE_DIR",
        default_value = "/run/cloudfunc",
        global = true
    )]
    state_dir: PathBuf,
    /// Where runtime images are prepared.
    #[arg(
        long,
        env = "CLOUDFUNC_IMAGES_DIR",
        default_value = "/var/lib/cloudfunc/images",
        global = true
    )]
    images_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the function in DIR once (or several times in one warm sandbox) and print each record.
    Run {
        /// Directory with the function's code (function.py, handler.py, main.py, index.js, ...).
        dir: PathBuf,
        /// The JSON event.
        #[arg(long, default_value = "{}")]
        data: String,
        /// python or node; guessed from the files when omitted.
        #[arg(long)]
        runtime: Option<String>,
        /// `module.function` when the conventions do not find it.
        #[arg(long)]
        handler: Option<String>,
        /// Seconds before every process of the sandbox is killed.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Memory limit in MiB (swap is capped to the same).
        #[arg(long, default_value_t = 256)]
        memory: u64,
        /// CPU limit in thousandths of a core.
        #[arg(long, default_value_t = 1000)]
        cpu: u32,
        /// Environment variables for the function, KEY=VALUE.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Invoke this many times in the same sandbox (the first is cold, the rest warm).
        #[arg(long, default_value_t = 1)]
        times: u32,
    },
}

fn guess_runtime(dir: &std::path::Path) -> Result<Runtime> {
    let has = |names: &[&str]| names.iter().any(|n| dir.join(n).exists());
    if has(&["function.py", "handler.py", "main.py"]) {
        Ok(Runtime::Python)
    } else if has(&[
        "index.js",
        "handler.js",
        "function.js",
        "main.js",
        "index.mjs",
    ]) {
        Ok(Runtime::Node)
    } else {
        bail!(
            "cannot tell the runtime of {}: pass --runtime python|node",
            dir.display()
        )
    }
}

fn run(cli: &Cli) -> Result<bool> {
    let Command::Run {
        dir,
        data,
        runtime,
        handler,
        timeout,
        memory,
        cpu,
        env,
        times,
    } = &cli.command;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("no function directory {}", dir.display()))?;
    let event: Value = serde_json::from_str(data).context("--data must be JSON")?;
    let runtime = match runtime {
        Some(name) => name.parse()?,
        None => guess_runtime(&dir)?,
    };
    if !timeout.is_finite() || *timeout <= 0.0 {
        bail!("--timeout must be a positive number of seconds");
    }
    let mut vars = BTreeMap::new();
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))?;
        vars.insert(k.to_string(), v.to_string());
    }
    let config = EngineConfig {
        state_dir: cli.state_dir.clone(),
        images_dir: cli.images_dir.clone(),
        ..EngineConfig::default()
    };
    let engine = Engine::new(config).context("starting the sandbox engine")?;
    let mut spec = SandboxSpec::new(runtime, &dir);
    spec.handler = handler.clone();
    spec.env = vars;
    spec.function_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    spec.limits = Limits {
        memory_bytes: memory * 1024 * 1024,
        cpu_millicores: *cpu,
        ..Limits::default()
    };
    let mut sandbox = Sandbox::create(&engine, spec)?;
    let options = InvokeOptions {
        timeout: Duration::from_secs_f64(*timeout),
        request_id: String::new(),
    };
    let mut all_ok = true;
    for _ in 0..*times {
        let call = sandbox.invoke(&event, &options)?;
        all_ok &= call.outcome.is_success();
        println!(
            "{}",
            json!({"backend": engine.backend_name(), "handler": sandbox.handler(), "invocation": call})
        );
        if !sandbox.is_alive() {
            break;
        }
    }
    sandbox.shutdown()?;
    Ok(all_ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cloudfunc: {e:#}");
            ExitCode::from(2)
        }
    }
}
