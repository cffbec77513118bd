//! `cloudfunc serve`: opens the store, starts the engine and the queue, and serves the API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use cloudfunc_sandbox::EngineConfig;

use crate::api::{routes, AppState};
use crate::auth::Keys;
pub use crate::config::ServeConfig;
use crate::isolation::{Engines, Isolation};
use crate::platform::Platform;
use crate::pool::{Pool, SystemClock};
use crate::store::SqliteStore;
use crate::wall::{SystemWall, WallClock};

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
            tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit");
        }
    }
    let wanted = max_sandboxes as u64 * FILES_PER_SANDBOX + 1024;
    if hard < wanted {
        tracing::warn!(
            "the open-files limit ({hard}) is low for --max-sandboxes {max_sandboxes}; \
             raise it to {wanted} (ulimit -n, or LimitNOFILE= under systemd)"
        );
    }
}

/// Starts everything and serves until the process is stopped (SIGINT or SIGTERM).
pub async fn serve(config: ServeConfig) -> Result<()> {
    let stop = async {
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
    };
    let listening = |addr, _: &Platform| {
        println!("cloudfunc listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    run(config, Arc::new(SystemWall), listening, stop).await
}

/// Starts everything with time from `clock`, tells `listening` the address (and the
/// platform) once it accepts connections, and serves until `stop` completes; then stops
/// gracefully.
pub async fn run(
    config: ServeConfig,
    clock: Arc<dyn WallClock>,
    listening: impl FnOnce(std::net::SocketAddr, &Platform),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let retention = config.retention()?;
    raise_open_files_limit(config.max_sandboxes);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let keys = load_keys(&config.data_dir, config.jwt_secret.as_deref())?;
    let store = Arc::new(
        SqliteStore::open_with(
            &config.data_dir.join("cloudfunc.db"),
            config.wal_limit_mb.max(1).saturating_mul(1024 * 1024),
            std::time::Duration::from_millis(500),
        )
        .context("opening the database")?,
    );
    let engine_config = EngineConfig {
        state_dir: config.state_dir.clone(),
        images_dir: config.images_dir.clone(),
        cgroup_parent: config.cgroup_parent.clone(),
        ..EngineConfig::default()
    };
    let (backend, default) = (config.container_runtime, config.isolation);
    let runsc = config.runsc.clone();
    let engines = tokio::task::spawn_blocking(move || {
        Engines::start(&engine_config, backend, &runsc, default)
    })
    .await??;
    if let Err(why) = engines.get(Isolation::Gvisor) {
        tracing::warn!("{why}");
    }
    let pool = Arc::new(Pool::new(engines, config.pool(), Arc::new(SystemClock)));
    pool.start_housekeeping(std::time::Duration::from_millis(500));
    let mut platform_config = config.platform();
    platform_config.clock = clock;
    let platform =
        Platform::new(store, pool, platform_config).context("starting the task recorder")?;
    platform.start_retention(retention);
    platform
        .start_anomalies()
        .await
        .context("restoring the anomaly detectors")?;
    platform
        .start_alerts()
        .await
        .context("restoring the alert rules' states")?;
    let recovery = platform
        .start_queue(config.workers)
        .await
        .context("recovering the queue")?;
    if !recovery.interrupted.is_empty() || !recovery.requeued.is_empty() {
        tracing::warn!(
            interrupted = recovery.interrupted.len(),
            requeued = recovery.requeued.len(),
            "after a restart: tasks that were running were failed as interrupted or requeued"
        );
        platform
            .raise_system_event(
                crate::alerts::Severity::Critical,
                "crash_recovered",
                format!(
                    "cloudfunc restarted after an unclean stop: {} tasks that were running were ended as interrupted, {} requeued",
                    recovery.interrupted.len(),
                    recovery.requeued.len()
                ),
            )
            .await;
    }
    let state = AppState {
        platform: platform.clone(),
        keys,
        max_body_bytes: config.max_body_bytes(),
        http: config.http()?,
        chart_js: config.chart_js.clone(),
    };
    if !config.chart_js.is_file() {
        tracing::warn!(
            "Chart.js is not at {}: the dashboard will show no charts (install libjs-chart.js or pass --chart-js)",
            config.chart_js.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    listening(listener.local_addr()?, &platform);
    crate::http::serve(listener, routes(state.clone()), state.http, stop).await;
    platform.shutdown().await;
    let engines = platform.engines().clone();
    let _ = tokio::task::spawn_blocking(move || engines.release_cgroup_parents()).await;
    Ok(())
}
