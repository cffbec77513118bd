//! The system: health (no token), metrics over ranges, the Prometheus exposition, and the
//! OpenAPI document itself.

use serde_json::json;
use warp::http::{HeaderValue, Method, StatusCode};

use super::functions::{metrics, token};
use super::openapi::{op, op_text, range_params, schema};
use super::router::{json as reply, Access, Ctx, Reply, Route};

async fn health(c: Ctx) -> Reply {
    let body = c.state.platform.health().await?;
    Ok(reply(StatusCode::OK, &body))
}

async fn prometheus(c: Ctx) -> Reply {
    let text = c.state.platform.prometheus(c.caller()).await?;
    let mut response = warp::reply::Response::new(text.into());
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

async fn openapi(_: Ctx) -> Reply {
    Ok(reply(
        StatusCode::OK,
        &super::openapi::document(&super::table()),
    ))
}

/// `GET /api/system/metrics`.
pub(super) fn system_metrics_route() -> Route {
    let handler: super::router::Handler = |c| Box::pin(async move { metrics(&c, None).await });
    token(Method::GET, "/api/system/metrics", false, handler, || {
        let params = json!({"parameters": range_params()});
        let what = "Metrics of every function the caller sees, over a range";
        op(what, ("200", schema("Metrics")), &["400"], params)
    })
}

/// The routes.
pub fn routes() -> Vec<Route> {
    vec![
        Route {
            method: Method::GET,
            path: "/api/system/health",
            access: Access::Public,
            body: false,
            handler: |c| Box::pin(health(c)),
            doc: || {
                op("System health: status, uptime, queue depth, the warm pool, backends, host and process", ("200", schema("Health")), &[], json!({}))
            },
        },
        Route {
            method: Method::GET,
            path: "/api/openapi.json",
            access: Access::Public,
            body: false,
            handler: |c| Box::pin(openapi(c)),
            doc: || {
                op(
                    "This document",
                    ("200", json!({"type": "object"})),
                    &[],
                    json!({}),
                )
            },
        },
        token(
            Method::GET,
            "/api/system/metrics",
            false,
            |c| Box::pin(async move { metrics(&c, None).await }),
            || {
                op(
                    "Metrics of every function the caller sees, over a range",
                    ("200", schema("Metrics")),
                    &["400"],
                    json!({"parameters": range_params()}),
                )
            },
        ),
        token(
            Method::GET,
            "/metrics",
            false,
            |c| Box::pin(prometheus(c)),
            || {
                op_text("Prometheus text exposition: the caller's functions, and the whole system for an admin", "text/plain", &[])
            },
        ),
    ]
}
