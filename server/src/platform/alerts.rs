//! Alerting in the platform: rules and subscriptions checked and stored, and rules evaluated
//! on the live minute rollups every few seconds (off the call path); their notifications,
//! and the events raised where they happen, go through the outbox ([`super::outbox`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::outbox::event;
use super::{blocking, Platform, PlatformError, Result};
use crate::alerts::deliver::{ChannelConfig, Channels, RealChannels};
use crate::alerts::eval::{Evaluator, Observation, Phase, Transition};
use crate::alerts::{
    Channel, Metric, Notification, Rule, RuleSpec, Severity, Status, Subscription, SubscriptionSpec,
};
use crate::auth::Caller;
use crate::model::{new_id, Function};
use crate::rollup::{bucket_start, Stats};
use crate::store::Store;

/// How alerting runs.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// How often rules are evaluated.
    pub interval: Duration,
    /// How the channels reach receivers.
    pub channels: ChannelConfig,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            interval: Duration::from_secs(15),
            channels: ChannelConfig::default(),
        }
    }
}

/// Alerting's part of the platform.
#[derive(Debug)]
pub(super) struct Alerting {
    evaluator: Mutex<Evaluator>,
    /// How notifications reach receivers (the outbox's delivery loop sends through them).
    pub(super) channels: Arc<dyn Channels>,
    /// Wakes the delivery loop when something was queued.
    pub(super) queued: tokio::sync::Notify,
    /// Per function: whether its calls in the last evaluation all succeeded (for the first
    /// failure after success).
    healthy: Mutex<HashMap<String, bool>>,
    disk_low: AtomicBool,
    sandbox_failures: AtomicBool,
}

impl Alerting {
    pub(super) fn new(config: &AlertConfig) -> Alerting {
        Alerting::with_channels(Arc::new(RealChannels::new(config.channels.clone())))
    }

    pub(super) fn with_channels(channels: Arc<dyn Channels>) -> Alerting {
        Alerting {
            evaluator: Mutex::new(Evaluator::default()),
            channels,
            queued: tokio::sync::Notify::new(),
            healthy: Mutex::new(HashMap::new()),
            disk_low: AtomicBool::new(false),
            sandbox_failures: AtomicBool::new(false),
        }
    }

    fn evaluator(&self) -> std::sync::MutexGuard<'_, Evaluator> {
        self.evaluator.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `POST /api/notifications/unsubscribe`: a subscription id, or the channel and its target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    #[serde(default)]
    pub subscription_id: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub number: Option<String>,
}

fn bad(e: crate::alerts::Invalid) -> PlatformError {
    PlatformError::BadRequest(e.0)
}

impl Platform {
    /// Restores the rules' phases and starts the evaluation and delivery loops.
    pub async fn start_alerts(&self) -> Result<()> {
        let store = self.inner.store.clone();
        let phases = blocking(move || store.alert_phases()).await??;
        *self.inner.alerting.evaluator() = Evaluator::restore(phases);
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.inner.config.alerts.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !this.inner.stopping.load(Ordering::SeqCst) {
                tick.tick().await;
                if let Err(e) = this.evaluate_alerts().await {
                    tracing::error!(error = %e, "evaluating alert rules failed; next round retries");
                }
            }
        });
        self.start_delivery();
        Ok(())
    }

    // ---- rules ----

    /// Adds a rule: checked, its function resolved, stored.
    pub async fn create_rule(&self, caller: &Caller, spec: RuleSpec) -> Result<Value> {
        spec.validate(caller.admin).map_err(bad)?;
        let function_id = match &spec.function {
            Some(key) => Some(self.find(caller, key).await?.id),
            None => None,
        };
        let rule = Rule {
            id: new_id("rule"),
            tenant: caller.tenant.clone(),
            spec,
            function_id,
            silenced_until: None,
            created_at: self.inner.config.clock.now_ms(),
        };
        let (store, stored) = (self.inner.store.clone(), rule.clone());
        blocking(move || store.put_rule(&stored)).await??;
        Ok(self.rule_view(&rule))
    }

    /// Every rule the caller sees, with where it stands.
    pub async fn rules(&self, caller: &Caller) -> Result<Vec<Value>> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        let rules = blocking(move || store.rules(scope.as_deref())).await??;
        Ok(rules.iter().map(|r| self.rule_view(r)).collect())
    }

    async fn find_rule(&self, caller: &Caller, id: &str) -> Result<Rule> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        let rules = blocking(move || store.rules(scope.as_deref())).await??;
        rules
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| PlatformError::NotFound(format!("no alert rule {id:?}")))
    }

    /// One rule, with where it stands.
    pub async fn rule(&self, caller: &Caller, id: &str) -> Result<Value> {
        Ok(self.rule_view(&self.find_rule(caller, id).await?))
    }

    /// Replaces a rule's definition (its phases start over).
    pub async fn update_rule(&self, caller: &Caller, id: &str, spec: RuleSpec) -> Result<Value> {
        let old = self.find_rule(caller, id).await?;
        spec.validate(caller.admin).map_err(bad)?;
        let function_id = match &spec.function {
            Some(key) => Some(self.find(caller, key).await?.id),
            None => None,
        };
        let rule = Rule {
            spec,
            function_id,
            ..old
        };
        self.inner.alerting.evaluator().forget(&rule.id);
        let (store, stored) = (self.inner.store.clone(), rule.clone());
        blocking(move || store.put_rule(&stored)).await??;
        Ok(self.rule_view(&rule))
    }

    /// Deletes a rule.
    pub async fn delete_rule(&self, caller: &Caller, id: &str) -> Result<()> {
        let (store, scope, rid) = (
            self.inner.store.clone(),
            caller.scope().map(String::from),
            id.to_string(),
        );
        if !blocking(move || store.delete_rule(scope.as_deref(), &rid)).await?? {
            return Err(PlatformError::NotFound(format!("no alert rule {id:?}")));
        }
        self.inner.alerting.evaluator().forget(id);
        Ok(())
    }

    /// Deletes `tenant`'s rules that watch function `function_id`, which was deleted: they
    /// would watch nothing while saying they watch a function of its name (a new function
    /// of that name is another). Returns how many.
    pub(super) async fn delete_rules_of(&self, tenant: &str, function_id: &str) -> Result<usize> {
        let (store, tenant, fid) = (
            self.inner.store.clone(),
            tenant.to_string(),
            function_id.to_string(),
        );
        let ids = blocking(move || -> Result<Vec<String>> {
            let ids: Vec<String> = store
                .rules(Some(&tenant))?
                .into_iter()
                .filter(|r| r.function_id.as_deref() == Some(fid.as_str()))
                .map(|r| r.id)
                .collect();
            for id in &ids {
                store.delete_rule(Some(&tenant), id)?;
            }
            Ok(ids)
        })
        .await??;
        for id in &ids {
            self.inner.alerting.evaluator().forget(id);
        }
        Ok(ids.len())
    }

    /// Holds back a rule's notifications for `for_s` seconds (0 lifts the silence). It keeps
    /// being evaluated, so it resolves and fires as usual once heard again.
    pub async fn silence_rule(&self, caller: &Caller, id: &str, for_s: u64) -> Result<Value> {
        if for_s > 30 * 86_400 {
            return Err(PlatformError::BadRequest(
                "for_s is at most 30 days (2592000)".into(),
            ));
        }
        let mut rule = self.find_rule(caller, id).await?;
        let now = self.inner.config.clock.now_ms();
        rule.silenced_until = (for_s > 0).then(|| now + i64::try_from(for_s).unwrap_or(0) * 1000);
        let (store, stored) = (self.inner.store.clone(), rule.clone());
        blocking(move || store.put_rule(&stored)).await??;
        Ok(self.rule_view(&rule))
    }

    fn rule_view(&self, rule: &Rule) -> Value {
        let phases: Vec<(String, String, Phase)> = self
            .inner
            .alerting
            .evaluator()
            .phases()
            .into_iter()
            .filter(|(r, _, _)| r == &rule.id)
            .collect();
        let firing: Vec<&str> = phases
            .iter()
            .filter(|(_, _, p)| matches!(p, Phase::Firing { .. }))
            .map(|(_, s, _)| s.as_str())
            .collect();
        let pending: Vec<&str> = phases
            .iter()
            .filter(|(_, _, p)| matches!(p, Phase::Pending { .. }))
            .map(|(_, s, _)| s.as_str())
            .collect();
        let state = if !firing.is_empty() {
            "firing"
        } else if !pending.is_empty() {
            "pending"
        } else {
            "ok"
        };
        let mut v = serde_json::to_value(rule).unwrap_or_default();
        v["state"] = json!(state);
        v["firing"] = json!(firing);
        v["pending"] = json!(pending);
        v["silenced"] =
            json!(rule
                .silenced_until
                .is_some_and(|t| t > self.inner.config.clock.now_ms()));
        v
    }

    // ---- subscriptions ----

    /// Seed 000's `subscribe`: the channel checked, the topic's rule and function resolved;
    /// a webhook's signing secret is returned here only.
    pub async fn subscribe(&self, caller: &Caller, spec: SubscriptionSpec) -> Result<Value> {
        spec.channel.validate().map_err(bad)?;
        if let Some(why) = self
            .inner
            .config
            .alerts
            .channels
            .undeliverable(&spec.channel)
        {
            return Err(PlatformError::BadRequest(why));
        }
        if let Some(rule) = &spec.alerts.rule {
            self.find_rule(caller, rule).await?;
        }
        if let Some(f) = &spec.alerts.function {
            self.find(caller, f).await?;
        }
        let secret = match spec.channel {
            Channel::Webhook { .. } => crate::alerts::deliver::new_secret(),
            _ => String::new(),
        };
        let sub = Subscription {
            id: new_id("sub"),
            tenant: caller.tenant.clone(),
            spec,
            secret: secret.clone(),
            admin: caller.admin,
            created_at: self.inner.config.clock.now_ms(),
        };
        let (store, stored) = (self.inner.store.clone(), sub.clone());
        blocking(move || store.put_subscription(&stored)).await??;
        let mut out = json!({
            "status": "subscribed",
            "subscription_id": sub.id,
            "subscription": sub,
        });
        if !secret.is_empty() {
            out["secret"] = json!(secret);
            out["signature"] = json!("Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256 over id.timestamp.body with the secret's base64-decoded bytes)");
        }
        Ok(out)
    }

    /// Seed 000's `unsubscribe`: by id, or by channel and target.
    pub async fn unsubscribe(&self, caller: &Caller, what: Unsubscribe) -> Result<Value> {
        let target = what.url.or(what.address).or(what.number);
        let by_target = match (&what.channel, &target) {
            (Some(c), Some(t)) => Some((c.clone(), t.clone())),
            (None, None) => None,
            _ => return Err(PlatformError::BadRequest(
                "name the channel and its target (url, address or number), or a subscription_id"
                    .into(),
            )),
        };
        if what.subscription_id.is_none() && by_target.is_none() {
            return Err(PlatformError::BadRequest(
                "say which subscription: subscription_id, or channel with url, address or number"
                    .into(),
            ));
        }
        let (store, scope, id) = (
            self.inner.store.clone(),
            caller.scope().map(String::from),
            what.subscription_id.clone(),
        );
        let removed = blocking(move || {
            store.delete_subscriptions(
                scope.as_deref(),
                id.as_deref(),
                by_target.as_ref().map(|(c, t)| (c.as_str(), t.as_str())),
            )
        })
        .await??;
        if removed == 0 {
            return Err(PlatformError::NotFound(
                "no such subscription of yours".into(),
            ));
        }
        Ok(json!({"status": "unsubscribed", "removed": removed}))
    }

    /// The caller's subscriptions (secrets not shown).
    pub async fn subscriptions(&self, caller: &Caller) -> Result<Vec<Subscription>> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        Ok(blocking(move || store.subscriptions(scope.as_deref())).await??)
    }

    /// Every notification sent or being sent to the caller, newest first, with its tries.
    pub async fn notification_history(&self, caller: &Caller, limit: u32) -> Result<Value> {
        let (store, scope) = (self.inner.store.clone(), caller.scope().map(String::from));
        let deliveries = blocking(move || store.deliveries(scope.as_deref(), limit)).await??;
        Ok(json!({"notifications": deliveries}))
    }

    // ---- evaluation ----

    /// Evaluates every rule once, on the minute rollups of the last minute or so.
    pub async fn evaluate_alerts(&self) -> Result<()> {
        let now = self.inner.config.clock.now_ms();
        let store = self.settled_store().await;
        let this = self.clone();
        let started = std::time::Instant::now();
        let rules = blocking(move || this.evaluate_at(store.as_ref(), now)).await??;
        tracing::debug!(
            rules,
            elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "alert rules evaluated"
        );
        Ok(())
    }

    /// Evaluates every rule at `now`; returns how many there were.
    fn evaluate_at(&self, store: &dyn Store, now: i64) -> Result<usize> {
        let since = bucket_start(now, 60_000) - 60_000;
        let minutes = (now - since) as f64 / 60_000.0;
        let rows = store.rollups(None, None, 60_000, since, now + 1)?;
        let window = crate::anomalies::series::by_function(&rows);
        let functions = store.functions(None)?;
        let rules = store.rules(None)?;
        let anomaly: HashMap<String, f64> = {
            let mut best: HashMap<String, f64> = HashMap::new();
            for (key, _, _, p) in self.inner.anomalies.latest() {
                let e = best.entry(key.function_id.clone()).or_default();
                *e = e.max(p.score);
            }
            best
        };
        let system = SystemFigures {
            queue_depth: store.queue_depth()? as f64,
            queue_age_s: store
                .oldest_queued_at()?
                .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
        };
        let before = self.inner.alerting.evaluator().phases();
        let mut notifications = Vec::new();
        for rule in &rules {
            let observations = observe(rule, &functions, &window, &anomaly, &system, minutes);
            let transitions = self
                .inner
                .alerting
                .evaluator()
                .evaluate(rule, &observations, now);
            if rule.silenced_until.is_some_and(|t| t > now) {
                continue;
            }
            notifications.extend(group(rule, transitions, now));
        }
        notifications.extend(self.function_events(&functions, &window, now));
        notifications.extend(self.host_events(&window, now));
        let after = self.inner.alerting.evaluator().phases();
        if after != before {
            store.save_alert_phases(&after)?;
        }
        for n in notifications {
            self.enqueue(store, &n)?;
        }
        Ok(rules.len())
    }

    /// A function's first failure after a run of successes.
    fn function_events(
        &self,
        functions: &[Function],
        window: &BTreeMap<String, crate::anomalies::series::FunctionMinute>,
        now: i64,
    ) -> Vec<Notification> {
        let mut healthy = self
            .inner
            .alerting
            .healthy
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for f in functions {
            let Some(m) = window.get(&f.id) else { continue };
            let failures = m.stats.errors()
                - m.stats
                    .errors_by_kind
                    .get("throttled")
                    .copied()
                    .unwrap_or(0);
            let was = healthy.insert(f.id.clone(), failures == 0);
            if failures > 0 && was == Some(true) {
                out.push(event(
                    &f.tenant,
                    Some(f),
                    Severity::Warning,
                    "first_failure",
                    format!(
                        "{} started failing: {failures} of its last {} calls failed",
                        f.name, m.stats.count
                    ),
                    failures as f64,
                    now,
                ));
            }
        }
        out
    }

    /// The disk nearly full, and sandboxes failing to start: the whole system's.
    fn host_events(
        &self,
        window: &BTreeMap<String, crate::anomalies::series::FunctionMinute>,
        now: i64,
    ) -> Vec<Notification> {
        let mut out = Vec::new();
        let low = self.inner.space.low();
        if self.inner.alerting.disk_low.swap(low, Ordering::SeqCst) != low {
            let report = self.inner.space.report();
            let (severity, summary) = if low {
                (
                    Severity::Critical,
                    format!(
                        "the data directory's disk is nearly full ({} MiB free): new work is refused",
                        report.free_bytes >> 20
                    ),
                )
            } else {
                (
                    Severity::Info,
                    "the data directory's disk has room again: new work is accepted".to_string(),
                )
            };
            out.push(event(
                "",
                None,
                severity,
                "disk_low",
                summary,
                report.free_bytes as f64,
                now,
            ));
        }
        let failed: u64 = window
            .values()
            .map(|m| {
                m.stats
                    .errors_by_kind
                    .get("sandbox_failure")
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let failing = failed > 0;
        if self
            .inner
            .alerting
            .sandbox_failures
            .swap(failing, Ordering::SeqCst)
            != failing
            && failing
        {
            out.push(event(
                "",
                None,
                Severity::Critical,
                "sandbox_failures",
                format!("{failed} calls in the last minute could not get a sandbox started"),
                failed as f64,
                now,
            ));
        }
        out
    }
}

/// The system's figures a rule may watch.
struct SystemFigures {
    queue_depth: f64,
    queue_age_s: f64,
}

/// What `rule` observes of each subject it watches.
fn observe(
    rule: &Rule,
    functions: &[Function],
    window: &BTreeMap<String, crate::anomalies::series::FunctionMinute>,
    anomaly: &HashMap<String, f64>,
    system: &SystemFigures,
    minutes: f64,
) -> Vec<Observation> {
    let spec = &rule.spec;
    if spec.metric.is_system() {
        let value = match spec.metric {
            Metric::QueueDepth => system.queue_depth,
            _ => system.queue_age_s,
        };
        return vec![Observation {
            subject: String::new(),
            name: String::new(),
            value: Some(value),
        }];
    }
    let empty = Stats::default();
    functions
        .iter()
        .filter(|f| f.tenant == rule.tenant && f.active)
        .filter(|f| rule.function_id.as_ref().is_none_or(|id| id == &f.id))
        .map(|f| {
            let stats = window.get(&f.id).map_or(&empty, |m| &m.stats);
            Observation {
                subject: f.id.clone(),
                name: f.name.clone(),
                value: value_of(spec, stats, anomaly.get(&f.id).copied(), minutes),
            }
        })
        .collect()
}

/// A function metric's value over the window (per minute for counts); `None` when there is
/// nothing to measure.
fn value_of(spec: &RuleSpec, s: &Stats, anomaly: Option<f64>, minutes: f64) -> Option<f64> {
    let per_minute = |n: u64| n as f64 / minutes.max(1.0 / 60.0);
    let kind = |k: &str| s.errors_by_kind.get(k).copied().unwrap_or(0);
    match spec.metric {
        Metric::ErrorRate => (s.count > 0).then(|| s.errors() as f64 / s.count as f64),
        Metric::Errors => Some(per_minute(match spec.error_kind {
            Some(k) => kind(k.as_str()),
            None => s.errors(),
        })),
        Metric::DurationP50Ms => (s.timed > 0).then(|| s.percentile(50.0)),
        Metric::DurationP95Ms => (s.timed > 0).then(|| s.percentile(95.0)),
        Metric::DurationP99Ms => (s.timed > 0).then(|| s.percentile(99.0)),
        Metric::ColdRatio => (s.timed > 0).then(|| s.cold as f64 / s.timed as f64),
        Metric::Invocations => Some(per_minute(s.count)),
        Metric::Throttled => Some(per_minute(kind("throttled"))),
        Metric::AnomalyScore => anomaly,
        Metric::QueueDepth | Metric::QueueAgeS => None,
    }
}

/// One notification for the rule's firings and one for its resolutions, each listing every
/// function they are about.
fn group(rule: &Rule, transitions: Vec<Transition>, now: i64) -> Vec<Notification> {
    let (mut firing, mut resolved) = (Vec::new(), Vec::new());
    for t in transitions {
        match t {
            Transition::Firing(i) => firing.push(i),
            Transition::Resolved(i) => resolved.push(i),
        }
    }
    let spec = &rule.spec;
    let condition = format!(
        "{}{} {} {} for {}s",
        spec.metric.name(),
        spec.error_kind
            .map(|k| format!("[{}]", k.as_str()))
            .unwrap_or_default(),
        match spec.op {
            crate::alerts::Op::Above => ">",
            crate::alerts::Op::Below => "<",
        },
        spec.threshold,
        spec.for_s
    );
    let mut out = Vec::new();
    for (status, items) in [(Status::Firing, firing), (Status::Resolved, resolved)] {
        if items.is_empty() {
            continue;
        }
        let names: Vec<&str> = items
            .iter()
            .map(|i| {
                if i.function.is_empty() {
                    "the system"
                } else {
                    i.function.as_str()
                }
            })
            .collect();
        let verb = if status == Status::Firing {
            "firing"
        } else {
            "resolved"
        };
        out.push(Notification {
            id: new_id("ntf"),
            tenant: rule.tenant.clone(),
            status,
            severity: spec.severity,
            rule_id: Some(rule.id.clone()),
            rule: Some(spec.name.clone()),
            summary: format!("{} {verb}: {condition} on {}", spec.name, names.join(", ")),
            condition: condition.clone(),
            items,
            at: now,
        });
    }
    out
}
