//! `cloudfunc alerts ...`: alert rules and notification subscriptions from the command line.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::{encode, Client};
use super::commands::Out;

/// What `alerts` does.
#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// The rules, each with its state (ok, pending, firing).
    List,
    /// Add a rule.
    Create(CreateArgs),
    /// Delete a rule.
    Delete {
        /// The rule's id (rule_...), as list shows it.
        id: String,
    },
    /// Hold back a rule's notifications for a while (e.g. 1h; 0 lifts it).
    Silence {
        /// The rule's id (rule_...).
        id: String,
        /// How long: 30s, 5m, 1h, 1d (0s lifts a silence).
        #[arg(long = "for", default_value = "1h")]
        duration: String,
    },
    /// Subscribe a webhook, an email address or a phone number to alerts.
    Subscribe(SubscribeArgs),
    /// The subscriptions.
    Subscriptions,
    /// Unsubscribe by subscription id.
    Unsubscribe {
        /// The subscription's id (sub_...), as subscriptions shows it.
        id: String,
    },
    /// Notifications sent, being retried or given up.
    History,
}

/// `alerts create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// What to call the rule (1 to 100 characters).
    #[arg(long)]
    name: String,
    /// A function's name (every function when absent).
    #[arg(long)]
    function: Option<String>,
    /// error_rate, errors, duration_p50_ms, duration_p95_ms, duration_p99_ms, cold_ratio,
    /// invocations, throttled, anomaly_score, queue_depth, queue_age_s.
    #[arg(long)]
    metric: String,
    /// With errors: only this kind (timeout, out_of_memory, crashed, ...).
    #[arg(long)]
    error_kind: Option<String>,
    /// Fire when the metric is above this.
    #[arg(long, conflicts_with = "below", required_unless_present = "below")]
    above: Option<f64>,
    /// Fire when the metric is below this.
    #[arg(long)]
    below: Option<f64>,
    /// How long it must hold first (30s, 5m).
    #[arg(long = "for", default_value = "0s")]
    duration: String,
    /// info, warning or critical.
    #[arg(long, default_value = "warning")]
    severity: String,
    /// How often to notify again while it fires (0s: never).
    #[arg(long, default_value = "4h")]
    renotify: String,
}

/// `alerts subscribe`.
#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// A URL to POST each notification to (signed; its secret is printed once).
    #[arg(long, group = "to")]
    webhook: Option<String>,
    /// An email address.
    #[arg(long, group = "to")]
    email: Option<String>,
    /// A phone number in E.164 form (+14155550123).
    #[arg(long, group = "to")]
    sms: Option<String>,
    /// Only this rule's alerts.
    #[arg(long)]
    rule: Option<String>,
    /// Only this function's alerts.
    #[arg(long)]
    function: Option<String>,
    /// System events too.
    #[arg(long)]
    system_events: bool,
    /// The least severity heard: info, warning or critical.
    #[arg(long, default_value = "info")]
    min_severity: String,
}

/// `30s`, `5m`, `4h`, `1d` in seconds.
fn seconds(text: &str) -> Result<u64> {
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("{text:?}: use a number and s, m, h or d (5m)"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: use a number and s, m, h or d (5m)"),
    };
    n.checked_mul(unit)
        .ok_or_else(|| anyhow::anyhow!("{text:?} is too long"))
}

#[derive(Debug, Deserialize)]
struct RuleRow {
    id: String,
    name: String,
    metric: String,
    op: String,
    threshold: f64,
    for_s: u64,
    state: String,
    #[serde(default)]
    silenced: bool,
}

fn rule_line(r: &RuleRow) -> String {
    format!(
        "{}  {:<8} {}  ({} {} {} for {}s){}",
        r.id,
        r.state,
        r.name,
        r.metric,
        if r.op == "above" { ">" } else { "<" },
        r.threshold,
        r.for_s,
        if r.silenced { "  silenced" } else { "" }
    )
}

/// Runs an `alerts` command.
pub fn run(c: &Client, out: &Out, command: &AlertsCommand) -> Result<bool> {
    match command {
        AlertsCommand::List => {
            let body = c.get("/api/alerts/rules")?.ok()?;
            out.print(body, |v: &Value| {
                let rows: Vec<RuleRow> =
                    serde_json::from_value(v["rules"].clone()).unwrap_or_default();
                if rows.is_empty() {
                    "no alert rules".to_string()
                } else {
                    rows.iter().map(rule_line).collect::<Vec<_>>().join("\n")
                }
            })?;
        }
        AlertsCommand::Create(a) => {
            let (op, threshold) = match (a.above, a.below) {
                (Some(x), _) => ("above", x),
                (None, Some(x)) => ("below", x),
                (None, None) => bail!("say --above or --below"),
            };
            let mut body = json!({
                "name": a.name, "metric": a.metric, "op": op, "threshold": threshold,
                "for_s": seconds(&a.duration)?, "severity": a.severity,
                "renotify_s": seconds(&a.renotify)?,
            });
            if let Some(f) = &a.function {
                body["function"] = json!(f);
            }
            if let Some(k) = &a.error_kind {
                body["error_kind"] = json!(k);
            }
            let reply = c.post_json("/api/alerts/rules", &body)?.ok()?;
            out.print(reply, |r: &RuleRow| format!("created {}", rule_line(r)))?;
        }
        AlertsCommand::Delete { id } => {
            let reply = c
                .delete(&format!("/api/alerts/rules/{}", encode(id)))?
                .ok()?;
            out.print(reply, |_: &Value| format!("deleted {id}"))?;
        }
        AlertsCommand::Silence { id, duration } => {
            let body = json!({"for_s": seconds(duration)?});
            let reply = c
                .post_json(&format!("/api/alerts/rules/{}/silence", encode(id)), &body)?
                .ok()?;
            out.print(reply, |r: &RuleRow| rule_line(r))?;
        }
        AlertsCommand::Subscribe(a) => {
            let mut body = match (&a.webhook, &a.email, &a.sms) {
                (Some(url), _, _) => json!({"channel": "webhook", "url": url}),
                (_, Some(address), _) => json!({"channel": "email", "address": address}),
                (_, _, Some(number)) => json!({"channel": "sms", "number": number}),
                _ => bail!("say where: --webhook URL, --email ADDRESS or --sms +NUMBER"),
            };
            body["alerts"] =
                json!({"rule": a.rule, "function": a.function, "system_events": a.system_events});
            body["min_severity"] = json!(a.min_severity);
            let reply = c.post_json("/api/notifications/subscribe", &body)?.ok()?;
            out.print(reply, |v: &Value| {
                let mut text =
                    format!("subscribed {}", v["subscription_id"].as_str().unwrap_or(""));
                if let Some(secret) = v["secret"].as_str() {
                    text.push_str(&format!("\nwebhook signing secret (shown once): {secret}"));
                }
                text
            })?;
        }
        AlertsCommand::Subscriptions => {
            let body = c.get("/api/notifications/subscriptions")?.ok()?;
            out.print(body, |v: &Value| {
                let subs = v["subscriptions"].as_array().cloned().unwrap_or_default();
                if subs.is_empty() {
                    return "no subscriptions".to_string();
                }
                subs.iter()
                    .map(|s| {
                        let target = s["url"]
                            .as_str()
                            .or(s["address"].as_str())
                            .or(s["number"].as_str())
                            .unwrap_or("");
                        format!(
                            "{}  {:<7} {}",
                            s["id"].as_str().unwrap_or(""),
                            s["channel"].as_str().unwrap_or(""),
                            target
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        AlertsCommand::Unsubscribe { id } => {
            let reply = c
                .post_json(
                    "/api/notifications/unsubscribe",
                    &json!({"subscription_id": id}),
                )?
                .ok()?;
            out.print(reply, |_: &Value| format!("unsubscribed {id}"))?;
        }
        AlertsCommand::History => {
            let body = c.get("/api/notifications/history")?.ok()?;
            out.print(body, |v: &Value| {
                let rows = v["notifications"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    return "no notifications yet".to_string();
                }
                rows.iter()
                    .map(|d| {
                        format!(
                            "{:<7} {:<7} {} tries  {}  {}",
                            d["status"].as_str().unwrap_or(""),
                            d["channel"].as_str().unwrap_or(""),
                            d["attempts"],
                            d["target"].as_str().unwrap_or(""),
                            d["summary"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
    }
    Ok(true)
}
