//! `/api/functions` (seed 000): deploy, list, read, update, (de)activate, delete, run (queued)
//! and invoke (now), a function's recent tasks and its metrics.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{HeaderValue, Method, StatusCode};

use super::body::{deploy_body, json_or_empty, looks_like_zip, payload, DeployBody, RangeQuery};
use super::openapi::{
    id_and_range, id_param, idempotency_param, json_body, op, schema, settings_properties,
    version_param,
};
use super::router::{json as reply, Access, Ctx, Reply, Route};
use super::ApiError;
use crate::auth::Caller;
use crate::model::{Function, Version};
use crate::platform::{Code, Settings};

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

/// `?version=` of run and invoke.
#[derive(Debug, Deserialize, Default)]
pub struct RunQuery {
    pub version: Option<u32>,
}

/// `?limit=` of a function's recent tasks.
#[derive(Debug, Deserialize, Default)]
pub struct TasksQuery {
    pub limit: Option<u32>,
}

async fn deploy(c: Ctx) -> Reply {
    let query: HashMap<String, String> = c.query()?;
    let DeployBody { settings, code } = deploy_body(
        c.content_type(),
        &query,
        c.body.clone(),
        c.state.max_body_bytes,
    )
    .await?;
    let (function, version) = c.state.platform.deploy(c.caller(), settings, code).await?;
    Ok(reply(
        StatusCode::CREATED,
        &deployed_json("deployed", &function, &version),
    ))
}

pub(super) async fn list(c: Ctx) -> Reply {
    let functions = c.state.platform.list(c.caller()).await?;
    let list: Vec<Value> = functions.iter().map(|f| function_json(f, None)).collect();
    Ok(reply(
        StatusCode::OK,
        &json!({"functions": list, "count": list.len()}),
    ))
}

pub(super) async fn get(c: Ctx) -> Reply {
    let (function, versions) = c.state.platform.get(c.caller(), c.param(0)).await?;
    Ok(reply(
        StatusCode::OK,
        &function_json(&function, Some(&versions)),
    ))
}

async fn versions(c: Ctx) -> Reply {
    let (function, versions) = c.state.platform.get(c.caller(), c.param(0)).await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"id": function.id, "name": function.name, "versions": versions}),
    ))
}

/// PUT on a function: a ZIP body (new code) or JSON settings, as its next version.
async fn update(c: Ctx) -> Reply {
    let (function, _) = c.state.platform.get(c.caller(), c.param(0)).await?;
    let ct = c.content_type().unwrap_or_default();
    let (settings, code) =
        if ct.starts_with("application/json") || (ct.is_empty() && !looks_like_zip(&c.body)) {
            let settings: Settings = json_or_empty(&c.body, "the settings")?;
            (settings, Code::Unchanged)
        } else {
            let query: HashMap<String, String> = c.query()?;
            let DeployBody { settings, code } = deploy_body(
                c.content_type(),
                &query,
                c.body.clone(),
                c.state.max_body_bytes,
            )
            .await?;
            (settings, code)
        };
    redeploy(&c, &function, settings, code).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u32,
}

/// `POST /api/functions/{id}/rollback` with `{"version": N}`: version N's code and settings
/// again, as the next version (the versions in between stay, callable by number).
async fn rollback(c: Ctx) -> Reply {
    let (function, _) = c.state.platform.get(c.caller(), c.param(0)).await?;
    let body: RollbackBody = json_or_empty(&c.body, "send {\"version\": N}")?;
    redeploy(
        &c,
        &function,
        Settings::default(),
        Code::Version(body.version),
    )
    .await
}

/// Stores `settings` and `code` as the next version of `function`, in its owner's name (an
/// admin may update another tenant's function), refusing a rename.
pub(super) async fn redeploy(
    c: &Ctx,
    function: &Function,
    mut settings: Settings,
    code: Code,
) -> Reply {
    if settings.name.as_ref().is_some_and(|n| n != &function.name) {
        return Err(ApiError::bad_request(
            "a function cannot be renamed; deploy under the new name instead",
        ));
    }
    settings.name = Some(function.name.clone());
    let owner = Caller {
        tenant: function.tenant.clone(),
        admin: false,
    };
    let (function, version) = c.state.platform.deploy(&owner, settings, code).await?;
    Ok(reply(
        StatusCode::OK,
        &deployed_json("updated", &function, &version),
    ))
}

async fn set_active(c: Ctx, active: bool) -> Reply {
    let f = c
        .state
        .platform
        .set_active(c.caller(), c.param(0), active)
        .await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"id": f.id, "name": f.name, "status": if active { "active" } else { "inactive" }}),
    ))
}

pub(super) async fn delete(c: Ctx) -> Reply {
    let f = c.state.platform.delete(c.caller(), c.param(0)).await?;
    Ok(reply(
        StatusCode::OK,
        &json!({"id": f.id, "name": f.name, "status": "deleted"}),
    ))
}

async fn run(c: Ctx) -> Reply {
    let query: RunQuery = c.query()?;
    let payload = payload(&c.body)?;
    let platform = &c.state.platform;
    let (function, version) = (c.param(0), query.version);
    // Sent again with the same key, a submission gets the task the first one made.
    let (task, replayed) = match super::idempotency_key(&c)? {
        Some(key) => {
            platform
                .submit_once(c.caller(), function, version, payload, key)
                .await?
        }
        None => (
            platform
                .submit(c.caller(), function, version, payload)
                .await?,
            false,
        ),
    };
    let mut response = reply(
        StatusCode::ACCEPTED,
        &json!({"task_id": task.task_id, "status": task.status, "function": task.function, "version": task.version}),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/api/tasks/{}", task.task_id)) {
        response.headers_mut().insert("location", v);
    }
    super::replayed(&mut response, replayed);
    Ok(response)
}

async fn invoke(c: Ctx) -> Reply {
    let query: RunQuery = c.query()?;
    let payload = payload(&c.body)?;
    let task = c
        .state
        .platform
        .invoke(c.caller(), c.param(0), query.version, payload)
        .await?;
    Ok(reply(StatusCode::OK, &task))
}

async fn recent(c: Ctx) -> Reply {
    let query: TasksQuery = c.query()?;
    let tasks = c
        .state
        .platform
        .recent(c.caller(), c.param(0), query.limit.unwrap_or(20).min(500))
        .await?;
    Ok(reply(StatusCode::OK, &json!({"tasks": tasks})))
}

/// Metrics of the function `key` (or of everything the caller sees) over the query's range.
pub(super) async fn metrics(c: &Ctx, key: Option<&str>) -> Reply {
    let query: RangeQuery = c.query()?;
    let (since, until) = query.resolve()?;
    let step = query.step()?;
    let body = c
        .state
        .platform
        .metrics(c.caller(), key, since, until, step)
        .await?;
    Ok(reply(StatusCode::OK, &body))
}

fn deploy_request() -> Value {
    let mut form = settings_properties();
    form["file"] = json!({"type": "string", "format": "binary"});
    json!({"required": true, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": form}},
        "application/zip": {"schema": {"type": "string", "format": "binary"}}
    }})
}

/// A route that needs a token.
pub(super) fn token(
    method: Method,
    path: &'static str,
    body: bool,
    handler: super::router::Handler,
    doc: fn() -> Value,
) -> Route {
    Route {
        method,
        path,
        access: Access::Token,
        body,
        handler,
        doc,
    }
}

/// `GET /api/functions/`.
pub(super) fn list_route() -> Route {
    token(
        Method::GET,
        "/api/functions/",
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
    )
}

/// `GET /api/functions/{id}`.
pub(super) fn get_route() -> Route {
    token(
        Method::GET,
        "/api/functions/{id}",
        false,
        |c| Box::pin(get(c)),
        || {
            let params = json!({"parameters": [id_param()]});
            op(
                "A function with its versions",
                ("200", schema("Function")),
                &["404"],
                params,
            )
        },
    )
}

/// `DELETE /api/functions/{id}`.
pub(super) fn delete_route() -> Route {
    token(
        Method::DELETE,
        "/api/functions/{id}",
        false,
        |c| Box::pin(delete(c)),
        || {
            let params = json!({"parameters": [id_param()]});
            let what = "Delete a function, its versions and their code (its tasks stay readable)";
            op(what, ("200", schema("Changed")), &["404"], params)
        },
    )
}

/// `GET /api/functions/{id}/metrics`.
pub(super) fn metrics_route() -> Route {
    let handler: super::router::Handler =
        |c| Box::pin(async move { metrics(&c, Some(c.param(0))).await });
    token(
        Method::GET,
        "/api/functions/{id}/metrics",
        false,
        handler,
        || {
            let params = json!({"parameters": id_and_range()});
            op(
                "A function's metrics over a range",
                ("200", schema("Metrics")),
                &["404"],
                params,
            )
        },
    )
}

fn set_active_route(active: bool) -> Route {
    let (path, handler, doc): (_, super::router::Handler, fn() -> Value) = if active {
        (
            "/api/functions/{id}/activate",
            |c| Box::pin(set_active(c, true)),
            || {
                let params = json!({"parameters": [id_param()]});
                op(
                    "Activate (POST works too)",
                    ("200", schema("Changed")),
                    &["404"],
                    params,
                )
            },
        )
    } else {
        (
            "/api/functions/{id}/deactivate",
            |c| Box::pin(set_active(c, false)),
            || {
                let params = json!({"parameters": [id_param()]});
                let what =
                    "Deactivate: its runs are refused until it is activated (POST works too)";
                op(what, ("200", schema("Changed")), &["404"], params)
            },
        )
    };
    token(Method::PUT, path, false, handler, doc)
}

/// The routes.
pub fn routes() -> Vec<Route> {
    let activate = set_active_route(true);
    let deactivate = set_active_route(false);
    vec![
        token(
            Method::POST,
            "/api/functions/deploy",
            true,
            |c| Box::pin(deploy(c)),
            || {
                let query = [
                    "name",
                    "runtime",
                    "handler",
                    "timeout",
                    "memory",
                    "cpu",
                    "isolation",
                ]
                .map(|n| json!({"name": n, "in": "query", "schema": {"type": "string"}}));
                let what =
                    "Deploy a ZIP (multipart or application/zip); settings from form fields, \
                        the query or a manifest in the ZIP";
                let extra = json!({"requestBody": deploy_request(), "parameters": query});
                op(
                    what,
                    ("201", schema("Deployed")),
                    &["409", "415", "422"],
                    extra,
                )
            },
        ),
        list_route(),
        get_route(),
        token(
            Method::PUT,
            "/api/functions/{id}",
            true,
            |c| Box::pin(update(c)),
            || {
                let body =
                    json_body(json!({"type": "object", "properties": settings_properties()}));
                let extra = json!({"parameters": [id_param()], "requestBody": body});
                let what = "New code (application/zip or multipart) or settings (JSON) as the next version";
                op(
                    what,
                    ("200", schema("Deployed")),
                    &["404", "409", "415", "422"],
                    extra,
                )
            },
        ),
        delete_route(),
        token(
            Method::GET,
            "/api/functions/{id}/versions",
            false,
            |c| Box::pin(versions(c)),
            || {
                let params = json!({"parameters": [id_param()]});
                op(
                    "Versions of a function",
                    ("200", schema("Versions")),
                    &["404"],
                    params,
                )
            },
        ),
        token(
            Method::POST,
            "/api/functions/{id}/rollback",
            true,
            |c| Box::pin(rollback(c)),
            || {
                let body = json_body(json!({
                    "type": "object",
                    "required": ["version"],
                    "additionalProperties": false,
                    "properties": {"version": {"type": "integer", "minimum": 1}},
                }));
                let extra = json!({"parameters": [id_param()], "requestBody": body});
                let what = "An earlier version's code and settings again, as the next version";
                op(what, ("200", schema("Deployed")), &["404", "409"], extra)
            },
        ),
        activate.clone().with_method(Method::POST),
        activate,
        deactivate.clone().with_method(Method::POST),
        deactivate,
        token(
            Method::POST,
            "/api/functions/{id}/run",
            true,
            |c| Box::pin(run(c)),
            || {
                let body = json_body(json!({}));
                let params = [id_param(), version_param(), idempotency_param()];
                let extra = json!({"parameters": params, "requestBody": body});
                let what = "Queue an asynchronous run; 202 once the task is on disk";
                op(
                    what,
                    ("202", schema("Queued")),
                    &["404", "409", "422"],
                    extra,
                )
            },
        ),
        token(
            Method::POST,
            "/api/functions/{id}/invoke",
            true,
            |c| Box::pin(invoke(c)),
            || {
                let body = json_body(json!({}));
                let extra =
                    json!({"parameters": [id_param(), version_param()], "requestBody": body});
                let what = "Run now and wait for the finished task";
                op(what, ("200", schema("Task")), &["404", "409", "429"], extra)
            },
        ),
        token(
            Method::GET,
            "/api/functions/{id}/tasks",
            false,
            |c| Box::pin(recent(c)),
            || {
                let limit = json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 500}});
                let params = json!({"parameters": [id_param(), limit]});
                op(
                    "Recent tasks of a function, newest first",
                    ("200", schema("TaskList")),
                    &["404"],
                    params,
                )
            },
        ),
        metrics_route(),
    ]
}
