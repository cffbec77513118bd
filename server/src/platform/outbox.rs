//! The notification outbox: every notification (a rule's, or an event the platform raises) is
//! written with one pending delivery per subscriber before anything is sent, and a delivery
//! loop sends what is due, a few at a time, recording each try, so that a restart or `kill -9`
//! loses nothing. Rules and their evaluation are in [`super::alerts`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{blocking, Platform, Result};
use crate::alerts::deliver::{backoff_ms, MOST_ATTEMPTS};
use crate::alerts::{Item, Notification, Severity, Status, Subscription};
use crate::model::{new_id, Function};
use crate::store::{Attempt, Store};

/// Deliveries tried at once.
const SENDS_AT_ONCE: usize = 8;

impl Platform {
    /// Starts the loop that sends what the outbox holds, woken when something is queued.
    pub(super) fn start_delivery(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            while !this.inner.stopping.load(Ordering::SeqCst) {
                match this.deliver_due().await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "delivering notifications failed; retrying")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = this.inner.alerting.queued.notified() => {}
                    _ = this.inner.wake.notified() => {}
                }
            }
        });
    }

    /// A system event about the whole server (admins subscribed to system events hear it).
    pub async fn raise_system_event(&self, severity: Severity, kind: &str, summary: String) {
        let n = event(
            "",
            None,
            severity,
            kind,
            summary,
            0.0,
            self.inner.config.clock.now_ms(),
        );
        self.raise(n, "a system event").await;
    }

    /// A function's event (its tenant's subscribers to system events hear it).
    pub(super) async fn raise_function_event(
        &self,
        f: &Function,
        severity: Severity,
        kind: &str,
        summary: String,
    ) {
        let now = self.inner.config.clock.now_ms();
        let n = event(&f.tenant, Some(f), severity, kind, summary, 0.0, now);
        self.raise(n, "a function event").await;
    }

    /// Queues `n`; a failure is logged (what raised it goes on).
    async fn raise(&self, n: Notification, what: &'static str) {
        let kind = n.condition.clone();
        let (this, store) = (self.clone(), self.inner.store.clone());
        let done = blocking(move || this.enqueue(store.as_ref(), &n)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::error!(kind, "{what} could not be queued for delivery");
        }
    }

    /// Writes a notification and a delivery to each subscription that wants it.
    pub(super) fn enqueue(&self, store: &dyn Store, n: &Notification) -> Result<()> {
        let subs: Vec<Subscription> = store
            .subscriptions(None)?
            .into_iter()
            .filter(|s| n.is_for(s))
            .collect();
        tracing::info!(
            notification = %n.id,
            status = ?n.status,
            subscribers = subs.len(),
            "{}",
            n.summary
        );
        if subs.is_empty() {
            return Ok(());
        }
        store.enqueue(n, &subs)?;
        self.inner.alerting.queued.notify_one();
        Ok(())
    }

    /// Sends what is due, a few at a time; returns how many were tried.
    async fn deliver_due(&self) -> Result<usize> {
        let now = crate::model::now_ms();
        let store = self.inner.store.clone();
        let due = blocking(move || store.due_deliveries(now, 64)).await??;
        let tried = due.len();
        let mut running = tokio::task::JoinSet::new();
        for (delivery, n, sub) in due {
            while running.len() >= SENDS_AT_ONCE {
                running.join_next().await;
            }
            let (channels, store) = (
                self.inner.alerting.channels.clone(),
                self.inner.store.clone(),
            );
            running.spawn_blocking(move || {
                let outcome = channels.send(&sub, &n, &delivery.id);
                let now = crate::model::now_ms();
                let (attempt, error) = match outcome {
                    Ok(()) => (Attempt::Sent, None),
                    Err(e) if !e.retry || delivery.attempts + 1 >= MOST_ATTEMPTS => {
                        tracing::warn!(delivery = %delivery.id, error = %e.message, "a notification was given up");
                        (Attempt::Failed, Some(e.message))
                    }
                    Err(e) => {
                        let wait = backoff_ms(delivery.attempts, rand::random::<f64>());
                        (Attempt::Retry(now + wait), Some(e.message))
                    }
                };
                if let Err(e) = store.record_attempt(&delivery.id, attempt, error.as_deref(), now) {
                    tracing::error!(delivery = %delivery.id, error = %e, "a delivery's outcome could not be stored; it will be sent again");
                }
            });
        }
        while running.join_next().await.is_some() {}
        Ok(tried)
    }
}

/// An event's notification: about function `f` of `tenant`, or (with no function) about the
/// whole system.
pub(super) fn event(
    tenant: &str,
    f: Option<&Function>,
    severity: Severity,
    kind: &str,
    summary: String,
    value: f64,
    now: i64,
) -> Notification {
    Notification {
        id: new_id("ntf"),
        tenant: tenant.to_string(),
        status: Status::Event,
        severity,
        rule_id: None,
        rule: None,
        condition: kind.to_string(),
        summary,
        items: vec![Item {
            function: f.map(|f| f.name.clone()).unwrap_or_default(),
            function_id: f.map(|f| f.id.clone()).unwrap_or_default(),
            value,
            since: now,
        }],
        at: now,
    }
}
