//! `cloudfunc`: the server (`serve`), its command-line client (`deploy`, `invoke`, `list`,
//! ...), a token minter (`token`) and a local runner (`run`) that needs no server.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use cloudfunc_sandbox::{
    BackendKind, Engine, EngineConfig, InvokeOptions, Limits, Sandbox, SandboxSpec,
};
use cloudfunc_server::client::{encode, Client};
use cloudfunc_server::isolation::Isolation;
use cloudfunc_server::platform::guess_runtime;
use cloudfunc_server::serve::{load_keys, serve, ServeConfig};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "cloudfunc",
    version,
    about = "Deploy and run Python and JavaScript functions in isolated, limited sandboxes"
)]
struct Cli {
    /// The server's data directory (database, code, JWT secret).
    #[arg(
        long,
        env = "CLOUDFUNC_DATA_DIR",
        default_value = "/var/lib/cloudfunc",
        global = true
    )]
    data_dir: PathBuf,
    /// The server, for client commands.
    #[arg(
        long,
        env = "CLOUDFUNC_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// A bearer token; by default one is minted from the local server's secret.
    #[arg(long, env = "CLOUDFUNC_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The tenant a minted token is for.
    #[arg(
        long,
        env = "CLOUDFUNC_TENANT",
        default_value = "default",
        global = true
    )]
    tenant: String,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server with its embedded defaults (SQLite in the data directory, port 8080).
    Serve(Box<ServeConfig>),
    /// Print a bearer token for a tenant, signed with the local server's secret.
    Token {
        /// Valid for this many seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: i64,
        /// An admin token sees every tenant.
        #[arg(long)]
        admin: bool,
    },
    /// Deploy a directory, a ZIP or a single file (a new function or its next version).
    Deploy {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        runtime: Option<String>,
        #[arg(long)]
        handler: Option<String>,
        /// Seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// container or gvisor (default: the server's).
        #[arg(long)]
        isolation: Option<Isolation>,
    },
    /// Run a function (NAME or NAME@VERSION) and print its result.
    Invoke {
        name: String,
        #[arg(long, default_value = "{}")]
        data: String,
        /// Queue it and print the task id instead of waiting.
        #[arg(long)]
        r#async: bool,
    },
    /// List functions.
    List,
    /// A task's status and result.
    Status { task: String },
    /// Logs of a task, or of a function's recent tasks.
    Logs { target: String },
    /// Metrics of a function over a range (15m, 1h, 7d).
    Metrics {
        name: String,
        #[arg(long, default_value = "24h")]
        range: String,
    },
    /// Versions of a function.
    Versions { name: String },
    /// Allow a function to run.
    Activate { name: String },
    /// Stop a function from running.
    Deactivate { name: String },
    /// Delete a function.
    Delete { name: String },
    /// Run the function in DIR locally, without a server, and print each record.
    Run {
        dir: PathBuf,
        #[arg(long, default_value = "{}")]
        data: String,
        #[arg(long)]
        runtime: Option<String>,
        #[arg(long)]
        handler: Option<String>,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        #[arg(long, default_value_t = 256)]
        memory: u64,
        #[arg(long, default_value_t = 1000)]
        cpu: u32,
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Invoke this many times in the same sandbox (the first is cold, the rest warm).
        #[arg(long, default_value_t = 1)]
        times: u32,
        /// The runtime: libcontainer, runc, crun, or runsc (gVisor).
        #[arg(long, default_value = "libcontainer")]
        backend: BackendKind,
        #[arg(long, env = "CLOUDFUNC_STATE_DIR", default_value = "/run/cloudfunc")]
        state_dir: PathBuf,
        #[arg(
            long,
            env = "CLOUDFUNC_IMAGES_DIR",
            default_value = "/var/lib/cloudfunc/images"
        )]
        images_dir: PathBuf,
    },
}

fn client(cli: &Cli) -> Result<Client> {
    Client::new(&cli.url, cli.token.clone(), &cli.data_dir, &cli.tenant)
}

fn print(cli: &Cli, value: &Value, text: impl FnOnce(&Value) -> String) {
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        println!("{}", text(value));
    }
}

fn task_text(t: &Value) -> String {
    let mut out = format!(
        "task {}  {}@{}  {}",
        t["task_id"].as_str().unwrap_or("?"),
        t["function"].as_str().unwrap_or("?"),
        t["version"],
        t["status"].as_str().unwrap_or("?")
    );
    if let Some(u) = t.get("usage").filter(|u| u.is_object()) {
        out += &format!(
            "  {:.1} ms{}  cpu {:.1} ms  mem {:.1} MiB  {} ({})",
            u["duration_ms"].as_f64().unwrap_or(0.0),
            if u["cold"].as_bool() == Some(true) {
                format!(
                    " (cold, init {:.1} ms)",
                    u["init_duration_ms"].as_f64().unwrap_or(0.0)
                )
            } else {
                " (warm)".into()
            },
            u["cpu_ms"].as_f64().unwrap_or(0.0),
            u["peak_memory_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            u["isolation"].as_str().unwrap_or("?"),
            u["backend"].as_str().unwrap_or("?")
        );
    }
    if let Some(r) = t.get("result") {
        out += &format!(
            "\nresult: {}",
            if let Some(s) = r.as_str() {
                s.to_string()
            } else {
                r.to_string()
            }
        );
    }
    if let Some(e) = t.get("error").filter(|e| e.is_object()) {
        out += &format!(
            "\nerror: {} {}: {}",
            e["kind"].as_str().unwrap_or(""),
            e["type"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        );
        if let Some(tb) = e["traceback"].as_str().filter(|s| !s.is_empty()) {
            out += &format!("\n{tb}");
        }
    }
    if let Some(logs) = t["logs"].as_str().filter(|s| !s.is_empty()) {
        out += &format!("\nlogs:\n{}", logs.trim_end());
    }
    out
}

fn deploy_archive(path: &Path) -> Result<Vec<u8>> {
    if path.is_dir() {
        return cloudfunc_server::archive::zip_dir(path)
            .with_context(|| format!("zipping {}", path.display()));
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(b"PK\x03\x04") {
        return Ok(bytes);
    }
    // A single code file: zip it alone.
    let dir = tempfile_dir()?;
    let name = path.file_name().context("the file has no name")?;
    std::fs::write(dir.join(name), &bytes)?;
    let zip = cloudfunc_server::archive::zip_dir(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(zip?)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "cloudfunc-deploy-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn run(cli: Cli) -> Result<bool> {
    match &cli.command {
        Command::Serve(config) => {
            let mut config = (**config).clone();
            config.data_dir = cli.data_dir.clone();
            serve(config).await?;
            Ok(true)
        }
        Command::Token { ttl, admin } => {
            let keys = load_keys(
                &cli.data_dir,
                std::env::var("CLOUDFUNC_JWT_SECRET").ok().as_deref(),
            )?;
            println!("{}", keys.mint(&cli.tenant, *admin, *ttl));
            Ok(true)
        }
        Command::Run { .. } => tokio::task::spawn_blocking(move || run_local(&cli)).await?,
        _ => tokio::task::spawn_blocking(move || client_command(&cli)).await?,
    }
}

fn client_command(cli: &Cli) -> Result<bool> {
    let c = client(cli)?;
    match &cli.command {
        Command::Deploy {
            path,
            name,
            runtime,
            handler,
            timeout,
            memory,
            isolation,
        } => {
            let zip = deploy_archive(path)?;
            let mut query = Vec::new();
            let default_name = if path.is_dir() || path.extension().is_some_and(|e| e == "zip") {
                path.canonicalize()
                    .ok()
                    .and_then(|p| p.file_stem().map(|n| n.to_string_lossy().into_owned()))
            } else {
                None
            };
            if let Some(n) = name.clone().or(default_name) {
                query.push(format!("name={}", encode(&n)));
            }
            for (k, v) in [
                ("runtime", runtime.clone()),
                ("handler", handler.clone()),
                ("timeout", timeout.map(|t| t.to_string())),
                ("memory", memory.map(|m| m.to_string())),
                ("isolation", isolation.map(|i| i.to_string())),
            ] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode(&v)));
                }
            }
            let body = c
                .post_zip(&format!("/api/functions/deploy?{}", query.join("&")), &zip)?
                .ok()?;
            print(cli, &body, |b| {
                format!(
                    "deployed {} version {} ({}, {} isolation)",
                    b["name"].as_str().unwrap_or("?"),
                    b["version"],
                    b["id"].as_str().unwrap_or("?"),
                    b["isolation"].as_str().unwrap_or("?")
                )
            });
        }
        Command::Invoke {
            name,
            data,
            r#async,
        } => {
            let payload: Value = serde_json::from_str(data).context("--data must be JSON")?;
            if *r#async {
                let body = c
                    .post_json(&format!("/api/functions/{}/run", encode(name)), &payload)?
                    .ok()?;
                print(cli, &body, |b| {
                    format!("queued task {}", b["task_id"].as_str().unwrap_or("?"))
                });
            } else {
                let body = c
                    .post_json(&format!("/api/functions/{}/invoke", encode(name)), &payload)?
                    .ok()?;
                let ok = body["status"] == "succeeded";
                print(cli, &body, task_text);
                return Ok(ok);
            }
        }
        Command::List => {
            let body = c.get("/api/functions/")?.ok()?;
            print(cli, &body, |b| {
                let mut out = format!("{:<24} {:<8} {:<9} {}", "NAME", "VERSION", "STATUS", "ID");
                for f in b["functions"].as_array().into_iter().flatten() {
                    out += &format!(
                        "\n{:<24} {:<8} {:<9} {}",
                        f["name"].as_str().unwrap_or(""),
                        f["version"].to_string(),
                        f["status"].as_str().unwrap_or(""),
                        f["id"].as_str().unwrap_or("")
                    );
                }
                out
            });
        }
        Command::Status { task } => {
            let body = c.get(&format!("/api/tasks/{}", encode(task)))?.ok()?;
            print(cli, &body, task_text);
        }
        Command::Logs { target } => {
            if target.starts_with("task_") {
                let body = c.get(&format!("/api/tasks/{}", encode(target)))?.ok()?;
                print(cli, &body, |t| {
                    t["logs"].as_str().unwrap_or("").trim_end().to_string()
                });
            } else {
                let body = c
                    .get(&format!("/api/functions/{}/tasks?limit=20", encode(target)))?
                    .ok()?;
                print(cli, &body, |b| {
                    let mut out = String::new();
                    for t in b["tasks"].as_array().into_iter().flatten().rev() {
                        out += &format!(
                            "--- {} {} {}\n{}\n",
                            t["task_id"].as_str().unwrap_or(""),
                            t["status"].as_str().unwrap_or(""),
                            t["created_at"],
                            t["logs"].as_str().unwrap_or("").trim_end()
                        );
                    }
                    out.trim_end().to_string()
                });
            }
        }
        Command::Metrics { name, range } => {
            let body = c
                .get(&format!(
                    "/api/functions/{}/metrics?range={}",
                    encode(name),
                    encode(range)
                ))?
                .ok()?;
            print(cli, &body, |m| {
                format!(
                    "invocations {}  errors {} ({:.1}%)  cold starts {}\nduration ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\ncpu ms avg {:.2}  peak memory max {:.1} MiB",
                    m["invocations"], m["errors"], m["error_rate"].as_f64().unwrap_or(0.0) * 100.0, m["cold_starts"],
                    m["duration_ms"]["p50"].as_f64().unwrap_or(0.0), m["duration_ms"]["p95"].as_f64().unwrap_or(0.0),
                    m["duration_ms"]["p99"].as_f64().unwrap_or(0.0), m["duration_ms"]["max"].as_f64().unwrap_or(0.0),
                    m["cpu_ms"]["avg"].as_f64().unwrap_or(0.0), m["peak_memory_bytes"]["max"].as_f64().unwrap_or(0.0) / 1048576.0
                )
            });
        }
        Command::Versions { name } => {
            let body = c
                .get(&format!("/api/functions/{}/versions", encode(name)))?
                .ok()?;
            print(cli, &body, |b| {
                b["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        format!(
                            "v{}  {}  {}  handler {}  timeout {} ms  memory {} MiB",
                            v["version"],
                            v["runtime"].as_str().unwrap_or(""),
                            v["isolation"].as_str().unwrap_or(""),
                            v["handler"].as_str().unwrap_or("(convention)"),
                            v["timeout_ms"],
                            v["memory_mb"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Activate { name } | Command::Deactivate { name } => {
            let verb = if matches!(cli.command, Command::Activate { .. }) {
                "activate"
            } else {
                "deactivate"
            };
            let body = c
                .put(&format!("/api/functions/{}/{verb}", encode(name)))?
                .ok()?;
            print(cli, &body, |b| {
                format!(
                    "{} is {}",
                    b["name"].as_str().unwrap_or("?"),
                    b["status"].as_str().unwrap_or("?")
                )
            });
        }
        Command::Delete { name } => {
            let body = c
                .delete(&format!("/api/functions/{}", encode(name)))?
                .ok()?;
            print(cli, &body, |b| {
                format!("deleted {}", b["name"].as_str().unwrap_or("?"))
            });
        }
        Command::Serve(_) | Command::Token { .. } | Command::Run { .. } => {
            bail!("not a client command")
        }
    }
    Ok(true)
}

fn run_local(cli: &Cli) -> Result<bool> {
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
        backend,
        state_dir,
        images_dir,
    } = &cli.command
    else {
        bail!("not run");
    };
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("no function directory {}", dir.display()))?;
    let event: Value = serde_json::from_str(data).context("--data must be JSON")?;
    let runtime = match runtime {
        Some(name) => name.parse()?,
        None => guess_runtime(&dir).with_context(|| {
            format!(
                "cannot tell the runtime of {}: pass --runtime python|node",
                dir.display()
            )
        })?,
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
        state_dir: state_dir.clone(),
        images_dir: images_dir.clone(),
        cgroup_parent: "cloudfunc-run".into(),
        backend: *backend,
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cloudfunc: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cloudfunc: {e:#}");
            ExitCode::from(2)
        }
    }
}
