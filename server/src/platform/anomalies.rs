//! Anomaly detection in the platform: as each minute closes, its rollups become points of
//! each function's series and the system's, the [`Watcher`] scores them, and what it finds is
//! stored and announced. Detectors are saved every few minutes and at a stop; after a
//! restart the minutes missed are replayed from the minute rollups, so nothing is skipped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{blocking, Platform, Result};
use crate::anomalies::{Change, Event, Input, Key, Series, Watcher};
use crate::auth::Caller;
use crate::rollup::bucket_start;

/// A minute, in ms.
const MINUTE: i64 = 60_000;
/// How long after a minute ends it is read: calls that ended in its last moments are
/// recorded by then (the recorder commits within milliseconds).
const SETTLE_MS: i64 = 2_000;
/// The most minutes replayed after a stop (older ones are skipped).
const CATCH_UP_MINUTES: i64 = 7 * 1440;
/// Minutes read from the store at once while catching up.
const BATCH_MINUTES: i64 = 240;
/// How often the detectors are saved, in minutes watched.
const SAVE_EVERY_MINUTES: i64 = 10;
/// Events returned at most.
const MOST_EVENTS: u32 = 500;

/// The watcher and how far it has watched.
#[derive(Debug)]
pub(super) struct Watch {
    watcher: Watcher,
    /// The start of the last minute watched.
    through: Option<i64>,
    /// `through` when the detectors were last saved.
    saved: Option<i64>,
}

/// Anomaly detection's part of the platform.
#[derive(Debug)]
pub(super) struct Anomalies {
    watch: Mutex<Watch>,
    /// Every event opened, continued or closed (the hook alerts subscribe to).
    events: broadcast::Sender<(Change, Event)>,
}

impl Anomalies {
    pub(super) fn new(config: crate::anomalies::WatchConfig) -> Anomalies {
        Anomalies {
            watch: Mutex::new(Watch {
                watcher: Watcher::new(config),
                through: None,
                saved: None,
            }),
            events: broadcast::channel(1024).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest score of every series: (key, tenant, function name, point).
    pub(super) fn latest(&self) -> Vec<(Key, String, String, crate::anomalies::Point)> {
        self.lock().watcher.latest()
    }
}

impl Platform {
    /// Every anomaly event as it opens, continues (each minute it lasts) and closes: the hook
    /// alert rules of kind `anomaly` subscribe to.
    pub fn subscribe_anomalies(&self) -> broadcast::Receiver<(Change, Event)> {
        self.inner.anomalies.events.subscribe()
    }

    /// Restores the saved detectors, then watches each minute as it closes (and catches up
    /// on the minutes missed while stopped).
    pub async fn start_anomalies(&self) -> Result<()> {
        let store = self.inner.store.clone();
        let (through, saved) = blocking(move || store.anomaly_state()).await??;
        {
            let mut w = self.inner.anomalies.lock();
            let restored = w.watcher.restore(saved);
            w.through = through;
            w.saved = through;
            if restored > 0 {
                tracing::info!(series = restored, "anomaly detectors restored");
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            let moved = this.inner.config.clock.moved();
            loop {
                if this
                    .inner
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    break;
                }
                if let Err(e) = this.watch_due().await {
                    tracing::error!(error = %e, "anomaly detection could not read or store a minute; it retries");
                }
                let tick = tokio::time::sleep(Duration::from_secs(1));
                match &moved {
                    Some(moved) => {
                        tokio::select! {
                            _ = tick => {}
                            _ = moved.notified() => {}
                            _ = this.inner.wake.notified() => {}
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = tick => {}
                            _ = this.inner.wake.notified() => {}
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Watches every minute that has closed since the last one watched.
    async fn watch_due(&self) -> Result<()> {
        let now = self.inner.config.clock.now_ms();
        let last = bucket_start(now - SETTLE_MS, MINUTE) - MINUTE;
        let through = self.inner.anomalies.lock().through;
        let first = match through {
            Some(t) if t >= last => return Ok(()),
            Some(t) => (t + MINUTE).max(last - CATCH_UP_MINUTES * MINUTE),
            None => last,
        };
        // Calls written behind their replies are in the store before their minute is read.
        let store = self.settled_store().await;
        let mut from = first;
        while from <= last {
            let to = (from + BATCH_MINUTES * MINUTE).min(last + MINUTE);
            let (store, this) = (store.clone(), self.clone());
            blocking(move || this.watch_minutes(store.as_ref(), from, to, last)).await??;
            from = to;
        }
        self.save_detectors(false).await
    }

    /// Watches the minutes starting in `[from, to)`; `last` is the newest minute due, the only
    /// one the queue's depth now belongs to.
    fn watch_minutes(
        &self,
        store: &dyn crate::store::Store,
        from: i64,
        to: i64,
        last: i64,
    ) -> Result<()> {
        let rows = store.rollups(None, None, MINUTE, from, to)?;
        let mut by_minute: BTreeMap<i64, Vec<crate::store::Rollup>> = BTreeMap::new();
        for r in rows {
            by_minute.entry(r.start).or_default().push(r);
        }
        let depth = store.queue_depth()?;
        let mut minute = from;
        while minute < to {
            let rows = by_minute.remove(&minute).unwrap_or_default();
            let mut inputs = Vec::new();
            let mut calls = 0u64;
            for (id, m) in crate::anomalies::series::by_function(&rows) {
                calls += m.stats.count;
                for (series, value) in crate::anomalies::series::function_points(&m.stats) {
                    inputs.push(Input {
                        key: Key::function(&id, series),
                        tenant: m.tenant.clone(),
                        function: m.function.clone(),
                        value,
                    });
                }
            }
            let system = |series, value| Input {
                key: Key::system(series),
                tenant: String::new(),
                function: String::new(),
                value,
            };
            inputs.push(system(Series::Calls, calls as f64));
            if minute == last {
                inputs.push(system(Series::QueueDepth, depth as f64));
            }
            let out = self.inner.anomalies.lock().watcher.minute(minute, inputs);
            let events: Vec<Event> = out.events.iter().map(|(_, e)| e.clone()).collect();
            store.record_anomalies(&out.scored, &events)?;
            for (change, event) in out.events {
                if change == Change::Opened {
                    tracing::warn!(
                        function = %event.function,
                        series = event.series.name(),
                        score = event.peak_score,
                        "anomaly"
                    );
                }
                // Nobody listening is fine.
                let _ = self.inner.anomalies.events.send((change, event));
            }
            self.inner.anomalies.lock().through = Some(minute);
            minute += MINUTE;
        }
        Ok(())
    }

    /// Saves the detectors if enough minutes were watched since the last save (or `always`).
    pub(super) async fn save_detectors(&self, always: bool) -> Result<()> {
        let (through, saved) = {
            let w = self.inner.anomalies.lock();
            let Some(through) = w.through else {
                return Ok(());
            };
            let due = w
                .saved
                .is_none_or(|s| through - s >= SAVE_EVERY_MINUTES * MINUTE);
            if !(always || due) || w.saved == Some(through) {
                return Ok(());
            }
            (through, w.watcher.save())
        };
        let store = self.inner.store.clone();
        blocking(move || store.save_anomaly_state(through, &saved)).await??;
        self.inner.anomalies.lock().saved = Some(through);
        Ok(())
    }

    /// Stops watching a deleted function.
    pub(super) fn forget_anomalies(&self, function_id: &str) {
        self.inner.anomalies.lock().watcher.forget(function_id);
    }

    /// A function's anomalies: how each of its series stands (learning or watched), its
    /// events and its scored minutes in `[since, until)`.
    pub async fn function_anomalies(
        &self,
        caller: &Caller,
        key: &str,
        since: i64,
        until: i64,
    ) -> Result<Value> {
        let function = self.find(caller, key).await?;
        let (store, scope, id) = (
            self.inner.store.clone(),
            caller.scope().map(String::from),
            function.id.clone(),
        );
        let (events, scores) = blocking(move || -> Result<_> {
            let events =
                store.anomaly_events(scope.as_deref(), Some(&id), since, until, MOST_EVENTS)?;
            let scores = store.anomaly_scores(scope.as_deref(), &id, since, until)?;
            Ok((events, scores))
        })
        .await??;
        let (statuses, through, threshold) = {
            let w = self.inner.anomalies.lock();
            (
                w.watcher.status(&function.id),
                w.through,
                w.watcher.config().threshold,
            )
        };
        let needed = self.needed_points();
        let seen = statuses.iter().map(|s| s.points_seen).max().unwrap_or(0);
        let (status, message) = if statuses.is_empty() {
            (
                "no_data",
                format!("too little data: no minute of calls watched yet; scores start after {needed} minutes"),
            )
        } else if statuses.iter().all(|s| s.status == "learning") {
            (
                "learning",
                format!("too little data: {seen} of {needed} minutes watched; until then no score is given"),
            )
        } else {
            ("watching", String::new())
        };
        let mut points: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for (series, p) in scores {
            points
                .entry(series.name())
                .or_default()
                .push(json!([p.minute, p.value, p.score]));
        }
        Ok(json!({
            "function": function.name,
            "function_id": function.id,
            "status": status,
            "message": message,
            "threshold": threshold,
            "watched_through": through,
            "series": statuses,
            "open": events.iter().filter(|e| e.ended.is_none()).count(),
            "events": events,
            "points": points,
            "points_columns": ["minute", "value", "score"],
        }))
    }

    /// Every event the caller sees in `[since, until)`; for an admin also the system's series
    /// and their events.
    pub async fn system_anomalies(&self, caller: &Caller, since: i64, until: i64) -> Result<Value> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        let events = blocking(move || {
            store.anomaly_events(scope.as_deref(), None, since, until, MOST_EVENTS)
        })
        .await??;
        // A tenant's view holds its functions only, never the system's series.
        let events: Vec<Event> = events
            .into_iter()
            .filter(|e| caller.admin || !e.function_id.is_empty())
            .collect();
        let (system, through, threshold) = {
            let w = self.inner.anomalies.lock();
            (
                caller.admin.then(|| w.watcher.status("")),
                w.through,
                w.watcher.config().threshold,
            )
        };
        Ok(json!({
            "threshold": threshold,
            "watched_through": through,
            "points_needed": self.needed_points(),
            "series": system,
            "open": events.iter().filter(|e| e.ended.is_none()).count(),
            "events": events,
        }))
    }

    /// The latest score of every series the caller sees: (tenant, function, series, score),
    /// the system's with an empty function (admins only).
    pub fn anomaly_scores(&self, caller: &Caller) -> Vec<(String, String, Series, f64)> {
        let w = self.inner.anomalies.lock();
        w.watcher
            .latest()
            .into_iter()
            .filter(|(k, tenant, _, _)| match caller.scope() {
                None => true,
                Some(scope) => !k.is_system() && tenant == scope,
            })
            .map(|(k, tenant, function, p)| (tenant, function, k.series, p.score))
            .collect()
    }

    fn needed_points(&self) -> u64 {
        self.inner.anomalies.lock().watcher.config().detector.warmup + 1
    }
}
