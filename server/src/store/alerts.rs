//! What alerting keeps ([`crate::alerts`]): rules, each rule's phase per function,
//! subscriptions, and the outbox of notifications and their deliveries.

use super::Result;
use crate::alerts::deliver::Delivery;
use crate::alerts::eval::Phase;
use crate::alerts::{Notification, Rule, Subscription};

/// Storage of alerting. `tenant: None` means an admin.
pub trait AlertStore {
    /// Adds or replaces a rule.
    fn put_rule(&self, rule: &Rule) -> Result<()>;
    /// Every rule `tenant` sees, oldest first.
    fn rules(&self, tenant: Option<&str>) -> Result<Vec<Rule>>;
    /// Deletes a rule (and its phases); whether it was there.
    fn delete_rule(&self, tenant: Option<&str>, id: &str) -> Result<bool>;
    /// Every rule's phase per subject.
    fn alert_phases(&self) -> Result<Vec<(String, String, Phase)>>;
    /// Replaces every phase.
    fn save_alert_phases(&self, phases: &[(String, String, Phase)]) -> Result<()>;
    /// Adds a subscription.
    fn put_subscription(&self, sub: &Subscription) -> Result<()>;
    /// Every subscription `tenant` sees.
    fn subscriptions(&self, tenant: Option<&str>) -> Result<Vec<Subscription>>;
    /// Deletes `tenant`'s subscriptions with this id, or on this channel and target; how many.
    fn delete_subscriptions(
        &self,
        tenant: Option<&str>,
        id: Option<&str>,
        channel_target: Option<(&str, &str)>,
    ) -> Result<u64>;
    /// Stores a notification and a pending delivery to each of `subscriptions`, at once:
    /// nothing is sent that was not stored first.
    fn enqueue(&self, n: &Notification, subscriptions: &[Subscription]) -> Result<Vec<Delivery>>;
    /// Pending deliveries due at `now`, oldest first, with their notification and
    /// subscription.
    fn due_deliveries(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<(Delivery, Notification, Subscription)>>;
    /// Records a try: sent, failed for good, or to be tried again at `next_at`.
    fn record_attempt(
        &self,
        delivery_id: &str,
        outcome: Attempt,
        error: Option<&str>,
        now: i64,
    ) -> Result<()>;
    /// When the oldest task still waiting in the queue was queued (Unix ms).
    fn oldest_queued_at(&self) -> Result<Option<i64>>;
    /// Removes the deliveries made before `before` that are no longer pending, and the
    /// notifications of that age with none pending; returns how many deliveries.
    fn prune_notifications(&self, before: i64) -> Result<u64>;
    /// The newest deliveries `tenant` sees, newest first.
    fn deliveries(&self, tenant: Option<&str>, limit: u32) -> Result<Vec<Delivery>>;
}

/// How a try ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Sent,
    /// Given up.
    Failed,
    /// Again at this time (Unix ms).
    Retry(i64),
}
