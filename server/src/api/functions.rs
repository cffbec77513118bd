//! Canonical routes under `/api` (seed 000), plus versions, sync invoke and task lookup.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::error::{reject, ApiError};
use super::{caller, with_state, AppState};
use crate::auth::Caller;
use crate::model::{Function, Version};
use crate::platform::{Code, Settings};

type Response = warp::reply::Response;

/// A function as clients see it.
pub fn function_json(f: &Function, versions: Option<&[Version]>) -> Value {
    let mut v = json!({
        "id": f.id,
        "name": f.name,
        "version": f.version,
        "status": if f.active { "active" } else { "inactive" },
        "active": f.active,
        "created_at": f.created_at,
        "updated_at": f.updated_at,
    });
    if let Some(versions) = versions {
        if let Some(latest) = versions.iter().find(|x| x.version == f.version) {
            v["settings"] = serde_json::to_value(latest).unwrap_or(Value::Null);
        }
        v["versions"] = serde_json::to_value(versions).unwrap_or(Value::Null);
    }
    v
}

/// What a deploy or an update answers.
pub fn deployed_json(status: &str, f: &Function, v: &Version) -> Value {
    json!({
        "status": status,
        "id": f.id,
        "function_id": f.id,
        "name": f.name,
        "version": v.version,
        "runtime": v.runtime,
        "isolation": v.isolation,
    })
}

/// `body` as JSON with `status`.
pub(super) fn reply(status: StatusCode, body: impl serde::Serialize) -> Response {
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// The body of a deploy, whatever its content type.
pub struct DeployBody {
    pub settings: Settings,
    pub code: Code,
}

fn parse_env(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    serde_json::from_str(text).map_err(|_| {
        ApiError::bad_request("env must be a JSON object of strings, like {\"KEY\": \"value\"}")
    })
}

/// Settings from form fields or query parameters (all strings).
pub fn settings_from_fields(fields: &HashMap<String, String>) -> Result<Settings, ApiError> {
    let num = |key: &str| -> Result<Option<f64>, ApiError> {
        fields
            .get(key)
            .map(|v| {
                v.trim().parse::<f64>().map_err(|_| {
                    ApiError::bad_request(format!("{key} must be a number, got {v:?}"))
                })
            })
            .transpose()
    };
    let int = |key: &str| -> Result<Option<u64>, ApiError> {
        fields
            .get(key)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("{key} must be a whole number, got {v:?}"))
                })
            })
            .transpose()
    };
    let known = [
        "name",
        "runtime",
        "language",
        "handler",
        "function_name",
        "timeout",
        "timeout_ms",
        "memory",
        "memory_mb",
        "cpu",
        "env",
        "max_retries",
        "isolation",
        "keep_warm",
        "min_instances",
        "max_instances",
    ];
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown setting {unknown:?}; known: {}",
            known.join(", ")
        )));
    }
    Ok(Settings {
        name: fields.get("name").cloned(),
        runtime: fields
            .get("runtime")
            .or_else(|| fields.get("language"))
            .cloned(),
        handler: fields.get("handler").cloned(),
        timeout: num("timeout")?,
        timeout_ms: int("timeout_ms")?,
        memory: int("memory")?.or(int("memory_mb")?),
        cpu: int("cpu")?.map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        env: fields.get("env").map(|e| parse_env(e)).transpose()?,
        max_retries: int("max_retries")?.map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
        isolation: fields.get("isolation").cloned(),
        keep_warm: int("keep_warm")?,
        min_instances: int("min_instances")?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        max_instances: int("max_instances")?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
    })
}

/// Reads a multipart form: text fields, and files by field name.
pub async fn read_form(
    content_type: &str,
    body: Bytes,
    limit: u64,
) -> Result<
    (
        HashMap<String, String>,
        Vec<(String, Option<String>, Bytes)>,
    ),
    ApiError,
> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("bad multipart content type: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut fields = HashMap::new();
    let mut files = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(String::from);
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?;
        if filename.is_some() {
            files.push((name, filename, data));
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::bad_request(format!("form field {name:?} is not UTF-8 text"))
            })?;
            fields.insert(name, text);
        }
    }
    Ok((fields, files))
}

fn looks_like_zip(data: &[u8]) -> bool {
    data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06")
}

/// The deploy body: a multipart form (a ZIP under any file field, or single code files, plus
/// settings fields) or a raw `application/zip` body with settings in the query string.
pub async fn deploy_body(
    content_type: Option<String>,
    query: HashMap<String, String>,
    body: Bytes,
    limit: u64,
) -> Result<DeployBody, ApiError> {
    let ct = content_type.unwrap_or_default();
    if ct.starts_with("multipart/form-data") {
        let (fields, files) = read_form(&ct, body, limit).await?;
        let mut settings = settings_from_fields(&fields)?;
        let zip = files.iter().find(|(_, filename, data)| {
            filename.as_deref().is_some_and(|f| f.ends_with(".zip")) || looks_like_zip(data)
        });
        let code = match zip {
            Some((_, _, data)) => Code::Zip(data.clone()),
            None if !files.is_empty() => Code::Files(
                files
                    .iter()
                    .map(|(field, filename, data)| {
                        let name = filename.clone().unwrap_or_else(|| field.clone());
                        let name = std::path::Path::new(&name)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or(name);
                        (name, data.to_vec())
                    })
                    .collect(),
            ),
            None => {
                return Err(ApiError::bad_request(
                    "the form has no file: send the ZIP (or a code file) as a file field",
                ))
            }
        };
        if settings.name.is_none() {
            settings.name = files
                .iter()
                .find_map(|(_, f, _)| f.as_deref().and_then(stem));
        }
        return Ok(DeployBody { settings, code });
    }
    if ct.starts_with("application/zip")
        || ct.starts_with("application/octet-stream")
        || ct.starts_with("application/x-zip")
    {
        if body.is_empty() {
            return Err(ApiError::bad_request(
                "the body is empty: send the ZIP archive",
            ));
        }
        return Ok(DeployBody {
            settings: settings_from_fields(&query)?,
            code: Code::Zip(body),
        });
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the ZIP as multipart/form-data (field 'file') or as an application/zip body",
    ))
}

fn stem(filename: &str) -> Option<String> {
    let base = std::path::Path::new(filename)
        .file_stem()?
        .to_string_lossy()
        .to_lowercase();
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    (!name.is_empty()).then_some(name)
}

pub async fn health(state: AppState) -> Result<Response, Rejection> {
    let body = state.platform.health().await.map_err(reject)?;
    Ok(reply(StatusCode::OK, body))
}

async fn deploy(
    caller: Caller,
    content_type: Option<String>,
    query: HashMap<String, String>,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let DeployBody { settings, code } =
        deploy_body(content_type, query, body, state.max_body_bytes)
            .await
            .map_err(warp::reject::custom)?;
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

pub(super) async fn list(caller: Caller, state: AppState) -> Result<Response, Rejection> {
    let functions = state.platform.list(&caller).await.map_err(reject)?;
    let list: Vec<Value> = functions.iter().map(|f| function_json(f, None)).collect();
    Ok(reply(
        StatusCode::OK,
        json!({"functions": list, "count": list.len()}),
    ))
}

pub(super) async fn get(
    key: String,
    caller: Caller,
    state: AppState,
) -> Result<Response, Rejection> {
    let (function, versions) = state.platform.get(&caller, &key).await.map_err(reject)?;
    Ok(reply(
        StatusCode::OK,
        function_json(&function, Some(&versions)),
    ))
}

async fn versions(key: String, caller: Caller, state: AppState) -> Result<Response, Rejection> {
    let (function, versions) = state.platform.get(&caller, &key).await.map_err(reject)?;
    Ok(reply(
        StatusCode::OK,
        json!({"id": function.id, "name": function.name, "versions": versions}),
    ))
}

/// PUT on a function: a ZIP body (new code) or JSON settings, as its next version.
async fn update(
    key: String,
    caller: Caller,
    content_type: Option<String>,
    query: HashMap<String, String>,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let (function, _) = state.platform.get(&caller, &key).await.map_err(reject)?;
    let ct = content_type.clone().unwrap_or_default();
    let (settings, code) =
        if ct.starts_with("application/json") || (ct.is_empty() && !looks_like_zip(&body)) {
            let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
                b"{}"
            } else {
                &body
            };
            let settings: Settings = serde_json::from_slice(text).map_err(|e| {
                warp::reject::custom(ApiError::bad_request(format!("settings must be JSON: {e}")))
            })?;
            (settings, Code::Unchanged)
        } else {
            let DeployBody { settings, code } =
                deploy_body(content_type, query, body, state.max_body_bytes)
                    .await
                    .map_err(warp::reject::custom)?;
            (settings, code)
        };
    redeploy(&state, &function, settings, code).await
}

/// Stores `settings` and `code` as the next version of `function`, in its owner's name (an
/// admin may update another tenant's function), refusing a rename.
pub(super) async fn redeploy(
    state: &AppState,
    function: &Function,
    mut settings: Settings,
    code: Code,
) -> Result<Response, Rejection> {
    if settings.name.as_ref().is_some_and(|n| n != &function.name) {
        return Err(warp::reject::custom(ApiError::bad_request(
            "a function cannot be renamed; deploy under the new name instead",
        )));
    }
    settings.name = Some(function.name.clone());
    let owner = Caller {
        tenant: function.tenant.clone(),
        admin: false,
    };
    let (function, version) = state
        .platform
        .deploy(&owner, settings, code)
        .await
        .map_err(reject)?;
    Ok(reply(
        StatusCode::OK,
        deployed_json("updated", &function, &version),
    ))
}

async fn set_active(
    key: String,
    active: bool,
    caller: Caller,
    state: AppState,
) -> Result<Response, Rejection> {
    let f = state
        .platform
        .set_active(&caller, &key, active)
        .await
        .map_err(reject)?;
    Ok(reply(
        StatusCode::OK,
        json!({"id": f.id, "name": f.name, "status": if active { "active" } else { "inactive" }}),
    ))
}

pub(super) async fn delete(
    key: String,
    caller: Caller,
    state: AppState,
) -> Result<Response, Rejection> {
    let f = state.platform.delete(&caller, &key).await.map_err(reject)?;
    Ok(reply(
        StatusCode::OK,
        json!({"id": f.id, "name": f.name, "status": "deleted"}),
    ))
}

#[derive(Debug, Deserialize, Default)]
pub struct RunQuery {
    pub version: Option<u32>,
}

/// The run body: any JSON value is the payload; an empty body means `{}`.
fn payload(body: Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the payload must be JSON: {e}")))
}

async fn run(
    key: String,
    query: RunQuery,
    caller: Caller,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let payload = payload(body).map_err(warp::reject::custom)?;
    let task = state
        .platform
        .submit(&caller, &key, query.version, payload)
        .await
        .map_err(reject)?;
    let mut response = reply(
        StatusCode::ACCEPTED,
        json!({"task_id": task.task_id, "status": task.status, "function": task.function, "version": task.version}),
    );
    if let Ok(v) = warp::http::HeaderValue::from_str(&format!("/api/tasks/{}", task.task_id)) {
        response.headers_mut().insert("location", v);
    }
    Ok(response)
}

async fn invoke(
    key: String,
    query: RunQuery,
    caller: Caller,
    body: Bytes,
    state: AppState,
) -> Result<Response, Rejection> {
    let payload = payload(body).map_err(warp::reject::custom)?;
    let task = state
        .platform
        .invoke(&caller, &key, query.version, payload)
        .await
        .map_err(reject)?;
    Ok(reply(StatusCode::OK, &task))
}

async fn task(id: String, caller: Caller, state: AppState) -> Result<Response, Rejection> {
    let task = state.platform.task(&caller, &id).await.map_err(reject)?;
    Ok(reply(StatusCode::OK, &task))
}

#[derive(Debug, Deserialize, Default)]
pub struct TasksQuery {
    pub limit: Option<u32>,
}

async fn recent(
    key: String,
    query: TasksQuery,
    caller: Caller,
    state: AppState,
) -> Result<Response, Rejection> {
    let tasks = state
        .platform
        .recent(&caller, &key, query.limit.unwrap_or(20).min(500))
        .await
        .map_err(reject)?;
    Ok(reply(StatusCode::OK, json!({"tasks": tasks})))
}

/// A time range: `since`/`until` in Unix milliseconds, or `range` like `15m`, `1h`, `7d`;
/// and a `step` for series, like `1m`, `1h`, `1d`.
#[derive(Debug, Deserialize, Default)]
pub struct RangeQuery {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub range: Option<String>,
    pub step: Option<String>,
}

/// A span like `15m`, `1h` or `7d` in milliseconds.
fn span_ms(what: &str, text: &str) -> Result<i64, ApiError> {
    // Split off the last character, not the last byte: the text may be any UTF-8.
    let cut = text.char_indices().last().map_or(0, |(i, _)| i);
    let (n, unit) = text.split_at(cut);
    let n: i64 = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request(format!("{what} {text:?} must look like 15m, 1h or 7d"))
    })?;
    let ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(ApiError::bad_request(format!(
                "{what} {text:?} must end in s, m, h or d"
            )))
        }
    };
    Ok(n.saturating_mul(ms))
}

impl RangeQuery {
    /// The step in milliseconds, when one is asked for.
    pub fn step(&self) -> Result<Option<i64>, ApiError> {
        self.step.as_deref().map(|s| span_ms("step", s)).transpose()
    }

    pub fn resolve(&self) -> Result<(i64, i64), ApiError> {
        let out_of_range = || {
            ApiError::bad_request("since and until are Unix milliseconds between 0 and year 9999")
        };
        const MAX_MS: i64 = 253_402_300_799_999;
        let valid = |ms: i64| (0..=MAX_MS).contains(&ms);
        let until = self.until.unwrap_or_else(|| crate::model::now_ms() + 1);
        if !valid(until) {
            return Err(out_of_range());
        }
        let since = match (&self.since, &self.range) {
            (Some(s), _) => *s,
            (None, Some(r)) => until.saturating_sub(span_ms("range", r)?).max(0),
            (None, None) => until.saturating_sub(86_400_000).max(0),
        };
        if !valid(since) {
            return Err(out_of_range());
        }
        if since >= until {
            return Err(ApiError::bad_request("since must be before until"));
        }
        Ok((since, until))
    }
}

pub async fn metrics(
    key: Option<String>,
    query: RangeQuery,
    caller: Caller,
    state: AppState,
) -> Result<Response, Rejection> {
    let (since, until) = query.resolve().map_err(warp::reject::custom)?;
    let step = query.step().map_err(warp::reject::custom)?;
    let body = state
        .platform
        .metrics(&caller, key.as_deref(), since, until, step)
        .await
        .map_err(reject)?;
    Ok(reply(StatusCode::OK, body))
}

/// The canonical routes; all need a token.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let limit = state.max_body_bytes;
    let auth = caller(state.keys.clone());
    let s = move || with_state(state.clone());
    let base = warp::path("api").and(warp::path("functions"));

    let deploy = base
        .and(warp::path("deploy"))
        .and(warp::path::end())
        .and(warp::post())
        .and(auth.clone())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(deploy);
    let list = base
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(list);
    let get = base
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(get);
    let update = base
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::put())
        .and(auth.clone())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(update);
    let versions = base
        .and(super::segment())
        .and(warp::path("versions"))
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(versions);
    let activate = base
        .and(super::segment())
        .and(warp::path("activate"))
        .and(warp::path::end())
        .and(warp::put().or(warp::post()).unify())
        .map(|k| (k, true))
        .untuple_one();
    let deactivate = base
        .and(super::segment())
        .and(warp::path("deactivate"))
        .and(warp::path::end())
        .and(warp::put().or(warp::post()).unify())
        .map(|k| (k, false))
        .untuple_one();
    let toggle = activate
        .or(deactivate)
        .unify()
        .and(auth.clone())
        .and(s())
        .and_then(set_active);
    let delete = base
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::delete())
        .and(auth.clone())
        .and(s())
        .and_then(delete);
    let run = base
        .and(super::segment())
        .and(warp::path("run"))
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::query::<RunQuery>())
        .and(auth.clone())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(run);
    let invoke = base
        .and(super::segment())
        .and(warp::path("invoke"))
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::query::<RunQuery>())
        .and(auth.clone())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(s())
        .and_then(invoke);
    let status = base
        .and(super::segment())
        .and(warp::path("status"))
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(task);
    let task = warp::path("api")
        .and(warp::path("tasks"))
        .and(super::segment())
        .and(warp::path::end())
        .and(warp::get())
        .and(auth.clone())
        .and(s())
        .and_then(task);
    let recent = base
        .and(super::segment())
        .and(warp::path("tasks"))
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::query::<TasksQuery>())
        .and(auth.clone())
        .and(s())
        .and_then(recent);
    let fn_metrics = base
        .and(super::segment())
        .and(warp::path("metrics"))
        .and(warp::path::end())
        .and(warp::get())
        .map(Some)
        .and(warp::query::<RangeQuery>())
        .and(auth.clone())
        .and(s())
        .and_then(metrics);
    let sys_metrics = warp::path!("api" / "system" / "metrics")
        .and(warp::get())
        .map(|| None)
        .and(warp::query::<RangeQuery>())
        .and(auth.clone())
        .and(s())
        .and_then(metrics);

    deploy
        .or(list)
        .unify()
        .or(versions)
        .unify()
        .or(toggle)
        .unify()
        .or(run)
        .unify()
        .or(invoke)
        .unify()
        .or(status)
        .unify()
        .or(recent)
        .unify()
        .or(fn_metrics)
        .unify()
        .or(get)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .or(task)
        .unify()
        .or(sys_metrics)
        .unify()
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_and_odd_text_is_refused_not_panicked_on() {
        assert_eq!(span_ms("step", "5m").unwrap(), 300_000);
        assert_eq!(span_ms("range", "7d").unwrap(), 7 * 86_400_000);
        for bad in [
            "", "m", "0m", "-1h", "5", "5x", "\u{80}", "1\u{80}", "5€", "€m",
        ] {
            assert!(span_ms("step", bad).is_err(), "{bad:?}");
        }
        let q = RangeQuery {
            range: Some("\u{80}".into()),
            ..RangeQuery::default()
        };
        assert!(q.resolve().is_err());
    }
}
