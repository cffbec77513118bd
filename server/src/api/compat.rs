//! Seed 002's and seed 004's routes, exactly as they write them, as thin adapters over the
//! same platform calls as the canonical API.
//!
//! - seed 002: `POST /functions` (JSON `{name, language, timeout, code}`), `GET/PUT/DELETE
//!   /functions/{id}`, `POST /execute/{id}` (`{input, parameters}` -> `{output}` or `{error}`),
//!   `GET /metrics/functions/{id}`, `GET /metrics/system`.
//! - seed 004: `POST /functions` (multipart `python_file`, `function_name`), `POST
//!   /functions/{id}/execute` (`{"payload": "<string>"}`), `GET /functions`, `DELETE /functions/{id}`.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::error::{reject, ApiError};
use super::functions::{
    delete, deployed_json, get, list, metrics, read_form, redeploy, reply, RangeQuery,
};
use super::{caller, with_state, AppState};
use crate::auth::Caller;
use crate::model::{Task, TaskStatus};
use crate::platform::{Code, Settings};

type Response = warp::reply::Response;

/// Seed 002's create/update body.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Seed002Function {
    name: Option<String>,
    #[serde(alias = "runtime")]
    language: Option<String>,
    /// Seconds.
    timeout: Option<f64>,
    timeout_ms: Option<u64>,
    #[serde(alias = "memory_limit_mb", alias = "memory_mb")]
    memory: Option<u64>,
    cpu: Option<u32>,
    handler: Option<String>,
    env: Option<BTreeMap<String, String>>,
    /// `container` or `gvisor`.
    isolation: Option<String>,
    keep_warm: Option<u64>,
    min_instances: Option<u32>,
    max_instances: Option<u32>,
    /// The source of the function's module.
    code: Option<String>,
}

impl Seed002Function {
    fn into_deploy(self) -> Result<(Settings, Code), ApiError> {
        let code = match &self.code {
            Some(source) => {
                let language = self.language.as_deref().unwrap_or("python");
                let runtime = language
                    .parse::<cloudfunc_sandbox::Runtime>()
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                let file = match runtime {
                    cloudfunc_sandbox::Runtime::Python => "function.py",
                    cloudfunc_sandbox::Runtime::Node => "index.js",
                };
                Code::Files(vec![(file.to_string(), source.clone().into_bytes())])
            }
            None => Code::Unchanged,
        };
        let settings = Settings {
            name: self.name,
            runtime: self.language,
            handler: self.handler,
            timeout: self.timeout,
            timeout_ms: self.timeout_ms,
            memory: self.memory,
            cpu: self.cpu,
            env: self.env,
            max_retries: None,
            isolation: self.isolation,
            keep_warm: self.keep_warm,
            min_instances: self.min_instances,
            max_instances: self.max_instances,
        };
        Ok((settings, code))
    }
}

async fn create(
    caller: Caller,
    content_type: Option<String>,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let ct = content_type.clone().unwrap_or_default();
    let (settings, code) = if ct.starts_with("multipart/form-data") {
        seed004_form(&ct, body, state.max_body_bytes)
            .await
            .map_err(warp::reject::custom)?
    } else {
        let f: Seed002Function = serde_json::from_slice(&body)
            .map_err(|e| warp::reject::custom(ApiError::bad_request(format!("send JSON {{name, language, timeout, code}} or a multipart form with python_file: {e}"))))?;
        if f.code.is_none() {
            return Err(warp::reject::custom(ApiError::bad_request(
                "code is required",
            )));
        }
        f.into_deploy().map_err(warp::reject::custom)?
    };
    let (function, version) = state
        .platform
        .deploy(&caller, settings, code)
        .await
        .map_err(reject)?;
    Ok(reply(
        StatusCode::CREATED,
        deployed_json("deployed", &function, &version),
    ))
}

/// Seed 004's form: `python_file` and `function_name` (the function inside the file).
async fn seed004_form(ct: &str, body: Bytes, limit: u64) -> Result<(Settings, Code), ApiError> {
    let (mut fields, files) = read_form(ct, body, limit).await?;
    let (_, filename, data) = files
        .into_iter()
        .find(|(field, _, _)| field == "python_file" || field == "file")
        .ok_or_else(|| ApiError::bad_request("the form needs a python_file field with the code"))?;
    let filename = filename.unwrap_or_else(|| "handler.py".into());
    let base = std::path::Path::new(&filename)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler.py".into());
    let module = base
        .strip_suffix(".py")
        .ok_or_else(|| ApiError::bad_request("python_file must be a .py file"))?
        .to_string();
    let function = fields
        .remove("function_name")
        .unwrap_or_else(|| "handle".into());
    let name = fields.remove("name").unwrap_or_else(|| {
        module
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
    });
    let mut settings = super::functions::settings_from_fields(&fields)?;
    settings.name = Some(name);
    settings.runtime = Some("python".into());
    settings.handler = Some(format!("{module}.{function}"));
    Ok((settings, Code::Files(vec![(base, data.to_vec())])))
}

async fn update(
    key: String,
    caller: Caller,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let (function, _) = state.platform.get(&caller, &key).await.map_err(reject)?;
    let f: Seed002Function = serde_json::from_slice(&body).map_err(|e| {
        warp::reject::custom(ApiError::bad_request(format!(
            "send JSON with the fields to change: {e}"
        )))
    })?;
    let (settings, code) = f.into_deploy().map_err(warp::reject::custom)?;
    redeploy(&state, &function, settings, code).await
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

fn outcome_json(task: &Task) -> Value {
    if task.status == TaskStatus::Succeeded {
        json!({"output": task.result, "task_id": task.task_id, "status": task.status, "usage": task.usage, "logs": task.logs})
    } else {
        json!({"error": task.error, "task_id": task.task_id, "status": task.status, "usage": task.usage, "logs": task.logs})
    }
}

/// Seed 002: `POST /execute/{id}` with `{input, parameters}`; `{output}` or `{error}`.
async fn execute(
    key: String,
    caller: Caller,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    let b: ExecuteBody = serde_json::from_slice(text).map_err(|e| {
        warp::reject::custom(ApiError::bad_request(format!(
            "send JSON {{\"input\": ..., \"parameters\": {{\"version\": n}}}}: {e}"
        )))
    })?;
    let input = if b.input.is_null() {
        json!({})
    } else {
        b.input
    };
    let version = b.parameters.and_then(|p| p.version);
    let task = state
        .platform
        .invoke(&caller, &key, version, input)
        .await
        .map_err(reject)?;
    Ok(reply(StatusCode::OK, outcome_json(&task)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadBody {
    payload: String,
}

/// Seed 004: `POST /functions/{id}/execute` with `{"payload": "<string>"}`; the handler gets
/// the string itself.
async fn execute_payload(
    key: String,
    caller: Caller,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let b: PayloadBody = serde_json::from_slice(&body).map_err(|e| {
        warp::reject::custom(ApiError::bad_request(format!(
            "send JSON {{\"payload\": \"<string>\"}}: {e}"
        )))
    })?;
    let task = state
        .platform
        .invoke(&caller, &key, None, Value::String(b.payload))
        .await
        .map_err(reject)?;
    let mut out = outcome_json(&task);
    out["result"] = task.result.clone().unwrap_or(Value::Null);
    Ok(reply(StatusCode::OK, out))
}

pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let limit = state.max_body_bytes;
    let auth = caller(state.keys.clone());
    let s = move || with_state(state.clone());
    let functions = warp::path("functions");
    let create = functions
        .and(warp::path::end())
        .and(warp::post())
        .and(auth.clone())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(create);
    let list = functions
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(list);
    let get = functions
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(get);
    let update = functions
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::put())
        .and(auth.clone())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(update);
    let delete = functions
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::delete())
        .and(auth.clone())
        .and(s())
        .and_then(delete);
    let execute_payload = functions
        .and(super::segment())
        .and(warp::path("execute"))
        .and(warp::path::end())
        .and(warp::post())
        .and(auth.clone())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(execute_payload);
    let execute = warp::path("execute")
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::post())
        .and(auth.clone())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(execute);
    let fn_metrics = warp::path("metrics")
        .and(warp::path("functions"))
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::get())
        .map(Some)
        .and(warp::query::<RangeQuery>())
        .and(auth.clone())
        .and(s())
        .and_then(metrics);
    let sys_metrics = warp::path!("metrics" / "system")
        .and(warp::get())
        .map(|| None)
        .and(warp::query::<RangeQuery>())
        .and(auth.clone())
        .and(s())
        .and_then(metrics);
    create
        .or(list)
        .unify()
        .or(execute_payload)
        .unify()
        .or(get)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .or(execute)
        .unify()
        .or(fn_metrics)
        .unify()
        .or(sys_metrics)
        .unify()
        .boxed()
}
