//! What alerting is made of: rules on metrics, subscriptions to channels, and the
//! notifications sent to them; each checked as it comes in, so nothing invalid is stored.

use serde::{Deserialize, Serialize};

use crate::model::ErrorKind;

/// Why a rule or subscription was refused: the message says what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(message.into()))
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// What a rule watches. Function metrics are read per function over the last minute;
/// `queue_depth` and `queue_age_s` are the system's (admins' rules only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The share of calls that failed.
    ErrorRate,
    /// Calls a minute that failed with `error_kind` (any kind without it).
    Errors,
    DurationP50Ms,
    DurationP95Ms,
    DurationP99Ms,
    /// The share of timed calls that were cold starts.
    ColdRatio,
    /// Calls a minute (`below` finds a function that stops being called).
    Invocations,
    /// Calls a minute refused for capacity (429s).
    Throttled,
    /// The highest anomaly score of the function's series in the last minute watched.
    AnomalyScore,
    /// Tasks waiting in the queue.
    QueueDepth,
    /// How long the oldest queued task has waited, seconds.
    QueueAgeS,
}

impl Metric {
    /// Every metric.
    pub const ALL: [Metric; 11] = [
        Metric::ErrorRate,
        Metric::Errors,
        Metric::DurationP50Ms,
        Metric::DurationP95Ms,
        Metric::DurationP99Ms,
        Metric::ColdRatio,
        Metric::Invocations,
        Metric::Throttled,
        Metric::AnomalyScore,
        Metric::QueueDepth,
        Metric::QueueAgeS,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::Errors => "errors",
            Metric::DurationP50Ms => "duration_p50_ms",
            Metric::DurationP95Ms => "duration_p95_ms",
            Metric::DurationP99Ms => "duration_p99_ms",
            Metric::ColdRatio => "cold_ratio",
            Metric::Invocations => "invocations",
            Metric::Throttled => "throttled",
            Metric::AnomalyScore => "anomaly_score",
            Metric::QueueDepth => "queue_depth",
            Metric::QueueAgeS => "queue_age_s",
        }
    }

    /// Whether it is the system's rather than a function's.
    pub fn is_system(self) -> bool {
        matches!(self, Metric::QueueDepth | Metric::QueueAgeS)
    }

    /// Whether its values are shares or scores in [0, 1].
    fn is_share(self) -> bool {
        matches!(
            self,
            Metric::ErrorRate | Metric::ColdRatio | Metric::AnomalyScore
        )
    }
}

/// Which side of the threshold fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Above,
    Below,
}

/// A rule as a user writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// A function's name or id; `None`: every function the tenant has (or, for system
    /// metrics, the system).
    #[serde(default)]
    pub function: Option<String>,
    pub metric: Metric,
    /// With `errors`: only errors of this kind.
    #[serde(default)]
    pub error_kind: Option<ErrorKind>,
    pub op: Op,
    pub threshold: f64,
    /// How long the condition must hold before the rule fires, seconds (Prometheus's `for`).
    #[serde(default)]
    pub for_s: u64,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// While it keeps firing, how often to notify again, seconds (0: never).
    #[serde(default = "default_renotify")]
    pub renotify_s: u64,
}

fn default_severity() -> Severity {
    Severity::Warning
}

fn default_renotify() -> u64 {
    4 * 3600
}

/// The longest `for` and re-notify interval: a week.
const MOST_S: u64 = 7 * 86_400;

impl RuleSpec {
    /// Checks what the types cannot; `admin` may write system rules.
    pub fn validate(&self, admin: bool) -> Result<(), Invalid> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return invalid("name must be 1 to 100 characters");
        }
        if !self.threshold.is_finite() {
            return invalid("threshold must be a number");
        }
        if self.threshold < 0.0 {
            return invalid(format!(
                "threshold {} can never be crossed: {} is never negative",
                self.threshold,
                self.metric.name()
            ));
        }
        if self.metric.is_share() && self.threshold > 1.0 {
            return invalid(format!(
                "{} is between 0 and 1: a threshold of {} can never be crossed",
                self.metric.name(),
                self.threshold
            ));
        }
        if self.op == Op::Below && self.threshold == 0.0 {
            return invalid(format!(
                "{} is never below 0: use a threshold above 0",
                self.metric.name()
            ));
        }
        if self.error_kind.is_some() && self.metric != Metric::Errors {
            return invalid("error_kind goes with the metric errors only");
        }
        if self.for_s > MOST_S || self.renotify_s > MOST_S {
            return invalid("for_s and renotify_s are at most a week (604800)");
        }
        if self.metric.is_system() {
            if !admin {
                return invalid(format!(
                    "{} is the whole system's: only an admin may watch it",
                    self.metric.name()
                ));
            }
            if self.function.is_some() {
                return invalid(format!(
                    "{} is the whole system's: leave function out",
                    self.metric.name()
                ));
            }
        }
        Ok(())
    }

    /// Whether `value` meets the condition.
    pub fn holds(&self, value: f64) -> bool {
        match self.op {
            Op::Above => value > self.threshold,
            Op::Below => value < self.threshold,
        }
    }
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub tenant: String,
    #[serde(flatten)]
    pub spec: RuleSpec,
    /// The function's id, resolved when the rule was written.
    pub function_id: Option<String>,
    /// Notifications are held back until then (Unix ms).
    pub silenced_until: Option<i64>,
    pub created_at: i64,
}

/// How a webhook's body is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// cloudfunc's own JSON (see the OpenAPI document's `Notification`).
    #[default]
    Cloudfunc,
    /// Prometheus Alertmanager's webhook payload (version 4), for existing receivers.
    Alertmanager,
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "channel", rename_all = "snake_case", deny_unknown_fields)]
pub enum Channel {
    Webhook {
        url: String,
        #[serde(default)]
        format: WebhookFormat,
    },
    Email {
        address: String,
    },
    Sms {
        number: String,
    },
}

impl Channel {
    /// Its kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Webhook { .. } => "webhook",
            Channel::Email { .. } => "email",
            Channel::Sms { .. } => "sms",
        }
    }

    /// Where it delivers.
    pub fn target(&self) -> &str {
        match self {
            Channel::Webhook { url, .. } => url,
            Channel::Email { address } => address,
            Channel::Sms { number } => number,
        }
    }

    /// Checks the target's form (a webhook's address is checked again when it is sent to).
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Channel::Webhook { url, .. } => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| Invalid(format!("url {url:?} is not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return invalid(format!("url {url:?} must be http or https"));
                }
                if parsed.host_str().is_none_or(str::is_empty) {
                    return invalid(format!("url {url:?} has no host"));
                }
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    return invalid("url must not carry credentials; the signature authenticates");
                }
                if url.len() > 2048 {
                    return invalid("url is longer than 2048 characters");
                }
                Ok(())
            }
            Channel::Email { address } => {
                if address.len() > 254 || address.parse::<lettre::Address>().is_err() {
                    return invalid(format!("{address:?} is not an email address"));
                }
                Ok(())
            }
            Channel::Sms { number } => {
                let digits = number.strip_prefix('+').unwrap_or("");
                let ok = (8..=15).contains(&digits.len())
                    && digits.chars().all(|c| c.is_ascii_digit())
                    && !digits.starts_with('0');
                if !ok {
                    return invalid(format!(
                        "{number:?} is not a phone number in E.164 form (like +14155550123)"
                    ));
                }
                Ok(())
            }
        }
    }
}

/// What a subscription wants to hear about: any of its fields that is set must match (none
/// set: everything of the tenant's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    /// One rule's notifications.
    #[serde(default)]
    pub rule: Option<String>,
    /// One function's (by name or id).
    #[serde(default)]
    pub function: Option<String>,
    /// System events (a function deactivated, its first failure, a crash recovered, the disk
    /// nearly full, sandboxes failing to start).
    #[serde(default)]
    pub system_events: bool,
}

/// A subscription as a user writes it (seed 000's `POST /api/notifications/subscribe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionSpec {
    #[serde(flatten)]
    pub channel: Channel,
    /// The alert types wanted.
    #[serde(default)]
    pub alerts: Topic,
    #[serde(default = "lowest")]
    pub min_severity: Severity,
}

fn lowest() -> Severity {
    Severity::Info
}

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub tenant: String,
    #[serde(flatten)]
    pub spec: SubscriptionSpec,
    /// The webhook signing secret (`whsec_...`); shown once, at subscribe.
    #[serde(skip_serializing, default)]
    pub secret: String,
    /// Made by an admin: it may hear the whole system's events.
    #[serde(default)]
    pub admin: bool,
    pub created_at: i64,
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Firing,
    Resolved,
    /// A system event (no rule).
    Event,
}

/// One function's (or the system's) part of a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The function's name; empty for the system.
    pub function: String,
    pub function_id: String,
    /// The value that crossed (or came back over) the threshold.
    pub value: f64,
    /// When the condition started to hold (Unix ms).
    pub since: i64,
}

/// A notification: one per rule and evaluation, listing every function it is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable: receivers de-duplicate on it.
    pub id: String,
    pub tenant: String,
    pub status: Status,
    pub severity: Severity,
    pub rule_id: Option<String>,
    pub rule: Option<String>,
    /// The metric and its condition, or the event's kind.
    pub condition: String,
    pub summary: String,
    pub items: Vec<Item>,
    pub at: i64,
}

impl Notification {
    /// Whether `sub` wants it.
    pub fn is_for(&self, sub: &Subscription) -> bool {
        let topic = &sub.spec.alerts;
        if self.severity < sub.spec.min_severity {
            return false;
        }
        // The whole system's events (no tenant's) go to admins who asked for them.
        if self.tenant.is_empty() {
            return sub.admin && topic.system_events;
        }
        if sub.tenant != self.tenant {
            return false;
        }
        if self.status == Status::Event && !topic.system_events {
            return false;
        }
        if let Some(rule) = &topic.rule {
            if self.rule_id.as_deref() != Some(rule.as_str()) {
                return false;
            }
        }
        if let Some(f) = &topic.function {
            if !self
                .items
                .iter()
                .any(|i| &i.function == f || &i.function_id == f)
            {
                return false;
            }
        }
        true
    }

    /// One line of text, for SMS and subjects.
    pub fn headline(&self) -> String {
        let what = match self.status {
            Status::Firing => "FIRING",
            Status::Resolved => "RESOLVED",
            Status::Event => "EVENT",
        };
        format!("[{what}] {}", self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(metric: Metric, op: Op, threshold: f64) -> RuleSpec {
        RuleSpec {
            name: "r".into(),
            function: None,
            metric,
            error_kind: None,
            op,
            threshold,
            for_s: 60,
            severity: Severity::Warning,
            renotify_s: 3600,
        }
    }

    #[test]
    fn impossible_rules_are_refused_with_what_to_fix() {
        assert!(rule(Metric::ErrorRate, Op::Above, 0.1)
            .validate(false)
            .is_ok());
        for (bad, admin) in [
            (rule(Metric::ErrorRate, Op::Above, 1.5), true),
            (rule(Metric::DurationP95Ms, Op::Above, -1.0), true),
            (rule(Metric::Invocations, Op::Below, 0.0), true),
            (rule(Metric::ErrorRate, Op::Above, f64::NAN), true),
            (rule(Metric::QueueDepth, Op::Above, 10.0), false),
            (
                RuleSpec {
                    error_kind: Some(ErrorKind::Timeout),
                    ..rule(Metric::ErrorRate, Op::Above, 0.1)
                },
                true,
            ),
            (
                RuleSpec {
                    for_s: 10 * 86_400,
                    ..rule(Metric::ErrorRate, Op::Above, 0.1)
                },
                true,
            ),
            (
                RuleSpec {
                    name: " ".into(),
                    ..rule(Metric::ErrorRate, Op::Above, 0.1)
                },
                true,
            ),
        ] {
            assert!(bad.validate(admin).is_err(), "{bad:?}");
        }
        assert!(rule(Metric::QueueDepth, Op::Above, 10.0)
            .validate(true)
            .is_ok());
    }

    #[test]
    fn channels_check_their_targets() {
        let ok = [
            Channel::Webhook {
                url: "https://hooks.example.com/x".into(),
                format: WebhookFormat::Cloudfunc,
            },
            Channel::Email {
                address: "ops@example.com".into(),
            },
            Channel::Sms {
                number: "+14155550123".into(),
            },
        ];
        for c in ok {
            assert!(c.validate().is_ok(), "{c:?}");
        }
        let bad = [
            Channel::Webhook {
                url: "ftp://example.com".into(),
                format: WebhookFormat::Cloudfunc,
            },
            Channel::Webhook {
                url: "https://user:pw@example.com".into(),
                format: WebhookFormat::Cloudfunc,
            },
            Channel::Webhook {
                url: "not a url".into(),
                format: WebhookFormat::Cloudfunc,
            },
            Channel::Email {
                address: "ops@".into(),
            },
            Channel::Sms {
                number: "4155550123".into(),
            },
            Channel::Sms {
                number: "+0123456789".into(),
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn subscriptions_parse_as_seed_000_posts_them() {
        let spec: SubscriptionSpec = serde_json::from_value(serde_json::json!({
            "channel": "email", "address": "ops@example.com",
            "alerts": {"function": "hello_fn", "system_events": true},
            "min_severity": "warning"
        }))
        .unwrap();
        assert_eq!(spec.min_severity, Severity::Warning);
        assert_eq!(spec.alerts.function.as_deref(), Some("hello_fn"));
        assert!(serde_json::from_value::<SubscriptionSpec>(
            serde_json::json!({"channel": "pager", "to": "x"})
        )
        .is_err());
    }
}
