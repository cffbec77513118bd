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
use crate::store::{PgStore, SqliteStore, Store};
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

/// The store `config` names: the SQLite file in the data directory, or PostgreSQL.
fn open_store(config: &ServeConfig) -> Result<Arc<dyn Store>> {
    let keys = crate::atrest::KeySource::of(&config.data_dir, config.master_key.clone());
    let seal = !config.no_encryption_at_rest;
    Ok(match config.postgres() {
        Some(url) => {
            let node = config
                .node_id
                .clone()
                .unwrap_or_else(crate::store::postgres::default_node_id);
            let lease = i64::try_from(config.node_lease_s.saturating_mul(1000)).unwrap_or(i64::MAX);
            let store = PgStore::open(
                url,
                config.database_ca.as_deref(),
                keys,
                seal,
                config.database_connections,
            )
            .map(|s| s.for_node(node, lease))
            .with_context(|| {
                format!(
                    "opening the PostgreSQL database {}",
                    crate::store::postgres::redacted(url)
                )
            })?;
            tracing::info!(database = %crate::store::postgres::redacted(url), "records kept in PostgreSQL");
            Arc::new(store)
        }
        None => Arc::new(
            SqliteStore::open_with(
                &config.data_dir.join(crate::datadir::DATABASE),
                config.wal_limit_mb.max(1).saturating_mul(1024 * 1024),
                std::time::Duration::from_millis(500),
                keys,
                seal,
            )
            .context("opening the database")?,
        ),
    })
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
///
/// The handlers are installed before anything starts: a signal that comes while the server
/// starts (an orchestrator giving up on it) stops it gracefully as soon as it serves. Installed
/// lazily, when the stop was first awaited, such a signal's default action killed the server
/// mid-start, with records unwritten and its sandboxes and mounts left for the next start.
pub async fn serve(config: ServeConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    let scheme = if config.tls_wanted() { "https" } else { "http" };
    let listening = move |addr, _: &Platform| {
        println!("cloudfunc listening on {scheme}://{addr}");
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
    let scheme = if config.tls_wanted() { "https" } else { "http" };
    let retention = config.retention()?;
    raise_open_files_limit(config.max_sandboxes);
    let tightened = crate::datadir::secure(&config.data_dir)
        .with_context(|| format!("making {} private", config.data_dir.display()))?;
    for what in tightened {
        tracing::warn!(%what, "a mode in the data directory let other users in; tightened");
    }
    // The state directory holds the extracted code and the sandboxes' bundles (whose
    // config.json carries each function's environment, secrets included): the server's own.
    let tightened = crate::datadir::private_dir(&config.state_dir)
        .with_context(|| format!("making {} private", config.state_dir.display()))?;
    for what in tightened {
        tracing::warn!(%what, "the state directory let other users in; tightened");
    }
    let keys = load_keys(&config.data_dir, config.jwt_secret.as_deref())?;
    // Connecting to PostgreSQL blocks (its client runs a runtime of its own).
    let store = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_store(&config)).await??
    };
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
    let restored = platform
        .restore_code()
        .await
        .context("restoring the functions' code from the store")?;
    if !restored.missing.is_empty() {
        tracing::error!(versions = ?restored.missing, "versions whose code is stored nowhere: their calls will fail");
    }
    platform.start_retention(retention);
    platform
        .start_anomalies()
        .await
        .context("restoring the anomaly detectors")?;
    platform
        .start_alerts()
        .await
        .context("restoring the alert rules' states")?;
    platform
        .start_cluster(crate::platform::NodeConfig {
            address: config
                .public_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", config.listen)),
            lease: std::time::Duration::from_secs(config.node_lease_s),
            check_every: std::time::Duration::from_secs(5),
        })
        .await
        .context("joining the other nodes")?;
    let recovery = platform
        .start_queue(
            config.workers,
            config.queue_memory_mb.saturating_mul(1 << 20),
        )
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
    let jwks = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || config.jwks()).await??
    };
    if let Some(jwks) = &jwks {
        jwks.refresh_periodically();
    }
    let state = AppState {
        platform: platform.clone(),
        keys,
        jwks,
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
    let tls = config.tls()?.map(Arc::new);
    if tls.is_none() && !config.listen.ip().is_loopback() && !config.insecure_http {
        let warning = format!(
            "WARNING: serving plain HTTP on {}, which is not loopback: bearer tokens, code, payloads and results cross the network in clear. Serve HTTPS (--tls-cert/--tls-key, or --tls-self-signed) or pass --insecure-http to accept this.",
            config.listen
        );
        tracing::warn!("{warning}");
        eprintln!("{warning}");
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let bound = listener.local_addr()?;
    if config.public_url.is_none() {
        platform.set_node_address(format!("{scheme}://{bound}"));
    }
    listening(bound, &platform);
    if let Some(tls) = &tls {
        // Whoever reads stdout may have stopped after the first line: not a reason to stop.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(
            out,
            "TLS certificate SHA-256 fingerprint: {}",
            tls.fingerprint()
        );
        let _ = out.flush();
        tracing::info!(fingerprint = %tls.fingerprint(), "serving HTTPS (TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1)");
        reload_on_sighup(tls.clone());
    }
    crate::http::serve(listener, routes(state.clone()), state.http, tls, stop).await;
    platform.shutdown().await;
    let engines = platform.engines().clone();
    let _ = tokio::task::spawn_blocking(move || engines.release()).await;
    Ok(())
}

/// Reads the TLS certificate and key again on each SIGHUP; a pair that does not load leaves
/// the one in use.
fn reload_on_sighup(tls: Arc<crate::tls::Tls>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("SIGHUP cannot be caught: the TLS certificate will not be reloaded");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.reload().map(|()| tls.fingerprint()))
                .await
            {
                Ok(Ok(fingerprint)) => {
                    tracing::info!(%fingerprint, "TLS certificate reloaded; new connections use it")
                }
                Ok(Err(e)) => tracing::error!(
                    error = %cloudfunc_sandbox::error_chain(&e),
                    "the TLS certificate could not be reloaded; the one in use stays"
                ),
                Err(e) => tracing::error!(error = %e, "reloading the TLS certificate failed"),
            }
        }
    });
}
