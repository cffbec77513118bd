//! Secrets' routes (set, list by name, delete: a value never comes back) and the admin's
//! routes of encryption at rest (the keys' status, master-key rotation, re-encryption).

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{Method, StatusCode};

use super::body::json_or_empty;
use super::functions::token;
use super::openapi::{op, schema};
use super::router::{json as reply, Ctx, Reply, Route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretValue {
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reencrypt {
    #[serde(default)]
    tenant: Option<String>,
}

async fn list(c: Ctx) -> Reply {
    let secrets = c.state.platform.secrets(c.caller()).await?;
    Ok(reply(StatusCode::OK, &json!({"secrets": secrets})))
}

async fn set(c: Ctx) -> Reply {
    let body: SecretValue = json_or_empty(&c.body, "the secret (as {\"value\": \"...\"})")?;
    let name = c.param(0).to_string();
    c.state
        .platform
        .set_secret(c.caller(), &name, body.value)
        .await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"name": name, "status": "set"}),
    ))
}

async fn delete(c: Ctx) -> Reply {
    let name = c.param(0).to_string();
    c.state.platform.delete_secret(c.caller(), &name).await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"name": name, "status": "deleted"}),
    ))
}

async fn keys(c: Ctx) -> Reply {
    let status = c.state.platform.key_status(c.caller()).await?;
    Ok(reply(StatusCode::OK, &status))
}

async fn rotate(c: Ctx) -> Reply {
    let status = c.state.platform.rotate_master_key(c.caller()).await?;
    Ok(reply(StatusCode::OK, &status))
}

async fn reencrypt(c: Ctx) -> Reply {
    let body: Reencrypt = json_or_empty(&c.body, "the re-encryption")?;
    let done = c.state.platform.reencrypt(c.caller(), body.tenant).await?;
    Ok(reply(StatusCode::OK, &done))
}

fn name_param() -> Value {
    json!({"name": "name", "in": "path", "required": true, "description": "the secret's name (an environment variable's)", "schema": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"}})
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        token(
            Method::GET,
            "/api/secrets",
            false,
            |c| Box::pin(list(c)),
            || {
                op(
                    "The caller's secrets: names and times, never values",
                    ("200", schema("SecretList")),
                    &[],
                    json!({}),
                )
            },
        ),
        token(
            Method::PUT,
            "/api/secrets/{name}",
            true,
            |c| Box::pin(set(c)),
            || {
                let body = json!({"parameters": [name_param()], "requestBody": {"required": true, "content": {"application/json": {"schema": schema("SecretValue")}}}});
                op("Set a secret (stored encrypted; functions naming it in `secrets` see it in their environment)", ("200", schema("SecretSet")), &["400"], body)
            },
        ),
        token(
            Method::DELETE,
            "/api/secrets/{name}",
            false,
            |c| Box::pin(delete(c)),
            || {
                op(
                    "Delete a secret",
                    ("200", schema("SecretSet")),
                    &["404"],
                    json!({"parameters": [name_param()]}),
                )
            },
        ),
        token(
            Method::GET,
            "/api/system/keys",
            false,
            |c| Box::pin(keys(c)),
            || {
                op("Encryption at rest (admin): the master key's id and the tenants' data keys (ids only)", ("200", schema("KeyStatus")), &["403"], json!({}))
            },
        ),
        token(
            Method::POST,
            "/api/system/keys/rotate",
            false,
            |c| Box::pin(rotate(c)),
            || {
                op("Rotate the master key (admin): a new key file, every data key rewrapped, no record rewritten", ("200", schema("KeyStatus")), &["403", "409"], json!({}))
            },
        ),
        token(
            Method::POST,
            "/api/system/keys/reencrypt",
            true,
            |c| Box::pin(reencrypt(c)),
            || {
                let body = json!({"requestBody": {"required": false, "content": {"application/json": {"schema": schema("ReencryptSpec")}}}});
                op("Re-encrypt (admin): a new data key for one tenant (or each), every record of theirs sealed with it", ("200", schema("Reencrypted")), &["403"], body)
            },
        ),
    ]
}

/// The schemas of these routes.
pub fn schemas() -> Value {
    json!({
        "SecretList": {"type": "object", "required": ["secrets"], "properties": {"secrets": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "created_at": {"type": "integer"}, "updated_at": {"type": "integer"}}}}}},
        "SecretValue": {"type": "object", "required": ["value"], "additionalProperties": false, "properties": {"value": {"type": "string", "maxLength": 65536}}},
        "SecretSet": {"type": "object", "required": ["name", "status"], "properties": {"name": {"type": "string"}, "status": {"type": "string"}}},
        "KeyStatus": {"type": "object", "required": ["master_key", "sealing", "data_keys"], "properties": {
            "master_key": {"type": "string"}, "sealing": {"type": "boolean"},
            "data_keys": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "tenant": {"type": "string"}, "master": {"type": "string"}, "retired": {"type": "boolean"}, "created_at": {"type": "integer"}}}}}},
        "ReencryptSpec": {"type": "object", "additionalProperties": false, "properties": {"tenant": {"type": "string"}}},
        "Reencrypted": {"type": "object", "required": ["keys", "records"], "properties": {"keys": {"type": "array", "items": {"type": "integer"}}, "records": {"type": "integer"}, "retired_keys_removed": {"type": "integer"}}}
    })
}
