//! What the platform reports about itself: metrics over ranges, health, and the Prometheus
//! exposition.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{blocking, Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::isolation::Isolation;
use crate::model::now_ms;

/// How long health reuses the store's figures it read, at least. Health takes no token, and
/// each read of the queue's depth counts the queued tasks: callers at once share one read, and
/// reads come at most this often however many call.
pub const HEALTH_FIGURES_FOR: Duration = Duration::from_millis(100);

/// How long health reuses its figures at most, however slow they were to read.
pub const HEALTH_FIGURES_AT_MOST: Duration = Duration::from_secs(5);

/// How long figures that took `took` to read are reused: fifty times their read, so that
/// counting a deep queue (15 ms for 60,000 queued tasks on PostgreSQL, growing with the
/// backlog) costs the store at most 2 % of one connection's time however often a balancer
/// checks health, between [`HEALTH_FIGURES_FOR`] and [`HEALTH_FIGURES_AT_MOST`].
pub fn health_figures_reused_for(took: Duration) -> Duration {
    (took * 50).clamp(HEALTH_FIGURES_FOR, HEALTH_FIGURES_AT_MOST)
}

/// The queue's depth, the tasks running and the store's size, as read at `at` in `took`.
#[derive(Debug, Clone, Copy)]
pub(super) struct StoreFigures {
    at: Instant,
    took: Duration,
    queued: u64,
    running: u64,
    size: crate::store::StoreSize,
}

impl StoreFigures {
    /// How long these figures are reused.
    pub(super) fn reused_for(&self) -> Duration {
        health_figures_reused_for(self.took)
    }
}

impl Platform {
    /// The store's figures for health and the Prometheus exposition: the last ones read if
    /// younger than [`health_figures_reused_for`] their read, else read now (callers meanwhile
    /// wait for this read).
    async fn health_figures(&self) -> Result<StoreFigures> {
        let mut last = self.inner.health_figures.lock().await;
        if let Some(f) = *last {
            if f.at.elapsed() < f.reused_for() {
                return Ok(f);
            }
        }
        let store = self.inner.store.clone();
        // Timed on the blocking thread: what the store took, not the wait for a thread.
        let read = blocking(move || -> Result<_> {
            let start = Instant::now();
            let (queued, running, size) = (store.queue_depth()?, store.running()?, store.size()?);
            Ok(StoreFigures {
                at: Instant::now(),
                took: start.elapsed(),
                queued,
                running,
                size,
            })
        })
        .await??;
        *last = Some(read);
        Ok(read)
    }

    /// Invocation counts, error rate, duration percentiles, CPU and memory over a range, and
    /// the same per `step` (default: one that gives at most 360 points), from the rollups.
    pub async fn metrics(
        &self,
        caller: &Caller,
        key: Option<&str>,
        since: i64,
        until: i64,
        step: Option<i64>,
    ) -> Result<Value> {
        let step = step.unwrap_or_else(|| crate::metrics::default_step(since, until));
        let resolution = crate::rollup::resolution_for(step).ok_or_else(|| {
            PlatformError::BadRequest(format!(
                "step {step} ms must be a whole number of minutes (1m, 5m, 1h, 1d)"
            ))
        })?;
        let first = crate::rollup::bucket_start(since, step);
        if (until - first) / step > crate::metrics::MAX_POINTS {
            return Err(PlatformError::BadRequest(format!(
                "that range at that step is more than {} points; ask for a longer step",
                crate::metrics::MAX_POINTS
            )));
        }
        let function = match key {
            Some(k) => Some(self.find(caller, k).await?),
            None => None,
        };
        let (store, scope, fid) = (
            self.settled_store().await,
            caller.scope().map(String::from),
            function.as_ref().map(|f| f.id.clone()),
        );
        let rows = blocking(move || {
            store.rollups(scope.as_deref(), fid.as_deref(), resolution, first, until)
        })
        .await??;
        Ok(crate::metrics::report(
            function.as_ref(),
            &rows,
            since,
            until,
            step,
            resolution,
        ))
    }

    /// The host's CPU busy share since the previous call (or since the server started).
    fn host_cpu_percent(&self) -> Option<f64> {
        let now = crate::metrics::cpu_jiffies(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let mut last = self
            .inner
            .cpu_sample
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = last.replace(now)?;
        Some(crate::metrics::cpu_busy_percent(before, now))
    }

    /// Status, uptime, queue depth, the pool, host load, CPU and memory, and the server's own
    /// memory.
    pub async fn health(&self) -> Result<Value> {
        let figures = self.health_figures().await?;
        let space = self.inner.space.report();
        let storage = self.storage_figures(&figures, &space);
        // Degraded: new work is refused for want of disk, or records wait to be stored.
        let status = if storage.low || storage.records_kept > 0 {
            "degraded"
        } else {
            "ok"
        };
        let running = figures.running + self.sync_running();
        let pool = self.inner.pool.stats();
        let calls = pool.calls_cold + pool.calls_prewarmed + pool.calls_warm;
        let mut host = crate::metrics::host();
        host["cpu_busy_percent"] = json!(self.host_cpu_percent());
        let cluster = self.cluster_health().await;
        Ok(json!({
            "cluster": cluster,
            "status": status,
            "storage": {
                "data_dir": self.inner.config.data_dir,
                "free_bytes": space.free_bytes,
                "total_bytes": space.total_bytes,
                "min_free_bytes": space.min_free_bytes,
                "low": storage.low,
                "database_bytes": storage.database_bytes,
                "wal_bytes": storage.wal_bytes,
                "records_pending": storage.records_pending,
                "records_kept": storage.records_kept,
                "records_lost": storage.records_lost,
            },
            "time": now_ms(),
            "uptime_s": self.inner.started.elapsed().as_secs_f64(),
            "queue_depth": figures.queued,
            "tasks_running": running,
            "sandboxes_running": pool.busy,
            "pool": pool,
            "warm_ratio": if calls == 0 { 0.0 } else { pool.calls_warm as f64 / calls as f64 },
            "backend": self.engines().get(Isolation::Container).map(|e| e.backend_name()).ok(),
            "isolation": self.engines().describe(),
            "cgroup": self
                .engines()
                .get(Isolation::Container)
                .map(|e| format!("{:?}", e.cgroup_version()).to_lowercase())
                .ok(),
            "host": host,
            "process": crate::metrics::process(),
        }))
    }

    /// The store's figures for health and the exposition: `figures` read from it, `space` of
    /// its disk, and the recorder's.
    fn storage_figures(
        &self,
        figures: &StoreFigures,
        space: &super::space::SpaceReport,
    ) -> crate::prometheus::Storage {
        let recorder = &self.inner.recorder;
        crate::prometheus::Storage {
            free_bytes: space.free_bytes,
            low: space.low,
            database_bytes: figures.size.database_bytes,
            wal_bytes: figures.size.wal_bytes,
            records_pending: recorder.pending() as u64,
            records_kept: recorder.kept().len() as u64,
            records_lost: recorder.kept().lost(),
            commits: recorder.commits(),
            writes: recorder.written(),
        }
    }

    /// The Prometheus exposition: the caller's functions, and the whole system for an admin.
    pub async fn prometheus(&self, caller: &Caller) -> Result<String> {
        let (store, scope) = (self.settled_store().await, caller.scope().map(String::from));
        let day = crate::rollup::RESOLUTIONS[2];
        let rows = blocking(move || store.rollups(scope.as_deref(), None, day, i64::MIN, i64::MAX))
            .await??;
        let system = if caller.admin {
            let figures = self.health_figures().await?;
            let process = crate::metrics::process();
            Some(crate::prometheus::System {
                pool: self.inner.pool.stats(),
                queue_depth: figures.queued,
                tasks_running: figures.running + self.sync_running(),
                uptime_s: self.inner.started.elapsed().as_secs_f64(),
                resident_memory_bytes: process["resident_memory_bytes"].as_u64().unwrap_or(0),
                host_memory_total_bytes: crate::metrics::meminfo_bytes("MemTotal:"),
                host_memory_available_bytes: crate::metrics::meminfo_bytes("MemAvailable:"),
                storage: self.storage_figures(&figures, &self.inner.space.report()),
                node: self.node_id(),
            })
        } else {
            None
        };
        let mut text = crate::prometheus::render(&rows, system.as_ref());
        text.push_str(&crate::prometheus::render_anomalies(
            &self.anomaly_scores(caller),
        ));
        Ok(text)
    }
}
