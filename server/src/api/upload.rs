//! The multipart upload API (seed 004's shape): `POST /functions` with a `python_file` and
//! the name of the function inside it (`function_name`), and `POST /functions/{id}/execute`
//! with `{"payload": "<string>"}`, passed to the handler as the string itself.

use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::{Method, StatusCode};

use super::body::{read_form, settings_from_fields};
use super::functions::{deployed_json, token};
use super::functions_json::outcome_json;
use super::openapi::{id_param, op, schema};
use super::router::{json as reply, Ctx, Reply};
use super::{ApiError, Route};
use crate::platform::{Code, Settings};
use cloudfunc_sandbox::Runtime;

/// Reads the form: `python_file` (or `file`), `function_name` (default `handle`), `name`
/// (default: the file's name) and any other setting.
async fn form(c: &Ctx) -> Result<(Settings, Code), ApiError> {
    let ct = c.content_type().unwrap_or_default();
    let (mut fields, files) = read_form(ct, c.body.clone(), c.state.max_body_bytes).await?;
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
    let mut settings = settings_from_fields(&fields)?;
    settings.name = Some(name);
    settings.runtime = Some(Runtime::Python);
    settings.handler = Some(format!("{module}.{function}"));
    Ok((settings, Code::Files(vec![(base, data.to_vec())])))
}

/// `POST /functions` with a multipart form (the JSON API hands it over).
pub(super) async fn create(c: Ctx) -> Reply {
    let (settings, code) = form(&c).await?;
    let (function, version) = c.state.platform.deploy(c.caller(), settings, code).await?;
    Ok(reply(
        StatusCode::CREATED,
        &deployed_json("deployed", &function, &version),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadBody {
    payload: String,
}

/// `POST /functions/{id}/execute` with `{"payload": "<string>"}`.
async fn execute(c: Ctx) -> Reply {
    let b: PayloadBody =
        super::body::json_or_empty(&c.body, "send JSON {\"payload\": \"<string>\"}")?;
    let task = c
        .state
        .platform
        .invoke(c.caller(), c.param(0), None, Value::String(b.payload))
        .await?;
    let mut out = outcome_json(&task);
    out["result"] = task.result.clone().unwrap_or(Value::Null);
    Ok(reply(StatusCode::OK, &out))
}

/// The routes (`POST /functions` is shared with the JSON API, which mounts it).
pub fn routes() -> Vec<Route> {
    vec![token(
        Method::POST,
        "/functions/{id}/execute",
        true,
        |c| Box::pin(execute(c)),
        || {
            op(
                "Run now with a string payload, passed to handle(payload) as it is",
                ("200", schema("Outcome")),
                &["404", "409", "429"],
                json!({"parameters": [id_param()], "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["payload"], "properties": {"payload": {"type": "string"}}}}}}}),
            )
        },
    )]
}
