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
use super::functions::{
    delete_route, deployed_json, get_route, list_route, metrics_route, redeploy, token,
};
use super::openapi::{id_param, json_body, op, schema};
use super::router::{json as reply, Ctx, Reply, Route};
use super::system::system_metrics_route;
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
                let what = "Create: JSON {name, language, timeout, code}, or the multipart upload \
                        API's python_file and function_name";
                let extra = json!({"requestBody": create_request()});
                op(
                    what,
                    ("201", schema("Deployed")),
                    &["409", "415", "422"],
                    extra,
                )
            },
        ),
        list_route().at("/functions"),
        get_route().at("/functions/{id}"),
        token(
            Method::PUT,
            "/functions/{id}",
            true,
            |c| Box::pin(update(c)),
            || {
                let extra = json!({"parameters": [id_param()], "requestBody": json_body(json!({"type": "object"}))});
                let what = "Update code (`code`) or settings as the next version";
                op(
                    what,
                    ("200", schema("Deployed")),
                    &["404", "409", "422"],
                    extra,
                )
            },
        ),
        delete_route().at("/functions/{id}"),
        token(
            Method::POST,
            "/execute/{id}",
            true,
            |c| Box::pin(execute(c)),
            || {
                let input = json!({"type": "object", "properties": {"input": {}, "parameters": {"type": "object", "properties": {"version": {"type": "integer", "minimum": 1}}}}});
                let extra = json!({"parameters": [id_param()], "requestBody": json_body(input)});
                let what = "Run now with {input, parameters}; {output} or {error}";
                op(
                    what,
                    ("200", schema("Outcome")),
                    &["404", "409", "429"],
                    extra,
                )
            },
        ),
        metrics_route().at("/metrics/functions/{id}"),
        system_metrics_route().at("/metrics/system"),
    ]
}
