//! Chains' routes: deploy, list, show, delete, and run a chain sync (`/invoke`) or async
//! (`/run`, 202 with a run id that also answers at the task status routes), and its runs.

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{HeaderValue, Method, StatusCode};

use super::body::{json_or_empty, payload};
use super::functions::token;
use super::openapi::{idempotency_param, op, schema};
use super::router::{json as reply, Ctx, Reply, Route};
use crate::chains::ChainRun;
use crate::platform::ChainSpec;

/// A run as the API shows it: with its id also as `task_id` (the task routes answer it too).
pub fn run_body(run: &ChainRun) -> Value {
    let mut body = serde_json::to_value(run).unwrap_or(Value::Null);
    body["task_id"] = json!(run.run_id);
    if let Some(ms) = run.duration_ms() {
        body["duration_ms"] = json!(ms);
    }
    body
}

async fn deploy(c: Ctx) -> Reply {
    let spec: ChainSpec = json_or_empty(&c.body, "the chain")?;
    let chain = c.state.platform.deploy_chain(c.caller(), spec).await?;
    Ok(reply(StatusCode::CREATED, &chain))
}

async fn list(c: Ctx) -> Reply {
    let chains = c.state.platform.chains(c.caller()).await?;
    Ok(reply(StatusCode::OK, &json!({"chains": chains})))
}

async fn show(c: Ctx) -> Reply {
    let chain = c.state.platform.chain(c.caller(), c.param(0)).await?;
    Ok(reply(StatusCode::OK, &chain))
}

async fn delete(c: Ctx) -> Reply {
    let chain = c
        .state
        .platform
        .delete_chain(c.caller(), c.param(0))
        .await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"id": chain.id, "name": chain.name, "status": "deleted"}),
    ))
}

async fn invoke(c: Ctx) -> Reply {
    let input = payload(&c.body)?;
    let run = c
        .state
        .platform
        .invoke_chain(c.caller(), c.param(0), input)
        .await?;
    Ok(reply(StatusCode::OK, &run_body(&run)))
}

async fn run(c: Ctx) -> Reply {
    let input = payload(&c.body)?;
    let platform = &c.state.platform;
    // Sent again with the same key, a run request gets the run the first one started.
    let (run, replayed) = match super::idempotency_key(&c)? {
        Some(key) => {
            platform
                .run_chain_once(c.caller(), c.param(0), input, key)
                .await?
        }
        None => (
            platform.run_chain(c.caller(), c.param(0), input).await?,
            false,
        ),
    };
    let mut response = reply(
        StatusCode::ACCEPTED,
        &json!({"run_id": run.run_id, "task_id": run.run_id, "status": run.status, "chain": run.chain}),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/api/chains/runs/{}", run.run_id)) {
        response.headers_mut().insert("location", v);
    }
    super::replayed(&mut response, replayed);
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn runs(c: Ctx) -> Reply {
    let limit = c.query::<Limit>()?.limit.unwrap_or(20).min(200);
    let runs = c
        .state
        .platform
        .chain_runs(c.caller(), c.param(0), limit)
        .await?;
    let runs: Vec<Value> = runs.iter().map(run_body).collect();
    Ok(reply(StatusCode::OK, &json!({"runs": runs})))
}

async fn one_run(c: Ctx) -> Reply {
    let run = c.state.platform.chain_run(c.caller(), c.param(0)).await?;
    Ok(reply(StatusCode::OK, &run_body(&run)))
}

fn chain_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "chain id or name", "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

fn run_param() -> Value {
    json!({"name": "run_id", "in": "path", "required": true, "schema": {"type": "string", "minLength": 1, "maxLength": 80}})
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        token(
            Method::POST,
            "/api/chains",
            true,
            |c| Box::pin(deploy(c)),
            || {
                let body = json!({"requestBody": {"required": true, "content": {"application/json": {"schema": schema("ChainSpec")}}}});
                op("Deploy a chain (or redeploy one of the same name): steps over the tenant's functions, checked now", ("201", schema("Chain")), &["400"], body)
            },
        ),
        token(
            Method::GET,
            "/api/chains",
            false,
            |c| Box::pin(list(c)),
            || {
                op(
                    "The caller's chains",
                    ("200", schema("ChainList")),
                    &[],
                    json!({}),
                )
            },
        ),
        token(
            Method::GET,
            "/api/chains/{id}",
            false,
            |c| Box::pin(show(c)),
            || {
                op(
                    "A chain and its definition",
                    ("200", schema("Chain")),
                    &["404"],
                    json!({"parameters": [chain_param()]}),
                )
            },
        ),
        token(
            Method::DELETE,
            "/api/chains/{id}",
            false,
            |c| Box::pin(delete(c)),
            || {
                op(
                    "Delete a chain (its runs stay readable)",
                    ("200", schema("Changed")),
                    &["404"],
                    json!({"parameters": [chain_param()]}),
                )
            },
        ),
        token(
            Method::POST,
            "/api/chains/{id}/invoke",
            true,
            |c| Box::pin(invoke(c)),
            || {
                let extra = json!({"parameters": [chain_param()], "requestBody": {"required": false, "content": {"application/json": {"schema": {}}}}});
                op("Run a chain now on the body (any JSON) and answer with the ended run and every step", ("200", schema("ChainRun")), &["404", "409", "429"], extra)
            },
        ),
        token(
            Method::POST,
            "/api/chains/{id}/run",
            true,
            |c| Box::pin(run(c)),
            || {
                let extra = json!({"parameters": [chain_param(), idempotency_param()], "requestBody": {"required": false, "content": {"application/json": {"schema": {}}}}});
                op("Queue a durable run of a chain on the body; its id answers at /api/chains/runs/{run_id} and the task status routes", ("202", schema("ChainQueued")), &["404", "409", "422", "429"], extra)
            },
        ),
        token(
            Method::GET,
            "/api/chains/{id}/runs",
            false,
            |c| Box::pin(runs(c)),
            || {
                let params = json!({"parameters": [chain_param(), {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}}]});
                op(
                    "A chain's newest runs, with their steps",
                    ("200", schema("ChainRunList")),
                    &["404"],
                    params,
                )
            },
        ),
        token(
            Method::GET,
            "/api/chains/runs/{run_id}",
            false,
            |c| Box::pin(one_run(c)),
            || {
                op("A chain run: status, output or error, and every step (task id, status, usage, output)", ("200", schema("ChainRun")), &["404"], json!({"parameters": [run_param()]}))
            },
        ),
    ]
}

/// Chaining's schemas.
pub fn schemas() -> Value {
    let step = json!({"oneOf": [
        {"type": "string", "description": "a function: name or name@version"},
        {"type": "object", "description": "one of function, sequence, parallel, map (with items, concurrency), choice (with default) or chain; any with retry and catch", "properties": {
            "function": {"type": "string"},
            "sequence": {"type": "array", "items": schema("ChainStep")},
            "parallel": {"type": "array", "items": {"type": "array", "items": schema("ChainStep")}},
            "map": {"type": "string"}, "items": {"type": "string", "description": "a JSON pointer to the array"},
            "concurrency": {"type": "integer", "minimum": 1, "maximum": 64},
            "choice": {"type": "array", "items": {"type": "object", "required": ["pointer", "then"], "properties": {
                "pointer": {"type": "string"}, "equals": {}, "not_equals": {}, "greater_than": {"type": "number"}, "less_than": {"type": "number"}, "exists": {"type": "boolean"},
                "then": {"type": "array", "items": schema("ChainStep")}}}},
            "default": {"type": "array", "items": schema("ChainStep")},
            "chain": {"type": "string"},
            "retry": {"type": "object", "properties": {"attempts": {"type": "integer", "minimum": 1, "maximum": 10}, "backoff_ms": {"type": "integer", "minimum": 0, "maximum": 60000}, "factor": {"type": "number", "minimum": 1, "maximum": 10}, "on": {"type": "array", "items": {"type": "string"}}}},
            "catch": {"type": "array", "items": schema("ChainStep")}
        }}
    ]});
    let run = json!({"type": "object", "required": ["run_id", "task_id", "chain", "status", "steps"], "properties": {
        "run_id": {"type": "string"}, "task_id": {"type": "string"}, "chain_id": {"type": "string"}, "chain": {"type": "string"},
        "mode": {"type": "string", "enum": ["sync", "async"]},
        "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "timeout"]},
        "input": {}, "output": {}, "error": {"type": "object", "properties": {"kind": {"type": "string"}, "message": {"type": "string"}, "step": {"type": "string"}, "error": {"type": "object"}}},
        "deadline_at": {"type": "integer"}, "created_at": {"type": "integer"}, "started_at": {"type": "integer"}, "finished_at": {"type": "integer"}, "duration_ms": {"type": "integer"},
        "steps": {"type": "array", "items": {"type": "object", "required": ["path", "function", "status"], "properties": {
            "path": {"type": "string"}, "function": {"type": "string"}, "task_id": {"type": "string"}, "status": {"type": "string"},
            "output": {}, "error": {"type": "object"}, "usage": {"type": "object"}, "started_at": {"type": "integer"}, "finished_at": {"type": "integer"}}}}
    }});
    json!({
        "ChainStep": step,
        "ChainSpec": {"type": "object", "required": ["name", "steps"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
            "steps": {"type": "array", "minItems": 1, "items": schema("ChainStep")},
            "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 86400000},
            "description": {"type": "string"}
        }},
        "Chain": {"type": "object", "required": ["id", "name", "definition"], "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "definition": {"type": "object"}, "created_at": {"type": "integer"}, "updated_at": {"type": "integer"}}},
        "ChainList": {"type": "object", "required": ["chains"], "properties": {"chains": {"type": "array", "items": schema("Chain")}}},
        "ChainQueued": {"type": "object", "required": ["run_id", "task_id", "status"], "properties": {"run_id": {"type": "string"}, "task_id": {"type": "string"}, "status": {"type": "string"}, "chain": {"type": "string"}}},
        "ChainRun": run,
        "ChainRunList": {"type": "object", "required": ["runs"], "properties": {"runs": {"type": "array", "items": schema("ChainRun")}}}
    })
}
