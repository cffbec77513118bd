//! `cloudfunc serve`: opens the store, starts the engine and the queue, and serves the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cloudfunc_sandbox::{BackendKind, EngineConfig};

use crate::api::{routes, AppState};
use crate::auth::Keys;
use crate::isolation::{Engines, Isolation};
use crate::platform::{Platform, PlatformConfig, Retention};
use crate::pool::{Pool, PoolConfig, SystemClock};
use crate::store::SqliteStore;

/// Everything `serve` can be told; each has an embedded default.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub images_dir: PathBuf,
    pub cgroup_parent: String,
    pub jwt_secret: Option<String>,
    pub workers: usize,
    pub concurrency: usize,
    pub max_body_bytes: u64,
    /// How long finished tasks (results, logs, usage) and metrics rollups are kept.
    pub retention: Retention,
    /// The runtime of the `container` isolation level.
    pub container_backend: BackendKind,
    /// The isolation level of functions that do not choose one.
    pub default_isolation: Isolation,
    /// gVisor's `runsc`.
    pub runsc: PathBuf,
    /// Pre-started sandboxes per runtime and isolation level.
    pub stem_cells: usize,
    /// Sync callers that may wait for a busy function before getting 429.
    pub max_waiting: usize,
    /// Chart.js for the dashboard.
    pub chart_js: PathBuf,
    /// Sandboxes the pool holds at once.
    pub max_sandboxes: usize,
    /// Memory the pool's sandboxes' limits may commit together; `None`: 4× the host's.
    pub pool_memory_bytes: Option<u64>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:8080".parse().expect("a valid address"),
            data_dir: "/var/lib/cloudfunc".into(),
            state_dir: "/run/cloudfunc".into(),
            images_dir: "/var/lib/cloudfunc/images".into(),
            cgroup_parent: "cloudfunc".into(),
            jwt_secret: None,
            workers: 4,
            concurrency: 8,
            max_body_bytes: 32 * 1024 * 1024,
            retention: Retention::default(),
            container_backend: BackendKind::Libcontainer,
            default_isolation: Isolation::Container,
            runsc: "/usr/bin/runsc".into(),
            stem_cells: 1,
            max_waiting: 64,
            chart_js: crate::api::dashboard::DEFAULT_CHART_JS.into(),
            max_sandboxes: PoolConfig::default().max_sandboxes,
            pool_memory_bytes: None,
        }
    }
}

/// The secret file in a data directory.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt.secret")
}

/// The signing keys: the configured secret (refused if weak), else the data directory's,
/// generated on first start with mode 0600.
pub fn load_keys(data_dir: &Path, configured: Option<&str>) -> Result<Keys> {
    if let Some(secret) = configured {
        return Keys::new(secret.as_bytes())
            .context("refusing to start with the configured JWT secret");
    }
    let path = secret_path(data_dir);
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(Keys::generate_secret().as_bytes())?;
    }
    let secret = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Keys::new(&secret).with_context(|| format!("the secret in {} is too weak", path.display()))
}

/// Descriptors the server holds per kept sandbox: its three pipes, its cgroup's counter
/// files (five on cgroup v1), with room to spare.
const FILES_PER_SANDBOX: u64 = 12;

/// Raises the soft limit on open files to the hard one: a shell's default of 1024 would stop
/// the pool at about a hundred sandboxes. Warns when even the hard limit is too low.
fn raise_open_files_limit(max_sandboxes: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            eprintln!("cloudfunc: could not raise the open-files limit from {soft} to {hard}: {e}");
        }
    }
    let wanted = max_sandboxes as u64 * FILES_PER_SANDBOX + 1024;
    if hard < wanted {
        eprintln!(
            "cloudfunc: the open-files limit ({hard}) is low for --max-sandboxes {max_sandboxes}; \
             raise it to {wanted} (ulimit -n, or LimitNOFILE= under systemd)"
        );
    }
}

/// Starts everything and serves until the process is stopped.
pub async fn serve(config: ServeConfig) -> Result<()> {
    raise_open_files_limit(config.max_sandboxes);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let keys = load_keys(&config.data_dir, config.jwt_secret.as_deref())?;
    let store = Arc::new(
        SqliteStore::open(&config.data_dir.join("cloudfunc.db")).context("opening the database")?,
    );
    let engine_config = EngineConfig {
        state_dir: config.state_dir.clone(),
        images_dir: config.images_dir.clone(),
        cgroup_parent: config.cgroup_parent.clone(),
        ..EngineConfig::default()
    };
    let (backend, default) = (config.container_backend, config.default_isolation);
    let runsc = config.runsc.clone();
    let engines = tokio::task::spawn_blocking(move || {
        Engines::start(&engine_config, backend, &runsc, default)
    })
    .await??;
    if let Err(why) = engines.get(Isolation::Gvisor) {
        eprintln!("cloudfunc: {why}");
    }
    let mut platform_config = PlatformConfig::new(&config.data_dir);
    platform_config.max_concurrency = config.concurrency;
    if config.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let defaults = PoolConfig::default();
    let pool_config = PoolConfig {
        stem_cells: config.stem_cells,
        max_waiting: config.max_waiting,
        max_sandboxes: config.max_sandboxes,
        max_memory_bytes: config
            .pool_memory_bytes
            .unwrap_or(defaults.max_memory_bytes),
        ..defaults
    };
    let pool = Arc::new(Pool::new(engines, pool_config, Arc::new(SystemClock)));
    pool.start_housekeeping(std::time::Duration::from_millis(500));
    let platform =
        Platform::new(store, pool, platform_config).context("starting the task recorder")?;
    platform.start_retention(config.retention.clone());
    let recovery = platform
        .start_queue(config.workers)
        .await
        .context("recovering the queue")?;
    if !recovery.interrupted.is_empty() || !recovery.requeued.is_empty() {
        eprintln!(
            "cloudfunc: after a restart: {} interrupted task(s) failed, {} requeued",
            recovery.interrupted.len(),
            recovery.requeued.len()
        );
    }
    let state = AppState {
        platform: platform.clone(),
        keys,
        max_body_bytes: config.max_body_bytes,
        chart_js: config.chart_js.clone(),
    };
    if !config.chart_js.is_file() {
        eprintln!(
            "cloudfunc: Chart.js is not at {}: the dashboard will show no charts (install libjs-chart.js or pass --chart-js)",
            config.chart_js.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("cloudfunc listening on http://{addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    warp::serve(routes(state))
        .incoming(listener)
        .graceful(async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        })
        .run()
        .await;
    platform.shutdown().await;
    Ok(())
}
