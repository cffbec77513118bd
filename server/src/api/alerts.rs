//! Alerting's routes: seed 000's notification subscriptions (`/api/notifications/...`) and
//! the alert rules (`/api/alerts/rules`).

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{Method, StatusCode};

use super::body::json_or_empty;
use super::functions::token;
use super::openapi::{json_body, op, schema};
use super::router::{json as reply, Ctx, Reply, Route};
use crate::alerts::{RuleSpec, SubscriptionSpec};
use crate::platform::Unsubscribe;

async fn subscribe(c: Ctx) -> Reply {
    let spec: SubscriptionSpec = json_or_empty(&c.body, "the subscription")?;
    let body = c.state.platform.subscribe(c.caller(), spec).await?;
    Ok(reply(StatusCode::CREATED, &body))
}

async fn unsubscribe(c: Ctx) -> Reply {
    let what: Unsubscribe = json_or_empty(&c.body, "what to unsubscribe")?;
    let body = c.state.platform.unsubscribe(c.caller(), what).await?;
    Ok(reply(StatusCode::OK, &body))
}

async fn subscriptions(c: Ctx) -> Reply {
    let subs = c.state.platform.subscriptions(c.caller()).await?;
    Ok(reply(StatusCode::OK, &json!({"subscriptions": subs})))
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn history(c: Ctx) -> Reply {
    let limit = c.query::<Limit>()?.limit.unwrap_or(100).min(1000);
    let body = c
        .state
        .platform
        .notification_history(c.caller(), limit)
        .await?;
    Ok(reply(StatusCode::OK, &body))
}

async fn list_rules(c: Ctx) -> Reply {
    let rules = c.state.platform.rules(c.caller()).await?;
    Ok(reply(StatusCode::OK, &json!({"rules": rules})))
}

async fn create_rule(c: Ctx) -> Reply {
    let spec: RuleSpec = json_or_empty(&c.body, "the rule")?;
    let rule = c.state.platform.create_rule(c.caller(), spec).await?;
    Ok(reply(StatusCode::CREATED, &rule))
}

async fn get_rule(c: Ctx) -> Reply {
    let rule = c.state.platform.rule(c.caller(), c.param(0)).await?;
    Ok(reply(StatusCode::OK, &rule))
}

async fn update_rule(c: Ctx) -> Reply {
    let spec: RuleSpec = json_or_empty(&c.body, "the rule")?;
    let rule = c
        .state
        .platform
        .update_rule(c.caller(), c.param(0), spec)
        .await?;
    Ok(reply(StatusCode::OK, &rule))
}

async fn delete_rule(c: Ctx) -> Reply {
    c.state.platform.delete_rule(c.caller(), c.param(0)).await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"status": "deleted", "rule_id": c.param(0)}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Silence {
    for_s: u64,
}

async fn silence(c: Ctx) -> Reply {
    let s: Silence = json_or_empty(&c.body, "the silence")?;
    let rule = c
        .state
        .platform
        .silence_rule(c.caller(), c.param(0), s.for_s)
        .await?;
    Ok(reply(StatusCode::OK, &rule))
}

fn rule_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        token(
            Method::POST,
            "/api/notifications/subscribe",
            true,
            |c| Box::pin(subscribe(c)),
            || {
                let body = json!({"requestBody": {"required": true, "content": {"application/json": {"schema": schema("SubscriptionSpec")}}}});
                let what = "Subscribe a channel (webhook, email, SMS) to alerts: a rule's, a function's, system events, from a severity up. A webhook's signing secret is in this answer only";
                op(what, ("201", schema("Subscribed")), &["400", "404"], body)
            },
        ),
        token(
            Method::POST,
            "/api/notifications/unsubscribe",
            true,
            |c| Box::pin(unsubscribe(c)),
            || {
                let body = json!({"requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "subscription_id": {"type": "string"}, "channel": {"type": "string", "enum": ["webhook", "email", "sms"]},
                    "url": {"type": "string"}, "address": {"type": "string"}, "number": {"type": "string"}}}}}}});
                let what = "Unsubscribe, by subscription id or by channel and target";
                op(
                    what,
                    ("200", json!({"type": "object"})),
                    &["400", "404"],
                    body,
                )
            },
        ),
        token(
            Method::GET,
            "/api/notifications/subscriptions",
            false,
            |c| Box::pin(subscriptions(c)),
            || {
                let ok = json!({"type": "object", "properties": {"subscriptions": {"type": "array", "items": schema("Subscription")}}});
                op("The caller's subscriptions", ("200", ok), &[], json!({}))
            },
        ),
        token(
            Method::GET,
            "/api/notifications/history",
            false,
            |c| Box::pin(history(c)),
            || {
                let limit = json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 1000}});
                let ok = json!({"type": "object", "properties": {"notifications": {"type": "array", "items": schema("Delivery")}}});
                let what = "Every notification sent, being retried or given up, newest first";
                op(what, ("200", ok), &["400"], json!({"parameters": [limit]}))
            },
        ),
        token(
            Method::GET,
            "/api/alerts/rules",
            false,
            |c| Box::pin(list_rules(c)),
            || {
                let ok = json!({"type": "object", "properties": {"rules": {"type": "array", "items": schema("AlertRule")}}});
                op(
                    "Alert rules, each with its state (ok, pending, firing)",
                    ("200", ok),
                    &[],
                    json!({}),
                )
            },
        ),
        token(
            Method::POST,
            "/api/alerts/rules",
            true,
            |c| Box::pin(create_rule(c)),
            || {
                let body = json!({"requestBody": {"required": true, "content": {"application/json": {"schema": schema("AlertRuleSpec")}}}});
                op(
                    "Add an alert rule",
                    ("201", schema("AlertRule")),
                    &["400", "404"],
                    body,
                )
            },
        ),
        token(
            Method::GET,
            "/api/alerts/rules/{id}",
            false,
            |c| Box::pin(get_rule(c)),
            || {
                let params = json!({"parameters": [rule_param()]});
                op(
                    "An alert rule and its state",
                    ("200", schema("AlertRule")),
                    &["404"],
                    params,
                )
            },
        ),
        token(
            Method::PUT,
            "/api/alerts/rules/{id}",
            true,
            |c| Box::pin(update_rule(c)),
            || {
                let extra = json!({"parameters": [rule_param()], "requestBody": {"required": true, "content": {"application/json": {"schema": schema("AlertRuleSpec")}}}});
                op(
                    "Replace an alert rule's definition",
                    ("200", schema("AlertRule")),
                    &["400", "404"],
                    extra,
                )
            },
        ),
        token(
            Method::DELETE,
            "/api/alerts/rules/{id}",
            false,
            |c| Box::pin(delete_rule(c)),
            || {
                let params = json!({"parameters": [rule_param()]});
                op(
                    "Delete an alert rule",
                    ("200", json!({"type": "object"})),
                    &["404"],
                    params,
                )
            },
        ),
        token(
            Method::POST,
            "/api/alerts/rules/{id}/silence",
            true,
            |c| Box::pin(silence(c)),
            || {
                let body = json_body(
                    json!({"type": "object", "required": ["for_s"], "properties": {"for_s": {"type": "integer", "minimum": 0, "maximum": 2592000}}}),
                );
                let extra = json!({"parameters": [rule_param()], "requestBody": body});
                let what = "Silence a rule's notifications for a while (0 lifts it); it is still evaluated";
                op(what, ("200", schema("AlertRule")), &["400", "404"], extra)
            },
        ),
    ]
}
