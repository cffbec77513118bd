//! Alerting's tables on PostgreSQL: rules, their phases, subscriptions and the outbox.

use postgres::Row;

use super::pool::Conn;
use super::rows::u32_of;
use crate::alerts::deliver::Delivery;
use crate::alerts::eval::Phase;
use crate::alerts::{Notification, Rule, Subscription};
use crate::store::{Attempt, Result};

pub(super) fn put_rule(conn: &mut Conn, rule: &Rule) -> Result<()> {
    conn.execute(
        "INSERT INTO alert_rules (id, tenant, body, created_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, body = excluded.body, created_at = excluded.created_at",
        &[
            &rule.id,
            &rule.tenant,
            &serde_json::to_string(rule)?,
            &rule.created_at,
        ],
    )?;
    Ok(())
}

pub(super) fn rules(conn: &mut Conn, tenant: Option<&str>) -> Result<Vec<Rule>> {
    conn.query(
        "SELECT body FROM alert_rules WHERE ($1::TEXT IS NULL OR tenant = $1) ORDER BY created_at, id",
        &[&tenant],
    )?
    .iter()
    .map(|r| Ok(serde_json::from_str(r.try_get(0)?)?))
    .collect()
}

pub(super) fn delete_rule(conn: &mut Conn, tenant: Option<&str>, id: &str) -> Result<bool> {
    let mut tx = conn.transaction()?;
    let n = tx.execute(
        "DELETE FROM alert_rules WHERE id = $1 AND ($2::TEXT IS NULL OR tenant = $2)",
        &[&id, &tenant],
    )?;
    if n > 0 {
        tx.execute("DELETE FROM alert_phases WHERE rule_id = $1", &[&id])?;
    }
    tx.commit()?;
    Ok(n > 0)
}

pub(super) fn phases(conn: &mut Conn) -> Result<Vec<(String, String, Phase)>> {
    conn.query("SELECT rule_id, subject, phase FROM alert_phases", &[])?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                serde_json::from_str(r.try_get(2)?)?,
            ))
        })
        .collect()
}

pub(super) fn save_phases(conn: &mut Conn, phases: &[(String, String, Phase)]) -> Result<()> {
    let mut tx = conn.transaction()?;
    tx.execute("DELETE FROM alert_phases", &[])?;
    for (rule, subject, phase) in phases {
        tx.execute(
            "INSERT INTO alert_phases (rule_id, subject, phase) VALUES ($1, $2, $3)",
            &[rule, subject, &serde_json::to_string(phase)?],
        )?;
    }
    tx.commit()
}

pub(super) fn put_subscription(conn: &mut Conn, sub: &Subscription) -> Result<()> {
    conn.execute(
        "INSERT INTO subscriptions (id, tenant, channel, target, body, secret, admin, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &sub.id,
            &sub.tenant,
            &sub.spec.channel.kind(),
            &sub.spec.channel.target(),
            &serde_json::to_string(&sub.spec)?,
            &sub.secret,
            &sub.admin,
            &sub.created_at,
        ],
    )?;
    Ok(())
}

const SUBSCRIPTION_COLS: &str = "s.id, s.tenant, s.body, s.secret, s.admin, s.created_at";

fn subscription_row(r: &Row, at: usize) -> Result<Subscription> {
    Ok(Subscription {
        id: r.try_get(at)?,
        tenant: r.try_get(at + 1)?,
        spec: serde_json::from_str(r.try_get(at + 2)?)?,
        secret: r.try_get(at + 3)?,
        admin: r.try_get(at + 4)?,
        created_at: r.try_get(at + 5)?,
    })
}

pub(super) fn subscriptions(conn: &mut Conn, tenant: Option<&str>) -> Result<Vec<Subscription>> {
    conn.query(
        &format!(
            "SELECT {SUBSCRIPTION_COLS} FROM subscriptions s WHERE ($1::TEXT IS NULL OR s.tenant = $1) ORDER BY s.created_at, s.id"
        ),
        &[&tenant],
    )?
    .iter()
    .map(|r| subscription_row(r, 0))
    .collect()
}

pub(super) fn prune_notifications(conn: &mut Conn, before: i64) -> Result<u64> {
    let mut tx = conn.transaction()?;
    let deliveries = tx.execute(
        "DELETE FROM deliveries WHERE status <> 'pending' AND created_at < $1",
        &[&before],
    )?;
    tx.execute(
        "DELETE FROM notifications WHERE at < $1
           AND id NOT IN (SELECT notification_id FROM deliveries WHERE status = 'pending')",
        &[&before],
    )?;
    tx.commit()?;
    Ok(deliveries)
}

pub(super) fn delete_subscriptions(
    conn: &mut Conn,
    tenant: Option<&str>,
    id: Option<&str>,
    channel_target: Option<(&str, &str)>,
) -> Result<u64> {
    let (channel, target) = channel_target.unzip();
    let mut tx = conn.transaction()?;
    let ids: Vec<String> = tx
        .query(
            "SELECT id FROM subscriptions WHERE ($1::TEXT IS NULL OR tenant = $1)
               AND ($2::TEXT IS NULL OR id = $2) AND ($3::TEXT IS NULL OR (channel = $3 AND target = $4))",
            &[&tenant, &id, &channel, &target],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    for sid in &ids {
        tx.execute("DELETE FROM subscriptions WHERE id = $1", &[sid])?;
        // What was still to be sent to it is not.
        tx.execute(
            "UPDATE deliveries SET status = 'failed', last_error = 'unsubscribed', finished_at = $2
             WHERE subscription_id = $1 AND status = 'pending'",
            &[sid, &crate::model::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(ids.len() as u64)
}

pub(super) fn enqueue(
    conn: &mut Conn,
    n: &Notification,
    subscriptions: &[Subscription],
) -> Result<Vec<Delivery>> {
    let mut tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO notifications (id, tenant, body, at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        &[&n.id, &n.tenant, &serde_json::to_string(n)?, &n.at],
    )?;
    let mut out = Vec::new();
    for sub in subscriptions {
        let d = Delivery::pending(n, sub);
        tx.execute(
            "INSERT INTO deliveries (id, notification_id, subscription_id, tenant, channel, target,
                 status, attempts, next_at, created_at, summary)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $8) ON CONFLICT (id) DO NOTHING",
            &[
                &d.id,
                &d.notification_id,
                &d.subscription_id,
                &d.tenant,
                &d.channel,
                &d.target,
                &d.next_at,
                &d.summary,
            ],
        )?;
        out.push(d);
    }
    tx.commit()?;
    Ok(out)
}

const DELIVERY_COLS: &str = "d.id, d.notification_id, d.subscription_id, d.tenant, d.channel, d.target, d.status, d.attempts, d.next_at, d.last_error, d.created_at, d.finished_at, d.summary";

fn delivery_row(r: &Row) -> Result<Delivery> {
    Ok(Delivery {
        id: r.try_get(0)?,
        notification_id: r.try_get(1)?,
        subscription_id: r.try_get(2)?,
        tenant: r.try_get(3)?,
        channel: r.try_get(4)?,
        target: r.try_get(5)?,
        status: r.try_get(6)?,
        attempts: u32_of(r.try_get(7)?),
        next_at: r.try_get(8)?,
        last_error: r.try_get(9)?,
        created_at: r.try_get(10)?,
        finished_at: r.try_get(11)?,
        summary: r.try_get(12)?,
    })
}

pub(super) fn due(
    conn: &mut Conn,
    now: i64,
    limit: u32,
) -> Result<Vec<(Delivery, Notification, Subscription)>> {
    conn.query(
        &format!(
            "SELECT {DELIVERY_COLS}, n.body, {SUBSCRIPTION_COLS}
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                  JOIN subscriptions s ON s.id = d.subscription_id
             WHERE d.status = 'pending' AND d.next_at <= $1
             ORDER BY d.next_at, d.id LIMIT $2"
        ),
        &[&now, &i64::from(limit)],
    )?
    .iter()
    .map(|r| {
        Ok((
            delivery_row(r)?,
            serde_json::from_str(r.try_get(13)?)?,
            subscription_row(r, 14)?,
        ))
    })
    .collect()
}

pub(super) fn record_attempt(
    conn: &mut Conn,
    id: &str,
    outcome: Attempt,
    error: Option<&str>,
    now: i64,
) -> Result<()> {
    let (status, next_at, finished) = match outcome {
        Attempt::Sent => ("sent", None, Some(now)),
        Attempt::Failed => ("failed", None, Some(now)),
        Attempt::Retry(at) => ("pending", Some(at), None),
    };
    conn.execute(
        "UPDATE deliveries SET status = $2, attempts = attempts + 1, next_at = COALESCE($3, next_at),
             last_error = $4, finished_at = $5
         WHERE id = $1 AND status = 'pending'",
        &[&id, &status, &next_at, &error, &finished],
    )?;
    Ok(())
}

pub(super) fn deliveries(
    conn: &mut Conn,
    tenant: Option<&str>,
    limit: u32,
) -> Result<Vec<Delivery>> {
    conn.query(
        &format!(
            "SELECT {DELIVERY_COLS} FROM deliveries d WHERE ($1::TEXT IS NULL OR d.tenant = $1)
             ORDER BY d.created_at DESC, d.id LIMIT $2"
        ),
        &[&tenant, &i64::from(limit)],
    )?
    .iter()
    .map(delivery_row)
    .collect()
}
