//! `cloudfunc`'s command line: the server (`serve`), a token minter (`token`), a local runner
//! that needs no server (`run`), and the client commands, one function each in [`commands`],
//! talking to a server through [`client`] and printing through [`render`].

mod alerts;
mod chains;
pub mod client;
mod commands;
mod deploy;
mod local;
pub mod render;
mod secrets;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{defaults, ServeConfig};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "cloudfunc",
    version,
    about = "Deploy and run Python and JavaScript functions in isolated, limited sandboxes"
)]
pub struct Cli {
    /// The server's data directory (database, code, JWT secret).
    #[arg(long, env = "CLOUDFUNC_DATA_DIR", default_value = defaults::DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    /// The server, for client commands.
    #[arg(
        long,
        env = "CLOUDFUNC_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Trust this CA certificate (PEM) for an https:// server, as well as the usual roots'
    /// (a server's --tls-self-signed writes its own to <data dir>/tls/self-signed.pem).
    #[arg(long, env = "CLOUDFUNC_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// A bearer token; by default one is minted from the local server's secret.
    #[arg(long, env = "CLOUDFUNC_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant a minted token is for: 1 to 128 letters, digits, `_`, `-`, `.` or `@`.
    #[arg(
        long,
        env = "CLOUDFUNC_TENANT",
        default_value = "default",
        global = true,
        value_parser = tenant_name
    )]
    pub tenant: String,
    /// Print the server's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log lines as JSON (serve).
    #[arg(
        long,
        env = "CLOUDFUNC_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Threads of the async runtime that serves HTTP and drives the warm pool and the queue
    /// [default: half the CPUs this process may use, at least one: the rest is the sandboxes']
    #[arg(long, env = "CLOUDFUNC_THREADS", global = true)]
    pub threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The async runtime's threads: `--threads`, or half the CPUs this process may use (at
    /// least one). A warm call's work on the server is short and the sandbox's is on another
    /// process: with a worker per CPU, the workers woke one another for each call and the
    /// sandboxes were preempted more (2 vCPUs, 16 clients: 68-72 µs of server CPU per warm
    /// call with two workers, 59-63 with one, at the same or a higher rate).
    pub fn runtime_threads(&self) -> usize {
        runtime_threads(self.threads)
    }
}

/// The async runtime's threads: `asked`, or by default half the CPUs this process may use
/// (see [`Cli::runtime_threads`]); `cloudfunc-floor` takes the same.
pub fn runtime_threads(asked: Option<std::num::NonZeroUsize>) -> usize {
    asked.map_or_else(default_runtime_threads, std::num::NonZeroUsize::get)
}

/// Half the CPUs this process may use, at least one.
fn default_runtime_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .max(1)
}

/// How the server's log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
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
    Deploy(deploy::DeployArgs),
    /// Run a function (NAME or NAME@VERSION) and print its result.
    Invoke {
        /// The function: NAME, or NAME@VERSION for a version other than the active one.
        name: String,
        /// The event, as JSON; @FILE reads it from a file, - from standard input.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Queue it and print the task id instead of waiting.
        #[arg(long)]
        r#async: bool,
        /// With --async: sent again with the same key, the command prints the task the first
        /// queued instead of queueing another (safe to retry).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// List functions.
    List,
    /// A task's status and result.
    Status {
        /// The task's id (task_...), as invoke --async printed it.
        task: String,
    },
    /// Logs of a task, or of a function's recent tasks.
    Logs {
        /// A task's id (task_...), or a function's name.
        target: String,
    },
    /// Metrics of a function over a range (15m, 1h, 7d).
    Metrics {
        /// The function's name.
        name: String,
        /// How far back: 15m, 1h, 7d.
        #[arg(long, default_value = "24h")]
        range: String,
    },
    /// Versions of a function.
    Versions {
        /// The function's name.
        name: String,
    },
    /// Allow a function to run.
    Activate {
        /// The function's name.
        name: String,
    },
    /// Stop a function from running.
    Deactivate {
        /// The function's name.
        name: String,
    },
    /// Make an earlier version's code and settings current again, as the next version.
    Rollback {
        /// The function's name.
        name: String,
        /// The version to go back to (see `versions`).
        version: u32,
    },
    /// Delete a function.
    Delete {
        /// The function's name.
        name: String,
    },
    /// Run the function in DIR locally, without a server, and print each record.
    Run(local::RunArgs),
    /// Alert rules and notification subscriptions.
    #[command(subcommand)]
    Alerts(alerts::AlertsCommand),
    /// Chains: functions run one after another (and in parallel, over lists, by condition).
    #[command(subcommand)]
    Chain(chains::ChainCommand),
    /// Secrets: values put in the environment of the functions that name them.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// Encryption at rest (admin): the keys' status, master-key rotation, re-encryption.
    #[command(subcommand)]
    Keys(secrets::KeysCommand),
}

/// A tenant's name as the server accepts it in a token: refused here rather than in a token
/// every request would be refused with.
fn tenant_name(text: &str) -> std::result::Result<String, String> {
    if crate::auth::valid_tenant(text) {
        Ok(text.to_string())
    } else {
        Err("use 1 to 128 letters, digits, `_`, `-`, `.` or `@`".to_string())
    }
}

/// Runs the command; `Ok(false)` when it ran but what it ran failed (exit code 1).
pub async fn run(cli: Cli) -> Result<bool> {
    match &cli.command {
        Command::Serve(config) => {
            let mut config = (**config).clone();
            config.data_dir = cli.data_dir.clone();
            crate::serve::serve(config).await?;
            Ok(true)
        }
        Command::Token { ttl, admin } => {
            let keys = crate::serve::load_keys(
                &cli.data_dir,
                std::env::var("CLOUDFUNC_JWT_SECRET").ok().as_deref(),
            )?;
            say(keys.mint(&cli.tenant, *admin, *ttl))?;
            Ok(true)
        }
        Command::Run(_) => tokio::task::spawn_blocking(move || local::run(&cli)).await?,
        _ => tokio::task::spawn_blocking(move || commands::run(&cli)).await?,
    }
}

/// The JSON of a `--data` argument: the text itself, `@FILE` for a file's, or `-` for
/// standard input's (an event too big or too awkward for the command line).
pub(crate) fn data_arg(text: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let (json, from) = match text {
        "-" => {
            let mut all = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut all)
                .context("--data -: reading standard input")?;
            (all, "standard input")
        }
        _ => match text.strip_prefix('@') {
            Some(path) => (
                std::fs::read_to_string(path).with_context(|| format!("--data @{path}"))?,
                path,
            ),
            None => {
                return serde_json::from_str(text)
                    .context("--data must be JSON (or @FILE, or - for standard input)")
            }
        },
    };
    serde_json::from_str(&json).with_context(|| format!("--data: {from} must hold JSON"))
}

/// Prints a line of a command's output. A reader gone away (`cloudfunc list | head`) is an
/// error to stop at, which `main` ends quietly as Unix tools end, not a panic.
pub(crate) fn say(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Whether `e` is a write to a pipe whose reader has gone.
pub fn reader_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
