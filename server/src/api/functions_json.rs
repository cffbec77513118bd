//! The `/functions` JSON API (seed 002's shape): `POST /functions` (`{name, language,
//! timeout, code}`), `GET/PUT/DELETE /functions/{id}`, `POST /execute/{id}` (`{input,
//! parameters}` → `{output}` or `{error}`), `GET /metrics/functions/{id}`, `GET
//! /metrics/system`. Each is a thin adapter over the same platform calls as `/api`; `GET
//! /functions` and `DELETE /functions/{id}` serve the multipart upload API too.

use bytes::Bytes;
use cloudfunc_sandbox::Runtime;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use warp::http::{Method, StatusCode};

use super::body::json_or_empty;
use super::functions::{delete, deployed_json, get, list, metrics, redeploy, token};
use super::openapi::{id_and_range, id_param, json_body, op, range_params, schema};
use super::router::{json as reply, Ctx, Reply, Route};
use super::ApiError;
use crate::model::{Task, TaskStatus};
use crate::platform::{Code, Settings};

/// A create or update body: the settings table's fields, and `code`, the source of the
/// function's module.
fn settings_and_code(body: &Bytes, what: &str) -> Result<(Settings, Option<String>), ApiError> {
    let mut fields: Map<String, Value> = json_or_empty(body, what)?;
    let code = match fields.remove("code") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::bad_request("code must be a string")),
    };
    let settings: Settings = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    Ok((settings, code))
}

/// The code as the module its runtime looks for first.
fn module(settings: &Settings, source: String) -> Code {
    let file = match settings.runtime.unwrap_or(Runtime::Python) {
        Runtime::Python => "function.py",
        Runtime::Node => "index.js",
    };
    Code::Files(vec![(file.to_string(), source.into_bytes())])
}

async fn create(c: Ctx) -> Reply {
    if c.content_type()
        .is_some_and(|ct| ct.starts_with("multipart/form-data"))
    {
        return super::upload::create(c).await;
    }
    let (mut settings, code) = settings_and_code(
        &c.body,
        "send JSON {name, language, timeout, code} or a multipart form with python_file",
    )?;
    let code = code.ok_or_else(|| ApiError::bad_request("code is required"))?;
    let code = module(&settings, code);
    if settings.runtime.is_none() {
        settings.runtime = Some(Runtime::Python);
    }
    let (function, version) = c.state.platform.deploy(c.caller(), settings, code).await?;
    Ok(reply(
        StatusCode::CREATED,
        &deployed_json("deployed", &function, &version),
    ))
}

async fn update(c: Ctx) -> Reply {
    let (function, versions) = c.state.platform.get(c.caller(), c.param(0)).await?;
    let (settings, code) = settings_and_code(&c.body, "send JSON with the fields to change")?;
    let code = match code {
        Some(source) => {
            // Without a runtime in the body, the code is for the one the function has.
            let current = versions
                .iter()
                .find(|v| v.version == function.version)
                .map(|v| v.runtime);
            let mut for_runtime = settings.clone();
            for_runtime.runtime = settings.runtime.or(current);
            module(&for_runtime, source)
        }
        None => Code::Unchanged,
    };
    redeploy(&c, &function, settings, code).await
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExecuteBody {
    #[serde(default)]
    input: Value,
    #[serde(default)]
    parameters: Option<ExecuteParameters>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExecuteParameters {
    version: Option<u32>,
}

/// `{output}` or `{error}`, with the task's id, status, usage and logs.
pub(super) fn outcome_json(task: &Task) -> Value {
    if task.status == TaskStatus::Succeeded {
        json!({"output": task.result, "task_id": task.task_id, "status": task.status, "usage": task.usage, "logs": task.logs})
    } else {
        json!({"error": task.error, "task_id": task.task_id, "status": task.status, "usage": task.usage, "logs": task.logs})
    }
}

/// `POST /execute/{id}` with `{input, parameters}`; `{output}` or `{error}`.
async fn execute(c: Ctx) -> Reply {
    let b: ExecuteBody = json_or_empty(
        &c.body,
        "send JSON {\"input\": ..., \"parameters\": {\"version\": n}}",
    )?;
    let input = if b.input.is_null() {
        json!({})
    } else {
        b.input
    };
    let version = b.parameters.and_then(|p| p.version);
    let task = c
        .state
        .platform
        .invoke(c.caller(), c.param(0), version, input)
        .await?;
    Ok(reply(StatusCode::OK, &outcome_json(&task)))
}

fn create_request() -> Value {
    json!({"required": true, "content": {
        "application/json": {"schema": {"type": "object", "required": ["name", "code"], "properties": {
            "name": {"type": "string"}, "language": {"type": "string", "enum": ["python", "node"]}, "timeout": {"type": "number"},
            "code": {"type": "string"}, "isolation": {"type": "string", "enum": ["container", "gvisor"]}
        }}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["python_file"], "properties": {"python_file": {"type": "string", "format": "binary"}, "function_name": {"type": "string"}}}}
    }})
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        token(
            Method::POST,
            "/functions",
            true,
            |c| Box::pin(create(c)),
            || {
                op("Create: JSON {name, language, timeout, code}, or the multipart upload API's python_file and function_name", ("201", schema("Deployed")), &["404", "409", "415", "422"], json!({"requestBody": create_request()}))
            },
        ),
        token(
            Method::GET,
            "/functions",
            false,
            |c| Box::pin(list(c)),
            || {
                op(
                    "List functions",
                    ("200", schema("FunctionList")),
                    &[],
                    json!({}),
                )
            },
        ),
        token(
            Method::GET,
            "/functions/{id}",
            false,
            |c| Box::pin(get(c)),
            || {
                op(
                    "A function with its versions",
                    ("200", schema("Function")),
                    &["404"],
                    json!({"parameters": [id_param()]}),
                )
            },
        ),
        token(
            Method::PUT,
            "/functions/{id}",
            true,
            |c| Box::pin(update(c)),
            || {
                op(
                    "Update code (`code`) or settings as the next version",
                    ("200", schema("Deployed")),
                    &["404", "409", "422"],
                    json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object"}))}),
                )
            },
        ),
        token(
            Method::DELETE,
            "/functions/{id}",
            false,
            |c| Box::pin(delete(c)),
            || {
                op(
                    "Delete a function",
                    ("200", schema("Changed")),
                    &["404"],
                    json!({"parameters": [id_param()]}),
                )
            },
        ),
        token(
            Method::POST,
            "/execute/{id}",
            true,
            |c| Box::pin(execute(c)),
            || {
                op(
                    "Run now with {input, parameters}; {output} or {error}",
                    ("200", schema("Outcome")),
                    &["404", "409", "429"],
                    json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object", "properties": {"input": {}, "parameters": {"type": "object", "properties": {"version": {"type": "integer", "minimum": 1}}}}}))}),
                )
            },
        ),
        token(
            Method::GET,
            "/metrics/functions/{id}",
            false,
            |c| Box::pin(async move { metrics(&c, Some(c.param(0))).await }),
            || {
                op(
                    "A function's metrics over a range",
                    ("200", schema("Metrics")),
                    &["400", "404"],
                    json!({"parameters": id_and_range()}),
                )
            },
        ),
        token(
            Method::GET,
            "/metrics/system",
            false,
            |c| Box::pin(async move { metrics(&c, None).await }),
            || {
                op(
                    "Metrics of everything the caller sees, over a range",
                    ("200", schema("Metrics")),
                    &["400"],
                    json!({"parameters": range_params()}),
                )
            },
        ),
    ]
}
