//! Alerting: rules on live metrics, the state each is in for each function it watches, and
//! notifications delivered to subscribed channels (webhook, email, SMS) through a durable
//! outbox. This module knows neither HTTP routes nor SQL: the platform evaluates, stores and
//! delivers with it.

pub mod deliver;
pub mod eval;
pub mod model;
mod target;

pub use model::{
    Channel, Invalid, Item, Metric, Notification, Op, Rule, RuleSpec, Severity, Status,
    Subscription, SubscriptionSpec, Topic, WebhookFormat,
};
