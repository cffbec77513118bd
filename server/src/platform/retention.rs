//! Retention: finished tasks, chain runs, notifications' deliveries and each resolution of rollups
//! are pruned past their time.

use std::time::Duration;

use super::{blocking, Platform, Result};
use crate::model::now_ms;
use crate::store::Store;

/// How long finished tasks and each resolution of rollups are kept. A rollup's calls stay
/// counted after their raw records are gone; `None` keeps forever.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub tasks: Duration,
    pub minute_rollups: Option<Duration>,
    pub hour_rollups: Option<Duration>,
    pub day_rollups: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 86_400);
        Retention {
            tasks: days(7),
            minute_rollups: Some(days(30)),
            hour_rollups: Some(days(365)),
            day_rollups: None,
        }
    }
}

/// What one pass of retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: u64,
    /// Rows of rollups, and of the anomaly scores and events that go with the minute ones.
    pub rollups: u64,
    pub chain_runs: u64,
    pub deliveries: u64,
    /// Idempotency keys of submissions.
    pub keys: u64,
}

impl Retention {
    /// Prunes what is past its time as of `now`. Chain runs, notifications' deliveries and
    /// submissions' idempotency keys are history as tasks are, and are kept as long.
    pub fn apply(&self, store: &dyn Store, now: i64) -> Result<Pruned> {
        let cutoff =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut pruned = Pruned {
            tasks: store.prune(cutoff(self.tasks))?,
            chain_runs: store.prune_runs(cutoff(self.tasks))?,
            deliveries: store.prune_notifications(cutoff(self.tasks))?,
            keys: store.prune_keys(cutoff(self.tasks))?,
            rollups: 0,
        };
        for (resolution, keep) in crate::rollup::RESOLUTIONS.into_iter().zip([
            self.minute_rollups,
            self.hour_rollups,
            self.day_rollups,
        ]) {
            if let Some(keep) = keep {
                pruned.rollups += store.prune_rollups(resolution, cutoff(keep))?;
            }
        }
        // Scored minutes (and closed anomaly events) go with the minute rollups they came from.
        if let Some(keep) = self.minute_rollups {
            pruned.rollups += store.prune_anomalies(cutoff(keep))?;
        }
        Ok(pruned)
    }
}

impl Platform {
    /// Deletes what is past its retention, now and then every hour.
    pub fn start_retention(&self, retention: Retention) {
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let store = store.clone();
                let retention = retention.clone();
                let pruned = blocking(move || retention.apply(store.as_ref(), now_ms())).await;
                match pruned {
                    Ok(Ok(p)) if p == Pruned::default() => {}
                    Ok(Ok(p)) => tracing::info!(
                        tasks = p.tasks,
                        rollups = p.rollups,
                        chain_runs = p.chain_runs,
                        deliveries = p.deliveries,
                        keys = p.keys,
                        "retention removed what was past its time"
                    ),
                    other => tracing::error!(error = ?other, "retention failed"),
                }
            }
        });
    }
}
