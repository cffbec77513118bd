//! Monitoring routes: the Prometheus exposition and a task's logs.

use serde_json::json;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::error::reject;
use super::{caller, with_state, AppState};
use crate::auth::Caller;

async fn prometheus(caller: Caller, state: AppState) -> Result<Response, Rejection> {
    let text = state.platform.prometheus(&caller).await.map_err(reject)?;
    Ok(warp::reply::with_header(
        text,
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response())
}

async fn logs(id: String, caller: Caller, state: AppState) -> Result<Response, Rejection> {
    let task = state.platform.task(&caller, &id).await.map_err(reject)?;
    let body = json!({
        "task_id": task.task_id,
        "function": task.function,
        "version": task.version,
        "status": task.status.as_str(),
        "logs": task.logs,
        "logs_truncated": task.logs_truncated,
    });
    Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::OK).into_response())
}

/// `GET /metrics` and `GET /api/tasks/{id}/logs`; both need a token.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let auth = caller(state.keys.clone());
    let prometheus = warp::path!("metrics")
        .and(warp::get())
        .and(auth.clone())
        .and(with_state(state.clone()))
        .and_then(prometheus);
    let logs = warp::path("api")
        .and(warp::path("tasks"))
        .and(super::segment())
        .and(warp::path("logs"))
        .and(warp::path::end())
        .and(warp::get())
        .and(auth)
        .and(with_state(state))
        .and_then(logs);
    prometheus.or(logs).unify().boxed()
}
