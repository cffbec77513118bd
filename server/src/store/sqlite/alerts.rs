//! SQLite tables of alerting: rules, their phases, subscriptions, and the outbox
//! (notifications and one delivery per subscription, each with its tries).

use rusqlite::{params, Connection, Row};

use crate::alerts::deliver::Delivery;
use crate::alerts::eval::Phase;
use crate::alerts::{Notification, Rule, Subscription};
use crate::store::{Attempt, Result};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS alert_rules (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_phases (
    rule_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    phase TEXT NOT NULL,
    PRIMARY KEY (rule_id, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    secret TEXT NOT NULL,
    admin INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriptions_tenant ON subscriptions (tenant);
CREATE TABLE IF NOT EXISTS notifications (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    notification_id TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_tenant ON deliveries (tenant, created_at);
"#;

pub(super) fn put_rule(conn: &Connection, rule: &Rule) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO alert_rules (id, tenant, body, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            rule.id,
            rule.tenant,
            serde_json::to_string(rule)?,
            rule.created_at
        ],
    )?;
    Ok(())
}

pub(super) fn rules(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Rule>> {
    let mut stmt = conn.prepare_cached(
        "SELECT body FROM alert_rules WHERE (?1 IS NULL OR tenant = ?1) ORDER BY created_at, id",
    )?;
    let bodies = stmt
        .query_map(params![tenant], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(bodies
        .iter()
        .map(|b| serde_json::from_str(b))
        .collect::<serde_json::Result<_>>()?)
}

pub(super) fn delete_rule(conn: &mut Connection, tenant: Option<&str>, id: &str) -> Result<bool> {
    let tx = conn.transaction()?;
    let n = tx.execute(
        "DELETE FROM alert_rules WHERE id = ?1 AND (?2 IS NULL OR tenant = ?2)",
        params![id, tenant],
    )?;
    if n > 0 {
        tx.execute("DELETE FROM alert_phases WHERE rule_id = ?1", params![id])?;
    }
    tx.commit()?;
    Ok(n > 0)
}

pub(super) fn phases(conn: &Connection) -> Result<Vec<(String, String, Phase)>> {
    let mut stmt = conn.prepare_cached("SELECT rule_id, subject, phase FROM alert_phases")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(rule, subject, phase)| Ok((rule, subject, serde_json::from_str(&phase)?)))
        .collect()
}

pub(super) fn save_phases(conn: &mut Connection, phases: &[(String, String, Phase)]) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM alert_phases", [])?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO alert_phases (rule_id, subject, phase) VALUES (?1, ?2, ?3)",
        )?;
        for (rule, subject, phase) in phases {
            put.execute(params![rule, subject, serde_json::to_string(phase)?])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn put_subscription(conn: &Connection, sub: &Subscription) -> Result<()> {
    conn.execute(
        "INSERT INTO subscriptions (id, tenant, channel, target, body, secret, admin, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            sub.id,
            sub.tenant,
            sub.spec.channel.kind(),
            sub.spec.channel.target(),
            serde_json::to_string(&sub.spec)?,
            sub.secret,
            sub.admin,
            sub.created_at
        ],
    )?;
    Ok(())
}

const SUBSCRIPTION_COLS: &str = "s.id, s.tenant, s.body, s.secret, s.admin, s.created_at";

fn subscription_row(r: &Row, at: usize) -> rusqlite::Result<(Subscription, String)> {
    Ok((
        Subscription {
            id: r.get(at)?,
            tenant: r.get(at + 1)?,
            spec: crate::alerts::SubscriptionSpec {
                channel: crate::alerts::Channel::Sms {
                    number: String::new(),
                },
                alerts: Default::default(),
                min_severity: crate::alerts::Severity::Info,
            },
            secret: r.get(at + 3)?,
            admin: r.get(at + 4)?,
            created_at: r.get(at + 5)?,
        },
        r.get(at + 2)?,
    ))
}

fn with_spec((mut sub, body): (Subscription, String)) -> Result<Subscription> {
    sub.spec = serde_json::from_str(&body)?;
    Ok(sub)
}

pub(super) fn subscriptions(conn: &Connection, tenant: Option<&str>) -> Result<Vec<Subscription>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SUBSCRIPTION_COLS} FROM subscriptions s WHERE (?1 IS NULL OR s.tenant = ?1) ORDER BY s.created_at, s.id"
    ))?;
    let rows = stmt
        .query_map(params![tenant], |r| subscription_row(r, 0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(with_spec).collect()
}

pub(super) fn prune_notifications(conn: &mut Connection, before: i64) -> Result<u64> {
    let tx = conn.transaction()?;
    let deliveries = tx.execute(
        "DELETE FROM deliveries WHERE status <> 'pending' AND created_at < ?1",
        params![before],
    )?;
    tx.execute(
        "DELETE FROM notifications WHERE at < ?1
           AND id NOT IN (SELECT notification_id FROM deliveries WHERE status = 'pending')",
        params![before],
    )?;
    tx.commit()?;
    Ok(deliveries as u64)
}

pub(super) fn delete_subscriptions(
    conn: &mut Connection,
    tenant: Option<&str>,
    id: Option<&str>,
    channel_target: Option<(&str, &str)>,
) -> Result<u64> {
    let (channel, target) = channel_target.unzip();
    let tx = conn.transaction()?;
    let ids: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT id FROM subscriptions WHERE (?1 IS NULL OR tenant = ?1)
               AND (?2 IS NULL OR id = ?2) AND (?3 IS NULL OR (channel = ?3 AND target = ?4))",
        )?;
        let ids = stmt
            .query_map(params![tenant, id, channel, target], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids
    };
    for sid in &ids {
        tx.execute("DELETE FROM subscriptions WHERE id = ?1", params![sid])?;
        // What was still to be sent to it is not.
        tx.execute(
            "UPDATE deliveries SET status = 'failed', last_error = 'unsubscribed', finished_at = ?2
             WHERE subscription_id = ?1 AND status = 'pending'",
            params![sid, crate::model::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(ids.len() as u64)
}

pub(super) fn enqueue(
    conn: &mut Connection,
    n: &Notification,
    subscriptions: &[Subscription],
) -> Result<Vec<Delivery>> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT OR IGNORE INTO notifications (id, tenant, body, at) VALUES (?1, ?2, ?3, ?4)",
        params![n.id, n.tenant, serde_json::to_string(n)?, n.at],
    )?;
    let mut out = Vec::new();
    {
        let mut put = tx.prepare_cached(
            "INSERT OR IGNORE INTO deliveries (id, notification_id, subscription_id, tenant, channel, target,
                 status, attempts, next_at, created_at, summary)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', 0, ?7, ?7, ?8)",
        )?;
        for sub in subscriptions {
            let d = Delivery::pending(n, sub);
            put.execute(params![
                d.id,
                d.notification_id,
                d.subscription_id,
                d.tenant,
                d.channel,
                d.target,
                d.next_at,
                d.summary
            ])?;
            out.push(d);
        }
    }
    tx.commit()?;
    Ok(out)
}

const DELIVERY_COLS: &str = "d.id, d.notification_id, d.subscription_id, d.tenant, d.channel, d.target, d.status, d.attempts, d.next_at, d.last_error, d.created_at, d.finished_at, d.summary";

fn delivery_row(r: &Row) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        notification_id: r.get(1)?,
        subscription_id: r.get(2)?,
        tenant: r.get(3)?,
        channel: r.get(4)?,
        target: r.get(5)?,
        status: r.get(6)?,
        attempts: r.get(7)?,
        next_at: r.get(8)?,
        last_error: r.get(9)?,
        created_at: r.get(10)?,
        finished_at: r.get(11)?,
        summary: r.get(12)?,
    })
}

pub(super) fn due(
    conn: &Connection,
    now: i64,
    limit: u32,
) -> Result<Vec<(Delivery, Notification, Subscription)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLS}, n.body, {SUBSCRIPTION_COLS}
         FROM deliveries d JOIN notifications n ON n.id = d.notification_id
              JOIN subscriptions s ON s.id = d.subscription_id
         WHERE d.status = 'pending' AND d.next_at <= ?1
         ORDER BY d.next_at, d.id LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![now, limit], |r| {
            Ok((
                delivery_row(r)?,
                r.get::<_, String>(13)?,
                subscription_row(r, 14)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(d, n, s)| Ok((d, serde_json::from_str(&n)?, with_spec(s)?)))
        .collect()
}

pub(super) fn record_attempt(
    conn: &Connection,
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
        "UPDATE deliveries SET status = ?2, attempts = attempts + 1, next_at = COALESCE(?3, next_at),
             last_error = ?4, finished_at = ?5
         WHERE id = ?1 AND status = 'pending'",
        params![id, status, next_at, error, finished],
    )?;
    Ok(())
}

pub(super) fn deliveries(
    conn: &Connection,
    tenant: Option<&str>,
    limit: u32,
) -> Result<Vec<Delivery>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLS} FROM deliveries d WHERE (?1 IS NULL OR d.tenant = ?1)
         ORDER BY d.created_at DESC, d.id LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![tenant, limit], delivery_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
