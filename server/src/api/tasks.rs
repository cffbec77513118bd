//! Tasks: one task's status, result and usage (also at seed 000's
//! `/api/functions/{task_id}/status`), and what it printed.

use serde_json::json;
use warp::http::{Method, StatusCode};

use super::functions::token;
use super::openapi::{op, schema, task_param};
use super::router::{json as reply, Ctx, Reply, Route};

async fn task(c: Ctx) -> Reply {
    // A chain run's id answers here too (seed 000's status route is where clients look).
    if c.param(0).starts_with("run_") {
        let run = c.state.platform.chain_run(c.caller(), c.param(0)).await?;
        return Ok(reply(StatusCode::OK, &super::chains::run_body(&run)));
    }
    let task = c.state.platform.task(c.caller(), c.param(0)).await?;
    Ok(reply(StatusCode::OK, &task))
}

async fn logs(c: Ctx) -> Reply {
    let task = c.state.platform.task(c.caller(), c.param(0)).await?;
    Ok(reply(
        StatusCode::OK,
        &json!({
            "task_id": task.task_id,
            "function": task.function,
            "version": task.version,
            "status": task.status.as_str(),
            "logs": task.logs,
            "logs_truncated": task.logs_truncated,
        }),
    ))
}

/// The routes.
pub fn routes() -> Vec<Route> {
    let task_route = token(
        Method::GET,
        "/api/tasks/{task_id}",
        false,
        |c| Box::pin(task(c)),
        || {
            let params = json!({"parameters": [task_param("task_id")]});
            let either = json!({"oneOf": [schema("Task"), schema("ChainRun")]});
            op("A task: status, result or error, logs, usage (also at seed 000's /api/functions/{task_id}/status); a chain run's id gives the run", ("200", either), &["404"], params)
        },
    );
    vec![
        task_route.clone().at("/api/functions/{task_id}/status"),
        task_route,
        token(
            Method::GET,
            "/api/tasks/{task_id}/logs",
            false,
            |c| Box::pin(logs(c)),
            || {
                let params = json!({"parameters": [task_param("task_id")]});
                op(
                    "What a task printed, and whether it was cut at the cap",
                    ("200", schema("TaskLogs")),
                    &["404"],
                    params,
                )
            },
        ),
    ]
}
